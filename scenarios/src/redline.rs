//! The red-line search: the highest offered rate a service holds within its objectives.
//!
//! A search raises the offered rate step by step (each step an open-loop run of the load
//! generator at one constant rate), judges each step against a [`Slo`] (latency percentiles
//! counted from each request's intended send time, and the success rate), and narrows in on
//! the knee: rates grow by a factor until a step breaks an objective, then the gap between the
//! highest rate that met the objectives and the lowest that broke them is bisected until it is
//! within the configured precision, and the best rate is run once more to confirm it (a
//! confirmation that fails lowers the bracket and the search goes on). The red line is the
//! highest confirmed rate that met every objective.
//!
//! [`Search`] is a plain state machine: it says which rate to run next and is told how the
//! step went, so the same search drives real sockets (`conduit redline`) and the simulation,
//! and its logic is tested without running any load. Every search is bounded by
//! [`SearchConfig::max_steps`].

use std::fmt;
use std::time::Duration;

/// A latency quantile an objective bounds, in millionths (p99 is 990,000; p99.9 is 999,000).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantile(u32);

impl Quantile {
    /// The median.
    pub const P50: Self = Self(500_000);
    /// The 90th percentile.
    pub const P90: Self = Self(900_000);
    /// The 99th percentile.
    pub const P99: Self = Self(990_000);
    /// The 99.9th percentile.
    pub const P999: Self = Self(999_000);

    /// The quantile as a fraction in `0..=1`.
    #[must_use]
    pub fn fraction(self) -> f64 {
        f64::from(self.0) / 1e6
    }
}

impl fmt::Display for Quantile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // p50, p99, p99.9: the percentile with as many decimals as it needs.
        let percent = f64::from(self.0) / 1e4;
        write!(f, "p{percent}")
    }
}

/// What a step must meet.
#[derive(Clone, Debug, PartialEq)]
pub struct Slo {
    /// Latency quantiles and their bounds (strictly below).
    pub latency: Vec<(Quantile, Duration)>,
    /// The lowest success rate allowed, as a fraction (responses below 500 out of all
    /// requests sent, errors and timeouts counting as failures).
    pub success: Option<f64>,
}

impl Default for Slo {
    /// p99 under 100 ms and at least 99.9 % success.
    fn default() -> Self {
        Self {
            latency: vec![(Quantile::P99, Duration::from_millis(100))],
            success: Some(0.999),
        }
    }
}

impl fmt::Display for Slo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .latency
            .iter()
            .map(|(q, bound)| format!("{q}<{}", format_duration(*bound)))
            .collect();
        if let Some(success) = self.success {
            parts.push(format!("success>{}%", round3(success * 100.0)));
        }
        f.write_str(&parts.join(","))
    }
}

/// An objective that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("objective {clause:?}: {why} (expected e.g. 'p99<100ms,success>99.9%')")]
pub struct InvalidSlo {
    clause: String,
    why: &'static str,
}

impl std::str::FromStr for Slo {
    type Err = InvalidSlo;

    /// Reads `p99<50ms,success>99.9%`: comma-separated clauses, each a latency bound
    /// (`pNN<DURATION`, DURATION in `us`, `ms` or `s`) or a success floor (`success>NN%`).
    fn from_str(text: &str) -> Result<Self, InvalidSlo> {
        let mut slo = Self {
            latency: Vec::new(),
            success: None,
        };
        for clause in text.split(',').map(str::trim) {
            let invalid = |why| InvalidSlo {
                clause: clause.to_owned(),
                why,
            };
            if let Some(floor) = clause.strip_prefix("success>") {
                let percent: f64 = floor
                    .trim()
                    .strip_suffix('%')
                    .ok_or_else(|| invalid("a success floor is a percentage"))?
                    .parse()
                    .map_err(|_| invalid("not a number"))?;
                if !(0.0..=100.0).contains(&percent) {
                    return Err(invalid("a percentage is between 0 and 100"));
                }
                // In millionths, so 99.9 % reads back as 0.999 exactly.
                slo.success = Some((percent * 1e4).round() / 1e6);
            } else if let Some(rest) = clause.strip_prefix('p') {
                let (quantile, bound) = rest
                    .split_once('<')
                    .ok_or_else(|| invalid("a latency bound reads pNN<DURATION"))?;
                let percent: f64 = quantile.parse().map_err(|_| invalid("not a percentile"))?;
                if !(percent > 0.0 && percent < 100.0) {
                    return Err(invalid("a percentile is above 0 and below 100"));
                }
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a percentile below 100, in millionths"
                )]
                let quantile = Quantile((percent * 1e4).round() as u32);
                let bound = parse_duration(bound.trim()).ok_or_else(|| {
                    invalid("a duration is a number with us, ms or s (e.g. 50ms)")
                })?;
                slo.latency.retain(|(q, _)| *q != quantile);
                slo.latency.push((quantile, bound));
            } else {
                return Err(invalid("unknown objective"));
            }
        }
        if slo.latency.is_empty() && slo.success.is_none() {
            return Err(InvalidSlo {
                clause: text.to_owned(),
                why: "no objective given",
            });
        }
        slo.latency.sort();
        Ok(slo)
    }
}

fn parse_duration(text: &str) -> Option<Duration> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = text.strip_suffix("µs") {
        (n, 1e-6)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else {
        return None;
    };
    let value: f64 = number.trim().parse().ok()?;
    (value > 0.0 && value.is_finite())
        .then(|| Duration::try_from_secs_f64(value * scale).ok())
        .flatten()
}

/// A duration as an objective or a report writes it: `250us`, `1.5ms`, `2s`.
#[must_use]
pub fn format_duration(duration: Duration) -> String {
    let micros = duration.as_secs_f64() * 1e6;
    if micros < 1_000.0 {
        format!("{}us", round3(micros))
    } else if micros < 1_000_000.0 {
        format!("{}ms", round3(micros / 1e3))
    } else {
        format!("{}s", round3(micros / 1e6))
    }
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// What one step measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// The offered rate, in requests per second.
    pub rate: u32,
    /// Requests the step sent.
    pub requests: u64,
    /// Requests answered with a status below 500.
    pub successes: u64,
    /// Responses per second over the step.
    pub throughput: f64,
    /// Latency from intended send time to the end of the response, at each quantile
    /// reported (the objective's and the report's), for responses.
    pub latency: Vec<(Quantile, Duration)>,
}

impl Step {
    /// The success rate (1 when nothing was sent).
    #[must_use]
    pub fn success_rate(&self) -> f64 {
        if self.requests == 0 {
            return 1.0;
        }
        #[expect(clippy::cast_precision_loss, reason = "a ratio")]
        let rate = self.successes as f64 / self.requests as f64;
        rate
    }

    /// The latency at `quantile`, if the step measured it.
    #[must_use]
    pub fn quantile(&self, quantile: Quantile) -> Option<Duration> {
        self.latency
            .iter()
            .find(|(q, _)| *q == quantile)
            .map(|(_, d)| *d)
    }
}

/// The pause after a step before the next: half a second, or after a step that broke an
/// objective, as long as the step itself, so the queues it built (in the service, and in
/// proxies, after clients gave up on their requests) drain before the next step measures.
#[must_use]
pub fn cooldown(step: Duration, broke: bool) -> Duration {
    let pause = Duration::from_millis(500);
    if broke { pause.max(step) } else { pause }
}

/// Quantiles every step reports (the objective's are added).
const REPORTED: [Quantile; 4] = [Quantile::P50, Quantile::P90, Quantile::P99, Quantile::P999];

/// What a load run at `rate` measured, as a step of a search judged by `slo`: every request
/// scheduled counts, and only responses below 500 succeed (errors and timeouts fail).
#[must_use]
pub fn step_of(rate: u32, report: &crate::load::LoadReport, slo: &Slo) -> Step {
    let overall = report.overall();
    let mut quantiles: Vec<Quantile> = REPORTED.to_vec();
    quantiles.extend(slo.latency.iter().map(|(q, _)| *q));
    quantiles.sort();
    quantiles.dedup();
    let latency = quantiles
        .into_iter()
        .filter_map(|q| report.quantile(q.fraction()).map(|d| (q, d)))
        .collect();
    let answered = overall.statuses.values().sum::<u64>();
    #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
    let throughput = answered as f64 / report.elapsed.as_secs_f64().max(1e-9);
    Step {
        rate,
        requests: report.scheduled,
        successes: overall.successes(),
        throughput,
        latency,
    }
}

/// The objective a step broke, with what was measured.
#[derive(Clone, Debug, PartialEq)]
pub enum Breach {
    /// A latency quantile at or above its bound (or not measured: no responses).
    Latency {
        /// The quantile.
        quantile: Quantile,
        /// What the step measured (`None`: no response to measure).
        measured: Option<Duration>,
        /// The bound.
        bound: Duration,
    },
    /// Too few successes.
    Success {
        /// The step's success rate.
        measured: f64,
        /// The floor.
        floor: f64,
    },
}

impl fmt::Display for Breach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Latency {
                quantile,
                measured: Some(measured),
                bound,
            } => write!(
                f,
                "{quantile} {} >= {}",
                format_duration(*measured),
                format_duration(*bound)
            ),
            Self::Latency {
                quantile, bound, ..
            } => write!(
                f,
                "{quantile} unmeasured (no responses) vs {}",
                format_duration(*bound)
            ),
            Self::Success { measured, floor } => write!(
                f,
                "success {:.3}% < {}%",
                measured * 100.0,
                round3(floor * 100.0)
            ),
        }
    }
}

impl Slo {
    /// The first objective `step` breaks, or `Ok` if it met them all.
    ///
    /// # Errors
    ///
    /// The [`Breach`] of the first objective broken (success first, then latencies in
    /// quantile order).
    pub fn judge(&self, step: &Step) -> Result<(), Breach> {
        if let Some(floor) = self.success
            && step.success_rate() < floor
        {
            return Err(Breach::Success {
                measured: step.success_rate(),
                floor,
            });
        }
        for &(quantile, bound) in &self.latency {
            let measured = step.quantile(quantile);
            if measured.is_none_or(|m| m >= bound) {
                return Err(Breach::Latency {
                    quantile,
                    measured,
                    bound,
                });
            }
        }
        Ok(())
    }
}

/// How a search proceeds.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchConfig {
    /// The first rate tried.
    pub start: u32,
    /// The highest rate tried: a service that meets its objectives here has a red line of at
    /// least this much.
    pub max: u32,
    /// The factor rates grow by until a step breaks an objective (above 1).
    pub growth: f64,
    /// Bisection stops once the bracket is within this fraction of the rate that met the
    /// objectives (and always at a bracket of 1 request per second).
    pub precision: f64,
    /// The most steps the search runs, confirmation included.
    pub max_steps: usize,
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self {
            start: 100,
            max: 200_000,
            growth: 2.0,
            precision: 0.05,
            max_steps: 24,
        }
    }
}

/// A configuration that cannot run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("red-line search: {0}")]
pub struct InvalidSearch(&'static str);

impl SearchConfig {
    /// Checks the configuration.
    ///
    /// # Errors
    ///
    /// [`InvalidSearch`] saying what is wrong.
    pub fn validate(&self) -> Result<(), InvalidSearch> {
        if self.start == 0 || self.start > self.max {
            return Err(InvalidSearch(
                "the start rate must be between 1 and the maximum",
            ));
        }
        if self.growth.is_nan() || self.growth <= 1.0 {
            return Err(InvalidSearch("rates must grow by a factor above 1"));
        }
        if self.precision.is_nan() || self.precision <= 0.0 || self.precision >= 1.0 {
            return Err(InvalidSearch("the precision is a fraction between 0 and 1"));
        }
        if self.max_steps < 2 {
            return Err(InvalidSearch("a search needs at least 2 steps"));
        }
        Ok(())
    }
}

/// Why a step ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Raising the rate to find a step that breaks an objective.
    Grow,
    /// Lowering the rate after the first steps broke an objective.
    Descend,
    /// Narrowing the bracket around the knee.
    Bisect,
    /// Repeating the best rate to confirm it.
    Confirm,
}

impl Phase {
    /// A name for reports.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grow => "grow",
            Self::Descend => "descend",
            Self::Bisect => "bisect",
            Self::Confirm => "confirm",
        }
    }
}

/// A step the search ran, with its verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Judged {
    /// Why it ran.
    pub phase: Phase,
    /// What it measured.
    pub step: Step,
    /// The first objective it broke.
    pub verdict: Result<(), Breach>,
}

/// How a search ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Ending {
    /// The knee was found and the red line confirmed.
    Knee,
    /// Every step met the objectives up to the maximum rate (the red line is at least that).
    ReachedMax,
    /// Even the lowest rate tried broke an objective.
    NeverMet,
    /// The step budget ran out first (the red line is the best unconfirmed rate).
    StepLimit,
}

/// The search's result.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The highest rate that met every objective (and, unless the steps ran out, met them
    /// again when repeated).
    pub red_line: Option<u32>,
    /// The lowest rate that broke an objective, with the objective.
    pub broke_at: Option<(u32, Breach)>,
    /// Why the search stopped.
    pub ending: Ending,
}

/// A red-line search in progress. Ask [`Search::next`] for the rate to run, run it, and give
/// the result to [`Search::record`], until `next` returns `None`.
#[derive(Clone, Debug)]
pub struct Search {
    config: SearchConfig,
    slo: Slo,
    steps: Vec<Judged>,
    /// The highest rate that met the objectives and has not failed a repeat.
    good: Option<u32>,
    /// The lowest rate that broke an objective.
    bad: Option<(u32, Breach)>,
    confirmed: bool,
    done: Option<Ending>,
}

impl Search {
    /// A new search.
    ///
    /// # Errors
    ///
    /// [`InvalidSearch`] for a configuration that cannot run.
    pub fn new(config: SearchConfig, slo: Slo) -> Result<Self, InvalidSearch> {
        config.validate()?;
        Ok(Self {
            config,
            slo,
            steps: Vec::new(),
            good: None,
            bad: None,
            confirmed: false,
            done: None,
        })
    }

    /// The objectives steps are judged by.
    #[must_use]
    pub fn slo(&self) -> &Slo {
        &self.slo
    }

    /// The steps run so far, in order.
    #[must_use]
    pub fn steps(&self) -> &[Judged] {
        &self.steps
    }

    /// The next rate to run and why, or `None` once the search is over.
    #[must_use]
    pub fn next(&self) -> Option<(u32, Phase)> {
        if self.done.is_some() {
            return None;
        }
        let bad = self.bad.as_ref().map(|(rate, _)| *rate);
        Some(match (self.good, bad) {
            (None, None) => (self.config.start, Phase::Grow),
            (Some(good), None) => (self.grown(good), Phase::Grow),
            (None, Some(bad)) => (self.shrunk(bad), Phase::Descend),
            (Some(good), Some(bad)) if self.narrow(good, bad) => (good, Phase::Confirm),
            (Some(good), Some(bad)) => (good + (bad - good) / 2, Phase::Bisect),
        })
    }

    /// Records the step just run at the rate [`Search::next`] gave.
    pub fn record(&mut self, step: Step) {
        let Some((rate, phase)) = self.next() else {
            return;
        };
        let verdict = self.slo.judge(&step);
        let met = verdict.is_ok();
        self.steps.push(Judged {
            phase,
            step,
            verdict: verdict.clone(),
        });
        match verdict {
            Ok(()) => {
                self.good = Some(rate);
                if phase == Phase::Confirm {
                    self.confirmed = true;
                    self.done = Some(Ending::Knee);
                    return;
                }
            }
            Err(breach) => {
                if self.bad.as_ref().is_none_or(|(bad, _)| rate <= *bad) {
                    self.bad = Some((rate, breach));
                }
                // A rate that fails its repeat is no longer good: fall back to the best rate
                // below it that met the objectives.
                self.good = self
                    .steps
                    .iter()
                    .filter(|s| s.verdict.is_ok() && s.step.rate < rate)
                    .map(|s| s.step.rate)
                    .max();
            }
        }
        self.done = self.ending(rate, met);
    }

    fn ending(&self, rate: u32, met: bool) -> Option<Ending> {
        if met && self.bad.is_none() && rate >= self.config.max {
            return Some(Ending::ReachedMax);
        }
        if !met && self.good.is_none() && rate <= 1 {
            return Some(Ending::NeverMet);
        }
        if self.steps.len() >= self.config.max_steps {
            return Some(if self.good.is_some() {
                Ending::StepLimit
            } else {
                Ending::NeverMet
            });
        }
        None
    }

    /// The result, once the search is over.
    #[must_use]
    pub fn outcome(&self) -> Option<Outcome> {
        let ending = self.done.clone()?;
        Some(Outcome {
            red_line: self.good,
            broke_at: self.bad.clone(),
            ending,
        })
    }

    fn grown(&self, good: u32) -> u32 {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "clamped to the maximum rate"
        )]
        let grown = (f64::from(good) * self.config.growth)
            .ceil()
            .min(f64::from(self.config.max)) as u32;
        grown.max(good + 1).min(self.config.max)
    }

    fn shrunk(&self, bad: u32) -> u32 {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a rate below a u32"
        )]
        let shrunk = (f64::from(bad) / self.config.growth).floor() as u32;
        shrunk.clamp(1, bad.saturating_sub(1).max(1))
    }

    fn narrow(&self, good: u32, bad: u32) -> bool {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a fraction of a u32 rate"
        )]
        let tolerance = ((f64::from(good) * self.config.precision) as u32).max(1);
        bad.saturating_sub(good) <= tolerance
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A step at `rate` against a service whose p99 is 1 ms up to `capacity` and 1 s above it.
    fn step(rate: u32, capacity: u32) -> Step {
        let p99 = if rate <= capacity {
            Duration::from_millis(1)
        } else {
            Duration::from_secs(1)
        };
        Step {
            rate,
            requests: u64::from(rate),
            successes: u64::from(rate),
            throughput: f64::from(rate),
            latency: vec![
                (Quantile::P50, Duration::from_millis(1)),
                (Quantile::P99, p99),
            ],
        }
    }

    fn run(search: &mut Search, mut measure: impl FnMut(u32) -> Step) -> Outcome {
        while let Some((rate, _)) = search.next() {
            search.record(measure(rate));
        }
        search.outcome().expect("a finished search has an outcome")
    }

    #[test]
    fn objectives_parse_and_print_back() {
        let slo: Slo = "p99<50ms, success>99.9%,p99.9<1s,p50<250us"
            .parse()
            .unwrap();
        assert_eq!(
            slo.latency,
            vec![
                (Quantile::P50, Duration::from_micros(250)),
                (Quantile::P99, Duration::from_millis(50)),
                (Quantile::P999, Duration::from_secs(1)),
            ]
        );
        assert_eq!(slo.success, Some(0.999));
        assert_eq!(slo.to_string(), "p50<250us,p99<50ms,p99.9<1s,success>99.9%");
        assert_eq!(Slo::default().to_string(), "p99<100ms,success>99.9%");
        for bad in [
            "",
            "p99",
            "p99<fast",
            "p100<1s",
            "success>101%",
            "success>99",
            "latency<1s",
        ] {
            let err = bad.parse::<Slo>().unwrap_err().to_string();
            assert!(err.contains("expected e.g."), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_step_is_judged_on_success_first_then_each_latency() {
        let slo = Slo::default();
        let mut ok = step(100, 1_000);
        assert_eq!(slo.judge(&ok), Ok(()));
        ok.successes = 99;
        let breach = slo.judge(&ok).unwrap_err();
        assert_eq!(breach.to_string(), "success 99.000% < 99.9%");
        let slow = step(2_000, 1_000);
        assert_eq!(slo.judge(&slow).unwrap_err().to_string(), "p99 1s >= 100ms");
        let silent = Step {
            latency: Vec::new(),
            ..step(10, 100)
        };
        assert!(matches!(
            slo.judge(&silent),
            Err(Breach::Latency { measured: None, .. })
        ));
    }

    #[test]
    fn the_search_grows_bisects_and_confirms_the_knee() {
        let mut search = Search::new(SearchConfig::default(), Slo::default()).unwrap();
        let outcome = run(&mut search, |rate| step(rate, 3_000));
        assert_eq!(outcome.ending, Ending::Knee);
        let red_line = outcome.red_line.unwrap();
        assert!((2_850..=3_000).contains(&red_line), "{red_line}");
        let phases: Vec<_> = search.steps().iter().map(|s| s.phase.as_str()).collect();
        assert_eq!(&phases[..6], ["grow"; 6]);
        assert_eq!(phases.last(), Some(&"confirm"));
        assert!(phases[6..phases.len() - 1].iter().all(|p| *p == "bisect"));
    }

    #[test]
    fn a_failed_confirmation_lowers_the_bracket() {
        let mut search = Search::new(SearchConfig::default(), Slo::default()).unwrap();
        // The first time 2,900 or more is run it passes (a lucky step); after that the true
        // capacity, 2,000, shows.
        let mut lucky = true;
        let outcome = run(&mut search, |rate| {
            if rate >= 2_900 && lucky {
                lucky = false;
                return step(rate, u32::MAX);
            }
            step(rate, 2_000)
        });
        assert_eq!(outcome.ending, Ending::Knee);
        let red_line = outcome.red_line.unwrap();
        assert!((1_900..=2_000).contains(&red_line), "{red_line}");
    }

    #[test]
    fn searches_end_at_the_maximum_or_when_nothing_meets_the_objectives() {
        let config = SearchConfig {
            max: 1_000,
            ..SearchConfig::default()
        };
        let mut search = Search::new(config, Slo::default()).unwrap();
        let outcome = run(&mut search, |rate| step(rate, u32::MAX));
        assert_eq!(
            (outcome.ending, outcome.red_line),
            (Ending::ReachedMax, Some(1_000))
        );

        let mut search = Search::new(SearchConfig::default(), Slo::default()).unwrap();
        let outcome = run(&mut search, |rate| step(rate, 0));
        assert_eq!((outcome.ending, outcome.red_line), (Ending::NeverMet, None));

        let mut search = Search::new(SearchConfig::default(), Slo::default()).unwrap();
        let outcome = run(&mut search, |rate| step(rate, 30));
        assert_eq!(outcome.ending, Ending::Knee);
        assert!((28..=30).contains(&outcome.red_line.unwrap()));
    }

    #[test]
    fn bad_configurations_are_refused() {
        for config in [
            SearchConfig {
                start: 0,
                ..SearchConfig::default()
            },
            SearchConfig {
                growth: 1.0,
                ..SearchConfig::default()
            },
            SearchConfig {
                precision: 0.0,
                ..SearchConfig::default()
            },
            SearchConfig {
                max_steps: 1,
                ..SearchConfig::default()
            },
        ] {
            assert!(Search::new(config, Slo::default()).is_err());
        }
    }

    proptest! {
        /// Against any service with a capacity, the search ends within its step budget, and
        /// when it finds a knee, the red line met the objectives, is within the precision of
        /// the capacity and never above it.
        #[test]
        fn the_red_line_is_within_precision_of_any_capacity(
            capacity in 1u32..500_000,
            start in 1u32..5_000,
            growth in 1.2f64..4.0,
            precision in 0.01f64..0.2,
        ) {
            let config = SearchConfig { start, max: 200_000, growth, precision, max_steps: 200 };
            let mut search = Search::new(config.clone(), Slo::default()).unwrap();
            let outcome = run(&mut search, |rate| step(rate, capacity));
            prop_assert!(search.steps().len() <= config.max_steps);
            match outcome.ending {
                Ending::ReachedMax => prop_assert!(capacity >= config.max),
                Ending::Knee => {
                    let red_line = outcome.red_line.unwrap();
                    prop_assert!(red_line <= capacity);
                    let tolerance = (f64::from(red_line) * precision).max(1.0);
                    prop_assert!(f64::from(capacity - red_line) <= tolerance,
                        "red line {} for capacity {}", red_line, capacity);
                }
                Ending::NeverMet | Ending::StepLimit => {
                    // A service with a capacity meets its objectives below it, and 200 steps
                    // cover growth from 1 by 1.2x to the maximum and the bisection after.
                    prop_assert!(false, "{:?} with capacity {}", outcome, capacity);
                }
            }
        }
    }
}
