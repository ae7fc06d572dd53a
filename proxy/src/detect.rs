//! Protocol detection on an accepted connection (Linkerd `http/detect`).
//!
//! The first bytes decide: the HTTP/2 connection preface means h2 with prior knowledge; an HTTP
//! method token followed by a space means HTTP/1, whose whole first request head is then read
//! and checked here, so that a malformed request gets a 400 and an oversized head a 431 from
//! the proxy (with its error header), and a client trickling its head is cut off after the
//! header-read timeout; a TLS ClientHello (read whole: one record of at most 16 KiB) is TLS;
//! anything else is opaque TCP. A client that sends nothing within the
//! detect timeout is opaque too (server-speaks-first protocols such as SMTP or MySQL).

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::h1::codec;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest method token we wait for before deciding "not HTTP".
const MAX_METHOD_LEN: usize = 24;

/// What the connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Detected {
    Http1,
    Http2,
    /// A TLS ClientHello, whole in `buf` (the inbound side terminates it when its SNI is the
    /// proxy's identity; otherwise it is opaque).
    Tls,
    Opaque,
}

/// Why detection gave up on the connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DetectError {
    #[error("request head not received within {0:?}")]
    HeaderTimeout(Duration),
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("connection closed before a request")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Detection limits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DetectLimits {
    pub(crate) detect_timeout: Duration,
    pub(crate) header_read_timeout: Duration,
    pub(crate) max_header_bytes: usize,
}

/// Reads from `io` into `buf` until the protocol is known. The bytes read stay in `buf` and
/// must be replayed to whoever serves the connection.
pub(crate) async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    limits: DetectLimits,
) -> Result<Detected, DetectError> {
    let first = tokio::time::timeout(limits.detect_timeout, async {
        loop {
            if let Some(decided) = decide(buf) {
                return Ok(decided);
            }
            buf.reserve(1024);
            if io.read_buf(buf).await? == 0 {
                return if buf.is_empty() {
                    Err(DetectError::Closed)
                } else {
                    Ok(Detected::Opaque)
                };
            }
        }
    })
    .await;
    let detected = match first {
        Ok(result) => result?,
        // Nothing decisive in time: not a client that speaks first, so not HTTP.
        Err(_) => Detected::Opaque,
    };
    if detected != Detected::Http1 {
        return Ok(detected);
    }
    tokio::time::timeout(
        limits.header_read_timeout,
        read_head(io, buf, limits.max_header_bytes),
    )
    .await
    .map_err(|_| DetectError::HeaderTimeout(limits.header_read_timeout))??;
    Ok(Detected::Http1)
}

fn decide(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    if crate::tls::may_be_tls(buf) {
        return match crate::tls::parse_client_hello(buf) {
            crate::tls::Hello::Tls { .. } => Some(Detected::Tls),
            crate::tls::Hello::NotTls => Some(Detected::Opaque),
            crate::tls::Hello::Incomplete => None,
        };
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (buf.len() >= H2_PREFACE.len()).then_some(Detected::Http2);
    }
    for (i, byte) in buf.iter().enumerate() {
        if *byte == b' ' {
            return Some(if i > 0 {
                Detected::Http1
            } else {
                Detected::Opaque
            });
        }
        if !is_tchar(*byte) || i >= MAX_METHOD_LEN {
            return Some(Detected::Opaque);
        }
    }
    None
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// Whether `buf` starts with a whole request head. A plain function, so that its field array
/// (3 KB) lives on the stack while it runs rather than in the connection's future.
fn head_complete(buf: &[u8], max: usize) -> Result<bool, DetectError> {
    let mut headers = [httparse::EMPTY_HEADER; codec::FIELD_SLOTS];
    let mut request = httparse::Request::new(&mut headers);
    // Judged on the first `max` bytes only, as the HTTP/1 codec does: what lies past the
    // limit must not turn a 431 into a 400 when one read brought it in.
    match request.parse(codec::within(buf, max)) {
        Ok(httparse::Status::Complete(_)) => Ok(true),
        Ok(httparse::Status::Partial) => Ok(false),
        Err(httparse::Error::TooManyHeaders) => Err(DetectError::TooLarge(max)),
        Err(err) => Err(DetectError::Malformed(err.to_string())),
    }
}

async fn read_head<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    max: usize,
) -> Result<(), DetectError> {
    loop {
        if head_complete(buf, max)? {
            return Ok(());
        }
        if buf.len() > max {
            return Err(DetectError::TooLarge(max));
        }
        buf.reserve(4096.min(max + 1 - buf.len()).max(1));
        if io.read_buf(buf).await? == 0 {
            return Err(DetectError::Closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(input: &[u8]) -> Result<Detected, DetectError> {
        let limits = DetectLimits {
            detect_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(1),
            max_header_bytes: 8192,
        };
        let mut io = input;
        detect(&mut io, &mut BytesMut::new(), limits).await
    }

    /// A client that sends `input` one byte per read.
    struct OneByte<'a>(&'a [u8]);

    impl AsyncRead for OneByte<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if let Some((first, rest)) = self.0.split_first() {
                buf.put_slice(&[*first]);
                self.0 = rest;
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Found by the `detect` fuzz target: the head was parsed as far as the buffer went, so an
    /// oversized head with a bad byte past the limit was malformed (400) when one read brought
    /// it all and too large (431) when it came in small reads. Only the first
    /// `max_header_bytes` are judged now.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_head_is_judged_the_same_however_it_arrives() {
        let limits = DetectLimits {
            detect_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(1),
            max_header_bytes: 64,
        };
        let mut too_large = b"GET / HTTP/1.1\r\nx: ".to_vec();
        too_large.extend([b'a'; 60]);
        too_large.extend(b"\r\nbad name: 1\r\n\r\n");
        let malformed = b"GET / HTTP/1.1\r\nbad name: 1\r\n\r\n";
        for (input, want) in [(&too_large[..], "TooLarge(64)"), (malformed, "Malformed")] {
            // All of it in the first read (detection reads up to 1 KiB at once).
            let whole = detect(&mut &input[..], &mut BytesMut::new(), limits).await;
            let trickled = detect(&mut OneByte(input), &mut BytesMut::new(), limits).await;
            for got in [whole, trickled] {
                assert!(
                    format!("{got:?}").starts_with(&format!("Err({want}")),
                    "{got:?}"
                );
            }
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn decides() {
        assert_eq!(
            run(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap(),
            Detected::Http1
        );
        assert_eq!(run(H2_PREFACE).await.unwrap(), Detected::Http2);
        assert_eq!(
            run(b"\x16\x03\x01\x02\x00").await.unwrap(),
            Detected::Opaque
        );
        assert_eq!(run(b"hello\n").await.unwrap(), Detected::Opaque);
        assert!(matches!(
            run(b"GET / HTTP/1.1 x\r\n\r\n").await,
            Err(DetectError::Malformed(_))
        ));
        assert!(matches!(
            run(b"GET / HTTP/1.1\r\nhost: a\r\n").await,
            Err(DetectError::Closed)
        ));
        let mut big = b"GET / HTTP/1.1\r\nx: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 9000));
        big.extend(b"\r\n\r\n");
        assert!(matches!(run(&big).await, Err(DetectError::TooLarge(8192))));
        assert!(matches!(run(b"").await, Err(DetectError::Closed)));
    }
}
