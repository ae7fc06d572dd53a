//! The certificate authority's files kept in a Kubernetes Secret, so that every controller
//! replica signs with one CA and a restarted replica does not make a new one.
//!
//! At start-up a replica with Kubernetes discovery and an identity Secret calls
//! [`materialize`]: if the Secret exists its files are written into the identity directory
//! (which [`super::ca::CertificateAuthority::open`] then finds, bootstrapping nothing). If it
//! does not, only the replica holding the Lease ([`crate::lease`]) bootstraps: it makes the CA
//! in its directory as a controller always has, then creates the Secret from those files. Two
//! leaders at once cannot both win: creating a Secret that exists fails, and the loser loads
//! the winner's files instead of its own. Other replicas wait for the Secret.
//!
//! The trust anchors, which are public, are also published in the ConfigMap
//! [`TRUST_ANCHORS_CONFIG_MAP`] (key [`TRUST_ANCHORS_KEY`]) by [`publish_anchors`]: the
//! injecting webhook mounts it and gives the anchors to every proxy it injects, without access
//! to the Secret's keys.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use tokio::sync::watch;

use super::files::{self, CERT_MODE, KEY_MODE};
use super::{
    ANCHOR_KEY_FILE, ISSUER_CERT_FILE, ISSUER_KEY_FILE, IdentityConfig, TOKEN_KEY_FILE,
    TRUST_ANCHORS_FILE, WallClock, ca::CaError, ca::CertificateAuthority,
};

/// The identity directory's files the Secret carries, and each one's mode on disk.
pub const SECRET_FILES: [(&str, u32); 5] = [
    (TRUST_ANCHORS_FILE, CERT_MODE),
    (ANCHOR_KEY_FILE, KEY_MODE),
    (ISSUER_CERT_FILE, CERT_MODE),
    (ISSUER_KEY_FILE, KEY_MODE),
    (TOKEN_KEY_FILE, KEY_MODE),
];

/// The ConfigMap holding the trust anchors (PEM) in the control plane's namespace.
pub const TRUST_ANCHORS_CONFIG_MAP: &str = "conduit-identity-trust-anchors";

/// Its key.
pub const TRUST_ANCHORS_KEY: &str = "ca.crt";

/// How the identity directory got its files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// From the existing Secret.
    Loaded,
    /// Bootstrapped here, and the Secret created from it.
    Bootstrapped,
}

/// Why the identity Secret could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The Secret exists but lacks a file.
    #[error("Secret {name}: no `{file}` key (delete the Secret to bootstrap a new CA)")]
    Missing {
        /// The Secret.
        name: String,
        /// The key.
        file: &'static str,
    },
    /// The directory could not be written, or the bootstrap failed.
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// Fills `config.dir` from the Secret `name`, bootstrapping the CA (and creating the Secret)
/// when there is none and this replica leads. Waits, retrying, while there is no Secret and
/// another replica leads, or the API server cannot be reached.
///
/// # Errors
///
/// [`SecretError`] when the Secret is unusable or the directory cannot be written.
pub async fn materialize(
    api: &Api<Secret>,
    name: &str,
    config: &IdentityConfig,
    clock: &WallClock,
    mut leading: watch::Receiver<bool>,
) -> Result<Origin, SecretError> {
    let dir = &config.dir;
    let mut waiting_logged = false;
    loop {
        match api.get_opt(name).await {
            Ok(Some(secret)) => {
                write_files(name, dir, &secret)?;
                tracing::info!(secret = name, "identity loaded from the Secret");
                return Ok(Origin::Loaded);
            }
            Ok(None) if *leading.borrow_and_update() => {
                tracing::info!(
                    secret = name,
                    "no identity Secret: bootstrapping the CA (this replica holds the Lease)"
                );
                // Blocking, once: a few small files and two key pairs.
                CertificateAuthority::open(&IdentityConfig::new(dir.clone()), clock.clone())?;
                let secret = secret_from_dir(name, dir)?;
                match api.create(&PostParams::default(), &secret).await {
                    Ok(_) => return Ok(Origin::Bootstrapped),
                    Err(kube::Error::Api(status)) if status.code == 409 => {
                        tracing::info!(
                            secret = name,
                            "another replica created the identity Secret first: using it"
                        );
                    }
                    Err(err) => {
                        tracing::warn!(secret = name, error = %err, "cannot create the identity Secret; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            Ok(None) => {
                if !waiting_logged {
                    tracing::info!(
                        secret = name,
                        "waiting for the replica holding the Lease to bootstrap the CA"
                    );
                    waiting_logged = true;
                }
                // Woken when this replica comes to lead; otherwise look again shortly.
                let _ = tokio::time::timeout(Duration::from_secs(1), leading.changed()).await;
            }
            Err(err) => {
                tracing::warn!(secret = name, error = %err, "cannot read the identity Secret; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn write_files(name: &str, dir: &Path, secret: &Secret) -> Result<(), SecretError> {
    let data = secret.data.clone().unwrap_or_default();
    files::create_dir(dir).map_err(|source| CaError::Write {
        path: dir.to_owned(),
        source,
    })?;
    for (file, mode) in SECRET_FILES {
        let Some(contents) = data.get(file) else {
            return Err(SecretError::Missing {
                name: name.to_owned(),
                file,
            });
        };
        let path = dir.join(file);
        files::write_atomically(&path, &contents.0, mode)
            .map_err(|source| CaError::Write { path, source })?;
    }
    Ok(())
}

fn secret_from_dir(name: &str, dir: &Path) -> Result<Secret, SecretError> {
    let mut data = BTreeMap::new();
    for (file, _) in SECRET_FILES {
        let path = dir.join(file);
        let contents = files::read(&path).map_err(|err| CaError::Invalid {
            path: path.clone(),
            reason: match err {
                files::ReadError::Io(err) => err.to_string(),
                files::ReadError::TooLarge => "too large".into(),
            },
        })?;
        data.insert(file.to_owned(), ByteString(contents));
    }
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_owned(),
                "conduit".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Secret::default()
    })
}

/// Makes the ConfigMap `name` hold `pem` as [`TRUST_ANCHORS_KEY`] (created, or updated when
/// it holds other anchors), retrying while the API server cannot be reached (a refusal, such as
/// missing rights, is logged and not retried). Every replica may call it: the writes are
/// idempotent.
pub async fn publish_anchors(api: &Api<ConfigMap>, name: &str, pem: &str) {
    let map = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "conduit"}},
        "data": {TRUST_ANCHORS_KEY: pem},
    });
    let mut delay = Duration::from_millis(200);
    loop {
        let current = api.get_opt(name).await;
        let same = |m: &ConfigMap| {
            m.data
                .as_ref()
                .and_then(|d| d.get(TRUST_ANCHORS_KEY))
                .is_some_and(|p| p == pem)
        };
        let written = match current {
            Ok(Some(m)) if same(&m) => return,
            Ok(_) => api
                .patch(
                    name,
                    &PatchParams::apply("conduit-controller").force(),
                    &Patch::Apply(&map),
                )
                .await
                .map(drop),
            Err(err) => Err(err),
        };
        match written {
            Ok(()) => {
                tracing::info!(config_map = name, "trust anchors published");
                return;
            }
            Err(kube::Error::Api(status))
                if (400..500).contains(&status.code) && ![409, 429].contains(&status.code) =>
            {
                // Refused (RBAC, a bad object): retrying changes nothing, and discovery and
                // identity need not wait for it; the webhook reports the missing anchors.
                tracing::error!(config_map = name, error = %status.message, "cannot publish the trust anchors");
                return;
            }
            Err(err) => {
                tracing::warn!(config_map = name, error = %err, "cannot publish the trust anchors; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}
