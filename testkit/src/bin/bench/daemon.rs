//! The daemon scenario: one `blockrepl serve` with a private MariaDB copies N disks
//! as ONE job queued with plain SQL, as an orchestrator queues it; in the same
//! rounds, N parallel `nbdcopy --flush` and N parallel plain `blockrepl copy`
//! (the same engine tuning as the daemon) copy the same disks. The last gives the
//! daemon's overhead (actors, progress tracking, database writes, discovery) over
//! the bare engine.
//!
//! The job is timed from its COMMIT until its row says `completed` (polled every
//! 20 ms), and checked: its status and figures, its disks' rows, its events, how
//! often it was claimed, and the daemon's log. Between runs the daemon must be idle
//! again (lease released, no active job).

use std::path::Path;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::mysql::{Mysql, MysqlConnection};
use diesel::prelude::*;
use diesel::sql_types::Text;
use serde_json::Value;
use testkit::harness::{Daemon, Server, allocation_map, data_bytes, tail_lines};
use testkit::mariadb;

use crate::pair::{shell, strings, strs};
use crate::run::{self, DAEMON_WRAPPER, OWN_SESSION, Stop, own_cpu, process_cpu, status_code, system_busy, timed};
use crate::scenario::{
    Bench, DetailRow, Figures, MIB, Outcome, ResultRow, Scenario, delta, median, or_nan, others, percent_band, range,
    rotated, round_name,
};
use crate::settings::{Settings, human};

pub struct DaemonJob;

/// The three ways the disks are copied in every round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// One job of `blockrepl serve`.
    Daemon,
    /// N parallel `nbdcopy --flush`.
    Nbdcopy,
    /// N parallel `blockrepl copy`.
    Blockrepl,
}

const KINDS: [Kind; 3] = [Kind::Daemon, Kind::Nbdcopy, Kind::Blockrepl];

/// One disk of the job.
struct Disk {
    id: String,
    label: String,
    source: String,
    target: String,
    /// Its source's data bytes.
    data_bytes: u64,
}

/// One timed run of one kind.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    f: Figures,
    /// CPU seconds of the database and of this benchmark (queueing and polling).
    db_cpu: Option<f64>,
    /// The daemon's job only: seconds from the row's created_at to started_at.
    wait: Option<f64>,
    /// The daemon's job only: the row's completed_at − started_at.
    own: Option<f64>,
}

/// The CPU counters at one moment.
#[derive(Clone, Copy)]
struct Snapshot {
    servers: Option<f64>,
    daemon: Option<f64>,
    db: Option<f64>,
    bench: f64,
    busy: Option<f64>,
}

/// The sources' and targets' nbdkit arguments of disk `i`.
fn disk_servers(o: &Settings, i: u32) -> (Vec<String>, Vec<String>) {
    let s = human(o.daemon_size);
    let source = if o.daemon_percent >= 100 {
        strings(&["pattern", &format!("size={s}")])
    } else {
        strings(&[
            "sparse-random",
            &format!("size={s}"),
            &format!("percent={}", o.daemon_percent),
            &format!("seed={}", o.seed + u64::from(i)),
        ])
    };
    (source, strings(&["memory", &format!("size={s}"), "allocator=malloc"]))
}

/// What a scenario with a private MariaDB needs (nothing with an external one).
pub fn needs_mariadb() -> Vec<&'static str> {
    if std::env::var(mariadb::URL_VAR).is_ok_and(|u| !u.is_empty()) {
        Vec::new()
    } else {
        vec!["mariadbd", "mariadb-install-db"]
    }
}

/// The daemon's configuration: the defaults, but for the database, the admin
/// socket (in `dir`, group: ours), the node id, logs on stderr, the discovery
/// interval and, when given, the disks copied at once.
pub fn config(o: &Settings, dir: &Path, db_url: &str, node: &str) -> String {
    let q = |s: &str| Value::from(s).to_string();
    let group = nix::unistd::Group::from_gid(nix::unistd::getgid()).ok().flatten().map_or("root".into(), |g| g.name);
    let mut c = format!(
        "# written by scripts/bench\n[database]\nurl = {}\n[admin]\nsocket = {}\ngroup = {}\n[node]\nid = {}\n\
         [discovery]\ninterval = {}\n[log]\ntarget = \"stderr\"\nlevel = \"info\"\n",
        q(db_url),
        q(&Daemon::admin_socket_in(dir).display().to_string()),
        q(&group),
        q(node),
        q(&o.discovery_interval)
    );
    if let Some(n) = o.max_concurrent_disks {
        c += &format!("[copy]\nmax_concurrent_disks = {n}\n");
    }
    c
}

impl Scenario for DaemonJob {
    fn name(&self) -> &'static str {
        "daemon"
    }

    fn needs(&self) -> Vec<&'static str> {
        needs_mariadb()
    }

    fn run(&self, bench: &Bench, dir: &Path) -> Result<Box<dyn Outcome>, Stop> {
        let opt = &bench.opt;
        let n = opt.disks;
        let mut servers = Vec::new();
        let mut disks = Vec::new();
        for i in 0..n {
            let (src_args, dst_args) = disk_servers(opt, i);
            let source = Server::nbdkit_under(dir, &format!("source{}", i + 1), &strs(&src_args), OWN_SESSION);
            let target = Server::nbdkit_under(dir, &format!("target{}", i + 1), &strs(&dst_args), OWN_SESSION);
            disks.push(Disk {
                id: format!("disk-{}", i + 1),
                label: format!("Hard disk {}", i + 1),
                source: source.uri(),
                target: target.uri(),
                data_bytes: data_bytes(&allocation_map(&source.uri())),
            });
            servers.extend([source, target]);
        }
        let nbytes = disks.iter().map(|d| d.data_bytes).sum();

        let t = Instant::now();
        let server = mariadb::server();
        let db = server.fresh_database("bench");
        let t_db = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut daemon = Daemon::start_with(dir, &config(opt, dir, &db.url, "bench"), "bench", &[], DAEMON_WRAPPER);
        let t_daemon = t.elapsed().as_secs_f64();
        let mut conn = db.connect();
        // created_at (a column default) then comes out in UTC, like the daemon's times.
        sql(&mut conn, "SET time_zone = '+00:00'")?;

        let (src_args, dst_args) = disk_servers(opt, 0);
        let overrides: Vec<String> =
            std::env::vars().map(|(k, _)| k).filter(|k| k.starts_with("BLOCKREPL__")).collect();
        println!(
            "\n## daemon: {n} disks, each source `nbdkit {}`{}, target `nbdkit {}`; {nbytes} data bytes in all ({:.0} MiB)\n  \
             MariaDB (database {}) ready in {t_db:.1} s; `blockrepl serve` READY in {t_daemon:.2} s; discovery.interval {}{}{}{}",
            shell(&src_args),
            if opt.daemon_percent < 100 { " (seed +1 per disk)" } else { "" },
            shell(&dst_args),
            nbytes as f64 / MIB,
            db.name,
            opt.discovery_interval,
            opt.max_concurrent_disks.map_or(String::new(), |m| format!(", max_concurrent_disks {m}")),
            if opt.kick { "; POST /api/v1/discover after each INSERT (--kick)" } else { "" },
            if overrides.is_empty() {
                String::new()
            } else {
                format!("; environment overrides: {}", overrides.join(", "))
            },
        );
        let slots = opt.max_concurrent_disks.unwrap_or(8);
        if n > slots {
            println!("  note: the daemon copies at most {slots} disks at once, the parallel tools all {n}");
        }

        let mut rounds = Rounds {
            bench,
            conn,
            daemon: &mut daemon,
            servers: &mut servers,
            disks,
            nbytes,
            db_pid: server.pid(),
            claims: Vec::new(),
            reclaimed: Vec::new(),
        };
        let outcome = rounds.run(dir);
        stop(bench, &mut daemon);
        Ok(Box::new(outcome?))
    }
}

/// SIGTERM, and notes a slow or unclean stop and the WARN and ERROR lines of the
/// daemon's log.
pub fn stop(bench: &Bench, daemon: &mut Daemon) {
    if daemon.exited().is_none() {
        let (status, took) = daemon.terminate();
        if !status.success() {
            bench.odd(format!("daemon: `blockrepl serve` exited with status {} on SIGTERM", status_code(&status)));
        } else if took > Duration::from_secs(5) {
            bench.odd(format!("daemon: `blockrepl serve` took {:.1} s to stop on SIGTERM", took.as_secs_f64()));
        }
    }
    let log = daemon.log_text();
    let warn: Vec<&str> = log
        .lines()
        .filter(|l| l.split(|c: char| !(c.is_alphanumeric() || c == '_')).any(|w| w == "WARN" || w == "ERROR"))
        .collect();
    if let Some(first) = warn.first() {
        let first: String = first.trim().chars().take(300).collect();
        bench.odd(format!("daemon: {} WARN/ERROR line(s) in its log, first: {first}", warn.len()));
    }
}

/// The rounds of the daemon scenario and what they need.
struct Rounds<'a> {
    bench: &'a Bench,
    /// The orchestrator's connection (UTC session).
    conn: MysqlConnection,
    daemon: &'a mut Daemon,
    servers: &'a mut Vec<Server>,
    disks: Vec<Disk>,
    nbytes: u64,
    /// mariadbd's pid (none for an external server).
    db_pid: Option<u32>,
    /// How often each round's job was claimed (by round, warm-ups included).
    claims: Vec<u32>,
    /// The jobs claimed more than once.
    reclaimed: Vec<String>,
}

impl Rounds<'_> {
    fn snapshot(&self) -> Snapshot {
        let servers: Option<Vec<f64>> = self.servers.iter().map(|s| s.pid().and_then(process_cpu)).collect();
        Snapshot {
            servers: servers.map(|v| v.iter().sum()),
            daemon: process_cpu(self.daemon.pid().as_raw() as u32),
            db: self.db_pid.and_then(process_cpu),
            bench: own_cpu(),
            busy: system_busy(),
        }
    }

    fn servers_alive(&mut self) -> bool {
        self.servers.iter_mut().all(Server::alive)
    }

    fn labels(&self) -> [String; 3] {
        let n = self.disks.len();
        [format!("daemon (1 job, {n} disks)"), format!("nbdcopy ×{n}"), format!("blockrepl copy ×{n}")]
    }

    fn run(&mut self, dir: &Path) -> Result<DaemonOutcome, Stop> {
        let opt = &self.bench.opt;
        let labels = self.labels();
        let width = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
        let mut results: [Vec<Run>; 3] = Default::default();
        let mut rounds: Vec<[Run; 3]> = Vec::new();
        for round in 0..opt.warmup + opt.runs {
            let what = round_name(opt, round);
            let mut this = [Run::default(); 3];
            for kind in rotated(&KINDS, round) {
                let k = kind as usize;
                let before = self.snapshot();
                let (mut r, after, cpu, note) = match kind {
                    Kind::Daemon => {
                        let (r, after) = self.job(round, &what)?;
                        (r, after, None, String::new())
                    }
                    _ => {
                        let (r, cpu, note) = self.parallel(kind, round, &what, &labels[k], dir)?;
                        (r, self.snapshot(), Some(cpu), note)
                    }
                };
                let servers = delta(before.servers, after.servers);
                let mut copier = delta(before.daemon, after.daemon);
                let db = delta(before.db, after.db).map(|d| d + after.bench - before.bench);
                let cpu = if kind == Kind::Daemon { copier.replace(0.0) } else { cpu };
                // Everything else: the other tools' idle daemon, the database, this
                // benchmark, other users of the machine.
                let accounted = [servers, cpu, copier, db].into_iter().sum::<Option<f64>>();
                let busy = delta(before.busy, after.busy);
                r.f.others = busy.zip(accounted).map(|(b, a)| others(b, a, r.f.wall));
                r.f.cpu = cpu;
                r.f.servers_cpu = servers;
                r.db_cpu = db;
                let extra = if kind == Kind::Daemon {
                    format!(
                        "  [INSERT→started_at {:.2} s, started_at→completed_at {:.3} s]",
                        or_nan(r.wait),
                        or_nan(r.own)
                    )
                } else {
                    String::new()
                };
                println!(
                    "  {what:9} {:<width$} {:7.3} s {:9.1} MiB/s  cpu {:6.2} s  servers cpu {:6.2} s  db cpu {:5.2} s  others {:4.2} CPU{extra}{note}",
                    labels[k],
                    r.f.wall,
                    r.f.bps / MIB,
                    or_nan(r.f.cpu),
                    or_nan(servers),
                    or_nan(db),
                    or_nan(r.f.others),
                );
                this[k] = r;
                if round >= opt.warmup {
                    results[k].push(r);
                }
                run::check()?;
            }
            if round >= opt.warmup {
                rounds.push(this);
            }
        }
        self.final_sweep()?;
        let timed_claims = self.claims.iter().skip(opt.warmup as usize).copied().collect();
        Ok(DaemonOutcome {
            labels,
            nbytes: self.nbytes,
            disks: self.disks.len(),
            results,
            rounds,
            claims: timed_claims,
            reclaimed: self.reclaimed.clone(),
            jobs: opt.warmup + opt.runs,
            discovery_interval: opt.discovery_interval.clone(),
            kick: opt.kick,
        })
    }

    /// N parallel `nbdcopy` or `blockrepl copy`: the run, its CPU seconds, a note.
    fn parallel(
        &mut self,
        kind: Kind,
        round: u32,
        what: &str,
        label: &str,
        dir: &Path,
    ) -> Result<(Run, f64, String), Stop> {
        let bench = self.bench;
        let cmds: Vec<Vec<String>> = self
            .disks
            .iter()
            .map(|d| {
                let mut cmd = match kind {
                    Kind::Nbdcopy => strings(&["nbdcopy", "--flush"]),
                    _ => vec![bench.blockrepl.clone(), "copy".into(), "--json".into()],
                };
                if kind == Kind::Nbdcopy {
                    cmd.extend(bench.nbdcopy_extra.iter().cloned());
                }
                cmd.extend([d.source.clone(), d.target.clone()]);
                cmd
            })
            .collect();
        let tag = format!("{}-{round}", if kind == Kind::Nbdcopy { "nbdcopy" } else { "blockrepl" });
        let t = timed(&cmds, dir, &tag)?;
        let failed = t.first_failure();
        if failed.is_some() || !self.servers_alive() {
            let i = failed.unwrap_or(0);
            let why =
                failed.map_or("a server died".to_string(), |i| format!("exit status {}", status_code(&t.statuses[i])));
            let stderr = crate::pair::last_chars(t.stderrs[i].trim(), 2000);
            return Err(Stop::failed(format!(
                "daemon: {label} {what} failed ({why}) after {:.2} s\n  command: {}\n  stderr:  {}\n  source log: {}\n  target log: {}",
                t.wall,
                shell(&cmds[i]),
                if stderr.is_empty() { "(empty)" } else { stderr },
                self.servers[2 * i].log_tail(5),
                self.servers[2 * i + 1].log_tail(5)
            )));
        }
        let mut note = String::new();
        if kind == Kind::Blockrepl {
            let notes: Vec<String> = self
                .disks
                .iter()
                .zip(&t.stdouts)
                .filter_map(|(d, out)| {
                    let name = format!("daemon ({}, blockrepl copy)", d.id);
                    let nt = bench.check_json(&name, out, d.data_bytes, t.wall);
                    (!nt.is_empty()).then(|| format!("{}{}", d.id, nt.trim()))
                })
                .collect();
            if !notes.is_empty() {
                note = format!("  {}", notes.join(" "));
            }
        }
        if bench.opt.verbose {
            for (d, e) in self.disks.iter().zip(&t.stderrs) {
                if !e.trim().is_empty() {
                    note += &format!("\n    {} stderr: {}", d.id, e.trim().replace('\n', "\n    "));
                }
            }
        }
        let f = Figures { wall: t.wall, bps: self.nbytes as f64 / t.wall, ..Figures::default() };
        Ok((Run { f, ..Run::default() }, t.cpu, note))
    }

    /// Queues one job, polls its row until it ends, waits until the daemon is idle
    /// again, and checks the job's rows: the run and the CPU counters at its end.
    fn job(&mut self, round: u32, what: &str) -> Result<(Run, Snapshot), Stop> {
        let bench = self.bench;
        let opt = &bench.opt;
        let job_id = format!("job-{}", round + 1);
        let q = format!("'{job_id}'");
        let t0 = self.queue(&job_id, &format!("vol-{}", round + 1))?;
        if opt.kick {
            discover_now(bench, self.daemon);
        }
        let claim_limit = opt.interval_seconds + 15.0;
        let deadline = 120.0 + self.nbytes as f64 / (10.0 * MIB);
        let mut claimed = false;
        let (status, wall, after) = loop {
            let row = rows(
                &mut self.conn,
                &format!("SELECT JSON_ARRAY(status, started_at IS NOT NULL) AS v FROM replication_jobs WHERE id = {q}"),
            )?;
            let waited = t0.elapsed().as_secs_f64();
            let status = row.first().map(|r| text(&r[0])).unwrap_or_else(|| "None".into());
            claimed |= row.first().is_some_and(|r| r[1] == 1);
            if ["completed", "failed", "cancelled"].contains(&status.as_str()) {
                // The CPU counters at the end of the timed part.
                break (status, waited, self.snapshot());
            }
            let why = if let Some(st) = self.daemon.exited() {
                Some(format!("the daemon exited (status {})", status_code(&st)))
            } else if !self.servers_alive() {
                Some("an nbdkit server died".to_string())
            } else if !claimed && waited > claim_limit {
                Some(format!(
                    "the daemon did not claim the job within {claim_limit:.0} s (discovery.interval {}); status '{status}'",
                    opt.discovery_interval
                ))
            } else if waited > deadline {
                Some(format!("the job was not finished after {waited:.0} s (status '{status}')"))
            } else {
                None
            };
            if let Some(why) = why {
                return Err(Stop::failed(format!("daemon: {what}: {why}\n  daemon log:\n    {}", self.daemon_tail())));
            }
            run::check()?;
            std::thread::sleep(Duration::from_millis(20));
        };
        let busy_seen = self.settle(&job_id)?;

        let row = rows(
            &mut self.conn,
            &format!(
                "SELECT JSON_ARRAY(status, bytes_transferred, total_bytes, progress_percent, current_operation, \
                 TIMESTAMPDIFF(MICROSECOND, created_at, started_at), TIMESTAMPDIFF(MICROSECOND, started_at, completed_at), \
                 IFNULL(error_message, ''), transfer_speed_bps, eta_seconds, \
                 (SELECT COUNT(DISTINCT correlation_id) FROM job_events WHERE job_id = {q})) AS v \
                 FROM replication_jobs WHERE id = {q}"
            ),
        )?;
        let row = row.into_iter().next().unwrap_or_default();
        let col = |i: usize| row.get(i).cloned().unwrap_or(Value::Null);
        let disks = rows(
            &mut self.conn,
            &format!(
                "SELECT JSON_ARRAY(disk_id, sync_status, capacity_bytes, planned_bytes, bytes_synced, skipped_bytes, \
                 sync_progress_percent, IFNULL(error_message, ''), resume_offset, throughput_bps) AS v \
                 FROM vm_disks WHERE job_id = {q} ORDER BY disk_id"
            ),
        )?;
        let events = rows(
            &mut self.conn,
            &format!(
                "SELECT JSON_ARRAY(level, stage, message) AS v FROM job_events \
                 WHERE job_id = {q} AND level NOT IN ('info', 'debug') ORDER BY id LIMIT 5"
            ),
        )?;
        let err = text(&col(7));
        if status != "completed" {
            let unfinished: Vec<&Vec<Value>> = disks.iter().filter(|d| text(&d[1]) != "completed").collect();
            let same: Vec<String> = unfinished.iter().filter(|d| text(&d[7]) == err).map(|d| text(&d[0])).collect();
            let mut derr: Vec<String> = unfinished
                .iter()
                .filter(|d| text(&d[7]) != err)
                .map(|d| format!("{} {}: {}", text(&d[0]), text(&d[1]), or_none(&text(&d[7]))))
                .collect();
            if !same.is_empty() {
                derr.push(format!(
                    "{} {} the job's error",
                    same.join(", "),
                    if same.len() == 1 { "has" } else { "have" }
                ));
            }
            return Err(Stop::failed(format!(
                "daemon: {what}: job {job_id} ended '{status}': {}{}\n  daemon log:\n    {}",
                or_none(&err),
                if derr.is_empty() { String::new() } else { format!("; disks: {}", derr.join("; ")) },
                self.daemon_tail()
            )));
        }
        let (moved, total) = (col(1).as_u64(), col(2).as_u64());
        if !(moved == Some(self.nbytes) && total == Some(self.nbytes)) {
            return Err(Stop::failed(format!(
                "daemon: {what}: job {job_id} completed but bytes_transferred {}, total_bytes {}; \
                 the sources hold {} data bytes (their allocation maps)",
                col(1),
                col(2),
                self.nbytes
            )));
        }
        let odd = |msg: String| bench.odd(format!("daemon: {msg}"));
        if col(3).as_f64() != Some(100.0) {
            odd(format!("completed job has progress_percent {}", col(3)));
        }
        if !["PersistChangeIDs", "PersistChangeIds"].contains(&text(&col(4)).as_str()) {
            odd(format!("completed job has current_operation '{}'", text(&col(4))));
        }
        if !err.is_empty() {
            odd(format!("completed job has error_message '{err}'"));
        }
        if !(col(9).is_null() || col(9) == 0) || col(8) != 0 {
            odd(format!("completed job has eta_seconds {}, transfer_speed_bps {}", col(9), col(8)));
        }
        if busy_seen {
            odd("still running a job after the job completed before the next tool could run".to_string());
        }
        if disks.len() != self.disks.len() {
            odd(format!("job has {} vm_disks rows, {} inserted", disks.len(), self.disks.len()));
        }
        for d in &disks {
            let id = text(&d[0]);
            if text(&d[1]) != "completed" {
                odd(format!("disk {id} of a completed job has sync_status '{}'", text(&d[1])));
            }
            if d[2].as_u64() != Some(opt.daemon_size) {
                odd(format!("disk {id}: capacity_bytes {} != size {}", d[2], opt.daemon_size));
            }
            if let Some(want) = self.disks.iter().find(|x| x.id == id).map(|x| x.data_bytes)
                && d[3].as_u64() != Some(want)
            {
                odd(format!("disk {id}: planned_bytes {} != its source's data bytes {want}", d[3]));
            }
            if d[4] != d[3] {
                odd(format!("disk {id}: bytes_synced {} != planned_bytes {}", d[4], d[3]));
            }
            if d[6].as_f64() != Some(100.0) {
                odd(format!("disk {id}: completed with sync_progress_percent {}", d[6]));
            }
            if !text(&d[7]).is_empty() {
                odd(format!("disk {id}: completed with error_message '{}'", text(&d[7])));
            }
            if d[9] != 0 {
                odd(format!("disk {id}: completed with throughput_bps {} (a finished disk moves nothing)", d[9]));
            }
        }
        for e in &events {
            let msg: String = text(&e[2]).chars().take(200).collect();
            odd(format!("job_events {} ({}): {msg}", text(&e[0]), text(&e[1])));
        }
        let micros = |v: Value| v.as_f64().map(|us| us / 1e6);
        let (wait, own) = (micros(col(5)), micros(col(6)));
        if let Some(own) = own.filter(|&own| own > wall + 0.05) {
            odd(format!(
                "completed_at - started_at ({own:.3} s) is longer than the wall time we observed ({wall:.3} s)"
            ));
        }
        if let Some(wait) = wait.filter(|&w| w > opt.interval_seconds + 1.0 && !opt.kick) {
            odd(format!(
                "{job_id}: {wait:.2} s from INSERT to started_at, more than discovery.interval ({}) + 1 s",
                opt.discovery_interval
            ));
        }
        self.claims.push(1);
        if let Some(runs) = col(10).as_u64().filter(|&r| r > 1) {
            self.note_reclaim(&job_id, runs as u32);
        }
        let f = Figures { wall, bps: self.nbytes as f64 / wall, ..Figures::default() };
        Ok((Run { f, wait, own, ..Run::default() }, after))
    }

    /// The orchestrator's part: the job and its disks in one transaction, plain SQL.
    /// Returns when the COMMIT was acknowledged.
    fn queue(&mut self, job_id: &str, export: &str) -> Result<Instant, Stop> {
        let disks = &self.disks;
        self.conn
            .transaction::<_, diesel::result::Error, _>(|c| {
                diesel::sql_query(
                    "INSERT INTO replication_jobs (id, vm_name, replication_type, status, nbd_export_name) \
                     VALUES (?, 'vm1', 'full', 'replicating', ?)",
                )
                .bind::<Text, _>(job_id)
                .bind::<Text, _>(export)
                .execute(c)?;
                let values = vec!["(?, ?, ?, ?, ?)"; disks.len()].join(", ");
                let mut insert = diesel::sql_query(format!(
                    "INSERT INTO vm_disks (job_id, disk_id, label, source_uri, target_uri) VALUES {values}"
                ))
                .into_boxed::<Mysql>();
                for d in disks {
                    insert = insert
                        .bind::<Text, _>(job_id.to_string())
                        .bind::<Text, _>(d.id.clone())
                        .bind::<Text, _>(d.label.clone())
                        .bind::<Text, _>(d.source.clone())
                        .bind::<Text, _>(d.target.clone());
                }
                insert.execute(c)?;
                Ok(())
            })
            .map_err(|e| Stop::failed(format!("daemon: cannot queue job {job_id}: {e}")))?;
        Ok(Instant::now())
    }

    /// Before the next tool runs, the daemon must be idle again: the job's lease
    /// released (its last write) and then no job active. Not part of the job's
    /// time. The admin socket is asked only once the lease is released: asking
    /// earlier changes the daemon's timing at the end of a job. Returns whether a
    /// job was still active after the lease was released.
    fn settle(&mut self, job_id: &str) -> Result<bool, Stop> {
        let start = Instant::now();
        let mut busy_seen = false;
        loop {
            let owner = rows(
                &mut self.conn,
                &format!("SELECT JSON_ARRAY(owner_node) AS v FROM replication_jobs WHERE id = '{job_id}'"),
            )?;
            let owner = owner.first().map_or(Value::Null, |r| r[0].clone());
            let mut active = None;
            if owner.is_null() {
                let health = self.daemon.cli(&["health", "--json"]).json();
                let n = health["active_jobs"].as_u64().unwrap_or(0);
                busy_seen |= n > 0;
                if n == 0 {
                    return Ok(busy_seen);
                }
                active = Some(n);
            }
            if start.elapsed() > Duration::from_secs(20) || self.daemon.exited().is_some() {
                self.bench.odd(format!(
                    "daemon: {job_id}: 20 s after it completed, owner_node is {owner} and the daemon still runs {} job(s)",
                    active.map_or("None".to_string(), |n| n.to_string())
                ));
                return Ok(busy_seen);
            }
            run::check()?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn note_reclaim(&mut self, job_id: &str, runs: u32) {
        let round = job_id.trim_start_matches("job-").parse::<usize>().unwrap_or(1) - 1;
        if let Some(c) = self.claims.get_mut(round) {
            *c = (*c).max(runs);
        }
        if self.reclaimed.iter().any(|j| j == job_id) {
            return;
        }
        self.reclaimed.push(job_id.to_string());
        let what = round_name(&self.bench.opt, round as u32);
        self.bench.odd(format!(
            "daemon: {job_id} ({what}) was claimed {runs} times (job_events has {runs} correlation ids): the \
             daemon claimed the job again as it finished and ran it again (daemon.log: `claimed job` \
             right after `Succeeded`)"
        ));
    }

    /// After the last round: every job must still be completed with all its disks
    /// (a second run of a finished job must not have changed its rows), and each
    /// job should have been claimed once.
    fn final_sweep(&mut self) -> Result<(), Stop> {
        let jobs = rows(
            &mut self.conn,
            "SELECT JSON_ARRAY(j.id, j.status, \
             (SELECT COUNT(DISTINCT e.correlation_id) FROM job_events e WHERE e.job_id = j.id), \
             (SELECT COUNT(*) FROM vm_disks d WHERE d.job_id = j.id AND (d.sync_status <> 'completed' \
             OR d.bytes_synced <> d.planned_bytes))) AS v FROM replication_jobs j ORDER BY j.created_at",
        )?;
        for j in jobs {
            let id = text(&j[0]);
            if text(&j[1]) != "completed" {
                self.bench.odd(format!("daemon: at the end, {id} has status '{}' (it was completed)", text(&j[1])));
            }
            if j[3] != 0 {
                self.bench.odd(format!(
                    "daemon: at the end, {} disk row(s) of {id} are not completed or have bytes_synced <> planned_bytes",
                    j[3]
                ));
            }
            if let Some(runs) = j[2].as_u64().filter(|&r| r > 1) {
                self.note_reclaim(&id, runs as u32);
            }
        }
        Ok(())
    }

    fn daemon_tail(&self) -> String {
        tail_lines(&self.daemon.log, 8, "\n    ")
    }
}

/// `POST /api/v1/discover` on the admin socket, in-process: inside the timed part,
/// where starting a `blockrepl discover` process would add its start-up time.
fn discover_now(bench: &Bench, daemon: &Daemon) {
    use std::io::{Read, Write};
    let answer = (|| {
        let mut s = std::os::unix::net::UnixStream::connect(&daemon.admin_socket)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(
            b"POST /api/v1/discover HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok::<_, std::io::Error>(answer)
    })();
    let status_line = match &answer {
        Ok(a) => a.lines().next().unwrap_or("").to_string(),
        Err(e) => e.to_string(),
    };
    if !status_line.split_whitespace().nth(1).is_some_and(|code| code.starts_with('2')) {
        bench.odd(format!("daemon: POST /api/v1/discover answered: {status_line}"));
    }
}

/// Runs statements that return nothing.
fn sql(conn: &mut MysqlConnection, statements: &str) -> Result<(), Stop> {
    conn.batch_execute(statements).map_err(|e| Stop::failed(format!("daemon: {e}: in {statements}")))
}

/// The rows of `query`, which must return one column `v` holding a JSON array
/// (`SELECT JSON_ARRAY(a, b, ...) AS v`): each row's values, typed as the
/// database gave them.
fn rows(conn: &mut MysqlConnection, query: &str) -> Result<Vec<Vec<Value>>, Stop> {
    #[derive(QueryableByName)]
    struct V {
        #[diesel(sql_type = Text)]
        v: String,
    }
    let fail = |e: String| Stop::failed(format!("daemon: {e}: in {query}"));
    let loaded = diesel::sql_query(query).load::<V>(conn).map_err(|e| fail(e.to_string()))?;
    loaded.iter().map(|r| serde_json::from_str(&r.v).map_err(|e| fail(e.to_string()))).collect()
}

/// A value as text: strings as they are, NULL as `None`.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "None".to_string(),
        other => other.to_string(),
    }
}

fn or_none(s: &str) -> &str {
    if s.is_empty() { "(no error message)" } else { s }
}

/// Every run of the daemon scenario.
struct DaemonOutcome {
    /// Labels of the daemon, nbdcopy and blockrepl runs, in `Kind` order.
    labels: [String; 3],
    nbytes: u64,
    disks: usize,
    results: [Vec<Run>; 3],
    /// Each timed round's run of every kind.
    rounds: Vec<[Run; 3]>,
    /// How often each timed round's job was claimed.
    claims: Vec<u32>,
    reclaimed: Vec<String>,
    /// Jobs queued, warm-ups included.
    jobs: u32,
    discovery_interval: String,
    kick: bool,
}

const D: usize = Kind::Daemon as usize;
const N: usize = Kind::Nbdcopy as usize;
const B: usize = Kind::Blockrepl as usize;

impl DaemonOutcome {
    fn mibs(&self, k: usize) -> f64 {
        median(self.results[k].iter().map(|r| Some(r.f.bps))) / MIB
    }
}

impl Outcome for DaemonOutcome {
    fn results(&self) -> Vec<ResultRow> {
        let n = self.disks;
        vec![
            ResultRow {
                label: format!("daemon, {n} disks (one job; INSERT → completed) vs nbdcopy ×{n}"),
                blockrepl: self.mibs(D),
                nbdcopy: self.mibs(N),
            },
            ResultRow {
                label: format!("daemon scenario without the daemon: blockrepl copy ×{n} vs nbdcopy ×{n}"),
                blockrepl: self.mibs(B),
                nbdcopy: self.mibs(N),
            },
        ]
    }

    fn remarks(&self) -> String {
        let n = self.disks;
        let rounds = &self.rounds;
        let e2e = |rs: &[&[Run; 3]]| rs.iter().map(|r| Some(r[D].f.wall / r[B].f.wall - 1.0)).collect::<Vec<_>>();
        let own = |rs: &[&[Run; 3]]| rs.iter().map(|r| r[D].own.map(|o| o / r[B].f.wall - 1.0)).collect::<Vec<_>>();
        let all: Vec<&[Run; 3]> = rounds.iter().collect();
        let wait: Vec<f64> = rounds.iter().filter_map(|r| r[D].wait).collect();
        let plural = if rounds.len() == 1 { "" } else { "s" };
        let mut s = format!(
            "\n**Daemon overhead** over {n} parallel plain `blockrepl copy` processes (same disks, same rounds, \
             same engine tuning; per round: daemon wall / blockrepl-copy wall − 1; median over {} round{plural}):\n\n",
            rounds.len()
        );
        s += &format!(
            "- overhead = end to end (INSERT commit → status `completed` seen, polled every 20 ms): **{}**\n",
            percent_band(&e2e(&all))
        );
        s += &format!(
            "- overhead without the wait for discovery (the row's completed_at − started_at): {}\n",
            percent_band(&own(&all))
        );
        if !wait.is_empty() {
            let (lo, hi) = range(&wait);
            s += &format!(
                "- wait for discovery (row's created_at → started_at): median {:.2} s (min–max {lo:.2}–{hi:.2} s) \
                 with discovery.interval {}{}\n",
                median(wait.iter().map(|&w| Some(w))),
                self.discovery_interval,
                if self.kick { " and --kick" } else { "" }
            );
        }
        if !self.reclaimed.is_empty() {
            let clean: Vec<&[Run; 3]> =
                rounds.iter().zip(&self.claims).filter(|(_, c)| **c == 1).map(|(r, _)| r).collect();
            s += &format!(
                "- **the daemon claimed {} of {} jobs again as they finished** ({}) and ran them again (see the odd \
                 things below); over the {} timed round(s) without that: end to end {}, without the discovery wait {}\n",
                self.reclaimed.len(),
                self.jobs,
                self.reclaimed.join(", "),
                clean.len(),
                percent_band(&e2e(&clean)),
                percent_band(&own(&clean))
            );
        }
        let wall = |k: usize| median(rounds.iter().map(|r| Some(r[k].f.wall)));
        s += &format!(
            "- wall seconds, median: daemon {:.3}, blockrepl copy ×{n} {:.3}, nbdcopy ×{n} {:.3}\n",
            wall(D),
            wall(B),
            wall(N)
        );
        s
    }

    fn details(&self) -> Vec<DetailRow> {
        [D, B, N]
            .into_iter()
            .map(|k| DetailRow {
                tool: self.labels[k].clone(),
                data_bytes: self.nbytes,
                runs: self.results[k].iter().map(|r| r.f).collect(),
            })
            .collect()
    }

    fn more_details(&self) -> String {
        let mut s =
            "\nDaemon scenario: the daemon's copier CPU is the `blockrepl serve` process's; db CPU = mariadbd + \
                     this benchmark (queueing and polling the job); for the other tools it is the idle database and \
                     the copier CPU is summed over the processes. The daemon's `others` include the wait for \
                     discovery, when other work on the machine may use the idle CPUs.\n\n"
                .to_string();
        s += "| tool | seconds | MiB/s (min–max) | copier CPU s | nbdkit CPU s | db CPU s | others |\n";
        s += "|---|---:|---:|---:|---:|---:|---:|\n";
        for k in [D, B, N] {
            let runs = &self.results[k];
            let bps: Vec<f64> = runs.iter().map(|r| r.f.bps / MIB).collect();
            let (lo, hi) = range(&bps);
            s += &format!(
                "| {} | {:.3} | {:.0} ({lo:.0}–{hi:.0}) | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                self.labels[k],
                median(runs.iter().map(|r| Some(r.f.wall))),
                median(bps.iter().map(|&b| Some(b))),
                median(runs.iter().map(|r| r.f.cpu)),
                median(runs.iter().map(|r| r.f.servers_cpu)),
                median(runs.iter().map(|r| r.db_cpu)),
                median(runs.iter().map(|r| r.f.others)),
            );
        }
        let own: Vec<f64> = self.results[D].iter().filter_map(|r| r.own).collect();
        if !own.is_empty() {
            let own_bps: Vec<f64> = own.iter().map(|o| self.nbytes as f64 / o / MIB).collect();
            let (lo, hi) = range(&own_bps);
            s += &format!(
                "| daemon, its own view (completed_at − started_at) | {:.3} | {:.0} ({lo:.0}–{hi:.0}) | | | | |\n",
                median(own.iter().map(|&o| Some(o))),
                median(own_bps.iter().map(|&b| Some(b)))
            );
        }
        s
    }
}
