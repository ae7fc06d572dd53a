//! Conduit's Kubernetes custom resources, derived from the same serde types as the mesh file.
//!
//! One schema, three carriers (DESIGN.md, "Configuration"): a `ServiceProfile`'s spec is a
//! mesh file service's `profile.routes` and `breaker`, field for field, so a block moves
//! between the two unchanged. The OpenAPI schema the API server validates with is generated
//! from those types ([`conduit_core`]'s `schema` feature), so it cannot drift from what the
//! controller decodes; the controller still validates what the schema cannot say (regular
//! expressions, durations, ranges) and names the field when it refuses a profile.
//!
//! ```yaml
//! apiVersion: conduit.io/v1alpha1
//! kind: ServiceProfile
//! metadata:
//!   name: web                      # the Service's name (or web.NAMESPACE.svc.cluster.local)
//!   namespace: shop
//! spec:
//!   routes:
//!     - name: items
//!       match: { method: GET, path: { prefix: /items/ } }
//!       timeouts: { request: 2s }
//!       retry: { max_attempts: 3, budget: { ratio: 0.2 } }
//!   breaker: { consecutive_failures: 5 }
//! ```
//!
//! Authorization policy is two kinds (Linkerd's `Server` and `AuthorizationPolicy`, at the
//! scale of a Service port): a `Server` says which port of a Service a policy governs and what
//! happens to clients no authorization names; each `AuthorizationPolicy` naming the `Server`
//! adds one authorization (a mesh file policy's `authorizations[i]`, plus ServiceAccounts).
//! Kubernetes discovery (`discovery::kubernetes`, which depends on this module, not the other
//! way round) assembles them into the port's policy.
//!
//! ```yaml
//! apiVersion: conduit.io/v1alpha1
//! kind: Server
//! metadata: { name: web-http, namespace: shop }
//! spec:
//!   service: web                   # a Service in the same namespace
//!   port: http                     # its port, by number or name (absent: every port)
//!   default: deny                  # all-unauthenticated | all-authenticated | deny (absent: deny)
//!   audit: false                   # true: deny no one, count who would have been denied
//! ---
//! apiVersion: conduit.io/v1alpha1
//! kind: AuthorizationPolicy
//! metadata: { name: web-from-gateway, namespace: shop }
//! spec:
//!   server: web-http
//!   serviceAccounts: [{ name: gateway, namespace: edge }]   # namespace: the policy's own
//!   identities: ["*.ops.serviceaccount.identity.conduit.cluster.local"]
//!   networks: ["10.0.0.0/8"]       # with identities: both must match
//! ```

use std::borrow::Cow;

use conduit_core::mesh::{MAX_IDENTITIES, MAX_NETWORKS, RawBreaker, RawProfile, RawService};
use conduit_core::policy::DefaultPolicy;
use conduit_core::route::RawRoute;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of Conduit's resources.
pub const GROUP: &str = "conduit.io";

/// A service's routes and circuit breaking: the `profile` and `breaker` of a mesh file service.
#[derive(
    CustomResource, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "conduit.io",
    version = "v1alpha1",
    kind = "ServiceProfile",
    namespaced,
    shortname = "sp",
    doc = "Routes (matches, timeouts, retries, response classes, faults) and circuit breaking for the Service of the same name in the same namespace."
)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceProfileSpec {
    /// Routes, matched in order; the first that matches a request is its route.
    pub routes: Vec<RawRoute>,
    /// Circuit breaking for the service's endpoints (absent: the defaults).
    pub breaker: Option<RawBreaker>,
}

impl ServiceProfileSpec {
    /// The profile as a mesh file service's fields (the endpoints and port come from the
    /// Service and its endpoints).
    #[must_use]
    pub fn to_raw(&self, port: u16) -> RawService {
        RawService {
            port: Some(port),
            profile: Some(RawProfile {
                routes: self.routes.clone(),
            }),
            breaker: self.breaker.clone(),
            ..RawService::default()
        }
    }
}

/// Which port of a Service a policy governs, and what happens to clients no
/// AuthorizationPolicy naming this Server allows.
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "conduit.io",
    version = "v1alpha1",
    kind = "Server",
    namespaced,
    shortname = "srv",
    doc = "A port of a Service whose meshed pods admit only the clients its AuthorizationPolicies allow (others get the default: deny unless set).",
    printcolumn = r#"{"name": "Service", "type": "string", "jsonPath": ".spec.service"}"#,
    printcolumn = r#"{"name": "Port", "type": "string", "jsonPath": ".spec.port"}"#,
    printcolumn = r#"{"name": "Default", "type": "string", "jsonPath": ".spec.default"}"#,
    printcolumn = r#"{"name": "Audit", "type": "boolean", "jsonPath": ".spec.audit"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    /// The Service, in the same namespace.
    pub service: String,
    /// The Service's port, by number or name (absent: every port of the Service). A Server
    /// naming a port takes precedence over one for every port.
    #[serde(default)]
    pub port: Option<ServerPort>,
    /// What happens to clients no AuthorizationPolicy allows (absent: `deny`).
    #[serde(default)]
    pub default: Option<ServerDefault>,
    /// Only count the clients the policy would deny, and let them through.
    #[serde(default)]
    pub audit: bool,
}

impl ServerSpec {
    /// The default policy of the port: as written, else [`DEFAULT_SERVER_POLICY`].
    #[must_use]
    pub fn default_policy(&self) -> DefaultPolicy {
        self.default
            .map_or(DEFAULT_SERVER_POLICY, DefaultPolicy::from)
    }
}

/// What a `Server` without `default` does with clients no authorization allows: deny them.
/// Unlike a mesh file policy block (whose absent default admits everyone, so adding the mesh
/// changes nothing), a `Server` exists to restrict its port, and Linkerd users expect a port
/// with a `Server` to admit only what is authorized.
pub const DEFAULT_SERVER_POLICY: DefaultPolicy = DefaultPolicy::Deny;

/// What happens to clients no AuthorizationPolicy allows: `all-unauthenticated`,
/// `all-authenticated` or `deny` (absent: `deny`, as with Linkerd: a port that gets a Server
/// admits only what is authorized).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServerDefault {
    /// Every client.
    #[serde(rename = "all-unauthenticated")]
    AllUnauthenticated,
    /// Clients that proved an identity over mTLS.
    #[serde(rename = "all-authenticated")]
    AllAuthenticated,
    /// No client.
    #[serde(rename = "deny")]
    Deny,
}

impl From<ServerDefault> for DefaultPolicy {
    fn from(default: ServerDefault) -> Self {
        match default {
            ServerDefault::AllUnauthenticated => Self::AllUnauthenticated,
            ServerDefault::AllAuthenticated => Self::AllAuthenticated,
            ServerDefault::Deny => Self::Deny,
        }
    }
}

impl From<DefaultPolicy> for ServerDefault {
    // Exhaustive, so a new default policy in core fails to compile here until the CRD can
    // say it.
    fn from(default: DefaultPolicy) -> Self {
        match default {
            DefaultPolicy::AllUnauthenticated => Self::AllUnauthenticated,
            DefaultPolicy::AllAuthenticated => Self::AllAuthenticated,
            DefaultPolicy::Deny => Self::Deny,
        }
    }
}

/// A Service port by number or by name (as a Service's `targetPort` is written).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ServerPort {
    /// The Service's `port`.
    Number(u16),
    /// The Service port's `name`.
    Name(String),
}

impl core::fmt::Display for ServerPort {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Number(number) => write!(f, "{number}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

impl JsonSchema for ServerPort {
    fn schema_name() -> Cow<'static, str> {
        "ServerPort".into()
    }

    fn inline_schema() -> bool {
        true
    }

    // An int-or-string, the one mixed type a structural schema allows; its bounds are set
    // in `crds` (`with_port_bounds`).
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A Service port: its number or its name.",
            "x-kubernetes-int-or-string": true,
        })
    }
}

/// Clients a Server's port admits: a mesh file policy's `authorizations[i]`, plus
/// ServiceAccounts.
#[derive(
    CustomResource, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "conduit.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    shortname = "authzpolicy",
    doc = "Clients (identities, ServiceAccounts, networks) that the Server of the same namespace it names admits.",
    printcolumn = r#"{"name": "Server", "type": "string", "jsonPath": ".spec.server"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The Server's name, in the same namespace.
    pub server: String,
    /// Client identities: exact names, `*.suffix`, or `*` for any client with an identity.
    #[serde(default)]
    #[schemars(length(max = MAX_IDENTITIES))]
    pub identities: Vec<String>,
    /// Client ServiceAccounts (their pods' identities).
    #[serde(default, rename = "serviceAccounts")]
    #[schemars(length(max = MAX_IDENTITIES))]
    pub service_accounts: Vec<ServiceAccountRef>,
    /// Client networks in CIDR notation (`10.0.0.0/8`, `fd00::/8`, or a bare address). With
    /// identities or ServiceAccounts, a client needs both; alone, any client from them.
    #[serde(default)]
    #[schemars(length(max = MAX_NETWORKS))]
    pub networks: Vec<String>,
}

/// A ServiceAccount, by name and namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountRef {
    /// The ServiceAccount's name.
    pub name: String,
    /// Its namespace (absent: the AuthorizationPolicy's).
    #[serde(default)]
    pub namespace: Option<String>,
}

/// Every Conduit CRD, as the API server takes them.
///
/// The schemas carry no `default`s: the controller applies the defaults when it reads an
/// object (the same `serde(default)`s as the mesh file's), so the stored object stays as the
/// user wrote it, and older API servers refuse some defaults (1.20 reads `default: ""` as
/// null).
#[must_use]
pub fn crds() -> Vec<CustomResourceDefinition> {
    use kube::CustomResourceExt as _;
    vec![
        without_defaults(ServiceProfile::crd()),
        with_port_bounds(without_defaults(Server::crd())),
        without_defaults(AuthorizationPolicy::crd()),
    ]
}

/// Bounds a `Server`'s `spec.port`: a number from 1 to 65535 or a port name (a DNS label, as
/// Kubernetes names Service ports), so the API server refuses what the controller could not
/// decode. Set here rather than in `ServerPort`'s schema, which kube's rewriting would change.
fn with_port_bounds(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    let mut crd = crd;
    for version in &mut crd.spec.versions {
        let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        let Ok(mut json) = serde_json::to_value(&*schema) else {
            continue;
        };
        if let Some(port) = json.pointer_mut("/properties/spec/properties/port")
            && let Some(port) = port.as_object_mut()
        {
            // Beside the int-or-string marker, not in typed `anyOf` branches (a structural
            // schema may not type them): number bounds apply to numbers only, string ones to
            // strings only.
            port.insert("minimum".into(), 1.into());
            port.insert("maximum".into(), 65535.into());
            port.insert("maxLength".into(), 63.into());
            port.insert("pattern".into(), "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$".into());
        }
        if let Ok(bounded) = serde_json::from_value(json) {
            *schema = bounded;
        }
    }
    crd
}

fn without_defaults(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    let mut crd = crd;
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            // Through JSON: the typed schema nests `JSONSchemaProps` in many shapes.
            if let Ok(mut json) = serde_json::to_value(&*schema) {
                strip_defaults(&mut json);
                if let Ok(stripped) = serde_json::from_value(json) {
                    *schema = stripped;
                }
            }
        }
    }
    crd
}

/// Removes the `default` keyword from a schema and every schema inside it (not a property
/// that happens to be named `default`, as a policy's is).
fn strip_defaults(schema: &mut serde_json::Value) {
    let Some(map) = schema.as_object_mut() else {
        return;
    };
    map.remove("default");
    if let Some(properties) = map.get_mut("properties").and_then(|p| p.as_object_mut()) {
        properties.values_mut().for_each(strip_defaults);
    }
    for key in ["items", "additionalProperties", "not"] {
        if let Some(inner) = map.get_mut(key) {
            strip_defaults(inner);
        }
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(list) = map.get_mut(key).and_then(|l| l.as_array_mut()) {
            list.iter_mut().for_each(strip_defaults);
        }
    }
}

/// The CRDs as one YAML stream (`conduit install` and the Helm chart carry this).
///
/// # Errors
///
/// Never in practice: the CRDs are plain data; the error is the serializer's.
pub fn crds_yaml() -> Result<String, serde_json::Error> {
    let mut out = String::new();
    for crd in crds() {
        // JSON is YAML; a YAML library is not needed for one document per CRD.
        out.push_str("---\n");
        out.push_str(&serde_json::to_string_pretty(&crd)?);
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt as _;

    use super::*;

    #[test]
    fn a_mesh_file_profile_block_is_a_service_profile_spec() {
        let spec: ServiceProfileSpec = serde_json::from_value(serde_json::json!({
            "routes": [{
                "name": "items",
                "match": {"method": "GET", "path": {"prefix": "/items/"}},
                "timeouts": {"request": "2s"},
                "response_classes": {"grpc": [{"code": "unavailable", "failure": true}]},
            }],
            "breaker": {"consecutive_failures": 5},
        }))
        .expect("decodes");
        assert_eq!(spec.routes[0].name, "items");
        let err = serde_json::from_value::<ServiceProfileSpec>(serde_json::json!({"routez": []}))
            .expect_err("unknown fields are refused");
        assert!(err.to_string().contains("routez"), "{err}");
    }

    #[test]
    fn server_and_authorization_policy_specs_decode_as_documented() {
        let server: ServerSpec =
            serde_json::from_value(serde_json::json!({"service": "web", "port": "http"}))
                .expect("decodes");
        assert_eq!(server.port, Some(ServerPort::Name("http".into())));
        assert_eq!(server.default_policy(), DefaultPolicy::Deny, "absent: deny");
        assert!(!server.audit);
        let server: ServerSpec = serde_json::from_value(serde_json::json!({
            "service": "web", "port": 8080, "default": "all-authenticated", "audit": true,
        }))
        .expect("decodes");
        assert_eq!(server.port, Some(ServerPort::Number(8080)));
        assert_eq!(server.default_policy(), DefaultPolicy::AllAuthenticated);
        for policy in DefaultPolicy::ALL {
            assert_eq!(
                DefaultPolicy::from(ServerDefault::from(policy)),
                policy,
                "{policy}"
            );
            let written: ServerDefault =
                serde_json::from_value(serde_json::json!(policy.as_str())).expect("its name");
            assert_eq!(DefaultPolicy::from(written), policy);
        }
        serde_json::from_value::<ServerSpec>(
            serde_json::json!({"service": "web", "default": "maybe"}),
        )
        .expect_err("not a default");
        let policy: AuthorizationPolicySpec = serde_json::from_value(serde_json::json!({
            "server": "web", "serviceAccounts": [{"name": "gateway", "namespace": "edge"}],
        }))
        .expect("decodes");
        assert_eq!(policy.service_accounts[0].name, "gateway");
        assert!(policy.identities.is_empty() && policy.networks.is_empty());
    }

    #[test]
    fn the_crds_as_installed() {
        insta::assert_snapshot!(crds_yaml().expect("serializes"));
    }

    fn any_of_only_in_int_or_string(schema: &serde_json::Value) -> bool {
        match schema {
            serde_json::Value::Object(map) => {
                (!map.contains_key("anyOf")
                    || map.get("x-kubernetes-int-or-string") == Some(&serde_json::json!(true)))
                    && map.values().all(any_of_only_in_int_or_string)
            }
            serde_json::Value::Array(list) => list.iter().all(any_of_only_in_int_or_string),
            _ => true,
        }
    }

    #[test]
    fn the_crd_schema_is_structural() {
        for crd in crds() {
            let crd = serde_json::to_value(crd).expect("serializes");
            let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
            let text = schema.to_string();
            // A structural schema (what the API server requires of a CRD) has no `$ref`, no
            // `anyOf` of differently typed branches (but an int-or-string's) and no
            // `additionalProperties: false` beside `properties`.
            assert!(!text.contains("$ref"), "{text}");
            assert!(!text.contains("\"additionalProperties\":false"), "{text}");
            assert!(any_of_only_in_int_or_string(schema), "{text}");
        }
        let crd = serde_json::to_value(ServiceProfile::crd()).expect("serializes");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        assert_eq!(
            schema["properties"]["spec"]["properties"]["routes"]["items"]["properties"]["name"]["type"],
            "string"
        );
    }
}
