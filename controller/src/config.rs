//! The controller's configuration: raw strings from flags or the environment in, a validated
//! [`ControllerConfig`] out, with every error naming its setting.
//!
//! `main.rs` is the only code that reads the environment; it fills a [`RawControllerConfig`].

use core::fmt;
use core::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where the gRPC API listens by default: Linkerd's destination port. Loopback, so a controller
/// started on a host by hand is not reachable from the network until asked to be (Kubernetes
/// manifests set `0.0.0.0:8086`).
pub const DEFAULT_GRPC_ADDR: SocketAddr = SocketAddr::new(LOOPBACK, 8086);

/// Where the admin port listens by default (loopback for the same reason).
pub const DEFAULT_ADMIN_ADDR: SocketAddr = SocketAddr::new(LOOPBACK, 9996);

const LOOPBACK: core::net::IpAddr = core::net::IpAddr::V4(core::net::Ipv4Addr::LOCALHOST);

/// How often the mesh file is checked for edits by default: quick enough that an edit feels
/// immediate, rare enough that re-reading a small file costs nothing.
pub const DEFAULT_MESH_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The shortest poll interval accepted (tests use a few milliseconds).
pub const MIN_MESH_POLL_INTERVAL: Duration = Duration::from_millis(1);

/// The longest poll interval accepted: beyond an hour an edit would seem ignored.
pub const MAX_MESH_POLL_INTERVAL: Duration = Duration::from_secs(3600);

/// The tracing filter used when none is given.
pub const DEFAULT_LOG: &str = "info";

/// The settings as given (flags or environment), before validation. `None` means not given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawControllerConfig {
    /// `CONDUIT_CONTROLLER_GRPC_ADDR` / `--grpc-addr`: `IP:PORT` of the gRPC API.
    pub grpc_addr: Option<String>,
    /// `CONDUIT_CONTROLLER_ADMIN_ADDR` / `--admin-addr`: `IP:PORT` of the admin port.
    pub admin_addr: Option<String>,
    /// `CONDUIT_CONTROLLER_MESH_FILE` / `--mesh-file`: the mesh file to serve. Required.
    pub mesh_file: Option<String>,
    /// `CONDUIT_CONTROLLER_MESH_POLL_MS` / `--mesh-poll-ms`: how often to check the file.
    pub mesh_poll_ms: Option<String>,
    /// `CONDUIT_CONTROLLER_LOG` / `--log`: a tracing filter (`info`, `conduit_controller=debug`).
    pub log: Option<String>,
}

/// A validated controller configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerConfig {
    /// Where the gRPC API (Destination, Identity, Tap, public API) listens.
    pub grpc_addr: SocketAddr,
    /// Where the admin port (`/metrics`, `/ready`, `/live`) listens.
    pub admin_addr: SocketAddr,
    /// The mesh file served by the file discovery backend.
    pub mesh_file: PathBuf,
    /// How often the mesh file is checked for edits.
    pub mesh_poll_interval: Duration,
    /// The tracing filter.
    pub log: String,
}

/// One invalid setting.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {reason}")]
pub struct SettingError {
    /// The setting, as the environment variable and the flag: `CONDUIT_CONTROLLER_GRPC_ADDR
    /// (--grpc-addr)`.
    pub setting: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// A configuration that failed validation, with every error found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct InvalidConfig {
    /// Every invalid setting. Never empty.
    pub errors: Vec<SettingError>,
}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: ")?;
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

const GRPC_ADDR: &str = "CONDUIT_CONTROLLER_GRPC_ADDR (--grpc-addr)";
const ADMIN_ADDR: &str = "CONDUIT_CONTROLLER_ADMIN_ADDR (--admin-addr)";
const MESH_FILE: &str = "CONDUIT_CONTROLLER_MESH_FILE (--mesh-file)";
const MESH_POLL_MS: &str = "CONDUIT_CONTROLLER_MESH_POLL_MS (--mesh-poll-ms)";

impl TryFrom<RawControllerConfig> for ControllerConfig {
    type Error = InvalidConfig;

    fn try_from(raw: RawControllerConfig) -> Result<Self, InvalidConfig> {
        let mut errors = Vec::new();
        let mut error = |setting, reason: String| errors.push(SettingError { setting, reason });
        let mut addr = |setting, value: Option<String>, default| match value {
            None => Some(default),
            Some(text) => match text.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    error(setting, format!("`{text}` is not an IP:PORT address"));
                    None
                }
            },
        };
        let grpc_addr = addr(GRPC_ADDR, raw.grpc_addr, DEFAULT_GRPC_ADDR);
        let admin_addr = addr(ADMIN_ADDR, raw.admin_addr, DEFAULT_ADMIN_ADDR);
        let mesh_file = match raw.mesh_file {
            Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
            _ => {
                error(
                    MESH_FILE,
                    "missing: the controller serves discovery from a mesh file".into(),
                );
                None
            }
        };
        let mesh_poll_interval = match raw.mesh_poll_ms {
            None => Some(DEFAULT_MESH_POLL_INTERVAL),
            Some(text) => match text.parse::<u64>().map(Duration::from_millis) {
                Ok(interval)
                    if (MIN_MESH_POLL_INTERVAL..=MAX_MESH_POLL_INTERVAL).contains(&interval) =>
                {
                    Some(interval)
                }
                _ => {
                    error(
                        MESH_POLL_MS,
                        format!(
                            "`{text}` must be a whole number of milliseconds from {} to {}",
                            MIN_MESH_POLL_INTERVAL.as_millis(),
                            MAX_MESH_POLL_INTERVAL.as_millis()
                        ),
                    );
                    None
                }
            },
        };
        if let (Some(grpc), Some(admin)) = (grpc_addr, admin_addr)
            && grpc == admin
            && grpc.port() != 0
        {
            error(ADMIN_ADDR, format!("{admin} is also the gRPC address"));
        }
        match (grpc_addr, admin_addr, mesh_file, mesh_poll_interval) {
            (Some(grpc_addr), Some(admin_addr), Some(mesh_file), Some(mesh_poll_interval))
                if errors.is_empty() =>
            {
                Ok(Self {
                    grpc_addr,
                    admin_addr,
                    mesh_file,
                    mesh_poll_interval,
                    log: raw.log.unwrap_or_else(|| DEFAULT_LOG.into()),
                })
            }
            _ => Err(InvalidConfig { errors }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_what_is_not_given() {
        let raw = RawControllerConfig {
            mesh_file: Some("mesh.yaml".into()),
            ..Default::default()
        };
        let config = ControllerConfig::try_from(raw).unwrap();
        assert_eq!(config.grpc_addr, "127.0.0.1:8086".parse().unwrap());
        assert_eq!(config.admin_addr, "127.0.0.1:9996".parse().unwrap());
        assert_eq!(config.mesh_poll_interval, DEFAULT_MESH_POLL_INTERVAL);
        assert_eq!(config.log, "info");
    }

    #[test]
    fn every_error_names_its_setting() {
        let raw = RawControllerConfig {
            grpc_addr: Some("nope".into()),
            admin_addr: Some("127.0.0.1".into()),
            mesh_file: None,
            mesh_poll_ms: Some("0".into()),
            log: None,
        };
        let err = ControllerConfig::try_from(raw).unwrap_err();
        let settings: Vec<_> = err.errors.iter().map(|e| e.setting).collect();
        assert_eq!(settings, [GRPC_ADDR, ADMIN_ADDR, MESH_FILE, MESH_POLL_MS]);
        assert!(
            err.to_string()
                .contains("CONDUIT_CONTROLLER_GRPC_ADDR (--grpc-addr): `nope`"),
            "{err}"
        );
    }

    #[test]
    fn the_two_ports_must_differ() {
        let raw = RawControllerConfig {
            grpc_addr: Some("127.0.0.1:9000".into()),
            admin_addr: Some("127.0.0.1:9000".into()),
            mesh_file: Some("m".into()),
            ..Default::default()
        };
        assert_eq!(
            ControllerConfig::try_from(raw).unwrap_err().errors[0].setting,
            ADMIN_ADDR
        );
    }
}
