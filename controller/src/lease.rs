//! Leader election over a `coordination.k8s.io/v1` Lease, for the controller's singleton work
//! (bootstrapping the certificate authority into a Secret). Discovery needs none: every
//! replica serves it.
//!
//! Two parts, so that only the second touches IO:
//!
//! - [`Elector`] decides what to do with the Lease as last read: create it, renew it (we hold
//!   it), take it over (its holder stopped renewing), or follow its holder. Expiry is judged
//!   from when *this* replica saw the record last change, on its own monotonic clock, never
//!   from the `renewTime` another replica wrote: clocks of different nodes need not agree.
//! - [`run`] reads and writes the Lease every `duration / 3`, with the API server's
//!   optimistic concurrency (the write names the `resourceVersion` it read, so of two replicas
//!   taking an expired Lease at once exactly one succeeds), and publishes whether this replica
//!   leads. A leader that cannot renew for a whole `duration` stops leading before any other
//!   replica can take over. On shutdown the leader releases the Lease so a successor need not
//!   wait.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

use crate::identity::WallClock;

/// How long a Lease lasts without renewal by default (client-go's default).
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);

/// The Lease as this replica read it: what tells one version of it from the next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Who holds it (`None` or empty: released).
    pub holder: Option<String>,
    /// The API server's version of the object: any write changes it.
    pub resource_version: String,
}

/// What to do with the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// There is no Lease: create it, held by us.
    Create,
    /// We hold it: renew it.
    Renew,
    /// Its holder released it, or has not renewed it for a whole duration: take it.
    TakeOver,
    /// Another replica holds it: follow.
    Follow(String),
}

/// The election's state for one replica. Times are this replica's monotonic clock, as a
/// duration since any fixed start.
#[derive(Clone, Debug)]
pub struct Elector {
    me: String,
    duration: Duration,
    /// The last version seen and when it was first seen.
    seen: Option<(Observed, Duration)>,
}

impl Elector {
    /// An elector for the replica named `me`, with Leases of `duration`.
    #[must_use]
    pub fn new(me: String, duration: Duration) -> Self {
        Self {
            me,
            duration,
            seen: None,
        }
    }

    /// This replica's name (the Lease's holder when it leads).
    #[must_use]
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Decides what to do with the Lease read at `now` (`None`: there is none).
    pub fn step(&mut self, lease: Option<&Observed>, now: Duration) -> Action {
        let Some(lease) = lease else {
            self.seen = None;
            return Action::Create;
        };
        let first_seen = match &self.seen {
            Some((seen, at)) if seen == lease => *at,
            _ => {
                self.seen = Some((lease.clone(), now));
                now
            }
        };
        match lease.holder.as_deref() {
            Some(holder) if holder == self.me => Action::Renew,
            None | Some("") => Action::TakeOver,
            Some(holder) => {
                if now.saturating_sub(first_seen) >= self.duration {
                    Action::TakeOver
                } else {
                    Action::Follow(holder.to_owned())
                }
            }
        }
    }
}

fn observed(lease: &Lease) -> Observed {
    Observed {
        holder: lease.spec.as_ref().and_then(|s| s.holder_identity.clone()),
        resource_version: lease.metadata.resource_version.clone().unwrap_or_default(),
    }
}

fn micro_time(clock: &WallClock) -> Option<MicroTime> {
    let now = clock();
    let secs = i64::try_from(now.as_secs()).ok()?;
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .ok()
        .map(MicroTime)
}

/// The Lease's spec for a holder taking or renewing it.
fn spec(
    me: &str,
    duration: Duration,
    previous: Option<&LeaseSpec>,
    taking: bool,
    clock: &WallClock,
) -> LeaseSpec {
    let now = micro_time(clock);
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(me.to_owned()),
        lease_duration_seconds: Some(i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX)),
        acquire_time: if taking {
            now.clone()
        } else {
            previous.and_then(|p| p.acquire_time.clone())
        },
        renew_time: now,
        lease_transitions: Some(if taking { transitions + 1 } else { transitions }),
        ..LeaseSpec::default()
    }
}

/// Runs the election for the Lease `name` in `api`'s namespace until `shutdown`, publishing
/// whether this replica leads on `leading`. On shutdown a leader releases the Lease.
pub async fn run(
    api: Api<Lease>,
    name: String,
    mut elector: Elector,
    clock: WallClock,
    leading: watch::Sender<bool>,
    shutdown: impl Future<Output = ()>,
) {
    let period = (elector.duration / 3).max(Duration::from_millis(100));
    // Time is read from the ticks: each tick's instant is when it was due, never later than
    // now, so a follower's estimate of how long a Lease went unrenewed is never too long.
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let origin = ticks.tick().await;
    let mut tick = origin;
    // Every call to the API server is bounded, so a round takes at most 1.5 periods (plus the
    // wait for its tick), and a leader that renewed in the previous round renewed less than
    // a duration ago.
    let bound = period / 2;
    let mut renewed_last_round = false;
    let mut shutdown = core::pin::pin!(shutdown);
    loop {
        let now = tick.saturating_duration_since(origin);
        let lead = round(&api, &name, &mut elector, &clock, &leading, now, bound).await;
        let leads = lead || (renewed_last_round && *leading.borrow());
        renewed_last_round = lead;
        leading.send_if_modified(|current| {
            let changed = *current != leads;
            *current = leads;
            changed
        });
        tokio::select! {
            next = ticks.tick() => tick = next,
            () = &mut shutdown => break,
        }
    }
    if *leading.borrow() {
        release(&api, &name, elector.me(), bound).await;
        leading.send_replace(false);
    }
}

/// One read of the Lease and the write it calls for; whether this replica holds the Lease
/// after it.
async fn round(
    api: &Api<Lease>,
    name: &str,
    elector: &mut Elector,
    clock: &WallClock,
    leading: &watch::Sender<bool>,
    now: Duration,
    bound: Duration,
) -> bool {
    let current = match bounded(bound, api.get_opt(name)).await {
        Ok(current) => current,
        Err(err) => {
            tracing::warn!(lease = %name, error = %err, "cannot read the Lease");
            return false;
        }
    };
    let action = elector.step(current.as_ref().map(observed).as_ref(), now);
    match (action, current) {
        (Action::Follow(holder), _) => {
            if *leading.borrow() {
                tracing::info!(lease = %name, %holder, "lost the Lease");
            }
            false
        }
        (Action::Create, _) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec(elector.me(), elector.duration, None, true, clock)),
            };
            let ok = write_result(
                bounded(bound, api.create(&PostParams::default(), &lease)).await,
                name,
            );
            if ok {
                tracing::info!(lease = %name, me = elector.me(), "created the Lease");
            }
            ok
        }
        (action, Some(mut lease)) => {
            let taking = action == Action::TakeOver;
            lease.spec = Some(spec(
                elector.me(),
                elector.duration,
                lease.spec.as_ref(),
                taking,
                clock,
            ));
            // `replace` sends the resourceVersion read: of two writers the first wins and the
            // other's write fails with a conflict.
            let ok = write_result(
                bounded(bound, api.replace(name, &PostParams::default(), &lease)).await,
                name,
            );
            if ok && taking {
                tracing::info!(lease = %name, me = elector.me(), "took the Lease");
            }
            ok
        }
        (_, None) => false,
    }
}

/// An API call bounded by `bound` (a timeout is an error like any other).
async fn bounded<T>(
    bound: Duration,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(bound, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(kube::Error::Api(status))) if status.code == 409 => Err("conflict".into()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no answer within {bound:?}")),
    }
}

fn write_result(result: Result<Lease, String>, name: &str) -> bool {
    match result {
        Ok(_) => true,
        // Another replica wrote first: it holds the Lease.
        Err(err) if err == "conflict" => false,
        Err(err) => {
            tracing::warn!(lease = %name, error = %err, "cannot write the Lease");
            false
        }
    }
}

/// Gives the Lease up (holder cleared) if we still hold it.
async fn release(api: &Api<Lease>, name: &str, me: &str, bound: Duration) {
    let Ok(Some(mut lease)) = bounded(bound, api.get_opt(name)).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(me) {
        return;
    }
    spec.holder_identity = None;
    match bounded(bound, api.replace(name, &PostParams::default(), &lease)).await {
        Ok(_) => tracing::info!(lease = %name, "released the Lease"),
        Err(err) => tracing::warn!(lease = %name, error = %err, "cannot release the Lease"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, version: u32) -> Observed {
        Observed {
            holder: Some(holder.to_owned()).filter(|h| !h.is_empty()),
            resource_version: version.to_string(),
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn no_lease_is_created_and_our_own_is_renewed() {
        let mut elector = Elector::new("a".into(), 15 * S);
        assert_eq!(elector.step(None, Duration::ZERO), Action::Create);
        assert_eq!(elector.step(Some(&lease("a", 1)), S), Action::Renew);
        assert_eq!(elector.step(Some(&lease("a", 2)), 100 * S), Action::Renew);
    }

    #[test]
    fn another_holder_is_followed_until_it_stops_renewing_for_a_whole_duration() {
        let mut elector = Elector::new("b".into(), 15 * S);
        assert_eq!(
            elector.step(Some(&lease("a", 1)), Duration::ZERO),
            Action::Follow("a".into())
        );
        // Renewed (a new version) at 10 s: the duration counts from then.
        assert_eq!(
            elector.step(Some(&lease("a", 2)), 10 * S),
            Action::Follow("a".into())
        );
        assert_eq!(
            elector.step(Some(&lease("a", 2)), 24 * S),
            Action::Follow("a".into())
        );
        assert_eq!(elector.step(Some(&lease("a", 2)), 25 * S), Action::TakeOver);
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let mut elector = Elector::new("b".into(), 15 * S);
        assert_eq!(
            elector.step(Some(&lease("", 3)), Duration::ZERO),
            Action::TakeOver
        );
    }

    #[test]
    fn expiry_is_judged_on_our_clock_from_when_we_first_saw_the_version() {
        // A replica that starts late sees a stale Lease for the first time: it waits a whole
        // duration from then, whatever the Lease's own renewTime says.
        let mut elector = Elector::new("b".into(), 15 * S);
        assert_eq!(
            elector.step(Some(&lease("a", 7)), 1000 * S),
            Action::Follow("a".into())
        );
        assert_eq!(
            elector.step(Some(&lease("a", 7)), 1014 * S),
            Action::Follow("a".into())
        );
        assert_eq!(
            elector.step(Some(&lease("a", 7)), 1015 * S),
            Action::TakeOver
        );
    }

    proptest::proptest! {
        /// Whatever sequence of reads, a follower never takes a Lease whose version changed
        /// less than a duration ago.
        #[test]
        fn never_takes_a_lease_renewed_within_a_duration(
            reads in proptest::collection::vec((0u32..4, 0u64..40), 1..40),
        ) {
            let duration = 15 * S;
            let mut elector = Elector::new("me".into(), duration);
            let mut now = Duration::ZERO;
            let mut changed_at = Duration::ZERO;
            let mut last: Option<u32> = None;
            for (version, advance) in reads {
                now += Duration::from_secs(advance);
                if last != Some(version) {
                    changed_at = now;
                    last = Some(version);
                }
                let action = elector.step(Some(&lease("other", version)), now);
                if action == Action::TakeOver {
                    proptest::prop_assert!(now - changed_at >= duration);
                }
            }
        }
    }
}
