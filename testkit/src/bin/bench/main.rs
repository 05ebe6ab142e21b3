//! `scripts/bench`: blockrepl against nbdcopy on the same nbdkit servers.
//!
//! For each scenario the benchmark starts its servers on Unix sockets in a
//! temporary directory (through the shared harness, `testkit`), then runs
//! `blockrepl copy` and `nbdcopy --flush` alternately against the SAME servers
//! (the order rotates every round so that neither tool always goes first), times
//! every run itself with the monotonic clock (process start to exit, identical for
//! both tools), and reports each tool's median throughput and the ratio
//! blockrepl/nbdcopy. Throughput = the source's allocated data bytes / wall-clock
//! seconds of the whole run.
//!
//! Scenarios (sizes settable, see --help):
//! - `dense`: pattern plugin (fully allocated) → memory allocator=malloc
//! - `sparse`: sparse-random (3 %, fixed seed) → sparse-random, same seed (the
//!   target checks every write: a wrong byte fails the run)
//! - `sparse-zero`: as sparse, both tools with --destination-is-zero
//! - `latency`: pattern + delay filter (delay-read) → memory + delay filter
//!   (delay-write)
//! - `wan-25ms-1gbit`, `wan-50ms-10gbit`: `pattern` behind nbdkit's rate and
//!   delay filters (1 Gbit/s and 25 ms per read; 10 Gbit/s and 50 ms) → memory
//! - `slow-extents`: sparse-random (50 % in 1 MiB runs) behind nbdkit's
//!   blocksize filter (block status answered for at most 4 MiB at a time) and
//!   delay filter (`delay-extents`, 20 ms) → sparse-random, same seed; also
//!   times blockrepl from the same disk without the delay (the copy alone) and
//!   reports blockrepl's planning time (see `planning.rs`)
//! - `daemon`: N disks (`--disks`, default 4) copied in each round by one job of
//!   `blockrepl serve` queued with plain SQL in a private MariaDB, by N parallel
//!   `nbdcopy --flush` and by N parallel `blockrepl copy` (see `daemon.rs`).
//! - `load` (only when named): many small jobs queued at once, drained by
//!   several daemons on one database, with the admin API probed all along
//!   (see `load.rs`); no nbdcopy comparison.
//!
//! Each tool's exit status is checked; a failing run aborts its scenario with a
//! message, the other scenarios still run, and the benchmark exits 1. The servers
//! and the daemon run in sessions of their own (`run::OWN_SESSION`); they, any copy
//! still running and the temporary directory are stopped and removed on exit, on
//! errors and on Ctrl-C/SIGTERM/SIGHUP (exit status 130). As a last resort nbdkit
//! runs with --exit-with-parent, the daemon with a parent-death signal, and the
//! private MariaDB stops when this process ends, however it ends.

mod daemon;
mod load;
mod pair;
mod planning;
mod report;
mod run;
mod scenario;
mod settings;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::Parser;

use crate::run::Stop;
use crate::scenario::{Bench, Outcome, Scenario, Tool};
use crate::settings::Options;

/// Every scenario, in the order they run by default.
fn scenarios() -> Vec<Box<dyn Scenario>> {
    let mut all: Vec<Box<dyn Scenario>> = Vec::new();
    for p in pair::pairs() {
        all.push(Box::new(p));
    }
    all.push(Box::new(planning::SlowExtents));
    all.push(Box::new(daemon::DaemonJob));
    all.push(Box::new(load::Load));
    all
}

/// What became of a scenario.
pub enum Finished {
    Done(Box<dyn Outcome>),
    /// Aborted, with the first line of the reason.
    Failed(String),
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let opt = Options::parse();
    let settings = opt.settings();
    let names: Vec<&str> = scenarios().iter().map(|s| s.name()).collect();
    if let Some(unknown) = opt.scenarios.iter().find(|n| !names.contains(&n.as_str())) {
        settings::usage(&format!("unknown scenario '{unknown}'; choose from {}", names.join(", ")));
    }
    let mut chosen: Vec<Box<dyn Scenario>> = scenarios()
        .into_iter()
        .filter(|s| opt.scenarios.is_empty() || opt.scenarios.iter().any(|n| n == s.name()))
        .collect();
    if opt.scenarios.is_empty() {
        chosen.retain(|s| s.name() != "load");
        chosen.retain(|s| {
            let missing: Vec<&str> = s.needs().into_iter().filter(|p| !run::on_path(p)).collect();
            if !missing.is_empty() {
                eprintln!(
                    "bench: skipping the {} scenario: {} not found (scripts/setup installs it)",
                    s.name(),
                    missing.join(", ")
                );
            }
            missing.is_empty()
        });
    }
    let mut needed = vec!["nbdkit", "nbdcopy", "nbdinfo", "setsid", "setpriv"];
    needed.extend(chosen.iter().flat_map(|s| s.needs()));
    if let Some(tool) = needed.iter().find(|p| !run::on_path(p)) {
        return die(&format!("{tool} not found (scripts/setup installs it)"));
    }

    let blockrepl = match &opt.blockrepl {
        Some(p) => std::path::absolute(p).unwrap_or_else(|_| PathBuf::from(p)),
        None => next_to_us("blockrepl"),
    };
    if !is_executable(&blockrepl) {
        return die(&format!("no blockrepl binary at {}", blockrepl.display()));
    }
    testkit::harness::set_bin(&blockrepl);
    let blockrepl = blockrepl.display().to_string();

    let Some(nbdcopy_extra) = shlex::split(&opt.nbdcopy_args) else {
        settings::usage(&format!("--nbdcopy-args: cannot split {:?}", opt.nbdcopy_args));
    };
    let variants = if opt.blockrepl_args.is_empty() { vec![String::new()] } else { opt.blockrepl_args.clone() };
    let mut tools = Vec::new();
    for v in &variants {
        let Some(extra) = shlex::split(v) else {
            settings::usage(&format!("--blockrepl-args: cannot split {v:?}"));
        };
        let label = if v.trim().is_empty() { "blockrepl".to_string() } else { format!("blockrepl {}", v.trim()) };
        let head = vec!["copy".to_string(), "--json".to_string()];
        tools.push(Tool { label, program: blockrepl.clone(), head, extra, json: true });
    }
    tools.push(Tool {
        label: "nbdcopy".to_string(),
        program: "nbdcopy".to_string(),
        head: vec!["--flush".to_string()],
        extra: nbdcopy_extra.clone(),
        json: false,
    });

    let command_line = pair::shell(&[&["scripts/bench".to_string()], &args[1..]].concat());
    println!("# {command_line}");
    println!(
        "# blockrepl {blockrepl} (git tree {}); {}; {}; {} CPUs; {} timed run(s) + {} warm-up per tool, order rotated each round",
        git_describe(),
        first_line("nbdcopy", "--version"),
        first_line("nbdkit", "--version"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        settings.runs,
        settings.warmup
    );
    println!("{}", format!("# nbdcopy: nbdcopy --flush {}", opt.nbdcopy_args).trim_end());
    if chosen.iter().any(|s| s.name() == "daemon") && variants.iter().any(|v| !v.trim().is_empty()) {
        println!(
            "# daemon scenario: --blockrepl-args do not apply to it (the daemon and its `blockrepl copy` \
             baseline both use the engine's default tuning)"
        );
    }

    if let Err(e) = run::catch_signals() {
        return die(&format!("cannot catch signals: {e}"));
    }
    let workdir = match tempfile::Builder::new().prefix("blockrepl-bench.").tempdir() {
        Ok(d) => d,
        Err(e) => return die(&format!("cannot create a temporary directory: {e}")),
    };
    let bench = Bench::new(settings, blockrepl, tools, nbdcopy_extra);
    // Harness failures are panics with a message: they abort their scenario only.
    std::panic::set_hook(Box::new(|_| {}));
    let mut summary: Vec<(&'static str, Finished)> = Vec::new();
    let mut interrupted = false;
    for s in &chosen {
        let dir = workdir.path().join(s.name());
        let ran = std::fs::create_dir(&dir)
            .map_err(|e| Stop::failed(format!("cannot create {}: {e}", dir.display())))
            .and_then(|()| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.run(&bench, &dir)))
                    .unwrap_or_else(|panic| Err(Stop::Failed(panic_message(panic))))
            });
        match ran {
            _ if run::stopping() => {
                interrupted = true;
                break;
            }
            Ok(outcome) => summary.push((s.name(), Finished::Done(outcome))),
            Err(Stop::Interrupted) => {
                interrupted = true;
                break;
            }
            Err(Stop::Failed(msg)) => {
                eprintln!("\nbench: scenario {} ABORTED: {msg}", s.name());
                let first = msg.lines().next().unwrap_or("").to_string();
                summary.push((s.name(), Finished::Failed(first)));
            }
        }
    }
    if opt.keep_tmp {
        eprintln!("bench: logs kept in {}", workdir.keep().display());
    }
    if interrupted {
        eprintln!("\nbench: interrupted; servers stopped");
        return ExitCode::from(130);
    }
    report::print(&summary, &bench, &command_line);
    let failed = summary.iter().any(|(_, f)| matches!(f, Finished::Failed(_)));
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn die(msg: &str) -> ExitCode {
    eprintln!("bench: {msg}");
    ExitCode::from(2)
}

/// `NAME` in this program's directory, where cargo puts every binary of a build.
fn next_to_us(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent().unwrap_or(Path::new(".")).join(name)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".to_string())
}

/// The first line a program prints, or "?".
fn first_line(program: &str, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_string))
        .unwrap_or_else(|| "?".to_string())
}

/// `git describe --always --dirty` of the repository, or "?".
fn git_describe() -> String {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".to_string())
}
