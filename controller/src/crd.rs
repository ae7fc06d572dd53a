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

use conduit_core::mesh::{RawBreaker, RawProfile, RawService};
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

/// Every Conduit CRD, as the API server takes them.
///
/// The schemas carry no `default`s: the controller applies the defaults when it reads an
/// object (the same `serde(default)`s as the mesh file's), so the stored object stays as the
/// user wrote it, and older API servers refuse some defaults (1.20 reads `default: ""` as
/// null).
#[must_use]
pub fn crds() -> Vec<CustomResourceDefinition> {
    use kube::CustomResourceExt as _;
    vec![without_defaults(ServiceProfile::crd())]
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
    fn the_crds_as_installed() {
        insta::assert_snapshot!(crds_yaml().expect("serializes"));
    }

    #[test]
    fn the_crd_schema_is_structural() {
        let crd = serde_json::to_value(ServiceProfile::crd()).expect("serializes");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let text = schema.to_string();
        // A structural schema (what the API server requires of a CRD) has no `$ref`, no
        // `anyOf` of differently typed branches and no `additionalProperties: false` beside
        // `properties`.
        assert!(!text.contains("$ref"), "{text}");
        assert!(!text.contains("\"additionalProperties\":false"), "{text}");
        assert_eq!(
            schema["properties"]["spec"]["properties"]["routes"]["items"]["properties"]["name"]["type"],
            "string"
        );
    }
}
