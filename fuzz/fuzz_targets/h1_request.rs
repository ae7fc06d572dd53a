//! The HTTP/1 request head codec (`proxy/src/h1/codec.rs`), on bytes a client sends.
//!
//! Never panics, and for every head it accepts:
//! - the head lies within the input and the limit, and every prefix of it asks for more
//!   (the engine parses after each read, so a head split across reads must not be refused);
//! - the framing is consistent with `Content-Length` and `Transfer-Encoding`;
//! - the header fields can be read again from the head's field block (route header
//!   conditions do that);
//! - the head it forwards, for a request with an authority (the ones another proxy may
//!   receive), is accepted again with the same method, route path, authority, framing and
//!   `grpc-timeout`, and is forwarded unchanged a second time.
#![no_main]

use conduit_proxy::fuzzing::{self, Framing, Request};
use libfuzzer_sys::fuzz_target;

/// Small enough that the fuzzer reaches it.
const MAX_HEAD_BYTES: usize = 2048;

fuzz_target!(|input: &[u8]| {
    let Ok(Some(request)) = fuzzing::parse_request(input, MAX_HEAD_BYTES) else {
        return;
    };
    check(input, &request);
});

fn check(input: &[u8], request: &Request) {
    assert!(request.len <= input.len() && request.len <= MAX_HEAD_BYTES);
    let len = request.len;
    for cut in [len - 1, len / 2, usize::from(input[0]) % len] {
        assert_eq!(
            fuzzing::parse_request(&input[..cut], MAX_HEAD_BYTES),
            Ok(None),
            "a prefix of {cut} bytes of an accepted head"
        );
    }
    assert!(!request.method.is_empty());
    // CONNECT's path is its authority (routes see that).
    assert!(request.connect || request.route_path.starts_with(b"/") || request.route_path == b"*");
    if let Some(authority) = &request.authority {
        assert!(!authority.is_empty() && authority.is_ascii());
    }
    assert!(!request.connect || request.authority.is_some());
    match request.body {
        Framing::Empty => assert!(matches!(request.content_length, None | Some(0))),
        Framing::Length(n) => assert!(n > 0 && request.content_length == Some(n)),
        Framing::Chunked => assert!(request.content_length.is_none() && !request.http10),
        Framing::Close => panic!("a request body delimited by close"),
    }
    assert!(
        request.fields.is_some(),
        "the field block of an accepted head does not parse again"
    );

    if request.authority.is_none() {
        // An HTTP/1.0 request without one: forwarded with an empty `host`, which only the app
        // (never another proxy) receives.
        return;
    }
    let forwarded = &request.forwarded;
    let again = match fuzzing::parse_request(forwarded, forwarded.len()) {
        Ok(Some(again)) => again,
        other => panic!(
            "the forwarded head {:?} gave {other:?}",
            String::from_utf8_lossy(forwarded)
        ),
    };
    assert_eq!(again.len, forwarded.len());
    assert_eq!(again.method, request.method);
    assert_eq!(again.route_path, request.route_path);
    assert_eq!(again.authority, request.authority);
    assert_eq!(again.body, request.body);
    assert_eq!(again.content_length, request.content_length);
    assert_eq!(again.grpc_timeout, request.grpc_timeout);
    assert_eq!(
        (
            again.upgrade,
            again.connect,
            again.head,
            again.safe,
            again.grpc
        ),
        (
            request.upgrade,
            request.connect,
            request.head,
            request.safe,
            request.grpc
        )
    );
    assert!(!again.http10);
    assert_eq!(
        &again.forwarded,
        forwarded,
        "forwarding is not idempotent for {:?}",
        String::from_utf8_lossy(input)
    );
}
