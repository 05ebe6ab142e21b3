//! The load scenario (`scripts/bench load`, only when named): `--jobs` one-disk
//! jobs queued at once with plain SQL (transactions of 100, as an orchestrator
//! filling a queue would), drained by `--daemons` daemons (their own node ids and
//! admin sockets) on one private MariaDB, from a few shared servers. The targets
//! are `sparse-random` with their source's seed: they check every byte written.
//!
//! All along, every daemon's admin API is probed in turn (`jobs?limit=1000`,
//! `progress/ID` of a random job, `health`; one request every 50 ms per daemon),
//! and once a second MariaDB's statement counters, the jobs' statuses and the
//! daemons' resident memory are read. Reported: time to drain, jobs/s,
//! statements/s (during the drain, and with every job finished and nothing to
//! do), API latency p50/p95/p99 and 5xx per endpoint, each daemon's memory
//! (start, after every 1,000 jobs, peak, end), the split of the jobs between the
//! daemons and how often each job was claimed (once, or the run is failed).
//!
//! With `--steady RATE` the jobs do not drain: each daemon may run all its
//! share at once (`copy.max_concurrent_disks`, one connection and small
//! requests per disk), every job is limited to RATE bytes/s, and once every job
//! is streaming the API probes pause and MariaDB's counters are read over
//! [`STEADY_WINDOW`]: the statements per second the daemons make in steady
//! state (progress, checkpoints and lease renewals of every running job).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::Text;
use testkit::harness::{Daemon, Server};
use testkit::jobs::queue_sql;
use testkit::mariadb;

use crate::daemon::{config, needs_mariadb, stop};
use crate::pair::strings;
use crate::run::{self, DAEMON_WRAPPER, OWN_SESSION, Stop};
use crate::scenario::{Bench, DetailRow, Outcome, ResultRow, Scenario};
use crate::settings::human;

pub struct Load;

/// Source/target pairs the jobs share (in steady state, one pair per
/// [`JOBS_PER_PAIR`] jobs running at once).
const PAIRS: u32 = 4;
const JOBS_PER_PAIR: u32 = 20;
/// Jobs queued per transaction.
const BATCH: u32 = 100;
/// The pause between two API requests to one daemon.
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// How long the drain may take before the run is failed.
const DRAIN_DEADLINE: Duration = Duration::from_secs(3600);
/// How long statements are counted once every job has finished.
const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// Memory is read after every this many finished jobs.
const MILESTONE: u64 = 1000;
/// The endpoints probed, in turn.
const ENDPOINTS: [&str; 3] = ["jobs", "progress/ID", "health"];
/// MariaDB's counters of the statements that write rows (`COM_SELECT` counts the reads).
const WRITES: &str = "'COM_INSERT','COM_UPDATE','COM_DELETE','COM_REPLACE','COM_INSERT_SELECT'";
/// Reads this benchmark makes per sample (the counters and the statuses).
const OWN_PER_SAMPLE: u64 = 2;
/// How long statements are counted in steady state (longer than a lease
/// renewal's period, 40 s by default, so that a round of renewals is in it),
/// and how long before that the probes pause (so that none is in flight).
const STEADY_WINDOW: Duration = Duration::from_secs(60);
const STEADY_SETTLE: Duration = Duration::from_secs(3);
/// How long every job may take to be running, in steady-state mode.
const RUNNING_DEADLINE: Duration = Duration::from_secs(900);

#[derive(QueryableByName)]
struct Pair {
    #[diesel(sql_type = Text)]
    k: String,
    #[diesel(sql_type = Text)]
    v: String,
}

fn pairs(conn: &mut MysqlConnection, sql: &str) -> Result<Vec<(String, String)>, Stop> {
    diesel::sql_query(sql)
        .load::<Pair>(conn)
        .map(|v| v.into_iter().map(|p| (p.k, p.v)).collect())
        .map_err(|e| Stop::failed(format!("load: {e}: in {sql}")))
}

/// The statements executed so far: (reads, writes), MariaDB's counters.
fn statements(conn: &mut MysqlConnection) -> Result<(u64, u64), Stop> {
    let (reads, writes, _) = counters(conn)?;
    Ok((reads, writes))
}

/// Reads, writes and transaction statements (`BEGIN`, `COMMIT`) so far.
fn counters(conn: &mut MysqlConnection) -> Result<(u64, u64, u64), Stop> {
    let sql = format!(
        "SELECT UPPER(VARIABLE_NAME) AS k, VARIABLE_VALUE AS v FROM information_schema.GLOBAL_STATUS \
         WHERE VARIABLE_NAME IN ('COM_SELECT','COM_BEGIN','COM_COMMIT',{WRITES})"
    );
    let rows = pairs(conn, &sql)?;
    let sum = |f: &dyn Fn(&str) -> bool| -> u64 {
        rows.iter().filter(|(k, _)| f(k)).filter_map(|(_, v)| v.parse::<u64>().ok()).sum()
    };
    let txn = |k: &str| k == "COM_BEGIN" || k == "COM_COMMIT";
    Ok((sum(&|k| k == "COM_SELECT"), sum(&|k| k != "COM_SELECT" && !txn(k)), sum(&txn)))
}

/// Jobs streaming now.
fn running(conn: &mut MysqlConnection) -> Result<u64, Stop> {
    let rows =
        pairs(conn, "SELECT 'n' AS k, CAST(COUNT(*) AS CHAR) AS v FROM replication_jobs WHERE status = 'streaming'")?;
    Ok(rows.first().and_then(|(_, v)| v.parse().ok()).unwrap_or(0))
}

/// Jobs finished (completed or failed) and jobs failed.
fn finished(conn: &mut MysqlConnection) -> Result<(u64, u64), Stop> {
    let rows = pairs(conn, "SELECT status AS k, CAST(COUNT(*) AS CHAR) AS v FROM replication_jobs GROUP BY status")?;
    let count = |s: &str| rows.iter().filter(|(k, _)| k == s).filter_map(|(_, v)| v.parse::<u64>().ok()).sum::<u64>();
    Ok((count("completed") + count("failed"), count("failed")))
}

/// A process's resident memory (`VmRSS`) or its peak (`VmHWM`), in bytes.
fn memory(pid: i32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// One GET on a daemon's admin socket: the HTTP status, or what went wrong.
fn get(socket: &Path, path: &str) -> Result<u16, String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).map_err(|e| format!("read: {e}"))?;
    let head = String::from_utf8_lossy(&reply[..reply.len().min(64)]).to_string();
    head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| format!("no HTTP status in {head:?}"))
}

/// What one probe saw: the endpoint (index into [`ENDPOINTS`]), the time to the
/// whole answer, and its HTTP status (0: no answer).
type Probe = (usize, Duration, u16);

/// Probes `socket` in turn until `done`.
fn probe(socket: PathBuf, jobs: u32, seed: u64, done: &AtomicBool, quiet: &AtomicBool) -> (Vec<Probe>, Vec<String>) {
    let (mut seen, mut errors) = (Vec::new(), Vec::new());
    let mut rng = seed | 1;
    let mut i = 0;
    while !done.load(Ordering::Relaxed) {
        if quiet.load(Ordering::Relaxed) {
            std::thread::sleep(PROBE_EVERY);
            continue;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let which = i % ENDPOINTS.len();
        let path = match which {
            0 => "/api/v1/jobs?limit=1000".to_string(),
            1 => format!("/api/v1/progress/{}", job_id(rng % u64::from(jobs))),
            _ => "/api/v1/health".to_string(),
        };
        let t = Instant::now();
        match get(&socket, &path) {
            Ok(code) => seen.push((which, t.elapsed(), code)),
            Err(e) => {
                seen.push((which, t.elapsed(), 0));
                if errors.len() < 5 {
                    errors.push(format!("{path}: {e}"));
                }
            }
        }
        i += 1;
        std::thread::sleep(PROBE_EVERY);
    }
    (seen, errors)
}

fn job_id(i: u64) -> String {
    format!("load-{i:06}")
}

/// One daemon of the run and its memory along the way.
struct Node {
    name: String,
    daemon: Daemon,
    rss_start: u64,
    /// (jobs finished by all daemons, resident bytes) at every [`MILESTONE`].
    rss_at: Vec<(u64, u64)>,
}

impl Scenario for Load {
    fn name(&self) -> &'static str {
        "load"
    }

    fn needs(&self) -> Vec<&'static str> {
        needs_mariadb()
    }

    fn run(&self, bench: &Bench, dir: &Path) -> Result<Box<dyn Outcome>, Stop> {
        let o = &bench.opt;
        let size = human(o.load_size);
        let mut servers = Vec::new();
        let mut uris = Vec::new();
        let pairs = if o.steady.is_some() { o.jobs.div_ceil(JOBS_PER_PAIR).max(PAIRS) } else { PAIRS };
        for i in 0..pairs {
            let mut args = strings(&[
                "sparse-random",
                &format!("size={size}"),
                "percent=50",
                &format!("seed={}", o.seed + u64::from(i)),
            ]);
            // Short runs of data: with the default runs (megabytes long) some
            // seeds make a 64M disk all holes, a job that is done at once.
            if o.steady.is_some() {
                args.push("runlength=65536".into());
                // Each of nbdkit's connections has 16 threads by default: with a
                // thousand connections the machine runs out of threads.
                args.insert(0, "--threads=2".into());
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let source = Server::nbdkit_under(dir, &format!("source{i}"), &args, OWN_SESSION);
            let target = Server::nbdkit_under(dir, &format!("target{i}"), &args, OWN_SESSION);
            uris.push((source.uri(), target.uri()));
            servers.extend([source, target]);
        }
        let server = mariadb::server();
        let db = server.fresh_database("load");
        let mut nodes = Vec::new();
        for k in 0..o.daemons {
            let d = dir.join(format!("daemon{}", k + 1));
            std::fs::create_dir_all(&d).map_err(|e| Stop::failed(format!("{}: {e}", d.display())))?;
            let name = format!("load-node-{}", k + 1);
            let daemon = Daemon::start_with(&d, &load_config(o, &d, &db.url, &name), &name, &[], DAEMON_WRAPPER);
            let rss_start = memory(daemon.pid().as_raw(), "VmRSS:").unwrap_or(0);
            nodes.push(Node { name, daemon, rss_start, rss_at: Vec::new() });
        }
        println!(
            "\n## load: {} one-disk jobs of {size} (sparse-random 50 %, {pairs} shared source/target pairs) queued at \
             once, {} daemon(s) on one MariaDB (database {}); discovery.interval {}",
            o.jobs, o.daemons, db.name, o.discovery_interval
        );
        let outcome = drain(bench, &db, &mut nodes, &uris);
        for n in &mut nodes {
            stop(bench, &mut n.daemon);
        }
        for s in &mut servers {
            if !s.alive() {
                bench.odd(format!(
                    "load: an nbdkit server died (a target refused a wrong write?): {}: {}",
                    s.uri(),
                    s.log_tail(3)
                ));
            }
        }
        Ok(Box::new(outcome?))
    }
}

/// The daemons' configuration; in steady state, room for every job at once,
/// each with one connection and small requests.
fn load_config(o: &crate::settings::Settings, dir: &Path, db_url: &str, node: &str) -> String {
    if o.steady.is_none() {
        return config(o, dir, db_url, node);
    }
    let mut all_at_once = o.clone();
    all_at_once.max_concurrent_disks = Some(o.jobs.div_ceil(o.daemons));
    // `config` writes the [copy] section last.
    config(&all_at_once, dir, db_url, node) + "connections = 1\nrequests = 2\nrequest_size = \"64K\"\nmemory = \"1M\"\n"
}

fn drain(
    bench: &Bench,
    db: &mariadb::TestDb,
    nodes: &mut [Node],
    uris: &[(String, String)],
) -> Result<LoadOutcome, Stop> {
    let o = &bench.opt;
    let mut conn = db.connect();
    let done = AtomicBool::new(false);
    let quiet = AtomicBool::new(false);
    let (watched, steady, api, api_errors) = std::thread::scope(|scope| {
        let probes: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(k, n)| {
                let (socket, done, quiet) = (n.daemon.admin_socket.clone(), &done, &quiet);
                scope.spawn(move || probe(socket, o.jobs, o.seed + k as u64, done, quiet))
            })
            .collect();
        let watched = queue_and_watch(bench, &mut conn, nodes, uris);
        let steady = match (&watched, o.steady) {
            (Ok(_), Some(_)) => Some(steady_window(&mut conn, &quiet, o.jobs)),
            _ => None,
        };
        done.store(true, Ordering::Relaxed);
        let mut api: Vec<Vec<Probe>> = vec![Vec::new(); ENDPOINTS.len()];
        let mut api_errors = Vec::new();
        for p in probes {
            let (seen, errors) = p.join().expect("a probe thread");
            for probe in seen {
                api[probe.0].push(probe);
            }
            api_errors.extend(errors);
        }
        (watched, steady, api, api_errors)
    });
    let (queued, drained, samples) = watched?;
    let steady = steady.transpose()?;
    // Every job finished and nobody asks: what the daemons still do with nothing
    // to do (in steady state the jobs still run: nothing to measure).
    let idle = match steady {
        Some(_) => (f64::NAN, f64::NAN),
        None => {
            let (r0, w0) = statements(&mut conn)?;
            std::thread::sleep(IDLE_WINDOW);
            let (r1, w1) = statements(&mut conn)?;
            let per_s = |n: u64| n as f64 / IDLE_WINDOW.as_secs_f64();
            (per_s(r1.saturating_sub(r0 + 1)), per_s(w1 - w0))
        }
    };
    let (_, failed) = finished(&mut conn)?;
    let mut outcome = LoadOutcome {
        jobs: o.jobs,
        failed,
        queued,
        drained,
        samples,
        idle,
        steady,
        nodes: nodes
            .iter()
            .map(|n| {
                let pid = n.daemon.pid().as_raw();
                NodeFigures {
                    name: n.name.clone(),
                    rss_start: n.rss_start,
                    rss_at: n.rss_at.clone(),
                    rss_end: memory(pid, "VmRSS:").unwrap_or(0),
                    peak: memory(pid, "VmHWM:").unwrap_or(0),
                    claimed: 0,
                }
            })
            .collect(),
        api,
        api_errors,
        reclaimed: Vec::new(),
    };
    outcome.claims(&mut conn, o.jobs)?;
    if !outcome.reclaimed.is_empty() {
        bench.odd(format!("load: {} job(s) claimed more than once or never", outcome.reclaimed.len()));
    }
    if outcome.failed > 0 {
        bench.odd(format!("load: {} job(s) failed", outcome.failed));
    }
    Ok(outcome)
}

/// Statements per second in steady state (see the module documentation).
struct Steady {
    reads: f64,
    writes: f64,
    transactions: f64,
    /// Jobs streaming at the start and at the end of the window.
    running: (u64, u64),
}

/// Pauses the probes and counts the daemons' statements over [`STEADY_WINDOW`].
fn steady_window(conn: &mut MysqlConnection, quiet: &AtomicBool, jobs: u32) -> Result<Steady, Stop> {
    quiet.store(true, Ordering::Relaxed);
    std::thread::sleep(STEADY_SETTLE);
    let before = running(conn)?;
    let (r0, w0, t0) = counters(conn)?;
    let start = Instant::now();
    std::thread::sleep(STEADY_WINDOW);
    let (r1, w1, t1) = counters(conn)?;
    let secs = start.elapsed().as_secs_f64();
    let after = running(conn)?;
    quiet.store(false, Ordering::Relaxed);
    // Less this function's own reads: the second `counters` and the first `running`.
    let steady = Steady {
        reads: r1.saturating_sub(r0 + 2) as f64 / secs,
        writes: (w1 - w0) as f64 / secs,
        transactions: (t1 - t0) as f64 / secs,
        running: (before, after),
    };
    println!(
        "  steady state, {before} → {after} of {jobs} jobs streaming: {:.1} reads/s, {:.1} writes/s, {:.1} BEGIN+COMMIT/s",
        steady.reads, steady.writes, steady.transactions
    );
    Ok(steady)
}

/// One reading of the counters, once a second.
#[derive(Clone, Copy)]
struct Sample {
    /// Seconds since the first INSERT.
    at: f64,
    /// Reads and writes so far, less the benchmark's own.
    reads: u64,
    writes: u64,
}

/// Queues the jobs, then samples once a second until every job finished;
/// returns the time the queueing took, the time to drain, and the samples.
fn queue_and_watch(
    bench: &Bench,
    conn: &mut MysqlConnection,
    nodes: &mut [Node],
    uris: &[(String, String)],
) -> Result<(Duration, Duration, Vec<Sample>), Stop> {
    let jobs = bench.opt.jobs;
    let t0 = Instant::now();
    for first in (0..jobs).step_by(BATCH as usize) {
        let mut sql = "START TRANSACTION;".to_string();
        for i in first..(first + BATCH).min(jobs) {
            let (s, t) = &uris[i as usize % uris.len()];
            sql += &queue_sql(&job_id(u64::from(i)), &[("disk-1", s.clone(), t.clone())]);
        }
        if let Some(rate) = bench.opt.steady {
            sql += &format!("UPDATE replication_jobs SET max_rate = {rate} WHERE max_rate IS NULL;");
        }
        sql += "COMMIT;";
        conn.batch_execute(&sql).map_err(|e| Stop::failed(format!("load: queueing: {e}")))?;
    }
    let queued = t0.elapsed();
    println!("  queued {jobs} jobs in {:.2} s", queued.as_secs_f64());

    let mut samples: Vec<Sample> = Vec::new();
    let mut last_report = Instant::now();
    let mut next_milestone = MILESTONE.min(u64::from(jobs));
    loop {
        let (reads, writes) = statements(conn)?;
        let (fin, failed) = finished(conn)?;
        let at = t0.elapsed().as_secs_f64();
        samples.push(Sample { at, reads: reads.saturating_sub(OWN_PER_SAMPLE * samples.len() as u64), writes });
        while fin >= next_milestone && next_milestone <= u64::from(jobs) {
            for n in nodes.iter_mut() {
                n.rss_at.push((next_milestone, memory(n.daemon.pid().as_raw(), "VmRSS:").unwrap_or(0)));
            }
            next_milestone += MILESTONE;
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            let rss: Vec<String> =
                nodes.iter().map(|n| mb(memory(n.daemon.pid().as_raw(), "VmRSS:").unwrap_or(0))).collect();
            println!("  {at:6.0} s: {fin}/{jobs} finished ({failed} failed), RSS MB {}", rss.join(" / "));
            last_report = Instant::now();
        }
        if fin >= u64::from(jobs) {
            return Ok((queued, t0.elapsed(), samples));
        }
        if bench.opt.steady.is_some() {
            if running(conn)? >= u64::from(jobs) {
                println!("  every job is streaming after {:.1} s", t0.elapsed().as_secs_f64());
                return Ok((queued, t0.elapsed(), samples));
            }
            if fin > 0 {
                let why = pairs(
                    conn,
                    "SELECT id AS k, COALESCE(error_message, status) AS v FROM replication_jobs \
                     WHERE status IN ('completed', 'failed') LIMIT 1",
                )?;
                let events = match why.first() {
                    Some((id, _)) => pairs(
                        conn,
                        &format!(
                            "SELECT CAST(id AS CHAR) AS k, message AS v FROM job_events WHERE job_id = '{id}' ORDER BY id"
                        ),
                    )?,
                    None => Vec::new(),
                };
                let events: Vec<&str> = events.iter().map(|(_, m)| m.as_str()).collect();
                let id = why.first().map(|w| w.0.clone()).unwrap_or_default();
                let disk = pairs(
                    conn,
                    &format!(
                        "SELECT source_uri AS k, CONCAT_WS(' ', capacity_bytes, planned_bytes, bytes_synced, \
                         skipped_bytes) AS v FROM vm_disks WHERE job_id = '{id}'"
                    ),
                )?;
                let log: Vec<String> = nodes
                    .iter()
                    .flat_map(|n| {
                        n.daemon.log_text().lines().filter(|l| l.contains(&id)).map(str::to_string).collect::<Vec<_>>()
                    })
                    .collect();
                return Err(Stop::failed(format!(
                    "load: {fin} job(s) finished before all ran, first: {why:?}; its events: {}; its disk \
                     (capacity planned synced skipped): {disk:?}; its log:\n{}",
                    events.join(" | "),
                    log.join("\n")
                )));
            }
            if t0.elapsed() > RUNNING_DEADLINE {
                return Err(Stop::failed(format!("load: not every job is streaming after {RUNNING_DEADLINE:?}")));
            }
        }
        for n in nodes.iter_mut() {
            if let Some(st) = n.daemon.exited() {
                return Err(Stop::failed(format!("load: daemon {} exited ({st}) during the drain", n.name)));
            }
        }
        if t0.elapsed() > DRAIN_DEADLINE {
            return Err(Stop::failed(format!("load: {fin} of {jobs} jobs finished after {DRAIN_DEADLINE:?}")));
        }
        run::check()?;
        std::thread::sleep(Duration::from_secs(1));
    }
}

struct NodeFigures {
    name: String,
    rss_start: u64,
    rss_at: Vec<(u64, u64)>,
    rss_end: u64,
    peak: u64,
    claimed: u64,
}

struct LoadOutcome {
    jobs: u32,
    failed: u64,
    queued: Duration,
    drained: Duration,
    samples: Vec<Sample>,
    /// Reads and writes per second once every job finished, with no API request.
    idle: (f64, f64),
    steady: Option<Steady>,
    nodes: Vec<NodeFigures>,
    /// The probes, by endpoint.
    api: Vec<Vec<Probe>>,
    api_errors: Vec<String>,
    /// Jobs claimed more than once, with their claim counts.
    reclaimed: Vec<(String, u64)>,
}

impl LoadOutcome {
    /// Reads how often each job was claimed, and by whom (the job log's
    /// "claimed by NODE; run R" lines).
    fn claims(&mut self, conn: &mut MysqlConnection, jobs: u32) -> Result<(), Stop> {
        let per_job = pairs(
            conn,
            "SELECT job_id AS k, CAST(COUNT(*) AS CHAR) AS v FROM job_events \
             WHERE message LIKE 'claimed by %' GROUP BY job_id",
        )?;
        self.reclaimed = per_job
            .iter()
            .filter_map(|(k, v)| v.parse::<u64>().ok().filter(|&n| n != 1).map(|n| (k.clone(), n)))
            .collect();
        if per_job.len() != jobs as usize {
            self.reclaimed
                .push((format!("{} jobs never claimed", jobs as usize - per_job.len().min(jobs as usize)), 0));
        }
        let per_node = pairs(
            conn,
            "SELECT SUBSTRING_INDEX(SUBSTRING(message, 12), ';', 1) AS k, CAST(COUNT(*) AS CHAR) AS v \
             FROM job_events WHERE message LIKE 'claimed by %' GROUP BY k",
        )?;
        for n in &mut self.nodes {
            n.claimed = per_node.iter().filter(|(k, _)| *k == n.name).filter_map(|(_, v)| v.parse::<u64>().ok()).sum();
        }
        Ok(())
    }

    /// Reads and writes per second between consecutive samples after the queueing.
    fn rates(&self) -> (Vec<f64>, Vec<f64>) {
        let from = self.queued.as_secs_f64();
        let windows: Vec<&[Sample]> = self.samples.windows(2).filter(|w| w[0].at >= from).collect();
        let rate = |f: fn(&Sample) -> u64| -> Vec<f64> {
            windows.iter().map(|w| f(&w[1]).saturating_sub(f(&w[0])) as f64 / (w[1].at - w[0].at).max(1e-3)).collect()
        };
        (rate(|s| s.reads), rate(|s| s.writes))
    }

    /// Mean reads and writes per second from the end of the queueing to the last sample.
    fn mean_rates(&self) -> (f64, f64) {
        match (self.samples.iter().find(|s| s.at >= self.queued.as_secs_f64()), self.samples.last()) {
            (Some(a), Some(b)) if b.at > a.at => {
                let t = b.at - a.at;
                ((b.reads - a.reads) as f64 / t, (b.writes - a.writes) as f64 / t)
            }
            _ => (f64::NAN, f64::NAN),
        }
    }
}

/// The `q`-quantile (0..1) of `xs`, nearest rank.
fn quantile(xs: &mut [f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let i = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1;
    xs[i]
}

fn mb(b: u64) -> String {
    format!("{:.0}", b as f64 / 1e6)
}

impl Outcome for LoadOutcome {
    fn results(&self) -> Vec<ResultRow> {
        Vec::new()
    }

    fn remarks(&self) -> String {
        let secs = self.drained.as_secs_f64();
        let (mut reads, mut writes) = self.rates();
        let (mean_r, mean_w) = self.mean_rates();
        let mut s = format!(
            "\n### load: {} jobs, {} daemon(s)\n\n\
             | figure | value |\n|---|---:|\n\
             | time to drain (first INSERT → last job finished; in steady state → every job streaming) | {secs:.1} s |\n\
             | jobs/s | {:.1} |\n| failed jobs | {} |\n\
             | writes/s during the drain: mean, median, p95 of 1-s samples | {mean_w:.0}, {:.0}, {:.0} |\n\
             | reads/s during the drain (the API probes' included): mean, median, p95 | {mean_r:.0}, {:.0}, {:.0} |\n\
             | writes/s and reads/s with every job finished, no API request ({} s) | {:.1}, {:.1} |\n\
             | jobs claimed more than once, or never | {} |\n",
            self.jobs,
            self.nodes.len(),
            f64::from(self.jobs) / secs,
            self.failed,
            quantile(&mut writes.clone(), 0.5),
            quantile(&mut writes, 0.95),
            quantile(&mut reads.clone(), 0.5),
            quantile(&mut reads, 0.95),
            IDLE_WINDOW.as_secs(),
            self.idle.1,
            self.idle.0,
            self.reclaimed.len(),
        );
        if let Some(st) = &self.steady {
            s += &format!(
                "\n| steady state: every job running, over {} s, no API request | value |\n|---|---:|\n\
                 | jobs streaming at start / end | {} / {} |\n\
                 | statements/s in all (reads + writes + BEGIN/COMMIT) | {:.1} |\n\
                 | reads/s, writes/s, BEGIN+COMMIT/s | {:.1}, {:.1}, {:.1} |\n",
                STEADY_WINDOW.as_secs(),
                st.running.0,
                st.running.1,
                st.reads + st.writes + st.transactions,
                st.reads,
                st.writes,
                st.transactions
            );
        }
        s += "\n| API endpoint | requests | p50 ms | p95 ms | p99 ms | max ms | 5xx | no answer |\n|---|---:|---:|---:|---:|---:|---:|---:|\n";
        for (which, seen) in self.api.iter().enumerate() {
            let mut ms: Vec<f64> = seen.iter().map(|p| p.1.as_secs_f64() * 1e3).collect();
            let five = seen.iter().filter(|p| p.2 >= 500).count();
            let none = seen.iter().filter(|p| p.2 == 0).count();
            s += &format!(
                "| `{}` | {} | {:.1} | {:.1} | {:.1} | {:.1} | {five} | {none} |\n",
                ENDPOINTS[which],
                seen.len(),
                quantile(&mut ms, 0.5),
                quantile(&mut ms, 0.95),
                quantile(&mut ms, 0.99),
                quantile(&mut ms, 1.0),
            );
        }
        s += "\n| daemon | jobs claimed | RSS MB at start | RSS MB after each 1,000 jobs finished | RSS MB at end | peak |\n|---|---:|---:|---|---:|---:|\n";
        for n in &self.nodes {
            let at: Vec<String> = n.rss_at.iter().map(|(_, b)| mb(*b)).collect();
            s += &format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                n.name,
                n.claimed,
                mb(n.rss_start),
                at.join(", "),
                mb(n.rss_end),
                mb(n.peak)
            );
        }
        for (job, n) in self.reclaimed.iter().take(5) {
            s += &format!("\n- {job}: claimed {n} times");
        }
        for e in self.api_errors.iter().take(5) {
            s += &format!("\n- API request failed: {e}");
        }
        s
    }

    fn details(&self) -> Vec<DetailRow> {
        Vec::new()
    }
}
