//! The HTTP/1 response head codec (`proxy/src/h1/codec.rs`), on bytes an upstream sends in
//! answer to one of a few kinds of request (the first input byte picks it).
//!
//! Never panics, and for every head it accepts:
//! - the head lies within the input and the limit, and every prefix of it asks for more;
//! - the framing follows RFC 9112 §6.3 for the request (no body for `HEAD`, 1xx, 204, 304
//!   and tunnels), and a connection is only reused when the body's end is known;
//! - the head it forwards to the client is accepted again, with the same status, codings,
//!   gRPC fields and the framing the proxy wrote (a body of unknown length is chunked for an
//!   HTTP/1.1 client and runs until close for an HTTP/1.0 one), and is forwarded unchanged a
//!   second time.
#![no_main]

use conduit_proxy::fuzzing::{self, Answering, Framing, Response};
use libfuzzer_sys::fuzz_target;

/// Small enough that the fuzzer reaches it.
const MAX_HEAD_BYTES: usize = 2048;

fuzz_target!(|input: &[u8]| {
    let Some((&pick, bytes)) = input.split_first() else {
        return;
    };
    let answering = Answering::ALL[usize::from(pick) % Answering::ALL.len()];
    let Ok(Some(response)) = fuzzing::parse_response(answering, bytes, MAX_HEAD_BYTES) else {
        return;
    };
    check(answering, bytes, &response);
});

fn check(answering: Answering, input: &[u8], response: &Response) {
    assert!(response.len <= input.len() && response.len <= MAX_HEAD_BYTES);
    let len = response.len;
    for cut in [len - 1, len / 2] {
        assert_eq!(
            fuzzing::parse_response(answering, &input[..cut], MAX_HEAD_BYTES),
            Ok(None),
            "a prefix of {cut} bytes of an accepted head"
        );
    }
    let status = response.status;
    assert!((100..=999).contains(&status));
    let tunnel = (answering == Answering::Connect && (200..300).contains(&status))
        || (answering == Answering::Upgrade && status == 101);
    let no_body = (100..200).contains(&status)
        || status == 204
        || status == 304
        || answering == Answering::Head
        || tunnel;
    if no_body {
        assert_eq!(response.body, Framing::Empty);
    }
    if response.body == Framing::Close {
        assert!(!response.reusable);
    }
    if status == 101 {
        assert_eq!(answering, Answering::Upgrade);
    }

    let Some(forwarded) = &response.forwarded else {
        assert!(answering == Answering::Get10 && response.codings.is_some());
        return;
    };
    let again = match fuzzing::parse_response(answering, forwarded, forwarded.len()) {
        Ok(Some(again)) => again,
        other => panic!(
            "the forwarded head {:?} gave {other:?}",
            String::from_utf8_lossy(forwarded)
        ),
    };
    let framed = match (answering, response.body) {
        (Answering::Get10, Framing::Chunked | Framing::Close) => Framing::Close,
        (_, Framing::Close) => Framing::Chunked,
        (_, body) => body,
    };
    assert_eq!(again.len, forwarded.len());
    assert_eq!(again.status, status);
    assert_eq!(
        again.body,
        framed,
        "framing of the forwarded head {:?}",
        String::from_utf8_lossy(forwarded)
    );
    assert_eq!(
        again.codings,
        response.codings,
        "codings of the forwarded head {:?}",
        String::from_utf8_lossy(forwarded)
    );
    assert_eq!(again.grpc, response.grpc);
    assert_eq!(again.grpc_status, response.grpc_status);
    assert_eq!(
        again.forwarded.as_ref(),
        Some(forwarded),
        "forwarding is not idempotent for {:?}",
        String::from_utf8_lossy(input)
    );
}
