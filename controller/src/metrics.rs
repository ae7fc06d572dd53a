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
        text
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
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
