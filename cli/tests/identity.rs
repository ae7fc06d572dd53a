//! `conduit identity token`: prints a token the controller's CA accepts, and says what to do
//! when the identity directory has no token key yet.

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
