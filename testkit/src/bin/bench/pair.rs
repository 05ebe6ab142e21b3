//! The pair scenarios: one source and one target nbdkit server, and every tool
//! (`blockrepl copy`, once per `--blockrepl-args`, and `nbdcopy --flush`) copying
//! between the SAME two servers in turn, the order rotated every round.
//!
//! Throughput = the source's allocated data bytes (from its `base:allocation` map,
//! identical for every tool) / wall-clock seconds of the whole process.
//!
//! A new comparison on other servers (a WAN link: nbdkit's delay and rate filters
//! on the source) is one more [`Pair`] in [`pairs`].

use std::path::Path;

use testkit::harness::{Server, allocation_map, data_bytes};

use crate::run::{self, OWN_SESSION, Stop, process_cpu, status_code, system_busy, timed};
use crate::scenario::{
    Bench, DetailRow, Figures, MIB, Outcome, ResultRow, Scenario, delta, median, or_nan, others, rotated, round_name,
};
use crate::settings::{Settings, human};

/// The servers of a pair scenario, and flags given to every tool.
pub struct Servers {
    /// nbdkit's arguments (plugin, parameters, filters) for the source.
    pub source: Vec<String>,
    /// The same for the target.
    pub target: Vec<String>,
    /// Flags for both tools (`--destination-is-zero`).
    pub flags: Vec<String>,
}

/// A pair scenario: a name and its servers.
pub struct Pair {
    pub name: &'static str,
    pub servers: fn(&Settings) -> Servers,
}

/// The pair scenarios, in the order they run.
pub fn pairs() -> Vec<Pair> {
    vec![
        Pair { name: "dense", servers: dense },
        Pair { name: "sparse", servers: |o| sparse(o, false) },
        Pair { name: "sparse-zero", servers: |o| sparse(o, true) },
        Pair { name: "latency", servers: latency },
        Pair { name: "wan-25ms-1gbit", servers: |o| wan(o, "25ms", "1G") },
        Pair { name: "wan-50ms-10gbit", servers: |o| wan(o, "50ms", "10G") },
    ]
}

/// A source across a WAN: `pattern` behind nbdkit's rate filter (`rate` is in
/// bits per second, for all connections together) and delay filter (`delay`
/// added to every read) → `memory`.
fn wan(o: &Settings, delay: &str, bits: &str) -> Servers {
    let s = human(o.wan_size);
    Servers {
        source: strings(&[
            "--filter=rate",
            "--filter=delay",
            "pattern",
            &format!("size={s}"),
            &format!("rate={bits}"),
            &format!("delay-read={delay}"),
        ]),
        target: strings(&["memory", &format!("size={s}"), "allocator=malloc"]),
        flags: Vec::new(),
    }
}

/// `pattern` (fully allocated) → `memory`.
fn dense(o: &Settings) -> Servers {
    let s = human(o.dense_size);
    Servers {
        source: strings(&["pattern", &format!("size={s}")]),
        target: strings(&["memory", &format!("size={s}"), "allocator=malloc"]),
        flags: Vec::new(),
    }
}

/// `sparse-random` → the same virtual disk, which checks every write against itself
/// (a wrong byte fails the run). With `zero`, both tools get `--destination-is-zero`:
/// the target does not really read as zeros, but it checks only what is written, so
/// skipping holes is accepted (as it should be).
fn sparse(o: &Settings, zero: bool) -> Servers {
    let disk = strings(&[
        "sparse-random",
        &format!("size={}", human(o.sparse_size)),
        &format!("percent={}", o.sparse_percent),
        &format!("seed={}", o.seed),
    ]);
    Servers {
        source: disk.clone(),
        target: disk,
        flags: if zero { strings(&["--destination-is-zero"]) } else { Vec::new() },
    }
}

/// `pattern` with `delay-read` → `memory` with `delay-write` (unless --no-write-delay).
fn latency(o: &Settings) -> Servers {
    let s = human(o.latency_size);
    let mut target = strings(&["--filter=delay", "memory", &format!("size={s}"), "allocator=malloc"]);
    if !o.no_write_delay {
        target.push(format!("delay-write={}", o.delay));
    }
    Servers {
        source: strings(&["--filter=delay", "pattern", &format!("size={s}"), &format!("delay-read={}", o.delay)]),
        target,
        flags: Vec::new(),
    }
}

pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The last `n` characters of `s`.
pub fn last_chars(s: &str, n: usize) -> &str {
    let start = s.char_indices().rev().nth(n.saturating_sub(1)).map_or(0, |(i, _)| i);
    &s[start..]
}

/// A command line as a shell would take it, quoting only what needs it.
pub fn shell(words: &[String]) -> String {
    let safe = |c: char| c.is_alphanumeric() || "_@%+=:,./-".contains(c);
    let quote = |w: &String| {
        if !w.is_empty() && w.chars().all(safe) { w.clone() } else { format!("'{}'", w.replace('\'', "'\"'\"'")) }
    };
    words.iter().map(quote).collect::<Vec<_>>().join(" ")
}

impl Scenario for Pair {
    fn name(&self) -> &'static str {
        self.name
    }

    fn run(&self, bench: &Bench, dir: &Path) -> Result<Box<dyn Outcome>, Stop> {
        let spec = (self.servers)(&bench.opt);
        let mut src = Server::nbdkit_under(dir, "source", &strs(&spec.source), OWN_SESSION);
        let mut dst = Server::nbdkit_under(dir, "target", &strs(&spec.target), OWN_SESSION);
        let nbytes = data_bytes(&allocation_map(&src.uri()));
        let flags = if spec.flags.is_empty() { String::new() } else { format!(", {}", spec.flags.join(" ")) };
        println!(
            "\n## {}: source `nbdkit {}`, target `nbdkit {}`{flags}; {nbytes} data bytes ({:.0} MiB)",
            self.name,
            shell(&spec.source),
            shell(&spec.target),
            nbytes as f64 / MIB
        );
        let opt = &bench.opt;
        let width = bench.label_width();
        let mut runs: Vec<Vec<Figures>> = bench.tools.iter().map(|_| Vec::new()).collect();
        let order: Vec<usize> = (0..bench.tools.len()).collect();
        for round in 0..opt.warmup + opt.runs {
            let what = round_name(opt, round);
            for i in rotated(&order, round) {
                let tool = &bench.tools[i];
                let cmd = tool.argv(&src.uri(), &dst.uri(), &spec.flags);
                let cpu = || (src.pid().and_then(process_cpu), dst.pid().and_then(process_cpu), system_busy());
                let before = cpu();
                let tag = format!("{}-{round}", tool.label.replace([' ', '/'], "_"));
                let t = timed(std::slice::from_ref(&cmd), dir, &tag)?;
                let after = cpu();
                let servers_cpu = delta(before.0, after.0).zip(delta(before.1, after.1)).map(|(a, b)| a + b);
                let busy = delta(before.2, after.2);
                let other = busy.zip(servers_cpu).map(|(busy, srv)| others(busy, srv + t.cpu, t.wall));
                let failed = t.first_failure();
                if failed.is_some() || !(src.alive() && dst.alive()) {
                    let why = failed.map_or("a server died".to_string(), |i| {
                        format!("exit status {}", status_code(&t.statuses[i]))
                    });
                    let stderr = last_chars(t.stderrs[0].trim(), 2000);
                    return Err(Stop::failed(format!(
                        "{}: {} {what} failed ({why}) after {:.2} s\n  command: {}\n  stderr:  {}\n  source log: {}\n  target log: {}",
                        self.name,
                        tool.label,
                        t.wall,
                        shell(&cmd),
                        if stderr.is_empty() { "(empty)" } else { stderr },
                        src.log_tail(5),
                        dst.log_tail(5)
                    )));
                }
                let note =
                    if tool.json { bench.check_json(self.name, &t.stdouts[0], nbytes, t.wall) } else { String::new() };
                let f =
                    Figures { wall: t.wall, bps: nbytes as f64 / t.wall, cpu: Some(t.cpu), servers_cpu, others: other };
                println!(
                    "  {what:9} {:<width$} {:7.3} s {:9.1} MiB/s  cpu {:6.2} s  servers cpu {:6.2} s  others {:4.2} CPU{note}",
                    tool.label,
                    f.wall,
                    f.bps / MIB,
                    t.cpu,
                    or_nan(servers_cpu),
                    or_nan(other),
                );
                if opt.verbose && !t.stderrs[0].trim().is_empty() {
                    println!("    stderr: {}", t.stderrs[0].trim().replace('\n', "\n    "));
                }
                if round >= opt.warmup {
                    runs[i].push(f);
                }
                run::check()?;
            }
        }
        src.stop();
        dst.stop();
        let labels = bench.tools.iter().map(|t| t.label.clone()).collect();
        Ok(Box::new(PairOutcome { name: self.name, nbytes, labels, runs }))
    }
}

/// The timed runs of every tool of a pair scenario.
struct PairOutcome {
    name: &'static str,
    nbytes: u64,
    /// The tools' labels; nbdcopy, the baseline, last.
    labels: Vec<String>,
    runs: Vec<Vec<Figures>>,
}

impl Outcome for PairOutcome {
    fn results(&self) -> Vec<ResultRow> {
        let mibs = |runs: &[Figures]| median(runs.iter().map(|r| Some(r.bps))) / MIB;
        let Some((nbdcopy, ours)) = self.runs.split_last() else { return Vec::new() };
        ours.iter()
            .zip(&self.labels)
            .map(|(runs, label)| ResultRow {
                label: if ours.len() == 1 { self.name.to_string() } else { format!("{} ({label})", self.name) },
                blockrepl: mibs(runs),
                nbdcopy: mibs(nbdcopy),
            })
            .collect()
    }

    fn details(&self) -> Vec<DetailRow> {
        self.labels
            .iter()
            .zip(&self.runs)
            .map(|(label, runs)| DetailRow { tool: label.clone(), data_bytes: self.nbytes, runs: runs.clone() })
            .collect()
    }
}
