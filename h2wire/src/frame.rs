//! HTTP/2 frames (RFC 9113 §4, §6): the connection preface, frame headers, a parser per
//! frame type and a serializer for each.
//!
//! Parsing is in place: a [`Frame`] borrows its payload (DATA's data, a header block
//! fragment, GOAWAY's debug data) from the input, nothing is copied. A caller that reads into
//! a [`bytes::BytesMut`] and freezes it can keep a DATA payload without copying through
//! [`bytes::Bytes::slice_ref`].
//!
//! Each check the RFC asks of a frame on its own is made here and reported with the scope and
//! code the RFC gives it ([`Error`]). What depends on the connection's state (stream states,
//! flow-control windows, the order of frames beyond header blocks) is the connection's
//! business; see the crate documentation.

use std::fmt;

use bytes::BufMut;

use crate::error::{Error, ErrorCode};
pub use crate::id::StreamId;

/// What a client sends first (RFC 9113 §3.4), before its SETTINGS frame.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The length of a frame header.
pub const HEADER_LEN: usize = 9;

/// The initial and smallest `SETTINGS_MAX_FRAME_SIZE` (RFC 9113 §6.5.2).
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 1 << 14;

/// The largest `SETTINGS_MAX_FRAME_SIZE` (2^24 - 1, the largest length a header can carry).
pub const MAX_MAX_FRAME_SIZE: u32 = (1 << 24) - 1;

/// The initial `SETTINGS_INITIAL_WINDOW_SIZE` (RFC 9113 §6.9.2).
pub const DEFAULT_INITIAL_WINDOW_SIZE: u32 = 65_535;

/// The largest flow-control window (2^31 - 1).
pub const MAX_WINDOW_SIZE: u32 = (1 << 31) - 1;

/// Frame types (RFC 9113 §6).
pub mod kind {
    /// DATA.
    pub const DATA: u8 = 0x0;
    /// HEADERS.
    pub const HEADERS: u8 = 0x1;
    /// PRIORITY.
    pub const PRIORITY: u8 = 0x2;
    /// `RST_STREAM`.
    pub const RST_STREAM: u8 = 0x3;
    /// SETTINGS.
    pub const SETTINGS: u8 = 0x4;
    /// `PUSH_PROMISE`.
    pub const PUSH_PROMISE: u8 = 0x5;
    /// PING.
    pub const PING: u8 = 0x6;
    /// GOAWAY.
    pub const GOAWAY: u8 = 0x7;
    /// `WINDOW_UPDATE`.
    pub const WINDOW_UPDATE: u8 = 0x8;
    /// CONTINUATION.
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags (RFC 9113 §6).
pub mod flag {
    /// DATA, HEADERS: the last frame the sender sends on the stream.
    pub const END_STREAM: u8 = 0x1;
    /// SETTINGS, PING: an acknowledgement.
    pub const ACK: u8 = 0x1;
    /// HEADERS, `PUSH_PROMISE`, CONTINUATION: the header block ends here.
    pub const END_HEADERS: u8 = 0x4;
    /// DATA, HEADERS, `PUSH_PROMISE`: a pad length and padding surround the payload.
    pub const PADDED: u8 = 0x8;
    /// HEADERS: a stream dependency and weight precede the fragment.
    pub const PRIORITY: u8 = 0x20;
}

/// The 9-byte header of every frame (§4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// The payload's length (24 bits).
    pub length: u32,
    /// The frame type ([`kind`]).
    pub kind: u8,
    /// The flags ([`flag`]); flags a type does not define are ignored.
    pub flags: u8,
    /// The stream.
    pub stream_id: StreamId,
}

impl FrameHeader {
    /// The header at the start of `input`, if it holds 9 bytes.
    #[must_use]
    pub fn parse(input: &[u8]) -> Option<Self> {
        let (&[l0, l1, l2, kind, flags, s0, s1, s2, s3], _) = input.split_first_chunk::<9>()?;
        Some(Self {
            length: u32::from_be_bytes([0, l0, l1, l2]),
            kind,
            flags,
            stream_id: StreamId::new(u32::from_be_bytes([s0, s1, s2, s3])),
        })
    }

    /// Writes the header. `length` must fit in 24 bits (a caller bug otherwise: checked in
    /// debug builds).
    pub fn write(&self, dst: &mut impl BufMut) {
        debug_assert!(self.length <= MAX_MAX_FRAME_SIZE, "frame payload too long");
        let [_, l0, l1, l2] = self.length.to_be_bytes();
        dst.put_slice(&[l0, l1, l2, self.kind, self.flags]);
        dst.put_u32(self.stream_id.value());
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// A stream dependency (§5.3, deprecated by RFC 9113 but still on the wire): parsed so it can
/// be skipped and checked, never acted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamDependency {
    /// The stream depended on.
    pub dependency: StreamId,
    /// The exclusive flag.
    pub exclusive: bool,
    /// The weight minus one (the wire value).
    pub weight: u8,
}

impl StreamDependency {
    fn parse(bytes: [u8; 5]) -> Self {
        let [d0, d1, d2, d3, weight] = bytes;
        let raw = u32::from_be_bytes([d0, d1, d2, d3]);
        Self {
            dependency: StreamId::new(raw),
            exclusive: raw & 0x8000_0000 != 0,
            weight,
        }
    }

    fn to_bytes(self) -> [u8; 5] {
        let exclusive = if self.exclusive { 0x8000_0000 } else { 0 };
        let [d0, d1, d2, d3] = (self.dependency.value() | exclusive).to_be_bytes();
        [d0, d1, d2, d3, self.weight]
    }
}

/// A DATA frame (§6.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Data<'a> {
    /// The stream (never 0).
    pub stream_id: StreamId,
    /// `END_STREAM`.
    pub end_stream: bool,
    /// The pad length, when `PADDED`.
    pub pad_len: Option<u8>,
    /// The data, padding excluded.
    pub data: &'a [u8],
}

impl Data<'_> {
    /// What the frame counts against flow-control windows: its whole payload, padding and
    /// pad length included (§6.1).
    #[must_use]
    pub fn flow_controlled_len(&self) -> u32 {
        let padding = self.pad_len.map_or(0, |p| usize::from(p) + 1);
        u32::try_from(self.data.len() + padding).unwrap_or(u32::MAX)
    }
}

/// A HEADERS frame (§6.2): the first fragment of a header block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headers<'a> {
    /// The stream (never 0).
    pub stream_id: StreamId,
    /// `END_STREAM`: no DATA follows (a request without body, or trailers).
    pub end_stream: bool,
    /// `END_HEADERS`: no CONTINUATION follows.
    pub end_headers: bool,
    /// The pad length, when `PADDED`.
    pub pad_len: Option<u8>,
    /// The stream dependency, when `PRIORITY`. A stream depending on itself is a stream error
    /// (§5.3.1), which the connection reports *after* decoding the block (the HPACK state
    /// must be kept): see [`Headers::check_dependency`].
    pub dependency: Option<StreamDependency>,
    /// The header block fragment, padding excluded.
    pub fragment: &'a [u8],
}

impl Headers<'_> {
    /// The stream error of a stream that depends on itself (§5.3.1).
    ///
    /// # Errors
    ///
    /// A stream `PROTOCOL_ERROR`.
    pub fn check_dependency(&self) -> Result<(), Error> {
        match self.dependency {
            Some(d) if d.dependency == self.stream_id => Err(Error::stream(
                self.stream_id,
                ErrorCode::PROTOCOL_ERROR,
                "stream depends on itself",
            )),
            _ => Ok(()),
        }
    }
}

/// A PRIORITY frame (§6.3), which the receiver ignores once parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Priority {
    /// The stream (never 0; may be idle or closed).
    pub stream_id: StreamId,
    /// The dependency.
    pub dependency: StreamDependency,
}

/// An `RST_STREAM` frame (§6.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RstStream {
    /// The stream (never 0).
    pub stream_id: StreamId,
    /// Why.
    pub code: ErrorCode,
}

/// A SETTINGS frame (§6.5). Its parameters were all validated when it was parsed; iterate
/// them with [`Settings::iter`], in order (a parameter may appear more than once: each value
/// applies in turn, which matters for `SETTINGS_HEADER_TABLE_SIZE`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Settings<'a> {
    /// `ACK`: an acknowledgement, without parameters.
    pub ack: bool,
    payload: &'a [u8],
}

impl<'a> Settings<'a> {
    /// An acknowledgement.
    pub const ACK: Settings<'static> = Settings {
        ack: true,
        payload: &[],
    };

    /// The parameters, in order; parameters of unknown identifiers are skipped (§6.5.2).
    pub fn iter(&self) -> impl Iterator<Item = Setting> + 'a {
        self.payload.chunks_exact(6).filter_map(|chunk| {
            raw_setting(chunk).and_then(|(id, value)| Setting::known(id, value))
        })
    }
}

impl fmt::Debug for Settings<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("ack", &self.ack)
            .field("parameters", &self.iter().collect::<Vec<_>>())
            .finish()
    }
}

fn raw_setting(chunk: &[u8]) -> Option<(u16, u32)> {
    let &[i0, i1, v0, v1, v2, v3] = chunk else {
        return None;
    };
    Some((
        u16::from_be_bytes([i0, i1]),
        u32::from_be_bytes([v0, v1, v2, v3]),
    ))
}

/// A SETTINGS parameter this crate knows (§6.5.2, RFC 8441 §3, RFC 9218 §2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// `SETTINGS_HEADER_TABLE_SIZE` (0x1): the largest HPACK table the sender's decoder
    /// allows.
    HeaderTableSize(u32),
    /// `SETTINGS_ENABLE_PUSH` (0x2): 0 or 1.
    EnablePush(bool),
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` (0x3).
    MaxConcurrentStreams(u32),
    /// `SETTINGS_INITIAL_WINDOW_SIZE` (0x4): at most 2^31 - 1.
    InitialWindowSize(u32),
    /// `SETTINGS_MAX_FRAME_SIZE` (0x5): 2^14 to 2^24 - 1.
    MaxFrameSize(u32),
    /// `SETTINGS_MAX_HEADER_LIST_SIZE` (0x6), advisory.
    MaxHeaderListSize(u32),
    /// `SETTINGS_ENABLE_CONNECT_PROTOCOL` (0x8, RFC 8441): 0 or 1.
    EnableConnectProtocol(bool),
    /// `SETTINGS_NO_RFC7540_PRIORITIES` (0x9, RFC 9218): 0 or 1.
    NoRfc7540Priorities(bool),
}

impl Setting {
    /// The parameter `id` with `value`, if `id` is known. Values are not checked.
    fn known(id: u16, value: u32) -> Option<Self> {
        Some(match id {
            0x1 => Self::HeaderTableSize(value),
            0x2 => Self::EnablePush(value != 0),
            0x3 => Self::MaxConcurrentStreams(value),
            0x4 => Self::InitialWindowSize(value),
            0x5 => Self::MaxFrameSize(value),
            0x6 => Self::MaxHeaderListSize(value),
            0x8 => Self::EnableConnectProtocol(value != 0),
            0x9 => Self::NoRfc7540Priorities(value != 0),
            _ => return None,
        })
    }

    /// Checks a parameter's value (§6.5.2).
    fn validate(id: u16, value: u32) -> Result<(), Error> {
        match id {
            0x2 | 0x8 | 0x9 if value > 1 => Err(Error::connection(
                ErrorCode::PROTOCOL_ERROR,
                "boolean SETTINGS parameter other than 0 or 1",
            )),
            0x4 if value > MAX_WINDOW_SIZE => Err(Error::connection(
                ErrorCode::FLOW_CONTROL_ERROR,
                "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
            )),
            0x5 if !(DEFAULT_MAX_FRAME_SIZE..=MAX_MAX_FRAME_SIZE).contains(&value) => {
                Err(Error::connection(
                    ErrorCode::PROTOCOL_ERROR,
                    "SETTINGS_MAX_FRAME_SIZE outside 2^14..2^24-1",
                ))
            }
            _ => Ok(()),
        }
    }

    /// The identifier and wire value.
    #[must_use]
    pub fn to_wire(self) -> (u16, u32) {
        match self {
            Self::HeaderTableSize(v) => (0x1, v),
            Self::EnablePush(v) => (0x2, u32::from(v)),
            Self::MaxConcurrentStreams(v) => (0x3, v),
            Self::InitialWindowSize(v) => (0x4, v),
            Self::MaxFrameSize(v) => (0x5, v),
            Self::MaxHeaderListSize(v) => (0x6, v),
            Self::EnableConnectProtocol(v) => (0x8, u32::from(v)),
            Self::NoRfc7540Priorities(v) => (0x9, u32::from(v)),
        }
    }
}

/// A `PUSH_PROMISE` frame (§6.6), parsed so that it can be refused: a server never receives
/// one, and a client that sent `SETTINGS_ENABLE_PUSH` 0 treats one as a connection
/// `PROTOCOL_ERROR` (§8.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PushPromise<'a> {
    /// The stream the promise is made on (never 0).
    pub stream_id: StreamId,
    /// `END_HEADERS`.
    pub end_headers: bool,
    /// The pad length, when `PADDED`.
    pub pad_len: Option<u8>,
    /// The stream promised.
    pub promised_id: StreamId,
    /// The header block fragment, padding excluded.
    pub fragment: &'a [u8],
}

/// A PING frame (§6.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ping {
    /// `ACK`: the answer to a PING.
    pub ack: bool,
    /// Opaque data, echoed in the answer.
    pub data: [u8; 8],
}

/// A GOAWAY frame (§6.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GoAway<'a> {
    /// The last stream the sender may have processed.
    pub last_stream_id: StreamId,
    /// Why.
    pub code: ErrorCode,
    /// Opaque diagnostics.
    pub debug_data: &'a [u8],
}

/// A `WINDOW_UPDATE` frame (§6.9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowUpdate {
    /// The stream, or 0 for the connection's window.
    pub stream_id: StreamId,
    /// The increment: 1 to 2^31 - 1.
    pub increment: u32,
}

/// A CONTINUATION frame (§6.10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Continuation<'a> {
    /// The stream (never 0).
    pub stream_id: StreamId,
    /// `END_HEADERS`.
    pub end_headers: bool,
    /// The header block fragment.
    pub fragment: &'a [u8],
}

/// A frame of a type this crate does not know: to be ignored (§4.1, §5.5), except in the
/// middle of a header block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unknown<'a> {
    /// The type.
    pub kind: u8,
    /// The flags.
    pub flags: u8,
    /// The stream.
    pub stream_id: StreamId,
    /// The payload.
    pub payload: &'a [u8],
}

/// A parsed frame, borrowing its payload from the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// DATA.
    Data(Data<'a>),
    /// HEADERS.
    Headers(Headers<'a>),
    /// PRIORITY.
    Priority(Priority),
    /// `RST_STREAM`.
    RstStream(RstStream),
    /// SETTINGS.
    Settings(Settings<'a>),
    /// `PUSH_PROMISE`.
    PushPromise(PushPromise<'a>),
    /// PING.
    Ping(Ping),
    /// GOAWAY.
    GoAway(GoAway<'a>),
    /// `WINDOW_UPDATE`.
    WindowUpdate(WindowUpdate),
    /// CONTINUATION.
    Continuation(Continuation<'a>),
    /// A type to ignore.
    Unknown(Unknown<'a>),
}

/// Checks the connection preface at the start of `input` (RFC 9113 §3.4): `Ok(None)` while
/// it is incomplete, `Ok(Some(len))` once it is there (the bytes to consume).
///
/// # Errors
///
/// A connection `PROTOCOL_ERROR` as soon as a byte differs: the client does not speak
/// HTTP/2 with prior knowledge.
pub fn parse_preface(input: &[u8]) -> Result<Option<usize>, Error> {
    let len = input.len().min(PREFACE.len());
    if input.get(..len) != PREFACE.get(..len) {
        return Err(Error::connection(
            ErrorCode::PROTOCOL_ERROR,
            "invalid connection preface",
        ));
    }
    Ok((len == PREFACE.len()).then_some(len))
}

/// Parses the frame at the start of `input`: `Ok(None)` while it is incomplete,
/// `Ok(Some((frame, len)))` once it is whole (`len` bytes to consume). `max_frame_size` is
/// our `SETTINGS_MAX_FRAME_SIZE` (acknowledged by the peer; [`DEFAULT_MAX_FRAME_SIZE`]
/// before).
///
/// # Errors
///
/// [`Error`] for a frame that breaks a rule of RFC 9113 §4 or §6, with the scope and code
/// the RFC gives it. A frame longer than `max_frame_size` is refused from its header alone
/// (a connection `FRAME_SIZE_ERROR`), before its payload arrives.
pub fn parse_frame(input: &[u8], max_frame_size: u32) -> Result<Option<(Frame<'_>, usize)>, Error> {
    let Some(header) = FrameHeader::parse(input) else {
        return Ok(None);
    };
    if header.length > max_frame_size {
        return Err(Error::connection(
            ErrorCode::FRAME_SIZE_ERROR,
            "frame larger than SETTINGS_MAX_FRAME_SIZE",
        ));
    }
    let len = HEADER_LEN + header.length as usize;
    let Some(payload) = input.get(HEADER_LEN..len) else {
        return Ok(None);
    };
    Frame::parse(header, payload).map(|frame| Some((frame, len)))
}

/// A payload of a frame that may be padded, taken apart.
struct Unpadded<'a> {
    pad_len: Option<u8>,
    /// The fixed fields after the pad length.
    fields: &'a [u8],
    /// What is left before the padding.
    body: &'a [u8],
}

/// `payload` without its padding, given the PADDED flag (§6.1, §6.2, §6.6). `fixed` bytes of
/// other fields follow the pad length and are returned first.
fn unpad<'a>(header: &FrameHeader, payload: &'a [u8], fixed: usize) -> Result<Unpadded<'a>, Error> {
    let too_short = Error::connection(
        ErrorCode::FRAME_SIZE_ERROR,
        "frame too short for its fields",
    );
    let (pad_len, rest) = if header.has(flag::PADDED) {
        let (&pad_len, rest) = payload.split_first().ok_or(too_short)?;
        (Some(pad_len), rest)
    } else {
        (None, payload)
    };
    let (fields, rest) = rest.split_at_checked(fixed).ok_or(too_short)?;
    let body_len = rest
        .len()
        .checked_sub(pad_len.map_or(0, usize::from))
        .ok_or(Error::connection(
            ErrorCode::PROTOCOL_ERROR,
            "padding longer than the frame payload",
        ))?;
    let body = rest.get(..body_len).unwrap_or_default();
    Ok(Unpadded {
        pad_len,
        fields,
        body,
    })
}

fn nonzero_stream(header: &FrameHeader, reason: &'static str) -> Result<StreamId, Error> {
    if header.stream_id.is_zero() {
        Err(Error::connection(ErrorCode::PROTOCOL_ERROR, reason))
    } else {
        Ok(header.stream_id)
    }
}

fn zero_stream(header: &FrameHeader, reason: &'static str) -> Result<(), Error> {
    if header.stream_id.is_zero() {
        Ok(())
    } else {
        Err(Error::connection(ErrorCode::PROTOCOL_ERROR, reason))
    }
}

fn exact<const N: usize>(payload: &[u8], error: Error) -> Result<[u8; N], Error> {
    <[u8; N]>::try_from(payload).map_err(|_| error)
}

impl<'a> Frame<'a> {
    /// Parses the frame with `header` and `payload` (exactly `header.length` bytes).
    ///
    /// # Errors
    ///
    /// As [`parse_frame`], but the frame size is not checked against the setting.
    pub fn parse(header: FrameHeader, payload: &'a [u8]) -> Result<Self, Error> {
        let frame_size = |reason| Error::connection(ErrorCode::FRAME_SIZE_ERROR, reason);
        Ok(match header.kind {
            kind::DATA => {
                let stream_id = nonzero_stream(&header, "DATA frame on stream 0")?;
                let Unpadded {
                    pad_len,
                    body: data,
                    ..
                } = unpad(&header, payload, 0)?;
                Self::Data(Data {
                    stream_id,
                    end_stream: header.has(flag::END_STREAM),
                    pad_len,
                    data,
                })
            }
            kind::HEADERS => {
                let stream_id = nonzero_stream(&header, "HEADERS frame on stream 0")?;
                let priority = header.has(flag::PRIORITY);
                let Unpadded {
                    pad_len,
                    fields,
                    body: fragment,
                } = unpad(&header, payload, if priority { 5 } else { 0 })?;
                let dependency = match fields.first_chunk::<5>() {
                    Some(&bytes) if priority => Some(StreamDependency::parse(bytes)),
                    _ => None,
                };
                Self::Headers(Headers {
                    stream_id,
                    end_stream: header.has(flag::END_STREAM),
                    end_headers: header.has(flag::END_HEADERS),
                    pad_len,
                    dependency,
                    fragment,
                })
            }
            kind::PRIORITY => {
                let stream_id = nonzero_stream(&header, "PRIORITY frame on stream 0")?;
                let bytes = exact::<5>(
                    payload,
                    Error::stream(
                        stream_id,
                        ErrorCode::FRAME_SIZE_ERROR,
                        "PRIORITY frame not 5 bytes long",
                    ),
                )?;
                let dependency = StreamDependency::parse(bytes);
                if dependency.dependency == stream_id {
                    return Err(Error::stream(
                        stream_id,
                        ErrorCode::PROTOCOL_ERROR,
                        "stream depends on itself",
                    ));
                }
                Self::Priority(Priority {
                    stream_id,
                    dependency,
                })
            }
            kind::RST_STREAM => {
                let stream_id = nonzero_stream(&header, "RST_STREAM frame on stream 0")?;
                let code = exact::<4>(payload, frame_size("RST_STREAM frame not 4 bytes long"))?;
                Self::RstStream(RstStream {
                    stream_id,
                    code: ErrorCode(u32::from_be_bytes(code)),
                })
            }
            kind::SETTINGS => {
                zero_stream(&header, "SETTINGS frame on a stream")?;
                let ack = header.has(flag::ACK);
                if ack && !payload.is_empty() {
                    return Err(frame_size("SETTINGS acknowledgement with a payload"));
                }
                if !payload.len().is_multiple_of(6) {
                    return Err(frame_size("SETTINGS frame not a multiple of 6 bytes long"));
                }
                for chunk in payload.chunks_exact(6) {
                    if let Some((id, value)) = raw_setting(chunk) {
                        Setting::validate(id, value)?;
                    }
                }
                Self::Settings(Settings { ack, payload })
            }
            kind::PUSH_PROMISE => {
                let stream_id = nonzero_stream(&header, "PUSH_PROMISE frame on stream 0")?;
                let Unpadded {
                    pad_len,
                    fields,
                    body: fragment,
                } = unpad(&header, payload, 4)?;
                let promised = exact::<4>(fields, frame_size("PUSH_PROMISE frame too short"))?;
                Self::PushPromise(PushPromise {
                    stream_id,
                    end_headers: header.has(flag::END_HEADERS),
                    pad_len,
                    promised_id: StreamId::new(u32::from_be_bytes(promised)),
                    fragment,
                })
            }
            kind::PING => {
                zero_stream(&header, "PING frame on a stream")?;
                let data = exact::<8>(payload, frame_size("PING frame not 8 bytes long"))?;
                Self::Ping(Ping {
                    ack: header.has(flag::ACK),
                    data,
                })
            }
            kind::GOAWAY => {
                zero_stream(&header, "GOAWAY frame on a stream")?;
                let (fields, debug_data) = payload
                    .split_first_chunk::<8>()
                    .ok_or(frame_size("GOAWAY frame shorter than 8 bytes"))?;
                let [s0, s1, s2, s3, c0, c1, c2, c3] = *fields;
                Self::GoAway(GoAway {
                    last_stream_id: StreamId::new(u32::from_be_bytes([s0, s1, s2, s3])),
                    code: ErrorCode(u32::from_be_bytes([c0, c1, c2, c3])),
                    debug_data,
                })
            }
            kind::WINDOW_UPDATE => {
                let bytes =
                    exact::<4>(payload, frame_size("WINDOW_UPDATE frame not 4 bytes long"))?;
                let increment = u32::from_be_bytes(bytes) & MAX_WINDOW_SIZE;
                if increment == 0 {
                    let reason = "WINDOW_UPDATE with an increment of 0";
                    return Err(if header.stream_id.is_zero() {
                        Error::connection(ErrorCode::PROTOCOL_ERROR, reason)
                    } else {
                        Error::stream(header.stream_id, ErrorCode::PROTOCOL_ERROR, reason)
                    });
                }
                Self::WindowUpdate(WindowUpdate {
                    stream_id: header.stream_id,
                    increment,
                })
            }
            kind::CONTINUATION => {
                let stream_id = nonzero_stream(&header, "CONTINUATION frame on stream 0")?;
                Self::Continuation(Continuation {
                    stream_id,
                    end_headers: header.has(flag::END_HEADERS),
                    fragment: payload,
                })
            }
            kind => Self::Unknown(Unknown {
                kind,
                flags: header.flags,
                stream_id: header.stream_id,
                payload,
            }),
        })
    }

    /// The stream the frame is on (0 for the connection).
    #[must_use]
    pub fn stream_id(&self) -> StreamId {
        match self {
            Self::Data(f) => f.stream_id,
            Self::Headers(f) => f.stream_id,
            Self::Priority(f) => f.stream_id,
            Self::RstStream(f) => f.stream_id,
            Self::PushPromise(f) => f.stream_id,
            Self::WindowUpdate(f) => f.stream_id,
            Self::Continuation(f) => f.stream_id,
            Self::Unknown(f) => f.stream_id,
            Self::Settings(_) | Self::Ping(_) | Self::GoAway(_) => StreamId::ZERO,
        }
    }

    /// Writes the frame. Payloads must fit in one frame (2^24 - 1 bytes and the peer's
    /// `SETTINGS_MAX_FRAME_SIZE`): the caller splits them ([`write_header_block`] does for
    /// header blocks).
    pub fn write(&self, dst: &mut impl BufMut) {
        match self {
            Self::Data(f) => {
                let flags = flag_if(f.end_stream, flag::END_STREAM);
                write_padded(dst, kind::DATA, flags, f.stream_id, f.pad_len, &[], f.data);
            }
            Self::Headers(f) => {
                let dependency = f.dependency.map(StreamDependency::to_bytes);
                let fields: &[u8] = dependency.as_ref().map_or(&[], |bytes| bytes.as_slice());
                let flags = flag_if(f.end_stream, flag::END_STREAM)
                    | flag_if(f.end_headers, flag::END_HEADERS)
                    | flag_if(f.dependency.is_some(), flag::PRIORITY);
                write_padded(
                    dst,
                    kind::HEADERS,
                    flags,
                    f.stream_id,
                    f.pad_len,
                    fields,
                    f.fragment,
                );
            }
            Self::Priority(f) => {
                write_header(dst, kind::PRIORITY, 0, f.stream_id, 5);
                dst.put_slice(&f.dependency.to_bytes());
            }
            Self::RstStream(f) => {
                write_header(dst, kind::RST_STREAM, 0, f.stream_id, 4);
                dst.put_u32(f.code.0);
            }
            Self::Settings(f) => {
                let flags = flag_if(f.ack, flag::ACK);
                write_header(dst, kind::SETTINGS, flags, StreamId::ZERO, f.payload.len());
                dst.put_slice(f.payload);
            }
            Self::PushPromise(f) => {
                let flags = flag_if(f.end_headers, flag::END_HEADERS);
                let promised = f.promised_id.value().to_be_bytes();
                write_padded(
                    dst,
                    kind::PUSH_PROMISE,
                    flags,
                    f.stream_id,
                    f.pad_len,
                    &promised,
                    f.fragment,
                );
            }
            Self::Ping(f) => {
                write_header(
                    dst,
                    kind::PING,
                    flag_if(f.ack, flag::ACK),
                    StreamId::ZERO,
                    8,
                );
                dst.put_slice(&f.data);
            }
            Self::GoAway(f) => {
                let len = 8 + f.debug_data.len();
                write_header(dst, kind::GOAWAY, 0, StreamId::ZERO, len);
                dst.put_u32(f.last_stream_id.value());
                dst.put_u32(f.code.0);
                dst.put_slice(f.debug_data);
            }
            Self::WindowUpdate(f) => {
                write_header(dst, kind::WINDOW_UPDATE, 0, f.stream_id, 4);
                dst.put_u32(f.increment & MAX_WINDOW_SIZE);
            }
            Self::Continuation(f) => {
                let flags = flag_if(f.end_headers, flag::END_HEADERS);
                write_header(
                    dst,
                    kind::CONTINUATION,
                    flags,
                    f.stream_id,
                    f.fragment.len(),
                );
                dst.put_slice(f.fragment);
            }
            Self::Unknown(f) => {
                write_header(dst, f.kind, f.flags, f.stream_id, f.payload.len());
                dst.put_slice(f.payload);
            }
        }
    }
}

fn flag_if(set: bool, flag: u8) -> u8 {
    if set { flag } else { 0 }
}

fn write_header(dst: &mut impl BufMut, kind: u8, flags: u8, stream_id: StreamId, len: usize) {
    debug_assert!(len <= MAX_MAX_FRAME_SIZE as usize, "frame payload too long");
    FrameHeader {
        length: u32::try_from(len).unwrap_or(u32::MAX),
        kind,
        flags,
        stream_id,
    }
    .write(dst);
}

fn write_padded(
    dst: &mut impl BufMut,
    kind: u8,
    flags: u8,
    stream_id: StreamId,
    pad_len: Option<u8>,
    fields: &[u8],
    body: &[u8],
) {
    let padding = pad_len.map_or(0, usize::from);
    let len = usize::from(pad_len.is_some()) + fields.len() + body.len() + padding;
    let flags = flags | flag_if(pad_len.is_some(), flag::PADDED);
    write_header(dst, kind, flags, stream_id, len);
    if let Some(pad_len) = pad_len {
        dst.put_u8(pad_len);
    }
    dst.put_slice(fields);
    dst.put_slice(body);
    dst.put_bytes(0, padding);
}

/// Writes a DATA frame.
pub fn write_data(dst: &mut impl BufMut, stream_id: StreamId, data: &[u8], end_stream: bool) {
    Frame::Data(Data {
        stream_id,
        end_stream,
        pad_len: None,
        data,
    })
    .write(dst);
}

/// Writes a header block as a HEADERS frame and as many CONTINUATION frames as
/// `max_frame_size` (the peer's `SETTINGS_MAX_FRAME_SIZE`) requires.
pub fn write_header_block(
    dst: &mut impl BufMut,
    stream_id: StreamId,
    block: &[u8],
    end_stream: bool,
    max_frame_size: u32,
) {
    let max = usize::try_from(max_frame_size.max(1)).unwrap_or(usize::MAX);
    let mut chunks = block.chunks(max);
    let first = chunks.next().unwrap_or_default();
    let mut rest = chunks.peekable();
    Frame::Headers(Headers {
        stream_id,
        end_stream,
        end_headers: rest.peek().is_none(),
        pad_len: None,
        dependency: None,
        fragment: first,
    })
    .write(dst);
    while let Some(fragment) = rest.next() {
        Frame::Continuation(Continuation {
            stream_id,
            end_headers: rest.peek().is_none(),
            fragment,
        })
        .write(dst);
    }
}

/// Writes a SETTINGS frame with `settings`, in order.
pub fn write_settings(dst: &mut impl BufMut, settings: &[Setting]) {
    write_header(dst, kind::SETTINGS, 0, StreamId::ZERO, settings.len() * 6);
    for setting in settings {
        let (id, value) = setting.to_wire();
        dst.put_u16(id);
        dst.put_u32(value);
    }
}

/// Writes a SETTINGS acknowledgement.
pub fn write_settings_ack(dst: &mut impl BufMut) {
    Frame::Settings(Settings::ACK).write(dst);
}

/// Writes a `WINDOW_UPDATE` frame (`increment` 1 to 2^31 - 1).
pub fn write_window_update(dst: &mut impl BufMut, stream_id: StreamId, increment: u32) {
    debug_assert!((1..=MAX_WINDOW_SIZE).contains(&increment));
    Frame::WindowUpdate(WindowUpdate {
        stream_id,
        increment,
    })
    .write(dst);
}

/// Writes an `RST_STREAM` frame.
pub fn write_rst_stream(dst: &mut impl BufMut, stream_id: StreamId, code: ErrorCode) {
    Frame::RstStream(RstStream { stream_id, code }).write(dst);
}

/// Writes a PING frame, or its acknowledgement.
pub fn write_ping(dst: &mut impl BufMut, data: [u8; 8], ack: bool) {
    Frame::Ping(Ping { ack, data }).write(dst);
}

/// Writes a GOAWAY frame.
pub fn write_goaway(
    dst: &mut impl BufMut,
    last_stream_id: StreamId,
    code: ErrorCode,
    debug_data: &[u8],
) {
    Frame::GoAway(GoAway {
        last_stream_id,
        code,
        debug_data,
    })
    .write(dst);
}

#[cfg(test)]
mod tests;
