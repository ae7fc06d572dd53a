//! `conduit chaos` end to end: a swarm sweep over a few seeds with its report, a case file
//! replayed, a bounded `--real` run against real controller and proxy processes on loopback
//! that writes its report, and the same with each host in a network namespace (`--netns`,
//! where root, iproute2 and iptables are present).

use std::path::{Path, PathBuf};
use std::process::Command;

fn conduit() -> &'static str {
    env!("CARGO_BIN_EXE_conduit")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("conduit-cli-chaos-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn run(args: &[&str], out: &Path) -> (bool, String, String) {
    let output = Command::new(conduit())
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .expect("conduit runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_sweep_writes_its_report_and_a_case_file_replays() {
    let out = scratch("sweep");
    let (ok, stdout, stderr) = run(&["chaos", "--seeds", "0..4", "--jobs", "2"], &out);
    assert!(ok, "the sweep failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("4 runs, 0 failed"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["runs"], 4);
    assert!(report["requests"].as_u64().unwrap() > 100, "{report}");
    assert!(
        std::fs::read_to_string(out.join("report.txt"))
            .unwrap()
            .contains("fault kinds")
    );

    // A case file (what a failing seed leaves) runs again with --replay, the same way.
    let case = conduit_chaos::swarm::Case::draw(2);
    let file = out.join("seed-2.case.json");
    conduit_scenarios::chaos::write_case(&file, &case).unwrap();
    let replay = |file: &Path| {
        let output = Command::new(conduit())
            .args(["chaos", "--replay"])
            .arg(file)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "{stdout}");
        stdout
            .lines()
            .find(|l| l.starts_with("trace hash: "))
            .unwrap()
            .to_owned()
    };
    assert_eq!(replay(&file), replay(&file), "same case, same trace");
    let _ = std::fs::remove_dir_all(&out);
}

/// Runs `conduit chaos --real` (seed 3, 20 s at 100 requests per second) with `extra`
/// arguments, asserts the checks held and the counts, and returns its report, its stdout and
/// its output directory.
fn real_run(name: &str, extra: &[&str]) -> (serde_json::Value, String, PathBuf) {
    let bin_dir = Path::new(conduit())
        .parent()
        .expect("conduit has a directory");
    for bin in ["conduit-proxy", "conduit-controller"] {
        assert!(
            bin_dir.join(bin).exists(),
            "{bin} is not built next to conduit; run `cargo test --workspace` (or build it first)"
        );
    }
    let out = scratch(name);
    let mut args = vec![
        "chaos",
        "--real",
        "--duration",
        "20s",
        "--seed",
        "3",
        "--rate",
        "100",
        "--bin-dir",
        bin_dir.to_str().expect("a UTF-8 path"),
    ];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = run(&args, &out);
    assert!(ok, "the run failed:\n{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("real/report.json")).expect("the report is written"),
    )
    .expect("the report is JSON");
    assert_eq!(report["violations"], serde_json::json!([]), "{stdout}");
    assert_eq!(report["requests"], 2_000, "{stdout}");
    assert_eq!(report["proxy_counted"], 2_000, "{stdout}");
    assert!(
        report["faults"].as_array().expect("faults").len() >= 4,
        "{stdout}"
    );
    assert_eq!(
        report["processes"].as_array().expect("processes").len(),
        8,
        "{stdout}"
    );
    (report, stdout, out)
}

#[test]
fn a_real_run_breaks_processes_and_reports() {
    let (report, stdout, out) = real_run("real", &[]);
    assert_eq!(report["network"], "loopback", "{stdout}");
    let _ = std::fs::remove_dir_all(&out);
}

/// What `--netns` needs and this machine lacks, if anything.
fn netns_missing() -> Option<String> {
    let on_path = |tool: &str| {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
    };
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    });
    let mut missing: Vec<&str> = Vec::new();
    if !root {
        missing.push("root");
    }
    if !on_path("ip") {
        missing.push("ip (iproute2)");
    }
    if !on_path("iptables") {
        missing.push("iptables");
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

#[test]
fn a_real_run_in_namespaces_partitions_hosts_and_cleans_up() {
    if let Some(missing) = netns_missing() {
        eprintln!(
            "skipped: `conduit chaos --real --netns` needs {missing} (.ci/run installs iptables and runs as root)"
        );
        return;
    }
    // Seed 3 partitions the client from the controller and resets the client's connections
    // to a replica, besides the process and link faults.
    let (report, stdout, out) = real_run("netns", &["--netns"]);
    let kinds = &report["faults_by_kind"];
    assert!(kinds["partition"].as_u64().unwrap_or(0) >= 1, "{stdout}");
    assert!(kinds["tcp_reset"].as_u64().unwrap_or(0) >= 1, "{stdout}");
    // Each host had a namespace of its own, and none is left.
    let network = report["network"].as_str().unwrap();
    for host in [
        "client",
        "controller",
        "replica-0",
        "replica-1",
        "replica-2",
    ] {
        assert!(network.contains(&format!("{host} 10.213.")), "{network}");
    }
    let left: Vec<String> = std::fs::read_dir("/var/run/netns")
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| network.contains(name.as_str()))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&out);
}
