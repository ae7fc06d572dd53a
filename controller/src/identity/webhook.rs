//! The injecting webhook's serving certificate, issued and renewed in the cluster.
//!
//! Installed through Helm without a webhook certificate in the values, the chart starts the
//! controller with a [`WebhookCertificate`] (`--webhook-secret`, `--webhook-configuration`),
//! and the replica holding the Lease keeps, in [`keep_issued`]:
//!
//! - the Secret (type `kubernetes.io/tls`, keys `tls.crt` and `tls.key`) that the webhook's
//!   pod mounts: a serving certificate for `SERVICE.NAMESPACE.svc` and
//!   `SERVICE.NAMESPACE.svc.CLUSTER_DOMAIN`, signed by the identity issuer, with the issuer's
//!   certificate after it. The kubelet updates the mounted files in place and the webhook
//!   reloads them;
//! - the `caBundle` of every webhook in the MutatingWebhookConfiguration that calls that
//!   Service: the trust anchors, which the API server verifies the webhook with.
//!
//! [`assess`] decides, from the Secret and the CA alone, whether to issue: when the Secret is
//! missing or holds no usable pair, when the certificate does not verify for the Service's
//! name against the current anchors (expired, other names, an anchor retired), when another
//! issuer signed it (after a rotation, so the webhook's chain follows the issuer), and when a
//! third of its life or less is left. It looks again at least every [`RECHECK`], and at once
//! when this replica comes to hold the Lease; only the holder writes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use conduit_core::time::UnixTime;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tokio::sync::watch;

use super::ca::CertificateAuthority;
use super::der;

/// How long an issued webhook certificate lasts (or until the issuer expires, if sooner).
pub const LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

/// The longest wait between two looks at the Secret and the webhook configuration.
pub const RECHECK: Duration = Duration::from_secs(60);

/// The field manager of the controller's writes.
const MANAGER: &str = "conduit-controller";

/// What the controller keeps for the webhook, in its own namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookCertificate {
    /// The Secret the webhook mounts (`conduit-webhook-tls`).
    pub secret: String,
    /// The MutatingWebhookConfiguration whose `caBundle` to keep (`conduit-proxy-injector-NS`).
    pub configuration: String,
    /// The webhook's Service (`conduit-webhook`): the certificate's names.
    pub service: String,
}

impl WebhookCertificate {
    /// The certificate's DNS names: the Service's in-cluster name, the one the API server
    /// uses, first.
    #[must_use]
    pub fn names(&self, namespace: &str, cluster_domain: &str) -> Vec<String> {
        let short = format!("{}.{namespace}.svc", self.service);
        let long = format!("{short}.{cluster_domain}");
        vec![short, long]
    }
}

/// What [`assess`] found in the Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Assessment {
    /// The certificate is good; renew it at `renew_at`.
    Current {
        /// Two thirds into its life.
        renew_at: UnixTime,
    },
    /// Issue a new certificate, for this reason (logged).
    Issue(String),
}

/// Whether the Secret's data (`None`: no Secret) holds a certificate to keep serving, judged
/// against `ca`'s anchors, issuer and clock for the server name `name`.
#[must_use]
pub fn assess(
    ca: &CertificateAuthority,
    data: Option<&BTreeMap<String, ByteString>>,
    name: &str,
) -> Assessment {
    let issue = |reason: &str| Assessment::Issue(reason.to_owned());
    let Some(data) = data else {
        return issue("no Secret");
    };
    let (Some(crt), Some(key)) = (data.get("tls.crt"), data.get("tls.key")) else {
        return issue("the Secret lacks tls.crt or tls.key");
    };
    let Ok(chain) = CertificateDer::pem_slice_iter(&crt.0).collect::<Result<Vec<_>, _>>() else {
        return issue("tls.crt is not PEM certificates");
    };
    let Some(leaf) = chain.first() else {
        return issue("tls.crt holds no certificate");
    };
    let Ok(fields) = der::read_certificate(leaf) else {
        return issue("tls.crt's certificate is malformed");
    };
    let key = core::str::from_utf8(&key.0)
        .ok()
        .and_then(|pem| rcgen::KeyPair::from_pem(pem).ok());
    let Some(key) = key else {
        return issue("tls.key is not a usable PKCS#8 key");
    };
    if rcgen::PublicKeyData::subject_public_key_info(&key) != fields.spki {
        return issue("tls.key does not match tls.crt");
    }
    if let Err(reason) = ca.verify_server_chain(&chain, name) {
        return Assessment::Issue(format!(
            "the certificate does not verify for {name} against the trust anchors: {reason}"
        ));
    }
    if chain.get(1) != Some(&ca.issuer_certificate()) {
        return issue("another issuer signed it (the issuer was rotated)");
    }
    let life = fields
        .not_after
        .as_secs()
        .saturating_sub(fields.not_before.as_secs());
    let renew_at = UnixTime::from_secs(fields.not_before.as_secs().saturating_add(life / 3 * 2));
    if ca.now() >= renew_at {
        return issue("a third of its life or less is left");
    }
    Assessment::Current { renew_at }
}

/// Keeps the webhook's Secret and `caBundle` current while this replica holds the Lease
/// (`leading`), until `leading`'s sender is dropped. Failures (the API server away, missing
/// rights, no webhook configuration yet) are logged and tried again.
pub async fn keep_issued(
    secrets: Api<Secret>,
    configurations: Api<MutatingWebhookConfiguration>,
    ca: Arc<CertificateAuthority>,
    spec: WebhookCertificate,
    namespace: String,
    cluster_domain: String,
    mut leading: watch::Receiver<bool>,
) {
    let names = spec.names(&namespace, &cluster_domain);
    let mut last_error = None;
    loop {
        if leading.wait_for(|leading| *leading).await.is_err() {
            return;
        }
        let wait = match reconcile(&secrets, &configurations, &ca, &spec, &namespace, &names).await
        {
            Ok(renew_at) => {
                if last_error.take().is_some() {
                    tracing::info!(secret = %spec.secret, "the webhook's certificate is in place again");
                }
                let until = renew_at.as_secs().saturating_sub(ca.now().as_secs());
                RECHECK.min(Duration::from_secs(until).max(Duration::from_secs(1)))
            }
            Err(error) => {
                // Once per distinct failure: a missing right would otherwise log every 5 s.
                if last_error.as_ref() != Some(&error) {
                    tracing::warn!(secret = %spec.secret, configuration = %spec.configuration, %error, "cannot keep the webhook's certificate; retrying");
                    last_error = Some(error);
                }
                Duration::from_secs(5)
            }
        };
        // Woken early when the Lease changes hands.
        let _ = tokio::time::timeout(wait, leading.changed()).await;
    }
}

/// One pass: issues into the Secret if [`assess`] says so, then brings the `caBundle` up to
/// date. Returns when to renew.
async fn reconcile(
    secrets: &Api<Secret>,
    configurations: &Api<MutatingWebhookConfiguration>,
    ca: &CertificateAuthority,
    spec: &WebhookCertificate,
    namespace: &str,
    names: &[String],
) -> Result<UnixTime, String> {
    let secret = secrets
        .get_opt(&spec.secret)
        .await
        .map_err(|err| format!("reading the Secret: {err}"))?;
    let renew_at = match assess(ca, secret.as_ref().and_then(|s| s.data.as_ref()), &names[0]) {
        Assessment::Current { renew_at } => renew_at,
        Assessment::Issue(reason) => {
            let issued = ca
                .certify_server(names, LIFETIME)
                .map_err(|err| err.to_string())?;
            let object = serde_json::json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": spec.secret,
                    "labels": {"app.kubernetes.io/part-of": "conduit"},
                },
                "type": "kubernetes.io/tls",
                "data": {
                    "tls.crt": ByteString(issued.chain_pem.into_bytes()),
                    "tls.key": ByteString(issued.key_pem.into_bytes()),
                },
            });
            secrets
                .patch(
                    &spec.secret,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&object),
                )
                .await
                .map_err(|err| format!("writing the Secret: {err}"))?;
            let life = issued
                .not_after
                .as_secs()
                .saturating_sub(issued.not_before.as_secs());
            tracing::info!(
                secret = %spec.secret,
                names = %names.join(", "),
                %reason,
                valid_days = life / 86_400,
                "issued the webhook's serving certificate"
            );
            UnixTime::from_secs(issued.not_before.as_secs().saturating_add(life / 3 * 2))
        }
    };
    set_ca_bundle(configurations, ca, spec, namespace).await?;
    Ok(renew_at)
}

/// Makes the `caBundle` of every webhook of the configuration that calls the Service the
/// current trust anchors.
async fn set_ca_bundle(
    configurations: &Api<MutatingWebhookConfiguration>,
    ca: &CertificateAuthority,
    spec: &WebhookCertificate,
    namespace: &str,
) -> Result<(), String> {
    let configuration = configurations
        .get_opt(&spec.configuration)
        .await
        .map_err(|err| format!("reading the MutatingWebhookConfiguration: {err}"))?
        .ok_or_else(|| format!("no MutatingWebhookConfiguration {}", spec.configuration))?;
    let bundle = ca.trust_anchors_pem();
    let mut ours = 0;
    let mut stale = Vec::new();
    for webhook in configuration.webhooks.iter().flatten() {
        let calls_us = webhook
            .client_config
            .service
            .as_ref()
            .is_some_and(|s| s.name == spec.service && s.namespace == namespace);
        if !calls_us {
            continue;
        }
        ours += 1;
        if webhook.client_config.ca_bundle.as_ref().map(|b| &b.0) != Some(&bundle) {
            stale.push(webhook.name.clone());
        }
    }
    if ours == 0 {
        return Err(format!(
            "{} has no webhook calling the Service {namespace}/{}",
            spec.configuration, spec.service
        ));
    }
    if stale.is_empty() {
        return Ok(());
    }
    // A strategic merge: webhooks merge by name, so only these `caBundle`s change.
    let webhooks: Vec<_> = stale
        .iter()
        .map(|name| {
            serde_json::json!({
                "name": name,
                "clientConfig": {"caBundle": ByteString(bundle.clone())},
            })
        })
        .collect();
    configurations
        .patch(
            &spec.configuration,
            &PatchParams::default(),
            &Patch::Strategic(serde_json::json!({ "webhooks": webhooks })),
        )
        .await
        .map_err(|err| format!("setting the caBundle: {err}"))?;
    tracing::info!(configuration = %spec.configuration, webhooks = %stale.join(", "), "set the webhook's caBundle to the trust anchors");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use conduit_proto::crypto::Crypto;

    use super::*;

    const NAME: &str = "conduit-webhook.conduit.svc";

    fn spec() -> WebhookCertificate {
        WebhookCertificate {
            secret: "conduit-webhook-tls".into(),
            configuration: "conduit-proxy-injector-conduit".into(),
            service: "conduit-webhook".into(),
        }
    }

    /// A CA on a clock the test moves (seconds since the epoch).
    fn ca() -> (Arc<CertificateAuthority>, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(1_800_000_000));
        let clock = Arc::clone(&now);
        let ca = CertificateAuthority::in_memory(
            Duration::from_secs(3600),
            Arc::new(move || UnixTime::from_secs(clock.load(Ordering::SeqCst))),
            Crypto::system(),
        )
        .unwrap();
        (Arc::new(ca), now)
    }

    fn data(crt: &str, key: &str) -> BTreeMap<String, ByteString> {
        BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(crt.as_bytes().to_vec())),
            ("tls.key".to_owned(), ByteString(key.as_bytes().to_vec())),
        ])
    }

    fn issue_reason(assessment: Assessment) -> String {
        match assessment {
            Assessment::Issue(reason) => reason,
            current @ Assessment::Current { .. } => {
                panic!("expected a reason to issue: {current:?}")
            }
        }
    }

    #[test]
    fn names_are_the_services_dns_names() {
        assert_eq!(
            spec().names("conduit", "cluster.local"),
            [
                "conduit-webhook.conduit.svc",
                "conduit-webhook.conduit.svc.cluster.local"
            ]
        );
    }

    #[test]
    fn an_issued_certificate_is_current_until_two_thirds_of_its_life() {
        let (ca, now) = ca();
        let issued = ca
            .certify_server(&spec().names("conduit", "cluster.local"), LIFETIME)
            .unwrap();
        let data = data(&issued.chain_pem, &issued.key_pem);
        let Assessment::Current { renew_at } = assess(&ca, Some(&data), NAME) else {
            panic!("a fresh certificate should be kept");
        };
        let life = issued.not_after.as_secs() - issued.not_before.as_secs();
        assert_eq!(
            renew_at.as_secs(),
            issued.not_before.as_secs() + life / 3 * 2
        );
        // Good for the long name too, as the API server may use it.
        assert!(matches!(
            assess(
                &ca,
                Some(&data),
                "conduit-webhook.conduit.svc.cluster.local"
            ),
            Assessment::Current { .. }
        ));

        now.store(renew_at.as_secs() - 1, Ordering::SeqCst);
        assert!(matches!(
            assess(&ca, Some(&data), NAME),
            Assessment::Current { .. }
        ));
        now.store(renew_at.as_secs(), Ordering::SeqCst);
        assert_eq!(
            issue_reason(assess(&ca, Some(&data), NAME)),
            "a third of its life or less is left"
        );
        now.store(issued.not_after.as_secs() + 1, Ordering::SeqCst);
        assert!(issue_reason(assess(&ca, Some(&data), NAME)).contains("does not verify"));
    }

    #[test]
    fn the_chain_follows_a_rotated_issuer() {
        let (ca, _) = ca();
        let issued = ca
            .certify_server(&spec().names("conduit", "cluster.local"), LIFETIME)
            .unwrap();
        ca.rotate_issuer_in_memory().unwrap();
        assert_eq!(
            issue_reason(assess(
                &ca,
                Some(&data(&issued.chain_pem, &issued.key_pem)),
                NAME
            )),
            "another issuer signed it (the issuer was rotated)"
        );
    }

    #[test]
    fn missing_garbled_mismatched_or_misnamed_secrets_are_replaced() {
        let (ca, _) = ca();
        let names = spec().names("conduit", "cluster.local");
        let issued = ca.certify_server(&names, LIFETIME).unwrap();
        let other = ca.certify_server(&names, LIFETIME).unwrap();
        assert_eq!(issue_reason(assess(&ca, None, NAME)), "no Secret");
        assert_eq!(
            issue_reason(assess(&ca, Some(&BTreeMap::new()), NAME)),
            "the Secret lacks tls.crt or tls.key"
        );
        assert_eq!(
            issue_reason(assess(&ca, Some(&data("garbage", &issued.key_pem)), NAME)),
            "tls.crt holds no certificate"
        );
        assert_eq!(
            issue_reason(assess(&ca, Some(&data(&issued.chain_pem, "garbage")), NAME)),
            "tls.key is not a usable PKCS#8 key"
        );
        assert_eq!(
            issue_reason(assess(
                &ca,
                Some(&data(&issued.chain_pem, &other.key_pem)),
                NAME
            )),
            "tls.key does not match tls.crt"
        );
        // Issued for another namespace's Service.
        let elsewhere = ca
            .certify_server(&spec().names("other", "cluster.local"), LIFETIME)
            .unwrap();
        assert!(
            issue_reason(assess(
                &ca,
                Some(&data(&elsewhere.chain_pem, &elsewhere.key_pem)),
                NAME
            ))
            .contains("does not verify for conduit-webhook.conduit.svc")
        );
        // Signed by another CA altogether.
        let (stranger, _) = self::ca();
        let foreign = stranger.certify_server(&names, LIFETIME).unwrap();
        assert!(
            issue_reason(assess(
                &ca,
                Some(&data(&foreign.chain_pem, &foreign.key_pem)),
                NAME
            ))
            .contains("does not verify")
        );
    }

    #[test]
    fn a_certificate_never_outlives_its_issuer() {
        let (ca, _) = ca();
        let issued = ca
            .certify_server(&spec().names("conduit", "cluster.local"), Duration::MAX)
            .unwrap();
        assert_eq!(issued.not_after, ca.issuer_not_after());
        assert!(ca.certify_server(&[], LIFETIME).is_err());
        assert!(
            ca.certify_server(&["名前.example".to_owned()], LIFETIME)
                .is_err()
        );
    }
}
