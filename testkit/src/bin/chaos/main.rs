//! `scripts/chaos`: random faults against the daemon, counted.
//!
//! Each scenario runs rounds of one two-disk job (disks of different sizes with
//! data, holes and runs of written zeros, in files) queued by SQL in a private
//! MariaDB and copied by `blockrepl serve` as a child process, with a fault at a
//! moment drawn uniformly from the job's whole life (claim, planning, copy,
//! the final flush, the last row writes). The job's life is measured first by a
//! round without a fault (which is checked like the others). After the fault
//! the daemon (and any server killed) is started again and the job must finish.
//!
//! Every round ends with the bytes compared: the source files against the
//! targets (files, or qcow2 images compared with `qemu-img compare`), never
//! only the status. A round is
//! - identical: `completed`, every target equal to its source, one `cbt_history`
//!   row per disk, nothing below a disk's stored checkpoint read again;
//! - failed cleanly: `failed` with an `error_message` (no scenario here expects
//!   one, so it also fails the run);
//! - a false success: `completed` with different data, or a broken promise
//!   about checkpoints (must never happen);
//! - stuck: not finished within the deadline.
//!
//! Scenarios:
//! - `kill9`: kill -9 of the daemon.
//! - `target-loss`: kill -9 of the daemon and of the target server, a qcow2
//!   image behind `qemu-nbd --cache=writeback`, which loses what was not
//!   flushed (qemu's own qcow2 metadata cache dies with the process). The only
//!   honest test of "checkpoints only after a flush".
//! - `sigterm`: SIGTERM of the daemon: it must exit 0 within 30 s, and the next
//!   start finishes the job.
//!
//! The run prints one table and exits 1 on any false success, stuck job, failed
//! round, unexpected daemon exit or difference in the data.

mod image;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use testkit::harness::{self, Daemon, Server, file_checksum, logged, tempdir};
use testkit::jobs::{JOB_DEADLINE, disk, job, num, one, queue};
use testkit::mariadb::{TestDb, server};

use crate::image::{Rng, write_image};

#[derive(Parser)]
#[command(name = "chaos", about = "Random faults against blockrepl's daemon; counts what survived")]
struct Options {
    /// Rounds per scenario (the short form CI runs is 2).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Scenarios to run (default: all): kill9, target-loss, sigterm.
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// Seed of the random moments and disk contents (default: from the clock);
    /// printed, so that a failing run can be repeated.
    #[arg(long)]
    seed: Option<u64>,
}

/// The disks of every round: (id, size in MiB).
const DISKS: [(&str, u64); 2] = [("disk-a", 32), ("disk-b", 16)];
/// The sources' read rate, so that a job lives a few seconds.
const RATE: &str = "16M";
/// The lease: a restarted daemon waits for the killed one's to expire.
const LEASE: &str = "3s";

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    Kill9,
    TargetLoss,
    Sigterm,
}

impl Fault {
    const ALL: [Fault; 3] = [Fault::Kill9, Fault::TargetLoss, Fault::Sigterm];

    fn name(self) -> &'static str {
        match self {
            Fault::Kill9 => "kill9",
            Fault::TargetLoss => "target-loss",
            Fault::Sigterm => "sigterm",
        }
    }
}

/// What became of one round.
enum Verdict {
    Identical,
    FailedCleanly(String),
    FalseSuccess(String),
    Stuck(String),
    /// The daemon exited as it should not have (e.g. SIGTERM not answered by 0).
    Crash(String),
}

/// One round's outcome and measures.
struct Round {
    verdict: Verdict,
    /// Bytes read again after the fault that had been read before it.
    reread: u64,
    /// From the restart to `completed`.
    recover: Duration,
}

#[derive(Default)]
struct Tally {
    rounds: usize,
    identical: usize,
    failed: usize,
    false_success: usize,
    stuck: usize,
    crashes: usize,
    worst_reread: u64,
    worst_recover: Duration,
    problems: Vec<String>,
}

impl Tally {
    fn add(&mut self, round: usize, r: Round) {
        self.rounds += 1;
        self.worst_reread = self.worst_reread.max(r.reread);
        self.worst_recover = self.worst_recover.max(r.recover);
        let problem = match r.verdict {
            Verdict::Identical => {
                self.identical += 1;
                None
            }
            Verdict::FailedCleanly(m) => {
                self.failed += 1;
                Some(format!("failed: {m}"))
            }
            Verdict::FalseSuccess(m) => {
                self.false_success += 1;
                Some(format!("FALSE SUCCESS: {m}"))
            }
            Verdict::Stuck(m) => {
                self.stuck += 1;
                Some(format!("stuck: {m}"))
            }
            Verdict::Crash(m) => {
                self.crashes += 1;
                Some(format!("daemon: {m}"))
            }
        };
        if let Some(p) = problem {
            self.problems.push(format!("round {round}: {p}"));
        }
    }

    fn ok(&self) -> bool {
        self.identical == self.rounds
    }
}

fn main() -> ExitCode {
    let opt = Options::parse();
    let seed = opt.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
    if let Some(bad) = opt.scenarios.iter().find(|s| !names.contains(&s.as_str())) {
        eprintln!("chaos: unknown scenario '{bad}'; choose from {}", names.join(", "));
        return ExitCode::from(2);
    }
    let chosen: Vec<Fault> = Fault::ALL
        .into_iter()
        .filter(|f| opt.scenarios.is_empty() || opt.scenarios.iter().any(|s| s == f.name()))
        .collect();
    eprintln!("chaos: seed {seed}, {} rounds per scenario (repeat with --seed {seed})", opt.rounds);
    let mut rng = Rng::new(seed);
    let mut all_ok = true;
    let mut rows = Vec::new();
    for fault in chosen {
        let t = Instant::now();
        let tally = scenario(fault, opt.rounds, &mut rng);
        eprintln!("chaos: {} done in {:.0} s", fault.name(), t.elapsed().as_secs_f64());
        for p in &tally.problems {
            eprintln!("chaos: {}: {p}", fault.name());
        }
        all_ok &= tally.ok();
        rows.push((fault.name(), tally));
    }
    print_table(&rows);
    if all_ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("chaos: FAILED (seed {seed})");
        ExitCode::from(1)
    }
}

fn print_table(rows: &[(&str, Tally)]) {
    println!(
        "{:<12} {:>6} {:>10} {:>8} {:>8} {:>6} {:>7} {:>13} {:>13}",
        "scenario", "rounds", "identical", "failed", "false-ok", "stuck", "crashes", "worst re-read", "worst recover"
    );
    for (name, t) in rows {
        println!(
            "{:<12} {:>6} {:>10} {:>8} {:>8} {:>6} {:>7} {:>9.1} MiB {:>11.1} s",
            name,
            t.rounds,
            t.identical,
            t.failed,
            t.false_success,
            t.stuck,
            t.crashes,
            t.worst_reread as f64 / (1 << 20) as f64,
            t.worst_recover.as_secs_f64()
        );
    }
}

/// A calibration round (no fault) measures the job's life; then `rounds`
/// rounds with the fault at a uniformly random moment of it.
fn scenario(fault: Fault, rounds: usize, rng: &mut Rng) -> Tally {
    let mut tally = Tally::default();
    let mut life = Duration::ZERO;
    for round in 0..=rounds {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut w = World::new(fault, round, rng);
            let at = (round > 0).then(|| life.mul_f64(rng.unit()));
            w.run(at)
        }));
        match outcome {
            Ok((r, lived)) => {
                if round == 0 {
                    life = lived;
                    eprintln!("chaos: {}: a job lives {:.1} s", fault.name(), life.as_secs_f64());
                    if !matches!(r.verdict, Verdict::Identical) {
                        tally.add(round, r);
                    }
                } else {
                    tally.add(round, r);
                }
            }
            Err(e) => {
                let m = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                tally.rounds += 1;
                tally.stuck += 1;
                tally.problems.push(format!("round {round}: the harness gave up: {}", m.lines().next().unwrap_or("")));
            }
        }
    }
    tally
}

/// One round's servers, database and daemon.
struct World {
    fault: Fault,
    dir: tempfile::TempDir,
    db: TestDb,
    id: String,
    sources: Vec<Server>,
    targets: Vec<Server>,
    /// (source file, target file) per disk.
    files: Vec<(PathBuf, PathBuf)>,
    daemon: Daemon,
}

impl World {
    fn new(fault: Fault, round: usize, rng: &mut Rng) -> World {
        let dir = tempdir();
        let d = dir.path().to_path_buf();
        let db = server().fresh_database(&format!("chaos_{}_{round}", fault.name().replace('-', "_")));
        let mut sources = Vec::new();
        let mut targets = Vec::new();
        let mut files = Vec::new();
        for (name, mib) in DISKS {
            let src = d.join(format!("{name}.img"));
            write_image(&src, mib << 20, rng);
            let log = d.join(format!("{name}.reads.log"));
            sources.push(Server::nbdkit(
                &d,
                &format!("{name}-src"),
                &[
                    "-r",
                    "--filter=log",
                    "--filter=rate",
                    "file",
                    &format!("file={}", src.display()),
                    &format!("rate={RATE}"),
                    &format!("logfile={}", log.display()),
                    "logappend=true",
                ],
            ));
            let (dst, server) = if fault == Fault::TargetLoss {
                let dst = d.join(format!("{name}.qcow2"));
                harness::sh(
                    "qemu-img",
                    &["create", "-q", "-f", "qcow2", &dst.display().to_string(), &format!("{mib}M")],
                );
                let s = Server::qemu_nbd(
                    &d,
                    &format!("{name}-dst"),
                    &["-f", "qcow2", "--cache=writeback", &dst.display().to_string()],
                );
                (dst, s)
            } else {
                let dst = d.join(format!("{name}.target"));
                std::fs::File::create(&dst).and_then(|f| f.set_len(mib << 20)).unwrap();
                let s = Server::nbdkit(&d, &format!("{name}-dst"), &["file", &format!("file={}", dst.display())]);
                (dst, s)
            };
            targets.push(server);
            files.push((src, dst));
        }
        let daemon = Daemon::start(&d, &db.url, &[("BLOCKREPL__DISCOVERY__LEASE", LEASE)]);
        World { fault, dir, db, id: format!("job-{}-{round}", fault.name()), sources, targets, files, daemon }
    }

    fn read_log(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.reads.log", DISKS[i].0))
    }

    /// Queues the job, makes the fault at `at` (none for calibration), lets the
    /// job finish and judges. Returns the round and how long the job lived.
    fn run(&mut self, at: Option<Duration>) -> (Round, Duration) {
        let disks: Vec<(&str, String, String)> = DISKS
            .iter()
            .zip(self.sources.iter().zip(&self.targets))
            .map(|((name, _), (s, t))| (*name, s.uri(), t.uri()))
            .collect();
        let t0 = Instant::now();
        queue(&self.db, &self.id, &disks);
        let mut recover_from = t0;
        let mut before: Vec<Vec<(u64, u64)>> = vec![Vec::new(); DISKS.len()];
        let mut checkpoints = vec![0u64; DISKS.len()];
        if let Some(at) = at {
            // The fault's moment: scheduling, not synchronisation.
            std::thread::sleep(at);
            if let Some(crash) = self.fault_now() {
                return (Round { verdict: Verdict::Crash(crash), reread: 0, recover: Duration::ZERO }, t0.elapsed());
            }
            for (i, (name, _)) in DISKS.iter().enumerate() {
                checkpoints[i] = num(disk(&self.db, &self.id, name, "resume_offset")) as u64;
                before[i] = reads(&self.read_log(i));
            }
            // nbdkit may abort a moment after its client vanished mid-request:
            // the sources are stateless files, start them afresh.
            for s in &mut self.sources {
                s.stop();
                s.start();
            }
            if self.fault == Fault::TargetLoss {
                for t in &mut self.targets {
                    t.start();
                }
            }
            recover_from = Instant::now();
            self.daemon.spawn();
        }
        let ended = self.wait_end();
        let lived = t0.elapsed();
        let recover = recover_from.elapsed();
        // The reads after the fault (all of them in calibration).
        let after: Vec<Vec<(u64, u64)>> =
            (0..DISKS.len()).map(|i| reads(&self.read_log(i)).split_off(before[i].len())).collect();
        let verdict = match ended {
            Err(m) => Verdict::Stuck(m),
            Ok(status) if status != "completed" => Verdict::FailedCleanly(format!(
                "{status}: {}",
                job(&self.db, &self.id, "error_message").unwrap_or_default()
            )),
            Ok(_) => self.judge(&checkpoints, &after),
        };
        let reread = (0..DISKS.len()).map(|i| overlap(&before[i], &after[i])).max().unwrap_or(0);
        (Round { verdict, reread, recover }, lived)
    }

    /// Makes the fault; the reason if the daemon did not take it as it should.
    fn fault_now(&mut self) -> Option<String> {
        match self.fault {
            Fault::Kill9 => self.daemon.kill9(),
            Fault::TargetLoss => {
                self.daemon.kill9();
                for t in &mut self.targets {
                    t.kill();
                }
            }
            Fault::Sigterm => {
                let (status, took) = self.daemon.terminate();
                if !status.success() {
                    return Some(format!("SIGTERM ended the daemon with {status}:\n{}", self.daemon.log_text()));
                }
                if took > Duration::from_secs(30) {
                    return Some(format!("SIGTERM took {took:?}"));
                }
            }
        }
        None
    }

    /// Waits for a terminal status; the status, or why it did not come.
    fn wait_end(&mut self) -> Result<String, String> {
        let end = Instant::now() + JOB_DEADLINE;
        loop {
            let st = job(&self.db, &self.id, "status").unwrap_or_default();
            if ["completed", "failed", "cancelled"].contains(&st.as_str()) {
                return Ok(st);
            }
            if let Some(exit) = self.daemon.exited() {
                return Err(format!("the daemon exited ({exit}) with the job {st}:\n{}", self.daemon.log_text()));
            }
            if Instant::now() > end {
                return Err(format!("still {st} after {JOB_DEADLINE:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A completed job: are the promises kept?
    fn judge(&mut self, checkpoints: &[u64], after: &[Vec<(u64, u64)>]) -> Verdict {
        // qemu-nbd writes its caches on a clean stop; the images are then whole.
        for t in &mut self.targets {
            t.stop();
        }
        for (i, ((name, _), (src, dst))) in DISKS.iter().zip(&self.files).enumerate() {
            let same = if self.fault == Fault::TargetLoss {
                Command::new("qemu-img")
                    .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
                    .arg(src)
                    .arg(dst)
                    .status()
                    .is_ok_and(|s| s.success())
            } else {
                file_checksum(src) == file_checksum(dst)
            };
            if !same {
                return Verdict::FalseSuccess(format!("{name}: completed, but the target differs from the source"));
            }
            let history = one(
                &self.db,
                &format!(
                    "SELECT CAST(COUNT(*) AS CHAR) AS v FROM cbt_history WHERE job_id='{}' AND disk_id='{name}'",
                    self.id
                ),
            );
            if history.as_deref() != Some("1") {
                return Verdict::FalseSuccess(format!("{name}: {history:?} cbt_history rows, not one"));
            }
            // A resumed run starts at the stored checkpoint: nothing below it
            // is read again.
            if let Some(&(off, _)) = after[i].iter().find(|(off, _)| *off < checkpoints[i]) {
                return Verdict::FalseSuccess(format!(
                    "{name}: offset {off} read again after the fault, below its checkpoint {}",
                    checkpoints[i]
                ));
            }
        }
        Verdict::Identical
    }
}

/// (offset, length) of every read in a log of nbdkit's log filter.
fn reads(log: &Path) -> Vec<(u64, u64)> {
    logged(log, "Read").into_iter().map(|r| (r.offset, r.count)).collect()
}

/// Bytes of `after` that some range of `before` covered too.
fn overlap(before: &[(u64, u64)], after: &[(u64, u64)]) -> u64 {
    let mut b: Vec<(u64, u64)> = before.iter().map(|&(o, n)| (o, o + n)).collect();
    b.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in b {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    after.iter().flat_map(|&(o, n)| merged.iter().map(move |&(s, e)| e.min(o + n).saturating_sub(s.max(o)))).sum()
}
