//! Protocol detection (`proxy/src/detect.rs`) on the first bytes a client sends; the first
//! input byte says how many bytes each read delivers.
//!
//! Never panics, and:
//! - it decides the same however the bytes were split into reads;
//! - it reads no more than the client sent, and keeps what it read in order (the bytes are
//!   replayed to the protocol's server);
//! - HTTP/2 is decided on the whole connection preface only;
//! - a first request head detection accepts is complete for the HTTP/1 codec too, and within
//!   the same limit (the codec never waits for more bytes detection saw as a whole head).
#![no_main]

use std::sync::OnceLock;

use conduit_proxy::fuzzing::{self, Detector, Protocol, Refused};
use libfuzzer_sys::fuzz_target;

/// Small enough that the fuzzer reaches it.
const MAX_HEAD_BYTES: usize = 1024;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One runtime for every input.
static DETECTOR: OnceLock<Detector> = OnceLock::new();

fuzz_target!(|input: &[u8]| {
    let Some((&read_size, stream)) = input.split_first() else {
        return;
    };
    let detector = DETECTOR.get_or_init(|| Detector::new().expect("a runtime"));
    let whole = detector.detect(stream, usize::MAX, MAX_HEAD_BYTES);
    let split = detector.detect(stream, usize::from(read_size), MAX_HEAD_BYTES);
    assert_eq!(split.protocol, whole.protocol, "reads of {read_size} bytes");
    for detection in [&whole, &split] {
        assert!(stream.starts_with(&detection.buffered));
    }
    match whole.protocol {
        Ok(Protocol::Http2) => assert!(whole.buffered.starts_with(H2_PREFACE)),
        Ok(Protocol::Http1) => {
            let parsed = fuzzing::parse_request(&whole.buffered, MAX_HEAD_BYTES);
            assert!(
                !matches!(parsed, Ok(None) | Err(Refused::TooLarge)),
                "detection read a whole head, the codec says {parsed:?}"
            );
        }
        // A TLS ClientHello is recognised only whole, from its handshake record on.
        Ok(Protocol::Tls) => assert_eq!(whole.buffered.first(), Some(&0x16)),
        _ => {}
    }
});
