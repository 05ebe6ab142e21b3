//! What a scenario is, what it gives back for the report, and what all scenarios
//! share: the settings, the tools compared, the figures of a run, and the list of
//! odd things noticed on the way.
//!
//! A new scenario is a type that implements [`Scenario`] (its rounds) and an
//! [`Outcome`] (its rows in the report), listed in `main.rs`; one more pair of
//! servers for the same comparison is one more entry in `pair.rs`.

use std::cell::RefCell;
use std::path::Path;

use serde_json::Value;

use crate::run::Stop;
use crate::settings::Settings;

pub const MIB: f64 = 1024.0 * 1024.0;

/// One benchmark scenario.
pub trait Scenario {
    /// Its name on the command line and in the tables.
    fn name(&self) -> &'static str;

    /// The programs it needs besides nbdkit, nbdcopy and nbdinfo.
    fn needs(&self) -> Vec<&'static str> {
        Vec::new()
    }

    /// Starts its servers in `dir` (its own directory), runs every round, printing a
    /// line per run, and stops everything it started.
    fn run(&self, bench: &Bench, dir: &Path) -> Result<Box<dyn Outcome>, Stop>;
}

/// A finished scenario, as rows and paragraphs of the report.
pub trait Outcome {
    /// Its rows of the results table.
    fn results(&self) -> Vec<ResultRow>;

    /// Paragraphs after the results table (empty, or starting with a blank line).
    fn remarks(&self) -> String {
        String::new()
    }

    /// Its rows of the details table.
    fn details(&self) -> Vec<DetailRow>;

    /// Text after the details table (empty, or starting with a blank line).
    fn more_details(&self) -> String {
        String::new()
    }
}

/// A row of the results table: medians in MiB/s.
pub struct ResultRow {
    pub label: String,
    pub blockrepl: f64,
    pub nbdcopy: f64,
}

/// A row of the details table: one tool's timed runs.
pub struct DetailRow {
    pub tool: String,
    pub data_bytes: u64,
    pub runs: Vec<Figures>,
}

/// The figures of one timed run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    /// Wall-clock seconds.
    pub wall: f64,
    /// Source data bytes per wall-clock second.
    pub bps: f64,
    /// The copier's user and system CPU seconds.
    pub cpu: Option<f64>,
    /// CPU seconds of the NBD servers during the run.
    pub servers_cpu: Option<f64>,
    /// CPUs (a fraction) that everything else on the machine used during the run.
    pub others: Option<f64>,
}

/// One tool compared in the pair scenarios: `PROGRAM HEAD... FLAGS... EXTRA... SRC DST`.
pub struct Tool {
    pub label: String,
    pub program: String,
    /// Its fixed arguments (`copy --json`, `--flush`).
    pub head: Vec<String>,
    /// The arguments of `--blockrepl-args` or `--nbdcopy-args`.
    pub extra: Vec<String>,
    /// Whether it prints blockrepl's `--json` summary, which is then checked.
    pub json: bool,
}

impl Tool {
    pub fn argv(&self, source: &str, target: &str, flags: &[String]) -> Vec<String> {
        let mut v = vec![self.program.clone()];
        v.extend(self.head.iter().chain(flags).chain(&self.extra).cloned());
        v.extend([source.to_string(), target.to_string()]);
        v
    }
}

/// What every scenario shares.
pub struct Bench {
    pub opt: Settings,
    /// The `blockrepl` binary.
    pub blockrepl: String,
    /// The tools of the pair scenarios: blockrepl (one per `--blockrepl-args`), then
    /// nbdcopy, the baseline, last.
    pub tools: Vec<Tool>,
    /// `--nbdcopy-args`.
    pub nbdcopy_extra: Vec<String>,
    /// Odd things noticed, each once, listed at the end of the report.
    odd: RefCell<Vec<String>>,
}

impl Bench {
    pub fn new(opt: Settings, blockrepl: String, tools: Vec<Tool>, nbdcopy_extra: Vec<String>) -> Bench {
        Bench { opt, blockrepl, tools, nbdcopy_extra, odd: RefCell::new(Vec::new()) }
    }

    /// Notes an odd thing (once).
    pub fn odd(&self, msg: impl Into<String>) {
        let msg = msg.into();
        let mut odd = self.odd.borrow_mut();
        if !odd.contains(&msg) {
            odd.push(msg);
        }
    }

    pub fn odd_things(&self) -> Vec<String> {
        self.odd.borrow().clone()
    }

    /// The width of the widest tool label, to align the run lines.
    pub fn label_width(&self) -> usize {
        self.tools.iter().map(|t| t.label.chars().count()).max().unwrap_or(0)
    }

    /// Checks blockrepl's `--json` line against the source's data bytes and the wall
    /// time measured outside; returns a note for the run line (empty when all adds
    /// up) and notes what does not add up as odd.
    pub fn check_json(&self, name: &str, stdout: &str, data_bytes: u64, wall: f64) -> String {
        let line = stdout.trim().lines().last().unwrap_or("");
        let Ok(j) = serde_json::from_str::<Value>(line) else {
            let head: String = stdout.trim().chars().take(200).collect();
            self.odd(format!("{name}: blockrepl --json printed no JSON: {head:?}"));
            return "  [no JSON]".to_string();
        };
        let mut bad = Vec::new();
        let planned = j["planned_bytes"].as_u64();
        if planned != Some(data_bytes) {
            bad.push(format!("planned_bytes {} != source data bytes {data_bytes}", j["planned_bytes"]));
        }
        if j["bytes_transferred"].as_u64() != planned {
            bad.push(format!("bytes_transferred {} != planned_bytes {}", j["bytes_transferred"], j["planned_bytes"]));
        }
        let secs = j["seconds"].as_f64().unwrap_or(0.0);
        if secs <= 0.0 || secs > wall * 1.01 + 0.01 {
            bad.push(format!("seconds {secs} vs measured wall {wall:.3}"));
        } else if let Some(planned) = planned.filter(|&p| p > 0 && j["verified"].is_null()) {
            // With --verify, seconds include the verify pass and throughput_bps does not.
            let expect = planned as f64 / secs;
            let tp = j["throughput_bps"].as_f64().unwrap_or(0.0);
            if (tp - expect).abs() > 0.05 * expect {
                bad.push(format!("throughput_bps {tp} but planned_bytes/seconds = {expect:.0}"));
            }
        }
        if j["retries"].as_u64().unwrap_or(0) > 0 {
            bad.push(format!("retries {}", j["retries"]));
        }
        for b in &bad {
            self.odd(format!("{name}: blockrepl --json: {b}"));
        }
        if bad.is_empty() { String::new() } else { format!("  [json: {}]", bad.join("; ")) }
    }
}

/// `what` of a round: "warm-up" or "run 2/5".
pub fn round_name(opt: &Settings, round: u32) -> String {
    if round < opt.warmup { "warm-up".to_string() } else { format!("run {}/{}", round - opt.warmup + 1, opt.runs) }
}

/// The order of the tools in round `round`: rotated by one each round, so that
/// none always goes first.
pub fn rotated<T: Copy>(items: &[T], round: u32) -> Vec<T> {
    let k = round as usize % items.len().max(1);
    items[k..].iter().chain(&items[..k]).copied().collect()
}

/// The median of the values present; NaN when there are none.
pub fn median(xs: impl IntoIterator<Item = Option<f64>>) -> f64 {
    let mut v: Vec<f64> = xs.into_iter().flatten().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// `+1.2 % (min–max −0.5 … +3.0 %)`: the median and range of fractions.
pub fn percent_band(xs: &[Option<f64>]) -> String {
    let v: Vec<f64> = xs.iter().flatten().copied().collect();
    if v.is_empty() {
        return "n/a".to_string();
    }
    let (min, max) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    format!(
        "{:+.1} % (min–max {:+.1} … {:+.1} %)",
        median(v.iter().map(|&x| Some(x))) * 100.0,
        min * 100.0,
        max * 100.0
    )
}

/// `min–max` of values.
pub fn range(xs: &[f64]) -> (f64, f64) {
    xs.iter().fold((f64::NAN, f64::NAN), |(a, b), &x| (a.min(x), b.max(x)))
}

/// The CPUs that everything else used during a run of `wall` seconds: the machine's
/// busy CPU seconds less what we account for, as a fraction of one CPU.
pub fn others(busy: f64, accounted: f64, wall: f64) -> f64 {
    (busy - accounted).max(0.0) / wall
}

/// `later - earlier` when both are known.
pub fn delta(earlier: Option<f64>, later: Option<f64>) -> Option<f64> {
    Some(later? - earlier?)
}

/// A number for a run line: NaN when unknown.
pub fn or_nan(x: Option<f64>) -> f64 {
    x.unwrap_or(f64::NAN)
}
