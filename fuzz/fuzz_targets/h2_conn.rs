//! The HTTP/2 connection state machine (`conduit_h2::conn`), a client and a server talking
//! to each other, with the fuzzer choosing what each end's caller does, how the bytes are cut
//! into reads, and hostile bytes spliced into either direction.
//!
//! The ends are configured small (few streams, windows a few frames wide, a small abuse
//! budget) so that every limit is reached. Never panics, and:
//! - everything an end writes parses as frames within the default frame size;
//! - what an end has received on a stream and not released is within its stream window, and
//!   on all streams within its connection window, whatever the peer sent (a peer that
//!   overruns a window is refused, never buffered);
//! - a server never has more streams open than it allows;
//! - each stream's events come in order: a head, then data, then trailers, nothing after the
//!   stream ends or is reset, and no stream is reset twice;
//! - a client only hears of streams it opened;
//! - once both ends have nothing left to say and no bytes are in flight, a GOAWAY sent by
//!   either end has reached the other.
#![no_main]

use std::collections::HashMap;

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};
use conduit_h2::ErrorCode;
use conduit_h2::conn::{Config, Connection, Event, Role};
use conduit_h2::frame::{self, StreamId};
use conduit_h2::hpack::Field;
use libfuzzer_sys::fuzz_target;

const MAX_STREAMS: u32 = 3;
/// Just above the protocol's starting 65,535 (a smaller window applies only once the peer
/// acknowledges it, which the unit tests cover), so a few frames reach either window.
const STREAM_WINDOW: u32 = 70_000;
const CONNECTION_WINDOW: u32 = 100_000;

#[derive(Arbitrary, Debug)]
enum Op {
    /// The client opens a stream.
    Open {
        post: bool,
        end: bool,
    },
    /// The server answers one of its streams.
    Respond {
        pick: u8,
        status: u8,
        end: bool,
    },
    /// Data on one of an end's streams.
    Data {
        client: bool,
        pick: u8,
        len: u16,
        end: bool,
    },
    /// Trailers on one of an end's streams.
    Trailers {
        client: bool,
        pick: u8,
    },
    /// An end's caller gives up on a stream.
    Reset {
        client: bool,
        pick: u8,
        code: u8,
    },
    /// An end's caller hands on some of a stream's data.
    Release {
        client: bool,
        pick: u8,
        len: u16,
    },
    Ping {
        client: bool,
        data: u64,
    },
    GoAway {
        client: bool,
        code: u8,
    },
    /// Up to `max` bytes of what one end wrote reach the other.
    Deliver {
        to_server: bool,
        max: u16,
    },
    /// Bytes from nowhere reach one end (between whole writes of the other's).
    Inject {
        to_server: bool,
        bytes: Vec<u8>,
    },
}

/// Where a stream is, as this end's events tell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Opened by the client, no response head yet.
    Opened,
    /// Its head came; data or trailers may follow.
    Head,
    /// The peer's half ended (end of stream or trailers).
    Ended,
    /// Reset: nothing more.
    Reset,
}

#[derive(Default)]
struct Stream {
    phase: Option<Phase>,
    /// Data received and not released.
    held: u64,
}

struct End {
    role: Role,
    conn: Connection,
    input: BytesMut,
    /// Written by this end, not yet delivered (whole writes, the first maybe cut).
    wire: BytesMut,
    streams: HashMap<u32, Stream>,
    /// Data received and not released, on all streams.
    held: u64,
    failed: bool,
    goaway_sent: bool,
    goaway_seen: bool,
    /// The client's preface has been checked.
    preface: bool,
}

impl End {
    fn new(role: Role) -> Self {
        let config = Config {
            max_concurrent_streams: MAX_STREAMS,
            stream_window: STREAM_WINDOW,
            connection_window: CONNECTION_WINDOW,
            max_header_list_size: 512,
            send_buffer: 80_000,
            max_abuse: 40,
            ..Config::new(role)
        };
        Self {
            role,
            conn: Connection::new(config),
            input: BytesMut::new(),
            wire: BytesMut::new(),
            streams: HashMap::new(),
            held: 0,
            failed: false,
            goaway_sent: false,
            goaway_seen: false,
            preface: role == Role::Server,
        }
    }

    /// Moves what the connection wrote onto the wire, checking that it parses.
    fn flush(&mut self) {
        let out = self.conn.output().split();
        let mut rest = &out[..];
        if !self.preface && !rest.is_empty() {
            match frame::parse_preface(rest) {
                Ok(Some(len)) => rest = &rest[len..],
                other => panic!("a client began without the preface: {other:?}"),
            }
            self.preface = true;
        }
        while !rest.is_empty() {
            match frame::parse_frame(rest, frame::DEFAULT_MAX_FRAME_SIZE) {
                Ok(Some((_, len))) => rest = &rest[len..],
                other => panic!("an end wrote what does not parse: {other:?}"),
            }
        }
        self.wire.extend_from_slice(&out);
    }

    /// A stream this end knows, picked by `pick`.
    fn pick(&self, pick: u8) -> Option<StreamId> {
        let mut ids: Vec<u32> = self.streams.keys().copied().collect();
        ids.sort_unstable();
        (!ids.is_empty()).then(|| StreamId::new(ids[usize::from(pick) % ids.len()]))
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
        let mut events = Vec::new();
        if self
            .conn
            .recv(&mut self.input, &mut |e| events.push(e))
            .is_err()
        {
            self.failed = true;
        }
        for event in events {
            self.check(event);
        }
        assert!(
            self.role == Role::Client || self.conn.open_streams() <= MAX_STREAMS as usize,
            "{} streams open on a server that allows {MAX_STREAMS}",
            self.conn.open_streams()
        );
    }

    fn check(&mut self, event: Event) {
        let client = self.role == Role::Client;
        let id = match &event {
            Event::Headers { stream, .. }
            | Event::Data { stream, .. }
            | Event::Trailers { stream, .. }
            | Event::Reset { stream, .. }
            | Event::SendReady { stream } => stream.value(),
            Event::GoAway { .. } => {
                self.goaway_seen = true;
                return;
            }
            Event::Pong { .. } | Event::Settings => return,
        };
        assert_ne!(id, 0, "{event:?} on stream 0");
        if client {
            assert!(
                self.streams.contains_key(&id),
                "a client told of stream {id}, which it never opened: {event:?}"
            );
        }
        let stream = self.streams.entry(id).or_default();
        let phase = stream.phase;
        let next = match &event {
            Event::Headers { end_stream, .. } => {
                let expected = if client { Some(Phase::Opened) } else { None };
                assert_eq!(phase, expected, "a head on stream {id} in {phase:?}");
                if *end_stream {
                    Phase::Ended
                } else {
                    Phase::Head
                }
            }
            Event::Data {
                data, end_stream, ..
            } => {
                assert_eq!(phase, Some(Phase::Head), "data on stream {id} in {phase:?}");
                stream.held += data.len() as u64;
                self.held += data.len() as u64;
                assert!(
                    stream.held <= u64::from(STREAM_WINDOW),
                    "{} bytes held on stream {id}, beyond its window",
                    stream.held
                );
                assert!(
                    self.held <= u64::from(CONNECTION_WINDOW),
                    "{} bytes held, beyond the connection window",
                    self.held
                );
                if *end_stream {
                    Phase::Ended
                } else {
                    Phase::Head
                }
            }
            Event::Trailers { .. } => {
                assert_eq!(
                    phase,
                    Some(Phase::Head),
                    "trailers on stream {id} in {phase:?}"
                );
                Phase::Ended
            }
            Event::Reset { .. } => {
                assert_ne!(phase, Some(Phase::Reset), "stream {id} reset twice");
                Phase::Reset
            }
            Event::SendReady { .. } => {
                assert_ne!(
                    phase,
                    Some(Phase::Reset),
                    "stream {id} ready after its reset"
                );
                return;
            }
            Event::GoAway { .. } | Event::Pong { .. } | Event::Settings => unreachable!(),
        };
        stream.phase = Some(next);
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut client = End::new(Role::Client);
    let mut server = End::new(Role::Server);
    client.flush();
    server.flush();
    let mut injected = false;
    for op in ops {
        match op {
            Op::Open { post, end } => {
                let get = [
                    Field::new(b":method", b"GET"),
                    Field::new(b":scheme", b"http"),
                    Field::new(b":authority", b"web.test"),
                    Field::new(b":path", b"/"),
                ];
                let post_head = [
                    Field::new(b":method", b"POST"),
                    Field::new(b":scheme", b"http"),
                    Field::new(b":authority", b"web.test"),
                    Field::new(b":path", b"/upload"),
                    Field::new(b"content-length", b"500"),
                ];
                let opened = if post {
                    client.conn.open(post_head, end)
                } else {
                    client.conn.open(get, end)
                };
                if let Ok(id) = opened {
                    assert!(id.value() % 2 == 1, "a client opened even stream {id:?}");
                    let stream = client.streams.entry(id.value()).or_default();
                    assert!(stream.phase.is_none(), "stream {id:?} opened twice");
                    stream.phase = Some(Phase::Opened);
                }
            }
            Op::Respond { pick, status, end } => {
                if let Some(id) = server.pick(pick) {
                    let status: &[u8] =
                        [b"100", b"103", b"200", b"204", b"404", b"503"][usize::from(status) % 6];
                    server
                        .conn
                        .send_headers(id, [Field::new(b":status", status)], end);
                }
            }
            Op::Data {
                client: at_client,
                pick,
                len,
                end,
            } => {
                let end_ = if at_client { &mut client } else { &mut server };
                if let Some(id) = end_.pick(pick) {
                    let room = end_.conn.send_capacity(id);
                    let len = usize::from(len).min(room);
                    if len > 0 || end {
                        end_.conn.send_data(id, Bytes::from(vec![b'x'; len]), end);
                    }
                }
            }
            Op::Trailers {
                client: at_client,
                pick,
            } => {
                let end_ = if at_client { &mut client } else { &mut server };
                if let Some(id) = end_.pick(pick) {
                    end_.conn
                        .send_trailers(id, [Field::new(b"grpc-status", b"0")]);
                }
            }
            Op::Reset {
                client: at_client,
                pick,
                code,
            } => {
                let end_ = if at_client { &mut client } else { &mut server };
                if let Some(id) = end_.pick(pick) {
                    end_.conn.reset(id, ErrorCode(u32::from(code) % 14));
                }
            }
            Op::Release {
                client: at_client,
                pick,
                len,
            } => {
                let end_ = if at_client { &mut client } else { &mut server };
                if let Some(id) = end_.pick(pick) {
                    let stream = end_.streams.get_mut(&id.value()).expect("picked");
                    let len = u64::from(len).min(stream.held);
                    stream.held -= len;
                    end_.held -= len;
                    end_.conn.release(id, len as usize);
                }
            }
            Op::Ping {
                client: at_client,
                data,
            } => {
                let end_ = if at_client { &mut client } else { &mut server };
                end_.conn.ping(data.to_be_bytes());
            }
            Op::GoAway {
                client: at_client,
                code,
            } => {
                let end_ = if at_client { &mut client } else { &mut server };
                end_.conn.go_away(ErrorCode(u32::from(code) % 14));
                end_.goaway_sent |= !end_.failed;
            }
            Op::Deliver { to_server, max } => {
                let (from, to) = if to_server {
                    (&mut client, &mut server)
                } else {
                    (&mut server, &mut client)
                };
                let len = usize::from(max).min(from.wire.len());
                let bytes = from.wire.split_to(len);
                to.feed(&bytes);
            }
            Op::Inject { to_server, bytes } => {
                injected = true;
                let from = if to_server { &mut client } else { &mut server };
                from.wire.extend_from_slice(&bytes);
            }
        }
        client.flush();
        server.flush();
    }

    // Everything in flight arrives, until neither end has more to say.
    for _ in 0..64 {
        if client.wire.is_empty() && server.wire.is_empty() {
            break;
        }
        let to_server = client.wire.split();
        let to_client = server.wire.split();
        server.feed(&to_server);
        client.feed(&to_client);
        client.flush();
        server.flush();
    }
    if !injected && !client.failed && !server.failed {
        assert!(
            !client.goaway_sent || server.goaway_seen,
            "the client's GOAWAY was lost"
        );
        assert!(
            !server.goaway_sent || client.goaway_seen,
            "the server's GOAWAY was lost"
        );
    }
});
