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

fn pb_route(name: &str, method: &str, path: Option<dst::path_match::Kind>) -> dst::Route {
    dst::Route {
        name: name.into(),
        condition: Some(dst::RequestMatch {
            method: method.into(),
            path: path.map(|kind| dst::PathMatch { kind: Some(kind) }),
            ..dst::RequestMatch::default()
        }),
        ..dst::Route::default()
    }
}

fn pb_profile(routes: Vec<dst::Route>) -> dst::DestinationProfile {
    dst::DestinationProfile {
        version: 1,
        exists: true,
        routes,
        ..Default::default()
    }
}

fn profile_error(routes: Vec<dst::Route>) -> InvalidMessage {
    ProfileUpdate::try_from(pb_profile(routes)).unwrap_err()
}

#[test]
fn invalid_routes_name_their_field() {
    let route = pb_route;
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
                    path: Some(dst::PathMatch { kind: None }),
                    ..dst::RequestMatch::default()
                }),
                ..dst::Route::default()
            }],
            "routes[0].condition.path.kind",
        ),
    ];
    for (routes, field) in cases {
        let err = profile_error(routes);
        assert_eq!(err.field(), field, "{err}");
    }
    let too_many = (0..=MAX_ROUTES)
        .map(|i| route(&format!("r{i}"), "", None))
        .collect();
    assert_eq!(profile_error(too_many).field(), "routes");
}

/// A route with one change applied to an otherwise valid route.
fn route_with(change: impl FnOnce(&mut dst::Route)) -> dst::Route {
    let mut route = pb_route("r", "GET", None);
    change(&mut route);
    route
}

fn condition(route: &mut dst::Route) -> &mut dst::RequestMatch {
    route.condition.get_or_insert_with(Default::default)
}

fn header(name: &str, value: Option<dst::header_match::Value>) -> dst::HeaderMatch {
    dst::HeaderMatch {
        name: name.into(),
        value,
    }
}

fn class(kind: dst::response_match::Kind) -> dst::ResponseClass {
    dst::ResponseClass {
        condition: Some(dst::ResponseMatch { kind: Some(kind) }),
        is_failure: true,
        is_retryable: false,
    }
}

fn status(min: u32, max: u32) -> dst::response_match::Kind {
    dst::response_match::Kind::Status(dst::HttpStatusRange { min, max })
}

/// Every input the route carries since header matches, path regexes, timeouts and response
/// classes is refused when invalid, and the error names the field (and says why).
#[test]
fn invalid_route_policies_name_their_field() {
    use dst::header_match::Value;
    use dst::path_match::Kind;
    let regex = |source: String| {
        route_with(move |r| {
            condition(r).path = Some(dst::PathMatch {
                kind: Some(Kind::Regex(source)),
            });
        })
    };
    let headers = |headers: Vec<dst::HeaderMatch>| route_with(|r| condition(r).headers = headers);
    let day_ms = 24 * 3600 * 1000;
    let cases: Vec<(&str, dst::Route, &str, &str)> = vec![
        (
            "oversized regex",
            regex("a".repeat(route::MAX_REGEX_BYTES + 1)),
            "routes[0].condition.path.regex",
            "limit",
        ),
        (
            "regex compiling too large",
            regex("a{1000}{1000}".into()),
            "routes[0].condition.path.regex",
            "larger than",
        ),
        (
            "invalid regex",
            regex("(".into()),
            "routes[0].condition.path.regex",
            "invalid regular expression",
        ),
        (
            "bad header name",
            headers(vec![header("x tenant", Some(Value::Exact("a".into())))]),
            "routes[0].condition.headers[0].name",
            "not a header field name",
        ),
        (
            "invalid header regex",
            headers(vec![
                header("x-a", Some(Value::Exact("a".into()))),
                header("x-b", Some(Value::Regex("[".into()))),
            ]),
            "routes[0].condition.headers[1].regex",
            "invalid regular expression",
        ),
        (
            "header match with no value",
            headers(vec![header("x-tenant", None)]),
            "routes[0].condition.headers[0].value",
            "missing",
        ),
        (
            "too many header matches",
            headers(
                (0..=MAX_HEADER_MATCHES)
                    .map(|i| header(&format!("x-{i}"), Some(Value::Exact("a".into()))))
                    .collect(),
            ),
            "routes[0].condition.headers",
            "above the limit",
        ),
        (
            "request timeout 0",
            route_with(|r| r.timeout_ms = Some(0)),
            "routes[0].timeout_ms",
            "above zero",
        ),
        (
            "request timeout above 24 h",
            route_with(|r| r.timeout_ms = Some(day_ms + 1)),
            "routes[0].timeout_ms",
            "above the maximum",
        ),
        (
            "attempt timeout 0",
            route_with(|r| r.attempt_timeout_ms = Some(0)),
            "routes[0].attempt_timeout_ms",
            "above zero",
        ),
        (
            "attempt timeout above 24 h",
            route_with(|r| r.attempt_timeout_ms = Some(u64::MAX)),
            "routes[0].attempt_timeout_ms",
            "above the maximum",
        ),
        (
            "status range inverted",
            route_with(|r| r.response_classes = vec![class(status(599, 500))]),
            "routes[0].response_classes[0].condition.status.max",
            "below min",
        ),
        (
            "status not an HTTP status",
            route_with(|r| {
                r.response_classes = vec![class(status(500, 599)), class(status(99, 200))];
            }),
            "routes[0].response_classes[1].condition.status.min",
            "not an HTTP status",
        ),
        (
            "status far out of range",
            route_with(|r| r.response_classes = vec![class(status(500, 70_000))]),
            "routes[0].response_classes[0].condition.status.max",
            "not an HTTP status",
        ),
        (
            "unknown gRPC code",
            route_with(|r| {
                r.response_classes = vec![class(dst::response_match::Kind::GrpcStatus(17))];
            }),
            "routes[0].response_classes[0].condition.grpc_status",
            "not a gRPC status code",
        ),
        (
            "response class with no condition",
            route_with(|r| {
                r.response_classes = vec![dst::ResponseClass {
                    condition: None,
                    is_failure: true,
                    is_retryable: false,
                }];
            }),
            "routes[0].response_classes[0].condition.kind",
            "missing",
        ),
        (
            "too many response classes",
            route_with(|r| {
                r.response_classes = vec![class(status(500, 599)); 2 * MAX_RULES + 1];
            }),
            "routes[0].response_classes",
            "above the limit",
        ),
        (
            "too many HTTP response classes",
            route_with(|r| r.response_classes = vec![class(status(500, 599)); MAX_RULES + 1]),
            "routes[0].response_classes",
            "exceed the limit",
        ),
        (
            "route named default",
            route_with(|r| r.name = route::DEFAULT_ROUTE.into()),
            "routes[0].name",
            "not `default`",
        ),
    ];
    for (what, route, field, reason) in cases {
        let err = profile_error(vec![route]);
        assert_eq!(err.field(), field, "{what}: {err}");
        let text = err.to_string();
        assert!(text.starts_with(field), "{what}: {text}");
        assert!(text.contains(reason), "{what}: {text}");
    }
}

#[test]
fn a_route_without_condition_matches_everything() {
    let got = Route::try_from(dst::Route {
        name: "all".into(),
        ..dst::Route::default()
    })
    .unwrap();
    assert_eq!(
        got,
        Route::new("all", RequestMatch::new(None, PathMatch::Any))
    );
}

/// Header matches, a path regex, both timeouts and response classes of both kinds arrive as
/// the core's route, classes kept in their order within each kind.
#[test]
fn a_full_route_converts() {
    use dst::header_match::Value;
    let wire = dst::Route {
        name: "get-item".into(),
        condition: Some(dst::RequestMatch {
            method: "GET".into(),
            path: Some(dst::PathMatch {
                kind: Some(dst::path_match::Kind::Regex("/items/[0-9]+".into())),
            }),
            headers: vec![
                header("X-Tenant", Some(Value::Exact("beta".into()))),
                header("x-canary", Some(Value::Regex("yes|true".into()))),
            ],
        }),
        response_classes: vec![
            class(status(500, 504)),
            class(dst::response_match::Kind::GrpcStatus(14)),
            dst::ResponseClass {
                is_failure: false,
                is_retryable: true,
                ..class(status(429, 429))
            },
        ],
        timeout_ms: Some(500),
        attempt_timeout_ms: Some(100),
        retry_policy: None,
        fault: None,
    };
    let route = Route::try_from(wire).unwrap();
    assert_eq!(&*route.name, "get-item");
    assert_eq!(route.matches.method, Some(http::Method::GET));
    assert_eq!(
        route.matches.path,
        PathMatch::Regex(Pattern::try_new("/items/[0-9]+").unwrap())
    );
    assert_eq!(route.matches.headers.len(), 2);
    assert_eq!(route.matches.headers[0].name.as_str(), "x-tenant");
    assert_eq!(
        route.matches.headers[0].value,
        ValueMatch::Exact("beta".into())
    );
    assert_eq!(
        route.policy.timeouts,
        Timeouts {
            request: Some(Duration::from_millis(500)),
            attempt: Some(Duration::from_millis(100)),
        }
    );
    let config = route.policy.classifier.config();
    let http: Vec<_> = config
        .http_rules()
        .iter()
        .map(|r| {
            (
                r.statuses.min().as_u16(),
                r.statuses.max().as_u16(),
                r.outcome,
                r.retryable,
            )
        })
        .collect();
    assert_eq!(
        http,
        [
            (500, 504, Outcome::Failure, false),
            (429, 429, Outcome::Success, true)
        ]
    );
    assert_eq!(config.grpc_rules().len(), 1);
    assert_eq!(config.grpc_rules()[0].code, GrpcCode::from_u32(14).unwrap());
    // Back to the wire: the header name is lower-cased, HTTP classes come before gRPC ones.
    let back = dst::Route::from(&route);
    assert_eq!(back.condition.as_ref().unwrap().headers[0].name, "x-tenant");
    assert_eq!(Route::try_from(back).unwrap(), route);
}

/// A route's retry policy converts with its own budget, else the profile's, else the
/// defaults; one attempt means no retries; zeros mean the defaults.
#[test]
fn retry_policies_convert_with_the_right_budget() {
    let profile_budget = dst::RetryBudget {
        retry_ratio_permille: 100,
        min_retries_per_second: 3,
        ttl_ms: 5_000,
    };
    let policy = |max_attempts, budget: Option<dst::RetryBudget>| dst::Route {
        name: "r".into(),
        retry_policy: Some(dst::RetryPolicy {
            max_attempts,
            budget,
            ..Default::default()
        }),
        ..dst::Route::default()
    };
    let own = dst::RetryBudget {
        retry_ratio_permille: 500,
        min_retries_per_second: 0,
        ttl_ms: 0,
    };
    let wire = dst::DestinationProfile {
        version: 2,
        exists: true,
        fully_qualified_name: "web.default".into(),
        routes: vec![
            policy(0, None),
            dst::Route {
                name: "own".into(),
                ..policy(3, Some(own))
            },
            dst::Route {
                name: "once".into(),
                ..policy(1, None)
            },
        ],
        retry_budget: Some(profile_budget),
        circuit_breaker: None,
        policy: None,
    };
    let update = ProfileUpdate::try_from(wire).unwrap();
    let routes = update.profile.routes();
    let inherited = routes[0].policy.retry.unwrap();
    assert_eq!(inherited.max_attempts, 2);
    assert_eq!(inherited.backoff.min(), Duration::from_millis(25));
    assert_eq!(inherited.budget.ratio_permille(), 100);
    assert_eq!(inherited.budget.min_per_second(), 3);
    assert_eq!(inherited.budget.ttl(), Duration::from_secs(5));
    let own = routes[1].policy.retry.unwrap();
    assert_eq!(own.max_attempts, 3);
    assert_eq!(own.budget.ratio_permille(), 500);
    assert_eq!(own.budget.min_per_second(), 0);
    assert_eq!(own.budget.ttl(), Duration::from_secs(10));
    assert_eq!(routes[2].policy.retry, None);
    // Each route carries its budget back to the wire; the profile-wide one is not written.
    let back = dst::DestinationProfile::from(update.clone());
    assert_eq!(back.retry_budget, None);
    assert_eq!(
        back.routes[0].retry_policy.as_ref().unwrap().budget,
        Some(profile_budget)
    );
    assert_eq!(ProfileUpdate::try_from(back).unwrap(), update);
}

/// A fault policy converts both ways (zeros meaning the defaults), and a bad one names its
/// field.
#[test]
fn fault_policies_convert_and_bad_ones_name_their_field() {
    let route = |fault: dst::FaultPolicy| dst::Route {
        name: "r".into(),
        fault: Some(fault),
        ..dst::Route::default()
    };
    let wire = route(dst::FaultPolicy {
        abort: Some(dst::FaultAbort {
            http_status: 0,
            grpc_status: 0,
            per_million: 25_000,
        }),
        delay: Some(dst::FaultDelay {
            duration_ms: 150,
            per_million: 1_000_000,
        }),
    });
    let converted = Route::try_from(wire).unwrap();
    let fault = converted.policy.fault.clone().unwrap();
    let abort = fault.abort.unwrap();
    assert_eq!(
        (abort.status, abort.grpc, abort.per_million),
        (503, 14, 25_000)
    );
    let delay = fault.delay.unwrap();
    assert_eq!(delay.duration, Duration::from_millis(150));
    assert_eq!(delay.per_million, 1_000_000);
    let back = dst::Route::from(&converted);
    assert_eq!(back.fault.as_ref().unwrap().abort.unwrap().http_status, 503);
    assert_eq!(Route::try_from(back).unwrap(), converted);

    let field = |fault: dst::FaultPolicy| {
        Route::try_from(route(fault))
            .unwrap_err()
            .field()
            .to_owned()
    };
    assert_eq!(field(dst::FaultPolicy::default()), "route.fault.abort");
    let abort = |http_status, grpc_status, per_million| dst::FaultPolicy {
        abort: Some(dst::FaultAbort {
            http_status,
            grpc_status,
            per_million,
        }),
        delay: None,
    };
    assert_eq!(field(abort(200, 0, 1)), "route.fault.abort.status");
    assert_eq!(field(abort(70_000, 0, 1)), "route.fault.abort.status");
    assert_eq!(field(abort(503, 17, 1)), "route.fault.abort.grpc");
    assert_eq!(field(abort(503, 0, 0)), "route.fault.abort.percent");
    assert_eq!(field(abort(503, 0, 1_000_001)), "route.fault.abort.percent");
    let delay = |duration_ms, per_million| dst::FaultPolicy {
        abort: None,
        delay: Some(dst::FaultDelay {
            duration_ms,
            per_million,
        }),
    };
    assert_eq!(field(delay(0, 1)), "route.fault.delay.duration");
    assert_eq!(field(delay(3_600_001, 1)), "route.fault.delay.duration");
    assert_eq!(field(delay(10, 0)), "route.fault.delay.percent");
}

#[test]
fn bad_retry_policies_name_their_field() {
    let field = |policy: dst::RetryPolicy| {
        let route = dst::Route {
            name: "r".into(),
            retry_policy: Some(policy),
            ..dst::Route::default()
        };
        Route::try_from(route).unwrap_err().field().to_owned()
    };
    assert_eq!(
        field(dst::RetryPolicy {
            max_attempts: 11,
            ..Default::default()
        }),
        "route.retry_policy.max_attempts"
    );
    assert_eq!(
        field(dst::RetryPolicy {
            budget: Some(dst::RetryBudget {
                ttl_ms: 100,
                ..Default::default()
            }),
            ..Default::default()
        }),
        "route.retry_policy.budget.ttl"
    );
    assert_eq!(
        field(dst::RetryPolicy {
            hedge: Some(dst::HedgePolicy::default()),
            ..Default::default()
        }),
        "route.retry_policy.hedge.after"
    );
    assert_eq!(
        field(dst::RetryPolicy {
            hedge: Some(dst::HedgePolicy {
                after: Some(dst::hedge_policy::After::QuantilePermille(1000)),
                max_hedges: 0,
            }),
            ..Default::default()
        }),
        "route.retry_policy.hedge.after"
    );
    assert_eq!(
        field(dst::RetryPolicy {
            backoff_min_ms: 500,
            backoff_max_ms: 100,
            ..Default::default()
        }),
        "route.retry_policy.backoff_min_ms"
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

fn arb_pattern() -> impl Strategy<Value = Pattern> {
    prop_oneof![
        Just("/items/[0-9]+"),
        Just("/v[12]/.*"),
        Just("yes|true"),
        Just("[a-z]{1,8}"),
        Just("/a(/b)?"),
    ]
    .prop_map(|source| Pattern::try_new(source).unwrap())
}

fn arb_header_match() -> impl Strategy<Value = route::HeaderMatch> {
    (
        "x-[a-z]{1,8}",
        prop_oneof![
            "[ -~]{0,10}".prop_map(ValueMatch::Exact),
            arb_pattern().prop_map(ValueMatch::Regex),
        ],
    )
        .prop_map(|(name, value)| route::HeaderMatch {
            name: http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value,
        })
}

fn arb_timeout() -> impl Strategy<Value = Option<Duration>> {
    proptest::option::of(
        (1..=u64::try_from(conduit_core::timeout::MAX_TIMEOUT.as_millis()).unwrap())
            .prop_map(Duration::from_millis),
    )
}

fn arb_outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![Just(Outcome::Success), Just(Outcome::Failure)]
}

fn arb_classifier() -> impl Strategy<Value = Classifier> {
    let http = (100u16..=999, 0u16..=100, arb_outcome(), any::<bool>()).prop_map(
        |(min, span, outcome, retryable)| HttpRule {
            statuses: StatusRange::try_new(min, min.saturating_add(span).min(999)).unwrap(),
            outcome,
            retryable,
        },
    );
    let grpc = (
        proptest::sample::select(GrpcCode::ALL.to_vec()),
        arb_outcome(),
        any::<bool>(),
    )
        .prop_map(|(code, outcome, retryable)| GrpcRule {
            code,
            outcome,
            retryable,
        });
    (
        proptest::collection::vec(http, 0..4),
        proptest::collection::vec(grpc, 0..4),
    )
        .prop_map(|(http, grpc)| Classifier::new(&ClassifyConfig::try_new(http, grpc).unwrap()))
}

fn arb_route() -> impl Strategy<Value = Route> {
    let matches = (
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
            arb_pattern().prop_map(PathMatch::Regex),
        ],
        proptest::collection::vec(arb_header_match(), 0..3),
    )
        .prop_map(|(method, path, headers)| RequestMatch {
            method,
            path,
            headers,
        });
    let policy = (
        arb_classifier(),
        arb_timeout(),
        arb_timeout(),
        arb_retry(),
        arb_fault(),
    )
        .prop_map(|(classifier, request, attempt, retry, fault)| RoutePolicy {
            classifier,
            timeouts: Timeouts { request, attempt },
            retry,
            fault,
        });
    (
        "[a-z][a-z0-9-]{0,10}".prop_filter("`default` is reserved", |n| n != route::DEFAULT_ROUTE),
        matches,
        policy,
    )
        .prop_map(|(name, matches, policy)| Route {
            name: name.into(),
            matches,
            policy,
        })
}

fn arb_fault() -> impl Strategy<Value = Option<FaultPolicy>> {
    use conduit_core::fault::{Abort, Delay};
    let abort = proptest::option::of((400u16..=599, 1u32..=16, 1u32..=1_000_000).prop_map(
        |(status, grpc, per_million)| Abort {
            status,
            grpc,
            per_million,
        },
    ));
    let delay = proptest::option::of((1u64..=3_600_000, 1u32..=1_000_000).prop_map(
        |(ms, per_million)| Delay {
            duration: Duration::from_millis(ms),
            per_million,
        },
    ));
    proptest::option::of(
        (abort, delay)
            .prop_filter("at least one fault", |(a, d)| a.is_some() || d.is_some())
            .prop_map(|(abort, delay)| FaultPolicy { abort, delay }),
    )
}

fn arb_retry() -> impl Strategy<Value = Option<RetryPolicy>> {
    let hedge = proptest::option::of(
        (
            prop_oneof![
                (1u64..5_000).prop_map(|ms| HedgeDelay::Fixed(Duration::from_millis(ms))),
                (1u32..=999).prop_map(|permille| HedgeDelay::Quantile { permille }),
            ],
            1..=retry::MAX_HEDGES,
        )
            .prop_map(|(after, max)| HedgePolicy { after, max }),
    );
    proptest::option::of(
        (
            2..=retry::MAX_ATTEMPTS,
            (1u64..1_000, 0u64..10_000),
            any::<bool>(),
            (0..=retry::MAX_BUDGET_RATIO_PERMILLE, 0u32..1_000, 1u64..=60),
            hedge,
        )
            .prop_map(
                |(attempts, (min, extra), non_idempotent, (ratio, per_second, ttl), hedge)| {
                    let backoff = BackoffConfig::try_new(
                        Duration::from_millis(min),
                        Duration::from_millis(min + extra),
                        retry::DEFAULT_BACKOFF_JITTER_PER_MILLE,
                    )
                    .unwrap();
                    let budget =
                        BudgetConfig::try_new(ratio, per_second, Duration::from_secs(ttl)).unwrap();
                    RetryPolicy::try_new(attempts, backoff, non_idempotent, budget, hedge).unwrap()
                },
            ),
    )
}

fn arb_profile_update() -> impl Strategy<Value = ProfileUpdate> {
    (
        1..=u64::MAX,
        any::<bool>(),
        "[a-z.]{0,20}",
        proptest::collection::vec(arb_route(), 0..6),
        proptest::option::of(arb_policy()),
    )
        .prop_map(|(version, exists, name, routes, policy)| {
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
                profile: Profile::try_new(routes).unwrap().with_policy(policy),
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
    // Each field is valid about eight times in ten and otherwise invalid in one of the ways a
    // peer could send, so that whole routes often convert (and round-trip) while every kind
    // of invalid value still shows up. Strings come from an alphabet that forms paths and
    // regular expressions alike (some invalid, some huge once compiled).
    let text = || {
        prop_oneof![
            8 => "/[a-z0-9]{0,6}",
            2 => "[/a-z0-9()\\[\\]{}*+?|.-]{0,12}",
            1 => ".{0,6}",
            1 => Just("a{1000}{1000}".to_owned()),
        ]
    };
    let kind = proptest::option::weighted(
        0.9,
        prop_oneof![
            text().prop_map(dst::path_match::Kind::Exact),
            text().prop_map(dst::path_match::Kind::Prefix),
            text().prop_map(dst::path_match::Kind::Regex),
        ],
    );
    let header = (
        prop_oneof![8 => "x-[a-z]{1,4}", 1 => ".{0,4}"],
        proptest::option::weighted(
            0.9,
            prop_oneof![
                text().prop_map(dst::header_match::Value::Exact),
                text().prop_map(dst::header_match::Value::Regex),
            ],
        ),
    )
        .prop_map(|(name, value)| dst::HeaderMatch { name, value });
    let status = prop_oneof![
        8 => (100u32..=999).prop_flat_map(|min| (Just(min), min..=999)),
        2 => (0u32..1200, 0u32..1200),
    ]
    .prop_map(|(min, max)| dst::response_match::Kind::Status(dst::HttpStatusRange { min, max }));
    let grpc = prop_oneof![
        8 => 0u32..=16,
        1 => 17u32..20,
        1 => any::<u32>(),
    ]
    .prop_map(dst::response_match::Kind::GrpcStatus);
    let class = (
        proptest::option::weighted(
            0.9,
            proptest::option::weighted(0.9, prop_oneof![status, grpc]),
        ),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(condition, is_failure, is_retryable)| dst::ResponseClass {
            condition: condition.map(|kind| dst::ResponseMatch { kind }),
            is_failure,
            is_retryable,
        });
    let timeout = || {
        proptest::option::of(prop_oneof![
            1 => Just(0u64),
            8 => 1u64..=86_400_000,
            1 => any::<u64>(),
        ])
    };
    (
        prop_oneof![
            8 => "[a-z][a-z-]{0,4}",
            1 => ".{0,4}",
            1 => Just("default".to_owned()),
        ],
        prop_oneof![
            4 => Just(String::new()),
            4 => Just("GET".to_owned()),
            1 => ".{0,6}",
        ],
        proptest::option::of(kind),
        proptest::collection::vec(header, 0..3),
        proptest::collection::vec(class, 0..3),
        timeout(),
        timeout(),
        proptest::option::of(arb_pb_retry()),
    )
        .prop_map(
            |(
                name,
                method,
                path,
                headers,
                response_classes,
                timeout_ms,
                attempt_timeout_ms,
                retry_policy,
            )| {
                dst::Route {
                    name,
                    condition: Some(dst::RequestMatch {
                        method,
                        path: path.map(|kind| dst::PathMatch { kind }),
                        headers,
                    }),
                    response_classes,
                    timeout_ms,
                    attempt_timeout_ms,
                    retry_policy,
                    fault: None,
                }
            },
        )
}

fn arb_pb_retry() -> impl Strategy<Value = dst::RetryPolicy> {
    let small = || prop_oneof![4 => 0u64..300, 1 => any::<u64>()];
    let budget = proptest::option::of(
        (
            prop_oneof![4 => 0u32..2_000, 1 => any::<u32>()],
            prop_oneof![4 => 0u32..100, 1 => any::<u32>()],
            prop_oneof![4 => 0u64..70_000, 1 => any::<u64>()],
        )
            .prop_map(|(retry_ratio_permille, min_retries_per_second, ttl_ms)| {
                dst::RetryBudget {
                    retry_ratio_permille,
                    min_retries_per_second,
                    ttl_ms,
                }
            }),
    );
    let hedge = proptest::option::of(
        (
            proptest::option::of(prop_oneof![
                small().prop_map(dst::hedge_policy::After::DelayMs),
                prop_oneof![0u32..1_100, any::<u32>()]
                    .prop_map(dst::hedge_policy::After::QuantilePermille),
            ]),
            prop_oneof![0u32..6, any::<u32>()],
        )
            .prop_map(|(after, max_hedges)| dst::HedgePolicy { after, max_hedges }),
    );
    (
        prop_oneof![0u32..12, any::<u32>()],
        small(),
        small(),
        any::<bool>(),
        budget,
        hedge,
    )
        .prop_map(
            |(max_attempts, backoff_min_ms, backoff_max_ms, non_idempotent, budget, hedge)| {
                dst::RetryPolicy {
                    max_attempts,
                    backoff_min_ms,
                    backoff_max_ms,
                    non_idempotent,
                    budget,
                    hedge,
                }
            },
        )
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
        prop_assert_eq!(ProfileUpdate::try_from(wire.clone()).unwrap(), update);
        // And through bytes, as the network carries it.
        let decoded = dst::DestinationProfile::decode(wire.encode_to_vec().as_slice()).unwrap();
        prop_assert_eq!(decoded, wire);
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

    /// Arbitrary routes convert or are rejected, never panic; what converts is valid and
    /// survives the way back to the wire unchanged.
    #[test]
    fn garbage_profiles_never_panic(routes in proptest::collection::vec(arb_pb_route(), 0..4), version: u64) {
        let wire = dst::DestinationProfile { version, exists: true, routes, ..Default::default() };
        if let Ok(update) = ProfileUpdate::try_from(wire) {
            prop_assert!(update.version >= 1);
            for route in update.profile.routes() {
                prop_assert!(route::check_route_name(&route.name).is_ok());
                for timeout in [route.policy.timeouts.request, route.policy.timeouts.attempt].into_iter().flatten() {
                    prop_assert!(!timeout.is_zero() && timeout <= conduit_core::timeout::MAX_TIMEOUT);
                }
            }
            let again = dst::DestinationProfile::from(update.clone());
            prop_assert_eq!(ProfileUpdate::try_from(again).unwrap(), update);
        }
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

// === Circuit breaking ===

fn profile_with_breaker(breaker: dst::CircuitBreaker) -> dst::DestinationProfile {
    dst::DestinationProfile {
        version: 1,
        exists: true,
        circuit_breaker: Some(breaker),
        ..dst::DestinationProfile::default()
    }
}

fn breaker_of(breaker: dst::CircuitBreaker) -> Result<BreakerConfig, InvalidMessage> {
    ProfileUpdate::try_from(profile_with_breaker(breaker)).map(|u| *u.profile.breaker())
}

#[test]
fn a_zero_circuit_breaker_is_the_default_and_absent_is_too() {
    assert_eq!(
        breaker_of(dst::CircuitBreaker::default()),
        Ok(BreakerConfig::default())
    );
    let absent = dst::DestinationProfile {
        version: 1,
        ..dst::DestinationProfile::default()
    };
    let update = ProfileUpdate::try_from(absent).unwrap();
    assert_eq!(*update.profile.breaker(), BreakerConfig::default());
    // The default is not sent at all.
    assert_eq!(dst::DestinationProfile::from(update).circuit_breaker, None);
}

#[test]
fn circuit_breaker_fields_convert_and_switch_policies_off() {
    let config = breaker_of(dst::CircuitBreaker {
        consecutive_failures: 3,
        success_rate_threshold_permille: 800,
        success_rate_window_ms: 10_000,
        success_rate_min_requests: 5,
        penalty_min_ms: 100,
        penalty_max_ms: 2_000,
        penalty_jitter_permille: Some(0),
        max_ejected_permille: Some(0),
        ..dst::CircuitBreaker::default()
    })
    .unwrap();
    assert_eq!(config.consecutive_failures(), Some(3));
    let rate = config.success_rate().unwrap();
    assert_eq!(
        (
            rate.threshold_per_mille(),
            rate.window(),
            rate.min_requests()
        ),
        (800, Duration::from_secs(10), 5)
    );
    assert_eq!(
        (
            config.penalty().min(),
            config.penalty().max(),
            config.penalty().jitter_per_mille()
        ),
        (Duration::from_millis(100), Duration::from_secs(2), 0)
    );
    assert_eq!(config.max_ejected_per_mille(), 0);
    let one_off = breaker_of(dst::CircuitBreaker {
        consecutive_failures_disabled: true,
        ..dst::CircuitBreaker::default()
    })
    .unwrap();
    assert_eq!(one_off.consecutive_failures(), None);
    assert!(one_off.success_rate().is_some());
    let rate_off = breaker_of(dst::CircuitBreaker {
        success_rate_disabled: true,
        // Not read while the policy is off.
        success_rate_window_ms: 1,
        ..dst::CircuitBreaker::default()
    })
    .unwrap();
    assert!(rate_off.success_rate().is_none());
    let off = breaker_of(dst::CircuitBreaker {
        disabled: true,
        consecutive_failures: 3,
        ..dst::CircuitBreaker::default()
    })
    .unwrap();
    assert!(!off.is_enabled());
}

#[test]
fn invalid_circuit_breakers_name_their_field() {
    let cases = [
        (
            dst::CircuitBreaker {
                success_rate_threshold_permille: 1001,
                ..Default::default()
            },
            "circuit_breaker.success_rate_threshold_permille",
        ),
        (
            dst::CircuitBreaker {
                success_rate_window_ms: 999,
                ..Default::default()
            },
            "circuit_breaker.success_rate_window_ms",
        ),
        (
            dst::CircuitBreaker {
                success_rate_window_ms: u64::MAX,
                ..Default::default()
            },
            "circuit_breaker.success_rate_window_ms",
        ),
        (
            dst::CircuitBreaker {
                penalty_min_ms: 120_000,
                ..Default::default()
            },
            "circuit_breaker.penalty_max_ms",
        ),
        (
            dst::CircuitBreaker {
                penalty_min_ms: u64::MAX,
                penalty_max_ms: u64::MAX,
                ..Default::default()
            },
            "circuit_breaker.penalty_max_ms",
        ),
        (
            dst::CircuitBreaker {
                penalty_jitter_permille: Some(1001),
                ..Default::default()
            },
            "circuit_breaker.penalty_jitter_permille",
        ),
        (
            dst::CircuitBreaker {
                max_ejected_permille: Some(u32::MAX),
                ..Default::default()
            },
            "circuit_breaker.max_ejected_permille",
        ),
    ];
    for (wire, field) in cases {
        let err = breaker_of(wire).unwrap_err();
        assert_eq!(err.field(), field, "{wire:?}: {err}");
    }
}

fn arb_breaker() -> impl Strategy<Value = BreakerConfig> {
    (
        proptest::option::of(1u32..100),
        proptest::option::of((1u32..=1000, 1u64..=3600, 1u32..1000)),
        (1u64..600_000, 0u64..3_000_000, 0u32..=1000),
        0u32..=1000,
    )
        .prop_map(|(consecutive, rate, (min, extra, jitter), share)| {
            let rate = rate.map(|(threshold, window_s, min_requests)| {
                SuccessRate::try_new(threshold, Duration::from_secs(window_s), min_requests)
                    .unwrap()
            });
            let max = (min + extra).min(3_600_000);
            let penalty = BackoffConfig::try_new(
                Duration::from_millis(min),
                Duration::from_millis(max),
                jitter,
            )
            .unwrap();
            BreakerConfig::try_new(consecutive, rate, penalty, share).unwrap()
        })
}

fn arb_pb_breaker() -> impl Strategy<Value = dst::CircuitBreaker> {
    let small = || prop_oneof![Just(0u32), 1u32..2000, any::<u32>()];
    let millis = || prop_oneof![Just(0u64), 1u64..4_000_000, any::<u64>()];
    (
        (
            any::<bool>(),
            small(),
            any::<bool>(),
            small(),
            any::<bool>(),
        ),
        (millis(), small(), millis(), millis()),
        (proptest::option::of(small()), proptest::option::of(small())),
    )
        .prop_map(
            |(
                (disabled, consecutive, consecutive_off, threshold, rate_off),
                (window, min_requests, min, max),
                (jitter, share),
            )| dst::CircuitBreaker {
                disabled,
                consecutive_failures: consecutive,
                consecutive_failures_disabled: consecutive_off,
                success_rate_threshold_permille: threshold,
                success_rate_disabled: rate_off,
                success_rate_window_ms: window,
                success_rate_min_requests: min_requests,
                penalty_min_ms: min,
                penalty_max_ms: max,
                penalty_jitter_permille: jitter,
                max_ejected_permille: share,
            },
        )
}

proptest! {
    /// core -> wire -> core is the identity for every circuit breaker (at millisecond
    /// resolution, the mesh file's), through bytes too.
    #[test]
    fn circuit_breakers_round_trip(breaker in arb_breaker()) {
        let update = ProfileUpdate {
            version: 1,
            exists: true,
            name: "web.default".into(),
            profile: Profile::default().with_breaker(breaker),
        };
        let wire = dst::DestinationProfile::from(update.clone());
        let decoded = dst::DestinationProfile::decode(wire.encode_to_vec().as_slice()).unwrap();
        prop_assert_eq!(ProfileUpdate::try_from(decoded).unwrap(), update);
    }

    /// Arbitrary circuit breakers convert or are rejected, never panic; what converts is within
    /// the core's bounds and survives the way back to the wire unchanged.
    #[test]
    fn garbage_circuit_breakers_never_panic(wire in arb_pb_breaker()) {
        if let Ok(config) = breaker_of(wire) {
            prop_assert!(config.penalty().max() <= conduit_core::breaker::MAX_PENALTY);
            prop_assert!(config.max_ejected_per_mille() <= 1000);
            let again = dst::CircuitBreaker::from(&config);
            prop_assert_eq!(breaker_of(again), Ok(config));
        }
    }
}

// === Authorization policy ===

fn profile_with_policy(policy: dst::ServerPolicy) -> dst::DestinationProfile {
    dst::DestinationProfile {
        policy: Some(policy),
        ..pb_profile(vec![])
    }
}

fn pb_authorization(identities: &[&str], networks: &[&str]) -> dst::Authorization {
    dst::Authorization {
        identities: identities.iter().map(|s| (*s).to_owned()).collect(),
        networks: networks.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn pb_policy(
    default: dst::DefaultPolicy,
    authorizations: Vec<dst::Authorization>,
) -> dst::ServerPolicy {
    dst::ServerPolicy {
        default_policy: default.into(),
        authorizations,
        audit: false,
        probe_paths: vec![],
    }
}

#[test]
fn a_policy_converts_and_absent_is_none() {
    use conduit_core::policy::{Client, Rule, Verdict, authorize};

    let update = ProfileUpdate::try_from(pb_profile(vec![])).unwrap();
    assert_eq!(update.profile.policy(), None);

    let wire = pb_policy(
        dst::DefaultPolicy::AllAuthenticated,
        vec![
            pb_authorization(
                &[
                    "Web.demo.serviceaccount.identity.conduit.local",
                    "*.ops.serviceaccount.identity.conduit.local",
                ],
                &[],
            ),
            pb_authorization(&[], &["10.0.0.0/8", "127.0.0.1", "fd00::/8"]),
        ],
    );
    let update = ProfileUpdate::try_from(profile_with_policy(wire)).unwrap();
    let policy = update.profile.policy().unwrap();
    assert_eq!(policy.default_policy(), DefaultPolicy::AllAuthenticated);
    assert!(!policy.audit());
    assert_eq!(
        policy.authorizations()[0].identities()[0],
        IdentityMatch::Exact("web.demo.serviceaccount.identity.conduit.local".into())
    );
    let nets: Vec<String> = policy.authorizations()[1]
        .networks()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "127.0.0.1/32", "fd00::/8"]);
    let ops = Client {
        identity: Some("alice.ops.serviceaccount.identity.conduit.local"),
        addr: "192.0.2.1".parse().unwrap(),
    };
    assert_eq!(authorize(policy, &ops).rule, Rule::Authorization(0));
    let plaintext = Client {
        identity: None,
        addr: "192.0.2.1".parse().unwrap(),
    };
    assert_eq!(authorize(policy, &plaintext).verdict, Verdict::Deny);

    // The way back writes what it read, normalised.
    let again = dst::DestinationProfile::from(update);
    let again = again.policy.unwrap();
    assert_eq!(
        again.default_policy,
        i32::from(dst::DefaultPolicy::AllAuthenticated)
    );
    assert_eq!(
        again.authorizations[0].identities,
        [
            "web.demo.serviceaccount.identity.conduit.local",
            "*.ops.serviceaccount.identity.conduit.local"
        ]
    );
    assert_eq!(again.authorizations[1].networks, nets);
    assert!(again.probe_paths.is_empty());

    // Probe paths: read without their query, sorted, once each; written back as held.
    let wire = dst::ServerPolicy {
        probe_paths: vec!["/ready?full=1".into(), "/live".into(), "/ready".into()],
        ..pb_policy(dst::DefaultPolicy::Deny, vec![])
    };
    let update = ProfileUpdate::try_from(profile_with_policy(wire)).unwrap();
    let policy = update.profile.policy().unwrap();
    assert!(policy.admits_probes());
    assert!(policy.is_probe(b"GET", b"/ready"));
    let again = dst::DestinationProfile::from(update).policy.unwrap();
    assert_eq!(again.probe_paths, ["/live", "/ready"]);
}

#[test]
fn invalid_policies_name_their_field() {
    let many = |n: usize| vec!["a.demo"; n];
    let cases = [
        (
            dst::ServerPolicy {
                default_policy: 7,
                ..dst::ServerPolicy::default()
            },
            "policy.default_policy",
        ),
        (
            pb_policy(
                dst::DefaultPolicy::Deny,
                vec![pb_authorization(&["*"], &[]); MAX_AUTHORIZATIONS + 1],
            ),
            "policy.authorizations",
        ),
        (
            pb_policy(
                dst::DefaultPolicy::Deny,
                vec![pb_authorization(&["*"], &[]), pb_authorization(&[], &[])],
            ),
            "policy.authorizations[1]",
        ),
        (
            pb_policy(
                dst::DefaultPolicy::Deny,
                vec![pb_authorization(&["ok.demo", "a.*.demo"], &[])],
            ),
            "policy.authorizations[0].identities[1]",
        ),
        (
            pb_policy(
                dst::DefaultPolicy::Deny,
                vec![pb_authorization(&["bad_name"], &[])],
            ),
            "policy.authorizations[0].identities[0]",
        ),
        (
            pb_policy(
                dst::DefaultPolicy::Deny,
                vec![pb_authorization(&[], &["10.0.0.0/8", "10.1.0.0/8"])],
            ),
            "policy.authorizations[0].networks[1]",
        ),
        (
            pb_policy(
                dst::DefaultPolicy::Deny,
                vec![pb_authorization(&[], &["::/129"])],
            ),
            "policy.authorizations[0].networks[0]",
        ),
        (
            pb_policy(
                dst::DefaultPolicy::Deny,
                vec![pb_authorization(&many(MAX_IDENTITIES + 1), &[])],
            ),
            "policy.authorizations[0].identities",
        ),
        (
            pb_policy(
                dst::DefaultPolicy::Deny,
                vec![pb_authorization(&[], &vec!["10.0.0.0/8"; MAX_NETWORKS + 1])],
            ),
            "policy.authorizations[0].networks",
        ),
        (
            dst::ServerPolicy {
                probe_paths: vec!["/ok".into(), "healthz".into()],
                ..pb_policy(dst::DefaultPolicy::Deny, vec![])
            },
            "policy.probe_paths[1]",
        ),
        (
            dst::ServerPolicy {
                probe_paths: vec!["/a b".into()],
                ..pb_policy(dst::DefaultPolicy::Deny, vec![])
            },
            "policy.probe_paths[0]",
        ),
        (
            dst::ServerPolicy {
                probe_paths: (0..=MAX_PROBE_PATHS).map(|i| format!("/p{i}")).collect(),
                ..pb_policy(dst::DefaultPolicy::Deny, vec![])
            },
            "policy.probe_paths",
        ),
    ];
    for (wire, field) in cases {
        let err = ProfileUpdate::try_from(profile_with_policy(wire.clone())).unwrap_err();
        assert_eq!(err.field(), field, "{wire:?}: {err}");
    }
    // A huge identity is not echoed whole.
    let huge = "x".repeat(100_000);
    let err = ServerPolicy::try_from(pb_policy(
        dst::DefaultPolicy::Deny,
        vec![pb_authorization(&[huge.as_str()], &[])],
    ))
    .unwrap_err();
    assert!(err.to_string().len() < 1_000, "{}", err.to_string().len());
    let err = ServerPolicy::try_from(dst::ServerPolicy {
        probe_paths: vec![format!("/{huge}")],
        ..pb_policy(dst::DefaultPolicy::Deny, vec![])
    })
    .unwrap_err();
    assert!(err.to_string().len() < 1_000, "{}", err.to_string().len());
}

fn arb_identity_match() -> impl Strategy<Value = IdentityMatch> {
    let name = "[a-z][a-z0-9]{0,4}(\\.[a-z][a-z0-9]{0,4}){0,3}";
    prop_oneof![
        name.prop_map(IdentityMatch::Exact),
        name.prop_map(IdentityMatch::Suffix),
        Just(IdentityMatch::Suffix(String::new())),
    ]
}

fn arb_network() -> impl Strategy<Value = Network> {
    let v4 = (any::<u32>(), 0u8..=32).prop_map(|(bits, len)| {
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        Network::try_new(IpAddr::V4(Ipv4Addr::from(bits & mask)), len).unwrap()
    });
    let v6 = (any::<u128>(), 0u8..=128).prop_map(|(bits, len)| {
        let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
        Network::try_new(IpAddr::V6(Ipv6Addr::from(bits & mask)), len).unwrap()
    });
    prop_oneof![v4, v6]
}

fn arb_policy() -> impl Strategy<Value = ServerPolicy> {
    let authorization = (
        proptest::collection::vec(arb_identity_match(), 0..3),
        proptest::collection::vec(arb_network(), 0..3),
    )
        .prop_filter("names something", |(i, n)| !i.is_empty() || !n.is_empty())
        .prop_map(|(i, n)| Authorization::try_new(i, n).unwrap());
    (
        prop_oneof![
            Just(DefaultPolicy::AllUnauthenticated),
            Just(DefaultPolicy::AllAuthenticated),
            Just(DefaultPolicy::Deny),
        ],
        proptest::collection::vec(authorization, 0..4),
        any::<bool>(),
        proptest::collection::vec("/[a-z0-9/%.-]{0,8}(\\?[a-z=]{0,4})?", 0..4),
    )
        .prop_map(|(default, authorizations, audit, probes)| {
            let probes = probes
                .iter()
                .map(|p| ProbePath::parse(p).unwrap())
                .collect();
            ServerPolicy::try_new(default, authorizations, audit)
                .unwrap()
                .with_probe_paths(probes)
                .unwrap()
        })
}

fn arb_pb_policy() -> impl Strategy<Value = dst::ServerPolicy> {
    let identity = prop_oneof![
        Just("*".to_owned()),
        "\\*?\\.?[a-zA-Z0-9*._-]{0,12}",
        ".{0,8}",
    ];
    let network = prop_oneof![
        "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(/[0-9]{1,3})?",
        "[0-9a-f:]{0,12}(/[0-9+-]{0,4})?",
        ".{0,8}",
    ];
    let authorization = (
        proptest::collection::vec(identity, 0..3),
        proptest::collection::vec(network, 0..3),
    )
        .prop_map(|(identities, networks)| dst::Authorization {
            identities,
            networks,
        });
    let probe_path = prop_oneof!["/[a-z/%?#. ]{0,8}", ".{0,8}"];
    (
        -1i32..5,
        proptest::collection::vec(authorization, 0..4),
        any::<bool>(),
        proptest::collection::vec(probe_path, 0..4),
    )
        .prop_map(
            |(default_policy, authorizations, audit, probe_paths)| dst::ServerPolicy {
                default_policy,
                authorizations,
                audit,
                probe_paths,
            },
        )
}

proptest! {
    /// core -> wire -> core is the identity for every policy, through bytes too.
    #[test]
    fn policies_round_trip(policy in arb_policy()) {
        let update = ProfileUpdate {
            version: 1,
            exists: true,
            name: "api.demo".into(),
            profile: Profile::default().with_policy(Some(policy)),
        };
        let wire = dst::DestinationProfile::from(update.clone());
        let decoded = dst::DestinationProfile::decode(wire.encode_to_vec().as_slice()).unwrap();
        prop_assert_eq!(ProfileUpdate::try_from(decoded).unwrap(), update);
    }

    /// Arbitrary policies convert or are rejected, never panic; what converts is within the
    /// bounds and survives the way back to the wire unchanged.
    #[test]
    fn garbage_policies_never_panic(wire in arb_pb_policy()) {
        if let Ok(policy) = ServerPolicy::try_from(wire) {
            prop_assert!(policy.authorizations().len() <= MAX_AUTHORIZATIONS);
            for authorization in policy.authorizations() {
                prop_assert!(!authorization.identities().is_empty() || !authorization.networks().is_empty());
            }
            prop_assert!(policy.probe_paths().len() <= MAX_PROBE_PATHS);
            let again = dst::ServerPolicy::from(&policy);
            prop_assert_eq!(ServerPolicy::try_from(again), Ok(policy));
        }
    }
}
