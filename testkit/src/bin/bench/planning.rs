//! The `slow-extents` scenario: a source that answers block-status queries
//! slowly and for a little at a time (nbdkit's blocksize filter, `maxlen=4M`,
//! and delay filter, `delay-extents`), as a VMware source answers allocation
//! queries, on a large sparse disk. blockrepl plans while it copies, so its
//! whole run should take about the longer of planning and copying, not their
//! sum. To show that, each round times three runs in rotated order: blockrepl
//! and nbdcopy from the slow source, and blockrepl from the same disk without
//! the filters (the copy alone, its plan known in a moment); blockrepl's
//! `--json` says how long its planning took (`planning_seconds`).
//!
//! The target is sparse-random with the source's seed: it checks every byte
//! written to it, so a wrong byte fails the run.

use std::path::Path;

use testkit::harness::{Server, allocation_map, data_bytes};

use crate::pair::{last_chars, shell, strings, strs};
use crate::run::{self, OWN_SESSION, Stop, process_cpu, status_code, system_busy, timed};
use crate::scenario::{
    Bench, DetailRow, Figures, MIB, Outcome, ResultRow, Scenario, delta, median, others, rotated, round_name,
};
use crate::settings::human;

pub struct SlowExtents;

/// The runs of a round: which tool, from which source.
const RUNS: [&str; 3] = ["blockrepl", "nbdcopy", "blockrepl, no delay (copy alone)"];

impl Scenario for SlowExtents {
    fn name(&self) -> &'static str {
        "slow-extents"
    }

    fn run(&self, bench: &Bench, dir: &Path) -> Result<Box<dyn Outcome>, Stop> {
        let opt = &bench.opt;
        let disk = strings(&[
            "sparse-random",
            &format!("size={}", human(opt.extents_size)),
            "percent=50",
            "runlength=1048576",
            &format!("seed={}", opt.seed),
        ]);
        let mut slow_args = strings(&["--filter=blocksize", "--filter=delay"]);
        slow_args.extend(disk.iter().cloned());
        slow_args.extend(strings(&["maxdata=4M", "maxlen=4M", &format!("delay-extents={}", opt.extents_delay)]));
        let mut slow = Server::nbdkit_under(dir, "slow", &strs(&slow_args), OWN_SESSION);
        let mut fast = Server::nbdkit_under(dir, "fast", &strs(&disk), OWN_SESSION);
        let mut dst = Server::nbdkit_under(dir, "target", &strs(&disk), OWN_SESSION);
        let nbytes = data_bytes(&allocation_map(&fast.uri()));
        println!(
            "\n## slow-extents: source `nbdkit {}`, target `nbdkit {}`; {nbytes} data bytes ({:.0} MiB); \
             the copy alone: source `nbdkit {}`",
            shell(&slow_args),
            shell(&disk),
            nbytes as f64 / MIB,
            shell(&disk)
        );
        let (Some(ours), Some(nbdcopy)) = (bench.tools.first(), bench.tools.last()) else {
            return Err(Stop::failed("slow-extents: no tools"));
        };
        let mut runs: Vec<Vec<Figures>> = vec![Vec::new(); RUNS.len()];
        let mut planning: Vec<Option<f64>> = Vec::new();
        for round in 0..opt.warmup + opt.runs {
            let what = round_name(opt, round);
            for i in rotated(&[0, 1, 2], round) {
                let (tool, src) = match i {
                    0 => (ours, &slow),
                    1 => (nbdcopy, &slow),
                    _ => (ours, &fast),
                };
                let cmd = tool.argv(&src.uri(), &dst.uri(), &[]);
                let cpu = || (src.pid().and_then(process_cpu), dst.pid().and_then(process_cpu), system_busy());
                let before = cpu();
                let t = timed(std::slice::from_ref(&cmd), dir, &format!("run{i}-{round}"))?;
                let after = cpu();
                if let Some(f) = t.first_failure() {
                    return Err(Stop::failed(format!(
                        "slow-extents: {} {what} failed (exit status {}) after {:.2} s\n  command: {}\n  stderr: {}",
                        RUNS[i],
                        status_code(&t.statuses[f]),
                        t.wall,
                        shell(&cmd),
                        last_chars(t.stderrs[0].trim(), 2000)
                    )));
                }
                if !(slow.alive() && fast.alive() && dst.alive()) {
                    return Err(Stop::failed(format!("slow-extents: a server died during {} {what}", RUNS[i])));
                }
                let servers_cpu = delta(before.0, after.0).zip(delta(before.1, after.1)).map(|(a, b)| a + b);
                let other = delta(before.2, after.2).zip(servers_cpu).map(|(b, s)| others(b, s + t.cpu, t.wall));
                let note = if tool.json {
                    bench.check_json("slow-extents", &t.stdouts[0], nbytes, t.wall)
                } else {
                    String::new()
                };
                let plan = (i == 0).then(|| planning_seconds(&t.stdouts[0])).flatten();
                let f =
                    Figures { wall: t.wall, bps: nbytes as f64 / t.wall, cpu: Some(t.cpu), servers_cpu, others: other };
                println!(
                    "  {what:9} {:<34} {:7.3} s {:9.1} MiB/s{}{note}",
                    RUNS[i],
                    f.wall,
                    f.bps / MIB,
                    plan.map_or(String::new(), |p| format!("  planning {p:.2} s"))
                );
                if round >= opt.warmup {
                    runs[i].push(f);
                    if i == 0 {
                        planning.push(plan);
                    }
                }
                run::check()?;
            }
        }
        slow.stop();
        fast.stop();
        dst.stop();
        Ok(Box::new(SlowOutcome { nbytes, runs, planning }))
    }
}

/// `planning_seconds` of blockrepl's `--json` line.
fn planning_seconds(stdout: &str) -> Option<f64> {
    let line = stdout.trim().lines().last()?;
    serde_json::from_str::<serde_json::Value>(line).ok()?["planning_seconds"].as_f64()
}

struct SlowOutcome {
    nbytes: u64,
    /// Per entry of [`RUNS`], the timed runs.
    runs: Vec<Vec<Figures>>,
    /// blockrepl's planning seconds in its timed runs from the slow source.
    planning: Vec<Option<f64>>,
}

impl SlowOutcome {
    fn wall(&self, i: usize) -> f64 {
        median(self.runs[i].iter().map(|r| Some(r.wall)))
    }
}

impl Outcome for SlowOutcome {
    fn results(&self) -> Vec<ResultRow> {
        let mibs = |i: usize| median(self.runs[i].iter().map(|r| Some(r.bps))) / MIB;
        vec![ResultRow { label: "slow-extents".to_string(), blockrepl: mibs(0), nbdcopy: mibs(1) }]
    }

    fn remarks(&self) -> String {
        let (total, nbdcopy, copy) = (self.wall(0), self.wall(1), self.wall(2));
        let plan = median(self.planning.iter().copied());
        format!(
            "\nslow-extents (medians): blockrepl {total:.2} s in all, of which planning {} s; the copy alone \
             (the same disk without the delay) {copy:.2} s. max(planning, copy) = {:.2} s, their sum = {:.2} s; \
             nbdcopy {nbdcopy:.2} s.\n",
            format_args!("{plan:.2}"),
            plan.max(copy),
            plan + copy
        )
    }

    fn details(&self) -> Vec<DetailRow> {
        RUNS.iter()
            .zip(&self.runs)
            .map(|(tool, runs)| DetailRow { tool: tool.to_string(), data_bytes: self.nbytes, runs: runs.clone() })
            .collect()
    }
}
