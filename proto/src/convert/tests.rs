use std::collections::BTreeMap;

use proptest::prelude::*;
use prost::Message as _;

use super::*;

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn pb_addr(ip: &[u8], port: u32) -> net::TcpAddress {
    net::TcpAddress {
        ip: ip.to_vec(),
        port,
    }
}

fn weighted(a: net::TcpAddress) -> dst::WeightedAddr {
    dst::WeightedAddr {
        addr: Some(a),
        weight: 1,
        ..dst::WeightedAddr::default()
    }
}

fn add(addrs: Vec<dst::WeightedAddr>) -> dst::Update {
    dst::Update {
        version: 1,
        update: Some(dst::update::Update::Add(dst::WeightedAddrSet { addrs })),
    }
}

fn error_of(update: dst::Update) -> InvalidMessage {
    DestinationUpdate::try_from(update).unwrap_err()
}

#[test]
fn addresses_round_trip() {
    for text in [
        "10.1.2.3:80",
        "[::1]:4143",
        "[2001:db8::7]:65535",
        "0.0.0.0:1",
    ] {
        let a = addr(text);
        assert_eq!(SocketAddr::try_from(net::TcpAddress::from(a)).unwrap(), a);
    }
}

#[test]
fn invalid_endpoints_name_their_field() {
    let cases = [
        (
            add(vec![weighted(pb_addr(&[10, 0, 0], 80))]),
            "add.addrs[0].addr.ip",
        ),
        (
            add(vec![weighted(pb_addr(&[10, 0, 0, 1], 0))]),
            "add.addrs[0].addr.port",
        ),
        (
            add(vec![weighted(pb_addr(&[10, 0, 0, 1], 65_536))]),
            "add.addrs[0].addr.port",
        ),
        (
            add(vec![dst::WeightedAddr {
                addr: None,
                ..dst::WeightedAddr::default()
            }]),
            "add.addrs[0].addr",
        ),
        (
            add(vec![dst::WeightedAddr {
                weight: MAX_WEIGHT + 1,
                ..weighted(pb_addr(&[10, 0, 0, 1], 80))
            }]),
            "add.addrs[0].weight",
        ),
        (
            add(vec![dst::WeightedAddr {
                tls_identity: Some(dst::TlsIdentity {
                    name: "Web..x".into(),
                }),
                ..weighted(pb_addr(&[10, 0, 0, 1], 80))
            }]),
            "add.addrs[0].tls_identity.name",
        ),
        (
            add(vec![dst::WeightedAddr {
                metric_labels: BTreeMap::from([(String::new(), "a".into())]),
                ..weighted(pb_addr(&[10, 0, 0, 1], 80))
            }]),
            "add.addrs[0].metric_labels",
        ),
        (
            add(vec![
                weighted(pb_addr(&[10, 0, 0, 1], 80)),
                weighted(pb_addr(&[10, 0, 0, 1], 80)),
            ]),
            "add.addrs[1].addr",
        ),
        (add(vec![]), "add.addrs"),
        (
            dst::Update {
                version: 1,
                update: None,
            },
            "update",
        ),
        (
            dst::Update {
                version: 0,
                ..add(vec![weighted(pb_addr(&[10, 0, 0, 1], 80))])
            },
            "version",
        ),
        (
            dst::Update {
                version: 3,
                update: Some(dst::update::Update::Remove(dst::AddrSet {
                    addrs: vec![pb_addr(&[1, 2, 3, 4], 1), pb_addr(&[1; 17], 1)],
                })),
            },
            "remove.addrs[1].ip",
        ),
    ];
    for (update, field) in cases {
        let err = error_of(update.clone());
        assert_eq!(err.field(), field, "{update:?}: {err}");
        assert!(err.to_string().starts_with(field), "{err}");
    }
}

#[test]
fn no_endpoints_keeps_whether_the_service_exists() {
    for exists in [true, false] {
        let update = dst::Update {
            version: 9,
            update: Some(dst::update::Update::NoEndpoints(dst::NoEndpoints {
                exists,
            })),
        };
        let got = DestinationUpdate::try_from(update.clone()).unwrap();
        assert_eq!(got.change, DestinationChange::NoEndpoints { exists });
        let balance = balance::Update::try_from(update).unwrap();
        assert_eq!(
            balance,
            balance::Update {
                version: 9,
                change: balance::Change::NoEndpoints
            }
        );
    }
}

#[test]
fn invalid_routes_name_their_field() {
    let route = |name: &str, method: &str, path: Option<dst::path_match::Kind>| dst::Route {
        name: name.into(),
        condition: Some(dst::RequestMatch {
            method: method.into(),
            path: path.map(|kind| dst::PathMatch { kind: Some(kind) }),
        }),
        ..dst::Route::default()
    };
    let profile = |routes| dst::DestinationProfile {
        version: 1,
        exists: true,
        routes,
        ..Default::default()
    };
    let cases = [
        (vec![route("", "", None)], "routes[0].name"),
        (vec![route("a", "G ET", None)], "routes[0].condition.method"),
        (
            vec![route(
                "a",
                "",
                Some(dst::path_match::Kind::Exact("items".into())),
            )],
            "routes[0].condition.path.exact",
        ),
        (
            vec![route(
                "a",
                "",
                Some(dst::path_match::Kind::Prefix(String::new())),
            )],
            "routes[0].condition.path.prefix",
        ),
        (
            vec![route("a", "", None), route("a", "", None)],
            "routes[1].name",
        ),
        (
            vec![dst::Route {
                name: "a".into(),
                condition: Some(dst::RequestMatch {
                    method: String::new(),
                    path: Some(dst::PathMatch { kind: None }),
                }),
                ..dst::Route::default()
            }],
            "routes[0].condition.path.kind",
        ),
    ];
    for (routes, field) in cases {
        let err = ProfileUpdate::try_from(profile(routes)).unwrap_err();
        assert_eq!(err.field(), field, "{err}");
    }
    let too_many = (0..=MAX_ROUTES)
        .map(|i| route(&format!("r{i}"), "", None))
        .collect();
    assert_eq!(
        ProfileUpdate::try_from(profile(too_many))
            .unwrap_err()
            .field(),
        "routes"
    );
}

#[test]
fn a_route_without_condition_matches_everything() {
    let got = mesh::Route::try_from(dst::Route {
        name: "all".into(),
        ..dst::Route::default()
    })
    .unwrap();
    assert_eq!(
        got,
        mesh::Route {
            name: "all".into(),
            method: None,
            path: PathMatch::Any
        }
    );
}

/// The profile fields core has no types for yet are not read: a profile that sets them
/// converts to the same routes as one that does not (see the module docs).
#[test]
fn unconverted_profile_fields_are_ignored() {
    let plain = dst::DestinationProfile {
        version: 2,
        exists: true,
        fully_qualified_name: "web.default".into(),
        routes: vec![dst::Route {
            name: "r".into(),
            ..dst::Route::default()
        }],
        retry_budget: None,
    };
    let mut rich = plain.clone();
    rich.retry_budget = Some(dst::RetryBudget {
        retry_ratio_permille: 200,
        min_retries_per_second: 10,
        ttl_ms: 10_000,
    });
    rich.routes[0].timeout_ms = Some(100);
    rich.routes[0].retry_policy = Some(dst::RetryPolicy {
        max_attempts: 3,
        ..Default::default()
    });
    rich.routes[0].response_classes = vec![dst::ResponseClass {
        condition: None,
        is_failure: true,
    }];
    assert_eq!(
        ProfileUpdate::try_from(rich).unwrap(),
        ProfileUpdate::try_from(plain).unwrap()
    );
}

#[test]
fn errors_never_hold_huge_fields() {
    let name = "é".repeat(10_000);
    let update = add(vec![dst::WeightedAddr {
        tls_identity: Some(dst::TlsIdentity { name }),
        ..weighted(pb_addr(&[10, 0, 0, 1], 80))
    }]);
    let InvalidMessage::Identity { name, .. } = error_of(update) else {
        panic!("identity error")
    };
    assert!(name.len() <= MAX_IDENTITY_BYTES);
}

// === Properties ===

fn arb_socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), 1..=u16::MAX).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        (any::<[u8; 16]>(), 1..=u16::MAX).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
    ]
}

fn arb_endpoint() -> impl Strategy<Value = Endpoint> {
    (
        arb_socket_addr(),
        0..=MAX_WEIGHT,
        proptest::option::of("[a-z0-9]{1,10}(\\.[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?){0,3}"),
        proptest::collection::btree_map("[a-z]{1,8}", ".{0,8}", 0..4),
    )
        .prop_map(|(addr, weight, identity, labels)| Endpoint {
            addr,
            weight,
            identity,
            labels,
            admin: None,
        })
}

fn arb_endpoints() -> impl Strategy<Value = Vec<Endpoint>> {
    proptest::collection::btree_map(arb_socket_addr(), arb_endpoint(), 1..8).prop_map(|map| {
        map.into_iter()
            .map(|(addr, endpoint)| Endpoint { addr, ..endpoint })
            .collect()
    })
}

fn arb_update() -> impl Strategy<Value = DestinationUpdate> {
    let change = prop_oneof![
        arb_endpoints().prop_map(DestinationChange::Replace),
        arb_endpoints().prop_map(DestinationChange::Add),
        arb_endpoints()
            .prop_map(|e| DestinationChange::Remove(e.into_iter().map(|e| e.addr).collect())),
        any::<bool>().prop_map(|exists| DestinationChange::NoEndpoints { exists }),
    ];
    (1..=u64::MAX, change).prop_map(|(version, change)| DestinationUpdate { version, change })
}

fn arb_route() -> impl Strategy<Value = mesh::Route> {
    (
        "[a-z][a-z0-9-]{0,10}",
        proptest::option::of(prop_oneof![
            Just(http::Method::GET),
            Just(http::Method::POST),
            Just(http::Method::DELETE),
            Just(http::Method::from_bytes(b"PURGE").unwrap()),
        ]),
        prop_oneof![
            Just(PathMatch::Any),
            "/[a-z/]{0,10}".prop_map(PathMatch::Exact),
            "/[a-z/]{0,10}".prop_map(PathMatch::Prefix),
        ],
    )
        .prop_map(|(name, method, path)| mesh::Route { name, method, path })
}

fn arb_profile_update() -> impl Strategy<Value = ProfileUpdate> {
    (
        1..=u64::MAX,
        any::<bool>(),
        "[a-z.]{0,20}",
        proptest::collection::vec(arb_route(), 0..6),
    )
        .prop_map(|(version, exists, name, routes)| {
            // Route names are unique within a profile.
            let mut seen = BTreeSet::new();
            let routes = routes
                .into_iter()
                .filter(|r| seen.insert(r.name.clone()))
                .collect();
            ProfileUpdate {
                version,
                exists,
                name,
                profile: mesh::Profile { routes },
            }
        })
}

fn arb_pb_addr() -> impl Strategy<Value = net::TcpAddress> {
    (proptest::collection::vec(any::<u8>(), 0..20), any::<u32>())
        .prop_map(|(ip, port)| net::TcpAddress { ip, port })
}

fn arb_pb_weighted() -> impl Strategy<Value = dst::WeightedAddr> {
    (
        proptest::option::of(arb_pb_addr()),
        any::<u32>(),
        proptest::option::of(".{0,12}".prop_map(|name| dst::TlsIdentity { name })),
        proptest::collection::btree_map(".{0,3}", ".{0,3}", 0..3),
    )
        .prop_map(
            |(addr, weight, tls_identity, metric_labels)| dst::WeightedAddr {
                addr,
                weight,
                tls_identity,
                metric_labels,
            },
        )
}

fn arb_pb_update() -> impl Strategy<Value = dst::Update> {
    let set = || {
        proptest::collection::vec(arb_pb_weighted(), 0..5)
            .prop_map(|addrs| dst::WeightedAddrSet { addrs })
    };
    let case = proptest::option::of(prop_oneof![
        set().prop_map(dst::update::Update::Replace),
        set().prop_map(dst::update::Update::Add),
        proptest::collection::vec(arb_pb_addr(), 0..5)
            .prop_map(|addrs| dst::update::Update::Remove(dst::AddrSet { addrs })),
        any::<bool>()
            .prop_map(|exists| dst::update::Update::NoEndpoints(dst::NoEndpoints { exists })),
    ]);
    (any::<u64>(), case).prop_map(|(version, update)| dst::Update { version, update })
}

fn arb_pb_route() -> impl Strategy<Value = dst::Route> {
    let kind = proptest::option::of(prop_oneof![
        ".{0,6}".prop_map(dst::path_match::Kind::Exact),
        ".{0,6}".prop_map(dst::path_match::Kind::Prefix),
    ]);
    (".{0,4}", ".{0,6}", proptest::option::of(kind)).prop_map(|(name, method, path)| dst::Route {
        name,
        condition: Some(dst::RequestMatch {
            method,
            path: path.map(|kind| dst::PathMatch { kind }),
        }),
        ..dst::Route::default()
    })
}

proptest! {
    /// core -> wire -> core is the identity for every valid update.
    #[test]
    fn updates_round_trip(update in arb_update()) {
        let wire = dst::Update::from(update.clone());
        prop_assert_eq!(DestinationUpdate::try_from(wire.clone()).unwrap(), update);
        // And through bytes, as the network carries it.
        let decoded = dst::Update::decode(wire.encode_to_vec().as_slice()).unwrap();
        prop_assert_eq!(decoded, wire);
    }

    /// core -> wire -> core is the identity for every valid profile.
    #[test]
    fn profiles_round_trip(update in arb_profile_update()) {
        let wire = dst::DestinationProfile::from(update.clone());
        prop_assert_eq!(ProfileUpdate::try_from(wire).unwrap(), update);
    }

    /// Arbitrary messages convert or are rejected; they never panic, and what converts is valid.
    #[test]
    fn garbage_updates_never_panic(update in arb_pb_update()) {
        if let Ok(update) = DestinationUpdate::try_from(update) {
            prop_assert!(update.version >= 1);
            if let DestinationChange::Replace(e) | DestinationChange::Add(e) = &update.change {
                prop_assert!(!e.is_empty());
                prop_assert!(e.iter().all(|e| e.weight <= MAX_WEIGHT && e.addr.port() != 0));
            }
        }
    }

    /// Arbitrary routes convert or are rejected, never panic.
    #[test]
    fn garbage_profiles_never_panic(routes in proptest::collection::vec(arb_pb_route(), 0..5), version: u64) {
        let _ = ProfileUpdate::try_from(dst::DestinationProfile { version, exists: true, routes, ..Default::default() });
    }

    /// Arbitrary bytes either fail to decode or decode into something conversion handles.
    #[test]
    fn garbage_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(update) = dst::Update::decode(bytes.as_slice()) {
            let _ = DestinationUpdate::try_from(update);
        }
        if let Ok(profile) = dst::DestinationProfile::decode(bytes.as_slice()) {
            let _ = ProfileUpdate::try_from(profile);
        }
    }
}
