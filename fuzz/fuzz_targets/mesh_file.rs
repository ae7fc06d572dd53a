//! The mesh file parser (`conduit_proto::mesh_file::parse`), on YAML an operator writes.
//!
//! Never panics, and for every mesh it accepts:
//! - each service is found by the authority clients use for it (`name:port`);
//! - what the controller sends about each service over the Destination API is accepted by
//!   the proxies' wire validation and means the same: its endpoints (admin addresses, which
//!   the API does not carry, aside) and its route profile both convert back unchanged.
#![no_main]

use conduit_core::mesh::Endpoint;
use conduit_proto::convert::{DestinationChange, DestinationUpdate, ProfileUpdate};
use conduit_proto::mesh_file;
use conduit_proto::pb::{api, destination as dst};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let Ok(mesh) = mesh_file::parse(text) else {
        return;
    };
    for service in mesh.services() {
        let authority = format!("{}:{}", service.name, service.port);
        assert_eq!(
            mesh.lookup(&authority),
            Some(service),
            "{authority} does not find its service"
        );
        let _ = api::Workload::from(service);

        if !service.endpoints.is_empty() {
            let endpoints: Vec<Endpoint> = service
                .endpoints
                .iter()
                .cloned()
                .map(|endpoint| Endpoint {
                    admin: None,
                    ..endpoint
                })
                .collect();
            let update = DestinationUpdate {
                version: 1,
                change: DestinationChange::Replace(endpoints),
            };
            let wire = dst::Update::from(update.clone());
            assert_eq!(
                DestinationUpdate::try_from(wire),
                Ok(update),
                "the endpoints of {}",
                service.name
            );
        }

        let profile = ProfileUpdate {
            version: 1,
            exists: true,
            name: service.name.clone(),
            profile: service.profile.clone(),
        };
        let wire = dst::DestinationProfile::from(profile.clone());
        assert_eq!(
            ProfileUpdate::try_from(wire),
            Ok(profile),
            "the profile of {}",
            service.name
        );
    }
});
