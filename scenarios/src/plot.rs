//! Red-line plots: p50 and p99 latency against offered rate for each target, with each
//! target's red line marked, as a self-contained SVG.
//!
//! Written by hand rather than with a plotting crate: the chart is one kind of line plot, the
//! SVG is plain text we can snapshot-test, and no font or image library is needed.

use std::fmt::Write as _;
use std::time::Duration;

use crate::redline::format_duration;

/// One target's series.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The target's name (legend).
    pub name: String,
    /// `(offered rate, p50, p99)` per step, in any order (sorted when drawn; a rate run more
    /// than once keeps its last measurement).
    pub points: Vec<(u32, Duration, Duration)>,
    /// The target's red line, if it has one.
    pub red_line: Option<u32>,
}

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 560.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 180.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// Draws the series as an SVG document: offered rate (linear) across, latency (log scale)
/// up; p99 solid, p50 dashed, a dotted vertical line at each red line.
#[must_use]
pub fn svg(title: &str, objective: &str, series: &[Series]) -> String {
    let points = || series.iter().flat_map(|s| s.points.iter());
    let max_rate = points()
        .map(|(rate, ..)| *rate)
        .chain(series.iter().filter_map(|s| s.red_line))
        .max()
        .unwrap_or(1)
        .max(1);
    let micros = |d: &Duration| (d.as_secs_f64() * 1e6).max(1.0);
    let (low, high) = points().fold((f64::MAX, 1.0f64), |(low, high), (_, p50, p99)| {
        (low.min(micros(p50)), high.max(micros(p99)))
    });
    // Whole decades around the data: 10^lo .. 10^hi microseconds.
    // A little room below the lowest point, so a line on a whole decade is not on the axis.
    let decade_low = if low == f64::MAX {
        0
    } else {
        floor_log10(low * 0.9)
    };
    let decade_high = floor_log10(high).max(decade_low) + 1;
    let x_max = nice_ceiling(f64::from(max_rate));
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |rate: f64| LEFT + rate / x_max * plot_w;
    let y = |us: f64| {
        let span = f64::from(decade_high - decade_low);
        TOP + plot_h - (us.log10() - f64::from(decade_low)) / span * plot_h
    };

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="24" font-size="16">{}</text>"#,
        escape(title)
    );
    let _ = writeln!(
        out,
        r##"<text x="{LEFT}" y="40" fill="#555">objective: {} (p99 solid, p50 dashed, red line dotted)</text>"##,
        escape(objective)
    );
    // Grid and axes.
    for decade in decade_low..=decade_high {
        let value = 10f64.powi(decade);
        let gy = y(value);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{gy:.1}" x2="{:.1}" y2="{gy:.1}" stroke="#ddd"/>"##,
            LEFT + plot_w
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            gy + 4.0,
            format_duration(Duration::from_secs_f64(value / 1e6))
        );
    }
    for tick in 0..=5 {
        let rate = x_max * f64::from(tick) / 5.0;
        let gx = x(rate);
        let _ = writeln!(
            out,
            r##"<line x1="{gx:.1}" y1="{TOP}" x2="{gx:.1}" y2="{:.1}" stroke="#eee"/>"##,
            TOP + plot_h
        );
        let _ = writeln!(
            out,
            r#"<text x="{gx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + plot_h + 18.0,
            format_rate(rate)
        );
    }
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">offered rate (requests/s)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 16.0
    );
    let _ = writeln!(
        out,
        r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">latency from intended send (log)</text>"#,
        TOP + plot_h / 2.0
    );

    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut sorted: Vec<(u32, Duration, Duration)> = Vec::new();
        for point in &s.points {
            sorted.retain(|p| p.0 != point.0);
            sorted.push(*point);
        }
        sorted.sort_by_key(|p| p.0);
        for (dash, pick) in [
            (
                "",
                (|p: &(u32, Duration, Duration)| p.2) as fn(&_) -> Duration,
            ),
            (r#" stroke-dasharray="6 4""#, |p| p.1),
        ] {
            let path: Vec<String> = sorted
                .iter()
                .map(|p| format!("{:.1},{:.1}", x(f64::from(p.0)), y(micros(&pick(p)))))
                .collect();
            let _ = writeln!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
                path.join(" ")
            );
        }
        for p in &sorted {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                x(f64::from(p.0)),
                y(micros(&p.2))
            );
        }
        if let Some(line) = s.red_line {
            let lx = x(f64::from(line));
            let _ = writeln!(
                out,
                r#"<line x1="{lx:.1}" y1="{TOP}" x2="{lx:.1}" y2="{:.1}" stroke="{color}" stroke-dasharray="2 3"/>"#,
                TOP + plot_h
            );
        }
        // Legend.
        let ly = TOP + 20.0 + 36.0 * i as f64;
        let lx = LEFT + plot_w + 16.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"/>"#,
            lx + 20.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 26.0,
            ly + 4.0,
            escape(&s.name)
        );
        let label = s.red_line.map_or_else(
            || "no red line".to_owned(),
            |r| format!("red line {}", format_rate(f64::from(r))),
        );
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" fill="#555">{label}</text>"##,
            lx + 26.0,
            ly + 18.0
        );
    }
    out.push_str("</svg>\n");
    out
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "the decade of a latency in microseconds"
)]
fn floor_log10(value: f64) -> i32 {
    value.log10().floor() as i32
}

/// The smallest 1, 2 or 5 times a power of ten at or above `value`.
fn nice_ceiling(value: f64) -> f64 {
    let decade = 10f64.powi(floor_log10(value.max(1.0)));
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * decade)
        .find(|v| *v >= value)
        .unwrap_or(10.0 * decade)
}

/// A rate as an axis writes it: 500, 2k, 12.5k.
#[must_use]
pub fn format_rate(rate: f64) -> String {
    if rate >= 1000.0 {
        let k = (rate / 100.0).round() / 10.0;
        format!("{k}k")
    } else {
        format!("{}", rate.round())
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plot_of_two_targets() {
        let ms = |n: f64| Duration::from_secs_f64(n / 1e3);
        let series = [
            Series {
                name: "direct".into(),
                points: vec![
                    (1_000, ms(0.1), ms(0.3)),
                    (4_000, ms(0.2), ms(1.5)),
                    (2_000, ms(0.1), ms(0.5)),
                    (8_000, ms(40.0), ms(900.0)),
                ],
                red_line: Some(4_000),
            },
            Series {
                name: "conduit-proxy".into(),
                points: vec![(1_000, ms(0.2), ms(0.6)), (2_000, ms(5.0), ms(300.0))],
                red_line: None,
            },
        ];
        insta::assert_snapshot!(svg("red line <loopback>", "p99<100ms", &series));
    }

    #[test]
    fn rates_and_ceilings_read_well() {
        assert_eq!(format_rate(500.0), "500");
        assert_eq!(format_rate(12_500.0), "12.5k");
        assert_eq!(nice_ceiling(8_000.0), 10_000.0);
        assert_eq!(nice_ceiling(1_500.0), 2_000.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
    }
}
