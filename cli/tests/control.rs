//! `conduit check`, `conduit stat` and `conduit routes` against a real `conduit-controller`
//! process on loopback.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn conduit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_conduit"))
        .args(args)
        .output()
        .unwrap()
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn controller_bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_conduit")).with_file_name("conduit-controller");
    assert!(
        bin.exists(),
        "conduit-controller is not built; run `cargo test --workspace`"
    );
    bin
}

/// A controller process, killed on drop.
struct Controller {
    child: std::process::Child,
    grpc: SocketAddr,
    admin: SocketAddr,
    _dir: PathBuf,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

async fn start_controller(mesh: &str) -> Controller {
    let dir = std::env::temp_dir().join(format!("conduit-cli-test-{}", free_port().port()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("mesh.yaml"), mesh).unwrap();
    let (grpc, admin) = (free_port(), free_port());
    let child = Command::new(controller_bin())
        .env("CONDUIT_CONTROLLER_GRPC_ADDR", grpc.to_string())
        .env("CONDUIT_CONTROLLER_ADMIN_ADDR", admin.to_string())
        .env("CONDUIT_CONTROLLER_MESH_FILE", dir.join("mesh.yaml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let controller = Controller {
        child,
        grpc,
        admin,
        _dir: dir,
    };
    // Bounded wait for the admin port to answer.
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(admin).await.is_ok() {
            return controller;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the controller did not start listening on {admin}");
}

#[test]
fn check_fails_when_the_controller_is_down() {
    let (grpc, admin) = (free_port(), free_port());
    let output = conduit(&[
        "check",
        "--controller",
        &grpc.to_string(),
        "--controller-admin",
        &admin.to_string(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(stdout.contains("[FAIL] controller API answers"), "{stdout}");
    assert!(stdout.contains("[FAIL] controller is ready"), "{stdout}");
}

#[tokio::test(flavor = "current_thread")]
async fn check_passes_and_flags_a_dead_proxy() {
    let dead_admin = free_port();
    let controller = start_controller(&format!(
        "services:\n  web.default:\n    endpoints:\n      - addr: 127.0.0.1:9001\n      - addr: 127.0.0.1:9002\n        admin: {dead_admin}\n"
    ))
    .await;
    let (grpc, admin) = (controller.grpc.to_string(), controller.admin.to_string());
    let output = conduit(&["check", "--controller", &grpc, "--controller-admin", &admin]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("[ok]   controller API answers"), "{stdout}");
    assert!(stdout.contains("[ok]   controller is ready"), "{stdout}");
    assert!(
        stdout.contains("[ok]   proxy for web.default 127.0.0.1:9001 is ready: not probed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("[FAIL] proxy for web.default 127.0.0.1:9002 is ready"),
        "{stdout}"
    );
    assert!(!output.status.success(), "a dead proxy fails the check");

    // stat answers, and says it could not read that workload's proxies.
    let output = conduit(&["stat", "--controller", &grpc, "--window", "100ms"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("web.default"), "{stdout}");
    assert!(
        stdout.contains("no proxy metrics could be read for: web.default"),
        "{stdout}"
    );
}

/// A proxy admin server stand-in on its own thread: every `GET /metrics` answers per-route
/// families whose counters have grown by one scrape's worth of traffic since the last.
fn fake_admin() -> SocketAddr {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        // Bounded: far more scrapes than the tests make.
        for (scrape, stream) in listener.incoming().take(100).enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let n = 10 * (u64::try_from(scrape).unwrap() + 1);
            let mut body = String::new();
            for (route, status, class, count) in [
                ("get-item", 200, "success", 3 * n),
                ("get-item", 500, "failure", n),
                ("default", 404, "success", n),
            ] {
                let labels = format!(
                    "direction=\"inbound\",authority=\"api.demo:80\",route=\"{route}\",status_code=\"{status}\""
                );
                body.push_str(&format!(
                    "route_response_total{{{labels},classification=\"{class}\"}} {count}\n\
                     route_response_latency_ms_bucket{{{labels},le=\"5\"}} {count}\n\
                     route_response_latency_ms_bucket{{{labels},le=\"+Inf\"}} {count}\n"
                ));
            }
            // The same proxy as a caller of api.demo (outbound): every caller got a success,
            // one attempt in five failed and was retried.
            let labels = "direction=\"outbound\",authority=\"api.demo:80\",route=\"get-item\"";
            body.push_str(&format!(
                "route_response_total{{{labels},status_code=\"200\",classification=\"success\"}} {}\n\
                 route_actual_response_total{{{labels},status_code=\"200\",classification=\"success\"}} {}\n\
                 route_actual_response_total{{{labels},status_code=\"503\",classification=\"failure\"}} {n}\n",
                4 * n,
                4 * n
            ));
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

fn routed_mesh(admin: SocketAddr) -> String {
    format!(
        "services:
  api.demo:
    endpoints:
      - addr: 127.0.0.1:9001
        admin: {admin}
    profile:
      routes:
        - name: list-items
          match: {{ method: GET, path: {{ exact: /items }} }}
        - name: get-item
          match: {{ method: GET, path: {{ regex: \"/items/[0-9]+\" }} }}
          timeouts: {{ request: 500ms }}
  web.demo: {{}}
"
    )
}

#[tokio::test(flavor = "current_thread")]
async fn routes_shows_every_route_of_the_profile() {
    let controller = start_controller(&routed_mesh(fake_admin())).await;
    let grpc = controller.grpc.to_string();

    let output = conduit(&[
        "routes",
        "api.demo",
        "--controller",
        &grpc,
        "--window",
        "100ms",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let words = |line: &str| {
        line.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        words(lines[0]),
        [
            "ROUTE",
            "SUCCESS",
            "RPS",
            "LATENCY_P50",
            "LATENCY_P95",
            "LATENCY_P99",
            "EFFECTIVE_SUCCESS",
            "ACTUAL_SUCCESS"
        ]
    );
    // One scrape's growth between the two scrapes: get-item 30 successes and 10 failures;
    // its callers got 40 successes out of 50 attempts.
    assert_eq!(words(lines[1])[..2], ["get-item", "75.00%"], "{stdout}");
    assert_eq!(words(lines[1])[6..], ["100.00%", "80.00%"], "{stdout}");
    assert_eq!(
        words(lines[2]),
        ["list-items", "-", "0.0", "-", "-", "-", "-", "-"],
        "{stdout}"
    );
    assert_eq!(words(lines[3])[..2], ["default", "100.00%"], "{stdout}");
    assert_eq!(lines.len(), 4, "{stdout}");

    let output = conduit(&[
        "routes",
        "api.demo:80",
        "--controller",
        &grpc,
        "--window",
        "100ms",
        "--output",
        "json",
    ]);
    assert!(output.status.success());
    let rows: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["route"].as_str().unwrap()).collect();
    assert_eq!(names, ["get-item", "list-items", "default"]);
    assert_eq!(rows[0]["success_count"], 30);
    assert_eq!(rows[0]["failure_count"], 10);
    assert_eq!(rows[0]["success_rate"], 0.75);
    assert_eq!(rows[0]["effective_success_count"], 40);
    assert_eq!(rows[0]["effective_failure_count"], 0);
    assert_eq!(rows[0]["actual_success_count"], 40);
    assert_eq!(rows[0]["actual_failure_count"], 10);
    assert_eq!(rows[0]["window_ms"], 100);
    assert!(rows[0]["p50_ms"].as_f64().is_some_and(|p50| p50 <= 5.0));
    assert_eq!(rows[1]["success_rate"], serde_json::Value::Null);

    // A service without a profile has only the default route, and says its proxies were not
    // read.
    let output = conduit(&[
        "routes",
        "web.demo",
        "--controller",
        &grpc,
        "--window",
        "100ms",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("default ")),
        "{stdout}"
    );
    assert!(
        stdout.contains("no proxy metrics could be read for web.demo"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn routes_names_unknown_services_and_unreachable_controllers() {
    let controller = start_controller(&routed_mesh(free_port())).await;
    let grpc = controller.grpc.to_string();
    let output = conduit(&["routes", "nope.demo", "--controller", &grpc]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!(
            "unknown service `nope.demo`: the controller at {grpc} has no service of that name (it knows: api.demo, web.demo)"
        )),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());

    let down = free_port().to_string();
    let output = conduit(&["routes", "api.demo", "--controller", &down]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("connecting to the controller at {down}")),
        "{stderr}"
    );
}
