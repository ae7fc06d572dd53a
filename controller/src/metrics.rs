//! The controller's own metrics, rendered as Prometheus text on the admin port.
//!
//! Plain atomic counters and gauges owned by whoever runs the controller and passed to each
//! part (no global registry, STYLE.md §10). Names start with `conduit_controller_`.

use core::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters and gauges of one controller.
#[derive(Debug, Default)]
pub struct Metrics {
    destination_streams_open: AtomicU64,
    destination_updates: AtomicU64,
    profile_streams_open: AtomicU64,
    profile_updates: AtomicU64,
    mesh_reloads: AtomicU64,
    mesh_reload_rejects: AtomicU64,
    mesh_generation: AtomicU64,
    mesh_services: AtomicU64,
    identity_certify: [AtomicU64; CertifyOutcome::ALL.len()],
    identity_issuer_rejects: AtomicU64,
    /// Seconds since the Unix epoch; 0 while no CA is configured.
    identity_issuer_expiry: AtomicU64,
    /// Seconds since the Unix epoch; 0 while no CA is configured.
    identity_trust_anchor_expiry: AtomicU64,
}

/// How one `Identity.Certify` call ended (the `result` label of
/// `conduit_controller_identity_certify_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertifyOutcome {
    /// A leaf was signed.
    Ok,
    /// The token was missing, malformed or not this CA's (`UNAUTHENTICATED`).
    Unauthenticated,
    /// The token's identity is not the one asked for, in the request or the CSR
    /// (`PERMISSION_DENIED`).
    Denied,
    /// The CSR was garbled, unsigned by its key, or of an unsupported kind
    /// (`INVALID_ARGUMENT`).
    Invalid,
    /// No CA is configured, or signing failed.
    Error,
}

impl CertifyOutcome {
    /// Every outcome, in the order they are rendered.
    pub const ALL: [Self; 5] = [
        Self::Ok,
        Self::Unauthenticated,
        Self::Denied,
        Self::Invalid,
        Self::Error,
    ];

    /// The `result` label's value.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Unauthenticated => "unauthenticated",
            Self::Denied => "denied",
            Self::Invalid => "invalid",
            Self::Error => "error",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Ok => 0,
            Self::Unauthenticated => 1,
            Self::Denied => 2,
            Self::Invalid => 3,
            Self::Error => 4,
        }
    }
}

/// Which kind of Destination stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// `Destination.Get`: endpoints.
    Endpoints,
    /// `Destination.GetProfile`: route profiles.
    Profile,
}

/// Counts one open stream until dropped.
#[derive(Debug)]
pub struct OpenStream {
    metrics: std::sync::Arc<Metrics>,
    kind: StreamKind,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.metrics
            .streams_open(self.kind)
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Metrics for a controller serving `services` services at generation 1.
    #[must_use]
    pub fn new(services: usize) -> Self {
        let metrics = Self::default();
        metrics.mesh_generation.store(1, Ordering::Relaxed);
        metrics
            .mesh_services
            .store(as_u64(services), Ordering::Relaxed);
        metrics
    }

    fn streams_open(&self, kind: StreamKind) -> &AtomicU64 {
        match kind {
            StreamKind::Endpoints => &self.destination_streams_open,
            StreamKind::Profile => &self.profile_streams_open,
        }
    }

    /// Counts a stream as open until the returned guard is dropped.
    #[must_use]
    pub fn open_stream(self: &std::sync::Arc<Self>, kind: StreamKind) -> OpenStream {
        self.streams_open(kind).fetch_add(1, Ordering::Relaxed);
        OpenStream {
            metrics: std::sync::Arc::clone(self),
            kind,
        }
    }

    /// Counts one message sent on a stream.
    pub fn record_update(&self, kind: StreamKind) {
        let counter = match kind {
            StreamKind::Endpoints => &self.destination_updates,
            StreamKind::Profile => &self.profile_updates,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a good mesh file edit, now serving `generation` with `services` services.
    pub fn record_mesh_reload(&self, generation: u64, services: usize) {
        self.mesh_reloads.fetch_add(1, Ordering::Relaxed);
        self.mesh_generation.store(generation, Ordering::Relaxed);
        self.mesh_services
            .store(as_u64(services), Ordering::Relaxed);
    }

    /// Counts a rejected mesh file edit (or a failed read).
    pub fn record_mesh_reject(&self) {
        self.mesh_reload_rejects.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one `Identity.Certify` call.
    pub fn record_certify(&self, outcome: CertifyOutcome) {
        self.identity_certify[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// `Identity.Certify` calls that ended with `outcome` so far.
    #[must_use]
    pub fn certify_count(&self, outcome: CertifyOutcome) -> u64 {
        self.identity_certify[outcome.index()].load(Ordering::Relaxed)
    }

    /// Counts a new issuer that was rejected (the old one kept signing).
    pub fn record_identity_issuer_reject(&self) {
        self.identity_issuer_rejects.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets the end of the issuer's validity, in seconds since the Unix epoch.
    pub fn set_identity_issuer_expiry(&self, unix_secs: u64) {
        self.identity_issuer_expiry
            .store(unix_secs, Ordering::Relaxed);
    }

    /// Sets the earliest end of validity among the trust anchors, in seconds since the Unix
    /// epoch.
    pub fn set_identity_trust_anchor_expiry(&self, unix_secs: u64) {
        self.identity_trust_anchor_expiry
            .store(unix_secs, Ordering::Relaxed);
    }

    /// Open `Destination.Get` streams.
    #[must_use]
    pub fn destination_streams_open(&self) -> u64 {
        self.destination_streams_open.load(Ordering::Relaxed)
    }

    /// Rejected mesh file edits so far.
    #[must_use]
    pub fn mesh_reload_rejects(&self) -> u64 {
        self.mesh_reload_rejects.load(Ordering::Relaxed)
    }

    /// Renders every metric in the Prometheus text exposition format (version 0.0.4).
    #[must_use]
    pub fn render(&self) -> String {
        let families: [(&str, &str, &str, &AtomicU64); 8] = [
            (
                "destination_streams_open",
                "gauge",
                "Open Destination.Get streams.",
                &self.destination_streams_open,
            ),
            (
                "destination_updates_total",
                "counter",
                "Messages sent on Destination.Get streams.",
                &self.destination_updates,
            ),
            (
                "profile_streams_open",
                "gauge",
                "Open Destination.GetProfile streams.",
                &self.profile_streams_open,
            ),
            (
                "profile_updates_total",
                "counter",
                "Messages sent on Destination.GetProfile streams.",
                &self.profile_updates,
            ),
            (
                "mesh_reloads_total",
                "counter",
                "Good mesh file edits published.",
                &self.mesh_reloads,
            ),
            (
                "mesh_reload_rejects_total",
                "counter",
                "Mesh file edits rejected (invalid or unreadable); the last good mesh kept serving.",
                &self.mesh_reload_rejects,
            ),
            (
                "mesh_generation",
                "gauge",
                "Generation of the mesh being served (1 at start).",
                &self.mesh_generation,
            ),
            (
                "mesh_services",
                "gauge",
                "Services in the mesh being served.",
                &self.mesh_services,
            ),
        ];
        let mut text = String::new();
        for (name, kind, help, value) in families {
            let value = value.load(Ordering::Relaxed);
            // Writing to a String cannot fail.
            let _ = writeln!(text, "# HELP conduit_controller_{name} {help}");
            let _ = writeln!(text, "# TYPE conduit_controller_{name} {kind}");
            let _ = writeln!(text, "conduit_controller_{name} {value}");
        }
        self.render_identity(&mut text);
        text
    }

    /// The identity families. The issuer families are left out while no CA is configured,
    /// so an alert on "expires within N days" cannot fire on a controller without one.
    fn render_identity(&self, text: &mut String) {
        let _ = writeln!(
            text,
            "# HELP conduit_controller_identity_certify_total Identity.Certify calls by result."
        );
        let _ = writeln!(
            text,
            "# TYPE conduit_controller_identity_certify_total counter"
        );
        for outcome in CertifyOutcome::ALL {
            let _ = writeln!(
                text,
                "conduit_controller_identity_certify_total{{result=\"{}\"}} {}",
                outcome.label(),
                self.certify_count(outcome)
            );
        }
        if self.identity_issuer_expiry.load(Ordering::Relaxed) == 0 {
            return;
        }
        let families: [(&str, &str, &str, &AtomicU64); 3] = [
            (
                "identity_issuer_reload_rejects_total",
                "counter",
                "New issuers rejected (garbled, mismatched or not chaining to an anchor); the previous issuer kept signing.",
                &self.identity_issuer_rejects,
            ),
            (
                "identity_issuer_expiry_timestamp_seconds",
                "gauge",
                "End of the issuer certificate's validity, in seconds since the Unix epoch.",
                &self.identity_issuer_expiry,
            ),
            (
                "identity_trust_anchor_expiry_timestamp_seconds",
                "gauge",
                "Earliest end of validity among the trust anchors, in seconds since the Unix epoch.",
                &self.identity_trust_anchor_expiry,
            ),
        ];
        for (name, kind, help, value) in families {
            let value = value.load(Ordering::Relaxed);
            let _ = writeln!(text, "# HELP conduit_controller_{name} {help}");
            let _ = writeln!(text, "# TYPE conduit_controller_{name} {kind}");
            let _ = writeln!(text, "conduit_controller_{name} {value}");
        }
    }
}

fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn streams_are_counted_until_dropped() {
        let metrics = Arc::new(Metrics::new(2));
        let guard = metrics.open_stream(StreamKind::Endpoints);
        assert_eq!(metrics.destination_streams_open(), 1);
        drop(guard);
        assert_eq!(metrics.destination_streams_open(), 0);
    }

    #[test]
    fn renders_prometheus_text() {
        let metrics = Metrics::new(2);
        metrics.record_update(StreamKind::Profile);
        metrics.record_mesh_reload(3, 4);
        metrics.record_mesh_reject();
        let text = metrics.render();
        for line in [
            "# TYPE conduit_controller_destination_streams_open gauge",
            "conduit_controller_profile_updates_total 1",
            "conduit_controller_mesh_reloads_total 1",
            "conduit_controller_mesh_reload_rejects_total 1",
            "conduit_controller_mesh_generation 3",
            "conduit_controller_mesh_services 4",
            "conduit_controller_identity_certify_total{result=\"ok\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn renders_identity_families_once_a_ca_is_configured() {
        let metrics = Metrics::new(0);
        assert!(!metrics.render().contains("expiry"));
        metrics.record_certify(CertifyOutcome::Denied);
        metrics.record_certify(CertifyOutcome::Denied);
        metrics.set_identity_issuer_expiry(1_700_000_000);
        metrics.set_identity_trust_anchor_expiry(1_800_000_000);
        let text = metrics.render();
        for line in [
            "conduit_controller_identity_certify_total{result=\"denied\"} 2",
            "conduit_controller_identity_certify_total{result=\"unauthenticated\"} 0",
            "conduit_controller_identity_issuer_expiry_timestamp_seconds 1700000000",
            "conduit_controller_identity_trust_anchor_expiry_timestamp_seconds 1800000000",
            "conduit_controller_identity_issuer_reload_rejects_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
