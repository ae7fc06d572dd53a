//! Network namespaces of `conduit chaos --real --netns`: one per host and a router between
//! them, where iptables partitions hosts and drops packets.
//!
//! The layout is a star. Each host namespace `conduit-chaos-<pid>-<host>` has one veth
//! (`eth0`, 10.213.N.2/24, default route via 10.213.N.1) whose peer (`hN`, 10.213.N.1/24)
//! sits in the router namespace `conduit-chaos-<pid>-router`, which forwards. Every veth is
//! created directly inside the namespaces, so the machine's own network namespace gains no
//! device, route or rule; the addresses are reachable only from inside these namespaces.
//! Every fault is a rule in the router's FORWARD chain (its own: a namespace has its own
//! tables) or a rule removed from it.
//!
//! Dropping [`Netns`] deletes every namespace it made (their veths go with them). A run
//! killed with SIGKILL cannot do that, so [`Netns::create`] first deletes the namespaces of
//! earlier runs whose process is gone.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsFd as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// Names of our namespaces start with this, then the creating process's id.
const PREFIX: &str = "conduit-chaos-";

/// A host of the run, in its namespace.
#[derive(Clone, Debug)]
pub(crate) struct Host {
    /// What the run calls it (`client`, `controller`, `replica-0`).
    pub(crate) name: String,
    /// Its namespace.
    pub(crate) ns: String,
    /// Its address, reachable from every other host through the router.
    pub(crate) ip: Ipv4Addr,
}

/// The namespaces of one run; deleted when dropped.
#[derive(Debug)]
pub(crate) struct Netns {
    router: String,
    hosts: Vec<Host>,
    /// Every namespace made so far, deleted on drop (also after a partial create).
    made: Vec<String>,
}

/// Why `--netns` cannot run here, if it cannot: it needs root, `ip` (iproute2) and `iptables`.
pub(crate) fn missing() -> Option<String> {
    let mut missing = Vec::new();
    if !rustix::process::geteuid().is_root() {
        missing.push("root (it makes network namespaces and iptables rules)".to_owned());
    }
    for tool in ["ip", "iptables"] {
        if which(tool).is_none() {
            missing.push(format!(
                "`{tool}` on PATH ({})",
                if tool == "ip" { "iproute2" } else { "iptables" }
            ));
        }
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(tool))
            .find(|p| p.is_file())
    })
}

/// Runs `program args`, failing with its stderr when it fails.
fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `args` inside namespace `ns`.
fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["netns", "exec", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

impl Netns {
    /// Makes a namespace per host of `hosts` and the router, wired as a star.
    ///
    /// # Errors
    ///
    /// A namespace, link, address or route could not be made (what was made is deleted).
    pub(crate) fn create(hosts: &[&str]) -> anyhow::Result<Self> {
        if let Some(missing) = missing() {
            bail!("--netns needs {missing}");
        }
        remove_stale();
        let tag = format!("{PREFIX}{}", std::process::id());
        let mut netns = Self {
            router: format!("{tag}-router"),
            hosts: Vec::new(),
            made: Vec::new(),
        };
        let router = netns.router.clone();
        netns.add_ns(&router)?;
        // Forwarding, and no reverse-path filter in the way of asymmetric drops.
        in_ns(
            &router,
            &[
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/ip_forward && echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter",
            ],
        )?;
        for (index, name) in hosts.iter().enumerate() {
            let n = u8::try_from(index + 1).context("at most 254 hosts")?;
            let ns = format!("{tag}-{name}");
            netns.add_ns(&ns)?;
            let peer = format!("h{n}");
            run(
                "ip",
                &[
                    "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &peer,
                    "netns", &router,
                ],
            )?;
            let ip = Ipv4Addr::new(10, 213, n, 2);
            let gateway = Ipv4Addr::new(10, 213, n, 1);
            run(
                "ip",
                &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &router,
                    "addr",
                    "add",
                    &format!("{gateway}/24"),
                    "dev",
                    &peer,
                ],
            )?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &router, "link", "set", &peer, "up"])?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "route",
                    "add",
                    "default",
                    "via",
                    &gateway.to_string(),
                ],
            )?;
            netns.hosts.push(Host {
                name: (*name).to_owned(),
                ns,
                ip,
            });
        }
        Ok(netns)
    }

    fn add_ns(&mut self, ns: &str) -> anyhow::Result<()> {
        run("ip", &["netns", "add", ns])?;
        self.made.push(ns.to_owned());
        run("ip", &["-n", ns, "link", "set", "lo", "up"])
    }

    /// The host named `name`.
    ///
    /// # Errors
    ///
    /// No such host.
    pub(crate) fn host(&self, name: &str) -> anyhow::Result<&Host> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .with_context(|| format!("no host named {name}"))
    }

    /// Moves the calling thread into `host`'s namespace: sockets it makes after this are
    /// that host's. (A network namespace is per thread: the rest of the process stays.)
    ///
    /// # Errors
    ///
    /// The namespace could not be opened or entered.
    pub(crate) fn enter(&self, host: &str) -> anyhow::Result<()> {
        let ns = &self.host(host)?.ns;
        let file = File::open(format!("/var/run/netns/{ns}"))
            .with_context(|| format!("opening namespace {ns}"))?;
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .with_context(|| format!("entering namespace {ns}"))
    }

    /// The program and leading arguments that run a command inside `host`'s namespace.
    ///
    /// # Errors
    ///
    /// No such host.
    pub(crate) fn exec_prefix(&self, host: &str) -> anyhow::Result<Vec<String>> {
        Ok(vec![
            "netns".to_owned(),
            "exec".to_owned(),
            self.host(host)?.ns.clone(),
        ])
    }

    /// Adds (`on`) or removes one instance of `rule` (iptables arguments after the chain) in
    /// the router's FORWARD chain. Overlapping faults add a rule each, and each heal removes
    /// its own. Asynchronous: the run's traffic shares the thread.
    async fn forward_rule(&self, on: bool, rule: &[String]) -> anyhow::Result<()> {
        let output = tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.router, "iptables", "-w"])
            .arg(if on { "-A" } else { "-D" })
            .arg("FORWARD")
            .args(rule)
            .stdin(Stdio::null())
            .output()
            .await
            .context("running iptables")?;
        if !output.status.success() {
            bail!(
                "`iptables {} FORWARD {}` in {} failed ({}): {}",
                if on { "-A" } else { "-D" },
                rule.join(" "),
                self.router,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// Drops every packet from `from` to `to` (on) or stops (off).
    ///
    /// # Errors
    ///
    /// iptables failed.
    pub(crate) async fn drop_between(&self, on: bool, from: &str, to: &str) -> anyhow::Result<()> {
        let (from, to) = (self.host(from)?.ip, self.host(to)?.ip);
        self.forward_rule(
            on,
            &[
                "-s".into(),
                from.to_string(),
                "-d".into(),
                to.to_string(),
                "-j".into(),
                "DROP".into(),
            ],
        )
        .await
    }

    /// Answers every TCP segment from `from` to `to` with a reset (on) or stops (off).
    ///
    /// # Errors
    ///
    /// iptables failed.
    pub(crate) async fn reset_between(&self, on: bool, from: &str, to: &str) -> anyhow::Result<()> {
        let (from, to) = (self.host(from)?.ip, self.host(to)?.ip);
        self.forward_rule(
            on,
            &[
                "-p".into(),
                "tcp".into(),
                "-s".into(),
                from.to_string(),
                "-d".into(),
                to.to_string(),
                "-j".into(),
                "REJECT".into(),
                "--reject-with".into(),
                "tcp-reset".into(),
            ],
        )
        .await
    }

    /// Drops each packet to or from `host` with probability `percent` / 100 (on) or stops.
    ///
    /// # Errors
    ///
    /// iptables failed.
    pub(crate) async fn loss(&self, on: bool, host: &str, percent: u64) -> anyhow::Result<()> {
        let ip = self.host(host)?.ip.to_string();
        let probability = if percent >= 100 {
            "1".to_owned()
        } else {
            format!("0.{percent:02}")
        };
        for side in ["-s", "-d"] {
            self.forward_rule(
                on,
                &[
                    side.into(),
                    ip.clone(),
                    "-m".into(),
                    "statistic".into(),
                    "--mode".into(),
                    "random".into(),
                    "--probability".into(),
                    probability.clone(),
                    "-j".into(),
                    "DROP".into(),
                ],
            )
            .await?;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in self.made.drain(..).rev() {
            if let Err(err) = run("ip", &["netns", "del", &ns]) {
                eprintln!("conduit chaos: could not delete namespace {ns}: {err}");
            }
        }
    }
}

/// Deletes namespaces an earlier run made and could not delete (it was killed): those whose
/// creating process no longer exists.
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let gone =
            pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists();
        if gone && let Err(err) = run("ip", &["netns", "del", &name]) {
            eprintln!("conduit chaos: could not delete stale namespace {name}: {err}");
        }
    }
}
