//! The soak's per-second memory samples, written as CSV and SVG, and the growth bound they
//! are judged by.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::loads::LoadStats;
use super::{GROWTH_FLOOR_BYTES, GROWTH_PERCENT, SESSION_IDLE_TIMEOUT_SECS, WINDOW};
use crate::project::Result;
use crate::smoke;

/// One per-second reading.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Sample {
    second: u64,
    rss: Option<u64>,
    heap: Option<u64>,
    resident: Option<u64>,
    ok: u64,
    failed: u64,
}

impl Sample {
    /// Second `second` of the run: the daemon's VmRSS now, the heap and resident gauges read
    /// from `/metrics`, and the load rounds so far.
    pub(super) fn read(
        second: u64,
        pid: u32,
        (heap, resident): (Option<u64>, Option<u64>),
        loads: &[Arc<LoadStats>],
    ) -> Sample {
        Sample {
            second,
            rss: smoke::vm_rss_kib(pid).map(|kib| kib * 1024),
            heap,
            resident,
            ok: loads
                .iter()
                .map(|stats| stats.ok.load(Ordering::Relaxed))
                .sum(),
            failed: loads
                .iter()
                .map(|stats| stats.failed.load(Ordering::Relaxed))
                .sum(),
        }
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "t={}s rss={} heap={} resident={} ok={} failed={}",
            self.second,
            mib(self.rss),
            mib(self.heap),
            mib(self.resident),
            self.ok,
            self.failed
        )
    }
}

/// The heap and resident gauges of the daemon's `/metrics`; `None` when it did not answer.
pub(super) fn gauges(address: SocketAddr) -> Option<(Option<u64>, Option<u64>)> {
    let response = smoke::get(address, "/metrics").ok()?;
    let text = String::from_utf8_lossy(&response.body);
    let gauge = |name| smoke::metric_value(&text, name).map(|value| value as u64);
    Some((
        gauge("blufio_memory_heap_bytes"),
        gauge("blufio_memory_resident_bytes"),
    ))
}

pub(super) fn mib(bytes: Option<u64>) -> String {
    match bytes {
        Some(bytes) => format!("{:.1}MiB", bytes as f64 / 1048576.0),
        None => "-".to_owned(),
    }
}

/// Samples in the warm-up: a fifth of the run, at most two minutes, and at least until the
/// first sessions left to idle out have been evicted (the idle timeout plus 10 s), so the
/// population of idle sessions has reached its steady state before the bound's reference is
/// taken. A short run still keeps half of its samples after warm-up, and every warm-up holds at
/// least one window.
pub(super) fn warmup_samples(duration: Duration) -> usize {
    let seconds = duration.as_secs();
    let warmup = (seconds / 5).clamp(SESSION_IDLE_TIMEOUT_SECS + 10, 120);
    (warmup.min(seconds / 2) as usize).max(WINDOW)
}

pub(super) fn csv(samples: &[Sample]) -> String {
    let mut text =
        String::from("second,rss_bytes,heap_bytes,resident_bytes,requests_ok,requests_failed\n");
    let field = |value: Option<u64>| value.map(|value| value.to_string()).unwrap_or_default();
    for sample in samples {
        // Writing to a String cannot fail.
        let _ = writeln!(
            text,
            "{},{},{},{},{},{}",
            sample.second,
            field(sample.rss),
            field(sample.heap),
            field(sample.resident),
            sample.ok,
            sample.failed
        );
    }
    text
}

/// The series a soak plots and bounds, with the colour of its line.
/// Reads one series' value from a sample.
pub(super) type Reading = fn(&Sample) -> Option<u64>;

pub(super) const SERIES: [(&str, Reading, &str); 3] = [
    ("rss", |sample| sample.rss, "#d62728"),
    ("heap", |sample| sample.heap, "#1f77b4"),
    ("resident", |sample| sample.resident, "#2ca02c"),
];

pub(super) fn svg(samples: &[Sample], warmup: usize) -> String {
    const WIDTH: f64 = 800.0;
    const HEIGHT: f64 = 400.0;
    const MARGIN: f64 = 50.0;
    let last_second = samples.last().map_or(1, |sample| sample.second.max(1)) as f64;
    let top = SERIES
        .iter()
        .flat_map(|(_, value, _)| samples.iter().filter_map(value))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;
    let x = |second: u64| MARGIN + second as f64 / last_second * (WIDTH - 2.0 * MARGIN);
    let y = |bytes: u64| HEIGHT - MARGIN - bytes as f64 / top * (HEIGHT - 2.0 * MARGIN);
    let mut text = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{MARGIN}\" y=\"20\">blufio soak: memory over {last_second} s (max {:.1} MiB)</text>\n\
         <line x1=\"{MARGIN}\" y1=\"{bottom}\" x2=\"{right}\" y2=\"{bottom}\" stroke=\"black\"/>\n\
         <line x1=\"{MARGIN}\" y1=\"{MARGIN}\" x2=\"{MARGIN}\" y2=\"{bottom}\" stroke=\"black\"/>\n",
        top / 1.1 / 1048576.0,
        bottom = HEIGHT - MARGIN,
        right = WIDTH - MARGIN,
    );
    if let Some(sample) = samples.get(warmup.saturating_sub(1)) {
        let _ = writeln!(
            text,
            "<line x1=\"{0:.1}\" y1=\"{MARGIN}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"gray\" \
             stroke-dasharray=\"4\"/><text x=\"{0:.1}\" y=\"{2}\">warm-up</text>",
            x(sample.second),
            HEIGHT - MARGIN,
            MARGIN - 5.0
        );
    }
    for (index, (name, value, colour)) in SERIES.iter().enumerate() {
        let points: Vec<String> = samples
            .iter()
            .filter_map(|sample| Some(format!("{:.1},{:.1}", x(sample.second), y(value(sample)?))))
            .collect();
        let _ = writeln!(
            text,
            "<polyline fill=\"none\" stroke=\"{colour}\" points=\"{}\"/>\n\
             <text x=\"{}\" y=\"{}\" fill=\"{colour}\">{name}</text>",
            points.join(" "),
            WIDTH - MARGIN - 60.0,
            MARGIN + 15.0 * index as f64
        );
    }
    let _ = writeln!(
        text,
        "<text x=\"{MARGIN}\" y=\"{}\">0 s</text><text x=\"{}\" y=\"{}\">{last_second} s</text>\n</svg>",
        HEIGHT - MARGIN + 15.0,
        WIDTH - MARGIN - 30.0,
        HEIGHT - MARGIN + 15.0
    );
    text
}

pub(super) fn median(mut values: Vec<u64>) -> Option<u64> {
    values.sort_unstable();
    values.get(values.len() / 2).copied()
}

/// Checks the growth bound for RSS and heap; returns the start/peak/end report.
pub(super) fn check_bound(samples: &[Sample], warmup: usize) -> Result<String> {
    if samples.len() < warmup + WINDOW {
        return Err(format!(
            "the soak took {} samples, fewer than warm-up ({warmup}) plus {WINDOW}",
            samples.len()
        )
        .into());
    }
    let mut report = String::new();
    let mut failures = Vec::new();
    for (name, value, _) in SERIES {
        let all: Vec<u64> = samples.iter().filter_map(value).collect();
        let (Some(start), Some(peak)) = (all.first(), all.iter().max()) else {
            continue;
        };
        let window = |range: &[Sample]| median(range.iter().filter_map(value).collect());
        let after_warmup = window(&samples[warmup - WINDOW..warmup]);
        let end = window(&samples[samples.len() - WINDOW..]);
        let (Some(after_warmup), Some(end)) = (after_warmup, end) else {
            continue;
        };
        let bound = after_warmup + (after_warmup * GROWTH_PERCENT / 100).max(GROWTH_FLOOR_BYTES);
        let checked = name != "resident";
        let _ = writeln!(
            report,
            "soak: {name:8} start {} after warm-up {} peak {} end {}{}",
            mib(Some(*start)),
            mib(Some(after_warmup)),
            mib(Some(*peak)),
            mib(Some(end)),
            if checked {
                format!(" (bound {})", mib(Some(bound)))
            } else {
                String::new()
            }
        );
        if checked && end > bound {
            failures.push(format!(
                "{name} grew from {} after warm-up to {} at the end, past the bound {}",
                mib(Some(after_warmup)),
                mib(Some(end)),
                mib(Some(bound))
            ));
        }
    }
    if failures.is_empty() {
        Ok(report.trim_end().to_owned())
    } else {
        Err(format!("{report}{}", failures.join("; ")).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(rss: impl Fn(u64) -> u64, count: u64) -> Vec<Sample> {
        (1..=count)
            .map(|second| Sample {
                second,
                rss: Some(rss(second)),
                heap: Some(4 << 20),
                resident: None,
                ok: second * 10,
                failed: 0,
            })
            .collect()
    }

    #[test]
    fn flat_memory_passes_the_bound() {
        let flat = samples(|second| (20 << 20) + second % 3 * 4096, 100);
        let report = check_bound(&flat, 20).unwrap();
        assert!(report.contains("rss      start 20.0MiB"), "{report}");
        assert!(report.contains("bound 28.0MiB"), "{report}");
    }

    #[test]
    fn growth_past_the_floor_and_percentage_fails() {
        // 20 MiB after warm-up; the bound is 20 + max(8, 5) = 28 MiB. It ends near 30 MiB.
        let leaking = samples(
            |second| (20 << 20) + second.saturating_sub(20) * (128 << 10),
            100,
        );
        let error = check_bound(&leaking, 20).unwrap_err().to_string();
        assert!(error.contains("rss grew from"), "{error}");
        // The same growth on 100 MiB stays within 25 % and passes.
        let large = samples(
            |second| (100 << 20) + second.saturating_sub(20) * (128 << 10),
            100,
        );
        assert!(check_bound(&large, 20).is_ok());
    }

    #[test]
    fn warmup_outlasts_the_session_idle_timeout_and_leaves_half_a_short_run() {
        // One minute: 30 s of warm-up (past the first idle evictions), 30 s measured.
        assert_eq!(warmup_samples(Duration::from_secs(60)), 30);
        // Long runs: a fifth, at most two minutes.
        assert_eq!(warmup_samples(Duration::from_secs(5 * 60)), 60);
        assert_eq!(warmup_samples(Duration::from_secs(30 * 60)), 120);
        // Short runs keep half their samples after warm-up, and at least one window.
        assert_eq!(warmup_samples(Duration::from_secs(40)), 20);
        assert_eq!(warmup_samples(Duration::from_secs(5)), WINDOW);
    }

    #[test]
    fn a_run_shorter_than_warmup_fails() {
        assert!(check_bound(&samples(|_| 1, 15), 10).is_err());
    }

    #[test]
    fn csv_has_a_row_per_sample_and_blanks_for_missing_values() {
        let text = csv(&samples(|second| second * 1024, 3));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[0],
            "second,rss_bytes,heap_bytes,resident_bytes,requests_ok,requests_failed"
        );
        assert_eq!(lines[2], "2,2048,4194304,,20,0");
    }

    #[test]
    fn svg_draws_one_polyline_point_per_present_value() {
        let text = svg(&samples(|second| second << 20, 30), 10);
        assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
        let polylines: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("<polyline"))
            .collect();
        // rss and heap have 30 points each; resident has none.
        assert_eq!(polylines.len(), 3);
        assert_eq!(polylines[0].matches(',').count(), 30);
        assert_eq!(polylines[2].matches(',').count(), 0);
        assert!(text.contains("warm-up"));
    }
}
