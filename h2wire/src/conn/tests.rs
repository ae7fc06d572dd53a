use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::frame::{self, StreamId};
use crate::hpack::{Encoder, Field};

/// One end and what it has been told.
struct End {
    conn: Connection,
    input: BytesMut,
    events: Vec<Event>,
    error: Option<Error>,
}

impl End {
    fn new(config: Config) -> Self {
        Self {
            conn: Connection::new(config),
            input: BytesMut::new(),
            events: Vec::new(),
            error: None,
        }
    }

    fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
        let events = &mut self.events;
        if let Err(err) = self.conn.recv(&mut self.input, &mut |e| events.push(e)) {
            self.error = Some(err);
        }
    }
}

/// Moves bytes both ways until neither end has anything to say.
fn pump(client: &mut End, server: &mut End) {
    for _ in 0..64 {
        let to_server = client.conn.output().split();
        let to_client = server.conn.output().split();
        if to_server.is_empty() && to_client.is_empty() {
            return;
        }
        server.feed(&to_server);
        client.feed(&to_client);
    }
    panic!("the ends never went quiet");
}

fn pair() -> (End, End) {
    pair_with(Config::new(Role::Client), Config::new(Role::Server))
}

fn pair_with(client: Config, server: Config) -> (End, End) {
    let mut client = End::new(client);
    let mut server = End::new(server);
    pump(&mut client, &mut server);
    assert_eq!(client.take_events(), [Event::Settings]);
    assert_eq!(server.take_events(), [Event::Settings]);
    (client, server)
}

fn get(path: &'static [u8]) -> [Field<'static>; 4] {
    [
        Field::new(b":method", b"GET"),
        Field::new(b":scheme", b"http"),
        Field::new(b":authority", b"web.test"),
        Field::new(b":path", path),
    ]
}

fn post(len: &'static [u8]) -> [Field<'static>; 5] {
    [
        Field::new(b":method", b"POST"),
        Field::new(b":scheme", b"http"),
        Field::new(b":authority", b"web.test"),
        Field::new(b":path", b"/upload"),
        Field::new(b"content-length", len),
    ]
}

fn data_len(events: &[Event]) -> usize {
    events
        .iter()
        .map(|e| match e {
            Event::Data { data, .. } => data.len(),
            _ => 0,
        })
        .sum()
}

#[test]
fn a_request_and_its_response_go_both_ways_and_close_the_stream() {
    let (mut client, mut server) = pair();
    let id = client.conn.open(get(b"/items"), true).unwrap();
    assert_eq!(id, StreamId::new(1));
    pump(&mut client, &mut server);
    let events = server.take_events();
    let [
        Event::Headers {
            stream,
            fields,
            end_stream: true,
        },
    ] = events.as_slice()
    else {
        panic!("{events:?}");
    };
    assert_eq!(*stream, id);
    assert_eq!(fields.method(), Some(&b"GET"[..]));
    assert_eq!(fields.path(), Some(&b"/items"[..]));
    assert_eq!(fields.authority(), Some(&b"web.test"[..]));

    server.conn.send_headers(
        id,
        [
            Field::new(b":status", b"200"),
            Field::new(b"content-type", b"application/grpc"),
        ],
        false,
    );
    server
        .conn
        .send_data(id, Bytes::from_static(b"hello"), false);
    server
        .conn
        .send_trailers(id, [Field::new(b"grpc-status", b"0")]);
    assert_eq!(server.conn.open_streams(), 0, "both halves ended");
    pump(&mut client, &mut server);
    let events = client.take_events();
    assert_eq!(events.len(), 3, "{events:?}");
    let Event::Headers { fields, .. } = &events[0] else {
        panic!("{events:?}");
    };
    assert_eq!(fields.status(), Some(200));
    let regular: Vec<_> = fields.iter().map(|(n, v, _)| (n.to_vec(), v)).collect();
    assert_eq!(
        regular,
        [(
            b"content-type".to_vec(),
            Bytes::from_static(b"application/grpc")
        )]
    );
    assert_eq!(
        events[1],
        Event::Data {
            stream: id,
            data: Bytes::from_static(b"hello"),
            end_stream: false
        }
    );
    let Event::Trailers { fields, .. } = &events[2] else {
        panic!("{events:?}");
    };
    assert_eq!(fields.iter().next().unwrap().1, "0");
    assert_eq!(client.conn.open_streams(), 0);
}

#[test]
fn a_peer_never_sends_more_than_the_windows_and_resumes_as_data_is_released() {
    let (mut client, mut server) = pair();
    let id = client.conn.open(get(b"/big"), true).unwrap();
    pump(&mut client, &mut server);
    server.take_events();
    server
        .conn
        .send_headers(id, [Field::new(b":status", b"200")], false);
    let body = Bytes::from(vec![7u8; 1024 * 1024]);
    server.conn.send_data(id, body, true);
    pump(&mut client, &mut server);
    let events = client.take_events();
    // The client's stream window (256 KiB) bounds what came, not the 1 MiB body.
    assert_eq!(data_len(&events), 256 * 1024);
    assert_eq!(
        server.conn.send_capacity(id),
        0,
        "the rest waits, beyond the buffer"
    );

    // Handing data on gives window back in batches, and the rest flows.
    let mut received = data_len(&events);
    let mut handed_on = received;
    let mut last = None;
    for _ in 0..64 {
        client.conn.release(id, handed_on);
        pump(&mut client, &mut server);
        let events = client.take_events();
        handed_on = data_len(&events);
        received += handed_on;
        last = events.last().cloned().or(last);
        if received == 1024 * 1024 {
            break;
        }
    }
    assert_eq!(received, 1024 * 1024);
    assert!(
        matches!(
            last,
            Some(Event::Data {
                end_stream: true,
                ..
            })
        ),
        "{last:?}"
    );
    assert!(!server.conn.is_open(id));
}

/// A head with more fields than fit inline comes out whole, in order, with each field's
/// never-indexed mark.
#[test]
fn many_fields_arrive_in_order_with_their_marks() {
    let (mut client, mut server) = pair();
    let names: Vec<Vec<u8>> = (0..40)
        .map(|i| format!("x-field-{i}").into_bytes())
        .collect();
    let values: Vec<Vec<u8>> = (0..40).map(|i| format!("value {i}").into_bytes()).collect();
    let mut fields = get(b"/many").to_vec();
    for (i, (name, value)) in names.iter().zip(&values).enumerate() {
        fields.push(if i % 7 == 3 {
            Field::sensitive(name, value)
        } else {
            Field::new(name, value)
        });
    }
    client.conn.open(fields, true).unwrap();
    pump(&mut client, &mut server);
    let events = server.take_events();
    let Some(Event::Headers { fields: list, .. }) = events.first() else {
        panic!("{events:?}");
    };
    assert_eq!(list.path(), Some(&b"/many"[..]));
    assert_eq!(list.len(), 40);
    let got: Vec<(Vec<u8>, Vec<u8>, bool)> = list
        .iter()
        .map(|(name, value, sensitive)| (name.to_vec(), value.to_vec(), sensitive))
        .collect();
    let want: Vec<(Vec<u8>, Vec<u8>, bool)> = names
        .into_iter()
        .zip(values)
        .enumerate()
        .map(|(i, (name, value))| (name, value, i % 7 == 3))
        .collect();
    assert_eq!(got, want);
}

/// A server that allows streams less than the protocol's 65,535 must take what a client
/// sends before it has read that setting, and holds it to the smaller window after.
#[test]
fn a_stream_window_below_the_default_applies_once_the_peer_has_it() {
    let server_config = Config {
        stream_window: 300,
        ..Config::new(Role::Server)
    };
    let mut client = End::new(Config::new(Role::Client));
    let mut server = End::new(server_config);
    // The client sends its preface, a request and 1,000 bytes before hearing from the server.
    let id = client.conn.open(post(b"4000"), false).unwrap();
    client
        .conn
        .send_data(id, Bytes::from(vec![1u8; 1000]), false);
    let early = client.conn.output().split();
    server.feed(&early);
    assert!(server.error.is_none(), "{:?}", server.error);
    let events = server.take_events();
    assert_eq!(data_len(&events), 1000, "{events:?}");
    assert!(
        !events.iter().any(|e| matches!(e, Event::Reset { .. })),
        "{events:?}"
    );

    // Now both have the other's settings: the stream may take 300 bytes once the 1,000 are
    // handed on, and no more.
    pump(&mut client, &mut server);
    client
        .conn
        .send_data(id, Bytes::from(vec![2u8; 3000]), false);
    pump(&mut client, &mut server);
    assert_eq!(
        data_len(&server.take_events()),
        0,
        "nothing until data is released"
    );
    server.conn.release(id, 1000);
    pump(&mut client, &mut server);
    let events = server.take_events();
    assert_eq!(data_len(&events), 300, "{events:?}");
    assert!(server.error.is_none() && client.error.is_none());
    assert!(server.conn.is_open(id));
}

#[test]
fn a_stream_that_queued_past_its_buffer_is_told_when_it_may_queue_again() {
    let (mut client, mut server) = pair();
    let id = client.conn.open(get(b"/big"), true).unwrap();
    pump(&mut client, &mut server);
    server.take_events();
    server
        .conn
        .send_headers(id, [Field::new(b":status", b"200")], false);
    // Window 256 KiB, buffer 256 KiB: 512 KiB fills both.
    server
        .conn
        .send_data(id, Bytes::from(vec![1u8; 512 * 1024]), false);
    assert_eq!(server.conn.send_capacity(id), 0);
    pump(&mut client, &mut server);
    let events = client.take_events();
    client.conn.release(id, data_len(&events));
    pump(&mut client, &mut server);
    assert!(
        server
            .take_events()
            .contains(&Event::SendReady { stream: id })
    );
    assert!(server.conn.send_capacity(id) > 0);
}

#[test]
fn streams_beyond_the_limit_are_refused() {
    let mut server_config = Config::new(Role::Server);
    server_config.max_concurrent_streams = 2;
    let (mut client, mut server) = pair_with(Config::new(Role::Client), server_config);
    assert_eq!(client.conn.peer_max_streams(), 2);
    client.conn.open(get(b"/1"), true).unwrap();
    client.conn.open(get(b"/2"), true).unwrap();
    assert_eq!(client.conn.open(get(b"/3"), true), Err(OpenError::Full));

    // A client that ignores the setting: its third stream is refused, unprocessed.
    let mut raw = BytesMut::new();
    let mut encoder = Encoder::new(0);
    let mut block = Vec::new();
    encoder.encode(get(b"/3"), &mut block);
    frame::write_header_block(&mut raw, StreamId::new(5), &block, true, 16_384);
    let to_server = client.conn.output().split();
    server.feed(&to_server);
    server.feed(&raw);
    assert_eq!(server.take_events().len(), 2, "streams 1 and 3 only");
    let answer = server.conn.output().split();
    let (frame, _) = frame::parse_frame(&answer, 16_384).unwrap().unwrap();
    assert_eq!(
        frame,
        Frame::RstStream(frame::RstStream {
            stream_id: StreamId::new(5),
            code: ErrorCode::REFUSED_STREAM
        })
    );
}

#[test]
fn a_graceful_goaway_lets_open_streams_finish_and_refuses_new_ones() {
    let (mut client, mut server) = pair();
    let first = client.conn.open(get(b"/1"), true).unwrap();
    pump(&mut client, &mut server);
    server.take_events();
    server.conn.go_away(ErrorCode::NO_ERROR);
    // A stream the client opened before it saw the GOAWAY.
    let second = client.conn.open(get(b"/2"), true).unwrap();
    pump(&mut client, &mut server);
    assert!(server.take_events().is_empty(), "stream 3 is ignored");
    let events = client.take_events();
    assert_eq!(
        events,
        [
            Event::Reset {
                stream: second,
                code: ErrorCode::REFUSED_STREAM,
                local: false,
                unprocessed: true
            },
            Event::GoAway {
                last_stream_id: first,
                code: ErrorCode::NO_ERROR
            }
        ]
    );
    assert_eq!(client.conn.open(get(b"/3"), true), Err(OpenError::Closed));
    assert!(!server.conn.is_done(), "stream 1 is still open");
    server
        .conn
        .send_headers(first, [Field::new(b":status", b"204")], true);
    assert!(server.conn.is_done());
    pump(&mut client, &mut server);
    assert!(client.conn.is_done());
}

#[test]
fn rapid_resets_end_the_connection() {
    let mut server_config = Config::new(Role::Server);
    server_config.max_abuse = 50;
    let (mut client, mut server) = pair_with(Config::new(Role::Client), server_config);
    for _ in 0..60 {
        let id = client.conn.open(get(b"/"), true).unwrap();
        client.conn.reset(id, ErrorCode::CANCEL);
        pump(&mut client, &mut server);
        if server.error.is_some() {
            break;
        }
    }
    let err = server.error.expect("the server gave up");
    assert_eq!(err.code(), ErrorCode::ENHANCE_YOUR_CALM);
    assert!(client.events.iter().any(|e| matches!(
        e,
        Event::GoAway {
            code: ErrorCode::ENHANCE_YOUR_CALM,
            ..
        }
    )));
}

#[test]
fn completed_streams_earn_back_the_budget() {
    let mut server_config = Config::new(Role::Server);
    server_config.max_abuse = 20;
    let (mut client, mut server) = pair_with(Config::new(Role::Client), server_config);
    // Half cancelled, half answered: a client whose deadlines often fire, not an attack.
    for i in 0..200 {
        let id = client.conn.open(get(b"/"), true).unwrap();
        pump(&mut client, &mut server);
        if i % 2 == 0 {
            client.conn.reset(id, ErrorCode::CANCEL);
        } else {
            server
                .conn
                .send_headers(id, [Field::new(b":status", b"200")], true);
        }
        pump(&mut client, &mut server);
    }
    assert_eq!(server.error, None);
}

#[test]
fn an_oversized_header_list_gets_431_and_the_connection_carries_on() {
    let mut server_config = Config::new(Role::Server);
    server_config.max_header_list_size = 1024;
    let (mut client, mut server) = pair_with(Config::new(Role::Client), server_config);
    let big = vec![b'x'; 2000];
    let mut fields = get(b"/").to_vec();
    fields.push(Field::new(b"x-big", &big));
    let id = client.conn.open(fields, true).unwrap();
    pump(&mut client, &mut server);
    assert!(server.take_events().is_empty());
    let events = client.take_events();
    let [Event::Headers { fields, .. }] = events.as_slice() else {
        panic!("{events:?}");
    };
    assert_eq!(fields.status(), Some(431));
    assert!(!client.conn.is_open(id));
    // The HPACK tables are still in step: the next request is fine.
    client.conn.open(get(b"/next"), true).unwrap();
    pump(&mut client, &mut server);
    assert_eq!(server.take_events().len(), 1);
}

#[test]
fn a_body_that_disagrees_with_its_content_length_is_reset() {
    let (mut client, mut server) = pair();
    let id = client.conn.open(post(b"3"), false).unwrap();
    client.conn.send_data(id, Bytes::from_static(b"four"), true);
    pump(&mut client, &mut server);
    let events = server.take_events();
    assert!(matches!(events[0], Event::Headers { .. }), "{events:?}");
    assert_eq!(
        events[1],
        Event::Reset {
            stream: id,
            code: ErrorCode::PROTOCOL_ERROR,
            local: true,
            unprocessed: false
        }
    );
    assert!(client.take_events().contains(&Event::Reset {
        stream: id,
        code: ErrorCode::PROTOCOL_ERROR,
        local: false,
        unprocessed: false
    }));
}

#[test]
fn malformed_requests_are_reset_not_delivered() {
    let (mut client, mut server) = pair();
    let fields = [
        Field::new(b":method", b"GET"),
        Field::new(b":path", b"/"),
        Field::new(b"connection", b"close"),
    ];
    let id = client.conn.open(fields, true).unwrap();
    pump(&mut client, &mut server);
    assert!(server.take_events().is_empty());
    assert!(client.take_events().contains(&Event::Reset {
        stream: id,
        code: ErrorCode::PROTOCOL_ERROR,
        local: false,
        unprocessed: false
    }));
}

/// Sends `fields` as a request without a body: whether the server took it (or reset it).
fn delivered(client: &mut End, server: &mut End, fields: &[Field<'static>]) -> bool {
    let id = client.conn.open(fields.iter().copied(), true).unwrap();
    pump(client, server);
    let events = server.take_events();
    let reset = client.take_events().contains(&Event::Reset {
        stream: id,
        code: ErrorCode::PROTOCOL_ERROR,
        local: false,
        unprocessed: false,
    });
    let took = events
        .iter()
        .any(|e| matches!(e, Event::Headers { stream, .. } if *stream == id));
    assert_ne!(took, reset, "{events:?}");
    took
}

#[test]
fn fields_from_the_tables_are_checked_as_literals_are() {
    // The decoder judges a field once, as it enters its table; a field indexed again must
    // get the same answer, and its place in the message is still checked each time.
    let (mut client, mut server) = pair();
    let with = |extra: Field<'static>| {
        let [method, scheme, authority, path] = get(b"/");
        [method, scheme, authority, path, extra]
    };
    // A value with a leading space (RFC 9113 §8.2.1): indexed after the first block.
    let padded = with(Field::new(b"x-padded", b" value"));
    assert!(!delivered(&mut client, &mut server, &padded));
    assert!(!delivered(&mut client, &mut server, &padded));
    // A valid field, literal then indexed.
    let fine = with(Field::new(b"x-fine", b"value"));
    assert!(delivered(&mut client, &mut server, &fine));
    assert!(delivered(&mut client, &mut server, &fine));
    // `:authority` is in the table now, and valid; after a regular field it is not.
    let [method, scheme, authority, path] = get(b"/");
    let late = [
        method,
        scheme,
        path,
        Field::new(b"x-fine", b"value"),
        authority,
    ];
    assert!(!delivered(&mut client, &mut server, &late));
    // The static table's `:authority` with an empty value (index 1) is malformed.
    let empty = [method, scheme, Field::new(b":authority", b""), path];
    assert!(!delivered(&mut client, &mut server, &empty));
    // A duplicate pseudo-header field, indexed both times.
    let twice = [method, scheme, authority, path, path];
    assert!(!delivered(&mut client, &mut server, &twice));
    assert!(server.error.is_none() && client.error.is_none());
    assert!(delivered(&mut client, &mut server, &get(b"/")));
}

#[test]
fn pings_are_answered() {
    let (mut client, mut server) = pair();
    client.conn.ping(*b"12345678");
    pump(&mut client, &mut server);
    assert_eq!(client.take_events(), [Event::Pong { data: *b"12345678" }]);
}

#[test]
fn a_response_that_ends_before_the_request_stops_the_upload() {
    let (mut client, mut server) = pair();
    let id = client.conn.open(post(b"100"), false).unwrap();
    client
        .conn
        .send_data(id, Bytes::from_static(b"part"), false);
    pump(&mut client, &mut server);
    server.take_events();
    server
        .conn
        .send_headers(id, [Field::new(b":status", b"413")], true);
    assert!(!server.conn.is_open(id));
    pump(&mut client, &mut server);
    let events = client.take_events();
    assert!(matches!(
        events[0],
        Event::Headers {
            end_stream: true,
            ..
        }
    ));
    assert_eq!(
        events[1],
        Event::Reset {
            stream: id,
            code: ErrorCode::NO_ERROR,
            local: false,
            unprocessed: false
        }
    );
    // What was in flight on the stream is ignored, its window given back.
    client.conn.send_data(id, Bytes::from_static(b"more"), true);
    pump(&mut client, &mut server);
    assert_eq!(server.error, None);
}

#[test]
fn the_first_frame_must_be_settings() {
    let mut server = End::new(Config::new(Role::Server));
    let mut bytes = frame::PREFACE.to_vec();
    frame::write_ping(&mut bytes, [0; 8], false);
    server.feed(&bytes);
    assert_eq!(server.error.unwrap().code(), ErrorCode::PROTOCOL_ERROR);
    assert!(server.conn.is_done());
}

proptest! {
    /// However the bytes are cut into reads, the events are the same.
    #[test]
    fn reads_of_any_size_give_the_same_events(cuts in proptest::collection::vec(1usize..200, 1..50)) {
        let mut whole = End::new(Config::new(Role::Client));
        let mut server = End::new(Config::new(Role::Server));
        pump(&mut whole, &mut server);
        server.take_events();
        for i in 0..5u8 {
            let id = whole.conn.open(post(b"5"), false).unwrap();
            whole.conn.send_data(id, Bytes::from(vec![i; 5]), true);
        }
        let bytes = whole.conn.output().split().freeze();
        server.feed(&bytes);
        let expected = server.take_events();
        prop_assert_eq!(expected.len(), 10);

        let mut cut = End::new(Config::new(Role::Server));
        let mut client = End::new(Config::new(Role::Client));
        pump(&mut client, &mut cut);
        cut.take_events();
        let mut rest = &bytes[..];
        let mut cuts = cuts.into_iter().cycle();
        while !rest.is_empty() {
            let n = cuts.next().unwrap().min(rest.len());
            cut.feed(&rest[..n]);
            rest = &rest[n..];
        }
        prop_assert_eq!(cut.take_events(), expected);
    }

    /// Arbitrary bytes after a valid start never panic, and a connection error leaves the
    /// connection done.
    #[test]
    fn arbitrary_input_never_panics(noise in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut server = End::new(Config::new(Role::Server));
        let mut start = frame::PREFACE.to_vec();
        frame::write_settings(&mut start, &[]);
        server.feed(&start);
        server.feed(&noise);
        if server.error.is_some() {
            prop_assert!(server.conn.is_done());
        }
        let mut client = End::new(Config::new(Role::Client));
        let mut start = Vec::new();
        frame::write_settings(&mut start, &[]);
        client.feed(&start);
        client.feed(&noise);
    }
}

#[test]
fn a_client_opens_at_most_100_streams_until_the_server_states_its_limit() {
    let mut client = End::new(Config::new(Role::Client));
    for i in 0..INITIAL_PEER_MAX_STREAMS {
        assert!(client.conn.open(get(b"/"), true).is_ok(), "stream {i}");
    }
    assert_eq!(client.conn.open(get(b"/"), true), Err(OpenError::Full));
    // The server's first SETTINGS states no limit: there is none.
    let mut settings = BytesMut::new();
    frame::write_settings(&mut settings, &[]);
    client.feed(&settings);
    assert!(client.error.is_none());
    assert_eq!(client.conn.peer_max_streams(), u32::MAX);
    assert!(client.conn.open(get(b"/"), true).is_ok());

    // One that states a limit above 100 raises it at once.
    let mut client = End::new(Config::new(Role::Client));
    let mut settings = BytesMut::new();
    frame::write_settings(&mut settings, &[Setting::MaxConcurrentStreams(200)]);
    client.feed(&settings);
    assert_eq!(client.conn.peer_max_streams(), 200);
}
