//! The `conduit-proxy` binary: reads configuration from the environment (and the YAML file
//! `CONDUIT_PROXY_CONFIG` names), sets up logging and the runtime, and runs the proxy on the
//! kernel's network until SIGTERM/SIGINT or `/shutdown`.

use std::process::ExitCode;

use anyhow::Context as _;
use conduit_core::rand::DetRng;
use conduit_proxy::config::{DiscoveryConfig, ProxyConfig};
use conduit_proxy::discover::controller::ControllerDiscoverConfig;
use conduit_proxy::{ControllerDiscover, FileDiscover, TokioNet, entropy};

/// jemalloc, with a background thread that gives pages freed for a second back to the
/// kernel (`.cargo/config.toml` sets the decay). glibc's malloc keeps every hole a burst of
/// busy connections leaves between long-lived ones resident for good, and an idle proxy makes
/// no calls that would trim it: 1,301 bytes of RSS per idle HTTP/1.1 connection after 10,000
/// connections, against 873 with this allocator (`proxy/benches/loopback/idle_memory.py`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let config = match load() {
        Ok(config) => config,
        Err(err) => {
            // Logging is not set up yet (its filter is part of the configuration).
            eprintln!("conduit-proxy: {err:#}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log);
    let filter = match filter {
        Ok(filter) => filter,
        Err(err) => {
            eprintln!(
                "conduit-proxy: log (CONDUIT_PROXY_LOG): `{}`: {err}",
                config.log
            );
            return ExitCode::from(2);
        }
    };
    // Colour only for a person at a terminal, and never when NO_COLOR is set (no-color.org):
    // escape codes in a log file or pipe are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();

    let runtime = if config.workers.get() == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers.get())
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(error = %err, "building the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

fn load() -> anyhow::Result<ProxyConfig> {
    if std::env::args()
        .nth(1)
        .is_some_and(|a| a == "--help" || a == "-h")
    {
        anyhow::bail!(
            "configured by CONDUIT_PROXY_* environment variables and the YAML file named by \
             CONDUIT_PROXY_CONFIG; see proxy/README.md"
        );
    }
    let file = match std::env::var_os("CONDUIT_PROXY_CONFIG") {
        Some(path) => Some(
            std::fs::read_to_string(&path)
                .with_context(|| format!("reading CONDUIT_PROXY_CONFIG file {}", path.display()))?,
        ),
        None => None,
    };
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    Ok(ProxyConfig::load(file.as_deref(), env)?)
}

async fn serve(config: ProxyConfig) -> anyhow::Result<()> {
    tracing::info!(?config, "starting conduit-proxy");
    let seed = entropy::seed(config.seed);
    match &config.discovery {
        DiscoveryConfig::File(path) => {
            let discovery = FileDiscover::start(path, config.discovery_poll_interval)
                .await
                .context("starting file discovery")?;
            conduit_proxy::run(config, TokioNet, seed, discovery, shutdown_signal()).await?;
        }
        DiscoveryConfig::Controller { addr } => {
            let mut settings = ControllerDiscoverConfig::new(addr.clone());
            settings.backoff = config.discovery_backoff;
            settings.connect_timeout = config.limits.connect_timeout;
            // The reconnect jitter draws from its own generator, derived from the proxy's seed
            // but not from the proxy's own generator, so it does not shift the proxy's draws.
            let rng = DetRng::new(seed).child("discovery");
            // The identity is made first when the controller is reached over mTLS: discovery
            // presents its certificate.
            let identity = match &config.identity {
                Some(settings) => Some(std::sync::Arc::new(
                    conduit_proxy::identity::LocalIdentity::load(
                        settings,
                        conduit_proxy::clock::system_unix_time,
                    )
                    .context("identity")?,
                )),
                None => None,
            };
            if let (Some(identity), Some(name)) = (&identity, &config.controller_identity) {
                settings.tls = Some(
                    conduit_proxy::identity::ControllerTls::new(
                        std::sync::Arc::clone(identity),
                        name,
                    )
                    .context("controller_identity")?,
                );
            }
            let discovery = ControllerDiscover::new(TokioNet, settings, rng)
                .context("starting controller discovery")?;
            let mut proxy = conduit_proxy::Proxy::bind(config, TokioNet).await?;
            if let Some(identity) = identity {
                proxy = proxy.with_identity(identity);
            }
            proxy.serve(discovery, seed, shutdown_signal()).await?;
        }
        other => anyhow::bail!("unsupported discovery {other:?}"),
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(term) => term,
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM; only SIGINT stops the proxy");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
