//! HTTP/1.1 message framing, without IO (RFC 9112).
//!
//! The proxy's HTTP/1 engine ([`super::conn`]) reads bytes into a buffer and asks this module
//! what they mean: [`parse_request`] and [`parse_response`] parse a head with `httparse`,
//! decide how the body is framed, and write the head the proxy forwards (hop-by-hop fields
//! removed, RFC 9110 §7.6.1) into an output buffer in the same pass; [`ChunkedDecoder`] walks
//! a chunked body; [`encode_chunk`] and friends write one. Nothing here allocates per message
//! except a request's `Connection`-named fields and a chunked body's trailers.
//!
//! Framing is strict where ambiguity could let two parties disagree about where a message
//! ends (request smuggling): a request with both `Content-Length` and `Transfer-Encoding`, a
//! `Transfer-Encoding` whose final coding is not `chunked`, differing `Content-Length`s, more
//! than one `Host`, or a malformed chunk size is refused, never guessed at.

use std::mem::MaybeUninit;
use std::ops::Range;

/// The most end-to-end header fields a head may carry (hyper's default), counted as the proxy
/// forwards them.
pub(crate) const MAX_HEADERS: usize = 100;

/// Fields a head may carry beyond [`MAX_HEADERS`]: hop-by-hop fields, which the proxy drops,
/// and the framing, connection, `te`, `host` and `grpc-timeout` fields it writes itself (at
/// most five on a request, three on a response). A head the proxy forwards therefore always
/// fits in what its next hop accepts, so two proxies in a row never refuse what the first one
/// sent (the `h1_response` fuzz target found a 100-field, close-delimited response that came
/// out re-chunked with 101 and was refused by the next proxy).
pub(crate) const FIELD_SLOTS: usize = MAX_HEADERS + 8;

/// The longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// Why a head or body could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CodecError {
    /// The head is larger than the limit (bytes or fields).
    #[error("head larger than {0} bytes or {MAX_HEADERS} end-to-end fields")]
    TooLarge(usize),
    /// The bytes are not a valid HTTP/1 message.
    #[error("{0}")]
    Malformed(&'static str),
    /// A valid message using something the proxy does not implement (a transfer coding).
    #[error("{0}")]
    Unsupported(&'static str),
}

impl From<httparse::Error> for CodecError {
    fn from(err: httparse::Error) -> Self {
        Self::Malformed(match err {
            httparse::Error::HeaderName => "invalid header name",
            httparse::Error::HeaderValue => "invalid header value",
            httparse::Error::NewLine => "invalid line ending",
            httparse::Error::Status => "invalid status line",
            httparse::Error::Token => "invalid token",
            httparse::Error::TooManyHeaders => "too many header fields",
            httparse::Error::Version => "invalid HTTP version",
        })
    }
}

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the sender closes the connection (responses only).
    Close,
}

impl Framing {
    /// Whether a body follows the head.
    pub(crate) fn has_body(self) -> bool {
        !matches!(self, Self::Empty | Self::Length(0))
    }
}

/// A parsed request head; ranges index the buffer it was parsed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RequestHead {
    /// Bytes of the head, including the blank line.
    pub(crate) len: usize,
    /// Where the authority is: the request target's (absolute- or authority-form), else
    /// `Host`'s.
    pub(crate) authority: Option<Range<usize>>,
    /// The request body's framing (never [`Framing::Close`]).
    pub(crate) body: Framing,
    /// The client's `Content-Length` (its fields are forwarded as one normalized field).
    pub(crate) content_length: Option<u64>,
    /// `HTTP/1.0`.
    pub(crate) http10: bool,
    /// The client allows the connection to stay open after the response.
    pub(crate) keep_alive: bool,
    /// `Connection: upgrade` with an `Upgrade` field: a protocol switch was asked for.
    pub(crate) upgrade: bool,
    /// `CONNECT`: a tunnel was asked for.
    pub(crate) connect: bool,
    /// `HEAD`: the response has no body whatever its fields say.
    pub(crate) head: bool,
    /// A safe method (RFC 9110 §9.2.1: `GET`, `HEAD`, `OPTIONS`, `TRACE`): may be sent again
    /// when a reused connection closes before any response.
    pub(crate) safe: bool,
    /// `content-type: application/grpc*`.
    pub(crate) grpc: bool,
    /// Where the method token is.
    pub(crate) method: Range<usize>,
    /// Where the path is, without the query (empty for an absolute-form target without one;
    /// the authority for `CONNECT`).
    pub(crate) path: Range<usize>,
    /// Where the header fields start (just after the request line).
    pub(crate) fields: usize,
    /// The `grpc-timeout` field's value, if any. The field is not in the forwarded head: the
    /// exchange decides what to send on.
    pub(crate) grpc_timeout: Option<Range<usize>>,
}

/// A parsed response head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ResponseHead {
    /// Bytes of the head, including the blank line.
    pub(crate) len: usize,
    /// The status code.
    pub(crate) status: u16,
    /// The body's framing, given the request it answers.
    pub(crate) body: Framing,
    /// The server allows the connection to be reused after this response.
    pub(crate) reusable: bool,
    /// `content-type: application/grpc*`.
    pub(crate) grpc: bool,
    /// Transfer codings other than the final `chunked` (gzip, say), which the forwarded head
    /// must keep naming.
    pub(crate) codings: Option<String>,
    /// The `grpc-status` field's value, if any.
    pub(crate) grpc_status: Option<Range<usize>>,
}

/// The fields a proxy never forwards: `Connection` and the fields it names, `Keep-Alive`,
/// `Proxy-Connection`, `Transfer-Encoding` (the proxy frames bodies itself), `TE` (`trailers`
/// is re-added, gRPC needs it end to end), `Upgrade` (re-added for a protocol switch), and
/// `Content-Length` when the proxy re-frames.
fn is_hop_by_hop(name: &str) -> bool {
    // Lengths first: most names are rejected by one comparison.
    match name.len() {
        2 => name.eq_ignore_ascii_case("te"),
        7 => name.eq_ignore_ascii_case("upgrade"),
        10 => name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive"),
        16 => name.eq_ignore_ascii_case("proxy-connection"),
        17 => name.eq_ignore_ascii_case("transfer-encoding"),
        _ => false,
    }
}

/// Comma-separated list elements of a field value, trimmed, empty ones skipped.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// What the `Connection` fields of a message say.
#[derive(Default)]
struct ConnectionField {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    /// Other names: those fields are hop-by-hop too.
    named: bool,
}

impl ConnectionField {
    fn add(&mut self, value: &[u8]) {
        for token in tokens(value) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            } else {
                self.named = true;
            }
        }
    }
}

/// Whether `name` is listed in any `Connection` field of `headers`, and so hop-by-hop. Never
/// the fields that frame or route the message (`Content-Length`, `Host`): a client naming
/// them must not make the proxy forward a body without its length.
fn named_by_connection(headers: &[httparse::Header<'_>], name: &str) -> bool {
    if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("host") {
        return false;
    }
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| tokens(h.value))
        .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
}

fn parse_content_length(value: &[u8]) -> Option<u64> {
    // RFC 9110 §8.6: 1*DIGIT; a list of identical values is tolerated by the caller.
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Accumulates `Content-Length` fields: all must agree.
fn add_content_length(current: &mut Option<u64>, value: &[u8]) -> Result<(), CodecError> {
    for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
        let n =
            parse_content_length(token).ok_or(CodecError::Malformed("invalid content-length"))?;
        match current {
            Some(seen) if *seen != n => {
                return Err(CodecError::Malformed("conflicting content-length"));
            }
            _ => *current = Some(n),
        }
    }
    Ok(())
}

/// Checks that the `Transfer-Encoding` fields say exactly `chunked`: the only request coding
/// the proxy forwards (it re-chunks bodies and would lose any other).
fn transfer_encoding_only_chunked(
    values: &mut dyn Iterator<Item = &[u8]>,
) -> Result<(), CodecError> {
    let mut count = 0;
    for value in values {
        for token in tokens(value) {
            if !token.eq_ignore_ascii_case(b"chunked") {
                // RFC 9112 §6.1: a coding the server does not understand is a 501.
                return Err(CodecError::Unsupported(
                    "transfer coding other than chunked",
                ));
            }
            count += 1;
        }
    }
    match count {
        1 => Ok(()),
        0 => Err(CodecError::Malformed("empty transfer-encoding")),
        _ => Err(CodecError::Malformed("chunked applied more than once")),
    }
}

/// What a response's `Transfer-Encoding` fields say, in one pass: whether `chunked` is the
/// final coding, applied once (else the body runs until close), and the other codings, which
/// the proxy must keep naming when it re-chunks the body (`None` for plain `chunked`, the
/// common case, which allocates nothing).
fn response_codings(headers: &[httparse::Header<'_>]) -> (bool, Option<String>) {
    let values = || {
        headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
            .flat_map(|h| tokens(h.value))
    };
    let (mut last_chunked, mut chunked_seen, mut count) = (false, 0, 0);
    for token in values() {
        last_chunked = token.eq_ignore_ascii_case(b"chunked");
        chunked_seen += usize::from(last_chunked);
        count += 1;
    }
    // `chunked` applied twice is an error (RFC 9112 §6.1): read such a body until close.
    let chunked = last_chunked && chunked_seen == 1;
    if count == 0 || (chunked && count == 1) {
        return (chunked, None);
    }
    let mut all: Vec<&[u8]> = values().collect();
    if chunked {
        all.pop();
    }
    let text: Vec<String> = all
        .iter()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    (chunked, Some(text.join(", ")))
}

/// Whether `bytes` can be a URI authority (host and optional port): no userinfo, no path, no
/// whitespace or controls. Cheap: the router validates the name itself.
pub(crate) fn valid_authority(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes.len() <= 1024
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:[]".contains(b))
}

fn is_grpc(value: &[u8]) -> bool {
    conduit_core::classify::is_grpc_content_type(value)
}

fn offset(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The part of `buf` a head of at most `max` bytes can occupy: a head is judged on these bytes
/// alone (and is too large if it does not end within them while more bytes follow).
pub(crate) fn within(buf: &[u8], max: usize) -> &[u8] {
    &buf[..buf.len().min(max)]
}

/// Parses the request head at the start of `buf` (`None`: incomplete), and writes the head the
/// proxy forwards upstream into `out` (cleared first), without its final blank line (see
/// [`finish_request_head`]).
///
/// Absolute-form targets become origin-form with the authority in `Host`; the version
/// becomes `HTTP/1.1`.
///
/// # Errors
///
/// [`CodecError::TooLarge`] past `max` bytes or [`MAX_HEADERS`] end-to-end fields,
/// [`CodecError::Malformed`] for a bad head or ambiguous framing.
pub(crate) fn parse_request(
    buf: &[u8],
    max: usize,
    out: &mut Vec<u8>,
) -> Result<Option<RequestHead>, CodecError> {
    // Left uninitialized: httparse writes only the fields it finds.
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; FIELD_SLOTS];
    let mut request = httparse::Request::new(&mut []);
    // Only the first `max` bytes are parsed, so the verdict on a head that does not fit is
    // 431 however its bytes arrived, never 400 for something past the limit that one large
    // read happened to bring in (the `detect` fuzz target found that).
    let len = match request.parse_with_uninit_headers(within(buf, max), &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max => {
            return Err(CodecError::TooLarge(max));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(CodecError::TooLarge(max)),
        Err(err) => return Err(err.into()),
    };
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return Err(CodecError::Malformed("incomplete request line"));
    };
    let headers = &*request.headers;
    let http10 = version == 0;

    let mut connection = ConnectionField::default();
    let mut content_length = None;
    let mut chunked_fields = 0usize;
    let mut host: Option<&[u8]> = None;
    let mut upgrade_field = false;
    let mut grpc = false;
    let mut grpc_timeout = None;
    for field in headers {
        let name = field.name;
        match name.len() {
            12 if name.eq_ignore_ascii_case("grpc-timeout") => {
                grpc_timeout = Some(offset(buf, field.value));
            }
            4 if name.eq_ignore_ascii_case("host") => {
                if host.is_some() {
                    return Err(CodecError::Malformed("more than one host field"));
                }
                host = Some(field.value);
            }
            7 if name.eq_ignore_ascii_case("upgrade") => upgrade_field = true,
            10 if name.eq_ignore_ascii_case("connection") => connection.add(field.value),
            12 if name.eq_ignore_ascii_case("content-type") => grpc = is_grpc(field.value),
            14 if name.eq_ignore_ascii_case("content-length") => {
                add_content_length(&mut content_length, field.value)?;
            }
            17 if name.eq_ignore_ascii_case("transfer-encoding") => chunked_fields += 1,
            _ => {}
        }
    }
    let body = if chunked_fields > 0 {
        if content_length.is_some() {
            return Err(CodecError::Malformed(
                "both content-length and transfer-encoding",
            ));
        }
        let mut values = headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
            .map(|h| h.value);
        if http10 {
            return Err(CodecError::Malformed(
                "transfer-encoding in an HTTP/1.0 request",
            ));
        }
        transfer_encoding_only_chunked(&mut values)?;
        Framing::Chunked
    } else {
        match content_length {
            Some(0) | None => Framing::Empty,
            Some(n) => Framing::Length(n),
        }
    };

    let connect = method == "CONNECT";
    let bytes = target.as_bytes();
    // The target's forms (RFC 9112 §3.2): origin, absolute, authority (CONNECT), asterisk.
    let (path, uri_authority): (&[u8], Option<&[u8]>) = if connect {
        if !valid_authority(bytes) {
            return Err(CodecError::Malformed("invalid CONNECT target"));
        }
        (bytes, Some(bytes))
    } else if bytes.first() == Some(&b'/') || bytes == b"*" {
        (bytes, None)
    } else {
        let rest = strip_scheme(bytes).ok_or(CodecError::Malformed("invalid request target"))?;
        let end = rest
            .iter()
            .position(|b| matches!(b, b'/' | b'?'))
            .unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if !valid_authority(authority) || authority.contains(&b'@') {
            return Err(CodecError::Malformed("invalid request target authority"));
        }
        (path, Some(authority))
    };
    if !http10 && host.is_none() && uri_authority.is_none() {
        return Err(CodecError::Malformed("missing host field"));
    }
    let authority = match (uri_authority, host) {
        (Some(authority), _) => Some(offset(buf, authority)),
        (None, Some(host)) if valid_authority(host) => Some(offset(buf, host)),
        (None, Some(_)) => return Err(CodecError::Malformed("invalid host field")),
        (None, None) => None,
    };

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    match path {
        [] => out.push(b'/'),
        [b'?', ..] => {
            out.push(b'/');
            out.extend_from_slice(path);
        }
        _ => out.extend_from_slice(path),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // End-to-end fields forwarded (`host` included), held to `MAX_HEADERS`.
    let mut kept = 0usize;
    if let Some(authority) = uri_authority.filter(|_| !connect) {
        push_field(out, "host", authority);
        kept += 1;
    }
    let upgrade = connection.upgrade && upgrade_field;
    let mut te_trailers = false;
    for field in headers {
        let name = field.name;
        if is_hop_by_hop(name) {
            if name.eq_ignore_ascii_case("te") {
                te_trailers |= tokens(field.value).any(|t| t.eq_ignore_ascii_case(b"trailers"));
            } else if upgrade && name.eq_ignore_ascii_case("upgrade") {
                push_field(out, "upgrade", field.value);
            }
            continue;
        }
        if (uri_authority.is_some() && !connect && name.eq_ignore_ascii_case("host"))
            || name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("grpc-timeout")
            || (connection.named && named_by_connection(headers, name))
        {
            continue;
        }
        kept += 1;
        push_field(out, name, field.value);
    }
    if kept > MAX_HEADERS {
        return Err(CodecError::TooLarge(max));
    }
    if te_trailers {
        out.extend_from_slice(b"te: trailers\r\n");
    }
    if host.is_none() && uri_authority.is_none() {
        // An HTTP/1.0 request without a target authority: HTTP/1.1 needs the field, empty
        // (RFC 9112 §3.2).
        out.extend_from_slice(b"host: \r\n");
    }
    // HTTP/1.0 persists only when asked (`Connection: keep-alive`, RFC 9112 §9.3).
    let keep_alive = !connection.close && (!http10 || connection.keep_alive);
    let safe = matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE");
    let route_path = path
        .iter()
        .position(|b| *b == b'?')
        .map_or(path, |query| &path[..query]);
    // The fields start at the first field's name (httparse accepted the head, so the request
    // line ends just before it); a head without fields has none to look at.
    let fields = headers
        .first()
        .map_or(len, |field| offset(buf, field.name.as_bytes()).start);
    Ok(Some(RequestHead {
        len,
        authority,
        body,
        content_length,
        http10,
        keep_alive,
        upgrade,
        connect,
        head: method == "HEAD",
        safe,
        grpc,
        method: offset(buf, method.as_bytes()),
        path: offset(buf, route_path),
        fields,
        grpc_timeout,
    }))
}

fn strip_scheme(target: &[u8]) -> Option<&[u8]> {
    for scheme in [&b"http://"[..], b"https://"] {
        if target.len() > scheme.len() && target[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return Some(&target[scheme.len()..]);
        }
    }
    None
}

/// Ends a forwarded request head: `grpc-timeout` (the exchange's value), framing and upgrade
/// fields, then the blank line.
pub(crate) fn finish_request_head(
    out: &mut Vec<u8>,
    head: &RequestHead,
    grpc_timeout: Option<&[u8]>,
) {
    if let Some(value) = grpc_timeout {
        push_field(out, "grpc-timeout", value);
    }
    if head.body == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    } else if let Some(n) = head.content_length {
        out.extend_from_slice(b"content-length: ");
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut n = n;
        loop {
            i -= 1;
            digits[i] = b'0' + u8::try_from(n % 10).unwrap_or(0);
            n /= 10;
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(&digits[i..]);
        out.extend_from_slice(b"\r\n");
    }
    if head.upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How the proxy frames a response body for its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// The body's bytes as they are (a length, or until close).
    Identity,
    /// Chunked: the upstream's chunked or close-delimited body to an HTTP/1.1 client.
    Chunked,
}

/// Parses the response head at the start of `buf` (`None`: incomplete) answering `request`,
/// and writes the head the proxy forwards to its client into `out` (appended), without its
/// final blank line (see [`finish_response_head`]).
///
/// # Errors
///
/// [`CodecError::TooLarge`] past `max` bytes or [`MAX_HEADERS`] end-to-end fields,
/// [`CodecError::Malformed`] otherwise.
pub(crate) fn parse_response(
    buf: &[u8],
    max: usize,
    request: &RequestHead,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, CodecError> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; FIELD_SLOTS];
    let mut response = httparse::Response::new(&mut []);
    // Only the first `max` bytes, as for requests.
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        within(buf, max),
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max => {
            return Err(CodecError::TooLarge(max));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(CodecError::TooLarge(max)),
        Err(err) => return Err(err.into()),
    };
    let (Some(status), Some(version)) = (response.code, response.version) else {
        return Err(CodecError::Malformed("incomplete status line"));
    };
    if !(100..=999).contains(&status) {
        return Err(CodecError::Malformed("invalid status code"));
    }
    let headers = &*response.headers;
    let mut connection = ConnectionField::default();
    let mut content_length = None;
    let mut chunked_fields = 0usize;
    let mut grpc = false;
    let mut grpc_status = None;
    for field in headers {
        let name = field.name;
        match name.len() {
            10 if name.eq_ignore_ascii_case("connection") => connection.add(field.value),
            11 if name.eq_ignore_ascii_case("grpc-status") => {
                grpc_status = Some(offset(buf, field.value));
            }
            12 if name.eq_ignore_ascii_case("content-type") => grpc = is_grpc(field.value),
            14 if name.eq_ignore_ascii_case("content-length") => {
                add_content_length(&mut content_length, field.value)?;
            }
            17 if name.eq_ignore_ascii_case("transfer-encoding") => chunked_fields += 1,
            _ => {}
        }
    }
    let interim = (100..200).contains(&status);
    let mut codings = None;
    let tunnel =
        (request.connect && (200..300).contains(&status)) || (request.upgrade && status == 101);
    let mut reusable = version == 1 && !connection.close;
    let body = if interim || tunnel || request.head || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked_fields > 0 {
        if content_length.is_some() {
            // RFC 9112 §6.3: chunked wins, and the connection must not be reused.
            reusable = false;
        }
        let chunked;
        (chunked, codings) = response_codings(headers);
        if chunked {
            Framing::Chunked
        } else if codings
            .as_deref()
            .is_some_and(|c| tokens(c.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"chunked")))
        {
            // The proxy re-chunks a body read until close, naming the codings it kept: a
            // `chunked` applied twice (RFC 9112 §6.1 forbids it) or before another coding would
            // be named twice, and the client could not read the body it gets.
            return Err(CodecError::Malformed("chunked applied twice or not last"));
        } else {
            reusable = false;
            Framing::Close
        }
    } else if let Some(n) = content_length {
        if n == 0 {
            Framing::Empty
        } else {
            Framing::Length(n)
        }
    } else {
        reusable = false;
        Framing::Close
    };
    if status == 101 && !request.upgrade {
        return Err(CodecError::Malformed("101 without an upgrade request"));
    }

    out.extend_from_slice(b"HTTP/1.1 ");
    push_status(out, status);
    out.push(b' ');
    out.extend_from_slice(response.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let reframed = body == Framing::Chunked || body == Framing::Close;
    // End-to-end fields forwarded, held to `MAX_HEADERS`.
    let mut kept = 0usize;
    for field in headers {
        let name = field.name;
        if is_hop_by_hop(name) {
            if tunnel && status == 101 && name.eq_ignore_ascii_case("upgrade") {
                push_field(out, "upgrade", field.value);
            }
            continue;
        }
        if (reframed && name.eq_ignore_ascii_case("content-length"))
            || (connection.named && named_by_connection(headers, name))
        {
            continue;
        }
        kept += 1;
        push_field(out, name, field.value);
    }
    if kept > MAX_HEADERS {
        return Err(CodecError::TooLarge(max));
    }
    Ok(Some(ResponseHead {
        len,
        status,
        body,
        reusable,
        grpc,
        codings,
        grpc_status,
    }))
}

/// Writes a three-digit status code.
fn push_status(out: &mut Vec<u8>, status: u16) {
    let digit = |n: u16| b'0' + u8::try_from(n % 10).unwrap_or(0);
    out.extend_from_slice(&[digit(status / 100), digit(status / 10), digit(status)]);
}

/// What the response says about the client connection's future.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Persistence {
    /// HTTP/1.1's default: it stays open (nothing to say).
    KeepAlive,
    /// An HTTP/1.0 client asked to keep it open: say so (`connection: keep-alive`).
    KeepAlive10,
    /// It closes after this response (`connection: close`).
    Close,
}

impl Persistence {
    /// For a request from an `http10` client, closing or not.
    pub(crate) fn new(close: bool, http10: bool) -> Self {
        match (close, http10) {
            (true, _) => Self::Close,
            (false, true) => Self::KeepAlive10,
            (false, false) => Self::KeepAlive,
        }
    }

    /// The `connection` field's value this calls for, if any.
    pub(crate) fn field(self) -> Option<&'static str> {
        match self {
            Self::KeepAlive => None,
            Self::KeepAlive10 => Some("keep-alive"),
            Self::Close => Some("close"),
        }
    }

    /// Writes the `connection` field this calls for.
    pub(crate) fn write(self, out: &mut Vec<u8>) {
        if let Some(value) = self.field() {
            out.extend_from_slice(b"connection: ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Ends a forwarded response head: framing, then `connection: close` when the proxy closes
/// the client's connection after this response, then the blank line.
pub(crate) fn finish_response_head(
    out: &mut Vec<u8>,
    encoding: Encoding,
    codings: Option<&str>,
    persistence: Persistence,
    upgrade: bool,
) {
    if encoding == Encoding::Chunked {
        out.extend_from_slice(b"transfer-encoding: ");
        if let Some(codings) = codings {
            out.extend_from_slice(codings.as_bytes());
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(b"chunked\r\n");
    }
    if upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    } else {
        persistence.write(out);
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes one chunk's size line.
pub(crate) fn encode_chunk_size(out: &mut Vec<u8>, len: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut n = len;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// Writes the last chunk with `trailers` (raw field lines, each ending in CRLF).
pub(crate) fn encode_last_chunk(out: &mut Vec<u8>, trailers: &[u8]) {
    out.extend_from_slice(b"0\r\n");
    out.extend_from_slice(trailers);
    out.extend_from_slice(b"\r\n");
}

/// What [`ChunkedDecoder::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// This range of the input is body data.
    Data(Range<usize>),
    /// The input is used up; more is needed.
    More,
    /// The body ended (trailers, if any, are in [`ChunkedDecoder::trailers`]).
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    /// Hex digits of a chunk size (`digits` so far).
    Size { size: u64, digits: u8 },
    /// After a chunk size: whitespace, then `;` or the line's CR.
    AfterSize { size: u64 },
    /// Chunk extensions, up to the line's CR.
    Extension { size: u64 },
    /// The LF ending a size line.
    SizeLf { size: u64 },
    /// Chunk data.
    Data { left: u64 },
    /// The CR after chunk data.
    DataCr,
    /// The LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or the final blank line).
    TrailerLine,
    /// Inside a trailer line.
    Trailer,
    /// The LF ending a trailer line.
    TrailerLf { blank: bool },
    /// Finished.
    Done,
}

/// A chunked body decoder (RFC 9112 §7.1) that reports data as ranges of its input, so bodies
/// move without copies through it.
#[derive(Debug)]
pub(crate) struct ChunkedDecoder {
    state: ChunkState,
    line: usize,
    trailers: Vec<u8>,
    max_trailers: usize,
}

impl ChunkedDecoder {
    /// A decoder accepting at most `max_trailers` bytes of trailer fields.
    pub(crate) fn new(max_trailers: usize) -> Self {
        Self {
            state: ChunkState::Size { size: 0, digits: 0 },
            line: 0,
            trailers: Vec::new(),
            max_trailers,
        }
    }

    /// The trailer section's field lines (each ending in CRLF), once done.
    pub(crate) fn trailers(&self) -> &[u8] {
        &self.trailers
    }

    /// Consumes framing from the start of `input` until it finds data, needs more, or ends.
    /// Returns how many bytes were consumed (data included) and what was found.
    ///
    /// # Errors
    ///
    /// [`CodecError::Malformed`] for invalid framing, [`CodecError::TooLarge`] for a chunk
    /// line or trailers past their limits.
    pub(crate) fn decode(&mut self, input: &[u8]) -> Result<(usize, Decoded), CodecError> {
        let mut i = 0;
        while i < input.len() {
            let byte = input[i];
            match self.state {
                ChunkState::Data { left } => {
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(input.len() - i);
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data { left }
                    };
                    return Ok((i + take, Decoded::Data(i..i + take)));
                }
                ChunkState::Size { size, digits } => match hex(byte) {
                    Some(d) => {
                        if digits >= 16 {
                            return Err(CodecError::Malformed("chunk size too large"));
                        }
                        self.state = ChunkState::Size {
                            size: size << 4 | u64::from(d),
                            digits: digits + 1,
                        };
                    }
                    None if digits == 0 => {
                        return Err(CodecError::Malformed("invalid chunk size"));
                    }
                    None => {
                        self.state = ChunkState::AfterSize { size };
                        self.line = 0;
                        continue;
                    }
                },
                ChunkState::AfterSize { size } => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err(CodecError::TooLarge(MAX_CHUNK_LINE));
                    }
                    // Only whitespace, then an extension or the line's end: `0x10` or `4 junk`
                    // are not sizes another parser could read differently.
                    match byte {
                        b'\r' => self.state = ChunkState::SizeLf { size },
                        b'\t' | b' ' => {}
                        b';' => self.state = ChunkState::Extension { size },
                        _ => return Err(CodecError::Malformed("invalid chunk size")),
                    }
                }
                ChunkState::Extension { size } => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err(CodecError::TooLarge(MAX_CHUNK_LINE));
                    }
                    match byte {
                        b'\r' => self.state = ChunkState::SizeLf { size },
                        // `;name=value` pairs: skipped, never forwarded.
                        b'\t' | b' ' => {}
                        b if b.is_ascii_graphic() => {}
                        _ => return Err(CodecError::Malformed("invalid chunk extension")),
                    }
                }
                ChunkState::SizeLf { size } => {
                    if byte != b'\n' {
                        return Err(CodecError::Malformed("invalid chunk size line"));
                    }
                    self.state = if size == 0 {
                        ChunkState::TrailerLine
                    } else {
                        ChunkState::Data { left: size }
                    };
                }
                ChunkState::DataCr => {
                    if byte != b'\r' {
                        return Err(CodecError::Malformed("chunk data longer than its size"));
                    }
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if byte != b'\n' {
                        return Err(CodecError::Malformed("invalid chunk ending"));
                    }
                    self.state = ChunkState::Size { size: 0, digits: 0 };
                }
                ChunkState::TrailerLine => {
                    if byte == b'\r' {
                        self.state = ChunkState::TrailerLf { blank: true };
                    } else {
                        self.state = ChunkState::Trailer;
                        continue;
                    }
                }
                ChunkState::Trailer => {
                    if byte == b'\r' {
                        self.state = ChunkState::TrailerLf { blank: false };
                    } else if byte == b'\n' {
                        return Err(CodecError::Malformed("bare LF in trailers"));
                    } else {
                        self.push_trailer(byte)?;
                    }
                }
                ChunkState::TrailerLf { blank } => {
                    if byte != b'\n' {
                        return Err(CodecError::Malformed("invalid trailer line ending"));
                    }
                    if blank {
                        self.state = ChunkState::Done;
                        self.check_trailers()?;
                        return Ok((i + 1, Decoded::Done));
                    }
                    self.push_trailer(b'\r')?;
                    self.push_trailer(b'\n')?;
                    self.state = ChunkState::TrailerLine;
                }
                ChunkState::Done => return Ok((i, Decoded::Done)),
            }
            i += 1;
        }
        if self.state == ChunkState::Done {
            return Ok((i, Decoded::Done));
        }
        Ok((i, Decoded::More))
    }

    fn push_trailer(&mut self, byte: u8) -> Result<(), CodecError> {
        if self.trailers.len() >= self.max_trailers {
            return Err(CodecError::TooLarge(self.max_trailers));
        }
        self.trailers.push(byte);
        Ok(())
    }

    /// Trailers must be valid field lines; fields that frame, route or are hop-by-hop have no
    /// place in them (RFC 9110 §6.5.1) and are dropped rather than forwarded.
    fn check_trailers(&mut self) -> Result<(), CodecError> {
        if self.trailers.is_empty() {
            return Ok(());
        }
        let mut block = Vec::with_capacity(self.trailers.len() + 2);
        block.extend_from_slice(&self.trailers);
        block.extend_from_slice(b"\r\n");
        let mut fields = [httparse::EMPTY_HEADER; FIELD_SLOTS];
        match httparse::parse_headers(&block, &mut fields) {
            Ok(httparse::Status::Complete((_, fields))) => {
                let mut kept = Vec::with_capacity(self.trailers.len());
                for field in fields {
                    let forbidden = is_hop_by_hop(field.name)
                        || ["content-length", "host", "trailer"]
                            .iter()
                            .any(|n| field.name.eq_ignore_ascii_case(n));
                    if !forbidden {
                        push_field(&mut kept, field.name, field.value);
                    }
                }
                self.trailers = kept;
                Ok(())
            }
            Ok(httparse::Status::Partial) => Err(CodecError::Malformed("invalid trailers")),
            Err(err) => Err(err.into()),
        }
    }

    /// The trailer fields as a header map (for classifying a gRPC response's end).
    pub(crate) fn trailer_map(&self) -> Option<http::HeaderMap> {
        if self.trailers.is_empty() {
            return None;
        }
        let mut block = self.trailers.clone();
        block.extend_from_slice(b"\r\n");
        let mut fields = [httparse::EMPTY_HEADER; FIELD_SLOTS];
        httparse::parse_headers(&block, &mut fields).ok()?;
        let mut map = http::HeaderMap::new();
        for field in fields.iter().take_while(|f| !f.name.is_empty()) {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(field.name.as_bytes()),
                http::HeaderValue::from_bytes(field.value),
            ) {
                map.append(name, value);
            }
        }
        Some(map)
    }
}

fn hex(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
