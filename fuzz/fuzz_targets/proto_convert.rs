//! Wire validation (`proto/src/convert.rs`), on protobuf bytes a peer sends. The first input
//! byte picks the message: a Destination `Update`, a `DestinationProfile`, a `Route` or a
//! `WeightedAddr`.
//!
//! Never panics, and whatever converts is valid and converts back: core -> wire -> core gives
//! the same value, the wire message it gives survives encoding, and converting it again gives
//! the same wire message.
#![no_main]

use conduit_core::balance;
use conduit_core::mesh::{Endpoint, MAX_ENDPOINTS, MAX_WEIGHT};
use conduit_core::route::{self, Route};
use conduit_core::timeout::MAX_TIMEOUT;
use conduit_proto::convert::{DestinationChange, DestinationUpdate, ProfileUpdate};
use conduit_proto::pb::destination as dst;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|input: &[u8]| {
    let Some((&pick, bytes)) = input.split_first() else {
        return;
    };
    match pick % 4 {
        0 => update(bytes),
        1 => profile(bytes),
        2 => one_route(bytes),
        _ => endpoint(bytes),
    }
});

/// core -> wire -> core is the identity, and the wire message survives encoding.
fn round_trip<C, W>(core: &C) -> W
where
    C: Clone + PartialEq + std::fmt::Debug + TryFrom<W>,
    C::Error: std::fmt::Debug,
    W: Message + Default + PartialEq + Clone + std::fmt::Debug + From<C>,
{
    let wire = W::from(core.clone());
    let back = C::try_from(wire.clone()).expect("what converted converts back");
    assert_eq!(&back, core);
    let decoded = W::decode(wire.encode_to_vec().as_slice()).expect("what was encoded decodes");
    assert_eq!(decoded, wire);
    assert_eq!(W::from(back), wire);
    wire
}

fn check_endpoints(endpoints: &[Endpoint]) {
    assert!(!endpoints.is_empty() && endpoints.len() <= MAX_ENDPOINTS);
    let mut addrs: Vec<_> = endpoints.iter().map(|e| e.addr).collect();
    addrs.sort_unstable();
    addrs.dedup();
    assert_eq!(addrs.len(), endpoints.len(), "duplicate addresses");
    for endpoint in endpoints {
        check_endpoint(endpoint);
    }
}

fn check_endpoint(endpoint: &Endpoint) {
    assert!(endpoint.addr.port() != 0 && endpoint.weight <= MAX_WEIGHT);
    assert!(endpoint.admin.is_none());
    assert!(endpoint.labels.keys().all(|k| !k.is_empty()));
}

fn update(bytes: &[u8]) {
    let Ok(wire) = dst::Update::decode(bytes) else {
        return;
    };
    let converted = DestinationUpdate::try_from(wire.clone());
    let balanced = balance::Update::try_from(wire);
    let Ok(update) = converted else {
        assert!(balanced.is_err());
        return;
    };
    assert_eq!(balanced, Ok(balance::Update::from(update.clone())));
    assert!(update.version >= 1);
    match &update.change {
        DestinationChange::Replace(endpoints) | DestinationChange::Add(endpoints) => {
            check_endpoints(endpoints);
        }
        DestinationChange::Remove(addrs) => {
            assert!(!addrs.is_empty() && addrs.iter().all(|a| a.port() != 0));
        }
        DestinationChange::NoEndpoints { .. } => {}
    }
    round_trip::<DestinationUpdate, dst::Update>(&update);
}

fn check_route(route: &Route) {
    assert!(route::check_route_name(&route.name).is_ok());
    let timeouts = route.policy.timeouts;
    for timeout in [timeouts.request, timeouts.attempt].into_iter().flatten() {
        assert!(!timeout.is_zero() && timeout <= MAX_TIMEOUT);
    }
}

fn profile(bytes: &[u8]) {
    let Ok(wire) = dst::DestinationProfile::decode(bytes) else {
        return;
    };
    let Ok(update) = ProfileUpdate::try_from(wire) else {
        return;
    };
    assert!(update.version >= 1);
    for route in update.profile.routes() {
        check_route(route);
    }
    round_trip::<ProfileUpdate, dst::DestinationProfile>(&update);
}

fn one_route(bytes: &[u8]) {
    let Ok(wire) = dst::Route::decode(bytes) else {
        return;
    };
    let Ok(route) = Route::try_from(wire) else {
        return;
    };
    check_route(&route);
    // `Route` converts to the wire by reference.
    let wire = dst::Route::from(&route);
    let back = Route::try_from(wire.clone()).expect("what converted converts back");
    assert_eq!(back, route);
    let decoded = dst::Route::decode(wire.encode_to_vec().as_slice()).expect("decodes");
    assert_eq!(decoded, wire);
    assert_eq!(dst::Route::from(&back), wire);
}

fn endpoint(bytes: &[u8]) {
    let Ok(wire) = dst::WeightedAddr::decode(bytes) else {
        return;
    };
    let Ok(endpoint) = Endpoint::try_from(wire) else {
        return;
    };
    check_endpoint(&endpoint);
    round_trip::<Endpoint, dst::WeightedAddr>(&endpoint);
}
