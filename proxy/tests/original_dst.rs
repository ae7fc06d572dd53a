//! Redirected non-HTTP traffic goes on to where it was headed: in a network namespace of the
//! test's own making, an iptables `REDIRECT` (as `conduit-init` sets up) sends an app's TCP
//! connection to the proxy's outbound port; the proxy recovers the original destination
//! (`SO_ORIGINAL_DST`) and forwards the opaque bytes there. Needs root, iproute2, iptables and
//! python3 (for the little server and client); says why and passes without them.

#![allow(
    clippy::unwrap_used,
    reason = "test steps: any failed step fails the test"
)]

use std::process::{Child, Command, Stdio};

const BACKEND: &str = "10.216.0.1";
const BACKEND_PORT: u16 = 7000;
const OUTBOUND_PORT: u16 = 4140;
/// The app's uid (the proxy runs as root, which the redirect spares).
const APP_UID: u32 = 1234;

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
    fn exec(&self) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns]);
        command
    }

    fn ask(&self, tries: u32) -> String {
        let output = self
            .exec()
            .args(["python3", "-c", SCRIPT, "ask", BACKEND])
            .arg(BACKEND_PORT.to_string())
            .arg(tries.to_string())
            .arg(APP_UID.to_string())
            .output()
            .unwrap();
        let answer = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if answer.is_empty() {
            format!("no answer: {}", String::from_utf8_lossy(&output.stderr))
        } else {
            answer
        }
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
    let ns = format!("conduit-odst-{}", std::process::id());
    let dir = std::env::temp_dir().join(&ns);
    std::fs::create_dir_all(&dir).unwrap();
    let mut pod = Pod {
        ns: ns.clone(),
        children: Vec::new(),
        dir: dir.clone(),
    };
    run(&["ip", "netns", "add", &ns]);
    run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
    // The backend's address on the namespace's loopback (no other device is needed).
    run(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{BACKEND}/32"),
        "dev",
        "lo",
    ]);
    // The app's connections to the backend land on the proxy's outbound port; the proxy's
    // own (root's) do not, as conduit-init spares the proxy's uid.
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
        "--dport",
        &BACKEND_PORT.to_string(),
        "-m",
        "owner",
        "!",
        "--uid-owner",
        "0",
        "-j",
        "REDIRECT",
        "--to-ports",
        &OUTBOUND_PORT.to_string(),
    ]);

    let mut backend = pod
        .exec()
        .args(["python3", "-c", SCRIPT, "serve", BACKEND])
        .arg(BACKEND_PORT.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(backend.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ready");
    pod.children.push(backend);

    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, "services: {}\n").unwrap();
    let proxy = pod
        .exec()
        .arg(env!("CARGO_BIN_EXE_conduit-proxy"))
        .env(
            "CONDUIT_PROXY_OUTBOUND_ADDR",
            format!("127.0.0.1:{OUTBOUND_PORT}"),
        )
        .env("CONDUIT_PROXY_INBOUND_ADDR", "127.0.0.1:4143")
        .env("CONDUIT_PROXY_ADMIN_ADDR", "127.0.0.1:4191")
        .env(
            "CONDUIT_PROXY_DISCOVERY",
            format!("file:{}", mesh.display()),
        )
        .env("CONDUIT_PROXY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    pod.children.push(proxy);

    // Retried while the proxy starts (until then the redirect meets a closed port).
    assert_eq!(pod.ask(30), "pong:hello");

    // It went through the proxy: with the proxy gone, the redirected connection is refused.
    let mut proxy = pod.children.pop().unwrap();
    proxy.kill().unwrap();
    proxy.wait().unwrap();
    let answer = pod.ask(1);
    assert!(answer.starts_with("failed:"), "{answer}");
}
