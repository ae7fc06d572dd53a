//! The Prometheus text reader (`conduit_proto::prom::parse`), on an exposition a proxy or the
//! controller serves.
//!
//! Never panics, and what it reads, written out again in the exposition format, reads back as
//! the same samples (values compared bit for bit, so `NaN` and `-0` count).
#![no_main]

use std::fmt::Write as _;

use conduit_proto::prom::{self, Sample};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let Ok(samples) = prom::parse(text) else {
        return;
    };
    let written = write(&samples);
    let again = prom::parse(&written).expect("a written exposition reads back");
    assert_eq!(again.len(), samples.len());
    for (a, b) in again.iter().zip(&samples) {
        assert_eq!((&a.name, &a.labels), (&b.name, &b.labels), "{written}");
        let same = a.value.to_bits() == b.value.to_bits() || (a.value.is_nan() && b.value.is_nan());
        assert!(same, "{} read back as {}", b.value, a.value);
    }
});

fn write(samples: &[Sample]) -> String {
    let mut out = String::from("# TYPE written untyped\n");
    for sample in samples {
        out.push_str(&sample.name);
        out.push('{');
        for (key, value) in &sample.labels {
            let value = value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = write!(out, "{key}=\"{value}\",");
        }
        out.push('}');
        let value = sample.value;
        if value.is_nan() {
            out.push_str(" NaN\n");
        } else if value == f64::INFINITY {
            out.push_str(" +Inf\n");
        } else if value == f64::NEG_INFINITY {
            out.push_str(" -Inf\n");
        } else {
            let _ = writeln!(out, " {value:?}");
        }
    }
    out
}
