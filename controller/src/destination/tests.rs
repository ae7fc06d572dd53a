use std::collections::BTreeMap;

use conduit_core::mesh::Service;
use conduit_core::route::{PathMatch, RequestMatch, Route};
use proptest::prelude::*;

use super::*;

/// What a receiver holds after applying updates: the reference semantics of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Held {
    NotFound,
    Endpoints(BTreeMap<SocketAddr, Endpoint>),
}

fn apply(held: Option<Held>, update: &DestinationUpdate) -> Held {
    match (&update.change, held) {
        (DestinationChange::Replace(endpoints), _) => {
            Held::Endpoints(endpoints.iter().map(|e| (e.addr, e.clone())).collect())
        }
        (DestinationChange::Add(endpoints), held) => {
            let mut set = match held {
                Some(Held::Endpoints(set)) => set,
                _ => BTreeMap::new(),
            };
            set.extend(endpoints.iter().map(|e| (e.addr, e.clone())));
            Held::Endpoints(set)
        }
        (DestinationChange::Remove(addrs), held) => {
            let Some(Held::Endpoints(mut set)) = held else {
                panic!("remove before any endpoints")
            };
            for addr in addrs {
                assert!(
                    set.remove(addr).is_some(),
                    "removed an address the receiver never had"
                );
            }
            assert!(
                !set.is_empty(),
                "a remove emptied the set; that is `no_endpoints`'s job"
            );
            Held::Endpoints(set)
        }
        (DestinationChange::NoEndpoints { exists: true }, _) => Held::Endpoints(BTreeMap::new()),
        (DestinationChange::NoEndpoints { exists: false }, _) => Held::NotFound,
    }
}

fn expected(state: &ServiceState) -> Held {
    match state {
        ServiceState::NotFound => Held::NotFound,
        ServiceState::Found(s) => {
            Held::Endpoints(s.endpoints.iter().map(|e| (e.addr, e.clone())).collect())
        }
    }
}

fn found(endpoints: Vec<Endpoint>) -> ServiceState {
    ServiceState::Found(Arc::new(Service {
        name: "web.default".into(),
        port: 80,
        endpoints,
        profile: Profile::default(),
    }))
}

fn ep(port: u16) -> Endpoint {
    Endpoint::new(SocketAddr::from(([127, 0, 0, 1], port)))
}

fn changes(updates: Vec<DestinationUpdate>) -> Vec<DestinationChange> {
    updates.into_iter().map(|u| u.change).collect()
}

#[test]
fn first_state_is_complete_then_adds_and_removes() {
    let mut diff = EndpointDiff::new();
    let first = diff.handle_state(&found(vec![ep(1), ep(2)]));
    assert_eq!(
        first,
        [DestinationUpdate {
            version: 1,
            change: DestinationChange::Replace(vec![ep(1), ep(2)])
        }]
    );

    assert!(
        diff.handle_state(&found(vec![ep(2), ep(1)])).is_empty(),
        "order alone is no change"
    );

    let next = diff.handle_state(&found(vec![ep(2), ep(3)]));
    assert_eq!(
        next,
        [
            DestinationUpdate {
                version: 2,
                change: DestinationChange::Add(vec![ep(3)])
            },
            DestinationUpdate {
                version: 3,
                change: DestinationChange::Remove(vec![ep(1).addr])
            },
        ]
    );

    let mut heavier = ep(2);
    heavier.weight = 7;
    assert_eq!(
        changes(diff.handle_state(&found(vec![heavier.clone(), ep(3)]))),
        [DestinationChange::Add(vec![heavier])]
    );

    assert_eq!(
        changes(diff.handle_state(&found(vec![]))),
        [DestinationChange::NoEndpoints { exists: true }]
    );
    assert_eq!(
        changes(diff.handle_state(&ServiceState::NotFound)),
        [DestinationChange::NoEndpoints { exists: false }]
    );
    assert_eq!(
        changes(diff.handle_state(&found(vec![ep(9)]))),
        [DestinationChange::Add(vec![ep(9)])]
    );
    assert_eq!(diff.version(), 7);
}

#[test]
fn unknown_and_empty_are_distinct() {
    let mut unknown = EndpointDiff::new();
    assert_eq!(
        changes(unknown.handle_state(&ServiceState::NotFound)),
        [DestinationChange::NoEndpoints { exists: false }]
    );
    assert!(unknown.handle_state(&ServiceState::NotFound).is_empty());
    assert_eq!(
        changes(unknown.handle_state(&found(vec![]))),
        [DestinationChange::NoEndpoints { exists: true }]
    );
}

#[test]
fn profiles_are_sent_whole_on_change() {
    let with_routes = |routes: Vec<Route>| {
        ServiceState::Found(Arc::new(Service {
            name: "web.default".into(),
            port: 80,
            endpoints: vec![],
            profile: Profile::try_new(routes).unwrap(),
        }))
    };
    let route = Route::new(
        "items",
        RequestMatch::new(None, PathMatch::Prefix("/items/".into())),
    );
    let mut diff = ProfileDiff::new();
    let first = diff.handle_state(&with_routes(vec![])).unwrap();
    assert_eq!(
        (first.version, first.exists, first.name.as_str()),
        (1, true, "web.default")
    );
    assert_eq!(diff.handle_state(&with_routes(vec![])), None);
    let second = diff
        .handle_state(&with_routes(vec![route.clone()]))
        .unwrap();
    assert_eq!(
        (second.version, second.profile.routes()),
        (2, [route].as_slice())
    );
    let gone = diff.handle_state(&ServiceState::NotFound).unwrap();
    assert_eq!(
        (gone.version, gone.exists, gone.profile.routes().len()),
        (3, false, 0)
    );
}

#[test]
fn a_policy_edit_alone_is_a_new_profile() {
    use conduit_core::policy::{DefaultPolicy, ServerPolicy};

    let with_policy = |policy: Option<ServerPolicy>| {
        ServiceState::Found(Arc::new(Service {
            name: "api.demo".into(),
            port: 80,
            endpoints: vec![],
            profile: Profile::default().with_policy(policy),
        }))
    };
    let deny = ServerPolicy::try_new(DefaultPolicy::Deny, vec![], false).unwrap();
    let mut diff = ProfileDiff::new();
    assert_eq!(
        diff.handle_state(&with_policy(None))
            .unwrap()
            .profile
            .policy(),
        None
    );
    let second = diff.handle_state(&with_policy(Some(deny.clone()))).unwrap();
    assert_eq!((second.version, second.profile.policy()), (2, Some(&deny)));
    assert_eq!(diff.handle_state(&with_policy(Some(deny))), None);
    // What is sent is what the proxies' conversion reads back.
    let wire = pb::DestinationProfile::from(second.clone());
    assert_eq!(ProfileUpdate::try_from(wire).unwrap(), second);
}

fn arb_endpoint() -> impl Strategy<Value = Endpoint> {
    // Few ports and weights, so successive states overlap and metadata changes are common.
    (
        1..12u16,
        prop_oneof![Just(0u32), Just(1), Just(100)],
        proptest::option::of(Just("a.b".to_string())),
    )
        .prop_map(|(port, weight, identity)| Endpoint {
            weight,
            identity,
            ..ep(port)
        })
}

fn arb_state() -> impl Strategy<Value = ServiceState> {
    prop_oneof![
        1 => Just(ServiceState::NotFound),
        6 => proptest::collection::btree_map(1..12u16, arb_endpoint(), 0..8).prop_map(|set| {
            found(set.into_iter().map(|(port, e)| Endpoint { addr: ep(port).addr, ..e }).collect())
        }),
    ]
}

proptest! {
    /// Applying every update, in order, to what the receiver held always gives the latest
    /// state; versions grow by one per message; and the first message is complete.
    #[test]
    fn applying_the_diffs_gives_the_latest_state(states in proptest::collection::vec(arb_state(), 1..20)) {
        let mut diff = EndpointDiff::new();
        let mut held: Option<Held> = None;
        let mut version = 0;
        for (i, state) in states.iter().enumerate() {
            let updates = diff.handle_state(state);
            prop_assert!(updates.len() <= MAX_UPDATES_PER_CHANGE);
            if i == 0 {
                prop_assert_eq!(updates.len(), 1);
                let complete = matches!(
                    updates[0].change,
                    DestinationChange::Replace(_) | DestinationChange::NoEndpoints { .. }
                );
                prop_assert!(complete);
            }
            for update in &updates {
                version += 1;
                prop_assert_eq!(update.version, version);
                // Every update is valid on the wire.
                let wire = pb::Update::from(update.clone());
                prop_assert_eq!(&DestinationUpdate::try_from(wire).unwrap(), update);
                held = Some(apply(held, update));
            }
            prop_assert_eq!(held.as_ref(), Some(&expected(state)));
        }
    }

    /// A subscriber that skips intermediate states still converges: feeding any subsequence of
    /// the states gives the last one.
    #[test]
    fn skipping_states_still_converges(states in proptest::collection::vec(arb_state(), 1..20), keep in proptest::collection::vec(any::<bool>(), 20)) {
        let mut diff = EndpointDiff::new();
        let mut held = None;
        let last = states.last().cloned();
        for (state, keep) in states.iter().zip(keep) {
            if keep || Some(state) == last.as_ref() {
                for update in diff.handle_state(state) {
                    held = Some(apply(held, &update));
                }
            }
        }
        prop_assert_eq!(held, last.as_ref().map(expected));
    }
}
