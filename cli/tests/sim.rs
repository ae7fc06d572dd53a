//! `conduit sim --all`: every registered scenario swept over a seed range, each seed in its own
//! process, summarised in a table per scenario.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

use std::process::Command;

#[test]
fn sim_all_sweeps_every_scenario_and_prints_a_row_for_each() {
    let conduit = env!("CARGO_BIN_EXE_conduit");
    let list = Command::new(conduit)
        .args(["sim", "--list"])
        .output()
        .unwrap();
    let names: Vec<String> = String::from_utf8(list.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    assert!(names.len() > 10, "{names:?}");

    let sweep = Command::new(conduit)
        .args(["sim", "--all", "--seeds", "3..4", "--jobs", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8(sweep.stdout).unwrap();
    assert!(sweep.status.success(), "{stdout}");
    for name in &names {
        let row = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("no row for {name}:\n{stdout}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[1..3], ["1", "0"], "{row}");
    }
    assert!(
        stdout.ends_with(&format!("{n} runs, 0 failed\n", n = names.len())),
        "{stdout}"
    );

    // `--all` names no scenario itself.
    let both = Command::new(conduit)
        .args([
            "sim",
            "--all",
            "--scenario",
            "slow_client",
            "--seeds",
            "0..1",
        ])
        .output()
        .unwrap();
    assert!(!both.status.success());
}
