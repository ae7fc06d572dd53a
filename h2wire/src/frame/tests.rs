use proptest::prelude::*;

use super::*;
use crate::block::{Assembled, BlockAssembler};

/// A frame's bytes: header fields, then payload.
fn raw(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    FrameHeader {
        length: u32::try_from(payload.len()).unwrap(),
        kind,
        flags,
        stream_id: StreamId::new(stream),
    }
    .write(&mut out);
    out.extend_from_slice(payload);
    out
}

fn parse(bytes: &[u8]) -> Result<Frame<'_>, Error> {
    match parse_frame(bytes, DEFAULT_MAX_FRAME_SIZE)? {
        Some((frame, len)) => {
            assert_eq!(len, bytes.len());
            Ok(frame)
        }
        None => panic!("incomplete frame"),
    }
}

fn written(frame: &Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    frame.write(&mut out);
    out
}

#[test]
fn frame_header() {
    let bytes = [0x00, 0x01, 0x02, 0x01, 0x25, 0x80, 0x00, 0x00, 0x07, 0xaa];
    let header = FrameHeader::parse(&bytes).unwrap();
    assert_eq!(
        header,
        FrameHeader {
            length: 0x102,
            kind: kind::HEADERS,
            flags: 0x25,
            // The reserved bit is dropped.
            stream_id: StreamId::new(7),
        }
    );
    let mut out = Vec::new();
    header.write(&mut out);
    assert_eq!(out, [0x00, 0x01, 0x02, 0x01, 0x25, 0x00, 0x00, 0x00, 0x07]);
    assert_eq!(FrameHeader::parse(&bytes[..8]), None);
}

#[test]
fn preface() {
    assert_eq!(parse_preface(b""), Ok(None));
    assert_eq!(parse_preface(b"PRI * HTTP/2.0\r\n"), Ok(None));
    assert_eq!(parse_preface(PREFACE), Ok(Some(24)));
    let mut more = PREFACE.to_vec();
    more.extend_from_slice(&raw(kind::SETTINGS, 0, 0, &[]));
    assert_eq!(parse_preface(&more), Ok(Some(24)));
    let error = parse_preface(b"GET / HTTP/1.1\r\n").unwrap_err();
    assert_eq!(
        (error.code(), error.is_connection_error()),
        (ErrorCode::PROTOCOL_ERROR, true)
    );
    assert!(parse_preface(b"PRI * HTTP/1.1").is_err());
}

#[test]
fn incomplete_frames_ask_for_more() {
    let frame = raw(kind::DATA, 0, 1, b"hello");
    for cut in 0..frame.len() {
        assert_eq!(parse_frame(&frame[..cut], DEFAULT_MAX_FRAME_SIZE), Ok(None));
    }
    let mut two = frame.clone();
    two.extend_from_slice(&frame);
    let (_, len) = parse_frame(&two, DEFAULT_MAX_FRAME_SIZE).unwrap().unwrap();
    assert_eq!(len, frame.len());
}

#[test]
fn frames_over_the_max_frame_size_are_refused_from_their_header() {
    let header = raw(kind::DATA, 0, 1, &[0; 100]);
    // Only the header has arrived.
    assert_eq!(
        parse_frame(&header[..9], 99),
        Err(Error::connection(
            ErrorCode::FRAME_SIZE_ERROR,
            "frame larger than SETTINGS_MAX_FRAME_SIZE"
        ))
    );
    assert!(parse_frame(&header, 100).unwrap().is_some());
}

#[test]
fn data_and_padding() {
    let bytes = raw(kind::DATA, flag::PADDED | flag::END_STREAM, 1, b"\x02abcxx");
    let Frame::Data(data) = parse(&bytes).unwrap() else {
        panic!()
    };
    assert_eq!(data.data, b"abc");
    assert_eq!(data.pad_len, Some(2));
    assert!(data.end_stream);
    assert_eq!(data.flow_controlled_len(), 6);
    // Padding may take everything after the pad length.
    let bytes = raw(kind::DATA, flag::PADDED, 1, b"\x02xx");
    let Frame::Data(data) = parse(&bytes).unwrap() else {
        panic!()
    };
    assert_eq!(data.data, b"");
}

#[test]
fn headers_with_priority_and_padding() {
    let payload = b"\x01\x80\x00\x00\x03\x0ffragmentz";
    let flags = flag::PADDED | flag::PRIORITY | flag::END_HEADERS;
    let bytes = raw(kind::HEADERS, flags, 5, payload);
    let Frame::Headers(headers) = parse(&bytes).unwrap() else {
        panic!()
    };
    assert_eq!(headers.fragment, b"fragment");
    assert_eq!(
        headers.dependency,
        Some(StreamDependency {
            dependency: StreamId::new(3),
            exclusive: true,
            weight: 15
        })
    );
    assert!(headers.end_headers && !headers.end_stream);
    assert_eq!(headers.check_dependency(), Ok(()));
}

/// Each rule of RFC 9113 §6 a frame breaks on its own: the error's scope and code.
#[test]
fn frame_errors() {
    // (frame, is a connection error, code)
    let conn = true;
    let cases: Vec<(Vec<u8>, bool, ErrorCode)> = vec![
        // DATA on stream 0; padding too long; PADDED without its pad length.
        (raw(kind::DATA, 0, 0, b"x"), conn, ErrorCode::PROTOCOL_ERROR),
        (
            raw(kind::DATA, flag::PADDED, 1, b"\x03ab"),
            conn,
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            raw(kind::DATA, flag::PADDED, 1, b""),
            conn,
            ErrorCode::FRAME_SIZE_ERROR,
        ),
        // HEADERS on stream 0; padding beyond the fragment; PRIORITY without its 5 bytes.
        (
            raw(kind::HEADERS, 0, 0, b"x"),
            conn,
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            raw(
                kind::HEADERS,
                flag::PADDED | flag::PRIORITY,
                1,
                b"\x01\0\0\0\0\x10",
            ),
            conn,
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            raw(kind::HEADERS, flag::PRIORITY, 1, b"\0\0\0"),
            conn,
            ErrorCode::FRAME_SIZE_ERROR,
        ),
        // PRIORITY: stream 0; not 5 bytes (a stream error); a stream depending on itself.
        (
            raw(kind::PRIORITY, 0, 0, b"\0\0\0\x01\x10"),
            conn,
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            raw(kind::PRIORITY, 0, 1, b"\0\0\0\x03"),
            !conn,
            ErrorCode::FRAME_SIZE_ERROR,
        ),
        (
            raw(kind::PRIORITY, 0, 3, b"\0\0\0\x03\x10"),
            !conn,
            ErrorCode::PROTOCOL_ERROR,
        ),
        // RST_STREAM: stream 0; not 4 bytes.
        (
            raw(kind::RST_STREAM, 0, 0, b"\0\0\0\x08"),
            conn,
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            raw(kind::RST_STREAM, 0, 1, b"\0\0\x08"),
            conn,
            ErrorCode::FRAME_SIZE_ERROR,
        ),
        // SETTINGS: on a stream; ACK with a payload; not a multiple of 6; bad values.
        (
            raw(kind::SETTINGS, 0, 1, b""),
            conn,
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            raw(kind::SETTINGS, flag::ACK, 0, b"\0\x01\0\0\0\0"),
            conn,
            ErrorCode::FRAME_SIZE_ERROR,
        ),
        (
            raw(kind::SETTINGS, 0, 0, b"\0\x01\0\0\0"),
            conn,
            ErrorCode::FRAME_SIZE_ERROR,
        ),
        (
            raw(kind::SETTINGS, 0, 0, b"\0\x02\0\0\0\x02"),
            conn,
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            raw(kind::SETTINGS, 0, 0, b"\0\x04\x80\0\0\0"),
            conn,
            ErrorCode::FLOW_CONTROL_ERROR,
        ),
        (
            raw(kind::SETTINGS, 0, 0, b"\0\x05\0\0\x3f\xff"),
            conn,
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            raw(kind::SETTINGS, 0, 0, b"\0\x05\x01\0\0\0"),
            conn,
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            raw(kind::SETTINGS, 0, 0, b"\0\x08\0\0\0\x02"),
            conn,
            ErrorCode::PROTOCOL_ERROR,
        ),
        // PUSH_PROMISE: stream 0; no room for the promised stream.
        (
            raw(kind::PUSH_PROMISE, 0, 0, b"\0\0\0\x02"),
            conn,
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            raw(kind::PUSH_PROMISE, 0, 1, b"\0\0\x02"),
            conn,
            ErrorCode::FRAME_SIZE_ERROR,
        ),
        // PING: on a stream; not 8 bytes.
        (
            raw(kind::PING, 0, 1, &[0; 8]),
            conn,
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            raw(kind::PING, 0, 0, &[0; 7]),
            conn,
            ErrorCode::FRAME_SIZE_ERROR,
        ),
        // GOAWAY: on a stream; shorter than 8 bytes.
        (
            raw(kind::GOAWAY, 0, 1, &[0; 8]),
            conn,
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            raw(kind::GOAWAY, 0, 0, &[0; 7]),
            conn,
            ErrorCode::FRAME_SIZE_ERROR,
        ),
        // WINDOW_UPDATE: an increment of 0 (on the connection, then a stream); not 4 bytes.
        (
            raw(kind::WINDOW_UPDATE, 0, 0, b"\0\0\0\0"),
            conn,
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            raw(kind::WINDOW_UPDATE, 0, 1, b"\x80\0\0\0"),
            !conn,
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            raw(kind::WINDOW_UPDATE, 0, 1, b"\0\0\x01"),
            conn,
            ErrorCode::FRAME_SIZE_ERROR,
        ),
        // CONTINUATION on stream 0.
        (
            raw(kind::CONTINUATION, 0, 0, b""),
            conn,
            ErrorCode::PROTOCOL_ERROR,
        ),
    ];
    for (bytes, connection, code) in cases {
        let error = parse(&bytes).unwrap_err();
        assert_eq!(
            (error.is_connection_error(), error.code()),
            (connection, code),
            "{bytes:02x?}: {error}"
        );
        if let Error::Stream { stream_id, .. } = error {
            assert_eq!(
                Some(stream_id),
                FrameHeader::parse(&bytes).map(|h| h.stream_id)
            );
        }
    }
}

#[test]
fn settings_parameters() {
    let mut bytes = Vec::new();
    let settings = [
        Setting::HeaderTableSize(0),
        Setting::EnablePush(false),
        Setting::MaxConcurrentStreams(100),
        Setting::InitialWindowSize(MAX_WINDOW_SIZE),
        Setting::MaxFrameSize(MAX_MAX_FRAME_SIZE),
        Setting::MaxHeaderListSize(16_384),
        Setting::EnableConnectProtocol(true),
        Setting::NoRfc7540Priorities(true),
        Setting::HeaderTableSize(4096),
    ];
    write_settings(&mut bytes, &settings);
    // An unknown parameter in the middle is skipped.
    bytes.extend_from_slice(&[0x00, 0x63, 0xff, 0xff, 0xff, 0xff]);
    bytes[2] += 6;
    let Frame::Settings(parsed) = parse(&bytes).unwrap() else {
        panic!()
    };
    assert!(!parsed.ack);
    assert_eq!(parsed.iter().collect::<Vec<_>>(), settings);
    let mut ack = Vec::new();
    write_settings_ack(&mut ack);
    assert_eq!(ack, raw(kind::SETTINGS, flag::ACK, 0, b""));
    assert_eq!(parse(&ack).unwrap(), Frame::Settings(Settings::ACK));
}

#[test]
fn unknown_frames_are_passed_through() {
    let bytes = raw(0xfa, 0xff, 3, b"anything");
    assert_eq!(
        parse(&bytes).unwrap(),
        Frame::Unknown(Unknown {
            kind: 0xfa,
            flags: 0xff,
            stream_id: StreamId::new(3),
            payload: b"anything",
        })
    );
}

#[test]
fn unknown_error_codes_are_carried() {
    let Frame::RstStream(rst) = parse(&raw(kind::RST_STREAM, 0, 1, b"\0\0\x12\x34")).unwrap()
    else {
        panic!()
    };
    assert_eq!(rst.code, ErrorCode(0x1234));
    assert_eq!(rst.code.to_string(), "unknown error code 0x1234");
    assert_eq!(ErrorCode::CANCEL.to_string(), "CANCEL");
}

#[test]
fn header_blocks_are_split_to_the_frame_size() {
    let block: Vec<u8> = (0..=255).collect();
    for max in [4u32, 7, 100, 255, 256, 16_384] {
        let mut out = Vec::new();
        write_header_block(&mut out, StreamId::new(9), &block, true, max);
        let mut assembler = BlockAssembler::default();
        let mut input = &out[..];
        let mut frames = 0;
        let mut joined = None;
        while let Some((frame, len)) = parse_frame(input, MAX_MAX_FRAME_SIZE).unwrap() {
            frames += 1;
            assert!(frame_len(&frame) <= max as usize);
            if let Assembled::Block(b) = assembler.handle_frame(frame).unwrap() {
                joined = Some((b.block.to_vec(), b.kind));
            }
            input = &input[len..];
        }
        let (joined, kind) = joined.unwrap();
        assert_eq!(joined, block);
        assert!(matches!(
            kind,
            crate::block::BlockKind::Headers {
                end_stream: true,
                ..
            }
        ));
        assert_eq!(frames, block.len().div_ceil(max as usize));
    }
    // An empty block is one HEADERS frame.
    let mut out = Vec::new();
    write_header_block(&mut out, StreamId::new(1), b"", false, 16_384);
    assert_eq!(out, raw(kind::HEADERS, flag::END_HEADERS, 1, b""));
}

fn frame_len(frame: &Frame<'_>) -> usize {
    written(frame).len() - HEADER_LEN
}

#[test]
fn writers() {
    let mut out = Vec::new();
    write_data(&mut out, StreamId::new(1), b"abc", true);
    assert_eq!(out, raw(kind::DATA, flag::END_STREAM, 1, b"abc"));
    let mut out = Vec::new();
    write_window_update(&mut out, StreamId::ZERO, 1 << 20);
    assert_eq!(
        out,
        raw(kind::WINDOW_UPDATE, 0, 0, &(1u32 << 20).to_be_bytes())
    );
    let mut out = Vec::new();
    write_rst_stream(&mut out, StreamId::new(3), ErrorCode::CANCEL);
    assert_eq!(out, raw(kind::RST_STREAM, 0, 3, &[0, 0, 0, 8]));
    let mut out = Vec::new();
    write_ping(&mut out, *b"12345678", true);
    assert_eq!(out, raw(kind::PING, flag::ACK, 0, b"12345678"));
    let mut out = Vec::new();
    write_goaway(&mut out, StreamId::new(7), ErrorCode::NO_ERROR, b"bye");
    assert_eq!(out, raw(kind::GOAWAY, 0, 0, b"\0\0\0\x07\0\0\0\0bye"));
    let mut out = bytes::BytesMut::new();
    write_data(&mut out, StreamId::new(1), b"", false);
    assert_eq!(&out[..], raw(kind::DATA, 0, 1, b""));
}

// --- Properties ---

fn stream() -> impl Strategy<Value = StreamId> {
    (1u32..=MAX_WINDOW_SIZE).prop_map(StreamId::new)
}

fn dependency() -> impl Strategy<Value = StreamDependency> {
    (0u32..=MAX_WINDOW_SIZE, any::<bool>(), any::<u8>()).prop_map(|(d, exclusive, weight)| {
        StreamDependency {
            dependency: StreamId::new(d),
            exclusive,
            weight,
        }
    })
}

/// Everything needed to build any frame, owned.
#[derive(Clone, Debug)]
struct Parts {
    which: u8,
    stream: StreamId,
    flags: [bool; 2],
    pad_len: Option<u8>,
    dependency: Option<StreamDependency>,
    number: u32,
    ping: [u8; 8],
    payload: Vec<u8>,
    settings: Vec<Setting>,
}

fn setting() -> impl Strategy<Value = Setting> {
    prop_oneof![
        any::<u32>().prop_map(Setting::HeaderTableSize),
        any::<bool>().prop_map(Setting::EnablePush),
        any::<u32>().prop_map(Setting::MaxConcurrentStreams),
        (0..=MAX_WINDOW_SIZE).prop_map(Setting::InitialWindowSize),
        (DEFAULT_MAX_FRAME_SIZE..=MAX_MAX_FRAME_SIZE).prop_map(Setting::MaxFrameSize),
        any::<u32>().prop_map(Setting::MaxHeaderListSize),
        any::<bool>().prop_map(Setting::EnableConnectProtocol),
        any::<bool>().prop_map(Setting::NoRfc7540Priorities),
    ]
}

fn parts() -> impl Strategy<Value = Parts> {
    (
        0u8..12,
        stream(),
        any::<[bool; 2]>(),
        proptest::option::of(any::<u8>()),
        proptest::option::of(dependency()),
        any::<u32>(),
        any::<[u8; 8]>(),
        proptest::collection::vec(any::<u8>(), 0..64),
        proptest::collection::vec(setting(), 0..10),
    )
        .prop_map(
            |(which, stream, flags, pad_len, dependency, number, ping, payload, settings)| Parts {
                which,
                stream,
                flags,
                pad_len,
                dependency,
                number,
                ping,
                payload,
                settings,
            },
        )
}

/// Builds the frame `parts` describe (SETTINGS borrow `settings_bytes`).
fn build<'a>(parts: &'a Parts, settings_bytes: &'a [u8]) -> Frame<'a> {
    let [a, b] = parts.flags;
    let stream_id = parts.stream;
    let payload = &parts.payload[..];
    match parts.which {
        0 => Frame::Data(Data {
            stream_id,
            end_stream: a,
            pad_len: parts.pad_len,
            data: payload,
        }),
        1 => Frame::Headers(Headers {
            stream_id,
            end_stream: a,
            end_headers: b,
            pad_len: parts.pad_len,
            dependency: parts.dependency,
            fragment: payload,
        }),
        2 => {
            let mut dependency = parts.dependency.unwrap_or(StreamDependency {
                dependency: StreamId::ZERO,
                exclusive: false,
                weight: 0,
            });
            if dependency.dependency == stream_id {
                dependency.dependency = StreamId::ZERO;
            }
            Frame::Priority(Priority {
                stream_id,
                dependency,
            })
        }
        3 => Frame::RstStream(RstStream {
            stream_id,
            code: ErrorCode(parts.number),
        }),
        4 => Frame::Settings(Settings {
            ack: false,
            payload: settings_bytes,
        }),
        5 => Frame::Settings(Settings::ACK),
        6 => Frame::PushPromise(PushPromise {
            stream_id,
            end_headers: a,
            pad_len: parts.pad_len,
            promised_id: StreamId::new(parts.number),
            fragment: payload,
        }),
        7 => Frame::Ping(Ping {
            ack: a,
            data: parts.ping,
        }),
        8 => Frame::GoAway(GoAway {
            last_stream_id: StreamId::new(parts.number),
            code: ErrorCode(parts.number.rotate_left(7)),
            debug_data: payload,
        }),
        9 => Frame::WindowUpdate(WindowUpdate {
            stream_id: if b { StreamId::ZERO } else { stream_id },
            increment: (parts.number & MAX_WINDOW_SIZE).max(1),
        }),
        10 => Frame::Continuation(Continuation {
            stream_id,
            end_headers: a,
            fragment: payload,
        }),
        _ => Frame::Unknown(Unknown {
            kind: 10 + u8::try_from(parts.number % 246).unwrap(),
            flags: parts.ping[0],
            stream_id: if b { StreamId::ZERO } else { stream_id },
            payload,
        }),
    }
}

proptest! {
    /// Every frame type: serialize, parse, and get the same frame back.
    #[test]
    fn frames_round_trip(parts in parts()) {
        let mut settings_bytes = Vec::new();
        for setting in &parts.settings {
            let (id, value) = setting.to_wire();
            settings_bytes.extend_from_slice(&id.to_be_bytes());
            settings_bytes.extend_from_slice(&value.to_be_bytes());
        }
        let frame = build(&parts, &settings_bytes);
        let bytes = written(&frame);
        let (parsed, len) = parse_frame(&bytes, MAX_MAX_FRAME_SIZE).unwrap().unwrap();
        prop_assert_eq!(len, bytes.len());
        prop_assert_eq!(parsed, frame);
        if let Frame::Settings(settings) = parsed
            && !settings.ack
        {
            prop_assert_eq!(settings.iter().collect::<Vec<_>>(), parts.settings.clone());
        }
    }

    /// Any bytes: a frame, a request for more, or an error; never a panic. A frame that
    /// parses is written back canonically and parses to the same frame again.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80), max in 0u32..100) {
        if let Ok(Some((frame, len))) = parse_frame(&bytes, max) {
            prop_assert!(len <= bytes.len());
            let again = written(&frame);
            prop_assert_eq!(parse_frame(&again, max).unwrap().map(|(f, _)| f), Some(frame));
        }
    }

    /// Frames with a plausible header and arbitrary payload: they reach each type's parser.
    #[test]
    fn arbitrary_payloads_never_panic(
        kind in 0u8..12,
        flags in any::<u8>(),
        stream in prop_oneof![Just(0u32), any::<u32>()],
        payload in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let bytes = raw(kind, flags, stream, &payload);
        if let Ok(frame) = parse(&bytes) {
            let again = written(&frame);
            prop_assert_eq!(parse(&again), Ok(frame));
        }
    }
}
