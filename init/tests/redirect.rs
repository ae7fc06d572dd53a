//! `conduit-init` in a pod of the test's own making: two network namespaces joined by a veth
//! (`pod` and `peer`), the real binary run inside `pod` (twice, as a restarted init container
//! would be), and TCP checked both ways. Needs root, iproute2, iptables and python3 (for the
//! little servers and clients); says why and passes without them.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};

const POD_IP: &str = "10.215.0.1";
const PEER_IP: &str = "10.215.0.2";

/// A server (`serve PORT TEXT BIND`: answers every connection with TEXT, prints `ready` once
/// listening) and a client (`ask HOST PORT [UID]`: prints what the server sent, connecting as
/// UID when given).
const PEER_SCRIPT: &str = r#"
import encodings.idna, os, socket, sys
if sys.argv[1] == "serve":
    port, text, bind = int(sys.argv[2]), sys.argv[3], sys.argv[4]
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((bind, port))
    s.listen(16)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        c.sendall(text.encode())
        c.close()
else:
    host, port = sys.argv[2], int(sys.argv[3])
    if len(sys.argv) > 4:
        # Everything imported first: the interpreter's files may not be readable as UID.
        os.setuid(int(sys.argv[4]))
    s = socket.create_connection((host, port), timeout=10)
    data = b""
    while True:
        chunk = s.recv(100)
        if not chunk:
            break
        data += chunk
    print(data.decode())
"#;

/// Why this machine cannot run the test, if it cannot.
fn missing() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    let mut missing: Vec<String> = Vec::new();
    if !root {
        missing.push("root".into());
    }
    for tool in ["ip", "iptables", "iptables-restore", "python3"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            missing.push(tool.into());
        }
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// Runs a command, failing the test with its stderr when it fails; its stdout.
#[expect(clippy::unwrap_used, reason = "test helper: a failure is the report")]
fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn in_ns(ns: &str, args: &[&str]) -> String {
    let mut all = vec!["netns", "exec", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// The pod and its peer; both deleted when dropped, with every server started in them.
struct Pod {
    pod: String,
    peer: String,
    servers: Vec<Child>,
}

impl Pod {
    fn create() -> Self {
        let tag = format!("conduit-init-test-{}", std::process::id());
        let pod = Self {
            pod: format!("{tag}-pod"),
            peer: format!("{tag}-peer"),
            servers: Vec::new(),
        };
        for ns in [&pod.pod, &pod.peer] {
            run("ip", &["netns", "add", ns]);
            run("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        run(
            "ip",
            &[
                "link", "add", "eth0", "netns", &pod.pod, "type", "veth", "peer", "name", "eth0",
                "netns", &pod.peer,
            ],
        );
        for (ns, ip) in [(&pod.pod, POD_IP), (&pod.peer, PEER_IP)] {
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
            );
            run("ip", &["-n", ns, "link", "set", "eth0", "up"]);
        }
        pod
    }

    /// Starts a server in `ns` answering `text` on `bind:port`, once it listens.
    #[expect(clippy::unwrap_used, reason = "test helper: a failure is the report")]
    fn serve(&mut self, ns: &str, port: u16, text: &str, bind: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", PEER_SCRIPT, "serve"])
            .args([&port.to_string(), text, bind])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "ready", "server on {bind}:{port} in {ns}");
        self.servers.push(child);
    }
}

/// What a connection from `ns` to `host:port` (as `uid`, when given) is answered with.
fn ask(ns: &str, host: &str, port: u16, uid: Option<u32>) -> String {
    let port = port.to_string();
    let uid = uid.map(|u| u.to_string());
    let mut args = vec!["python3", "-c", PEER_SCRIPT, "ask", host, &port];
    if let Some(uid) = &uid {
        args.push(uid);
    }
    in_ns(ns, &args).trim().to_owned()
}

impl Drop for Pod {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        for ns in [&self.pod, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn a_pods_tcp_goes_through_the_proxy_except_the_proxys_own() {
    if let Some(missing) = missing() {
        eprintln!("skipped: conduit-init's namespace test needs {missing}");
        return;
    }
    let mut pod = Pod::create();
    let init = env!("CARGO_BIN_EXE_conduit-init");
    // Twice: a restarted init container must leave the same rules, not doubled ones.
    for _ in 0..2 {
        in_ns(&pod.pod, &[init, "--proxy-uid", "2102"]);
    }
    let rules: Vec<String> = in_ns(&pod.pod, &["iptables", "-t", "nat", "-S"])
        .lines()
        .filter(|line| line.contains("CONDUIT"))
        .map(str::to_owned)
        .collect();
    insta::assert_snapshot!(rules.join("\n"));

    let (pod_ns, peer_ns) = (pod.pod.clone(), pod.peer.clone());
    pod.serve(&pod_ns, 4143, "proxy-inbound", "0.0.0.0");
    pod.serve(&pod_ns, 4140, "proxy-outbound", "127.0.0.1");
    pod.serve(&pod_ns, 4191, "admin", "0.0.0.0");
    pod.serve(&pod_ns, 8080, "app", "0.0.0.0");
    pod.serve(&peer_ns, 9000, "peer", "0.0.0.0");

    // Inbound: any port of the pod lands on the proxy (the app's own port too), except the
    // ports left alone.
    assert_eq!(ask(&peer_ns, POD_IP, 8080, None), "proxy-inbound");
    assert_eq!(ask(&peer_ns, POD_IP, 22, None), "proxy-inbound");
    assert_eq!(ask(&peer_ns, POD_IP, 4191, None), "admin");
    // Outbound: an app's connection lands on the proxy; the proxy's own (its uid) goes where
    // it was going, and so does loopback traffic.
    assert_eq!(ask(&pod_ns, PEER_IP, 9000, None), "proxy-outbound");
    assert_eq!(ask(&pod_ns, PEER_IP, 9000, Some(2102)), "peer");
    assert_eq!(ask(&pod_ns, "127.0.0.1", 8080, None), "app");
}
