use proptest::prelude::*;

use super::*;
use crate::rand::DetRng;
use crate::time::ms;

fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        ..RetryPolicy::default()
    }
}

fn raw(yaml: &str) -> RawRetry {
    serde_yaml_ng::from_str(yaml).expect("yaml")
}

#[test]
fn unprocessed_resends_are_bounded_and_need_a_whole_request() {
    let refused = Unprocessed {
        attempts: 1,
        connect_failed: true,
        replayable: true,
    };
    assert_eq!(resend_unprocessed(refused, true), Resend::Elsewhere);
    assert_eq!(resend_unprocessed(refused, false), Resend::No);
    let refused_stream = Unprocessed {
        connect_failed: false,
        ..refused
    };
    assert_eq!(resend_unprocessed(refused_stream, false), Resend::Again);
    let spent = Unprocessed {
        attempts: MAX_UNPROCESSED_ATTEMPTS,
        ..refused
    };
    assert_eq!(resend_unprocessed(spent, true), Resend::No);
}

#[test]
fn policies_parse_with_linkerd_defaults() {
    let policy = RetryPolicy::try_from(RawRetry::default()).unwrap();
    assert_eq!(policy, RetryPolicy::default());
    assert_eq!(policy.max_attempts, 2);
    assert_eq!(policy.backoff.min(), ms(25));
    assert_eq!(policy.backoff.max(), ms(250));
    assert_eq!(policy.budget.ratio_permille(), 200);
    assert_eq!(policy.budget.min_per_second(), 10);
    assert_eq!(policy.budget.ttl(), Duration::from_secs(10));
    assert!(!policy.non_idempotent);
    assert_eq!(policy.hedge, None);

    let policy = RetryPolicy::try_from(raw(
        "{ max_attempts: 4, backoff: { min: 10ms, max: 1s }, non_idempotent: true,
           budget: { ratio: 0.05, min_per_second: 1, ttl: 30s }, hedge: { after: p99.9, max: 2 } }",
    ))
    .unwrap();
    assert_eq!(policy.max_attempts, 4);
    assert_eq!(policy.backoff.min(), ms(10));
    assert_eq!(policy.backoff.max(), ms(1000));
    assert!(policy.non_idempotent);
    assert_eq!(policy.budget.ratio_permille(), 50);
    assert_eq!(policy.budget.min_per_second(), 1);
    assert_eq!(policy.budget.ttl(), Duration::from_secs(30));
    assert_eq!(
        policy.hedge,
        Some(HedgePolicy {
            after: HedgeDelay::Quantile { permille: 999 },
            max: 2
        })
    );
    let fixed = RetryPolicy::try_from(raw("{ hedge: { after: 40ms } }")).unwrap();
    assert_eq!(
        fixed.hedge,
        Some(HedgePolicy {
            after: HedgeDelay::Fixed(ms(40)),
            max: 1
        })
    );
    assert_eq!(HedgeDelay::Quantile { permille: 950 }.to_string(), "p95");
    assert_eq!(HedgeDelay::Quantile { permille: 999 }.to_string(), "p99.9");
    // A lone minimum above the default maximum moves the maximum with it.
    let slow = RetryPolicy::try_from(raw("{ backoff: { min: 1s } }")).unwrap();
    assert_eq!(
        (slow.backoff.min(), slow.backoff.max()),
        (ms(1000), ms(1000))
    );
}

#[test]
fn bad_policies_name_their_field() {
    let field = |yaml: &str| RetryPolicy::try_from(raw(yaml)).unwrap_err().field;
    assert_eq!(field("{ max_attempts: 1 }"), "max_attempts");
    assert_eq!(field("{ max_attempts: 11 }"), "max_attempts");
    assert_eq!(field("{ backoff: { min: soon } }"), "backoff.min");
    assert_eq!(field("{ backoff: { min: 0ms } }"), "backoff");
    assert_eq!(field("{ backoff: { min: 2s, max: 1s } }"), "backoff");
    assert_eq!(field("{ budget: { ratio: -0.1 } }"), "budget.ratio");
    assert_eq!(field("{ budget: { ratio: .nan } }"), "budget.ratio");
    assert_eq!(field("{ budget: { ratio: 1001 } }"), "budget.ratio");
    assert_eq!(field("{ budget: { ttl: 500ms } }"), "budget.ttl");
    assert_eq!(field("{ budget: { ttl: 61s } }"), "budget.ttl");
    assert_eq!(
        field("{ budget: { min_per_second: 100001 } }"),
        "budget.min_per_second"
    );
    assert_eq!(field("{ hedge: { max: 1 } }"), "hedge.after");
    assert_eq!(field("{ hedge: { after: p100 } }"), "hedge.after");
    assert_eq!(field("{ hedge: { after: p0 } }"), "hedge.after");
    assert_eq!(field("{ hedge: { after: p9.99 } }"), "hedge.after");
    assert_eq!(field("{ hedge: { after: 0ms } }"), "hedge.after");
    assert_eq!(field("{ hedge: { after: 5ms, max: 5 } }"), "hedge.max");
    assert!(serde_yaml_ng::from_str::<RawRetry>("{ attempts: 3 }").is_err());
}

#[test]
fn only_idempotent_methods_retry_unless_the_route_allows_others() {
    for method in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
        assert!(idempotent(method.as_bytes()), "{method}");
    }
    for method in ["POST", "PATCH", "CONNECT", "get", "PURGE"] {
        assert!(!idempotent(method.as_bytes()), "{method}");
    }
    let mut budget = Budget::new(BudgetConfig::default(), Instant::ZERO);
    let mut rng = DetRng::new(3);
    let now = Instant::ZERO;
    let mut post = Retries::new(&policy(3), b"POST");
    assert_eq!(
        post.after_failure(true, true, None, &mut budget, now, &mut rng),
        Decision::Skip(Skip::Method)
    );
    let lenient = RetryPolicy {
        non_idempotent: true,
        ..policy(3)
    };
    let mut post = Retries::new(&lenient, b"POST");
    assert!(matches!(
        post.after_failure(true, true, None, &mut budget, now, &mut rng),
        Decision::Retry { .. }
    ));
}

#[test]
fn each_condition_refuses_in_turn() {
    let mut rng = DetRng::new(5);
    let now = Instant::ZERO;
    let mut budget = Budget::new(BudgetConfig::default(), now);
    let mut get = Retries::new(&policy(3), b"GET");
    let mut decide = |retries: &mut Retries, retryable, replayable, remaining| {
        retries.after_failure(retryable, replayable, remaining, &mut budget, now, &mut rng)
    };
    assert_eq!(
        decide(&mut get, false, true, None),
        Decision::Skip(Skip::NotRetryable)
    );
    assert_eq!(
        decide(&mut get, true, false, None),
        Decision::Skip(Skip::Body)
    );
    // The backoff is at least 25 ms; 20 ms left is not enough.
    assert_eq!(
        decide(&mut get, true, true, Some(ms(20))),
        Decision::Skip(Skip::Deadline)
    );
    assert!(matches!(
        decide(&mut get, true, true, Some(ms(10_000))),
        Decision::Retry { .. }
    ));
    assert!(matches!(
        decide(&mut get, true, true, None),
        Decision::Retry { .. }
    ));
    assert_eq!(get.attempts(), 3);
    assert_eq!(
        decide(&mut get, true, true, None),
        Decision::Skip(Skip::Attempts)
    );
}

#[test]
fn an_exhausted_budget_refuses_until_requests_or_time_refill_it() {
    let config = BudgetConfig::try_new(200, 10, Duration::from_secs(10)).unwrap();
    let t0 = Instant::ZERO;
    let mut budget = Budget::new(config, t0);
    // The reserve holds one second of the minimum: ten retries.
    assert_eq!(budget.available(t0), 10);
    for _ in 0..10 {
        assert!(budget.try_withdraw(t0));
    }
    assert!(!budget.try_withdraw(t0), "exhausted");
    // Five requests deposit one retry.
    for _ in 0..5 {
        budget.deposit(t0);
    }
    assert!(budget.try_withdraw(t0));
    assert!(!budget.try_withdraw(t0));
    // The reserve refills at ten a second.
    let t1 = t0 + ms(100);
    assert!(budget.try_withdraw(t1));
    assert!(!budget.try_withdraw(t1));
    assert_eq!(
        budget.available(t0 + Duration::from_secs(5)),
        10,
        "capped at one second"
    );
}

#[test]
fn deposits_expire_after_the_ttl() {
    let config = BudgetConfig::try_new(1000, 0, Duration::from_secs(10)).unwrap();
    let t0 = Instant::ZERO;
    let mut budget = Budget::new(config, t0);
    budget.deposit(t0);
    budget.deposit(t0);
    assert_eq!(budget.available(t0 + Duration::from_secs(8)), 2);
    assert_eq!(budget.available(t0 + Duration::from_secs(10)), 0);
    assert!(budget.try_withdraw(t0 + Duration::from_secs(5)));
    assert!(!budget.try_withdraw(t0 + Duration::from_secs(10)));
}

#[test]
fn hedges_spend_the_budget_and_their_own_allowance() {
    let hedging = RetryPolicy {
        max_attempts: 4,
        hedge: Some(HedgePolicy {
            after: HedgeDelay::Fixed(ms(10)),
            max: 2,
        }),
        ..RetryPolicy::default()
    };
    let t0 = Instant::ZERO;
    let mut budget = Budget::new(
        BudgetConfig::try_new(0, 2, Duration::from_secs(1)).unwrap(),
        t0,
    );
    let mut get = Retries::new(&hedging, b"GET");
    assert_eq!(get.hedge(false, &mut budget, t0), Err(Skip::Body));
    assert_eq!(get.hedge(true, &mut budget, t0), Ok(()));
    assert_eq!(get.hedge(true, &mut budget, t0), Ok(()));
    assert_eq!(
        get.hedge(true, &mut budget, t0),
        Err(Skip::Attempts),
        "two hedges at most"
    );
    assert_eq!(get.attempts(), 3);
    let mut other = Retries::new(&hedging, b"GET");
    assert_eq!(other.hedge(true, &mut budget, t0), Err(Skip::Budget));
    let mut post = Retries::new(&hedging, b"POST");
    assert_eq!(post.hedge(true, &mut budget, t0), Err(Skip::Method));
    // Without a hedging policy, never.
    let mut plain = Retries::new(&RetryPolicy::default(), b"GET");
    assert_eq!(plain.hedge(true, &mut budget, t0), Err(Skip::Attempts));
}

#[test]
fn quantile_hedges_wait_for_enough_samples() {
    let p95 = HedgePolicy {
        after: HedgeDelay::Quantile { permille: 950 },
        max: 1,
    };
    let mut latencies = LatencyHistogram::new();
    for _ in 0..19 {
        latencies.record(ms(10));
    }
    assert_eq!(p95.delay(&latencies), None);
    latencies.record(ms(400));
    let delay = p95.delay(&latencies).expect("20 samples");
    assert!(delay >= ms(5) && delay <= ms(500), "{delay:?}");
    let fixed = HedgePolicy {
        after: HedgeDelay::Fixed(ms(30)),
        max: 1,
    };
    assert_eq!(fixed.delay(&LatencyHistogram::new()), Some(ms(30)));
}

/// One step of a retry workload: time passes, a request arrives, its attempts fail or not.
#[derive(Clone, Debug)]
struct Step {
    advance_ms: u64,
    fails: u8,
    retryable: bool,
    method: &'static str,
}

fn step() -> impl Strategy<Value = Step> {
    (
        prop_oneof![Just(0u64), 0u64..5, 0u64..200, 0u64..3_000],
        0u8..12,
        any::<bool>(),
        prop_oneof![Just("GET"), Just("PUT"), Just("POST")],
    )
        .prop_map(|(advance_ms, fails, retryable, method)| Step {
            advance_ms,
            fails,
            retryable,
            method,
        })
}

fn budget_config() -> impl Strategy<Value = BudgetConfig> {
    (0u32..2_000, 0u32..50, 1u64..=60).prop_map(|(ratio, min, ttl)| {
        BudgetConfig::try_new(ratio, min, Duration::from_secs(ttl)).unwrap()
    })
}

proptest! {
    /// Under any failure pattern and request rate, attempts stay within
    /// `requests x (1 + ratio) + min_per_second x (T + 1 s)` over a run of length `T`; a
    /// request that may not be retried is sent once; every backoff is within its bounds.
    #[test]
    fn the_budget_bounds_attempts_under_any_failures(
        steps in prop::collection::vec(step(), 1..400),
        config in budget_config(),
        max_attempts in 2u32..=MAX_ATTEMPTS,
        seed: u64,
    ) {
        let policy = RetryPolicy { max_attempts, budget: config, ..RetryPolicy::default() };
        let mut rng = DetRng::new(seed);
        let t0 = Instant::ZERO;
        let mut now = t0;
        let mut budget = Budget::new(config, t0);
        let (mut requests, mut attempts) = (0u64, 0u64);
        for step in steps {
            now += ms(step.advance_ms);
            requests += 1;
            budget.deposit(now);
            let mut retries = Retries::new(&policy, step.method.as_bytes());
            let mut sent = 1u32;
            let mut failures_left = step.fails;
            while failures_left > 0 {
                failures_left -= 1;
                match retries.after_failure(step.retryable, true, None, &mut budget, now, &mut rng) {
                    Decision::Retry { after } => {
                        prop_assert!(after >= policy.backoff.min() && after <= policy.backoff.max());
                        now += after;
                        sent += 1;
                    }
                    Decision::Skip(_) => break,
                }
            }
            if !step.retryable || step.method == "POST" {
                prop_assert_eq!(sent, 1, "a request that may not be retried is sent once");
            }
            prop_assert!(sent <= max_attempts);
            attempts += u64::from(sent);
            let elapsed_ms = u64::try_from(now.saturating_duration_since(t0).as_millis()).unwrap();
            // In thousandths: attempts x 1000 <= requests x (1000 + ratio) + min x (T + 1 s).
            let bound = requests * (1000 + u64::from(config.ratio_permille()))
                + u64::from(config.min_per_second()) * (elapsed_ms + 1000);
            prop_assert!(attempts * 1000 <= bound, "{attempts} attempts for {requests} requests in {elapsed_ms} ms");
        }
    }

    /// A retry is never granted without a whole thousandth-exact unit of budget behind it.
    #[test]
    fn withdrawals_never_exceed_what_was_put_in(
        ops in prop::collection::vec((0u64..2_000, any::<bool>()), 1..500),
        config in budget_config(),
    ) {
        let mut budget = Budget::new(config, Instant::ZERO);
        let mut now = Instant::ZERO;
        let (mut deposits, mut withdrawals) = (0u64, 0u64);
        for (advance, deposit) in ops {
            now += ms(advance);
            if deposit {
                budget.deposit(now);
                deposits += 1;
            } else if budget.try_withdraw(now) {
                withdrawals += 1;
            }
            let elapsed_ms = now.as_nanos() / 1_000_000;
            let put_in = deposits * u64::from(config.ratio_permille())
                + u64::from(config.min_per_second()) * (elapsed_ms + 1000);
            prop_assert!(withdrawals * 1000 <= put_in);
        }
    }
}
