//! `conduit-init`: sends a pod's TCP through its conduit-proxy, as the init container the
//! injector adds does before the pod's apps start.
//!
//! Two chains of the pod's own `nat` table (a pod has its own network namespace):
//!
//! - `CONDUIT_INBOUND`, from `PREROUTING`: TCP arriving at the pod, to any port but the ones
//!   left alone (the proxy's admin port by default, so probes and scrapes reach it as they
//!   are), is redirected to the proxy's inbound port.
//! - `CONDUIT_OUTPUT`, from `OUTPUT`: TCP the pod's processes open is redirected to the
//!   proxy's outbound port, except the proxy's own (by its uid: its connections go where they
//!   were going), loopback traffic, and ports left alone.
//!
//! The rules go in with one `iptables-restore --noflush`, so they are all in place or none
//! are; running again (a restarted init container) rewrites the two chains and adds the jumps
//! to them only where they are missing, so nothing is doubled.

use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// The chain for TCP arriving at the pod.
pub const INBOUND_CHAIN: &str = "CONDUIT_INBOUND";
/// The chain for TCP the pod's processes open.
pub const OUTPUT_CHAIN: &str = "CONDUIT_OUTPUT";

/// What to redirect, and where.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct Redirect {
    /// The proxy's inbound port: TCP arriving at the pod lands here.
    #[arg(long, default_value_t = 4143)]
    pub inbound_port: u16,
    /// The proxy's outbound port: TCP the pod's processes open lands here (on 127.0.0.1).
    #[arg(long, default_value_t = 4140)]
    pub outbound_port: u16,
    /// The uid the proxy runs as: its own connections are never redirected.
    #[arg(long, default_value_t = 2102)]
    pub proxy_uid: u32,
    /// Ports of the pod that TCP reaches directly (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "4191")]
    pub skip_inbound_ports: Vec<u16>,
    /// Destination ports the pod's processes reach directly (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub skip_outbound_ports: Vec<u16>,
}

impl Redirect {
    /// Refuses settings that would loop traffic or lose it.
    ///
    /// # Errors
    ///
    /// A port is 0, the two proxy ports are the same, or a proxy port is left alone.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.inbound_port == 0 || self.outbound_port == 0 {
            bail!("proxy ports must not be 0");
        }
        if self.inbound_port == self.outbound_port {
            bail!(
                "the inbound and outbound ports are both {}: inbound traffic would be handled as outbound",
                self.inbound_port
            );
        }
        if self.skip_inbound_ports.contains(&self.inbound_port) {
            bail!(
                "--skip-inbound-ports names the proxy's inbound port {}",
                self.inbound_port
            );
        }
        if let Some(zero) = self
            .skip_inbound_ports
            .iter()
            .chain(&self.skip_outbound_ports)
            .find(|p| **p == 0)
        {
            bail!("port {zero} cannot be left alone: ports start at 1");
        }
        Ok(())
    }

    /// The `iptables-restore --noflush` input that sets the rules, given the table as it is
    /// now (`iptables -t nat -S`): the two chains written whole, and the jumps to them only
    /// where missing.
    #[must_use]
    pub fn rules(&self, current: &str) -> String {
        let mut out = String::from("*nat\n");
        // Declaring a chain creates it, or empties it when it exists.
        out.push_str(&format!(
            ":{INBOUND_CHAIN} - [0:0]\n:{OUTPUT_CHAIN} - [0:0]\n"
        ));
        for port in &self.skip_inbound_ports {
            out.push_str(&format!(
                "-A {INBOUND_CHAIN} -p tcp -m tcp --dport {port} -j RETURN\n"
            ));
        }
        out.push_str(&format!(
            "-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}\n",
            self.inbound_port
        ));
        out.push_str(&format!(
            "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN\n",
            self.proxy_uid
        ));
        out.push_str(&format!("-A {OUTPUT_CHAIN} -o lo -j RETURN\n"));
        for port in &self.skip_outbound_ports {
            out.push_str(&format!(
                "-A {OUTPUT_CHAIN} -p tcp -m tcp --dport {port} -j RETURN\n"
            ));
        }
        out.push_str(&format!(
            "-A {OUTPUT_CHAIN} -p tcp -j REDIRECT --to-ports {}\n",
            self.outbound_port
        ));
        for (chain, target) in [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTPUT_CHAIN)] {
            let jump = format!("-A {chain} -p tcp -j {target}");
            if !current.lines().any(|line| line.trim() == jump) {
                out.push_str(&jump);
                out.push('\n');
            }
        }
        out.push_str("COMMIT\n");
        out
    }

    /// Sets the rules in the current network namespace.
    ///
    /// # Errors
    ///
    /// The settings are invalid, or `iptables` / `iptables-restore` failed (their stderr is
    /// in the error).
    pub fn apply(&self) -> anyhow::Result<()> {
        self.validate()?;
        let current = iptables(&["-w", "-t", "nat", "-S"])?;
        let rules = self.rules(&current);
        let mut restore = Command::new("iptables-restore")
            .args(["-w", "--noflush"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running iptables-restore (is iptables installed?)")?;
        restore
            .stdin
            .take()
            .context("iptables-restore's stdin")?
            .write_all(rules.as_bytes())
            .context("writing the rules to iptables-restore")?;
        let output = restore
            .wait_with_output()
            .context("waiting for iptables-restore")?;
        if !output.status.success() {
            bail!(
                "iptables-restore failed ({}): {}\nrules:\n{rules}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }
}

/// Runs `iptables args` and returns its stdout.
fn iptables(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("iptables")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running iptables (is iptables installed?)")?;
    if !output.status.success() {
        bail!(
            "`iptables {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).context("iptables printed something that is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Redirect {
        Redirect {
            inbound_port: 4143,
            outbound_port: 4140,
            proxy_uid: 2102,
            skip_inbound_ports: vec![4191],
            skip_outbound_ports: vec![],
        }
    }

    #[test]
    fn the_rules_redirect_both_ways_and_spare_the_proxy() {
        let mut redirect = defaults();
        redirect.skip_outbound_ports = vec![25, 3306];
        insta::assert_snapshot!(redirect.rules(""));
    }

    #[test]
    fn jumps_already_in_place_are_not_added_again() {
        let current = "-P PREROUTING ACCEPT\n-A PREROUTING -p tcp -j CONDUIT_INBOUND\n\
                       -A OUTPUT -p tcp -j CONDUIT_OUTPUT\n";
        let rules = defaults().rules(current);
        assert!(!rules.contains("-A PREROUTING"), "{rules}");
        assert!(!rules.contains("-A OUTPUT "), "{rules}");
        assert!(rules.contains(":CONDUIT_INBOUND - [0:0]"), "{rules}");
    }

    #[test]
    fn settings_that_would_loop_or_lose_traffic_are_refused() {
        let mut same = defaults();
        same.outbound_port = 4143;
        assert!(same.validate().is_err());
        let mut skipped = defaults();
        skipped.skip_inbound_ports = vec![4143];
        assert!(skipped.validate().is_err());
        let mut zero = defaults();
        zero.skip_outbound_ports = vec![0];
        assert!(zero.validate().is_err());
        assert!(defaults().validate().is_ok());
    }
}
