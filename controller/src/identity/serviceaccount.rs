//! Kubernetes ServiceAccount tokens as proof of identity.
//!
//! In a cluster a proxy proves who it is with the token the kubelet projects into its pod for
//! the audience [`AUDIENCE`] (the injector mounts it; the kubelet renews it before it expires).
//! The controller does not check that JWT itself: it asks the API server with a `TokenReview`
//! (`authentication.k8s.io/v1`, the audience given), which verifies the signature, the expiry,
//! the audience, and that the ServiceAccount and the pod it was bound to still exist. An
//! authenticated `system:serviceaccount:NAMESPACE:NAME` proves
//! [`service_account_identity`] of that account, and nothing else.
//!
//! Tokens of the controller's own format (`ct1:…`, [`super::token`]) are still accepted beside
//! these: workloads outside the cluster keep using them.
//!
//! | outcome | [`ReviewError`] | gRPC status |
//! |---|---|---|
//! | not authenticated (bad signature, expired, wrong audience, deleted account or pod) | `Rejected` | `UNAUTHENTICATED` |
//! | authenticated, but not as a ServiceAccount (a user's token) | `NotServiceAccount` | `UNAUTHENTICATED` |
//! | the API server could not be asked | `Unavailable` | `UNAVAILABLE` (the proxy retries) |

use std::fmt;

use conduit_core::identity::service_account_identity;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::Api;
use kube::api::PostParams;

/// The audience of the ServiceAccount tokens proxies present (the injector asks the kubelet
/// for tokens bound to it, so a token minted for anything else does not pass).
pub const AUDIENCE: &str = "identity.conduit.io";

/// The prefix of a ServiceAccount's user name in Kubernetes authentication.
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// The longest token sent for review (projected tokens are about 1 KB; the API server's own
/// limit on a request is far above this, but a proxy has no reason to send more).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a ServiceAccount token proves nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReviewError {
    /// The API server did not authenticate the token.
    #[error("the Kubernetes API server rejected the ServiceAccount token: {reason}")]
    Rejected {
        /// The API server's reason, when it gave one.
        reason: String,
    },
    /// The token is a user's, not a ServiceAccount's.
    #[error("the token authenticates `{user}`, which is not a ServiceAccount")]
    NotServiceAccount {
        /// The user name (truncated).
        user: String,
    },
    /// The API server could not be asked.
    #[error("cannot review the token with the Kubernetes API server: {reason}")]
    Unavailable {
        /// Why not.
        reason: String,
    },
}

/// Reviews ServiceAccount tokens with the API server.
#[derive(Clone)]
pub struct ServiceAccountTokens {
    reviews: Api<TokenReview>,
    cluster_domain: String,
}

impl fmt::Debug for ServiceAccountTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountTokens")
            .field("cluster_domain", &self.cluster_domain)
            .finish_non_exhaustive()
    }
}

impl ServiceAccountTokens {
    /// Reviews through `client`; identities are named in `cluster_domain`.
    #[must_use]
    pub fn new(client: kube::Client, cluster_domain: &str) -> Self {
        Self {
            reviews: Api::all(client),
            cluster_domain: cluster_domain.trim_end_matches('.').to_owned(),
        }
    }

    /// The identity `token` proves.
    ///
    /// # Errors
    ///
    /// [`ReviewError`]: which kind says whether to retry.
    pub async fn verify(&self, token: &str) -> Result<String, ReviewError> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(ReviewError::Rejected {
                reason: format!(
                    "a token must be 1 to {MAX_TOKEN_BYTES} bytes, this one is {}",
                    token.len()
                ),
            });
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let reviewed = self
            .reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|err| ReviewError::Unavailable {
                reason: err.to_string(),
            })?;
        identity_of(reviewed.status.as_ref(), &self.cluster_domain)
    }
}

/// The identity a review's `status` proves (pure, so every case is tested without a cluster).
///
/// # Errors
///
/// [`ReviewError::Rejected`] unless the token is authenticated for [`AUDIENCE`];
/// [`ReviewError::NotServiceAccount`] when it is a user's.
pub fn identity_of(
    status: Option<&TokenReviewStatus>,
    cluster_domain: &str,
) -> Result<String, ReviewError> {
    let Some(status) = status else {
        return Err(ReviewError::Rejected {
            reason: "the review came back without a status".into(),
        });
    };
    if status.authenticated != Some(true) {
        return Err(ReviewError::Rejected {
            reason: status
                .error
                .clone()
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "not authenticated".into()),
        });
    }
    // An API server that knows audiences answers with those the token is valid for; one that
    // answers none checked nothing of the kind, and the token is not taken on trust.
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == AUDIENCE) {
        return Err(ReviewError::Rejected {
            reason: format!("the token is not for the audience `{AUDIENCE}`"),
        });
    }
    let user = status
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .unwrap_or_default();
    let account = user
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, name)| is_label(ns) && is_name(name));
    match account {
        Some((namespace, name)) => Ok(service_account_identity(namespace, name, cluster_domain)),
        None => Err(ReviewError::NotServiceAccount {
            user: user.chars().take(128).collect(),
        }),
    }
}

/// A namespace name: an RFC 1123 label.
fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A ServiceAccount name: an RFC 1123 subdomain (labels joined by dots).
fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_label)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn status(authenticated: bool, audiences: &[&str], user: &str) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|&a| a.to_owned()).collect()),
            user: Some(UserInfo {
                username: Some(user.to_owned()),
                ..UserInfo::default()
            }),
            error: None,
        }
    }

    #[test]
    fn an_authenticated_service_account_proves_its_identity() {
        let s = status(true, &[AUDIENCE], "system:serviceaccount:shop:web");
        assert_eq!(
            identity_of(Some(&s), "cluster.local").unwrap(),
            "web.shop.serviceaccount.identity.conduit.cluster.local"
        );
    }

    #[test]
    fn anything_less_proves_nothing() {
        let unauthenticated = TokenReviewStatus {
            error: Some("token has expired".into()),
            ..status(false, &[], "")
        };
        assert_eq!(
            identity_of(Some(&unauthenticated), "cluster.local"),
            Err(ReviewError::Rejected {
                reason: "token has expired".into()
            })
        );
        assert!(matches!(
            identity_of(None, "cluster.local"),
            Err(ReviewError::Rejected { .. })
        ));
        let other_audience = status(
            true,
            &["https://kubernetes.default.svc"],
            "system:serviceaccount:shop:web",
        );
        assert!(matches!(
            identity_of(Some(&other_audience), "cluster.local"),
            Err(ReviewError::Rejected { reason }) if reason.contains(AUDIENCE)
        ));
        for user in [
            "alice",
            "system:serviceaccount:shop",
            "system:serviceaccount::web",
            "system:serviceaccount:Shop:web",
            "system:serviceaccount:shop:web:extra",
            "system:node:n1",
        ] {
            let s = status(true, &[AUDIENCE], user);
            assert!(
                matches!(
                    identity_of(Some(&s), "cluster.local"),
                    Err(ReviewError::NotServiceAccount { .. })
                ),
                "{user}"
            );
        }
    }
}
