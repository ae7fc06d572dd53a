//! `conduit identity`: `token` prints a token the controller's CA accepts (and says what to do
//! when the identity directory has no token key yet); `add-anchor`, `rotate-issuer` and
//! `retire-anchors` rotate the trust anchor in that order.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

use std::process::{Command, Output};

use conduit_controller::identity::{
    CertificateAuthority, IdentityConfig, fixed_wall_clock, issue_token,
};
use conduit_core::time::UnixTime;

fn conduit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_conduit"))
        .args(args)
        .env_remove("CONDUIT_CONTROLLER_IDENTITY_DIR")
        .output()
        .unwrap()
}

#[test]
fn identity_token_prints_the_directory_s_token() {
    let dir = std::env::temp_dir().join(format!("conduit-cli-identity-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_arg = dir.to_str().unwrap();

    let output = conduit(&[
        "identity",
        "token",
        "web.default",
        "--identity-dir",
        dir_arg,
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("start the controller"), "{stderr}");

    // What a controller does on first start.
    let _ = CertificateAuthority::open(
        &IdentityConfig::new(dir.clone()),
        fixed_wall_clock(UnixTime::from_secs(1_700_000_000)),
    )
    .unwrap();
    let output = conduit(&[
        "identity",
        "token",
        "web.default",
        "--identity-dir",
        dir_arg,
    ]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        format!("{}\n", issue_token(&dir, "web.default").unwrap())
    );

    let output = conduit(&[
        "identity",
        "token",
        "Web_Default",
        "--identity-dir",
        dir_arg,
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid identity `Web_Default`"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_anchor_rotates_in_three_commands() {
    let dir = std::env::temp_dir().join(format!("conduit-cli-anchor-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_arg = dir.to_str().unwrap();
    let run = |command: &str| conduit(&["identity", command, "--identity-dir", dir_arg]);
    let clock = conduit_controller::identity::system_wall_clock();
    let _ = CertificateAuthority::open(&IdentityConfig::new(dir.clone()), clock.clone()).unwrap();
    let anchors = || {
        let pem = std::fs::read_to_string(dir.join("trust-anchors.pem")).unwrap();
        pem.matches("BEGIN CERTIFICATE").count()
    };

    let output = run("add-anchor");
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("rotate-issuer"));
    assert_eq!(anchors(), 2);
    // Too early: the issuer still chains to the old anchor.
    let output = run("retire-anchors");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("rotate-issuer"));
    assert_eq!(anchors(), 2);

    assert!(run("rotate-issuer").status.success());
    let output = run("retire-anchors");
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("removed 1"));
    assert_eq!(anchors(), 1);
    // A controller starts on the rotated directory.
    let ca = CertificateAuthority::open(&IdentityConfig::new(dir.clone()), clock).unwrap();
    assert_eq!(ca.trust_anchors().len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}
