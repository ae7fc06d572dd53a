//! `conduit check --kubernetes`: is the mesh installed in this cluster, and working?
//!
//! One line per check, in the order a person would fix them: the API server answers; the CRDs
//! are installed and established; the controller's and the webhook's Deployments have every
//! replica available; the webhook's configuration points at its Service, and the webhook's
//! serving certificate is valid now, for its Service's name, and verifies against the
//! configuration's `caBundle` (what the API server will check on every pod it admits); every
//! meshed pod is Ready.

use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::ListParams;
use kube::{Api, Client};

use crate::control::Check;

/// The annotation of a pod that has the proxy.
const PROXY_VERSION_ANNOTATION: &str = "conduit.io/proxy-version";

fn check(what: &str, outcome: Result<String, String>) -> Check {
    Check {
        what: what.to_owned(),
        outcome,
    }
}

/// Runs every check against the cluster `client` reaches, for the control plane installed in
/// `namespace`.
pub async fn checks(client: &Client, namespace: &str) -> Vec<Check> {
    let mut checks = Vec::new();
    match client.apiserver_version().await {
        Ok(version) => checks.push(check(
            "kubernetes-api",
            Ok(format!(
                "the API server answers (Kubernetes {}.{})",
                version.major, version.minor
            )),
        )),
        Err(err) => {
            checks.push(check(
                "kubernetes-api",
                Err(format!("cannot reach the API server: {err}")),
            ));
            return checks;
        }
    }

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in conduit_controller::crd::crds() {
        let name = crd.metadata.name.unwrap_or_default();
        let outcome = match crds.get_opt(&name).await {
            Ok(Some(installed)) => {
                let established = installed
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                let ours: Vec<_> = crd.spec.versions.iter().map(|v| &v.name).collect();
                let theirs: Vec<_> = installed.spec.versions.iter().map(|v| &v.name).collect();
                if !established {
                    Err(format!("{name} is installed but not established"))
                } else if ours != theirs {
                    Err(format!(
                        "{name} serves versions {theirs:?}, this release {ours:?}: apply `conduit install --crds`"
                    ))
                } else {
                    Ok(format!("{name} installed"))
                }
            }
            Ok(None) => Err(format!(
                "{name} is not installed: apply `conduit install --crds`"
            )),
            Err(err) => Err(format!("cannot read {name}: {err}")),
        };
        checks.push(check("crds", outcome));
    }

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    for (what, name) in [
        ("control-plane", "conduit-controller"),
        ("webhook", "conduit-webhook"),
    ] {
        let outcome = match deployments.get_opt(name).await {
            Ok(Some(deployment)) => {
                let want = deployment.spec.and_then(|s| s.replicas).unwrap_or(1);
                let available = deployment
                    .status
                    .and_then(|s| s.available_replicas)
                    .unwrap_or(0);
                if available >= want {
                    Ok(format!(
                        "{namespace}/{name}: {available} of {want} replicas available"
                    ))
                } else {
                    Err(format!(
                        "{namespace}/{name}: {available} of {want} replicas available"
                    ))
                }
            }
            Ok(None) => Err(format!(
                "no Deployment {namespace}/{name}: is Conduit installed in `{namespace}`?"
            )),
            Err(err) => Err(format!("cannot read {namespace}/{name}: {err}")),
        };
        checks.push(check(what, outcome));
    }

    checks.push(check(
        "webhook-certificate",
        webhook_certificate(client, namespace).await,
    ));
    checks.push(check("proxies", proxies(client).await));
    checks
}

/// The webhook configuration points at the webhook's Service, and the serving certificate in
/// its Secret verifies for the Service's name against the configuration's CA bundle.
async fn webhook_certificate(client: &Client, namespace: &str) -> Result<String, String> {
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    let name = format!("conduit-proxy-injector-{namespace}");
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config = configs
        .get_opt(&name)
        .await
        .map_err(|err| format!("cannot read the MutatingWebhookConfiguration {name}: {err}"))?
        .ok_or_else(|| format!("no MutatingWebhookConfiguration {name}"))?;
    let webhook = config
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .next()
        .ok_or_else(|| format!("{name} has no webhook"))?;
    let service = webhook
        .client_config
        .service
        .as_ref()
        .filter(|s| s.name == "conduit-webhook" && s.namespace == namespace)
        .ok_or_else(|| format!("{name} does not call the Service {namespace}/conduit-webhook"))?;
    let _ = service;
    let bundle = webhook
        .client_config
        .ca_bundle
        .ok_or_else(|| format!("{name} has no caBundle"))?;

    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets
        .get_opt("conduit-webhook-tls")
        .await
        .map_err(|err| format!("cannot read the Secret {namespace}/conduit-webhook-tls: {err}"))?
        .ok_or_else(|| format!("no Secret {namespace}/conduit-webhook-tls"))?;
    let chain_pem = secret
        .data
        .and_then(|d| d.get("tls.crt").cloned())
        .ok_or_else(|| format!("{namespace}/conduit-webhook-tls has no tls.crt"))?;

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bundle.0) {
        let cert = cert.map_err(|err| format!("{name}'s caBundle is not PEM: {err}"))?;
        roots
            .add(cert)
            .map_err(|err| format!("{name}'s caBundle holds an unusable certificate: {err}"))?;
    }
    let chain = CertificateDer::pem_slice_iter(&chain_pem.0)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("the webhook's tls.crt is not PEM: {err}"))?;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| "the webhook's tls.crt holds no certificate".to_owned())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|err| format!("{name}'s caBundle: {err}"))?;
    let host = format!("conduit-webhook.{namespace}.svc");
    let server = ServerName::try_from(host.clone()).map_err(|err| err.to_string())?;
    verifier
        .verify_server_cert(leaf, intermediates, &server, &[], UnixTime::now())
        .map_err(|err| {
            format!("the webhook's certificate does not verify for {host} against {name}'s caBundle: {err}")
        })?;
    let days = x509_parser::parse_x509_certificate(leaf)
        .ok()
        .map(|(_, cert)| cert.validity().not_after.timestamp())
        .and_then(|not_after| {
            let now = i64::try_from(UnixTime::now().as_secs()).ok()?;
            Some((not_after - now) / 86_400)
        });
    Ok(match days {
        Some(days) => {
            format!("valid for {host} for {days} more days, trusted by the webhook configuration")
        }
        None => format!("valid for {host}, trusted by the webhook configuration"),
    })
}

/// Every meshed pod (one carrying the proxy) is Ready.
async fn proxies(client: &Client) -> Result<String, String> {
    let pods: Api<Pod> = Api::all(client.clone());
    let list = pods
        .list(&ListParams::default())
        .await
        .map_err(|err| format!("cannot list pods: {err}"))?;
    let meshed: Vec<&Pod> = list
        .items
        .iter()
        .filter(|p| {
            p.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(PROXY_VERSION_ANNOTATION))
        })
        .collect();
    let not_ready: Vec<String> = meshed
        .iter()
        .filter(|p| {
            !p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(|p| {
            format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or(""),
                p.metadata.name.as_deref().unwrap_or("")
            )
        })
        .collect();
    if not_ready.is_empty() {
        Ok(format!("{} meshed pods, all Ready", meshed.len()))
    } else {
        let shown: Vec<&str> = not_ready.iter().take(10).map(String::as_str).collect();
        Err(format!(
            "{} of {} meshed pods are not Ready: {}{}",
            not_ready.len(),
            meshed.len(),
            shown.join(", "),
            if not_ready.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        ))
    }
}
