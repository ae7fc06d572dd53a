//! The simulation's observer of each proxy (`conduit_proxy::observe::Observer`): it records in
//! the trace every discovery state the proxy reports applying and every endpoint it reports
//! picking, so the checkers assert on what the proxy did rather than guess it from which
//! backend answered.
//!
//! The observer follows every request that carries the workload's `x-request-id`, and names
//! endpoints by host through the world's address table. What the proxy applied is tied to the
//! harness's configuration versions by the [`CONFIG_LABEL`] each published endpoint carries.

use std::collections::BTreeMap;
use std::sync::Mutex;

use conduit_core::route::RequestView;
use conduit_proxy::Resolution;
use conduit_proxy::observe::{Observer, Pick, RequestKey};
use http::HeaderName;

use crate::trace::{AppliedRecord, CONFIG_LABEL, PickRecord, Recorder, now_us};

/// The header the workload names each request with.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The most authorities whose last state one observer remembers (a proxy follows at most
/// `conduit_proxy`'s own bound; the worlds use one or two).
const MAX_AUTHORITIES: usize = 64;

/// Per authority, the last state a proxy applied: its version (`None`: not found) and its
/// configuration.
type LastStates = BTreeMap<String, (Option<u64>, Option<u64>)>;

/// Records what one proxy incarnation applies and picks.
#[derive(Debug)]
pub struct SimObserver {
    proxy: String,
    incarnation: u64,
    recorder: Recorder,
    /// Per authority, the last state applied: its version and configuration.
    last: Mutex<LastStates>,
}

impl SimObserver {
    /// The observer of incarnation `incarnation` of `proxy`'s proxy.
    #[must_use]
    pub fn new(proxy: &str, incarnation: u64, recorder: Recorder) -> Self {
        Self {
            proxy: proxy.to_owned(),
            incarnation,
            recorder,
            last: Mutex::default(),
        }
    }

    fn last(&self) -> std::sync::MutexGuard<'_, LastStates> {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Observer for SimObserver {
    fn applied(&self, authority: &str, resolution: &Resolution) {
        let (version, endpoints) = match resolution {
            Resolution::Unknown => return,
            Resolution::NotFound => (None, Vec::new()),
            Resolution::Service { version, service } => {
                let mut endpoints: Vec<(String, Option<u64>)> = service
                    .endpoints
                    .iter()
                    .map(|e| {
                        let label = e.labels.get(CONFIG_LABEL).and_then(|v| v.parse().ok());
                        (self.recorder.host_of(e.addr), label)
                    })
                    .collect();
                endpoints.sort();
                (Some(*version), endpoints)
            }
        };
        let record = AppliedRecord {
            at_us: now_us(),
            proxy: self.proxy.clone(),
            incarnation: self.incarnation,
            authority: authority.to_owned(),
            version,
            endpoints,
        };
        {
            let mut last = self.last();
            if last.len() < MAX_AUTHORITIES || last.contains_key(authority) {
                last.insert(authority.to_owned(), (version, record.config()));
            }
        }
        self.recorder.with(|t| t.applied.push(record));
    }

    fn request(&self, head: &dyn RequestView) -> Option<RequestKey> {
        let mut id = None;
        head.any_header(&REQUEST_ID, &mut |value| {
            id = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            id.is_some()
        });
        id.map(RequestKey)
    }

    fn picked(&self, pick: &Pick<'_>) {
        let config = match self.last().get(pick.authority) {
            Some((Some(version), config)) if *version == pick.version => *config,
            _ => None,
        };
        let record = PickRecord {
            at_us: now_us(),
            proxy: self.proxy.clone(),
            incarnation: self.incarnation,
            authority: pick.authority.to_owned(),
            version: pick.version,
            config,
            endpoint: self.recorder.host_of(pick.endpoint),
            hedge: pick.hedge,
        };
        self.recorder.pick(pick.request.0, record);
    }
}
