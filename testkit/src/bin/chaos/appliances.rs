//! Two appliances on one database (scenario `two`): two daemons with their own
//! node ids, configurations and admin sockets share one database and 20 jobs
//! of one 4 MiB disk each (file sources read at 1 MB/s, their reads logged;
//! file targets, their requests logged). Each daemon copies 4 disks at a time,
//! so the jobs are spread over both and over a few seconds.
//!
//! Round 0 has no fault: every job must be copied by exactly one node (no byte
//! of any source read twice, one owner seen). Then, at a random moment of the
//! batch's life (or the first moment after it at which A holds a job), daemon
//! A is
//! - killed with SIGKILL (odd rounds): B must take over every job A held within
//!   the lease + one discovery tick (+ 1.5 s for a loaded machine), and finish
//!   them, resuming from their checkpoints;
//! - stopped with SIGSTOP (even rounds) until B has taken over and finished
//!   every job, then continued: not one request may reach a target after that,
//!   and not one row may change (A must notice it lost its jobs and stop), and
//!   A must then exit 0 on SIGTERM.
//!
//! Every job ends `completed` with identical bytes and its rows right; jobs A
//! did not hold at the fault are read exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use testkit::harness::{Daemon, Server, file_checksum, logged, tempdir};
use testkit::jobs::{JOB_DEADLINE, disk, job, num, one, rows_of};
use testkit::mariadb::{TestDb, server};

use crate::image::{Rng, write_image};
use crate::{
    Round, Tally, Verdict, keep_if_problem, logged_source, overlap, queue_with_change_ids, read_twice, reads, revive,
    rows_caught_up,
};

const JOBS: usize = 20;
const MIB: u64 = 4;
/// Bits a second (nbdkit's rate filter): 1 MB/s.
const RATE: &str = "8M";
const LEASE: Duration = Duration::from_secs(3);
const TICK: Duration = Duration::from_millis(500);
/// What a loaded two-core machine adds to lease + tick.
const SLACK: Duration = Duration::from_millis(1500);

pub fn run(rounds: usize, rng: &mut Rng) -> Tally {
    let mut tally = Tally::default();
    let mut life = Duration::ZERO;
    for round in 0..=rounds {
        let label = format!("round {round}");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let at = (round > 0).then(|| life.mul_f64(rng.unit()));
            let kill = round % 2 == 1;
            Batch::new(round, rng).run(at, kill)
        }));
        match outcome {
            Ok((r, lived, note)) => {
                tally.notes.push(format!("{label}: {note}"));
                if round == 0 {
                    life = lived;
                    tally.uncounted += 1;
                    eprintln!("chaos: two: 20 jobs live {:.1} s", life.as_secs_f64());
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
    tally
}

struct Batch {
    dir: tempfile::TempDir,
    db: TestDb,
    ids: Vec<String>,
    sources: Vec<Server>,
    targets: Vec<Server>,
    files: Vec<(PathBuf, PathBuf)>,
    a: Daemon,
    b: Daemon,
}

impl Batch {
    fn new(round: usize, rng: &mut Rng) -> Batch {
        let dir = tempdir();
        let d = dir.path().to_path_buf();
        let db = server().fresh_database(&format!("chaos_two_{round}"));
        let (mut sources, mut targets, mut files, mut ids) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..JOBS {
            let name = format!("j{i:02}");
            let src = d.join(format!("{name}.img"));
            write_image(&src, MIB << 20, rng);
            sources.push(logged_source(&d, &name, &src, RATE));
            let dst = d.join(format!("{name}.target"));
            std::fs::File::create(&dst).and_then(|f| f.set_len(MIB << 20)).unwrap();
            let log = d.join(format!("{name}.writes.log"));
            targets.push(Server::nbdkit(
                &d,
                &format!("{name}-dst"),
                &[
                    "--filter=log",
                    "file",
                    &format!("file={}", dst.display()),
                    &format!("logfile={}", log.display()),
                    "logappend=true",
                ],
            ));
            files.push((src, dst));
            ids.push(format!("job-two-{round}-{name}"));
        }
        let env = [
            ("BLOCKREPL__DISCOVERY__LEASE", "3s"),
            ("BLOCKREPL__DISCOVERY__INTERVAL", "500ms"),
            ("BLOCKREPL__COPY__MAX_CONCURRENT_DISKS", "4"),
        ];
        let daemon = |sub: &str| {
            let home = d.join(sub);
            std::fs::create_dir_all(&home).unwrap();
            Daemon::start(&home, &db.url, &env)
        };
        let (a, b) = (daemon("a"), daemon("b"));
        Batch { dir, db, ids, sources, targets, files, a, b }
    }

    fn read_log(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("j{i:02}.reads.log"))
    }

    fn write_log(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("j{i:02}.writes.log"))
    }

    /// (job index, owner) of every owned job, in one query.
    fn owners(&self) -> BTreeMap<usize, String> {
        let v = one(
            &self.db,
            "SELECT GROUP_CONCAT(CONCAT(id, '=', owner_node) SEPARATOR ' ') AS v FROM replication_jobs \
             WHERE owner_node IS NOT NULL",
        )
        .unwrap_or_default();
        v.split_whitespace()
            .filter_map(|p| p.split_once('='))
            .filter_map(|(id, o)| self.ids.iter().position(|i| i == id).map(|i| (i, o.to_string())))
            .collect()
    }

    fn unfinished(&self) -> usize {
        num(one(
            &self.db,
            "SELECT CAST(COUNT(*) AS CHAR) AS v FROM replication_jobs \
             WHERE status NOT IN ('completed', 'failed', 'cancelled')",
        )) as usize
    }

    /// The unfinished jobs: id, status, operation and owner of each.
    fn unfinished_rows(&self) -> String {
        one(
            &self.db,
            "SELECT GROUP_CONCAT(CONCAT_WS('/', id, status, IFNULL(current_operation, '-'), IFNULL(owner_node, '-')) \
             SEPARATOR ', ') AS v FROM replication_jobs WHERE status NOT IN ('completed', 'failed', 'cancelled')",
        )
        .unwrap_or_default()
    }

    /// Requests of every kind that writes, over every target.
    fn target_requests(&self) -> Vec<usize> {
        (0..JOBS)
            .flat_map(|i| ["Write", "Zero", "Trim", "Flush"].map(|op| logged(&self.write_log(i), op).len()))
            .collect()
    }

    fn run(&mut self, at: Option<Duration>, kill: bool) -> (Round, Duration, String) {
        let t0 = Instant::now();
        for (i, id) in self.ids.iter().enumerate() {
            let disks = [("disk-1", self.sources[i].uri(), self.targets[i].uri())];
            queue_with_change_ids(&self.db, id, &disks);
        }
        // Every owner seen per job, polled until the end.
        let mut seen: Vec<BTreeSet<String>> = vec![BTreeSet::new(); JOBS];
        let mut held: Vec<usize> = Vec::new();
        let mut before: Vec<Vec<(u64, u64)>> = vec![Vec::new(); JOBS];
        let mut checkpoints = vec![0u64; JOBS];
        let mut fault_at = None;
        let mut taken_over = None;
        let mut verdict = None;
        let end = t0 + JOB_DEADLINE;
        loop {
            let owners = self.owners();
            for (i, o) in &owners {
                seen[*i].insert(o.clone());
            }
            // From the moment on, as soon as A holds a job (else the round
            // would prove nothing about takeovers or fencing).
            if let Some(at) = at
                && fault_at.is_none()
                && t0.elapsed() >= at
                && owners.values().any(|o| *o == self.a.node)
            {
                held = owners.iter().filter(|(_, o)| **o == self.a.node).map(|(i, _)| *i).collect();
                for &i in &held {
                    checkpoints[i] = num(disk(&self.db, &self.ids[i], "disk-1", "resume_offset")) as u64;
                }
                if kill {
                    self.a.kill9();
                } else {
                    self.a.signal(Signal::SIGSTOP);
                }
                for &i in &held {
                    before[i] = reads(&self.read_log(i));
                }
                fault_at = Some(Instant::now());
            } else if fault_at.is_some() {
                // A claim of A's whose commit was on its way at the fault shows
                // only now: it is held as well.
                for (&i, o) in &owners {
                    if *o == self.a.node && !held.contains(&i) {
                        checkpoints[i] = num(disk(&self.db, &self.ids[i], "disk-1", "resume_offset")) as u64;
                        before[i] = reads(&self.read_log(i));
                        held.push(i);
                    }
                }
            }
            revive(&mut self.sources);
            revive(&mut self.targets);
            if let Some(f) = fault_at
                && taken_over.is_none()
                && held.iter().all(|&i| {
                    owners.get(&i).is_some_and(|o| *o == self.b.node)
                        || job(&self.db, &self.ids[i], "status").as_deref() == Some("completed")
                })
            {
                taken_over = Some(f.elapsed());
            }
            if self.unfinished() == 0 {
                break;
            }
            if self.b.exited().is_some() || (fault_at.is_none() && self.a.exited().is_some()) {
                verdict = Some(Verdict::Crash(format!(
                    "a daemon exited:\nA: {}\nB: {}",
                    self.a.log_text(),
                    self.b.log_text()
                )));
                break;
            }
            if Instant::now() > end {
                verdict = Some(Verdict::Stuck(format!(
                    "{} jobs unfinished after {JOB_DEADLINE:?}: {}",
                    self.unfinished(),
                    self.unfinished_rows()
                )));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let lived = t0.elapsed();
        let recover = fault_at.map_or(Duration::ZERO, |f| f.elapsed());
        let by_a = seen.iter().filter(|s| s.contains(&self.a.node)).count();
        let by_b = seen.iter().filter(|s| s.contains(&self.b.node)).count();
        let mut note = format!("A claimed {by_a} jobs, B {by_b}");
        if let Some(_f) = fault_at {
            note.push_str(&format!(
                "; {} A held {} jobs, B had them all after {}",
                if kill { "killed," } else { "stopped," },
                held.len(),
                taken_over.map_or("never".to_string(), |t| format!("{:.1} s", t.as_secs_f64()))
            ));
        }
        let verdict = verdict.unwrap_or_else(|| self.judge(&held, &before, &checkpoints, &seen, taken_over, kill));
        let verdict = keep_if_problem(&mut self.dir, verdict);
        let reread = held
            .iter()
            .map(|&i| {
                let all = reads(&self.read_log(i));
                overlap(&before[i], &all[before[i].len()..])
            })
            .max()
            .unwrap_or(0);
        if !kill && fault_at.is_some() && self.a.pid().as_raw() != 0 {
            // A failed round must not leave A stopped.
            self.a.signal(Signal::SIGCONT);
        }
        (Round { verdict, reread, recover }, lived, note)
    }

    fn judge(
        &mut self,
        held: &[usize],
        before: &[Vec<(u64, u64)>],
        checkpoints: &[u64],
        seen: &[BTreeSet<String>],
        taken_over: Option<Duration>,
        kill: bool,
    ) -> Verdict {
        for (i, id) in self.ids.iter().enumerate() {
            let status = job(&self.db, id, "status").unwrap_or_default();
            if status != "completed" {
                return Verdict::FailedCleanly(format!(
                    "{id} {status}: {}",
                    job(&self.db, id, "error_message").unwrap_or_default()
                ));
            }
            if file_checksum(&self.files[i].0) != file_checksum(&self.files[i].1) {
                return Verdict::FalseSuccess(format!("{id}: completed, but the target differs from the source"));
            }
            if let Some(m) = rows_caught_up(&self.db, id, &["disk-1"]) {
                return Verdict::Wrong(m);
            }
            let all = reads(&self.read_log(i));
            if held.contains(&i) {
                if let Some(&(off, _)) = all[before[i].len()..].iter().find(|(off, _)| *off < checkpoints[i]) {
                    return Verdict::FalseSuccess(format!(
                        "{id}: offset {off} read again after the fault, below its checkpoint {}",
                        checkpoints[i]
                    ));
                }
            } else {
                let twice = read_twice(&all);
                if twice > 0 || seen[i].len() > 1 {
                    return Verdict::Wrong(format!(
                        "{id}: copied by more than one node ({twice} bytes read twice, owners {:?})",
                        seen[i]
                    ));
                }
            }
        }
        if !held.is_empty() {
            let limit = LEASE + TICK + SLACK;
            match taken_over {
                Some(t) if t <= limit => {}
                other => return Verdict::Wrong(format!("B took A's jobs over after {other:?}, limit {limit:?}")),
            }
        }
        if !kill && !held.is_empty() {
            return self.fenced(held);
        }
        Verdict::Identical
    }

    /// A, stopped past its lease while B finished its jobs, is continued: not
    /// one request to a target, not one row changed; then it exits 0.
    fn fenced(&mut self, held: &[usize]) -> Verdict {
        // B's last writes (releases, events) may follow its last status: the
        // rows are taken once B has no job and nothing left to write.
        let end = Instant::now() + JOB_DEADLINE;
        loop {
            let h = self.b.cli(&["health", "--json"]);
            let v: serde_json::Value = serde_json::from_str(h.stdout.trim()).unwrap_or_default();
            if v["active_jobs"].as_u64() == Some(0) && v["database_backlog"].as_u64() == Some(0) {
                break;
            }
            if Instant::now() > end {
                return Verdict::Stuck(format!("B never settled: {}", h.stdout.trim()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let requests = self.target_requests();
        // Jobs A still owns (it finished them before it was stopped, so nobody
        // took them over) are its own to write: it releases their leases.
        let owners = self.owners();
        let lost: Vec<usize> = (0..JOBS).filter(|i| owners.get(i) != Some(&self.a.node)).collect();
        let rows: Vec<Vec<String>> = lost.iter().map(|&i| rows_of(&self.db, &self.ids[i])).collect();
        self.a.signal(Signal::SIGCONT);
        let end = Instant::now() + JOB_DEADLINE;
        loop {
            let log = self.a.log_text();
            if log.contains("lease not renewed in time") || log.contains("no longer ours") {
                break;
            }
            if Instant::now() > end {
                return Verdict::Stuck(format!("A never noticed that it lost {} jobs:\n{log}", held.len()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (status, _) = self.a.terminate();
        if !status.success() {
            return Verdict::Crash(format!("A ended with {status} on SIGTERM:\n{}", self.a.log_text()));
        }
        let now = self.target_requests();
        if let Some(k) = (0..now.len()).find(|&k| now[k] != requests[k]) {
            return Verdict::Wrong(format!(
                "A sent requests to a target after it lost the job (FENCE BROKEN): {} ({} requests of kind {} \
                 before, {} after; kinds Write, Zero, Trim, Flush)",
                self.ids[k / 4],
                requests[k],
                k % 4,
                now[k]
            ));
        }
        let after: Vec<Vec<String>> = lost.iter().map(|&i| rows_of(&self.db, &self.ids[i])).collect();
        if let Some((was, is)) = rows.iter().zip(&after).find(|(was, is)| was != is) {
            return Verdict::Wrong(format!(
                "A changed rows of a job it had lost (FENCE BROKEN): before {was:?}, after {is:?}"
            ));
        }
        Verdict::Identical
    }
}
