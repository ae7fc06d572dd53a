//! Entry points for the fuzz targets in `fuzz/`: not an API.
//!
//! The parsers that read what peers send, the HTTP/1 codec (`h1::codec`) and protocol
//! detection (`detect`), are private to this crate; fuzz targets can only call public items.
//! This module, compiled only with the `fuzzing` cargo feature (which only the fuzz crate
//! enables), runs them on a byte slice the way the engine does (`h1::conn`, `h1::io`) and
//! returns what they decided as owned, public data, so that the targets can check invariants
//! on it. It changes with the code it wraps and is hidden from the documentation.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};

use crate::detect::{self, DetectError, DetectLimits, Detected};
use crate::h1::codec::{self, ChunkedDecoder, CodecError, Decoded, Encoding, Persistence};

/// Why the codec refused a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The head is larger than its byte or field limit, or the trailers than theirs.
    TooLarge,
    /// Not a valid HTTP/1 message, or one whose framing is ambiguous.
    Malformed(&'static str),
    /// A valid message using something the proxy does not implement.
    Unsupported(&'static str),
}

impl From<CodecError> for Refused {
    fn from(err: CodecError) -> Self {
        match err {
            CodecError::TooLarge(_) => Self::TooLarge,
            CodecError::Malformed(reason) => Self::Malformed(reason),
            CodecError::Unsupported(reason) => Self::Unsupported(reason),
        }
    }
}

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked.
    Chunked,
    /// Until the sender closes the connection (responses only).
    Close,
}

impl From<codec::Framing> for Framing {
    fn from(framing: codec::Framing) -> Self {
        match framing {
            codec::Framing::Empty => Self::Empty,
            codec::Framing::Length(n) => Self::Length(n),
            codec::Framing::Chunked => Self::Chunked,
            codec::Framing::Close => Self::Close,
        }
    }
}

/// A request head as the engine reads it, copied out of the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Bytes of the head, including its blank line.
    pub len: usize,
    /// The method token.
    pub method: Vec<u8>,
    /// The path routes match against (without the query; `/` for an empty one).
    pub route_path: Vec<u8>,
    /// The authority the request is routed by (the target's, else `Host`'s).
    pub authority: Option<Vec<u8>>,
    /// The body's framing.
    pub body: Framing,
    /// The client's `Content-Length`.
    pub content_length: Option<u64>,
    /// `HTTP/1.0`.
    pub http10: bool,
    /// The client lets the connection persist.
    pub keep_alive: bool,
    /// A protocol switch was asked for.
    pub upgrade: bool,
    /// `CONNECT`.
    pub connect: bool,
    /// `HEAD`.
    pub head: bool,
    /// A safe method.
    pub safe: bool,
    /// A gRPC content type.
    pub grpc: bool,
    /// The `grpc-timeout` field's value.
    pub grpc_timeout: Option<Vec<u8>>,
    /// The header fields as route header conditions read them (parsed again from the head's
    /// field block, as the engine does); `None` if they could not be.
    pub fields: Option<Vec<(String, Vec<u8>)>>,
    /// The whole head the proxy forwards upstream, its `grpc-timeout` passed on unchanged.
    pub forwarded: Vec<u8>,
}

/// Parses the request head at the start of `input` (`Ok(None)`: incomplete) with a limit of
/// `max_head_bytes`, as the engine does for each read.
///
/// # Errors
///
/// [`Refused`] when the codec refuses the head.
pub fn parse_request(input: &[u8], max_head_bytes: usize) -> Result<Option<Request>, Refused> {
    let mut forwarded = Vec::new();
    let Some(head) = codec::parse_request(input, max_head_bytes, &mut forwarded)? else {
        return Ok(None);
    };
    let grpc_timeout = head.grpc_timeout.clone().map(|range| input[range].to_vec());
    codec::finish_request_head(&mut forwarded, &head, grpc_timeout.as_deref());
    let route_path = match &input[head.path.clone()] {
        [] => b"/".to_vec(),
        path => path.to_vec(),
    };
    // As route header conditions read them: a head without fields has an empty field block
    // (`fields` is its end), which httparse would call incomplete.
    let block = &input[head.fields..head.len];
    let mut headers = [httparse::EMPTY_HEADER; codec::FIELD_SLOTS];
    let fields = if block.is_empty() {
        Some(Vec::new())
    } else if let Ok(httparse::Status::Complete((_, parsed))) =
        httparse::parse_headers(block, &mut headers)
    {
        Some(
            parsed
                .iter()
                .map(|field| (field.name.to_owned(), field.value.to_vec()))
                .collect(),
        )
    } else {
        None
    };
    Ok(Some(Request {
        len: head.len,
        method: input[head.method.clone()].to_vec(),
        route_path,
        authority: head.authority.clone().map(|range| input[range].to_vec()),
        body: head.body.into(),
        content_length: head.content_length,
        http10: head.http10,
        keep_alive: head.keep_alive,
        upgrade: head.upgrade,
        connect: head.connect,
        head: head.head,
        safe: head.safe,
        grpc: head.grpc,
        grpc_timeout,
        fields,
        forwarded,
    }))
}

/// The request a response answers: what the response's framing depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answering {
    /// An HTTP/1.1 `GET`.
    Get,
    /// An HTTP/1.1 `HEAD`: no body whatever the fields say.
    Head,
    /// A `CONNECT`: a 2xx opens a tunnel.
    Connect,
    /// An HTTP/1.1 `GET` asking to switch protocols: a 101 opens a tunnel.
    Upgrade,
    /// An HTTP/1.0 `GET` asking to keep the connection: bodies cannot be chunked for it.
    Get10,
}

impl Answering {
    /// Every kind, for a fuzz target to pick from.
    pub const ALL: [Self; 5] = [
        Self::Get,
        Self::Head,
        Self::Connect,
        Self::Upgrade,
        Self::Get10,
    ];

    /// The request, as a client sends it.
    #[must_use]
    pub fn bytes(self) -> &'static [u8] {
        match self {
            Self::Get => b"GET / HTTP/1.1\r\nhost: web:80\r\n\r\n",
            Self::Head => b"HEAD / HTTP/1.1\r\nhost: web:80\r\n\r\n",
            Self::Connect => b"CONNECT web:443 HTTP/1.1\r\nhost: web:443\r\n\r\n",
            Self::Upgrade => {
                b"GET / HTTP/1.1\r\nhost: web:80\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
            }
            Self::Get10 => b"GET / HTTP/1.0\r\nhost: web:80\r\nconnection: keep-alive\r\n\r\n",
        }
    }
}

/// A response head as the engine reads it, copied out of the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Bytes of the head, including its blank line.
    pub len: usize,
    /// The status code.
    pub status: u16,
    /// The body's framing, given the request.
    pub body: Framing,
    /// The upstream connection may be reused.
    pub reusable: bool,
    /// A gRPC content type.
    pub grpc: bool,
    /// Transfer codings other than a final `chunked`.
    pub codings: Option<String>,
    /// The `grpc-status` field's value.
    pub grpc_status: Option<Vec<u8>>,
    /// The whole head the proxy forwards to its client, finished as the engine finishes it
    /// (the client's connection kept open); `None` when the engine refuses to forward the
    /// response (codings an HTTP/1.0 client cannot be told about).
    pub forwarded: Option<Vec<u8>>,
    /// The forwarded body is chunked.
    pub chunked_out: bool,
}

/// Parses the response head at the start of `input` (`Ok(None)`: incomplete), answering
/// `request`, with a limit of `max_head_bytes`.
///
/// # Errors
///
/// [`Refused`] when the codec refuses the head.
pub fn parse_response(
    request: Answering,
    input: &[u8],
    max_head_bytes: usize,
) -> Result<Option<Response>, Refused> {
    let request = match codec::parse_request(request.bytes(), 1024, &mut Vec::new()) {
        Ok(Some(head)) => head,
        // The requests above are complete and valid: the codec's own tests parse them.
        other => unreachable!("a canned request did not parse: {other:?}"),
    };
    let mut out = Vec::new();
    let Some(head) = codec::parse_response(input, max_head_bytes, &request, &mut out)? else {
        return Ok(None);
    };
    let status = head.status;
    // As `h1::conn` finishes a head: interim responses and switches as they are, else bodies
    // re-framed (chunked for HTTP/1.1 clients when the length is not known).
    let (forwarded, chunked_out) = if (100..200).contains(&status) && status != 101 {
        codec::finish_response_head(
            &mut out,
            Encoding::Identity,
            None,
            Persistence::KeepAlive,
            false,
        );
        (Some(out), false)
    } else if (request.connect && (200..300).contains(&status)) || status == 101 {
        codec::finish_response_head(
            &mut out,
            Encoding::Identity,
            None,
            Persistence::KeepAlive,
            status == 101,
        );
        (Some(out), false)
    } else if request.http10 && head.codings.is_some() {
        (None, false)
    } else {
        let unknown_length = matches!(head.body, codec::Framing::Chunked | codec::Framing::Close);
        let encoding = if unknown_length && !request.http10 {
            Encoding::Chunked
        } else {
            Encoding::Identity
        };
        let close = !request.keep_alive || (request.http10 && unknown_length);
        codec::finish_response_head(
            &mut out,
            encoding,
            head.codings.as_deref(),
            Persistence::new(close, request.http10),
            false,
        );
        (Some(out), encoding == Encoding::Chunked)
    };
    Ok(Some(Response {
        len: head.len,
        status,
        body: head.body.into(),
        reusable: head.reusable,
        grpc: head.grpc,
        codings: head.codings.clone(),
        grpc_status: head.grpc_status.clone().map(|range| input[range].to_vec()),
        forwarded,
        chunked_out,
    }))
}

/// How a chunked body ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkedEnd {
    /// The last chunk and the trailer section were read.
    Done {
        /// Bytes of the input the body took, framing included.
        consumed: usize,
        /// The trailer fields kept, as field lines.
        trailers: Vec<u8>,
        /// How many fields the trailers hold as a header map (gRPC's status is read there).
        trailer_fields: usize,
    },
    /// The input ended first.
    Truncated,
    /// The decoder refused the framing.
    Refused(Refused),
}

/// A chunked body as the engine moves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkedBody {
    /// The body's data.
    pub data: Vec<u8>,
    /// How it ended.
    pub end: ChunkedEnd,
    /// The body re-framed as the proxy writes it to a receiver that gets chunks (complete
    /// only when the body is [`ChunkedEnd::Done`]).
    pub forwarded: Vec<u8>,
}

/// Decodes the chunked body at the start of `input`, which arrives `read_size` bytes per read
/// (at least one), keeping at most `max_trailers` bytes of trailers, as the engine's body pump
/// does: bytes a decode leaves unused stay buffered for the next read.
#[must_use]
pub fn decode_chunked(input: &[u8], read_size: usize, max_trailers: usize) -> ChunkedBody {
    let read_size = read_size.max(1);
    let mut decoder = ChunkedDecoder::new(max_trailers);
    let mut buffered: Vec<u8> = Vec::new();
    let (mut read, mut consumed) = (0, 0);
    let mut data = Vec::new();
    let mut forwarded = Vec::new();
    let end = 'read: loop {
        while !buffered.is_empty() {
            match decoder.decode(&buffered) {
                Err(err) => break 'read ChunkedEnd::Refused(err.into()),
                Ok((used, Decoded::Data(range))) => {
                    let chunk = &buffered[range];
                    data.extend_from_slice(chunk);
                    codec::encode_chunk_size(&mut forwarded, chunk.len());
                    forwarded.extend_from_slice(chunk);
                    forwarded.extend_from_slice(b"\r\n");
                    buffered.drain(..used);
                    consumed += used;
                }
                Ok((used, Decoded::More)) => {
                    buffered.drain(..used);
                    consumed += used;
                    break;
                }
                Ok((used, Decoded::Done)) => {
                    consumed += used;
                    codec::encode_last_chunk(&mut forwarded, decoder.trailers());
                    break 'read ChunkedEnd::Done {
                        consumed,
                        trailers: decoder.trailers().to_vec(),
                        trailer_fields: decoder.trailer_map().map_or(0, |map| map.len()),
                    };
                }
            }
        }
        if read == input.len() {
            break ChunkedEnd::Truncated;
        }
        let next = input.len().min(read + read_size);
        buffered.extend_from_slice(&input[read..next]);
        read = next;
    };
    ChunkedBody {
        data,
        end,
        forwarded,
    }
}

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1, its first request head read whole.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// A whole TLS ClientHello.
    Tls,
    /// Anything else.
    Opaque,
}

/// Why detection gave up on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetectFailure {
    /// The first request head is larger than the limit.
    TooLarge,
    /// The first request head is malformed.
    Malformed,
    /// The connection closed before a request (or within its head).
    Closed,
    /// A timeout or an IO error (neither can happen on a byte slice).
    Other,
}

/// What detection decided, and the bytes it read (to be replayed to the protocol's server).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detection {
    /// The protocol, or why there is none.
    pub protocol: Result<Protocol, DetectFailure>,
    /// Every byte read from the connection.
    pub buffered: Vec<u8>,
}

/// Runs protocol detection on byte slices. Detection is async and times its reads, so it
/// needs a runtime; one detector keeps one for all the inputs it is given.
#[derive(Debug)]
pub struct Detector {
    runtime: tokio::runtime::Runtime,
}

impl Detector {
    /// A detector with its own single-threaded runtime.
    ///
    /// # Errors
    ///
    /// The runtime could not be built.
    pub fn new() -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        Ok(Self { runtime })
    }

    /// Detects the protocol of a connection whose client sends `input`, `read_size` bytes per
    /// read (at least one), then closes; first request heads may hold `max_head_bytes`.
    #[must_use]
    pub fn detect(&self, input: &[u8], read_size: usize, max_head_bytes: usize) -> Detection {
        // Reads never wait on a slice, so the timeouts never fire.
        let limits = DetectLimits {
            detect_timeout: Duration::from_secs(3600),
            header_read_timeout: Duration::from_secs(3600),
            max_header_bytes: max_head_bytes,
        };
        let mut io = Trickle {
            rest: input,
            read_size: read_size.max(1),
        };
        let mut buffered = BytesMut::new();
        let result = self
            .runtime
            .block_on(detect::detect(&mut io, &mut buffered, limits));
        let protocol = match result {
            Ok(Detected::Http1) => Ok(Protocol::Http1),
            Ok(Detected::Http2) => Ok(Protocol::Http2),
            Ok(Detected::Tls) => Ok(Protocol::Tls),
            Ok(Detected::Opaque) => Ok(Protocol::Opaque),
            Err(DetectError::TooLarge(_)) => Err(DetectFailure::TooLarge),
            Err(DetectError::Malformed(_)) => Err(DetectFailure::Malformed),
            Err(DetectError::Closed) => Err(DetectFailure::Closed),
            Err(DetectError::HeaderTimeout(_) | DetectError::Io(_)) => Err(DetectFailure::Other),
        };
        Detection {
            protocol,
            buffered: buffered.to_vec(),
        }
    }
}

/// A client that sends a slice a few bytes per read, then closes.
struct Trickle<'a> {
    rest: &'a [u8],
    read_size: usize,
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.rest.len().min(self.read_size).min(buf.remaining());
        let (now, later) = self.rest.split_at(n);
        buf.put_slice(now);
        self.rest = later;
        Poll::Ready(Ok(()))
    }
}
