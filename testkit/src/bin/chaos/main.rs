//! `scripts/chaos`: random faults against the daemon, counted.
//!
//! The random scenarios run rounds of one two-disk job (disks of different
//! sizes with data, holes and runs of written zeros, in files) queued by SQL in
//! a MariaDB and copied by `blockrepl serve` as a child process, with a fault at
//! a moment drawn uniformly from the job's whole life (claim, planning, copy,
//! verify, the final flush, the last row writes). The job's life is measured
//! first by a round without a fault (which is checked like the others). After
//! the fault the daemon (and any server killed) is started again where needed
//! and the job must finish.
//!
//! Every round ends with the bytes compared: the source files against the
//! targets (files, or qcow2 images compared with `qemu-img compare`), never
//! only the status; and the rows: bytes, status and change ids as the truth
//! says, one job, one `cbt_history` row per disk. A round is
//! - identical: `completed`, every target equal to its source, the rows right,
//!   nothing below a disk's stored checkpoint read again;
//! - failed cleanly: `failed` with an `error_message` (only the fault matrix
//!   expects some; anywhere else it fails the run);
//! - a false success: `completed` with different data, or a broken promise
//!   about checkpoints (must never happen);
//! - stuck: not finished within the deadline;
//! - a crash: the daemon exited as it should not have;
//! - wrong: any other broken promise (rows that did not catch up, an error
//!   line that does not name what failed, a write after a lost lease, a
//!   takeover slower than lease + one discovery tick).
//!
//! Scenarios:
//! - `kill9`: kill -9 of the daemon; `kill9-verify`: the same with
//!   verification on, so that kills land in verify too. Every third round (2,
//!   5, 8, ...) draws its moment from the last fifth of the job's life (the final
//!   flush, verify, the last row writes); the table's notes count where the
//!   kills landed (the job's stored status and operation right after).
//! - `target-loss`: kill -9 of the daemon and of the target server, a qcow2
//!   image behind `qemu-nbd --cache=writeback`, which loses what was not
//!   flushed (qemu's own qcow2 metadata cache dies with the process). The only
//!   honest test of "checkpoints only after a flush".
//! - `sigterm`: SIGTERM of the daemon: it must exit 0 within 30 s, and the next
//!   start finishes the job.
//! - `db`: the database (a private MariaDB) SIGSTOPped (odd rounds) or killed
//!   and started again later (even rounds) at a random moment of the copy;
//!   the daemon's health must answer throughout (see [`database`]).
//! - `matrix`: the NBD fault matrix, each cell once (see [`matrix`]).
//! - `two`: two appliances on one database (see [`appliances`]).
//!
//! The run prints one table and exits 1 on any false success, stuck job,
//! failed round, unexpected daemon exit, wrong row or difference in the data.

mod appliances;
mod database;
mod image;
mod matrix;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::Parser;
use testkit::harness::{self, Daemon, Server, file_checksum, logged, tempdir};
use testkit::jobs::{JOB_DEADLINE, disk, job, num, one, queue_sql};
use testkit::mariadb::{MariaDb, TestDb, private_durable, server};

use crate::image::{Rng, write_image};

#[derive(Parser)]
#[command(name = "chaos", about = "Random faults against blockrepl's daemon; counts what survived")]
struct Options {
    /// Rounds per random scenario. Without it, the short form CI runs: 2
    /// rounds, and the database outages shortened (8 s paused, 5 s down instead
    /// of 30 and 20 s). The fault matrix runs once either way.
    #[arg(long)]
    rounds: Option<usize>,
    /// Scenarios to run (default: all): kill9, kill9-verify, target-loss,
    /// sigterm, db, matrix, two.
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// Seed of the random moments and disk contents (default: from the clock);
    /// printed, so that a failing run can be repeated.
    #[arg(long)]
    seed: Option<u64>,
}

/// Every scenario, in the order they run.
const SCENARIOS: [&str; 7] = ["kill9", "kill9-verify", "target-loss", "sigterm", "db", "matrix", "two"];

/// The disks of every round: (id, size in MiB).
const DISKS: [(&str, u64); 2] = [("disk-a", 32), ("disk-b", 16)];
/// The sources' read rate (bits a second: 2 MB/s), so that a job lives a few seconds.
const RATE: &str = "16M";
/// The lease: a restarted daemon waits for the killed one's to expire.
const LEASE: &str = "3s";
/// The lease while the database is away: longer than any outage, so that the
/// copy goes on (the fence closes after 3/4 of it without a renewal).
const DB_LEASE: &str = "60s";

/// How long the database faults last.
#[derive(Clone, Copy)]
pub struct Outages {
    /// SIGSTOP to SIGCONT.
    pub pause: Duration,
    /// kill -9 to the restart.
    pub down: Duration,
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    Kill9,
    Kill9Verify,
    TargetLoss,
    Sigterm,
    /// The database paused (odd rounds) or killed and restarted (even rounds).
    Database,
}

impl Fault {
    fn named(name: &str) -> Option<Fault> {
        Some(match name {
            "kill9" => Fault::Kill9,
            "kill9-verify" => Fault::Kill9Verify,
            "target-loss" => Fault::TargetLoss,
            "sigterm" => Fault::Sigterm,
            "db" => Fault::Database,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Fault::Kill9 => "kill9",
            Fault::Kill9Verify => "kill9-verify",
            Fault::TargetLoss => "target-loss",
            Fault::Sigterm => "sigterm",
            Fault::Database => "db",
        }
    }

    fn kills_daemon(self) -> bool {
        matches!(self, Fault::Kill9 | Fault::Kill9Verify | Fault::TargetLoss)
    }
}

/// What became of one round.
pub enum Verdict {
    Identical,
    FailedCleanly(String),
    FalseSuccess(String),
    Stuck(String),
    /// The daemon exited as it should not have (e.g. SIGTERM not answered by 0).
    Crash(String),
    /// Another broken promise (see the module doc).
    Wrong(String),
}

impl Verdict {
    /// Whether the round broke a promise or failed (its files are worth keeping).
    fn is_problem(&self) -> bool {
        !matches!(self, Verdict::Identical)
    }

    /// Adds `note` to the message, if there is one.
    fn with_note(self, note: &str) -> Verdict {
        match self {
            Verdict::Identical => Verdict::Identical,
            Verdict::FailedCleanly(m) => Verdict::FailedCleanly(format!("{m} {note}")),
            Verdict::FalseSuccess(m) => Verdict::FalseSuccess(format!("{m} {note}")),
            Verdict::Stuck(m) => Verdict::Stuck(format!("{m} {note}")),
            Verdict::Crash(m) => Verdict::Crash(format!("{m} {note}")),
            Verdict::Wrong(m) => Verdict::Wrong(format!("{m} {note}")),
        }
    }
}

/// Keeps a problem round's directory (the daemon's log, the servers' logs and
/// request logs, the images) and names it in the verdict; the other rounds'
/// directories go as usual.
pub fn keep_if_problem(dir: &mut tempfile::TempDir, verdict: Verdict) -> Verdict {
    if !verdict.is_problem() {
        return verdict;
    }
    dir.disable_cleanup(true);
    verdict.with_note(&format!("[files kept in {}]", dir.path().display()))
}

/// Restarts the servers that died on their own. nbdkit 1.32 aborts
/// (`raw_send_socket: Assertion 'sock >= 0' failed`) when a client leaves while
/// a request of its is still being served, most often one sleeping in the rate
/// filter: after a kill, and when a daemon drops a connection it no longer
/// needs. The sources are files read through stateless filters, the targets
/// `nbdkit file` (nothing cached in the process) or qemu-nbd (which the
/// target-loss rounds kill and restart themselves); a server that comes back
/// within a moment is what the daemon must ride out anyway. Every restart is
/// counted and printed.
pub fn revive(servers: &mut [Server]) {
    let mut n = 0;
    for s in servers.iter_mut().filter(|s| s.pid().is_some()) {
        if !s.alive() {
            eprintln!("chaos: the server {} died ({}); started again", s.sock.display(), s.log_tail(1));
            s.stop();
            s.start();
            n += 1;
        }
    }
    REVIVED.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

/// Servers started again by [`revive`], over the whole run.
pub static REVIVED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One round's outcome and measures.
pub struct Round {
    pub verdict: Verdict,
    /// Bytes read again after the fault that had been read before it.
    pub reread: u64,
    /// From the restart (or the fault's end) to `completed`.
    pub recover: Duration,
}

#[derive(Default)]
pub struct Tally {
    pub rounds: usize,
    pub identical: usize,
    pub failed: usize,
    pub false_success: usize,
    pub stuck: usize,
    pub crashes: usize,
    pub wrong: usize,
    pub worst_reread: u64,
    pub worst_recover: Duration,
    /// Clean failures are the expected outcome of some cells (the matrix).
    pub failures_expected: bool,
    /// Runs that are not counted as rounds: the calibration round.
    pub uncounted: usize,
    pub problems: Vec<String>,
    /// Lines printed under the table (the matrix's cells, where kills landed).
    pub notes: Vec<String>,
}

impl Tally {
    pub fn add(&mut self, round: &str, r: Round) {
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
                (!self.failures_expected).then(|| format!("failed: {m}"))
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
            Verdict::Wrong(m) => {
                self.wrong += 1;
                Some(format!("wrong: {m}"))
            }
        };
        if let Some(p) = problem {
            self.problems.push(format!("{round}: {p}"));
        }
    }

    /// A round the harness itself gave up on (a panic: a server that would not
    /// start, a deadline passed).
    pub fn gave_up(&mut self, round: &str, e: Box<dyn std::any::Any + Send>) {
        let m = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        self.rounds += 1;
        self.stuck += 1;
        self.problems.push(format!("{round}: the harness gave up: {}", m.lines().next().unwrap_or("")));
    }

    fn ok(&self) -> bool {
        self.false_success + self.stuck + self.crashes + self.wrong == 0
            && (self.failures_expected || self.failed == 0)
            && self.identical + self.failed == self.rounds
    }
}

/// The private MariaDB of the database faults, started on first use (pausing
/// or killing the shared one would hurt the other scenarios).
pub fn killable_db() -> &'static MariaDb {
    static DB: OnceLock<MariaDb> = OnceLock::new();
    DB.get_or_init(|| private_durable("chaos"))
}

fn main() -> ExitCode {
    let opt = Options::parse();
    let seed = opt.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    if let Some(bad) = opt.scenarios.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
        eprintln!("chaos: unknown scenario '{bad}'; choose from {}", SCENARIOS.join(", "));
        return ExitCode::from(2);
    }
    let rounds = opt.rounds.unwrap_or(2);
    let outages = match opt.rounds {
        None => Outages { pause: Duration::from_secs(8), down: Duration::from_secs(5) },
        Some(_) => Outages { pause: Duration::from_secs(30), down: Duration::from_secs(20) },
    };
    eprintln!(
        "chaos: seed {seed}, {rounds} rounds per random scenario, database paused {} s / down {} s \
         (repeat with --seed {seed})",
        outages.pause.as_secs(),
        outages.down.as_secs()
    );
    let mut rng = Rng::new(seed);
    let mut all_ok = true;
    let mut rows = Vec::new();
    let started = Instant::now();
    for name in SCENARIOS.into_iter().filter(|n| opt.scenarios.is_empty() || opt.scenarios.iter().any(|s| s == n)) {
        let t = Instant::now();
        let revived = REVIVED.load(std::sync::atomic::Ordering::Relaxed);
        let mut tally = match name {
            "matrix" => matrix::run(&mut rng),
            "two" => appliances::run(rounds, &mut rng),
            _ => scenario(Fault::named(name).expect("a known scenario"), rounds, outages, &mut rng),
        };
        let n = REVIVED.load(std::sync::atomic::Ordering::Relaxed) - revived;
        if n > 0 {
            tally.notes.push(format!("{n} NBD server(s) aborted on their own (nbdkit 1.32) and were started again"));
        }
        let took = t.elapsed().as_secs_f64();
        eprintln!("chaos: {name} done in {took:.0} s ({:.1} s a round)", per_round(&tally, took));
        for p in &tally.problems {
            eprintln!("chaos: {name}: {p}");
        }
        all_ok &= tally.ok();
        rows.push((name, tally, took));
    }
    print_table(&rows);
    eprintln!("chaos: {:.0} s in all", started.elapsed().as_secs_f64());
    if all_ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("chaos: FAILED (seed {seed})");
        ExitCode::from(1)
    }
}

fn print_table(rows: &[(&str, Tally, f64)]) {
    println!(
        "{:<13} {:>6} {:>10} {:>8} {:>8} {:>6} {:>7} {:>6} {:>13} {:>13} {:>9}",
        "scenario",
        "rounds",
        "identical",
        "failed",
        "false-ok",
        "stuck",
        "crashes",
        "wrong",
        "worst re-read",
        "worst recover",
        "per round"
    );
    for (name, t, took) in rows {
        println!(
            "{:<13} {:>6} {:>10} {:>8} {:>8} {:>6} {:>7} {:>6} {:>9.1} MiB {:>11.1} s {:>7.1} s",
            name,
            t.rounds,
            t.identical,
            t.failed,
            t.false_success,
            t.stuck,
            t.crashes,
            t.wrong,
            t.worst_reread as f64 / (1 << 20) as f64,
            t.worst_recover.as_secs_f64(),
            per_round(t, *took)
        );
    }
    for (name, t, _) in rows {
        for n in &t.notes {
            println!("{name}: {n}");
        }
    }
}

/// Seconds a round took, the calibration round included.
fn per_round(t: &Tally, took: f64) -> f64 {
    took / (t.rounds + t.uncounted).max(1) as f64
}

/// A calibration round (no fault) measures the job's life; then `rounds`
/// rounds with the fault at a random moment of it.
fn scenario(fault: Fault, rounds: usize, outages: Outages, rng: &mut Rng) -> Tally {
    let mut tally = Tally::default();
    let mut life = Duration::ZERO;
    let mut landed: std::collections::BTreeMap<String, usize> = Default::default();
    for round in 0..=rounds {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut w = World::new(fault, round, rng);
            // A third of the kills are drawn from the last fifth of the life:
            // the final flush, verify and the last row writes are short.
            let late = fault.kills_daemon() && round % 3 == 2;
            let at = (round > 0).then(|| life.mul_f64(if late { 0.8 + 0.2 * rng.unit() } else { rng.unit() }));
            w.run(at, outages)
        }));
        let label = format!("round {round}");
        match outcome {
            Ok((r, lived, phase)) => {
                if let Some(p) = phase {
                    *landed.entry(p).or_default() += 1;
                }
                if round == 0 {
                    life = lived;
                    tally.uncounted += 1;
                    eprintln!("chaos: {}: a job lives {:.1} s", fault.name(), life.as_secs_f64());
                    if !matches!(r.verdict, Verdict::Identical) {
                        tally.add(&label, r);
                    }
                } else {
                    tally.add(&label, r);
                }
            }
            Err(e) => tally.gave_up(&label, e),
        }
    }
    if !landed.is_empty() {
        let at: Vec<String> = landed.iter().map(|(p, n)| format!("{p} {n}")).collect();
        tally.notes.push(format!("faults landed at (job status/operation as stored): {}", at.join(", ")));
    }
    tally
}

/// One round's servers, database and daemon.
struct World {
    fault: Fault,
    round: usize,
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
        let label = format!("chaos_{}_{round}", fault.name().replace('-', "_"));
        let db = if fault == Fault::Database { killable_db() } else { server() }.fresh_database(&label);
        let mut sources = Vec::new();
        let mut targets = Vec::new();
        let mut files = Vec::new();
        for (name, mib) in DISKS {
            let src = d.join(format!("{name}.img"));
            write_image(&src, mib << 20, rng);
            // Verification reads the sources again: faster ones keep rounds short.
            sources.push(logged_source(&d, name, &src, if fault == Fault::Kill9Verify { "32M" } else { RATE }));
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
        let mut env = vec![("BLOCKREPL__DISCOVERY__LEASE", if fault == Fault::Database { DB_LEASE } else { LEASE })];
        if fault == Fault::Kill9Verify {
            env.push(("BLOCKREPL__COPY__VERIFY", "true"));
        }
        let daemon = Daemon::start(&d, &db.url, &env);
        World { fault, round, dir, db, id: format!("job-{}-{round}", fault.name()), sources, targets, files, daemon }
    }

    fn read_log(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.reads.log", DISKS[i].0))
    }

    /// Queues the job, makes the fault at `at` (none for calibration), lets the
    /// job finish and judges. Returns the round, how long the job lived, and
    /// where the fault landed (the job's stored status and operation).
    fn run(&mut self, at: Option<Duration>, outages: Outages) -> (Round, Duration, Option<String>) {
        let disks: Vec<(&str, String, String)> = DISKS
            .iter()
            .zip(self.sources.iter().zip(&self.targets))
            .map(|((name, _), (s, t))| (*name, s.uri(), t.uri()))
            .collect();
        let t0 = Instant::now();
        queue_with_change_ids(&self.db, &self.id, &disks);
        let mut recover_from = t0;
        let mut before: Vec<Vec<(u64, u64)>> = vec![Vec::new(); DISKS.len()];
        let mut checkpoints = vec![0u64; DISKS.len()];
        let mut phase = None;
        if let Some(at) = at {
            // The fault's moment: scheduling, not synchronisation.
            std::thread::sleep(at);
            let crash = if self.fault == Fault::Database {
                let pause = self.round % 2 == 1;
                let (what, fault) = if pause { ("paused", outages.pause) } else { ("down", outages.down) };
                phase = Some(format!("{what} while {}", self.stage()));
                database::outage(&mut self.daemon, pause, fault).map(Verdict::Wrong)
            } else {
                let c = self.fault_now();
                phase = Some(self.stage());
                c.map(Verdict::Crash)
            };
            if let Some(verdict) = crash {
                let verdict = keep_if_problem(&mut self.dir, verdict);
                return (Round { verdict, reread: 0, recover: Duration::ZERO }, t0.elapsed(), phase);
            }
            for (i, (name, _)) in DISKS.iter().enumerate() {
                checkpoints[i] = num(disk(&self.db, &self.id, name, "resume_offset")) as u64;
                before[i] = reads(&self.read_log(i));
            }
            recover_from = Instant::now();
            if self.fault != Fault::Database {
                // nbdkit may abort a moment after its client vanished
                // mid-request: the sources are stateless files, start them afresh.
                for s in &mut self.sources {
                    s.stop();
                    s.start();
                }
                if self.fault == Fault::TargetLoss {
                    for t in &mut self.targets {
                        t.start();
                    }
                }
                self.daemon.spawn();
            }
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
        let verdict = keep_if_problem(&mut self.dir, verdict);
        let reread = (0..DISKS.len()).map(|i| overlap(&before[i], &after[i])).max().unwrap_or(0);
        (Round { verdict, reread, recover }, lived, phase)
    }

    /// The job's status and operation as stored.
    fn stage(&self) -> String {
        format!(
            "{}/{}",
            job(&self.db, &self.id, "status").unwrap_or_else(|| "-".into()),
            job(&self.db, &self.id, "current_operation").unwrap_or_else(|| "-".into())
        )
    }

    /// Makes the fault; the reason if the daemon did not take it as it should.
    fn fault_now(&mut self) -> Option<String> {
        match self.fault {
            Fault::Kill9 | Fault::Kill9Verify => self.daemon.kill9(),
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
            Fault::Database => unreachable!("database faults are made by database::outage"),
        }
        None
    }

    /// Waits for a terminal status; the status, or why it did not come.
    fn wait_end(&mut self) -> Result<String, String> {
        wait_terminal(&self.db, &self.id, &mut self.daemon, &mut self.sources, &mut self.targets)
    }

    /// A completed job: are the promises kept?
    fn judge(&mut self, checkpoints: &[u64], after: &[Vec<(u64, u64)>]) -> Verdict {
        // qemu-nbd writes its caches on a clean stop; the images are then whole.
        for t in &mut self.targets {
            t.stop();
        }
        for (i, ((name, mib), (src, dst))) in DISKS.iter().zip(&self.files).enumerate() {
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
            if self.fault == Fault::Kill9Verify {
                // Verification reads the whole source again after a restart:
                // the bound is the rest of the copy plus one pass.
                let read: u64 = after[i].iter().map(|r| r.1).sum();
                let bound = 2 * (mib << 20) - checkpoints[i];
                if read > bound {
                    return Verdict::FalseSuccess(format!(
                        "{name}: {read} bytes read after the fault, more than the rest of the copy and one \
                         verification ({bound}) from the checkpoint {}",
                        checkpoints[i]
                    ));
                }
            } else if let Some(&(off, _)) = after[i].iter().find(|(off, _)| *off < checkpoints[i]) {
                // A resumed run starts at the stored checkpoint: nothing below
                // it is read again.
                return Verdict::FalseSuccess(format!(
                    "{name}: offset {off} read again after the fault, below its checkpoint {}",
                    checkpoints[i]
                ));
            }
        }
        match rows_caught_up(&self.db, &self.id, &DISKS.map(|(n, _)| n)) {
            Some(m) => Verdict::Wrong(m),
            None => Verdict::Identical,
        }
    }
}

/// A read-only nbdkit source over `file`, at `rate` bytes a second, its reads
/// logged to `DIR/NAME.reads.log` (appended across restarts).
pub fn logged_source(dir: &Path, name: &str, file: &Path, rate: &str) -> Server {
    let log = dir.join(format!("{name}.reads.log"));
    Server::nbdkit(
        dir,
        &format!("{name}-src"),
        &[
            "-r",
            "--filter=log",
            "--filter=rate",
            "file",
            &format!("file={}", file.display()),
            &format!("rate={rate}"),
            &format!("logfile={}", log.display()),
            "logappend=true",
        ],
    )
}

/// Queues a job whose disks carry change ids (`cid-DISK`), so that the rows can
/// be checked for them at the end.
pub fn queue_with_change_ids(db: &TestDb, id: &str, disks: &[(&str, String, String)]) {
    db.execute(&format!(
        "START TRANSACTION; {} UPDATE vm_disks SET change_id = CONCAT('cid-', disk_id) WHERE job_id = '{id}'; COMMIT;",
        queue_sql(id, disks)
    ));
}

/// Waits for a terminal status; the status, or why it did not come.
pub fn wait_terminal(
    db: &TestDb,
    id: &str,
    daemon: &mut Daemon,
    sources: &mut [Server],
    targets: &mut [Server],
) -> Result<String, String> {
    let end = Instant::now() + JOB_DEADLINE;
    loop {
        revive(sources);
        revive(targets);
        let st = job(db, id, "status").unwrap_or_default();
        if ["completed", "failed", "cancelled"].contains(&st.as_str()) {
            return Ok(st);
        }
        if let Some(exit) = daemon.exited() {
            return Err(format!("the daemon exited ({exit}) with the job {st}:\n{}", daemon.log_text()));
        }
        if Instant::now() > end {
            return Err(format!("still {st} after {JOB_DEADLINE:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a completed job's rows tell the truth: one job row, every byte
/// counted, every disk completed with its change id recorded (in `vm_disks`
/// and `cbt_history`). What is wrong, if anything.
pub fn rows_caught_up(db: &TestDb, id: &str, disks: &[&str]) -> Option<String> {
    let jobs = one(db, &format!("SELECT CAST(COUNT(*) AS CHAR) AS v FROM replication_jobs WHERE id = '{id}'"));
    if jobs.as_deref() != Some("1") {
        return Some(format!("{jobs:?} rows for job {id}"));
    }
    let (done, total) = (num(job(db, id, "bytes_transferred")), num(job(db, id, "total_bytes")));
    let percent = num(job(db, id, "progress_percent"));
    if done != total || percent != 100.0 {
        return Some(format!("job {id} completed with {done} of {total} bytes, {percent} %"));
    }
    for name in disks {
        let f = |field| disk(db, id, name, field).unwrap_or_default();
        let (synced, planned) = (f("bytes_synced"), f("planned_bytes"));
        let want = format!("cid-{name}");
        let history =
            one(db, &format!("SELECT change_id AS v FROM cbt_history WHERE job_id = '{id}' AND disk_id = '{name}'"))
                .unwrap_or_default();
        if f("sync_status") != "completed" || synced != planned || f("disk_change_id") != want || history != want {
            return Some(format!(
                "{name}: {} with {synced} of {planned} bytes, change id {:?}, history {history:?} (want {want})",
                f("sync_status"),
                f("disk_change_id")
            ));
        }
    }
    None
}

/// (offset, length) of every read in a log of nbdkit's log filter.
pub fn reads(log: &Path) -> Vec<(u64, u64)> {
    logged(log, "Read").into_iter().map(|r| (r.offset, r.count)).collect()
}

/// Bytes of `after` that some range of `before` covered too.
pub fn overlap(before: &[(u64, u64)], after: &[(u64, u64)]) -> u64 {
    let merged = merge(before);
    after.iter().flat_map(|&(o, n)| merged.iter().map(move |&(s, e)| e.min(o + n).saturating_sub(s.max(o)))).sum()
}

/// Bytes read more than once within `reads`.
pub fn read_twice(reads: &[(u64, u64)]) -> u64 {
    let once: u64 = merge(reads).iter().map(|(s, e)| e - s).sum();
    reads.iter().map(|r| r.1).sum::<u64>() - once
}

/// `(offset, length)` ranges as sorted, disjoint `(start, end)` ranges.
fn merge(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut b: Vec<(u64, u64)> = ranges.iter().map(|&(o, n)| (o, o + n)).collect();
    b.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in b {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}
