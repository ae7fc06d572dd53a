//! Traffic an injected pod's iptables redirect sends to the outbound listener goes on to where
//! it was headed when the mesh does not know better (`SO_ORIGINAL_DST`), as Linkerd's does:
//!
//! - in a network namespace of the test's own making, an iptables `REDIRECT` (as
//!   `conduit-init` sets up) sends an app's connections to the proxy's outbound port: opaque
//!   TCP reaches its original destination, HTTP/1.1 and HTTP/2 (h2c) for a host discovery does
//!   not know reach that host's server, HTTP for a known service still goes where discovery
//!   says, and a client that connects to the proxy itself gets 404 (no loop). Needs root,
//!   iproute2, iptables and python3 (for the little servers and clients); says why and passes
//!   without them;
//! - on loopback, without root, over both engines, with a network that reports a redirect for
//!   every connection (or none, or one to the proxy itself): the same decision, its metrics
//!   and its errors, and 404 when there is no original destination.

#![allow(
    clippy::unwrap_used,
    reason = "test steps: any failed step fails the test"
)]

mod support;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::task::{Context, Poll};
use std::time::Duration;

use conduit_proxy::config::ProxyConfig;
use conduit_proxy::net::{Listener, Net};
use conduit_proxy::{Addrs, Discover, Proxy, Resolution, StaticDiscover, TokioNet};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use support::{
    ENGINES, Engine, backend, body_bytes, bounded, config, full, h1_client, h2_client, mesh,
    sample, scrape,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const BACKEND: &str = "10.216.0.1";
const BACKEND_PORT: u16 = 7000;
const OUTBOUND_PORT: u16 = 4140;
const ADMIN_PORT: u16 = 4191;
/// The app's uid (the proxy runs as root, which the redirect spares).
const APP_UID: u32 = 1234;
const ERROR_HEADER: &str = "conduit-proxy-error";

/// `serve`: answers each connection with `pong:` and what it read (prints `ready` first).
/// `ask TRIES`: connects (as APP_UID) and sends `hello`, up to TRIES times 100 ms apart until
/// an answer comes; prints the answer or the last error.
const SCRIPT: &str = r#"
import encodings.idna, os, socket, sys, time
if sys.argv[1] == "serve":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[2], int(sys.argv[3])))
    s.listen(16)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        data = c.recv(100)
        c.sendall(b"pong:" + data)
        c.close()
else:
    host, port, tries, uid = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    # Everything imported first: the interpreter's files may not be readable as uid.
    os.setuid(uid)
    last = "no attempt"
    for _ in range(tries):
        try:
            s = socket.create_connection((host, port), timeout=3)
            s.sendall(b"hello\n")
            data = b""
            while True:
                chunk = s.recv(100)
                if not chunk:
                    break
                data += chunk
            if data:
                print(data.decode())
                sys.exit(0)
            last = "closed without an answer"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    print("failed: " + last)
"#;

/// HTTP servers and clients, HTTP/2 written out by hand (prior knowledge, h2c) so that only
/// python3 is needed:
/// - `serve1 HOST PORT NAME`: HTTP/1.1, answers `NAME HOST-FIELD`;
/// - `serve2 HOST PORT NAME`: HTTP/2, answers every stream with 200 and `NAME`;
/// - `get1|get2 HOST PORT AUTHORITY TRIES UID [PATH]`: one GET of PATH (`/`) for AUTHORITY over
///   HTTP/1.1 or HTTP/2 (as UID), up to TRIES times 100 ms apart until an answer comes; prints
///   `STATUS BODY`, then ` (ERROR)` when the proxy answered, or `failed: ` and the last error.
///   An HTTP/2 status the little decoder does not know prints as `other`.
const HTTP_SCRIPT: &str = r#"
import encodings.idna, http.client, os, socket, struct, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def frame(kind, flags, stream, payload=b""):
    head = struct.pack(">I", len(payload))[1:] + bytes([kind, flags])
    return head + struct.pack(">I", stream) + payload

def read_exact(c, n):
    data = b""
    while len(data) < n:
        chunk = c.recv(n - len(data))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data

def read_frame(c):
    head = read_exact(c, 9)
    length = int.from_bytes(head[:3], "big")
    stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
    return head[3], head[4], stream, read_exact(c, length)

def h2_conn(c, name):
    try:
        read_exact(c, 24)
        c.sendall(frame(4, 0, 0))
        while True:
            kind, flags, stream, payload = read_frame(c)
            if kind == 4 and not flags & 1:
                c.sendall(frame(4, 1, 0))
            elif kind == 6 and not flags & 1:
                c.sendall(frame(6, 1, 0, payload))
            elif kind == 1:
                # :status 200 is entry 8 of HPACK's static table.
                c.sendall(frame(1, 4, stream, b"\x88") + frame(0, 1, stream, name.encode()))
            elif kind == 7:
                return
    except (EOFError, OSError):
        pass
    finally:
        c.close()

# HPACK's static table entries for :status.
STATUS = {8: "200", 9: "204", 10: "206", 11: "304", 12: "400", 13: "404", 14: "500"}

def get1(host, port, authority, path):
    conn = http.client.HTTPConnection(host, port, timeout=3)
    conn.request("GET", path, headers={"Host": authority})
    r = conn.getresponse()
    answer = "%d %s" % (r.status, r.read().decode())
    error = r.getheader("conduit-proxy-error")
    return answer + (" (%s)" % error if error else "")

def get2(host, port, authority, path):
    c = socket.create_connection((host, port), timeout=3)
    a, p = authority.encode(), path.encode()
    # GET and http (static entries 2 and 6), then :authority and :path (entries 1 and 4) as
    # literals.
    block = b"\x82\x86\x01" + bytes([len(a)]) + a + b"\x04" + bytes([len(p)]) + p
    c.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0) + frame(1, 5, 1, block))
    status, body = "none", b""
    while True:
        kind, flags, stream, payload = read_frame(c)
        if kind == 4 and not flags & 1:
            c.sendall(frame(4, 1, 0))
        elif kind == 7:
            raise EOFError("goaway")
        elif stream == 1 and kind == 3:
            raise EOFError("stream reset")
        elif stream == 1 and kind == 1:
            status = STATUS.get(payload[0] & 0x7F, "other") if payload[0] & 0x80 else "other"
        elif stream == 1 and kind == 0:
            body += payload
        if stream == 1 and kind in (0, 1) and flags & 1:
            c.close()
            return "%s %s" % (status, body.decode())

role = sys.argv[1]
if role == "serve1":
    name = sys.argv[4]
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            body = ("%s %s" % (name, self.headers.get("Host", ""))).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer((sys.argv[2], int(sys.argv[3])), Handler)
    print("ready", flush=True)
    server.serve_forever()
elif role == "serve2":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[2], int(sys.argv[3])))
    s.listen(16)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        threading.Thread(target=h2_conn, args=(c, sys.argv[4]), daemon=True).start()
else:
    host, port, authority = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    tries, uid = int(sys.argv[5]), int(sys.argv[6])
    path = sys.argv[7] if len(sys.argv) > 7 else "/"
    get = get1 if role == "get1" else get2
    # Everything imported first: the interpreter's files may not be readable as uid.
    os.setuid(uid)
    last = "no attempt"
    for _ in range(tries):
        try:
            print(get(host, port, authority, path))
            sys.exit(0)
        except (OSError, EOFError, http.client.HTTPException) as e:
            last = str(e) or type(e).__name__
        time.sleep(0.1)
    print("failed: " + last)
"#;

fn missing() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    let mut missing = Vec::new();
    if !root {
        missing.push("root".to_owned());
    }
    for tool in ["ip", "iptables", "python3"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            missing.push(tool.to_owned());
        }
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

fn run(args: &[&str]) -> String {
    let output = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The namespace and the processes started in it, removed however the test ends.
struct Pod {
    ns: String,
    children: Vec<Child>,
    dir: std::path::PathBuf,
}

impl Pod {
    /// A namespace named after the test (tests run side by side), with `BACKEND` on its
    /// loopback (no other device is needed) and the app's connections to `BACKEND` redirected
    /// to the proxy's outbound port; the proxy's own (root's) are not, as conduit-init spares
    /// the proxy's uid.
    fn new(test: &str) -> Self {
        let ns = format!("conduit-odst-{test}-{}", std::process::id());
        let dir = std::env::temp_dir().join(&ns);
        std::fs::create_dir_all(&dir).unwrap();
        let pod = Self {
            ns: ns.clone(),
            children: Vec::new(),
            dir,
        };
        run(&["ip", "netns", "add", &ns]);
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        let backend = format!("{BACKEND}/32");
        run(&["ip", "-n", &ns, "addr", "add", &backend, "dev", "lo"]);
        let outbound = OUTBOUND_PORT.to_string();
        run(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            BACKEND,
            "-m",
            "owner",
            "!",
            "--uid-owner",
            "0",
            "-j",
            "REDIRECT",
            "--to-ports",
            &outbound,
        ]);
        pod
    }

    fn exec(&self) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns]);
        command
    }

    /// Starts a python server of `script` with `args`, once it says it is ready.
    fn serve(&mut self, script: &str, args: &[&str]) {
        let mut server = self
            .exec()
            .args(["python3", "-c", script])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        io::BufRead::read_line(
            &mut io::BufReader::new(server.stdout.take().unwrap()),
            &mut ready,
        )
        .unwrap();
        assert_eq!(ready.trim(), "ready", "{args:?}");
        self.children.push(server);
    }

    /// Starts the proxy on the ports the redirect names, with `mesh` (YAML) as its discovery;
    /// its log goes to `proxy.log` in the test's directory.
    fn start_proxy(&mut self, mesh: &str) {
        let file = self.dir.join("mesh.yaml");
        std::fs::write(&file, mesh).unwrap();
        let log = std::fs::File::create(self.dir.join("proxy.log")).unwrap();
        let proxy = self
            .exec()
            .arg(env!("CARGO_BIN_EXE_conduit-proxy"))
            .env(
                "CONDUIT_PROXY_OUTBOUND_ADDR",
                format!("127.0.0.1:{OUTBOUND_PORT}"),
            )
            .env("CONDUIT_PROXY_INBOUND_ADDR", "127.0.0.1:4143")
            .env(
                "CONDUIT_PROXY_ADMIN_ADDR",
                format!("127.0.0.1:{ADMIN_PORT}"),
            )
            .env(
                "CONDUIT_PROXY_DISCOVERY",
                format!("file:{}", file.display()),
            )
            .env("CONDUIT_PROXY_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(proxy);
    }

    fn proxy_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("proxy.log")).unwrap_or_default()
    }

    /// Prints what a python client of `script` printed (`args`), or why it printed nothing.
    fn client(&self, script: &str, args: &[&str]) -> String {
        let output = self
            .exec()
            .args(["python3", "-c", script])
            .args(args)
            .output()
            .unwrap();
        let answer = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if answer.is_empty() {
            format!("no answer: {}", String::from_utf8_lossy(&output.stderr))
        } else {
            answer
        }
    }

    fn ask(&self, tries: u32) -> String {
        let (port, tries, uid) = (
            BACKEND_PORT.to_string(),
            tries.to_string(),
            APP_UID.to_string(),
        );
        self.client(SCRIPT, &["ask", BACKEND, &port, &tries, &uid])
    }

    /// One GET of `/` for `authority` from the app to `host:port`, over HTTP/1.1 (`get1`) or
    /// HTTP/2 (`get2`).
    fn get(&self, get: &str, host: &str, port: u16, authority: &str, tries: u32) -> String {
        self.get_path(get, host, port, authority, tries, "/")
    }

    fn get_path(
        &self,
        get: &str,
        host: &str,
        port: u16,
        authority: &str,
        tries: u32,
        path: &str,
    ) -> String {
        let (port, tries, uid) = (port.to_string(), tries.to_string(), APP_UID.to_string());
        self.client(
            HTTP_SCRIPT,
            &[get, host, &port, authority, &tries, &uid, path],
        )
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn redirected_opaque_tcp_reaches_its_original_destination() {
    if let Some(missing) = missing() {
        eprintln!(
            "redirected_opaque_tcp_reaches_its_original_destination: skipped: needs {missing}"
        );
        return;
    }
    let mut pod = Pod::new("tcp");
    let port = BACKEND_PORT.to_string();
    pod.serve(SCRIPT, &["serve", BACKEND, &port]);
    pod.start_proxy("services: {}\n");

    // Retried while the proxy starts (until then the redirect meets a closed port).
    assert_eq!(pod.ask(30), "pong:hello");

    // It went through the proxy: with the proxy gone, the redirected connection is refused.
    let mut proxy = pod.children.pop().unwrap();
    proxy.kill().unwrap();
    proxy.wait().unwrap();
    let answer = pod.ask(1);
    assert!(answer.starts_with("failed:"), "{answer}");
}

/// The HTTP/1.1 and HTTP/2 servers of a host outside the mesh (`BACKEND`) and of a meshed
/// service's endpoint (on the namespace's 127.0.0.1, where no redirect applies).
const OUTSIDE_H1: u16 = 7000;
const OUTSIDE_H2: u16 = 7002;
const INSIDE_H1: u16 = 7001;
const INSIDE_H2: u16 = 7003;

#[test]
fn redirected_http_for_a_host_outside_the_mesh_reaches_that_host() {
    if let Some(missing) = missing() {
        eprintln!(
            "redirected_http_for_a_host_outside_the_mesh_reaches_that_host: skipped: needs \
             {missing}"
        );
        return;
    }
    let mut pod = Pod::new("http");
    let port = |port: u16| port.to_string();
    pod.serve(
        HTTP_SCRIPT,
        &["serve1", BACKEND, &port(OUTSIDE_H1), "outside"],
    );
    pod.serve(
        HTTP_SCRIPT,
        &["serve2", BACKEND, &port(OUTSIDE_H2), "outside-h2"],
    );
    pod.serve(
        HTTP_SCRIPT,
        &["serve1", "127.0.0.1", &port(INSIDE_H1), "inside"],
    );
    pod.serve(
        HTTP_SCRIPT,
        &["serve2", "127.0.0.1", &port(INSIDE_H2), "inside-h2"],
    );
    pod.start_proxy(&format!(
        "services:
  web.test:
    port: 80
    endpoints:
      - addr: 127.0.0.1:{INSIDE_H1}
  grpc.test:
    port: 80
    endpoints:
      - addr: 127.0.0.1:{INSIDE_H2}
"
    ));

    // A host discovery does not know: each request reaches the server the app was headed for
    // (retried while the proxy starts).
    let h1 = pod.get("get1", BACKEND, OUTSIDE_H1, "example.test", 30);
    assert_eq!(h1, "200 outside example.test", "{}", pod.proxy_log());
    let h2 = pod.get("get2", BACKEND, OUTSIDE_H2, "example.test", 3);
    assert_eq!(h2, "200 outside-h2", "{}", pod.proxy_log());

    // A known service's authority still goes where discovery says, whatever the address.
    let h1 = pod.get("get1", BACKEND, OUTSIDE_H1, "web.test", 3);
    assert_eq!(h1, "200 inside web.test", "{}", pod.proxy_log());
    let h2 = pod.get("get2", BACKEND, OUTSIDE_H2, "grpc.test", 3);
    assert_eq!(h2, "200 inside-h2", "{}", pod.proxy_log());

    // A client of the proxy itself (not redirected; conntrack tracks the connection, so the
    // kernel reports the proxy's own address as where it was headed) has nowhere else to go.
    let direct = pod.get("get1", "127.0.0.1", OUTBOUND_PORT, "example.test", 3);
    assert!(
        direct.starts_with("404 ") && direct.contains("not in discovery"),
        "{direct}"
    );

    // Counted under the request's authority, as any request.
    let metrics = pod.get_path("get1", "127.0.0.1", ADMIN_PORT, "admin", 3, "/metrics");
    assert!(
        metrics.contains("request_total{direction=\"outbound\",authority=\"example.test\"} 2"),
        "{metrics}"
    );
}

// === On loopback, without root ===

/// What the loopback network reports as each accepted connection's original destination.
#[derive(Clone, Copy, Debug)]
enum Redirect {
    /// Nothing: not redirected.
    No,
    /// This address.
    From(SocketAddr),
    /// The listener's own address (a client of the proxy itself, where the kernel reports the
    /// address the connection reached).
    FromSelf,
}

/// Loopback TCP where every accepted connection says it was redirected as [`Redirect`] says:
/// what the pod's iptables and `SO_ORIGINAL_DST` do, without root.
#[derive(Clone, Copy, Debug)]
struct RedirectNet(Redirect);

#[derive(Debug)]
struct RedirectListener {
    listener: TcpListener,
    redirect: Redirect,
}

#[derive(Debug)]
struct RedirectedIo {
    stream: TcpStream,
    original_dst: Option<SocketAddr>,
}

impl AsyncRead for RedirectedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for RedirectedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Listener for RedirectListener {
    type Io = RedirectedIo;

    async fn accept(&self) -> io::Result<(RedirectedIo, SocketAddr)> {
        let (stream, peer) = self.listener.accept().await?;
        stream.set_nodelay(true)?;
        let original_dst = match self.redirect {
            Redirect::No => None,
            Redirect::From(addr) => Some(addr),
            Redirect::FromSelf => Some(self.listener.local_addr()?),
        };
        Ok((
            RedirectedIo {
                stream,
                original_dst,
            },
            peer,
        ))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

impl Net for RedirectNet {
    type Io = RedirectedIo;
    type Listener = RedirectListener;

    async fn bind(&self, addr: SocketAddr) -> io::Result<RedirectListener> {
        Ok(RedirectListener {
            listener: TcpListener::bind(addr).await?,
            redirect: self.0,
        })
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<RedirectedIo> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(RedirectedIo {
            stream,
            original_dst: None,
        })
    }

    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }

    fn original_dst(io: &RedirectedIo) -> Option<SocketAddr> {
        io.original_dst
    }
}

/// Starts a proxy on `net` with `discovery`; it serves until the test's runtime ends.
async fn start(config: ProxyConfig, net: RedirectNet, discovery: impl Discover) -> Addrs {
    let proxy = Proxy::bind(config, net).await.unwrap();
    let addrs = proxy.addrs();
    tokio::spawn(async move {
        proxy
            .serve(discovery, 7, std::future::pending())
            .await
            .unwrap();
    });
    addrs
}

/// One GET for `authority` over a new connection of `engine` to `addr`.
async fn send(engine: Engine, addr: SocketAddr, authority: &str) -> Response<Incoming> {
    let request = match engine {
        Engine::H1 => Request::get("/").header("host", authority),
        Engine::H2 => Request::get(format!("http://{authority}/")),
    };
    let request = request.body(full("")).unwrap();
    match engine {
        Engine::H1 => h1_client(addr).await.send_request(request).await.unwrap(),
        Engine::H2 => h2_client(addr).await.send_request(request).await.unwrap(),
    }
}

/// A server (speaking `engine`'s protocol) that answers `NAME AUTHORITY`.
async fn named(engine: Engine, name: &'static str) -> SocketAddr {
    backend(
        engine == Engine::H2,
        move |request: Request<Incoming>| async move {
            let authority = match request.uri().authority() {
                Some(authority) => authority.to_string(),
                None => request.headers()["host"].to_str().unwrap().to_owned(),
            };
            Response::new(full(format!("{name} {authority}")))
        },
    )
    .await
}

async fn text(response: Response<Incoming>) -> String {
    String::from_utf8(body_bytes(response).await.to_vec()).unwrap()
}

fn error(response: &Response<Incoming>) -> &str {
    response
        .headers()
        .get(ERROR_HEADER)
        .map_or("", |value| value.to_str().unwrap())
}

#[tokio::test]
async fn an_unknown_authority_goes_to_the_original_destination_and_known_ones_do_not() {
    bounded(async {
        for engine in ENGINES {
            let outside = named(engine, "outside").await;
            let inside = named(engine, "inside").await;
            let discovery = StaticDiscover::new(mesh(&[("web.test", &[inside])]));
            let addrs = start(config(), RedirectNet(Redirect::From(outside)), discovery).await;

            let response = send(engine, addrs.outbound, "Example.test").await;
            assert_eq!(response.status(), StatusCode::OK, "{engine:?}");
            assert_eq!(error(&response), "", "{engine:?}");
            assert_eq!(text(response).await, "outside Example.test", "{engine:?}");

            let response = send(engine, addrs.outbound, "web.test").await;
            assert_eq!(response.status(), StatusCode::OK, "{engine:?}");
            assert_eq!(text(response).await, "inside web.test", "{engine:?}");

            // Counted under the authority (as the router keys it), like any request.
            let metrics = scrape(addrs.admin).await;
            let series = "{direction=\"outbound\",authority=\"example.test\"";
            assert_eq!(
                sample(&metrics, &format!("request_total{series}}}")),
                Some(1),
                "{engine:?}\n{metrics}"
            );
            assert_eq!(
                sample(
                    &metrics,
                    &format!(
                        "response_total{series},status_code=\"200\",classification=\"success\"}}"
                    )
                ),
                Some(1),
                "{engine:?}\n{metrics}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn without_an_original_destination_an_unknown_authority_gets_404() {
    bounded(async {
        for engine in ENGINES {
            // Not redirected (the proxy as an explicit proxy), and redirected from the
            // proxy's own address (a client of the proxy itself): nowhere else to go.
            for redirect in [Redirect::No, Redirect::FromSelf] {
                let discovery = StaticDiscover::new(mesh(&[]));
                let addrs = start(config(), RedirectNet(redirect), discovery).await;
                let response = send(engine, addrs.outbound, "nope.test").await;
                assert_eq!(
                    response.status(),
                    StatusCode::NOT_FOUND,
                    "{engine:?} {redirect:?}"
                );
                assert_eq!(
                    error(&response),
                    "unknown authority nope.test: not in discovery",
                    "{engine:?} {redirect:?}"
                );
            }
        }
    })
    .await;
}

#[tokio::test]
async fn the_original_destination_is_an_unmeshed_endpoint_with_the_proxys_errors() {
    bounded(async {
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        for engine in ENGINES {
            let discovery = StaticDiscover::new(mesh(&[]));
            let addrs = start(config(), RedirectNet(Redirect::From(closed)), discovery).await;
            let response = send(engine, addrs.outbound, "example.test").await;
            assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "{engine:?}");
            let reason = error(&response);
            assert!(reason.contains(&format!("connect to {closed}")), "{reason}");

            // A proxy that sends only mTLS refuses it, as any unmeshed endpoint.
            let outside = named(engine, "outside").await;
            let mut config = config();
            config.outbound_require_identity = true;
            let discovery = StaticDiscover::new(mesh(&[]));
            let addrs = start(config, RedirectNet(Redirect::From(outside)), discovery).await;
            let response = send(engine, addrs.outbound, "example.test").await;
            assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "{engine:?}");
            assert_eq!(
                error(&response),
                format!(
                    "{outside} is not meshed, and this proxy sends only mTLS \
                     (outbound_require_identity)"
                ),
                "{engine:?}"
            );
        }
    })
    .await;
}

/// Discovery that never answers.
#[derive(Debug, Default)]
struct Silent(std::sync::Mutex<Vec<watch::Sender<Resolution>>>);

impl Discover for Silent {
    fn resolve(&self, _authority: &str) -> watch::Receiver<Resolution> {
        let (tx, rx) = watch::channel(Resolution::Unknown);
        self.0.lock().unwrap().push(tx);
        rx
    }
}

#[tokio::test]
async fn only_discoverys_answer_sends_a_request_to_its_original_destination() {
    bounded(async {
        // Until discovery answers, the name may be a meshed service's: the request waits and
        // fails fast as any, rather than leave in plaintext.
        for engine in ENGINES {
            let outside = named(engine, "outside").await;
            let mut config = config();
            config.queue.failfast_timeout = Duration::from_millis(200);
            let net = RedirectNet(Redirect::From(outside));
            let addrs = start(config, net, Silent::default()).await;
            let response = send(engine, addrs.outbound, "web.test").await;
            assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT, "{engine:?}");
            assert!(
                error(&response).contains("fail-fast"),
                "{}",
                error(&response)
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_connection_that_was_not_redirected_has_no_original_destination() {
    bounded(async {
        // Linux answers ENOENT without a conntrack entry, and the connection's own address
        // with one that did no NAT: neither is an original destination.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(TokioNet::original_dst(&accepted), None);
        drop(client);
    })
    .await;
}
