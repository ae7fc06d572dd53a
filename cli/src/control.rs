//! `conduit stat`, `conduit routes` and `conduit check`: the CLI side of the controller's
//! public API.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use conduit_proto::pb::api::api_client::ApiClient;
use conduit_proto::pb::api::{
    ListWorkloadsRequest, RouteRow, RouteSummaryRequest, RouteSummaryResponse, StatRow,
    StatSummaryRequest, Workload,
};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::stat::{Figures, Row, render, render_with};

/// How long connecting to the controller may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

async fn client(controller: SocketAddr) -> anyhow::Result<ApiClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{controller}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(Duration::from_secs(120))
        .connect()
        .await
        .with_context(|| format!("connecting to the controller at {controller}"))?;
    Ok(ApiClient::new(channel))
}

/// The figures of one `StatSummary` row, in the table's terms.
#[must_use]
pub fn figures(row: &StatRow) -> Figures {
    let requests = row.success_count + row.failure_count;
    #[expect(clippy::cast_precision_loss, reason = "ratios for display")]
    let success_rate = (requests > 0).then(|| row.success_count as f64 / requests as f64);
    #[expect(
        clippy::cast_precision_loss,
        reason = "rates and latencies for display"
    )]
    let ms = |us: Option<u64>| us.map(|us| us as f64 / 1000.0);
    #[expect(clippy::cast_precision_loss, reason = "rates for display")]
    let rps = row.requests_per_second_milli as f64 / 1000.0;
    Figures {
        requests,
        success_rate,
        rps,
        p50_ms: ms(row.latency_p50_us),
        p95_ms: ms(row.latency_p95_us),
        p99_ms: ms(row.latency_p99_us),
    }
}

/// Renders `StatSummary` rows; workloads none of whose proxies could be read are marked.
#[must_use]
pub fn render_stat(rows: &[StatRow]) -> String {
    let table: Vec<Row> = rows
        .iter()
        .map(|row| Row {
            name: row.workload.clone(),
            depth: 0,
            figures: figures(row),
        })
        .collect();
    let mut out = render(&table);
    let unread: Vec<&str> = rows
        .iter()
        .filter(|r| r.scraped_endpoints == 0)
        .map(|r| r.workload.as_str())
        .collect();
    if !unread.is_empty() {
        let _ = writeln!(
            out,
            "\nno proxy metrics could be read for: {} (endpoints without an `admin` address in the mesh, or proxies down)",
            unread.join(", ")
        );
    }
    out
}

/// `conduit stat`: one table of every workload's figures over `window`.
///
/// # Errors
///
/// The controller unreachable, or its answer an error.
pub async fn stat(
    controller: SocketAddr,
    workload: Option<String>,
    window: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let mut api = client(controller).await?;
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    let rows = api
        .stat_summary(StatSummaryRequest {
            workload: workload.unwrap_or_default(),
            window_ms,
        })
        .await
        .context("StatSummary")?
        .into_inner()
        .rows;
    if json {
        let rows: Vec<_> = rows
            .iter()
            .map(|row| {
                serde_json::json!({
                    "name": row.workload,
                    "figures": figures(row),
                    "endpoints": row.total_endpoints,
                    "scraped_endpoints": row.scraped_endpoints,
                    "window_ms": row.window_ms,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", render_stat(&rows));
    }
    Ok(())
}

/// The column headers of `conduit routes`.
pub const ROUTE_HEADERS: [&str; 6] = [
    "ROUTE",
    "SUCCESS",
    "RPS",
    "LATENCY_P50",
    "LATENCY_P95",
    "LATENCY_P99",
];

/// The figures of one `RouteSummary` row, in the table's terms.
#[must_use]
pub fn route_figures(row: &RouteRow) -> Figures {
    // The same arithmetic as a `StatSummary` row: both carry the same golden metrics.
    figures(&StatRow {
        success_count: row.success_count,
        failure_count: row.failure_count,
        requests_per_second_milli: row.requests_per_second_milli,
        latency_p50_us: row.latency_p50_us,
        latency_p95_us: row.latency_p95_us,
        latency_p99_us: row.latency_p99_us,
        ..StatRow::default()
    })
}

/// Renders a `RouteSummary` answer for `service`: one line per route, and a note when none
/// of the service's proxies could be read.
#[must_use]
pub fn render_routes(service: &str, response: &RouteSummaryResponse) -> String {
    let table: Vec<Row> = response
        .rows
        .iter()
        .map(|row| Row {
            name: row.route.clone(),
            depth: 0,
            figures: route_figures(row),
        })
        .collect();
    // The callers' view, in two more columns: what callers got (after retries) and what
    // every attempt got.
    let client = |row: &RouteRow| {
        [
            (row.effective_success_count, row.effective_failure_count),
            (row.actual_success_count, row.actual_failure_count),
        ]
        .map(|(ok, failed)| rate(ok, failed))
    };
    let mut out = String::new();
    let base = render_with(ROUTE_HEADERS, &table);
    let extra = std::iter::once(["EFFECTIVE_SUCCESS".to_owned(), "ACTUAL_SUCCESS".to_owned()])
        .chain(response.rows.iter().map(client));
    for (line, [effective, actual]) in base.lines().zip(extra) {
        let _ = writeln!(out, "{line}  {effective:>17}  {actual:>14}");
    }
    if response.scraped_endpoints == 0 {
        let _ = writeln!(
            out,
            "\nno proxy metrics could be read for {service}: none of its {} endpoints has an \
             `admin` address in the mesh, or their proxies are down",
            response.total_endpoints
        );
    }
    out
}

/// A success rate as the tables print it (`-` without responses).
fn rate(successes: u64, failures: u64) -> String {
    let total = successes.saturating_add(failures);
    if total == 0 {
        return "-".to_owned();
    }
    #[expect(clippy::cast_precision_loss, reason = "ratios for display")]
    let rate = successes as f64 / total as f64;
    format!("{:.2}%", rate * 100.0)
}

/// One route in `conduit routes --output json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RouteJson {
    /// The route's name, or `default`.
    pub route: String,
    /// Successful responses in the window.
    pub success_count: u64,
    /// Failed responses in the window.
    pub failure_count: u64,
    /// The route's figures.
    #[serde(flatten)]
    pub figures: Figures,
    /// The window the figures cover, in milliseconds.
    pub window_ms: u64,
    /// What the route's callers got, after retries (their proxies' outbound view).
    pub effective_success_count: u64,
    /// Failures the route's callers got, after retries.
    pub effective_failure_count: u64,
    /// Successful attempts, retried ones included.
    pub actual_success_count: u64,
    /// Failed attempts, retried ones included.
    pub actual_failure_count: u64,
}

/// The rows of a `RouteSummary` answer as `conduit routes --output json` prints them.
#[must_use]
pub fn routes_json(response: &RouteSummaryResponse) -> Vec<RouteJson> {
    response
        .rows
        .iter()
        .map(|row| RouteJson {
            route: row.route.clone(),
            success_count: row.success_count,
            failure_count: row.failure_count,
            figures: route_figures(row),
            window_ms: row.window_ms,
            effective_success_count: row.effective_success_count,
            effective_failure_count: row.effective_failure_count,
            actual_success_count: row.actual_success_count,
            actual_failure_count: row.actual_failure_count,
        })
        .collect()
}

/// `conduit routes`: the figures of every route of `service`'s profile over `window`.
///
/// # Errors
///
/// The controller unreachable, the service unknown to it (the error lists the services it
/// knows), or its answer another error.
pub async fn routes(
    controller: SocketAddr,
    service: &str,
    window: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let mut api = client(controller).await?;
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    let request = RouteSummaryRequest {
        workload: service.to_owned(),
        window_ms,
    };
    let response = match api.route_summary(request).await {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == tonic::Code::NotFound => {
            let known = match api.list_workloads(ListWorkloadsRequest {}).await {
                Ok(list) => list
                    .into_inner()
                    .workloads
                    .into_iter()
                    .map(|w| w.name)
                    .collect::<Vec<_>>()
                    .join(", "),
                Err(_) => String::new(),
            };
            let known = if known.is_empty() {
                "it knows no service".to_owned()
            } else {
                format!("it knows: {known}")
            };
            anyhow::bail!(
                "unknown service `{service}`: the controller at {controller} has no service of that name ({known})"
            );
        }
        Err(status) => anyhow::bail!(
            "the controller at {controller} could not summarise the routes of `{service}`: {}",
            status.message()
        ),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&routes_json(&response))?);
    } else {
        print!("{}", render_routes(service, &response));
    }
    Ok(())
}

/// One line of `conduit check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub what: String,
    /// `Ok(detail)` or `Err(reason)`.
    pub outcome: Result<String, String>,
}

/// Runs every check against the controller at `controller` (gRPC) and `admin` (its admin
/// port), then each workload endpoint's proxy admin server.
pub async fn checks(controller: SocketAddr, admin: SocketAddr) -> Vec<Check> {
    let mut checks = Vec::new();
    let workloads: Option<Vec<Workload>> = match client(controller).await {
        Ok(mut api) => match api.list_workloads(ListWorkloadsRequest {}).await {
            Ok(response) => {
                let workloads = response.into_inner().workloads;
                checks.push(Check {
                    what: format!("controller API answers at {controller}"),
                    outcome: Ok(format!("{} workloads", workloads.len())),
                });
                Some(workloads)
            }
            Err(status) => {
                checks.push(Check {
                    what: format!("controller API answers at {controller}"),
                    outcome: Err(format!("{}: {}", status.code(), status.message())),
                });
                None
            }
        },
        Err(error) => {
            checks.push(Check {
                what: format!("controller API answers at {controller}"),
                outcome: Err(format!("{error:#}")),
            });
            None
        }
    };
    checks.push(Check {
        what: format!("controller is ready ({admin}/ready)"),
        outcome: probe(admin).await,
    });
    checks.extend(ca_checks(admin).await);
    for workload in workloads.unwrap_or_default() {
        for endpoint in &workload.endpoints {
            let addr = endpoint
                .addr
                .as_ref()
                .and_then(|a| conduit_proto::convert::socket_addr("addr", a).ok());
            let name = addr.map_or_else(
                || workload.name.clone(),
                |a| format!("{} {a}", workload.name),
            );
            let admin = endpoint
                .admin
                .as_ref()
                .and_then(|a| conduit_proto::convert::socket_addr("admin", a).ok());
            let outcome = match admin {
                Some(admin) => probe(admin).await.map(|ok| format!("{ok} ({admin})")),
                None => Ok("not probed: no admin address in the mesh".to_owned()),
            };
            checks.push(Check {
                what: format!("proxy for {name} is ready"),
                outcome,
            });
            if let Some(admin) = admin
                && !endpoint.identity.is_empty()
            {
                checks.push(Check {
                    what: format!("proxy for {name} holds a certificate"),
                    outcome: certificate_check(admin, &endpoint.identity).await,
                });
            }
        }
    }
    checks
}

/// The wall clock, for certificate dates.
fn now() -> u64 {
    conduit_proxy::clock::system_unix_time().as_secs()
}

/// `2026-12-02 10:28:06 UTC` for seconds since the Unix epoch.
#[must_use]
pub fn utc(secs: u64) -> String {
    // Days to a civil date (Howard Hinnant's `civil_from_days`, proleptic Gregorian).
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `in 16h 59m` or `3h 2m ago` from now to `at`.
fn relative(at: u64, now: u64) -> String {
    let span = |secs: u64| {
        if secs >= 2 * 86_400 {
            format!("{}d", secs / 86_400)
        } else {
            format!("{}h {}m", secs / 3600, secs % 3600 / 60)
        }
    };
    if at >= now {
        format!("in {}", span(at - now))
    } else {
        format!("{} ago", span(now - at))
    }
}

/// The value of the first sample named `name` in a scrape.
fn gauge(samples: &[conduit_proto::prom::Sample], name: &str) -> Option<u64> {
    samples
        .iter()
        .find(|s| s.name == name && s.value.is_finite() && s.value >= 0.0)
        .map(|s| {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a timestamp in whole seconds, checked finite and positive"
            )]
            let v = s.value as u64;
            v
        })
}

async fn scrape(admin: SocketAddr) -> Result<Vec<conduit_proto::prom::Sample>, String> {
    match crate::demo::http_get(admin, "/metrics").await {
        Ok((200, text)) => conduit_proto::prom::parse(&text).map_err(|e| format!("{e:#}")),
        Ok((status, _)) => Err(format!("/metrics answered {status}")),
        Err(error) => Err(format!("{error:#}")),
    }
}

/// The controller's CA: its trust anchors' and issuer's validity, from its metrics.
async fn ca_checks(admin: SocketAddr) -> Vec<Check> {
    let samples = match scrape(admin).await {
        Ok(samples) => samples,
        Err(reason) => {
            return vec![Check {
                what: "identity: the controller's CA".into(),
                outcome: Err(reason),
            }];
        }
    };
    let now = now();
    let mut checks = Vec::new();
    for (what, name) in [
        (
            "identity: trust anchors are valid",
            "conduit_controller_identity_trust_anchor_expiry_timestamp_seconds",
        ),
        (
            "identity: the issuer is valid",
            "conduit_controller_identity_issuer_expiry_timestamp_seconds",
        ),
    ] {
        let outcome = match gauge(&samples, name) {
            None => Ok("no certificate authority configured".to_owned()),
            Some(until) if until <= now => Err(format!(
                "expired at {} ({})",
                utc(until),
                relative(until, now)
            )),
            Some(until) => Ok(format!("until {} ({})", utc(until), relative(until, now))),
        };
        checks.push(Check {
            what: what.into(),
            outcome,
        });
    }
    checks
}

/// A proxy's certificate for `identity`: held, for that identity, and not expired.
async fn certificate_check(admin: SocketAddr, identity: &str) -> Result<String, String> {
    let samples = scrape(admin).await?;
    let certified = samples
        .iter()
        .find(|s| s.name == "identity_certified")
        .ok_or("the proxy has no identity configured, but the mesh says it is meshed")?;
    let name = certified.label("identity").unwrap_or_default();
    if name != identity {
        return Err(format!("the proxy is `{name}`, the mesh says `{identity}`"));
    }
    let now = now();
    match gauge(&samples, "identity_cert_expiry_timestamp_seconds") {
        None => Err("no certificate yet".into()),
        Some(until) if until <= now || certified.value < 1.0 => Err(format!(
            "its certificate expired at {} ({})",
            utc(until),
            relative(until, now)
        )),
        Some(until) => Ok(format!(
            "valid until {} ({})",
            utc(until),
            relative(until, now)
        )),
    }
}

/// `conduit identity show`: a proxy's identity and its certificate's dates.
///
/// # Errors
///
/// The proxy's admin server cannot be read, or the proxy has no identity.
pub async fn identity_show(admin: SocketAddr) -> anyhow::Result<String> {
    let samples = scrape(admin)
        .await
        .map_err(|e| anyhow::anyhow!("{admin}: {e}"))?;
    let certified = samples
        .iter()
        .find(|s| s.name == "identity_certified")
        .ok_or_else(|| anyhow::anyhow!("the proxy at {admin} has no identity configured"))?;
    let name = certified.label("identity").unwrap_or_default();
    let now = now();
    let mut out = format!("identity:     {name}\n");
    match (
        gauge(&samples, "identity_cert_not_before_timestamp_seconds"),
        gauge(&samples, "identity_cert_expiry_timestamp_seconds"),
    ) {
        (Some(from), Some(until)) => {
            let state = if certified.value >= 1.0 && until > now {
                "valid"
            } else {
                "EXPIRED"
            };
            out.push_str(&format!(
                "certificate:  {state}\nnot before:   {} ({})\nnot after:    {} ({})\n",
                utc(from),
                relative(from, now),
                utc(until),
                relative(until, now)
            ));
        }
        _ => {
            out.push_str("certificate:  none yet (the proxy is waiting for the controller's CA)\n")
        }
    }
    Ok(out)
}

async fn probe(admin: SocketAddr) -> Result<String, String> {
    match crate::demo::http_get(admin, "/ready").await {
        Ok((200, _)) => Ok("ready".to_owned()),
        Ok((status, body)) => Err(format!("answered {status}: {}", body.trim())),
        Err(error) => Err(format!("{error:#}")),
    }
}

/// Renders checks one per line; the second value is whether all passed.
#[must_use]
pub fn render_checks(checks: &[Check]) -> (String, bool) {
    let mut out = String::new();
    let mut all = true;
    for check in checks {
        match &check.outcome {
            Ok(detail) => {
                let _ = writeln!(out, "[ok]   {}: {detail}", check.what);
            }
            Err(reason) => {
                all = false;
                let _ = writeln!(out, "[FAIL] {}: {reason}", check.what);
            }
        }
    }
    let _ = writeln!(
        out,
        "{}",
        if all {
            "all checks passed"
        } else {
            "some checks failed"
        }
    );
    (out, all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_print_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_293_686), "2026-12-03 10:28:06 UTC");
        assert_eq!(relative(100 + 3 * 86_400, 100), "in 3d");
        assert_eq!(relative(100, 100 + 3_720), "1h 2m ago");
    }

    fn response() -> RouteSummaryResponse {
        let row = |route: &str, ok: u64, failed: u64, rps_milli: u64, p50: Option<u64>| RouteRow {
            route: route.into(),
            success_count: ok,
            failure_count: failed,
            requests_per_second_milli: rps_milli,
            latency_p50_us: p50,
            latency_p95_us: p50.map(|us| us * 3),
            latency_p99_us: p50.map(|us| us * 5),
            window_ms: 2000,
            // The callers' view: every success also seen by callers, and a retried route
            // whose attempts failed more often than its callers saw.
            effective_success_count: ok,
            effective_failure_count: failed / 3,
            actual_success_count: ok,
            actual_failure_count: failed,
        };
        RouteSummaryResponse {
            rows: vec![
                row("create-item", 30, 0, 15_000, Some(10_500)),
                row("get-item", 45, 15, 30_000, Some(9_800)),
                row("list-items", 0, 0, 0, None),
                row("default", 2, 0, 1_000, Some(1_000)),
            ],
            total_endpoints: 2,
            scraped_endpoints: 2,
            window_ms: 2000,
        }
    }

    #[test]
    fn renders_the_routes_table() {
        insta::assert_snapshot!(render_routes("api.demo", &response()));
    }

    #[test]
    fn renders_the_routes_json() {
        let json = serde_json::to_string_pretty(&routes_json(&response())).unwrap();
        insta::assert_snapshot!(json);
    }

    #[test]
    fn says_when_no_proxy_could_be_read() {
        let unread = RouteSummaryResponse {
            scraped_endpoints: 0,
            ..response()
        };
        let text = render_routes("api.demo", &unread);
        assert!(
            text.ends_with(
                "\nno proxy metrics could be read for api.demo: none of its 2 endpoints has an \
                 `admin` address in the mesh, or their proxies are down\n"
            ),
            "{text}"
        );
    }
}
