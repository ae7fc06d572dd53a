//! The chunked body decoder (`proxy/src/h1/codec.rs`), on a body a peer sends; the first
//! input byte says how many bytes each read delivers.
//!
//! Never panics, and:
//! - what it decides does not depend on how the body was split into reads: the same data,
//!   the same end, at the same byte;
//! - the data is no longer than the input, and a complete body ends within it;
//! - a complete body, re-framed as the proxy forwards it, decodes to the same data and
//!   trailers, and ends exactly where the re-framed body does.
#![no_main]

use conduit_proxy::fuzzing::{self, ChunkedEnd};
use libfuzzer_sys::fuzz_target;

/// Small enough that the fuzzer reaches it.
const MAX_TRAILER_BYTES: usize = 512;

fuzz_target!(|input: &[u8]| {
    let Some((&read_size, body)) = input.split_first() else {
        return;
    };
    let whole = fuzzing::decode_chunked(body, usize::MAX, MAX_TRAILER_BYTES);
    let split = fuzzing::decode_chunked(body, usize::from(read_size), MAX_TRAILER_BYTES);
    assert_eq!(
        (&split.data, &split.end),
        (&whole.data, &whole.end),
        "reads of {read_size} bytes"
    );
    assert!(whole.data.len() <= body.len());
    let ChunkedEnd::Done {
        consumed, trailers, ..
    } = &whole.end
    else {
        return;
    };
    assert!(*consumed <= body.len());
    // The limit holds for the bytes received; a kept field line is written back as
    // `name: value`, which may gain the space after its colon.
    let lines = trailers.windows(2).filter(|w| w == b"\r\n").count();
    assert!(trailers.len() <= MAX_TRAILER_BYTES + lines);
    let before_end = fuzzing::decode_chunked(&body[..consumed - 1], usize::MAX, MAX_TRAILER_BYTES);
    assert_eq!(before_end.end, ChunkedEnd::Truncated);
    assert!(whole.data.starts_with(&before_end.data));

    // Room for the trailers as written back.
    let again = fuzzing::decode_chunked(&whole.forwarded, usize::MAX, 2 * MAX_TRAILER_BYTES);
    assert_eq!(again.data, whole.data);
    match &again.end {
        ChunkedEnd::Done {
            consumed: forwarded_len,
            trailers: forwarded_trailers,
            ..
        } => {
            assert_eq!(*forwarded_len, whole.forwarded.len());
            assert_eq!(forwarded_trailers, trailers);
        }
        other => panic!("the forwarded body ended with {other:?}"),
    }
});
