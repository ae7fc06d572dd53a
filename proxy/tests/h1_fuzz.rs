//! Property tests of the HTTP/1 engine over real loopback sockets.
//!
//! `keep_alive_sequences_are_echoed_exactly`: random sequences of HTTP/1.1 requests (methods,
//! targets, extra and hop-by-hop fields, content-length and chunked bodies) on one kept-alive
//! connection, written in random pieces and pipelined to a random depth, reach a hyper echo
//! backend and come back in order, exactly, read by a minimal response parser of our own in
//! random-sized reads.
//!
//! `junk_never_panics_or_hangs_the_proxy`: random bytes and mutated valid requests never panic
//! the proxy, never leave a half-closed connection hanging, and leave it serving fresh
//! connections.
//!
//! One proxy and one backend per test, on one runtime built here; every case is bounded by a
//! timeout. `PROPTEST_CASES` raises the number of cases for a longer run.

mod support;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Mutex, Once};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use support::{TestBody, TestProxy, backend, config, full, mesh};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const ERROR_HEADER: &str = "conduit-proxy-error";
const AUTHORITY: &str = "web.test";
/// A hang, not a slow machine: a case normally takes milliseconds.
const CASE_TIMEOUT: Duration = Duration::from_secs(15);
/// Bytes a body embeds to look like the end of a chunked body and a second request.
const SMUGGLE: &[u8] =
    b"\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: web.test\r\nContent-Length: 5\r\n\r\n";

// ---------------------------------------------------------------------------------------------
// Panics on the runtime's threads (the proxy's and the backend's tasks).

static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static HOOK: Once = Once::new();

/// Records panics on threads whose name starts with `h1-fuzz` (each test names its runtime's
/// threads), then reports them as the default hook does.
fn watch_panics() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            if let Some(name) = thread.name().filter(|n| n.starts_with("h1-fuzz"))
                && let Ok(mut panics) = PANICS.lock()
            {
                panics.push(format!("{name}: {info}"));
            }
            previous(info);
        }));
    });
}

fn panics_on(threads: &str) -> Vec<String> {
    PANICS
        .lock()
        .map(|p| {
            p.iter()
                .filter(|p| p.starts_with(threads))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

fn runtime(threads: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(threads)
        .enable_all()
        .build()
        .expect("runtime")
}

fn runner(default_cases: u32) -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    TestRunner::new(Config {
        cases,
        max_shrink_iters: 512,
        // Only this file is ours to write: no regression files next to it.
        failure_persistence: None,
        ..Config::default()
    })
}

/// A small deterministic generator for what a case derives from a seed (body bytes, field
/// order, casing), so shrinking works on the seed and the lengths.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        let n = u64::try_from(n.max(1)).expect("usize fits u64");
        usize::try_from(self.next() % n).expect("below a usize")
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.next().is_multiple_of(one_in)
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }

    /// `name` with its letters' case scrambled.
    fn casing(&mut self, name: &str) -> String {
        name.chars()
            .map(|c| {
                if self.chance(2) {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The backend: echoes what it received.

/// Answers `method path\n` + the request body, with the field named by `x-echo-name` echoed
/// in `x-echo`, the hop-by-hop fields it saw in `x-hop-seen`, the number of extra fields
/// (names ending in `-f<digits>`) in `x-fields`, and `Host` in `x-host`. `x-reply-mode`
/// picks the response framing: `length`, `chunked-<frames>`, or `close` (a length and
/// `connection: close`).
async fn echo(req: Request<Incoming>) -> Response<TestBody> {
    let (parts, body) = req.into_parts();
    let Ok(body) = body
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
    else {
        return status(StatusCode::INTERNAL_SERVER_ERROR, "request body failed");
    };
    let target = parts.uri.path_and_query().map_or("", |p| p.as_str());
    let mut out = format!("{} {target}\n", parts.method).into_bytes();
    out.extend_from_slice(&body);

    let mut hop = Vec::new();
    let mut fields = 0usize;
    for (name, value) in &parts.headers {
        let name = name.as_str();
        let hop_by_hop = matches!(
            name,
            "connection" | "keep-alive" | "proxy-connection" | "upgrade"
        ) || name.starts_with("x-secret")
            || (name == "te" && value.as_bytes() != b"trailers");
        if hop_by_hop {
            hop.push(name.to_owned());
        }
        if name
            .rsplit_once("-f")
            .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            fields += 1;
        }
    }
    let hop = if hop.is_empty() {
        "none".to_owned()
    } else {
        hop.join(",")
    };
    let mut headers = vec![
        (HeaderName::from_static("x-hop-seen"), hop_value(&hop)),
        (
            HeaderName::from_static("x-fields"),
            HeaderValue::from(fields),
        ),
    ];
    if let Some(host) = parts.headers.get(http::header::HOST) {
        headers.push((HeaderName::from_static("x-host"), host.clone()));
    }
    if let Some(name) = parts
        .headers
        .get("x-echo-name")
        .and_then(|v| HeaderName::from_bytes(v.as_bytes()).ok())
    {
        match parts.headers.get(&name) {
            Some(value) => headers.push((HeaderName::from_static("x-echo"), value.clone())),
            None => headers.push((
                HeaderName::from_static("x-echo-missing"),
                HeaderValue::from_static("1"),
            )),
        }
    }
    let mode = parts
        .headers
        .get("x-reply-mode")
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default();
    let mut response = if let Some(frames) = mode.strip_prefix(b"chunked-") {
        let frames = std::str::from_utf8(frames)
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(1)
            .max(1);
        let size = out.len().div_ceil(frames).max(1);
        let out = Bytes::from(out);
        let pieces: Vec<_> = (0..out.len())
            .step_by(size)
            .map(|at| {
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(
                    out.slice(at..(at + size).min(out.len())),
                ))
            })
            .collect();
        Response::new(StreamBody::new(futures_util::stream::iter(pieces)).boxed())
    } else {
        Response::new(full(out))
    };
    if mode == b"close" {
        headers.push((http::header::CONNECTION, HeaderValue::from_static("close")));
    }
    response.headers_mut().extend(headers);
    response
}

fn hop_value(hop: &str) -> HeaderValue {
    HeaderValue::from_str(hop).unwrap_or(HeaderValue::from_static("unprintable"))
}

fn status(code: StatusCode, body: &'static str) -> Response<TestBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = code;
    response
}

/// The echo backend, and a proxy routing `web.test` (outbound) and the local app (inbound) to
/// it.
async fn start() -> (TestProxy, SocketAddr, SocketAddr) {
    let app = backend(false, echo).await;
    let mut config = config();
    config.app_addr = Some(app);
    let proxy = TestProxy::start(config, mesh(&[(AUTHORITY, &[app])])).await;
    let outbound = proxy.addrs.outbound;
    let inbound = proxy.addrs.inbound.expect("an inbound listener");
    (proxy, outbound, inbound)
}

// ---------------------------------------------------------------------------------------------
// Requests.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Get,
    Post,
    Put,
    Delete,
    Head,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
            Self::Head => "HEAD",
        }
    }

    fn takes_body(self) -> bool {
        matches!(self, Self::Post | Self::Put)
    }
}

#[derive(Clone, Debug)]
enum BodyFraming {
    /// No framing field (a body-less request).
    Bare,
    /// `Content-Length` (0 on methods without a body).
    Length,
    /// The same `Content-Length` twice: two fields, or a list in one (RFC 9110 §8.6).
    LengthTwice { list: bool },
    /// `Transfer-Encoding: chunked` (methods with a body only; `Bare` otherwise).
    Chunked {
        /// Where chunks end.
        cuts: Vec<Index>,
        /// Chunk extensions on some size lines.
        extensions: bool,
        /// Upper-case hex digits.
        upper: bool,
        /// Leading zeros on size lines.
        padded: bool,
        /// A trailer field.
        trailer: bool,
    },
}

#[derive(Clone, Copy, Debug)]
enum Reply {
    Length,
    Chunked(u8),
    Close,
}

/// Hop-by-hop fields the backend must never see.
#[derive(Clone, Debug)]
struct Hop {
    /// `X-Secret-<n>` fields, named in `Connection`.
    secrets: u8,
    /// `keep-alive` in `Connection` too.
    keep_alive_token: bool,
    /// The `Connection` tokens in two fields.
    split_connection: bool,
    keep_alive: bool,
    proxy_connection: bool,
    /// `TE`: `trailers` is forwarded, other codings are not.
    te: Option<&'static str>,
    /// `Upgrade` without `Connection: upgrade`: not a switch, a hop-by-hop field.
    upgrade: bool,
    /// `Connection` names `Content-Length`, `Host` and `Transfer-Encoding`, which frame and
    /// route the message: they must not be dropped as hop-by-hop.
    names_framing: bool,
    /// `Connection` names one of the extra fields: it must not reach the backend.
    names_extra: Option<Index>,
}

#[derive(Clone, Debug)]
struct Req {
    method: Method,
    /// Origin-form: path and query.
    path: String,
    /// Sent in absolute-form.
    absolute: bool,
    /// `web.test:80` rather than `web.test`.
    port: bool,
    /// The host name's letters in mixed case, and a trailing dot (the same name).
    host_case: bool,
    host_dot: bool,
    /// Extra fields (unique names ending in `-f<i>`).
    extras: Vec<(String, String)>,
    /// Which extra the backend echoes.
    echo: Option<Index>,
    body_len: usize,
    body_seed: u64,
    /// Where the body embeds [`SMUGGLE`].
    smuggle: Option<Index>,
    framing: BodyFraming,
    reply: Reply,
    hop: Hop,
    expect_continue: bool,
    /// Field order and casing.
    seed: u64,
    /// Write boundaries inside the request, and inside its head.
    cuts: Vec<Index>,
    head_cuts: Vec<Index>,
    /// A write boundary at each of the head's last four bytes.
    trickle_end_of_head: bool,
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::Get),
        Just(Method::Post),
        Just(Method::Put),
        Just(Method::Delete),
        Just(Method::Head),
    ]
}

fn path() -> impl Strategy<Value = String> {
    "(/([A-Za-z0-9._~!$&'()*+,;=:@-]{0,12}|%[0-9A-F]{2})){1,4}(\\?[A-Za-z0-9._~!$&'()*+,;=:@/?-]{0,16})?"
}

fn extras() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}";
    let value = prop_oneof![
        3 => Just(String::new()),
        6 => "[!-~]{1,8}",
        6 => "[!-~][ !-~]{0,30}[!-~]",
        // Long values: heads of tens of KiB, read in many pieces.
        1 => "[!-~]{1000,4000}",
    ];
    prop::collection::vec((name, value), 0..=8).prop_map(|fields| {
        fields
            .into_iter()
            .enumerate()
            .map(|(i, (name, value))| (format!("{name}-f{i}"), value))
            .collect()
    })
}

fn body_len(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![0..=16usize, 0..=1024usize, 0..=max]
}

fn framing() -> impl Strategy<Value = BodyFraming> {
    prop_oneof![
        1 => Just(BodyFraming::Bare),
        3 => Just(BodyFraming::Length),
        1 => any::<bool>().prop_map(|list| BodyFraming::LengthTwice { list }),
        3 => (
            prop::collection::vec(any::<Index>(), 0..8),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(cuts, extensions, upper, padded, trailer)| BodyFraming::Chunked {
                cuts,
                extensions,
                upper,
                padded,
                trailer,
            }),
    ]
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        Just(Reply::Length),
        (1u8..=5).prop_map(Reply::Chunked),
        Just(Reply::Close),
    ]
}

fn hop() -> impl Strategy<Value = Hop> {
    (
        0u8..=3,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(prop::sample::select(vec![
            "trailers",
            "gzip",
            "trailers, deflate",
        ])),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.2),
        prop::option::weighted(0.2, any::<Index>()),
    )
        .prop_map(
            |(
                secrets,
                keep_alive_token,
                split_connection,
                keep_alive,
                proxy_connection,
                te,
                upgrade,
                names_framing,
                names_extra,
            )| {
                Hop {
                    secrets,
                    keep_alive_token,
                    split_connection,
                    keep_alive,
                    proxy_connection,
                    te,
                    upgrade,
                    names_framing,
                    names_extra,
                }
            },
        )
}

fn cuts(max: usize) -> impl Strategy<Value = Vec<Index>> {
    prop::collection::vec(any::<Index>(), 0..=max)
}

fn request(max_body: usize) -> impl Strategy<Value = Req> {
    (
        (
            method(),
            path(),
            any::<bool>(),
            (any::<bool>(), any::<bool>(), any::<bool>()),
            extras(),
        ),
        (
            prop::option::of(any::<Index>()),
            body_len(max_body),
            any::<u64>(),
            prop::option::weighted(0.2, any::<Index>()),
            framing(),
        ),
        (
            reply(),
            hop(),
            prop::bool::weighted(0.15),
            any::<u64>(),
            cuts(6),
            cuts(4),
            prop::bool::weighted(0.2),
        ),
    )
        .prop_map(
            |(
                (method, path, absolute, (port, host_case, host_dot), extras),
                (echo, body_len, body_seed, smuggle, framing),
                (reply, hop, expect_continue, seed, cuts, head_cuts, trickle_end_of_head),
            )| Req {
                method,
                path,
                absolute,
                port,
                host_case,
                host_dot,
                extras,
                echo,
                body_len,
                body_seed,
                smuggle,
                framing,
                reply,
                hop,
                expect_continue,
                seed,
                cuts,
                head_cuts,
                trickle_end_of_head,
            },
        )
}

/// What the client expects back for one request.
#[derive(Debug)]
struct Expected {
    head_request: bool,
    /// The response body (none for `HEAD`).
    body: Vec<u8>,
    /// The echoed extra field's value (`Some(None)`: the field must not reach the backend).
    echo: Option<Option<String>>,
    fields: usize,
    host: String,
    /// The request asked for the connection to close.
    close: bool,
    /// `100 Continue` may come first.
    interim_ok: bool,
}

/// A request's bytes.
#[derive(Debug)]
struct Encoded {
    bytes: Vec<u8>,
    head_len: usize,
    /// Where lengths are written (content-length digits, chunk-size hex digits), for the
    /// mutations of the junk test.
    lengths: Vec<(Range<usize>, bool)>,
    expected: Expected,
}

fn body_bytes(req: &Req) -> Vec<u8> {
    let mut rng = Rng::new(req.body_seed);
    let mut body: Vec<u8> = (0..req.body_len)
        .map(|_| rng.next().to_le_bytes()[3])
        .collect();
    if let Some(at) = &req.smuggle {
        let at = at.index(body.len() + 1);
        body.splice(at..at, SMUGGLE.iter().copied());
    }
    body
}

fn hex(n: usize, upper: bool) -> String {
    if upper {
        format!("{n:X}")
    } else {
        format!("{n:x}")
    }
}

/// The request's bytes; `close` adds `Connection: close`.
fn encode(req: &Req, close: bool) -> Encoded {
    let mut rng = Rng::new(req.seed);
    let mut host = if req.host_case {
        rng.casing(AUTHORITY)
    } else {
        AUTHORITY.to_owned()
    };
    if req.host_dot {
        host.push('.');
    }
    if req.port {
        host.push_str(":80");
    }
    let target = if req.absolute {
        format!("{}://{host}{}", rng.casing("http"), req.path)
    } else {
        req.path.clone()
    };
    let body_allowed = req.method.takes_body();
    let framing = match (&req.framing, body_allowed) {
        (BodyFraming::Chunked { .. }, false) => &BodyFraming::Bare,
        (framing, _) => framing,
    };
    let body = match framing {
        BodyFraming::Bare => Vec::new(),
        _ if !body_allowed => Vec::new(),
        _ => body_bytes(req),
    };

    // (field line, whether its value is a length)
    let mut fields: Vec<(String, bool)> = vec![
        (format!("{}: {host}", rng.casing("host")), false),
        (
            format!(
                "X-Reply-Mode: {}",
                match req.reply {
                    Reply::Length => "length".to_owned(),
                    Reply::Chunked(n) => format!("chunked-{n}"),
                    Reply::Close => "close".to_owned(),
                }
            ),
            false,
        ),
    ];
    let echoed = req
        .echo
        .as_ref()
        .filter(|_| !req.extras.is_empty())
        .map(|i| i.index(req.extras.len()));
    let echo = echoed.map(|i| &req.extras[i]);
    if let Some((name, _)) = echo {
        fields.push((format!("x-echo-name: {name}"), false));
    }
    for (name, value) in &req.extras {
        // Optional whitespace around the value is not part of it.
        let ows = |rng: &mut Rng| [" ", "", "\t", " \t "][rng.below(4)];
        let (before, after) = (ows(&mut rng), ows(&mut rng));
        fields.push((format!("{name}:{before}{value}{after}"), false));
    }
    let mut tokens = Vec::new();
    for n in 0..req.hop.secrets {
        tokens.push(format!("x-secret-{n}"));
        fields.push((
            format!("{}: {n}", rng.casing(&format!("x-secret-{n}"))),
            false,
        ));
    }
    if req.hop.keep_alive_token {
        tokens.push(rng.casing("keep-alive"));
    }
    if req.hop.names_framing {
        tokens.extend(["Content-Length", "Host", "transfer-encoding"].map(str::to_owned));
    }
    let named = req
        .hop
        .names_extra
        .as_ref()
        .filter(|_| !req.extras.is_empty())
        .map(|i| i.index(req.extras.len()));
    if let Some(named) = named {
        tokens.push(rng.casing(&req.extras[named].0));
    }
    if close {
        tokens.push(rng.casing("close"));
    }
    if !tokens.is_empty() {
        if req.hop.split_connection && tokens.len() > 1 {
            let rest = tokens.split_off(tokens.len() / 2);
            fields.push((format!("Connection: {}", rest.join(", ")), false));
        }
        fields.push((
            format!("{}: {}", rng.casing("connection"), tokens.join(" ,")),
            false,
        ));
    }
    if req.hop.keep_alive {
        fields.push(("Keep-Alive: timeout=5, max=100".to_owned(), false));
    }
    if req.hop.proxy_connection {
        fields.push(("Proxy-Connection: keep-alive".to_owned(), false));
    }
    if let Some(te) = req.hop.te {
        fields.push((format!("TE: {te}"), false));
    }
    if req.hop.upgrade {
        fields.push(("Upgrade: websocket".to_owned(), false));
    }
    let interim_ok = req.expect_continue && body_allowed && !matches!(framing, BodyFraming::Bare);
    if interim_ok {
        fields.push(("Expect: 100-continue".to_owned(), false));
    }
    match framing {
        BodyFraming::Bare => {}
        BodyFraming::Length => fields.push((
            format!("{}: {}", rng.casing("content-length"), body.len()),
            true,
        )),
        BodyFraming::LengthTwice { list: true } => {
            fields.push((format!("Content-Length: {0}, {0}", body.len()), false))
        }
        BodyFraming::LengthTwice { list: false } => {
            fields.push((format!("Content-Length: {}", body.len()), true));
            fields.push((format!("content-length: {}", body.len()), true));
        }
        BodyFraming::Chunked { .. } => fields.push((
            format!("{}: chunked", rng.casing("transfer-encoding")),
            false,
        )),
    }
    rng.shuffle(&mut fields);

    let mut bytes = format!("{} {target} HTTP/1.1\r\n", req.method.as_str()).into_bytes();
    let mut lengths = Vec::new();
    for (line, is_length) in &fields {
        bytes.extend_from_slice(line.as_bytes());
        if *is_length {
            let digits = line.rsplit_once(' ').map_or(0, |(_, d)| d.len());
            lengths.push((bytes.len() - digits..bytes.len(), false));
        }
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"\r\n");
    let head_len = bytes.len();

    match framing {
        BodyFraming::Bare => {}
        BodyFraming::Length | BodyFraming::LengthTwice { .. } => bytes.extend_from_slice(&body),
        BodyFraming::Chunked {
            cuts,
            extensions,
            upper,
            padded,
            trailer,
        } => {
            let mut ends: Vec<usize> = cuts.iter().map(|c| c.index(body.len() + 1)).collect();
            ends.push(body.len());
            ends.sort_unstable();
            ends.dedup();
            let mut start = 0;
            for end in ends.into_iter().chain([usize::MAX]) {
                let chunk = if end == usize::MAX {
                    0..0
                } else if end > start {
                    start..end
                } else {
                    continue;
                };
                if *padded && rng.chance(2) {
                    bytes.extend_from_slice(b"00");
                }
                let at = bytes.len();
                bytes.extend_from_slice(hex(chunk.len(), *upper).as_bytes());
                lengths.push((at..bytes.len(), true));
                if *extensions && rng.chance(2) {
                    let extension: &[u8] = match rng.below(3) {
                        0 => b";ext",
                        1 => b"; name=value",
                        _ => b";q=\"quoted; value\"",
                    };
                    bytes.extend_from_slice(extension);
                }
                bytes.extend_from_slice(b"\r\n");
                if chunk.is_empty() {
                    if *trailer {
                        bytes.extend_from_slice(b"X-Trailer: done\r\n");
                    }
                    bytes.extend_from_slice(b"\r\n");
                } else {
                    bytes.extend_from_slice(&body[chunk.clone()]);
                    bytes.extend_from_slice(b"\r\n");
                    start = chunk.end;
                }
            }
        }
    }

    let head_request = req.method == Method::Head;
    let expected_body = if head_request {
        Vec::new()
    } else {
        let mut out = format!("{} {}\n", req.method.as_str(), req.path).into_bytes();
        out.extend_from_slice(&body);
        out
    };
    Encoded {
        bytes,
        head_len,
        lengths,
        expected: Expected {
            head_request,
            body: expected_body,
            echo: echoed.map(|i| (Some(i) != named).then(|| req.extras[i].1.clone())),
            fields: req.extras.len() - usize::from(named.is_some()),
            host,
            close,
            interim_ok,
        },
    }
}

/// Write boundaries (offsets into `encoded.bytes`) a request asks for.
fn request_cuts(req: &Req, encoded: &Encoded) -> Vec<usize> {
    let len = encoded.bytes.len();
    let mut cuts: Vec<usize> = req.cuts.iter().map(|c| c.index(len)).collect();
    cuts.extend(req.head_cuts.iter().map(|c| c.index(encoded.head_len)));
    if req.trickle_end_of_head {
        cuts.extend(encoded.head_len.saturating_sub(4)..encoded.head_len);
    }
    cuts
}

/// Writes `bytes` with a write boundary at each of `cuts`.
async fn write_pieces<W: AsyncWrite + Unpin>(
    io: &mut W,
    bytes: &[u8],
    mut cuts: Vec<usize>,
) -> Result<(), String> {
    cuts.push(bytes.len());
    cuts.sort_unstable();
    cuts.dedup();
    let mut start = 0;
    for end in cuts {
        if end <= start || end > bytes.len() {
            continue;
        }
        io.write_all(&bytes[start..end])
            .await
            .map_err(|e| format!("write of bytes {start}..{end} failed: {e}"))?;
        start = end;
    }
    io.flush().await.map_err(|e| format!("flush failed: {e}"))
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 response reader.

#[derive(Debug)]
struct Parsed {
    status: u16,
    /// Lower-case names, trimmed values.
    fields: Vec<(String, String)>,
    body: Vec<u8>,
    interim: Vec<u16>,
}

impl Parsed {
    fn all(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

fn show(bytes: &[u8]) -> String {
    const MAX: usize = 600;
    let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]).into_owned();
    if bytes.len() > MAX {
        format!("{shown:?}... ({} bytes)", bytes.len())
    } else {
        format!("{shown:?}")
    }
}

/// Reads responses in reads of sizes taken in turn from `sizes`.
struct Reader<R> {
    io: R,
    buf: Vec<u8>,
    sizes: Vec<usize>,
    next: usize,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    fn new(io: R, sizes: Vec<usize>) -> Self {
        Self {
            io,
            buf: Vec::new(),
            sizes,
            next: 0,
        }
    }

    /// One read; `Ok(0)` at the end of the stream.
    async fn fill(&mut self) -> Result<usize, String> {
        let size = self.sizes.get(self.next % self.sizes.len().max(1)).copied();
        self.next += 1;
        let mut chunk = vec![0u8; size.unwrap_or(4096).max(1)];
        let n = self
            .io
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read failed: {e}; unparsed: {}", show(&self.buf)))?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    async fn more(&mut self, what: &str) -> Result<(), String> {
        if self.fill().await? == 0 {
            return Err(format!(
                "connection closed before {what}; unparsed: {}",
                show(&self.buf)
            ));
        }
        Ok(())
    }

    async fn line(&mut self) -> Result<Vec<u8>, String> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..at + 2).take(at).collect();
                return Ok(line);
            }
            self.more("the end of a line").await?;
        }
    }

    async fn exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            self.more(&format!("the end of a {n}-byte body")).await?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn head(&mut self) -> Result<(u16, Vec<(String, String)>), String> {
        let end = loop {
            if let Some(at) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            self.more("a complete response head").await?;
        };
        let head: Vec<u8> = self.buf.drain(..end + 4).take(end).collect();
        let text = std::str::from_utf8(&head)
            .map_err(|_| format!("response head is not UTF-8: {}", show(&head)))?;
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .filter(|rest| rest.len() >= 3 && (rest.len() == 3 || rest.as_bytes()[3] == b' '))
            .and_then(|rest| rest[..3].parse::<u16>().ok())
            .ok_or_else(|| format!("bad status line in {}", show(&head)))?;
        let mut fields = Vec::new();
        for line in lines {
            let (name, value) = line
                .split_once(':')
                .filter(|(name, _)| {
                    !name.is_empty() && !name.bytes().any(|b| b.is_ascii_whitespace())
                })
                .filter(|(_, value)| !value.contains(['\r', '\n']))
                .ok_or_else(|| format!("bad field line {line:?} in {}", show(&head)))?;
            fields.push((
                name.to_ascii_lowercase(),
                value.trim_matches([' ', '\t']).to_owned(),
            ));
        }
        Ok((status, fields))
    }

    async fn chunked(&mut self) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        loop {
            let line = self.line().await?;
            let size = line.split(|b| *b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size)
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .ok_or_else(|| format!("bad chunk size line {}", show(&line)))?;
            if size == 0 {
                // Trailers, up to the blank line.
                while !self.line().await?.is_empty() {}
                return Ok(body);
            }
            body.extend(self.exact(size).await?);
            let end = self.exact(2).await?;
            if end != b"\r\n" {
                return Err(format!("chunk data not followed by CRLF: {}", show(&end)));
            }
        }
    }

    /// The next final response to a request (`head_request`: `HEAD`), interim ones noted.
    async fn response(&mut self, head_request: bool) -> Result<Parsed, String> {
        let mut interim = Vec::new();
        loop {
            let (status, fields) = self.head().await?;
            if (100..200).contains(&status) {
                interim.push(status);
                continue;
            }
            let field = |name: &str| -> Vec<&str> {
                fields
                    .iter()
                    .filter(|(n, _)| n == name)
                    .map(|(_, v)| v.as_str())
                    .collect()
            };
            let lengths = field("content-length");
            let codings = field("transfer-encoding");
            if lengths.len() > 1
                || codings.len() > 1
                || (!lengths.is_empty() && !codings.is_empty())
            {
                return Err(format!("ambiguous response framing: {fields:?}"));
            }
            let body = if head_request || status == 204 || status == 304 {
                Vec::new()
            } else if let Some(coding) = codings.first() {
                if !coding.eq_ignore_ascii_case("chunked") {
                    return Err(format!("unexpected transfer-encoding {coding:?}"));
                }
                self.chunked().await?
            } else if let Some(length) = lengths.first() {
                let n = length
                    .parse::<usize>()
                    .map_err(|_| format!("bad content-length {length:?}"))?;
                self.exact(n).await?
            } else {
                return Err(format!(
                    "a response to an HTTP/1.1 client without framing: {fields:?}"
                ));
            };
            return Ok(Parsed {
                status,
                fields,
                body,
                interim,
            });
        }
    }

    /// The peer closes with nothing more to say.
    async fn eof(&mut self) -> Result<(), String> {
        loop {
            if !self.buf.is_empty() {
                return Err(format!(
                    "unexpected bytes after the last response: {}",
                    show(&self.buf)
                ));
            }
            if self.fill().await? == 0 {
                return Ok(());
            }
        }
    }
}

/// What the user sees for request `i` is what the request asked for.
fn check(i: usize, expected: &Expected, last: bool, got: &Parsed) -> Result<(), String> {
    let fail = |what: String| {
        Err(format!(
            "response {i}: {what}\n  got: status {} fields {:?} interim {:?} body {}\n  \
             expected: body {} echo {:?} fields {} host {:?} close {} interim allowed {}",
            got.status,
            got.fields,
            got.interim,
            show(&got.body),
            show(&expected.body),
            expected.echo,
            expected.fields,
            expected.host,
            expected.close,
            expected.interim_ok,
        ))
    };
    if got.status != 200 {
        return fail(format!("status {}", got.status));
    }
    if !got.all(ERROR_HEADER).is_empty() {
        return fail("the proxy's error header".to_owned());
    }
    if got.interim.iter().any(|s| *s != 100) || (!got.interim.is_empty() && !expected.interim_ok) {
        return fail("unexpected interim responses".to_owned());
    }
    if got.body != expected.body {
        return fail(format!(
            "body differs from the {} bytes expected {}",
            expected.body.len(),
            show(&expected.body)
        ));
    }
    if got.all("x-hop-seen") != ["none"] {
        return fail("hop-by-hop fields reached the backend".to_owned());
    }
    if got.all("x-fields") != [expected.fields.to_string().as_str()] {
        return fail("extra fields lost on the way".to_owned());
    }
    if got.all("x-host") != [expected.host.as_str()] {
        return fail("host changed on the way".to_owned());
    }
    let echoed = got.all("x-echo");
    let missing = !got.all("x-echo-missing").is_empty();
    match &expected.echo {
        Some(Some(value)) if echoed != [value.as_str()] || missing => {
            return fail(format!("x-echo is not {value:?}"));
        }
        Some(None) if !echoed.is_empty() || !missing => {
            return fail("a field named by Connection reached the backend".to_owned());
        }
        None if !echoed.is_empty() || missing => {
            return fail("x-echo without a field to echo".to_owned());
        }
        _ => {}
    }
    let closing = got
        .all("connection")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("close"));
    if closing != (expected.close && last) {
        return fail(format!(
            "connection: close is {closing}, the client asked {}",
            expected.close
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Property 1: kept-alive sequences echoed exactly.

#[derive(Clone, Debug)]
struct Sequence {
    inbound: bool,
    requests: Vec<Req>,
    /// The last request carries `Connection: close`.
    close_last: bool,
    /// Requests written before their responses are read (1: lock-step).
    depth: usize,
    read_sizes: Vec<usize>,
}

fn sequence() -> impl Strategy<Value = Sequence> {
    (
        any::<bool>(),
        prop::collection::vec(request(40 * 1024), 1..=6),
        prop::bool::weighted(0.3),
        1usize..=6,
        prop::collection::vec(
            prop_oneof![1usize..=16, 1usize..=1024, 1usize..=65536],
            1..=8,
        ),
    )
        .prop_map(
            |(inbound, requests, close_last, depth, read_sizes)| Sequence {
                inbound,
                requests,
                close_last,
                depth,
                read_sizes,
            },
        )
}

async fn run_sequence(addr: SocketAddr, case: &Sequence) -> Result<(), String> {
    let count = case.requests.len();
    let encoded: Vec<Encoded> = case
        .requests
        .iter()
        .enumerate()
        .map(|(i, r)| encode(r, case.close_last && i + 1 == count))
        .collect();
    let conn = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    conn.set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    let (read, mut write) = conn.into_split();
    let mut reader = Reader::new(read, case.read_sizes.clone());
    let indices: Vec<usize> = (0..count).collect();
    for batch in indices.chunks(case.depth.max(1)) {
        let mut bytes = Vec::new();
        let mut cuts = Vec::new();
        for &i in batch {
            let offset = bytes.len();
            cuts.extend(
                request_cuts(&case.requests[i], &encoded[i])
                    .into_iter()
                    .map(|c| c + offset),
            );
            bytes.extend_from_slice(&encoded[i].bytes);
        }
        let writing = write_pieces(&mut write, &bytes, cuts);
        let reading = async {
            for &i in batch {
                let expected = &encoded[i].expected;
                let response = reader.response(expected.head_request).await.map_err(|e| {
                    format!(
                        "response {i}: {e}\n  request {i} was {}",
                        show(&encoded[i].bytes)
                    )
                })?;
                check(i, expected, i + 1 == count, &response)?;
            }
            Ok::<_, String>(())
        };
        let (written, read) = tokio::join!(writing, reading);
        read?;
        written?;
    }
    if !case.close_last {
        // A client that is done: the proxy closes its side too.
        write
            .shutdown()
            .await
            .map_err(|e| format!("shutdown: {e}"))?;
    }
    reader.eof().await
}

#[test]
fn keep_alive_sequences_are_echoed_exactly() {
    watch_panics();
    let threads = "h1-fuzz-echo";
    let runtime = runtime(threads);
    let (proxy, outbound, inbound) = runtime.block_on(start());
    let result = runner(32).run(&sequence(), |case| {
        let addr = if case.inbound { inbound } else { outbound };
        let outcome = runtime.block_on(async {
            tokio::time::timeout(CASE_TIMEOUT, run_sequence(addr, &case)).await
        });
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(failure)) => return Err(TestCaseError::fail(failure)),
            Err(_) => {
                return Err(TestCaseError::fail(format!(
                    "no answer within {CASE_TIMEOUT:?}"
                )));
            }
        }
        let panics = panics_on(threads);
        if !panics.is_empty() || proxy.task.is_finished() {
            return Err(TestCaseError::fail(format!(
                "the proxy panicked or stopped: {panics:?}"
            )));
        }
        Ok(())
    });
    if let Err(err) = result {
        panic!("{err}");
    }
}

// ---------------------------------------------------------------------------------------------
// Property 2: junk never panics or hangs the proxy.

/// A length written differently.
#[derive(Clone, Debug)]
enum NewLength {
    Delta(i8),
    Value(u32),
    Raw(&'static str),
}

#[derive(Clone, Debug)]
enum Edit {
    /// XOR a byte with a non-zero mask.
    Flip(Index, u8),
    /// Remove one of the CRLFs: both bytes, the CR only, or the LF only.
    DropCrlf(Index, u8),
    Insert(Index, Vec<u8>),
    Truncate(Index),
}

#[derive(Clone, Debug)]
enum Junk {
    /// Arbitrary bytes.
    Random(Vec<u8>),
    /// A method and a space (past protocol detection), then arbitrary bytes.
    AfterMethod(&'static str, Vec<u8>),
    /// A valid request, then arbitrary bytes where the next one would start.
    AfterRequest(Vec<u8>),
    /// Valid requests, one length changed, then edited.
    Mutated {
        requests: Vec<Req>,
        length: Option<(Index, NewLength)>,
        edits: Vec<Edit>,
    },
}

#[derive(Clone, Debug)]
struct JunkCase {
    inbound: bool,
    junk: Junk,
    cuts: Vec<Index>,
}

fn edit() -> impl Strategy<Value = Edit> {
    let inserted = prop_oneof![
        prop::collection::vec(any::<u8>(), 1..8),
        prop::sample::select(vec![
            b" ".to_vec(),
            b"\r\n".to_vec(),
            b"\n".to_vec(),
            b"\r".to_vec(),
            b":".to_vec(),
            b"\0".to_vec(),
            b"\r\n\r\n".to_vec(),
            b"\r\nTransfer-Encoding: chunked".to_vec(),
            b"\r\nContent-Length: 3".to_vec(),
            b"\r\nHost: other.test".to_vec(),
            b"\r\n Folded".to_vec(),
        ]),
    ];
    prop_oneof![
        (any::<Index>(), 1u8..=255).prop_map(|(i, mask)| Edit::Flip(i, mask)),
        (any::<Index>(), 0u8..3).prop_map(|(i, how)| Edit::DropCrlf(i, how)),
        (any::<Index>(), inserted).prop_map(|(i, bytes)| Edit::Insert(i, bytes)),
        any::<Index>().prop_map(Edit::Truncate),
    ]
}

fn junk() -> impl Strategy<Value = Junk> {
    let new_length = prop_oneof![
        (-3i8..=3).prop_map(NewLength::Delta),
        any::<u32>().prop_map(NewLength::Value),
        prop::sample::select(vec![
            "",
            "-1",
            "+5",
            "1 2",
            "0x10",
            "99999999999999999999",
            "ffffffffffffffffff",
            "1,2",
            "5, 5",
        ])
        .prop_map(NewLength::Raw),
    ];
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..512).prop_map(Junk::Random),
        1 => (
            prop::sample::select(vec!["GET", "POST", "PUT", "HEAD", "CONNECT", "X"]),
            prop::collection::vec(any::<u8>(), 0..512),
        )
            .prop_map(|(method, bytes)| Junk::AfterMethod(method, bytes)),
        1 => prop::collection::vec(any::<u8>(), 1..256).prop_map(Junk::AfterRequest),
        3 => (
            prop::collection::vec(request(2048), 1..=3),
            prop::option::of((any::<Index>(), new_length)),
            prop::collection::vec(edit(), 0..=3),
        )
            .prop_map(|(requests, length, edits)| Junk::Mutated {
                requests,
                length,
                edits,
            }),
    ]
}

fn junk_case() -> impl Strategy<Value = JunkCase> {
    (any::<bool>(), junk(), cuts(6)).prop_map(|(inbound, junk, cuts)| JunkCase {
        inbound,
        junk,
        cuts,
    })
}

fn junk_bytes(junk: &Junk) -> Vec<u8> {
    match junk {
        Junk::Random(bytes) => bytes.clone(),
        Junk::AfterMethod(method, bytes) => {
            let mut out = format!("{method} ").into_bytes();
            out.extend_from_slice(bytes);
            out
        }
        Junk::AfterRequest(bytes) => {
            let mut out = format!("GET /first HTTP/1.1\r\nHost: {AUTHORITY}\r\n\r\n").into_bytes();
            out.extend_from_slice(bytes);
            out
        }
        Junk::Mutated {
            requests,
            length,
            edits,
        } => {
            let mut out = Vec::new();
            let mut lengths = Vec::new();
            for req in requests {
                let encoded = encode(req, false);
                let offset = out.len();
                lengths.extend(
                    encoded
                        .lengths
                        .iter()
                        .map(|(r, hex)| (r.start + offset..r.end + offset, *hex)),
                );
                out.extend_from_slice(&encoded.bytes);
            }
            if let Some((site, new)) = length
                && !lengths.is_empty()
            {
                let (range, is_hex) = lengths[site.index(lengths.len())].clone();
                let old = std::str::from_utf8(&out[range.clone()])
                    .ok()
                    .and_then(|s| i64::from_str_radix(s, if is_hex { 16 } else { 10 }).ok())
                    .unwrap_or(0);
                let written = match new {
                    NewLength::Delta(d) => {
                        let n = (old + i64::from(*d)).max(0);
                        if is_hex {
                            format!("{n:x}")
                        } else {
                            n.to_string()
                        }
                    }
                    NewLength::Value(n) => {
                        if is_hex {
                            format!("{n:x}")
                        } else {
                            n.to_string()
                        }
                    }
                    NewLength::Raw(raw) => (*raw).to_owned(),
                };
                out.splice(range, written.into_bytes());
            }
            for edit in edits {
                apply(&mut out, edit);
            }
            out
        }
    }
}

fn apply(out: &mut Vec<u8>, edit: &Edit) {
    match edit {
        Edit::Flip(at, mask) if !out.is_empty() => {
            let at = at.index(out.len());
            out[at] ^= mask;
        }
        Edit::DropCrlf(which, how) => {
            let crlfs: Vec<usize> = out
                .windows(2)
                .enumerate()
                .filter(|(_, w)| *w == b"\r\n")
                .map(|(i, _)| i)
                .collect();
            if !crlfs.is_empty() {
                let at = crlfs[which.index(crlfs.len())];
                match how {
                    0 => drop(out.drain(at..at + 2)),
                    1 => drop(out.remove(at)),
                    _ => drop(out.remove(at + 1)),
                }
            }
        }
        Edit::Insert(at, bytes) => {
            let at = at.index(out.len() + 1);
            out.splice(at..at, bytes.iter().copied());
        }
        Edit::Truncate(at) if !out.is_empty() => out.truncate(at.index(out.len())),
        Edit::Flip(..) | Edit::Truncate(_) => {}
    }
}

/// Writes the junk, half-closes, and reads until the proxy closes.
async fn run_junk(addr: SocketAddr, case: &JunkCase) -> Result<Vec<u8>, String> {
    let bytes = junk_bytes(&case.junk);
    let mut conn = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    conn.set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    let cuts = case.cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    // The proxy may close before taking everything: that is its right.
    if write_pieces(&mut conn, &bytes, cuts).await.is_ok() {
        let _ = conn.shutdown().await;
    }
    let mut got = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match conn.read(&mut chunk).await {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            // A reset (input left unread when the proxy closed) is an end too.
            Err(_) => return Ok(got),
        }
    }
}

/// One fresh request on a new connection is answered.
async fn fresh_request(addr: SocketAddr) -> Result<(), String> {
    let mut conn = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    conn.write_all(
        format!("GET /fresh HTTP/1.1\r\nHost: {AUTHORITY}\r\nx-reply-mode: length\r\n\r\n")
            .as_bytes(),
    )
    .await
    .map_err(|e| format!("write: {e}"))?;
    let mut reader = Reader::new(conn, vec![4096]);
    let response = reader.response(false).await?;
    if response.status != 200 || response.body != b"GET /fresh\n" {
        return Err(format!(
            "fresh request answered {} {:?} {}",
            response.status,
            response.fields,
            show(&response.body)
        ));
    }
    Ok(())
}

#[test]
fn junk_never_panics_or_hangs_the_proxy() {
    watch_panics();
    let threads = "h1-fuzz-junk";
    let runtime = runtime(threads);
    let (proxy, outbound, inbound) = runtime.block_on(start());
    let result = runner(32).run(&junk_case(), |case| {
        let addr = if case.inbound { inbound } else { outbound };
        let sent = junk_bytes(&case.junk);
        let outcome = runtime
            .block_on(async { tokio::time::timeout(CASE_TIMEOUT, run_junk(addr, &case)).await });
        let got = match outcome {
            Ok(Ok(got)) => got,
            Ok(Err(failure)) => return Err(TestCaseError::fail(failure)),
            Err(_) => {
                return Err(TestCaseError::fail(format!(
                    "the proxy neither answered nor closed within {CASE_TIMEOUT:?} after {}",
                    show(&sent)
                )));
            }
        };
        if !got.is_empty() && !got.starts_with(b"HTTP/1.1 ") {
            return Err(TestCaseError::fail(format!(
                "the proxy answered {} to {}",
                show(&got),
                show(&sent)
            )));
        }
        let fresh = runtime
            .block_on(async { tokio::time::timeout(CASE_TIMEOUT, fresh_request(addr)).await });
        let mut failure = String::new();
        match fresh {
            Ok(Ok(())) => {}
            Ok(Err(err)) => failure = err,
            Err(_) => {
                let _ = write!(failure, "no answer to a fresh request in {CASE_TIMEOUT:?}");
            }
        }
        let panics = panics_on(threads);
        if !panics.is_empty() || proxy.task.is_finished() {
            let _ = write!(failure, "; the proxy panicked or stopped: {panics:?}");
        }
        if !failure.is_empty() {
            return Err(TestCaseError::fail(format!(
                "after {} (answered {}): {failure}",
                show(&sent),
                show(&got)
            )));
        }
        Ok(())
    });
    if let Err(err) = result {
        panic!("{err}");
    }
}
