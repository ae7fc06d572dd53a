//! The connection state machine (RFC 9113 §5, §6.5, §6.7 to §6.9), sans-IO, for either end.
//!
//! A [`Connection`] takes the bytes the peer sent ([`Connection::recv`]) and reports what they
//! mean as [`Event`]s; the caller's decisions (open a stream, send a head, data, trailers, a
//! reset, a ping, a GOAWAY) are methods that write frames into the connection's output
//! buffer ([`Connection::output`]), which the caller writes to its socket. There is no IO,
//! no clock, no task and no lock here: the caller owns all of those, and drives one
//! connection from one place.
//!
//! What it keeps per stream is its state (§5.1), both flow-control windows (§5.2), the data
//! queued beyond the peer's windows, and what `content-length` promised. What it enforces:
//!
//! - our limits: `SETTINGS_MAX_CONCURRENT_STREAMS` (streams beyond are refused with
//!   `REFUSED_STREAM`), the header list size (a server answers 431, a client resets), our
//!   receive windows (a peer that overruns one gets `FLOW_CONTROL_ERROR`);
//! - the protocol's rules on stream identifiers and states, SETTINGS first, `content-length`
//!   against the DATA received, trailers that end their stream;
//! - a budget for frames that cost us work and the peer nothing ([`Config::max_abuse`]): peer
//!   resets of streams before their response ended (the "rapid reset" attack), PINGs,
//!   SETTINGS, empty DATA frames, PRIORITY frames and frames on closed streams each spend a
//!   unit, and every stream that completes normally earns one back. A peer over budget gets
//!   GOAWAY `ENHANCE_YOUR_CALM`.
//!
//! Windows are given back as the caller hands received data on ([`Connection::release`]),
//! in batches of half a window, so a peer can never make the caller buffer more than the
//! connection's window, and a stream of small frames costs one `WINDOW_UPDATE` per half
//! window rather than one per frame.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use bytes::{Buf, Bytes, BytesMut};

use crate::block::{Assembled, BlockAssembler, BlockKind, DEFAULT_MAX_BLOCK_SIZE, HeaderBlock};
use crate::error::{Error, ErrorCode};
use crate::frame::{self, Frame, Setting, StreamId};
use crate::hpack::{self, DecodeError, Decoder, DecoderLimits, Encoder, Field};
use crate::message::MessageKind;

mod fields;
#[cfg(test)]
mod tests;

use fields::Collector;
pub use fields::HeaderList;

/// Which end of the connection this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Opens streams (odd identifiers) and sends requests.
    Client,
    /// Accepts streams and answers them.
    Server,
}

/// How many streams a client opens before the server's first SETTINGS say how many it allows.
///
/// RFC 9113 leaves the limit unbounded until then (§6.5.2) and recommends servers allow no
/// fewer than 100 (§6.5.2, `SETTINGS_MAX_CONCURRENT_STREAMS`). A client that opens a burst
/// on a new connection before the SETTINGS arrive, past what the server allows, has the
/// excess refused (`REFUSED_STREAM`); at 1,000 concurrent requests through the proxy this
/// turned into 502s when those requests, sent again, met the same burst on the next new
/// connection. So at most this many until the server has spoken (as the h2 crate does).
pub const INITIAL_PEER_MAX_STREAMS: u32 = 100;

/// What one end of a connection allows and promises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Which end this is.
    pub role: Role,
    /// Our `SETTINGS_MAX_CONCURRENT_STREAMS`: how many streams the peer may have open.
    pub max_concurrent_streams: u32,
    /// Our `SETTINGS_INITIAL_WINDOW_SIZE`: what the peer may send on a stream before the
    /// caller hands any of it on. Below the protocol's 65,535, it applies once the peer has
    /// acknowledged our SETTINGS (it may send up to 65,535 before it has read them).
    pub stream_window: u32,
    /// The connection's receive window: what the peer may send on all streams together (at
    /// least the protocol's 65,535, where every connection starts and which only grows).
    pub connection_window: u32,
    /// Our `SETTINGS_MAX_HEADER_LIST_SIZE`.
    pub max_header_list_size: u32,
    /// What a stream may queue to send beyond the peer's windows before
    /// [`Connection::send_capacity`] says to wait.
    pub send_buffer: usize,
    /// The budget of frames that cost us work and the peer nothing (see the module
    /// documentation).
    pub max_abuse: u32,
}

impl Config {
    /// The defaults for `role`: 100 streams, a 256 KiB stream window, a 1 MiB connection
    /// window, a 64 KiB header list, a 256 KiB send buffer, and an abuse budget of 1,000.
    #[must_use]
    pub fn new(role: Role) -> Self {
        Self {
            role,
            max_concurrent_streams: 100,
            stream_window: 256 * 1024,
            connection_window: 1024 * 1024,
            max_header_list_size: 64 * 1024,
            send_buffer: 256 * 1024,
            max_abuse: 1000,
        }
    }
}

/// What the peer's frames meant, in the order they came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A head: on a server, a new stream's request; on a client, a response to a stream it
    /// opened (informational 1xx heads are skipped). `end_stream`: no body follows.
    Headers {
        /// The stream.
        stream: StreamId,
        /// The fields, checked.
        fields: HeaderList,
        /// Nothing follows on the stream.
        end_stream: bool,
    },
    /// A stream's data; give its length back with [`Connection::release`] once handed on.
    Data {
        /// The stream.
        stream: StreamId,
        /// The data (padding removed). May be empty when it only ends the stream.
        data: Bytes,
        /// The stream's body ends here.
        end_stream: bool,
    },
    /// A stream's trailers, which end it.
    Trailers {
        /// The stream.
        stream: StreamId,
        /// The fields, checked (no pseudo-headers).
        fields: HeaderList,
    },
    /// A stream ended abnormally: the peer reset it, or it broke a rule and this end reset it
    /// (`local`), or the peer's GOAWAY said it was never processed. The stream is gone.
    Reset {
        /// The stream.
        stream: StreamId,
        /// Why.
        code: ErrorCode,
        /// This end reset it (a stream error in what the peer sent).
        local: bool,
        /// The peer did not process the stream (`REFUSED_STREAM`, or above a GOAWAY's last
        /// stream): sending the request again elsewhere is safe.
        unprocessed: bool,
    },
    /// The stream may queue more data: [`Connection::send_capacity`] is no longer 0.
    SendReady {
        /// The stream.
        stream: StreamId,
    },
    /// The peer sent GOAWAY: no new streams; streams above `last_stream_id` have been reset
    /// as unprocessed.
    GoAway {
        /// The last stream the peer may process.
        last_stream_id: StreamId,
        /// Why.
        code: ErrorCode,
    },
    /// The peer answered a PING of ours.
    Pong {
        /// The data the PING carried.
        data: [u8; 8],
    },
    /// The peer's SETTINGS changed (how many streams may be opened, say).
    Settings,
}

/// Why a stream could not be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenError {
    /// The peer's `SETTINGS_MAX_CONCURRENT_STREAMS` are open.
    Full,
    /// The connection is going away (either end sent GOAWAY), failed, or ran out of stream
    /// identifiers.
    Closed,
}

/// A multiplicative hash for stream identifiers, which are consecutive odd (or even) numbers
/// and chosen by no one who could aim at a hash: cheaper than the default SipHash by some 70
/// instructions a lookup. For a caller's own maps of per-stream state too ([`StreamMap`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, value: u32) {
        self.0 = u64::from(value).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A map keyed by stream identifier (its value), hashed with [`IdHasher`].
pub type StreamMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

/// One open stream.
#[derive(Debug)]
struct Stream {
    /// Opened by the peer.
    remote: bool,
    /// What the peer may still send before we give window back.
    recv_window: i64,
    /// Handed on by the caller, not yet given back to the peer.
    unreleased: u32,
    /// The peer's half has ended (`END_STREAM`).
    recv_closed: bool,
    /// A head has come (for a client: a final response head).
    head_received: bool,
    /// What `content-length` said, and what has come.
    expect_len: Option<u64>,
    received_len: u64,
    /// What we may send before the peer gives window back (may go below 0 after a SETTINGS).
    send_window: i64,
    /// Data waiting for window, in order.
    queue: VecDeque<Bytes>,
    queued: usize,
    /// What ends our half once the queue is out: `END_STREAM` on the last data, or trailers.
    end: Option<QueuedEnd>,
    /// Our half has ended (written `END_STREAM`).
    send_closed: bool,
    /// The head has been sent.
    head_sent: bool,
    /// The caller waits for [`Event::SendReady`].
    wants_ready: bool,
}

#[derive(Debug)]
enum QueuedEnd {
    Data,
    Trailers(Vec<(Vec<u8>, Vec<u8>, bool)>),
}

impl Stream {
    /// Counts a DATA frame of `flow` bytes (`len` of them data) against the stream: the
    /// stream error it is, if any.
    fn take_data(&mut self, flow: i64, len: u64, end_stream: bool) -> Result<(), ErrorCode> {
        if !self.head_received {
            return Err(ErrorCode::PROTOCOL_ERROR);
        }
        if self.recv_closed {
            return Err(ErrorCode::STREAM_CLOSED);
        }
        if flow > self.recv_window {
            return Err(ErrorCode::FLOW_CONTROL_ERROR);
        }
        self.recv_window -= flow;
        self.received_len += len;
        let too_long = self
            .expect_len
            .is_some_and(|expect| self.received_len > expect);
        let too_short = end_stream
            && self.remote
            && self
                .expect_len
                .is_some_and(|expect| self.received_len != expect);
        if too_long || too_short {
            return Err(ErrorCode::PROTOCOL_ERROR);
        }
        if end_stream {
            self.recv_closed = true;
        }
        Ok(())
    }

    fn new(remote: bool, recv_window: u32, send_window: u32) -> Self {
        Self {
            remote,
            recv_window: i64::from(recv_window),
            unreleased: 0,
            recv_closed: false,
            head_received: false,
            expect_len: None,
            received_len: 0,
            send_window: i64::from(send_window),
            queue: VecDeque::new(),
            queued: 0,
            end: None,
            send_closed: false,
            head_sent: false,
            wants_ready: false,
        }
    }
}

/// Where the connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// A server waiting for the client's preface.
    Preface,
    /// Waiting for the peer's first SETTINGS.
    Settings,
    Open,
    /// A connection error: GOAWAY written, nothing more is read.
    Failed,
}

/// One end of an HTTP/2 connection (see the module documentation).
#[derive(Debug)]
pub struct Connection {
    config: Config,
    phase: Phase,
    out: BytesMut,
    decoder: Decoder,
    encoder: Encoder,
    assembler: BlockAssembler,
    streams: StreamMap<Stream>,
    /// Streams with data queued for window, in the order they queued.
    pending: VecDeque<u32>,
    /// The highest stream identifier the peer opened, and the next we will.
    last_remote: u32,
    next_local: u32,
    /// Open streams opened by each end.
    remote_open: u32,
    local_open: u32,
    /// The peer's settings that matter to us.
    peer_max_streams: u32,
    peer_stream_window: u32,
    peer_max_frame_size: u32,
    /// What a new stream may receive: the protocol's 65,535 until the peer acknowledges our
    /// SETTINGS (it may send that much before it has read them), then our
    /// `SETTINGS_INITIAL_WINDOW_SIZE`.
    local_stream_window: u32,
    /// Connection windows: what we may send, what the peer may send, and what the caller has
    /// handed on but we have not yet given back.
    send_window: i64,
    recv_window: i64,
    unreleased: u32,
    /// Our GOAWAY: the last stream we will process.
    sent_goaway: Option<u32>,
    /// The peer's GOAWAY: the last of our streams it will process.
    received_goaway: Option<u32>,
    abuse: u32,
    /// Scratch for encoding a header block before it is split into frames.
    block: Vec<u8>,
}

/// The preface our SETTINGS carry.
fn our_settings(config: &Config) -> [Setting; 4] {
    [
        Setting::EnablePush(false),
        Setting::MaxConcurrentStreams(config.max_concurrent_streams),
        Setting::InitialWindowSize(config.stream_window.min(frame::MAX_WINDOW_SIZE)),
        Setting::MaxHeaderListSize(config.max_header_list_size),
    ]
}

impl Connection {
    /// A connection for `config.role`; its output already holds what this end sends first
    /// (a client's preface, our SETTINGS, and the connection window's increase).
    #[must_use]
    pub fn new(config: Config) -> Self {
        let mut out = BytesMut::with_capacity(16 * 1024);
        if config.role == Role::Client {
            out.extend_from_slice(frame::PREFACE);
        }
        frame::write_settings(&mut out, &our_settings(&config));
        let connection_window = config.connection_window.min(frame::MAX_WINDOW_SIZE);
        if connection_window > frame::DEFAULT_INITIAL_WINDOW_SIZE {
            frame::write_window_update(
                &mut out,
                StreamId::ZERO,
                connection_window - frame::DEFAULT_INITIAL_WINDOW_SIZE,
            );
        }
        let limits = DecoderLimits {
            max_header_list_size: config.max_header_list_size as usize,
            ..DecoderLimits::default()
        };
        Self {
            phase: match config.role {
                Role::Server => Phase::Preface,
                Role::Client => Phase::Settings,
            },
            out,
            decoder: Decoder::new(limits),
            encoder: Encoder::new(hpack::DEFAULT_TABLE_SIZE),
            assembler: BlockAssembler::new(DEFAULT_MAX_BLOCK_SIZE),
            streams: StreamMap::default(),
            pending: VecDeque::new(),
            last_remote: 0,
            next_local: match config.role {
                Role::Client => 1,
                Role::Server => 2,
            },
            remote_open: 0,
            local_open: 0,
            peer_max_streams: INITIAL_PEER_MAX_STREAMS,
            peer_stream_window: frame::DEFAULT_INITIAL_WINDOW_SIZE,
            local_stream_window: config.stream_window.max(frame::DEFAULT_INITIAL_WINDOW_SIZE),
            peer_max_frame_size: frame::DEFAULT_MAX_FRAME_SIZE,
            send_window: i64::from(frame::DEFAULT_INITIAL_WINDOW_SIZE),
            recv_window: i64::from(connection_window.max(frame::DEFAULT_INITIAL_WINDOW_SIZE)),
            unreleased: 0,
            sent_goaway: None,
            received_goaway: None,
            abuse: 0,
            block: Vec::new(),
            config,
        }
    }

    /// The bytes to write to the peer. Write them (all or some) and advance past what was
    /// written.
    pub fn output(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// Whether there are bytes to write.
    #[must_use]
    pub fn wants_write(&self) -> bool {
        !self.out.is_empty()
    }

    /// Streams open now (either end opened them).
    #[must_use]
    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// Whether a stream may be opened now ([`Connection::open`] would succeed).
    #[must_use]
    pub fn can_open(&self) -> bool {
        self.open_check().is_ok()
    }

    /// The peer's `SETTINGS_MAX_CONCURRENT_STREAMS`: [`INITIAL_PEER_MAX_STREAMS`] until its
    /// first SETTINGS, then what that says (unbounded if nothing).
    #[must_use]
    pub fn peer_max_streams(&self) -> u32 {
        self.peer_max_streams
    }

    /// Whether either end sent GOAWAY or the connection failed: no new streams.
    #[must_use]
    pub fn is_going_away(&self) -> bool {
        self.sent_goaway.is_some() || self.received_goaway.is_some() || self.phase == Phase::Failed
    }

    /// Whether the connection has nothing left to do: it is going away (or failed) and no
    /// stream is open. Write what [`Connection::output`] holds, then close.
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Failed || (self.is_going_away() && self.streams.is_empty())
    }

    /// Whether `stream` is still open (either half).
    #[must_use]
    pub fn is_open(&self, stream: StreamId) -> bool {
        self.streams.contains_key(&stream.value())
    }

    /// Whether all of our half of an open `stream` has been given: its end is written, or
    /// queued behind the peer's windows.
    #[must_use]
    pub fn is_send_whole(&self, stream: StreamId) -> bool {
        self.streams
            .get(&stream.value())
            .is_some_and(|s| s.send_closed || s.end.is_some())
    }

    fn open_check(&self) -> Result<(), OpenError> {
        if self.config.role != Role::Client
            || self.is_going_away()
            || self.next_local > frame::MAX_WINDOW_SIZE
        {
            return Err(OpenError::Closed);
        }
        if self.local_open >= self.peer_max_streams {
            return Err(OpenError::Full);
        }
        Ok(())
    }

    // ----- receiving -----

    /// Takes the complete frames at the start of `input` (leaving an incomplete one there
    /// for the next read), reporting what they mean to `on_event`.
    ///
    /// # Errors
    ///
    /// A connection error: GOAWAY with its code has been written to the output; write it,
    /// then close. Stream errors are not errors here: the stream is reset and reported as an
    /// [`Event::Reset`].
    pub fn recv(
        &mut self,
        input: &mut BytesMut,
        on_event: &mut impl FnMut(Event),
    ) -> Result<(), Error> {
        if self.phase == Phase::Failed {
            input.clear();
            return Ok(());
        }
        match self.recv_frames(input, on_event) {
            Ok(()) => Ok(()),
            Err(err) => {
                let err = match err {
                    Error::Stream { .. } => Error::connection(err.code(), err.reason()),
                    err => err,
                };
                self.fail(err, on_event);
                input.clear();
                Err(err)
            }
        }
    }

    /// Ends the connection with `err`: GOAWAY written, every stream reported reset.
    fn fail(&mut self, err: Error, on_event: &mut impl FnMut(Event)) {
        if self.phase == Phase::Failed {
            return;
        }
        self.phase = Phase::Failed;
        frame::write_goaway(
            &mut self.out,
            StreamId::new(self.last_remote),
            err.code(),
            err.reason().as_bytes(),
        );
        let mut ids: Vec<u32> = self.streams.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.streams.remove(&id);
            on_event(Event::Reset {
                stream: StreamId::new(id),
                code: err.code(),
                local: true,
                unprocessed: false,
            });
        }
        self.pending.clear();
    }

    fn recv_frames(
        &mut self,
        input: &mut BytesMut,
        on_event: &mut impl FnMut(Event),
    ) -> Result<(), Error> {
        if self.phase == Phase::Preface {
            match frame::parse_preface(input)? {
                Some(len) => {
                    input.advance(len);
                    self.phase = Phase::Settings;
                }
                None => return Ok(()),
            }
        }
        loop {
            let parsed = frame::parse_frame(input, frame::DEFAULT_MAX_FRAME_SIZE)?;
            let Some((frame, len)) = parsed else {
                return Ok(());
            };
            if self.phase == Phase::Settings {
                match frame {
                    Frame::Settings(settings) if !settings.ack => {
                        self.phase = Phase::Open;
                        // The peer has said its limit, if it has one: unlimited unless this
                        // frame holds it (applied below).
                        self.peer_max_streams = u32::MAX;
                    }
                    _ => {
                        return Err(Error::connection(
                            ErrorCode::PROTOCOL_ERROR,
                            "the peer's first frame was not SETTINGS",
                        ));
                    }
                }
            }
            if let Frame::Data(data) = frame
                && !self.assembler.is_open()
            {
                // Data is handed on as a slice of the input, without a copy.
                let offset = data.data.as_ptr() as usize - input.as_ptr() as usize;
                let (stream, end, data_len, flow_len) = (
                    data.stream_id,
                    data.end_stream,
                    data.data.len(),
                    data.flow_controlled_len(),
                );
                let bytes = input.split_to(len).freeze();
                let data = bytes.slice(offset..offset + data_len);
                self.recv_data(stream, data, end, flow_len, on_event)?;
                continue;
            }
            self.recv_frame(frame, on_event)?;
            input.advance(len);
            if self.phase == Phase::Failed {
                return Ok(());
            }
        }
    }

    fn spend(&mut self, units: u32) -> Result<(), Error> {
        self.abuse = self.abuse.saturating_add(units);
        if self.abuse > self.config.max_abuse {
            return Err(Error::connection(
                ErrorCode::ENHANCE_YOUR_CALM,
                "too many frames that cost work and do none",
            ));
        }
        Ok(())
    }

    /// Whether `id` names a stream that was never opened (by either end).
    fn is_idle(&self, id: u32) -> bool {
        let remote = match self.config.role {
            Role::Server => id % 2 == 1,
            Role::Client => id.is_multiple_of(2),
        };
        if remote {
            id > self.last_remote
        } else {
            id >= self.next_local
        }
    }

    fn recv_frame(
        &mut self,
        frame: Frame<'_>,
        on_event: &mut impl FnMut(Event),
    ) -> Result<(), Error> {
        let assemble = self.assembler.is_open()
            || matches!(
                frame,
                Frame::Headers(_) | Frame::PushPromise(_) | Frame::Continuation(_)
            );
        if assemble {
            let Assembled::Block(block) = self.assembler.handle_frame(frame)? else {
                // A fragment kept for its CONTINUATION (nothing else passes through here).
                return Ok(());
            };
            // Split borrows: the block lives in the assembler.
            let HeaderBlock {
                stream_id,
                kind,
                block,
            } = block;
            return recv_block(
                &mut Parts {
                    config: &self.config,
                    decoder: &mut self.decoder,
                    encoder: &mut self.encoder,
                    out: &mut self.out,
                    streams: &mut self.streams,
                    last_remote: &mut self.last_remote,
                    next_local: self.next_local,
                    remote_open: &mut self.remote_open,
                    local_open: &mut self.local_open,
                    sent_goaway: self.sent_goaway,
                    peer_stream_window: self.peer_stream_window,
                    local_stream_window: self.local_stream_window,
                    peer_max_frame_size: self.peer_max_frame_size,
                    abuse: &mut self.abuse,
                    pending: &mut self.pending,
                },
                stream_id,
                kind,
                block,
                on_event,
            );
        }
        match frame {
            // Taken apart above.
            Frame::Data(_) | Frame::Headers(_) | Frame::Continuation(_) | Frame::PushPromise(_) => {
                Ok(())
            }
            Frame::Priority(_) => self.spend(1),
            Frame::Unknown(_) => Ok(()),
            Frame::Settings(settings) => {
                if settings.ack {
                    self.settings_acked();
                    return Ok(());
                }
                self.spend(1)?;
                for setting in settings.iter() {
                    self.apply(setting)?;
                }
                frame::write_settings_ack(&mut self.out);
                self.flush_pending(on_event);
                on_event(Event::Settings);
                Ok(())
            }
            Frame::Ping(ping) => {
                if ping.ack {
                    on_event(Event::Pong { data: ping.data });
                } else {
                    self.spend(1)?;
                    frame::write_ping(&mut self.out, ping.data, true);
                }
                Ok(())
            }
            Frame::GoAway(goaway) => {
                let last = goaway.last_stream_id.value();
                self.received_goaway = Some(self.received_goaway.map_or(last, |l| l.min(last)));
                let mut refused: Vec<u32> = self
                    .streams
                    .iter()
                    .filter(|(id, s)| !s.remote && **id > last)
                    .map(|(id, _)| *id)
                    .collect();
                refused.sort_unstable();
                for id in refused {
                    self.remove(id);
                    on_event(Event::Reset {
                        stream: StreamId::new(id),
                        code: ErrorCode::REFUSED_STREAM,
                        local: false,
                        unprocessed: true,
                    });
                }
                on_event(Event::GoAway {
                    last_stream_id: goaway.last_stream_id,
                    code: goaway.code,
                });
                Ok(())
            }
            Frame::WindowUpdate(update) => {
                let increment = i64::from(update.increment);
                if update.stream_id.is_zero() {
                    self.send_window += increment;
                    if self.send_window > i64::from(frame::MAX_WINDOW_SIZE) {
                        return Err(Error::connection(
                            ErrorCode::FLOW_CONTROL_ERROR,
                            "connection window above 2^31-1",
                        ));
                    }
                    self.flush_pending(on_event);
                    return Ok(());
                }
                let id = update.stream_id.value();
                let Some(stream) = self.streams.get_mut(&id) else {
                    if self.is_idle(id) {
                        return Err(Error::connection(
                            ErrorCode::PROTOCOL_ERROR,
                            "WINDOW_UPDATE on an idle stream",
                        ));
                    }
                    return Ok(());
                };
                stream.send_window += increment;
                if stream.send_window > i64::from(frame::MAX_WINDOW_SIZE) {
                    self.reset_local(id, ErrorCode::FLOW_CONTROL_ERROR, on_event);
                    return Ok(());
                }
                self.flush_pending(on_event);
                Ok(())
            }
            Frame::RstStream(reset) => {
                let id = reset.stream_id.value();
                if self.is_idle(id) {
                    return Err(Error::connection(
                        ErrorCode::PROTOCOL_ERROR,
                        "RST_STREAM on an idle stream",
                    ));
                }
                let Some(stream) = self.streams.get(&id) else {
                    return self.spend(1);
                };
                if stream.remote && !stream.send_closed {
                    // A request cancelled before its response ended: cheap for the peer.
                    self.spend(1)?;
                }
                self.remove(id);
                on_event(Event::Reset {
                    stream: reset.stream_id,
                    code: reset.code,
                    local: false,
                    unprocessed: reset.code == ErrorCode::REFUSED_STREAM,
                });
                Ok(())
            }
        }
    }

    /// The peer has applied our SETTINGS (we send one, so the first acknowledgement is the
    /// one): a stream window below the protocol's default takes effect now, on the streams
    /// already open too, as the peer has shrunk its view of them by as much (RFC 9113,
    /// section 6.9.2).
    fn settings_acked(&mut self) {
        let shrink =
            self.local_stream_window - self.config.stream_window.min(self.local_stream_window);
        if shrink > 0 {
            self.local_stream_window -= shrink;
            for s in self.streams.values_mut() {
                s.recv_window -= i64::from(shrink);
            }
        }
    }

    fn apply(&mut self, setting: Setting) -> Result<(), Error> {
        match setting {
            Setting::HeaderTableSize(size) => self.encoder.set_max_table_size(size as usize),
            Setting::EnablePush(push) => {
                if push && self.config.role == Role::Client {
                    return Err(Error::connection(
                        ErrorCode::PROTOCOL_ERROR,
                        "a server sent SETTINGS_ENABLE_PUSH 1",
                    ));
                }
            }
            Setting::MaxConcurrentStreams(max) => self.peer_max_streams = max,
            Setting::InitialWindowSize(size) => {
                let delta = i64::from(size) - i64::from(self.peer_stream_window);
                self.peer_stream_window = size;
                for stream in self.streams.values_mut() {
                    stream.send_window += delta;
                    if stream.send_window > i64::from(frame::MAX_WINDOW_SIZE) {
                        return Err(Error::connection(
                            ErrorCode::FLOW_CONTROL_ERROR,
                            "SETTINGS_INITIAL_WINDOW_SIZE took a stream window above 2^31-1",
                        ));
                    }
                }
            }
            Setting::MaxFrameSize(size) => self.peer_max_frame_size = size,
            Setting::MaxHeaderListSize(_)
            | Setting::EnableConnectProtocol(_)
            | Setting::NoRfc7540Priorities(_) => {}
        }
        Ok(())
    }

    fn recv_data(
        &mut self,
        stream_id: StreamId,
        data: Bytes,
        end_stream: bool,
        flow_len: u32,
        on_event: &mut impl FnMut(Event),
    ) -> Result<(), Error> {
        let flow = i64::from(flow_len);
        if flow > self.recv_window {
            return Err(Error::connection(
                ErrorCode::FLOW_CONTROL_ERROR,
                "DATA beyond the connection's window",
            ));
        }
        self.recv_window -= flow;
        let id = stream_id.value();
        let verdict = self
            .streams
            .get_mut(&id)
            .map(|stream| stream.take_data(flow, data.len() as u64, end_stream));
        let verdict = match verdict {
            Some(verdict) => verdict,
            None if self.is_idle(id) => {
                return Err(Error::connection(
                    ErrorCode::PROTOCOL_ERROR,
                    "DATA on an idle stream",
                ));
            }
            None => {
                // A stream already closed (most likely reset by us while this was on its
                // way): its window is the connection's again.
                self.release_connection(flow_len);
                return self.spend(1);
            }
        };
        if let Err(code) = verdict {
            self.release_connection(flow_len);
            if code == ErrorCode::PROTOCOL_ERROR
                && self
                    .streams
                    .get(&id)
                    .is_some_and(|s| s.remote && !s.head_received)
            {
                return Err(Error::connection(
                    ErrorCode::PROTOCOL_ERROR,
                    "DATA before HEADERS",
                ));
            }
            self.reset_local(id, code, on_event);
            return Ok(());
        }
        if data.is_empty() && !end_stream {
            self.spend(1)?;
        }
        // Padding is never handed on: given back at once.
        let padding = flow_len - u32::try_from(data.len()).unwrap_or(flow_len);
        if padding > 0 {
            self.release_connection(padding);
        }
        on_event(Event::Data {
            stream: stream_id,
            data,
            end_stream,
        });
        if end_stream {
            self.maybe_close(id);
        }
        Ok(())
    }

    // ----- windows -----

    /// Gives back `len` bytes of `stream`'s data that the caller has handed on: the peer may
    /// send as much again. (For a stream that has ended, only the connection's window.)
    pub fn release(&mut self, stream: StreamId, len: usize) {
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        if len == 0 {
            return;
        }
        self.release_connection(len);
        let half = self.config.stream_window / 2;
        if let Some(s) = self.streams.get_mut(&stream.value())
            && !s.recv_closed
        {
            s.unreleased = s.unreleased.saturating_add(len);
            if s.unreleased >= half.max(1) {
                let increment = s.unreleased;
                s.unreleased = 0;
                s.recv_window += i64::from(increment);
                frame::write_window_update(&mut self.out, stream, increment);
            }
        }
    }

    fn release_connection(&mut self, len: u32) {
        self.unreleased = self.unreleased.saturating_add(len);
        if self.unreleased >= (self.config.connection_window / 2).max(1) {
            let increment = self.unreleased.min(frame::MAX_WINDOW_SIZE);
            self.unreleased -= increment;
            self.recv_window += i64::from(increment);
            frame::write_window_update(&mut self.out, StreamId::ZERO, increment);
        }
    }

    // ----- sending -----

    /// Opens a stream with a request head (a client). `end_stream`: the request has no body.
    ///
    /// # Errors
    ///
    /// [`OpenError`]: the peer's stream limit is reached, or the connection is going away.
    pub fn open<'f>(
        &mut self,
        fields: impl IntoIterator<Item = Field<'f>>,
        end_stream: bool,
    ) -> Result<StreamId, OpenError> {
        self.open_check()?;
        let id = self.next_local;
        self.next_local += 2;
        self.local_open += 1;
        let mut stream = Stream::new(false, self.local_stream_window, self.peer_stream_window);
        stream.head_sent = true;
        stream.send_closed = end_stream;
        self.streams.insert(id, stream);
        let stream_id = StreamId::new(id);
        self.write_block(stream_id, fields, end_stream);
        Ok(stream_id)
    }

    fn write_block<'f>(
        &mut self,
        stream: StreamId,
        fields: impl IntoIterator<Item = Field<'f>>,
        end_stream: bool,
    ) {
        self.block.clear();
        self.encoder.encode(fields, &mut self.block);
        frame::write_header_block(
            &mut self.out,
            stream,
            &self.block,
            end_stream,
            self.peer_max_frame_size,
        );
    }

    /// Sends `stream`'s head (a server's response; informational heads may come first).
    /// `end_stream`: no body follows. Does nothing for a stream that is gone.
    pub fn send_headers<'f>(
        &mut self,
        stream: StreamId,
        fields: impl IntoIterator<Item = Field<'f>>,
        end_stream: bool,
    ) {
        let Some(s) = self.streams.get_mut(&stream.value()) else {
            return;
        };
        if s.send_closed {
            return;
        }
        s.head_sent = true;
        s.send_closed = end_stream;
        self.write_block(stream, fields, end_stream);
        if end_stream {
            self.finish_send(stream.value());
        }
    }

    /// How much more `stream` may queue to send now; 0 means wait for
    /// [`Event::SendReady`]. A stream that is gone (or whose half has ended) gets 0 and no
    /// event: the caller learns of it from [`Event::Reset`] or its own end.
    #[must_use]
    pub fn send_capacity(&mut self, stream: StreamId) -> usize {
        let Some(s) = self.streams.get_mut(&stream.value()) else {
            return 0;
        };
        if s.send_closed || s.end.is_some() {
            return 0;
        }
        let room = self.config.send_buffer.saturating_sub(s.queued);
        if room == 0 {
            s.wants_ready = true;
        }
        room
    }

    /// Sends `data` on `stream` (and ends it when `end_stream`): as much as the windows allow
    /// now, the rest queued in order. Does nothing for a stream that is gone.
    pub fn send_data(&mut self, stream: StreamId, data: Bytes, end_stream: bool) {
        let id = stream.value();
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.send_closed || s.end.is_some() {
            return;
        }
        let was_queued = !s.queue.is_empty();
        if !was_queued {
            // Most data fits the windows and one frame as it comes: written at once, never
            // queued (a queue costs an allocation per stream).
            let window = s.send_window.min(self.send_window).max(0);
            let room = usize::try_from(window)
                .unwrap_or(usize::MAX)
                .min(self.peer_max_frame_size as usize);
            if data.len() <= room {
                let flow = i64::try_from(data.len()).unwrap_or(i64::MAX);
                s.send_window -= flow;
                self.send_window -= flow;
                if !data.is_empty() || end_stream {
                    frame::write_data(&mut self.out, stream, &data, end_stream);
                }
                if end_stream {
                    s.send_closed = true;
                    self.finish_send(id);
                }
                return;
            }
        }
        if !data.is_empty() {
            s.queued += data.len();
            s.queue.push_back(data);
        }
        if end_stream {
            s.end = Some(QueuedEnd::Data);
        }
        if was_queued {
            return;
        }
        if self.write_stream(id) {
            self.pending.push_back(id);
        }
    }

    /// Sends `stream`'s trailers, which end it, after its queued data. Does nothing for a
    /// stream that is gone.
    pub fn send_trailers<'f>(
        &mut self,
        stream: StreamId,
        fields: impl IntoIterator<Item = Field<'f>>,
    ) {
        let id = stream.value();
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.send_closed || s.end.is_some() {
            return;
        }
        if s.queue.is_empty() {
            s.send_closed = true;
            self.write_block(stream, fields, true);
            self.finish_send(id);
            return;
        }
        // Encoded when written: HPACK blocks must go out in the order they are encoded.
        let owned = fields
            .into_iter()
            .map(|f| (f.name.to_vec(), f.value.to_vec(), f.sensitive))
            .collect();
        s.end = Some(QueuedEnd::Trailers(owned));
    }

    /// Writes what `id`'s queue the windows allow; whether data is left queued.
    fn write_stream(&mut self, id: u32) -> bool {
        let max_frame = self.peer_max_frame_size as usize;
        let Some(s) = self.streams.get_mut(&id) else {
            return false;
        };
        let stream_id = StreamId::new(id);
        while let Some(front) = s.queue.front_mut() {
            let window = s.send_window.min(self.send_window);
            if window <= 0 {
                return true;
            }
            let window = usize::try_from(window).unwrap_or(usize::MAX);
            let n = front.len().min(window).min(max_frame);
            let chunk = front.split_to(n);
            if front.is_empty() {
                s.queue.pop_front();
            }
            s.queued -= n;
            let flow = i64::try_from(n).unwrap_or(i64::MAX);
            s.send_window -= flow;
            self.send_window -= flow;
            let last = s.queue.is_empty() && matches!(s.end, Some(QueuedEnd::Data));
            frame::write_data(&mut self.out, stream_id, &chunk, last);
            if last {
                s.end = None;
                s.send_closed = true;
            }
        }
        match s.end.take() {
            None => {}
            Some(QueuedEnd::Data) => {
                frame::write_data(&mut self.out, stream_id, &[], true);
                s.send_closed = true;
            }
            Some(QueuedEnd::Trailers(fields)) => {
                s.send_closed = true;
                self.block.clear();
                self.encoder.encode(
                    fields.iter().map(|(n, v, sensitive)| Field {
                        name: n,
                        value: v,
                        sensitive: *sensitive,
                    }),
                    &mut self.block,
                );
                frame::write_header_block(
                    &mut self.out,
                    stream_id,
                    &self.block,
                    true,
                    self.peer_max_frame_size,
                );
            }
        }
        let closed = self.streams.get(&id).is_some_and(|s| s.send_closed);
        if closed {
            self.finish_send(id);
        }
        false
    }

    /// After window opened: writes queued data, oldest first, and says which streams may
    /// queue more.
    fn flush_pending(&mut self, on_event: &mut impl FnMut(Event)) {
        let mut rounds = self.pending.len();
        while rounds > 0 && self.send_window > 0 {
            rounds -= 1;
            let Some(id) = self.pending.pop_front() else {
                break;
            };
            if self.write_stream(id) {
                self.pending.push_back(id);
            }
            if let Some(s) = self.streams.get_mut(&id)
                && s.wants_ready
                && s.queued < self.config.send_buffer
                && !s.send_closed
            {
                s.wants_ready = false;
                on_event(Event::SendReady {
                    stream: StreamId::new(id),
                });
            }
        }
    }

    /// Our half of `id` has ended.
    fn finish_send(&mut self, id: u32) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if s.remote && !s.recv_closed {
            // The response is complete before the request: the rest of it is not needed
            // (§8.1).
            frame::write_rst_stream(&mut self.out, StreamId::new(id), ErrorCode::NO_ERROR);
            self.remove(id);
            self.abuse = self.abuse.saturating_sub(1);
            return;
        }
        self.maybe_close(id);
    }

    /// Removes `id` once both halves have ended.
    fn maybe_close(&mut self, id: u32) {
        if self
            .streams
            .get(&id)
            .is_some_and(|s| s.recv_closed && s.send_closed)
        {
            self.remove(id);
            self.abuse = self.abuse.saturating_sub(1);
        }
    }

    fn remove(&mut self, id: u32) {
        if let Some(s) = self.streams.remove(&id) {
            if s.remote {
                self.remote_open -= 1;
            } else {
                self.local_open -= 1;
            }
            // Its unreleased data no longer counts against the stream; the connection gets
            // what the caller releases later.
        }
    }

    /// Resets `stream` with `code` (the caller gave up on it). Does nothing for a stream
    /// that is gone.
    pub fn reset(&mut self, stream: StreamId, code: ErrorCode) {
        let id = stream.value();
        if self.streams.contains_key(&id) {
            frame::write_rst_stream(&mut self.out, stream, code);
            self.remove(id);
        }
    }

    /// A stream error of ours: reset, and reported.
    fn reset_local(&mut self, id: u32, code: ErrorCode, on_event: &mut impl FnMut(Event)) {
        self.reset(StreamId::new(id), code);
        on_event(Event::Reset {
            stream: StreamId::new(id),
            code,
            local: true,
            unprocessed: false,
        });
    }

    /// Sends a PING with `data`; the answer comes as [`Event::Pong`].
    pub fn ping(&mut self, data: [u8; 8]) {
        if self.phase != Phase::Failed {
            frame::write_ping(&mut self.out, data, false);
        }
    }

    /// Sends GOAWAY with `code` (`NO_ERROR`: a graceful close). Streams already open carry
    /// on; no new ones are accepted (a server) or opened (a client).
    pub fn go_away(&mut self, code: ErrorCode) {
        if self.sent_goaway.is_some() || self.phase == Phase::Failed {
            return;
        }
        let last = match self.config.role {
            Role::Server => self.last_remote,
            Role::Client => 0,
        };
        self.sent_goaway = Some(last);
        frame::write_goaway(&mut self.out, StreamId::new(last), code, &[]);
    }

    /// Ends the connection at once with a connection error of ours (`code`, `reason`):
    /// GOAWAY is written and every stream is reported reset.
    pub fn abort(
        &mut self,
        code: ErrorCode,
        reason: &'static str,
        on_event: &mut impl FnMut(Event),
    ) {
        self.fail(Error::connection(code, reason), on_event);
    }
}

/// The connection's fields a header block touches, borrowed apart from the assembler that
/// holds the block.
struct Parts<'c> {
    config: &'c Config,
    decoder: &'c mut Decoder,
    encoder: &'c mut Encoder,
    out: &'c mut BytesMut,
    streams: &'c mut StreamMap<Stream>,
    last_remote: &'c mut u32,
    next_local: u32,
    remote_open: &'c mut u32,
    local_open: &'c mut u32,
    sent_goaway: Option<u32>,
    peer_stream_window: u32,
    local_stream_window: u32,
    peer_max_frame_size: u32,
    abuse: &'c mut u32,
    pending: &'c mut VecDeque<u32>,
}

impl Parts<'_> {
    fn remove(&mut self, id: u32) {
        if let Some(s) = self.streams.remove(&id) {
            if s.remote {
                *self.remote_open -= 1;
            } else {
                *self.local_open -= 1;
            }
        }
        self.pending.retain(|&p| p != id);
    }

    fn reset_local(&mut self, id: u32, code: ErrorCode, on_event: &mut impl FnMut(Event)) {
        frame::write_rst_stream(self.out, StreamId::new(id), code);
        if self.streams.contains_key(&id) {
            self.remove(id);
            on_event(Event::Reset {
                stream: StreamId::new(id),
                code,
                local: true,
                unprocessed: false,
            });
        }
    }
}

/// A complete header block on `stream_id`: a new request (server), a response (client), or
/// trailers (either).
fn recv_block(
    p: &mut Parts<'_>,
    stream_id: StreamId,
    kind: BlockKind,
    block: &[u8],
    on_event: &mut impl FnMut(Event),
) -> Result<(), Error> {
    let BlockKind::Headers { end_stream, .. } = kind else {
        return Err(Error::connection(
            ErrorCode::PROTOCOL_ERROR,
            "PUSH_PROMISE with push disabled",
        ));
    };
    let id = stream_id.value();
    let role = p.config.role;
    let remote = match role {
        Role::Server => id % 2 == 1,
        Role::Client => id.is_multiple_of(2),
    };
    let existing = p.streams.get(&id).map(|s| s.head_received);
    let message = match (existing, role) {
        (Some(true), _) => MessageKind::Trailers,
        (Some(false), Role::Client) => MessageKind::Response,
        (Some(false), Role::Server) | (None, _) => MessageKind::Request,
    };
    // Every block is decoded, whatever becomes of its stream: HPACK state is the
    // connection's.
    let mut collector = Collector::new(message, block.len());
    let decoded = p
        .decoder
        .decode_judged(block, |field, verdict| collector.field(field, verdict));
    let too_large = match decoded {
        Ok(()) => false,
        Err(DecodeError::HeaderListTooLarge { .. }) => true,
        Err(err) => return Err(err.into_error(stream_id)),
    };
    if existing.is_none() {
        if !remote {
            // Our own streams are opened by us: a block on one that is not open is on a
            // closed (or never opened) stream.
            if id >= p.next_local {
                return Err(Error::connection(
                    ErrorCode::PROTOCOL_ERROR,
                    "HEADERS on an idle stream",
                ));
            }
            return Ok(());
        }
        if role == Role::Client {
            return Err(Error::connection(
                ErrorCode::PROTOCOL_ERROR,
                "a server opened a stream",
            ));
        }
        if id <= *p.last_remote {
            // A stream already closed: trailers racing our reset, say. Ignored.
            *p.abuse = p.abuse.saturating_add(1);
            return Ok(());
        }
        *p.last_remote = id;
        if p.sent_goaway.is_some() {
            // After our GOAWAY, new streams are ignored (§6.8).
            return Ok(());
        }
        if *p.remote_open >= p.config.max_concurrent_streams {
            frame::write_rst_stream(p.out, stream_id, ErrorCode::REFUSED_STREAM);
            return Ok(());
        }
        if too_large {
            // 431 (RFC 6585) rather than a bare reset: the client learns why.
            let mut block = Vec::new();
            p.encoder
                .encode([Field::new(b":status", b"431")], &mut block);
            frame::write_header_block(p.out, stream_id, &block, true, p.peer_max_frame_size);
            if !end_stream {
                frame::write_rst_stream(p.out, stream_id, ErrorCode::NO_ERROR);
            }
            return Ok(());
        }
        let Ok(fields) = collector.finish() else {
            frame::write_rst_stream(p.out, stream_id, ErrorCode::PROTOCOL_ERROR);
            return Ok(());
        };
        if let Err(err) = kind_dependency(kind, stream_id) {
            frame::write_rst_stream(p.out, stream_id, err.code());
            return Ok(());
        }
        if end_stream && fields.content_length().is_some_and(|len| len > 0) {
            frame::write_rst_stream(p.out, stream_id, ErrorCode::PROTOCOL_ERROR);
            return Ok(());
        }
        let mut stream = Stream::new(true, p.local_stream_window, p.peer_stream_window);
        stream.head_received = true;
        stream.recv_closed = end_stream;
        stream.expect_len = fields.content_length();
        p.streams.insert(id, stream);
        *p.remote_open += 1;
        on_event(Event::Headers {
            stream: stream_id,
            fields,
            end_stream,
        });
        return Ok(());
    }
    // A stream that is open.
    let Some(stream) = p.streams.get(&id) else {
        return Ok(());
    };
    if stream.recv_closed {
        p.reset_local(id, ErrorCode::STREAM_CLOSED, on_event);
        return Ok(());
    }
    if too_large {
        p.reset_local(id, ErrorCode::PROTOCOL_ERROR, on_event);
        return Ok(());
    }
    let Ok(fields) = collector.finish() else {
        p.reset_local(id, ErrorCode::PROTOCOL_ERROR, on_event);
        return Ok(());
    };
    if message == MessageKind::Trailers {
        if !end_stream {
            p.reset_local(id, ErrorCode::PROTOCOL_ERROR, on_event);
            return Ok(());
        }
        let short = stream.remote
            && stream
                .expect_len
                .is_some_and(|len| len != stream.received_len);
        if short {
            p.reset_local(id, ErrorCode::PROTOCOL_ERROR, on_event);
            return Ok(());
        }
        if let Some(s) = p.streams.get_mut(&id) {
            s.recv_closed = true;
        }
        on_event(Event::Trailers {
            stream: stream_id,
            fields,
        });
        close_if_done(p, id);
        return Ok(());
    }
    // A client's response head.
    let Some(status) = fields.status() else {
        p.reset_local(id, ErrorCode::PROTOCOL_ERROR, on_event);
        return Ok(());
    };
    if (100..200).contains(&status) {
        if end_stream {
            p.reset_local(id, ErrorCode::PROTOCOL_ERROR, on_event);
        }
        // Informational: the final head follows.
        return Ok(());
    }
    if let Some(s) = p.streams.get_mut(&id) {
        s.head_received = true;
        s.recv_closed = end_stream;
        s.expect_len = fields.content_length();
    }
    on_event(Event::Headers {
        stream: stream_id,
        fields,
        end_stream,
    });
    if end_stream {
        close_if_done(p, id);
    }
    Ok(())
}

fn kind_dependency(kind: BlockKind, stream_id: StreamId) -> Result<(), Error> {
    HeaderBlock {
        stream_id,
        kind,
        block: &[],
    }
    .check_dependency()
}

fn close_if_done(p: &mut Parts<'_>, id: u32) {
    if p.streams
        .get(&id)
        .is_some_and(|s| s.recv_closed && s.send_closed)
    {
        p.remove(id);
        *p.abuse = p.abuse.saturating_sub(1);
    }
}
