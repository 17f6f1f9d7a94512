//! Rendering: the stdout table, the CSV and the SVG plot. Pure functions of the report, with
//! fixed float formatting, so the same seeds give the same bytes.

use std::fmt::Write as _;

use crate::net::{N_REGIONS, REGIONS};
use crate::runner::{Mode, Row};
use crate::scenario::{END_US, LIMIT, TRAFFIC_START_US, WINDOW_US};
use crate::world::Admission;

/// The CSV header (the columns, in its order).
pub const CSV_HEADER: &str = "scenario,mode,seeds,limit,offered,admitted,over_admission_pct,\
false_reject_pct,convergence_ms,added_latency_ms,gossip_bytes_per_key";

fn convergence(c: Option<Option<f64>>, none: &str) -> String {
    match c {
        None => none.to_owned(),
        Some(None) => "never".to_owned(),
        Some(Some(ms)) => format!("{ms:.1}"),
    }
}

/// The CSV, one row per scenario × mode.
pub fn csv(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(CSV_HEADER);
    s.push('\n');
    for r in rows {
        let _ = writeln!(
            s,
            "{},{},{},{},{:.1},{:.1},{:.2},{:.2},{},{:.1},{:.1}",
            r.scenario,
            r.mode.name(),
            r.seeds,
            r.limit,
            r.offered,
            r.admitted,
            r.over_admission_pct,
            r.false_reject_pct,
            convergence(r.convergence_ms, ""),
            r.added_latency_ms,
            r.gossip_bytes_per_key,
        );
    }
    s
}

/// The human table.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<24} {:<8} {:>5} {:>5} {:>8} {:>8} {:>7} {:>8} {:>8} {:>7} {:>9}",
        "scenario",
        "mode",
        "seeds",
        "limit",
        "offered",
        "admitted",
        "over%",
        "falsrej%",
        "conv_ms",
        "+lat_ms",
        "B/key/s"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<24} {:<8} {:>5} {:>5} {:>8.1} {:>8.1} {:>7.2} {:>8.2} {:>8} {:>7.1} {:>9.1}",
            r.scenario,
            r.mode.name(),
            r.seeds,
            r.limit,
            r.offered,
            r.admitted,
            r.over_admission_pct,
            r.false_reject_pct,
            convergence(r.convergence_ms, "-"),
            r.added_latency_ms,
            r.gossip_bytes_per_key,
        );
    }
    s
}

/// Admitted in the trailing window at each sample instant, per region and in total.
fn trailing(admissions: &[Admission], samples: &[u64]) -> Vec<[u64; N_REGIONS + 1]> {
    let mut times: Vec<(u64, usize)> = admissions.iter().map(|a| (a.at_us, a.region)).collect();
    times.sort_unstable();
    let mut out = Vec::with_capacity(samples.len());
    let (mut lo, mut hi) = (0usize, 0usize);
    let mut counts = [0u64; N_REGIONS + 1];
    for &t in samples {
        while hi < times.len() && times[hi].0 <= t {
            counts[times[hi].1.min(N_REGIONS - 1)] += 1;
            counts[N_REGIONS] += 1;
            hi += 1;
        }
        while lo < hi && times[lo].0 + WINDOW_US < t {
            counts[times[lo].1.min(N_REGIONS - 1)] -= 1;
            counts[N_REGIONS] -= 1;
            lo += 1;
        }
        out.push(counts);
    }
    out
}

const COLORS: [&str; N_REGIONS + 1] = ["#1f77b4", "#2ca02c", "#ff7f0e", "#222222"];

/// An SVG with one panel per mode: admitted in the trailing window per region and in total,
/// against the limit, over the traffic phase.
pub fn svg(scenario: &str, seed: u64, plot: &[(Mode, Vec<Admission>)]) -> String {
    let (w, panel_h, margin_l, margin_t, gap) = (900.0, 220.0, 60.0, 40.0, 50.0);
    let plot_w = w - margin_l - 20.0;
    let height = margin_t + plot.len() as f64 * (panel_h + gap) + 10.0;
    let step = 100_000u64;
    let samples: Vec<u64> = (TRAFFIC_START_US / step..=END_US / step)
        .map(|i| i * step)
        .collect();
    let span = (END_US - TRAFFIC_START_US) as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(
        s,
        "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{margin_l}\" y=\"20\" \
         font-size=\"15\">{scenario} (seed {seed}): admitted in the trailing {}s window vs \
         limit {LIMIT}</text>",
        WINDOW_US / 1_000_000
    );
    for (p, (mode, admissions)) in plot.iter().enumerate() {
        let series = trailing(admissions, &samples);
        let top = margin_t + p as f64 * (panel_h + gap);
        let ymax = series
            .iter()
            .map(|c| c[N_REGIONS])
            .max()
            .unwrap_or(0)
            .max(LIMIT)
            .saturating_mul(11)
            / 10;
        let ymax = ymax.max(1) as f64;
        let x = |t: u64| margin_l + (t - TRAFFIC_START_US) as f64 / span * plot_w;
        let y = |v: u64| top + panel_h - v as f64 / ymax * panel_h;
        let _ = writeln!(
            s,
            "<rect x=\"{margin_l}\" y=\"{top}\" width=\"{plot_w}\" height=\"{panel_h}\" \
             fill=\"none\" stroke=\"#999\"/>\n<text x=\"{margin_l}\" y=\"{:.1}\" \
             font-weight=\"bold\">{}</text>",
            top - 6.0,
            mode.name()
        );
        for v in [0, LIMIT / 2, LIMIT, ymax as u64] {
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v}</text>",
                margin_l - 6.0,
                y(v) + 4.0
            );
        }
        let _ = writeln!(
            s,
            "<line x1=\"{margin_l}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"red\" \
             stroke-dasharray=\"6,4\"/>",
            y(LIMIT),
            margin_l + plot_w,
            y(LIMIT)
        );
        for sec in (0..=(END_US - TRAFFIC_START_US) / 1_000_000).step_by(5) {
            let t = TRAFFIC_START_US + sec * 1_000_000;
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{sec}s</text>",
                x(t),
                top + panel_h + 14.0
            );
        }
        for (line, color) in COLORS.iter().enumerate() {
            let mut pts = String::new();
            for (i, c) in series.iter().enumerate() {
                let _ = write!(pts, "{:.1},{:.1} ", x(samples[i]), y(c[line]));
            }
            let width = if line == N_REGIONS { 2.0 } else { 1.2 };
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"{width}\" \
                 points=\"{}\"/>",
                pts.trim_end()
            );
        }
    }
    let legend_y = height - 8.0;
    let names = REGIONS.iter().copied().chain(["total"]);
    for (i, (name, color)) in names.zip(COLORS).enumerate() {
        let lx = margin_l + i as f64 * 110.0;
        let _ = writeln!(
            s,
            "<rect x=\"{lx}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{color}\"/>\
             <text x=\"{:.1}\" y=\"{legend_y}\">{name}</text>",
            legend_y - 10.0,
            lx + 16.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{legend_y}\" fill=\"red\">- - limit</text>\n</svg>",
        margin_l + 4.0 * 110.0
    );
    s
}
