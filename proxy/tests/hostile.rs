//! Hostile peers against the real `conduit-proxy` binary over loopback: each test reproduces an
//! attack and shows the bound that holds (the proxy's memory and file descriptors, read from
//! `/proc`, and other clients' service). Every test is bounded in time, and the proxy process
//! is killed when its test ends.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed setup or request is the report"
)]

mod support;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::StatusCode;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A `conduit-proxy` process.
struct ProxyProcess {
    child: Child,
    outbound: SocketAddr,
    admin: SocketAddr,
    dir: PathBuf,
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

impl ProxyProcess {
    /// Starts the binary with `mesh` as its mesh file and `env` on top, and waits (bounded)
    /// until its admin server says it is ready.
    async fn start(name: &str, mesh: &str, env: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "conduit-proxy-hostile-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mesh_file = dir.join("mesh.yaml");
        std::fs::File::create(&mesh_file)
            .unwrap()
            .write_all(mesh.as_bytes())
            .unwrap();
        let (outbound, admin) = (free_port(), free_port());
        let mut command = Command::new(env!("CARGO_BIN_EXE_conduit-proxy"));
        command
            .env("CONDUIT_PROXY_OUTBOUND_ADDR", outbound.to_string())
            .env("CONDUIT_PROXY_ADMIN_ADDR", admin.to_string())
            .env(
                "CONDUIT_PROXY_DISCOVERY",
                format!("file:{}", mesh_file.display()),
            )
            .env("CONDUIT_PROXY_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().unwrap();
        let proxy = Self {
            child,
            outbound,
            admin,
            dir,
        };
        for _ in 0..500 {
            if let Ok(io) = TcpStream::connect(admin).await {
                drop(io);
                if get_status(admin, "/ready").await == Some(StatusCode::OK) {
                    return proxy;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the proxy did not become ready");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A field of `/proc/<pid>/status`, in kB.
    fn status_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap()
    }

    /// Open file descriptors.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One request over a new connection; `None` if it could not be made.
async fn get_status(addr: SocketAddr, path: &str) -> Option<StatusCode> {
    let io = TcpStream::connect(addr).await.ok()?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .ok()?;
    tokio::spawn(connection);
    let request = http::Request::builder()
        .uri(path)
        .header("host", "admin")
        .body(full(""))
        .ok()?;
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .ok()?
        .ok()?;
    Some(response.status())
}

/// Goal: a flood of admin connections that pipeline `/metrics` and never read cannot grow the
/// proxy without bound or stop its health probes. Method: 600 connections each write 50
/// pipelined `GET /metrics` and never read a byte. Before the bound, every one of them was
/// served in full (3,000 such connections took the proxy from 5 MB to 25 MB resident). Now at
/// most 64 are served in full and the rest get one `503` each and are closed: the proxy's
/// descriptors stay within the bound, its resident memory grows by a few MB at most, and
/// `/live` keeps answering 200 on a fresh connection.
#[tokio::test]
async fn an_admin_flood_cannot_grow_the_proxy_or_silence_its_probes() {
    bounded(async {
        let app = named_backend("app").await;
        let mesh = format!("services:\n  web.test:\n    endpoints:\n      - addr: {app}\n");
        let proxy = ProxyProcess::start("admin-flood", &mesh, &[]).await;
        // Some series to render.
        for _ in 0..20 {
            let response = get_once(proxy.outbound, "web.test", "/").await;
            assert_eq!(response.status(), StatusCode::OK);
        }
        let (rss_before, fds_before) = (proxy.status_kb("VmRSS"), proxy.fds());
        let scrape = "GET /metrics HTTP/1.1\r\nhost: admin\r\n\r\n".repeat(50);
        let mut flood = Vec::new();
        for _ in 0..600 {
            let mut io = TcpStream::connect(proxy.admin).await.unwrap();
            // Written whole or not: the socket buffer takes it, and nothing is read back.
            let _ =
                tokio::time::timeout(Duration::from_millis(50), io.write_all(scrape.as_bytes()))
                    .await;
            flood.push(io);
        }
        // The flood is being served; probes still answer.
        for _ in 0..5 {
            assert_eq!(
                get_status(proxy.admin, "/live").await,
                Some(StatusCode::OK),
                "/live must answer during the flood"
            );
        }
        // Connections beyond the full-service bound are answered once and closed.
        let mut fds = proxy.fds();
        for _ in 0..500 {
            if fds <= fds_before + conduit_proxy::admin::MAX_CONNECTIONS + 8 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            fds = proxy.fds();
        }
        assert!(
            fds <= fds_before + conduit_proxy::admin::MAX_CONNECTIONS + 8,
            "{fds} descriptors open, {fds_before} before the flood"
        );
        let grown_kb = proxy.status_kb("VmRSS").saturating_sub(rss_before);
        assert!(
            grown_kb < 8 * 1024,
            "resident memory grew by {grown_kb} kB under the flood"
        );
        // Other clients' traffic is unaffected.
        let response = get_once(proxy.outbound, "web.test", "/").await;
        assert_eq!(response.status(), StatusCode::OK);
        drop(flood);
    })
    .await;
}

/// Goal: peers cannot grow the metrics by varying what they send. Method: 200 inbound requests,
/// each with a different `Host`, answered with made-up status codes. Inbound series are keyed
/// by what the proxy knows (the app's address here; the local service's name when `service`
/// is set), and statuses HTTP does not define share one `status_code="other"` series: one
/// authority and two status series, however many the peers tried.
#[tokio::test]
async fn peers_cannot_add_metric_series_inbound() {
    bounded(async {
        let app = backend(
            false,
            |request: http::Request<hyper::body::Incoming>| async move {
                let status: u16 = request.uri().path()[1..].parse().unwrap_or(200);
                let mut response = http::Response::new(full(""));
                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                response
            },
        )
        .await;
        let mut config = config();
        config.app_addr = Some(app);
        let proxy = TestProxy::start(config, mesh(&[])).await;
        let inbound = proxy.addrs.inbound.unwrap();
        for i in 0..200u16 {
            let path = if i % 2 == 0 {
                "/200".to_owned()
            } else {
                format!("/{}", 600 + i)
            };
            let response = get_once(inbound, &format!("peer-{i}.example"), &path).await;
            assert!(response.status().as_u16() >= 200);
        }
        let metrics = scrape(proxy.addrs.admin).await;
        let series: std::collections::BTreeSet<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("response_total{direction=\"inbound\""))
            .map(|l| l.split('}').next().unwrap())
            .collect();
        let app_label = format!("authority=\"{app}\"");
        assert_eq!(series.len(), 2, "{series:#?}");
        assert!(series.iter().all(|s| s.contains(&app_label)), "{series:#?}");
        assert!(
            series.iter().any(|s| s.contains("status_code=\"other\"")),
            "{series:#?}"
        );
    })
    .await;
}

/// Goal: a request is forwarded with the authority it was routed by. Method: an h2 request
/// whose `:authority` names `web.test` carries `host: evil.test`; the app (h2) sees
/// `web.test` and no `host` field saying otherwise.
#[tokio::test]
async fn h2_authority_and_host_cannot_disagree_upstream() {
    bounded(async {
        let app = backend(
            true,
            |request: http::Request<hyper::body::Incoming>| async move {
                let authority = request.uri().authority().map(|a| a.to_string());
                let host = request
                    .headers()
                    .get("host")
                    .map(|h| h.to_str().unwrap().to_owned());
                http::Response::new(full(format!("{authority:?} {host:?}")))
            },
        )
        .await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let request = http::Request::builder()
            .uri("http://web.test/")
            .header("host", "evil.test")
            .body(full(""))
            .unwrap();
        let response = h2_client(proxy.addrs.outbound)
            .await
            .send_request(request)
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_bytes(response).await, "Some(\"web.test\") None");
    })
    .await;
}

/// An idle timeout small enough for a test to wait out.
fn short_idle() -> conduit_proxy::ProxyConfig {
    let mut config = config();
    config.limits.idle_timeout = Duration::from_millis(300);
    config
}

/// Goal: an h2 client that keeps its connection open (answering pings) but sends nothing
/// cannot hold it forever. Method: one request, then nothing; the proxy closes the connection
/// (a graceful GOAWAY) once no stream has been open for its idle timeout.
#[tokio::test]
async fn an_idle_h2_connection_is_closed() {
    bounded(async {
        let app = backend(
            true,
            |_request: http::Request<hyper::body::Incoming>| async {
                http::Response::new(full("app"))
            },
        )
        .await;
        let proxy = TestProxy::start(short_idle(), mesh(&[("web.test", &[app])])).await;
        let mut client = h2_client(proxy.addrs.outbound).await;
        let request = http::Request::builder()
            .uri("http://web.test/")
            .body(full(""))
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(body_bytes(response).await, "app");
        for _ in 0..500 {
            if client.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the idle connection was not closed");
    })
    .await;
}

/// Goal: a kept-alive HTTP/1 connection that waits long enough to park (giving back its
/// buffers and request state) comes back whole for its next request, and a parked connection
/// still closes at its idle timeout. Method: raw HTTP/1.1 over one socket; a request, a pause
/// past the park delay (50 ms) but within the idle timeout (300 ms), a second request, then
/// silence until the proxy closes the connection.
#[tokio::test]
async fn a_parked_http1_connection_serves_its_next_request_and_closes_when_idle() {
    use tokio::io::AsyncReadExt;
    bounded(async {
        let app = named_backend("app").await;
        let proxy = TestProxy::start(short_idle(), mesh(&[("web.test", &[app])])).await;
        let mut client = TcpStream::connect(proxy.addrs.outbound).await.unwrap();
        let request = b"GET / HTTP/1.1\r\nhost: web.test\r\n\r\n";
        let mut buf = vec![0u8; 4096];
        for _ in 0..2 {
            client.write_all(request).await.unwrap();
            let mut got = Vec::new();
            while !got.ends_with(b"app") {
                let n = client.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before the response: {got:?}");
                got.extend_from_slice(&buf[..n]);
            }
            assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
            // Nothing arrives while the connection parks.
            let quiet = tokio::time::timeout(Duration::from_millis(150), client.read(&mut buf));
            assert!(quiet.await.is_err(), "the proxy sent or closed while idle");
        }
        // Silence from here: the proxy closes the connection at its idle timeout.
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
    })
    .await;
}

/// Goal: h2 bodies that stop moving are ended, as on HTTP/1. Method: an app that sends a
/// response's headers and first chunk and then nothing; the client's body fails after the
/// idle timeout instead of hanging. And an upload that stops after its first chunk fails at
/// the app the same way.
#[tokio::test]
async fn h2_bodies_that_stop_moving_are_ended() {
    bounded(async {
        let (saw_tx, mut saw) = tokio::sync::mpsc::unbounded_channel::<String>();
        let app = backend(
            true,
            move |request: http::Request<hyper::body::Incoming>| {
                let saw_tx = saw_tx.clone();
                async move {
                    if request.uri().path() == "/upload" {
                        let body = http_body_util::BodyExt::collect(request.into_body()).await;
                        let _ = saw_tx.send(match body {
                            Ok(_) => "complete".to_owned(),
                            Err(err) => format!("error: {err}"),
                        });
                        return http::Response::new(full("done"));
                    }
                    let frames = futures_util::StreamExt::chain(
                        futures_util::stream::iter([Ok(http_body::Frame::data(
                            bytes::Bytes::from("first"),
                        ))]),
                        futures_util::stream::pending(),
                    );
                    http::Response::new(http_body_util::BodyExt::boxed(
                        http_body_util::StreamBody::new(frames),
                    ))
                }
            },
        )
        .await;
        let proxy = TestProxy::start(short_idle(), mesh(&[("web.test", &[app])])).await;
        let request = http::Request::builder()
            .uri("http://web.test/stall")
            .body(full(""))
            .unwrap();
        let response = h2_client(proxy.addrs.outbound)
            .await
            .send_request(request)
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = http_body_util::BodyExt::collect(response.into_body()).await;
        assert!(body.is_err(), "a stalled response body must end, not hang");

        // An upload that sends one chunk and then nothing, never ending.
        let frames = futures_util::StreamExt::chain(
            futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
                http_body::Frame::data(bytes::Bytes::from("part")),
            )]),
            futures_util::stream::pending(),
        );
        let request = http::Request::builder()
            .method("POST")
            .uri("http://web.test/upload")
            .body(http_body_util::BodyExt::boxed(
                http_body_util::BodyExt::map_err(http_body_util::StreamBody::new(frames), |n| {
                    match n {}
                }),
            ))
            .unwrap();
        let mut client = h2_client(proxy.addrs.outbound).await;
        let _ = client.send_request(request).await;
        let seen = saw.recv().await.unwrap();
        assert!(
            seen.starts_with("error"),
            "the app saw the stalled upload end: {seen}"
        );
    })
    .await;
}

/// Goal: a client that opens streams and resets them at once (the "rapid reset" attack,
/// CVE-2023-44487) cannot make the proxy work for nothing without end. Method: raw frames
/// over one socket: 2,000 requests, each reset right after its HEADERS, all written at once.
/// The proxy ends the connection with GOAWAY `ENHANCE_YOUR_CALM`; requests reset before the
/// proxy read past them never reach the app; a new client is served as before.
#[tokio::test]
async fn an_h2_rapid_reset_flood_ends_the_connection() {
    use conduit_h2::frame::{self, Frame, StreamId};
    use conduit_h2::hpack::{Encoder, Field};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;
    bounded(async {
        let seen = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&seen);
        let app = backend(
            true,
            move |_request: http::Request<hyper::body::Incoming>| {
                counted.fetch_add(1, Ordering::Relaxed);
                async { http::Response::new(full("app")) }
            },
        )
        .await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;

        let mut flood = frame::PREFACE.to_vec();
        frame::write_settings(&mut flood, &[]);
        let mut encoder = Encoder::new(4096);
        let mut block = Vec::new();
        for i in 0..2000u32 {
            let id = StreamId::new(2 * i + 1);
            block.clear();
            encoder.encode(
                [
                    Field::new(b":method", b"GET"),
                    Field::new(b":scheme", b"http"),
                    Field::new(b":authority", b"web.test"),
                    Field::new(b":path", b"/"),
                ],
                &mut block,
            );
            frame::write_header_block(&mut flood, id, &block, true, 16_384);
            frame::write_rst_stream(&mut flood, id, conduit_h2::ErrorCode::CANCEL);
        }
        let mut client = TcpStream::connect(proxy.addrs.outbound).await.unwrap();
        // The proxy may close before it has read all of it.
        let _ = client.write_all(&flood).await;

        let mut input = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let goaway = 'read: loop {
            let n = client.read(&mut buf).await.unwrap_or(0);
            assert!(n > 0, "closed without GOAWAY");
            input.extend_from_slice(&buf[..n]);
            let mut rest = &input[..];
            while let Some((frame, len)) =
                frame::parse_frame(rest, frame::MAX_MAX_FRAME_SIZE).unwrap()
            {
                if let Frame::GoAway(goaway) = frame {
                    break 'read goaway.code;
                }
                rest = &rest[len..];
            }
        };
        assert_eq!(goaway, conduit_h2::ErrorCode::ENHANCE_YOUR_CALM);
        let reached = seen.load(Ordering::Relaxed);
        assert!(reached < 50, "{reached} reset requests reached the app");

        let response = h2_client(proxy.addrs.outbound)
            .await
            .send_request(get("web.test", "/"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    })
    .await;
}
