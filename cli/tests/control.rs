//! `conduit check` and `conduit stat` against a real `conduit-controller` process on loopback.

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
