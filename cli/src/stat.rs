//! Rendering top-line figures as a table; the figures themselves come from
//! [`conduit_controller::stat`].

use std::fmt::Write as _;

pub use conduit_controller::stat::{Counts, Figures, counts_by_authority, total};

/// One line of the table: a name and its figures, indented under a parent when `depth > 0`.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The service or replica name.
    pub name: String,
    /// 0 for a service, 1 for a replica under it.
    pub depth: usize,
    /// Its figures.
    pub figures: Figures,
}

/// The column headers of [`render`]'s table: the name column, then success rate, requests
/// per second and the three latency percentiles.
pub const STAT_HEADERS: [&str; 6] = ["NAME", "SUCCESS", "RPS", "P50", "P95", "P99"];

/// Renders rows as a fixed-width table under [`STAT_HEADERS`].
#[must_use]
pub fn render(rows: &[Row]) -> String {
    render_with(STAT_HEADERS, rows)
}

/// Renders rows as a fixed-width table under `headers` (name, success rate, requests per
/// second, p50, p95, p99): each column is as wide as its header or its widest value.
#[must_use]
pub fn render_with(headers: [&str; 6], rows: &[Row]) -> String {
    let [
        name_header,
        success_header,
        rps_header,
        p50_header,
        p95_header,
        p99_header,
    ] = headers;
    let width = rows
        .iter()
        .map(|r| r.name.len() + 2 * r.depth)
        .max()
        .unwrap_or(0)
        .max(name_header.len());
    let success_width = success_header.len().max(8);
    let rps_width = rps_header.len().max(8);
    let latency_width = [p50_header, p95_header, p99_header]
        .iter()
        .map(|h| h.len())
        .max()
        .unwrap_or(0)
        .max(9);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{name_header:<width$}  {success_header:>success_width$}  {rps_header:>rps_width$}  \
         {p50_header:>latency_width$}  {p95_header:>latency_width$}  {p99_header:>latency_width$}",
    );
    for row in rows {
        let name = format!("{}{}", "  ".repeat(row.depth), row.name);
        let f = &row.figures;
        let success = f
            .success_rate
            .map_or_else(|| "-".to_owned(), |r| format!("{:.2}%", r * 100.0));
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}ms"));
        let _ = writeln!(
            out,
            "{name:<width$}  {success:>success_width$}  {:>rps_width$.1}  {:>latency_width$}  \
             {:>latency_width$}  {:>latency_width$}",
            f.rps,
            ms(f.p50_ms),
            ms(f.p95_ms),
            ms(f.p99_ms),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_table() {
        let figures = Figures {
            requests: 200,
            success_rate: Some(0.95),
            rps: 20.0,
            p50_ms: Some(5.0),
            p95_ms: Some(9.5),
            p99_ms: Some(9.9),
        };
        let idle = Figures {
            requests: 0,
            success_rate: None,
            rps: 0.0,
            p50_ms: None,
            p95_ms: None,
            p99_ms: None,
        };
        let rows = vec![
            Row {
                name: "web.demo:80".into(),
                depth: 0,
                figures: figures.clone(),
            },
            Row {
                name: "127.0.0.1:4143".into(),
                depth: 1,
                figures,
            },
            Row {
                name: "127.0.0.1:4144".into(),
                depth: 1,
                figures: idle,
            },
        ];
        insta::assert_snapshot!(render(&rows));
    }
}
