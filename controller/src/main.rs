//! `conduit-controller`: the control plane binary.
//!
//! Reads its settings from flags or `CONDUIT_CONTROLLER_*` variables, loads the mesh file
//! (exiting non-zero with an error naming the field when it is invalid) or connects to the
//! Kubernetes API, opens (or
//! bootstraps) the identity directory (exiting non-zero with an error naming the file when
//! something there is unusable), binds the gRPC and admin ports on tokio's network and serves
//! until interrupted (Ctrl-C or SIGTERM).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use conduit_controller::config::{ControllerConfig, RawControllerConfig};
use conduit_controller::net::tcp_incoming;
use conduit_controller::run_controller;

/// Conduit's control plane: destination discovery from a mesh file or Kubernetes, identity,
/// and the public API.
#[derive(Debug, Parser)]
#[command(name = "conduit-controller", version)]
struct Args {
    /// IP:PORT for the gRPC API [default: 127.0.0.1:8086].
    #[arg(long, env = "CONDUIT_CONTROLLER_GRPC_ADDR")]
    grpc_addr: Option<String>,
    /// IP:PORT for /metrics, /ready and /live [default: 127.0.0.1:9996].
    #[arg(long, env = "CONDUIT_CONTROLLER_ADMIN_ADDR")]
    admin_addr: Option<String>,
    /// Where services come from: `file` (a mesh file) or `kubernetes` (the API server, through
    /// KUBECONFIG or the pod's service account) [default: file].
    #[arg(long, env = "CONDUIT_CONTROLLER_DISCOVERY")]
    discovery: Option<String>,
    /// The mesh file (YAML) to serve; edits are picked up while running.
    #[arg(long, env = "CONDUIT_CONTROLLER_MESH_FILE")]
    mesh_file: Option<String>,
    /// The cluster's DNS domain, with Kubernetes discovery [default: cluster.local].
    #[arg(long, env = "CONDUIT_CONTROLLER_CLUSTER_DOMAIN")]
    cluster_domain: Option<String>,
    /// How often to check the mesh file for edits, in milliseconds [default: 1000].
    #[arg(long, env = "CONDUIT_CONTROLLER_MESH_POLL_MS")]
    mesh_poll_ms: Option<String>,
    /// A tracing filter, e.g. `info` or `conduit_controller=debug` [default: info].
    #[arg(long, env = "CONDUIT_CONTROLLER_LOG")]
    log: Option<String>,
    /// The certificate authority's directory: trust anchors, issuer, token key; created and
    /// bootstrapped on first start [default: `identity` beside the mesh file].
    #[arg(long, env = "CONDUIT_CONTROLLER_IDENTITY_DIR")]
    identity_dir: Option<String>,
    /// Your own trust-anchor bundle (PEM), instead of a bootstrapped one; needs
    /// --identity-issuer-cert and --identity-issuer-key.
    #[arg(long, env = "CONDUIT_CONTROLLER_IDENTITY_TRUST_ANCHORS")]
    identity_trust_anchors: Option<String>,
    /// Your own issuer certificate (PEM), chaining to one of the trust anchors.
    #[arg(long, env = "CONDUIT_CONTROLLER_IDENTITY_ISSUER_CERT")]
    identity_issuer_cert: Option<String>,
    /// Your own issuer key (PKCS#8 PEM), matching the issuer certificate.
    #[arg(long, env = "CONDUIT_CONTROLLER_IDENTITY_ISSUER_KEY")]
    identity_issuer_key: Option<String>,
    /// How long workload certificates last, from 1m to 720h [default: 24h].
    #[arg(long, env = "CONDUIT_CONTROLLER_IDENTITY_LEAF_LIFETIME")]
    identity_leaf_lifetime: Option<String>,
    /// With Kubernetes discovery: the Secret holding the CA's files, so every replica signs
    /// with one CA (the replica holding the Lease bootstraps it when the Secret is absent).
    #[arg(long, env = "CONDUIT_CONTROLLER_IDENTITY_SECRET")]
    identity_secret: Option<String>,
    /// With Kubernetes discovery: the Secret (kubernetes.io/tls) in which the replica holding
    /// the Lease keeps the injecting webhook's serving certificate, signed by the identity
    /// issuer and renewed before it expires; needs --webhook-configuration.
    #[arg(long, env = "CONDUIT_CONTROLLER_WEBHOOK_SECRET")]
    webhook_secret: Option<String>,
    /// The MutatingWebhookConfiguration whose caBundle is kept set to the trust anchors.
    #[arg(long, env = "CONDUIT_CONTROLLER_WEBHOOK_CONFIGURATION")]
    webhook_configuration: Option<String>,
    /// The webhook's Service in the controller's namespace: the certificate's names
    /// [default: conduit-webhook].
    #[arg(long, env = "CONDUIT_CONTROLLER_WEBHOOK_SERVICE")]
    webhook_service: Option<String>,
    /// The controller's namespace (the Lease's and the identity Secret's).
    #[arg(long, env = "CONDUIT_CONTROLLER_NAMESPACE")]
    namespace: Option<String>,
    /// This replica's name in the Lease (its pod's name).
    #[arg(long, env = "CONDUIT_CONTROLLER_POD_NAME")]
    pod_name: Option<String>,
    /// How long the Lease lasts unrenewed, from 1s to 300s [default: 15s].
    #[arg(long, env = "CONDUIT_CONTROLLER_LEASE_DURATION")]
    lease_duration: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let raw = RawControllerConfig {
        grpc_addr: args.grpc_addr,
        admin_addr: args.admin_addr,
        discovery: args.discovery,
        mesh_file: args.mesh_file,
        cluster_domain: args.cluster_domain,
        mesh_poll_ms: args.mesh_poll_ms,
        log: args.log,
        identity_dir: args.identity_dir,
        identity_trust_anchors: args.identity_trust_anchors,
        identity_issuer_cert: args.identity_issuer_cert,
        identity_issuer_key: args.identity_issuer_key,
        identity_leaf_lifetime: args.identity_leaf_lifetime,
        identity_secret: args.identity_secret,
        webhook_secret: args.webhook_secret,
        webhook_configuration: args.webhook_configuration,
        webhook_service: args.webhook_service,
        namespace: args.namespace,
        pod_name: args.pod_name,
        lease_duration: args.lease_duration,
    };
    let config = match ControllerConfig::try_from(raw) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("conduit-controller: {err}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(err) = init_tracing(&config.log) {
        eprintln!("conduit-controller: CONDUIT_CONTROLLER_LOG (--log): {err:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("conduit-controller: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "controller stopped");
            eprintln!("conduit-controller: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).context("invalid filter")?;
    // Colour only for a person at a terminal, and never when NO_COLOR is set (no-color.org):
    // escape codes in a log file or pipe are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    Ok(())
}

async fn run(config: ControllerConfig) -> anyhow::Result<()> {
    let grpc = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("cannot bind the gRPC address {}", config.grpc_addr))?;
    let admin = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("cannot bind the admin address {}", config.admin_addr))?;
    tracing::info!(grpc = %config.grpc_addr, admin = %config.admin_addr, "listening");
    run_controller(
        &config,
        tcp_incoming(grpc),
        tcp_incoming(admin),
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM (what Kubernetes sends).
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops the controller");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
