//! `conduit demo` end to end: real controller and proxy processes on loopback, the demo's apps
//! and load generator, and the JSON summary a user or a script reads at the end.

use std::process::Command;

#[test]
fn the_demo_reports_traffic_for_every_service_and_the_failing_replica() {
    let conduit = env!("CARGO_BIN_EXE_conduit");
    let bin_dir = std::path::Path::new(conduit).parent().unwrap();
    for bin in ["conduit-proxy", "conduit-controller"] {
        assert!(
            bin_dir.join(bin).exists(),
            "{bin} is not built next to conduit; run `cargo test --workspace` (or build it first)"
        );
    }
    let output = Command::new(conduit)
        .args([
            "demo",
            "--duration",
            "5s",
            "--output",
            "json",
            "--rate",
            "50",
            "--bin-dir",
        ])
        .arg(bin_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed: {stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("demo printed no JSON ({e}): {stderr}"));
    let services = summary["services"].as_array().unwrap();
    assert_eq!(services.len(), 3);
    let rate = |name: &str| {
        let service = services.iter().find(|s| s["name"] == name).unwrap();
        assert!(
            service["requests"].as_u64().unwrap() > 50,
            "{name} saw traffic: {service}"
        );
        service["success_rate"].as_f64().unwrap()
    };
    let (web, api, store) = (rate("web.demo"), rate("api.demo"), rate("store.demo"));
    // Server side, the failing replica answers 30 % of what reaches it with errors (its
    // callers' proxies retry the GET routes, so fewer of those reach the caller).
    let api_service = services.iter().find(|s| s["name"] == "api.demo").unwrap();
    let failing = api_service["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["role"] == "failing")
        .unwrap();
    let failing_rate = failing["success_rate"].as_f64().unwrap();
    assert!(
        failing_rate < 0.85,
        "the failing replica fails: {failing_rate}"
    );
    assert!(
        api < 0.99,
        "the failing replica lowers api.demo's success rate: {api}"
    );
    assert!(
        web > 0.99 && store > 0.99,
        "healthy services succeed: {web} {store}"
    );
    // Latency-aware balancing: the slow web replica gets the smallest share.
    let web = services.iter().find(|s| s["name"] == "web.demo").unwrap();
    let replicas = web["replicas"].as_array().unwrap();
    let slow = replicas.iter().find(|r| r["role"] == "slow").unwrap()["requests"]
        .as_u64()
        .unwrap();
    for replica in replicas.iter().filter(|r| r["role"] == "healthy") {
        assert!(replica["requests"].as_u64().unwrap() > slow, "{replicas:?}");
    }
}
