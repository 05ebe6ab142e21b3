//! Bandwidth limits: `blockrepl copy --max-rate` and the daemon's per-job and
//! appliance limits, measured where the bytes are read, at the source (nbdkit's
//! stats filter), on copies long enough that a limit that does nothing fails.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use testkit::jobs::{job, queue_sql, wait_status};

use crate::harness::*;
use crate::mariadb::server;

const MIB: f64 = 1048576.0;

/// Bytes read from a server that ran nbdkit's stats filter, as it counted them
/// (it prints MiB rounded to 3 significant digits). Read after the server stopped.
pub(crate) fn stats_read_bytes(stats: &Path) -> f64 {
    let st = std::fs::read_to_string(stats).unwrap_or_else(|e| panic!("{}: {e}", stats.display()));
    let Some(line) = st.lines().find(|l| l.starts_with("read:")) else { return 0.0 };
    // "read: 32 ops, 0.004169 s, 8.00 MiB, 1.87 GiB/s op, ..."
    let size = line.split(", ").nth(2).unwrap();
    let (n, unit) = size.split_once(' ').unwrap();
    let n: f64 = n.parse().unwrap();
    n * match unit {
        "bytes" | "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => MIB,
        "GiB" => MIB * 1024.0,
        u => panic!("unit {u} in {line}"),
    }
}

/// A source that counts what is read from it.
pub(crate) fn counted_source(dir: &Path, name: &str, plugin: &[&str]) -> (Server, std::path::PathBuf) {
    let stats = dir.join(format!("{name}.stats"));
    let mut args = vec!["--filter=stats".to_string()];
    args.extend(plugin.iter().map(|s| s.to_string()));
    args.push(format!("statsfile={}", stats.display()));
    (Server::nbdkit(dir, name, &refs(&args)), stats)
}

#[test]
fn copy_max_rate_holds_the_source_to_the_limit() {
    let d = tempdir();
    let (mut src, stats) = counted_source(d.path(), "src", &["pattern", "size=32M"]);
    let dst = Server::nbdkit(d.path(), "dst", &["memory", "size=32M", "allocator=malloc"]);
    let started = Instant::now();
    let j = blockrepl(&["copy", "--json", "--max-rate", "4M", &src.uri(), &dst.uri()]).json();
    // The command's whole run, connecting included: an upper bound of the copy's time.
    let wall = started.elapsed().as_secs_f64();
    src.stop();
    let read = stats_read_bytes(&stats);
    assert!(read >= 32.0 * MIB * 0.99, "the whole disk was read: {read} bytes");
    let rate = read / wall;
    let limit = 4.0 * MIB;
    assert!(rate <= limit * 1.10, "read at {:.2} MiB/s with a 4M limit", rate / MIB);
    assert!(rate >= limit * 0.5, "read at {:.2} MiB/s: the limit should not hold it far below 4M", rate / MIB);
    assert!(j["throughput_bps"].as_f64().unwrap() <= limit * 1.10, "{j}");
    let reference = Server::nbdkit(d.path(), "ref", &["pattern", "size=32M"]);
    assert_eq!(checksum(&reference.uri()), checksum(&dst.uri()), "the copy is byte-identical");
}

/// Verification reads the source a second time: those reads count against
/// the limit too, and a verification held back by it is not a stall.
#[test]
fn copy_max_rate_holds_verification_reads_too() {
    let d = tempdir();
    let (mut src, stats) = counted_source(d.path(), "src", &["pattern", "size=16M"]);
    let dst = Server::nbdkit(d.path(), "dst", &["memory", "size=16M", "allocator=malloc"]);
    let started = Instant::now();
    let j =
        blockrepl(&["copy", "--json", "--verify", "--max-rate", "4M", "--stall-timeout", "2s", &src.uri(), &dst.uri()])
            .json();
    let wall = started.elapsed().as_secs_f64();
    src.stop();
    assert_eq!(j["verified"], true, "{j}");
    let read = stats_read_bytes(&stats);
    assert!(read >= 32.0 * MIB * 0.99, "the disk was read twice (copy, verification): {read} bytes");
    let limit = 4.0 * MIB;
    let rate = read / wall;
    assert!(rate <= limit * 1.10, "read at {:.2} MiB/s with a 4M limit, verification included", rate / MIB);
}

#[test]
fn copy_max_rate_does_not_count_zeros() {
    // 1 GiB with about 2 % data: at 8M/s the data takes a few seconds, while
    // counting the zero extents too would take two minutes.
    let d = tempdir();
    let plugin = ["sparse-random", "size=1G", "seed=9", "percent=2", "runlength=131072"];
    let (mut src, stats) = counted_source(d.path(), "src", &plugin);
    let dst = Server::nbdkit(d.path(), "dst", &["memory", "size=1G"]);
    let data = data_bytes(&allocation_map(&src.uri())) as f64;
    let started = Instant::now();
    let j = blockrepl(&["copy", "--json", "--max-rate", "8M", &src.uri(), &dst.uri()]).json();
    let wall = started.elapsed().as_secs_f64();
    src.stop();
    let limit = 8.0 * MIB;
    assert!(j["zeroed_bytes"].as_f64().unwrap() > 900.0 * MIB, "{j}");
    assert!(wall >= data / limit / 1.10, "{data} bytes of data in {wall:.1} s: above the limit");
    assert!(wall <= data / limit * 1.5 + 3.0, "{data} bytes of data in {wall:.1} s: zeros were counted");
    let read = stats_read_bytes(&stats);
    assert!((read - data).abs() <= data * 0.01, "only data was read: {read} of {data}");
}

#[test]
fn copy_refuses_a_bad_max_rate_in_one_line() {
    for (rate, want) in [
        ("-5", "'-5' is not a rate"),
        ("fast", "'fast' is not a rate"),
        ("1.5M", "'1.5M' is not a rate"),
        ("", "'' is not a rate"),
        ("5000G", "above the highest rate"),
        ("99999999999999999999", "'99999999999999999999' is not a rate"),
    ] {
        // Unreachable servers: the rate is refused before anything is contacted.
        let line = blockrepl(&["copy", "--max-rate", rate, "nbd://127.0.0.1:1/", "nbd://127.0.0.1:1/"]).error_line();
        assert!(line.starts_with("blockrepl: --max-rate: ") && line.contains(want), "{rate}: {line}");
    }
}

/// When each read in a log of nbdkit's `log` filter was logged (its local
/// time, as the filter writes it) and how many bytes it asked for.
fn reads_with_times(log: &Path) -> Vec<(SystemTime, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains(" Read id="))
        .map(|l| {
            let stamp = l.get(..26).unwrap();
            let t = chrono::NaiveDateTime::parse_from_str(stamp, "%Y-%m-%d %H:%M:%S%.f").unwrap();
            let local = t.and_local_timezone(chrono::Local).earliest().unwrap();
            let count = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("count="))
                .map(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap())
                .unwrap();
            (SystemTime::from(local), count)
        })
        .collect()
}

/// Bytes read from the source within `[from, to)`, and how long that is in seconds.
fn read_between(reads: &[(SystemTime, u64)], from: SystemTime, to: SystemTime) -> (f64, f64) {
    let bytes: u64 = reads.iter().filter(|(t, _)| *t >= from && *t < to).map(|(_, n)| n).sum();
    (bytes as f64, to.duration_since(from).unwrap().as_secs_f64())
}

fn progress(d: &Daemon, id: &str) -> Value {
    d.cli(&["progress", id, "--json"]).json()
}

fn progress_until(d: &Daemon, id: &str, what: &str, mut f: impl FnMut(&Value) -> bool) -> Value {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let p = progress(d, id);
        if f(&p) {
            return p;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}; last progress {p}\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The rate read at the source within a window stays within 10 % of `limit`
/// (plus one request, which may start at the window's edge).
fn assert_held(reads: &[(SystemTime, u64)], from: SystemTime, to: SystemTime, limit: f64, what: &str) {
    let (bytes, secs) = read_between(reads, from, to);
    assert!(secs >= 1.5, "{what}: the window is too short to judge ({secs:.2} s)");
    let bound = limit * 1.10 * secs + MIB;
    assert!(
        bytes <= bound,
        "{what}: {:.2} MiB read in {secs:.2} s, more than the limit of {:.2} MiB/s allows",
        bytes / MIB,
        limit / MIB
    );
    assert!(bytes >= limit * 0.5 * secs, "{what}: only {:.2} MiB read in {secs:.2} s", bytes / MIB);
}

/// A job queued with a limit in its row (as an orchestrator sets it) copies at
/// that rate; `blockrepl limit` lowers it and then lifts it while the copy runs,
/// and the source sees each change within a second, without a restart of the copy.
#[test]
fn a_running_job_follows_limit_changes_within_a_second() {
    let d = tempdir();
    let db = server().fresh_database("limits_live");
    let log = d.path().join("src.log");
    let stats = d.path().join("src.stats");
    let plugin = [
        "--filter=log".to_string(),
        "--filter=stats".into(),
        "pattern".into(),
        "size=64M".into(),
        format!("logfile={}", log.display()),
        format!("statsfile={}", stats.display()),
    ];
    let mut src = Server::nbdkit(d.path(), "src", &refs(&plugin));
    let dst = Server::nbdkit(d.path(), "dst", &["memory", "size=64M", "allocator=malloc"]);
    let eight = 8.0 * MIB;
    // The daemon makes the tables; the job is queued as an orchestrator does.
    let daemon = Daemon::start(d.path(), &db.url, &[]);
    db.execute(&format!(
        "START TRANSACTION; {} UPDATE replication_jobs SET max_rate = {} WHERE id = 'job-l'; COMMIT;",
        queue_sql("job-l", &[("disk-1", src.uri(), dst.uri())]),
        8 << 20
    ));
    daemon.cli(&["discover"]).assert_ok();

    // The row's limit: 8M/s, and the copy is held back by it.
    let p = progress_until(&daemon, "job-l", "the copy to be held at 8M/s", |p| {
        p["status"] == "Streaming" && p["limited"] == true
    });
    assert_eq!(p["max_rate"], 8 << 20, "{p}");
    let started = SystemTime::now();
    progress_until(&daemon, "job-l", "24M at 8M/s", |p| p["aggregate"]["bytes_transferred"].as_u64() >= Some(24 << 20));

    // Lowered to 1M/s through the admin socket.
    let lowered = SystemTime::now();
    let r = daemon.cli(&["limit", "job-l", "1M"]).assert_ok().stdout.clone();
    assert_eq!(r.trim(), "job-l: limit 1.00 MiB/s (running copies follow within a second)");
    assert_eq!(job(&db, "job-l", "max_rate").as_deref(), Some("1048576"), "the row keeps the operator's limit");
    let p = progress(&daemon, "job-l");
    assert_eq!((p["max_rate"].as_u64(), p["status"].as_str()), (Some(1 << 20), Some("Streaming")), "{p}");
    let done_before = p["aggregate"]["bytes_transferred"].as_u64().unwrap();
    // Four seconds at the new limit (a measurement, not a wait for an event).
    std::thread::sleep(Duration::from_secs(4));
    let p = progress(&daemon, "job-l");
    assert_eq!(p["limited"], true, "{p}");
    let text = daemon.cli(&["progress", "job-l"]).assert_ok().stdout.clone();
    assert!(text.contains(", limit 1.00 MiB/s (limited)"), "{text}");

    // Lifted: the rest goes as fast as the servers allow.
    let lifted = SystemTime::now();
    let r = daemon.cli(&["limit", "job-l", "0"]).assert_ok().stdout.clone();
    assert_eq!(r.trim(), "job-l: no limit (running copies follow within a second)");
    assert_eq!(job(&db, "job-l", "max_rate"), None);
    let lifted_at = Instant::now();
    wait_status(&db, "job-l", "completed", &daemon);
    let rest = (64u64 << 20).saturating_sub(done_before) as f64;
    let took = lifted_at.elapsed().as_secs_f64();
    assert!(took < rest / MIB / 4.0, "{:.1} MiB after lifting took {took:.1} s", rest / MIB);

    src.stop();
    let reads = reads_with_times(&log);
    let second = Duration::from_secs(1);
    assert_held(&reads, started, lowered, eight, "with the row's 8M");
    assert_held(&reads, lowered + second, lifted, MIB, "lowered to 1M");
    let read = stats_read_bytes(&stats);
    assert!((read - 64.0 * MIB).abs() <= 0.64 * MIB, "the disk was read once: {read} bytes");
    let reference = Server::nbdkit(d.path(), "ref", &["pattern", "size=64M"]);
    assert_eq!(checksum(&reference.uri()), checksum(&dst.uri()), "the copy is byte-identical");
}

/// `curl --unix-socket` POST with a raw body: (HTTP status, body).
fn post_raw(d: &Daemon, path: &str, body: &str) -> (u16, Value) {
    let out = Command::new("curl")
        .args(["-sS", "-X", "POST", "--unix-socket"])
        .arg(&d.admin_socket)
        .args(["-H", "Content-Type: application/json", "--data-binary", body, "-w", "\n%{http_code}"])
        .arg(format!("http://localhost{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn bad_limits_are_refused_in_one_line_and_change_nothing() {
    let d = tempdir();
    let db = server().fresh_database("limits_bad");
    let daemon = Daemon::start(d.path(), &db.url, &[]);
    // A job that is never claimed (no disks): its row must stay as it is.
    db.execute(
        "INSERT INTO replication_jobs (id, vm_name, replication_type, max_rate) VALUES ('job-b', 'vm', 'full', 4096)",
    );
    db.execute("INSERT INTO replication_jobs (id, vm_name, replication_type, status) VALUES ('job-done', 'vm', 'full', 'completed')");
    let row = || (job(&db, "job-b", "max_rate"), job(&db, "job-b", "updated_at"), job(&db, "job-done", "max_rate"));
    let before = row();

    for (args, want) in [
        (vec!["limit", "job-b", "-5"], "max_rate: '-5' is not a rate"),
        (vec!["limit", "job-b", "fast"], "max_rate: 'fast' is not a rate"),
        (vec!["limit", "job-b", "1.5M"], "max_rate: '1.5M' is not a rate"),
        (vec!["limit", "job-b", "5000G"], "max_rate: '5000G' is above the highest rate"),
        (vec!["limit", "job-nope", "4M"], "job 'job-nope' not found"),
        (vec!["limit", "job-done", "4M"], "job 'job-done' has already finished as Succeeded"),
        (vec!["limit", "--all", "job-b", "4M"], "limit --all takes one argument"),
        (vec!["limit", "--all", "-1"], "max_rate: '-1' is not a rate"),
        (vec!["limit", "4M"], "limit takes a job and a rate"),
    ] {
        let line = daemon.cli(&args).error_line();
        assert!(line.contains(want), "{args:?}: {line}");
    }
    for (body, code) in [
        (r#"{"max_rate": -5}"#, "invalid_rate"),
        (r#"{"max_rate": 1.5}"#, "invalid_rate"),
        (r#"{"max_rate": null}"#, "invalid_rate"),
        (r#"{"max_rate": "200M", "burst": 1}"#, "unknown_field"),
        (r#"{"max_rate": "#, "malformed_json"),
        (r#"{}"#, "invalid_request"),
    ] {
        let (status, v) = post_raw(&daemon, "/api/v1/jobs/job-b/limit", body);
        assert_eq!((status, v["error"]["code"].as_str()), (400, Some(code)), "{body}: {v}");
    }
    let (status, v) = post_raw(&daemon, "/api/v1/jobs/job-nope/limit", r#"{"max_rate": "4M"}"#);
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("not_found")), "{v}");
    assert_eq!(row(), before, "nothing changed");

    // Nothing runs here: --all changes nothing and says so.
    let r = daemon.cli(&["limit", "--all", "4M"]).assert_ok().stdout.clone();
    assert_eq!(r.trim(), "no jobs run here; nothing changed");
    // A good limit on a job that is not running is kept in its row for when it runs.
    let r = daemon.cli(&["limit", "job-b", "200M"]).assert_ok().stdout.clone();
    assert_eq!(r.trim(), "job-b: limit 200.00 MiB/s (not running here)");
    assert_eq!(job(&db, "job-b", "max_rate").as_deref(), Some("209715200"));
    let shown = daemon.cli(&["show", "job-b"]).assert_ok().stdout.clone();
    assert!(shown.contains("limit:       200.00 MiB/s"), "{shown}");

    // A submitted job may carry its limit; a bad one refuses the job.
    let submit = |id: &str, rate: Value| {
        let body = serde_json::json!({
            "id": id, "vm_name": "vm1", "replication_type": "full", "max_rate": rate,
            "disks": [{"disk_id": "disk-1", "source": "nbd+unix:///?socket=/nonexistent/s.sock",
                       "target": "nbd+unix:///?socket=/nonexistent/t.sock"}]
        });
        let file = d.path().join(format!("{id}.json"));
        std::fs::write(&file, body.to_string()).unwrap();
        daemon.cli(&["submit", file.to_str().unwrap()])
    };
    let line = submit("job-s1", Value::from("fast")).error_line();
    assert!(line.contains("max_rate: 'fast' is not a rate") && line.contains("(invalid_rate)"), "{line}");
    assert_eq!(job(&db, "job-s1", "id"), None, "a refused job is not inserted");
    submit("job-s2", Value::from("2M")).assert_ok();
    assert_eq!(job(&db, "job-s2", "max_rate").as_deref(), Some("2097152"));
}

/// The appliance's `copy.max_rate` (and its windows) follows SIGHUP, an orchestrator's change of
/// a job's `max_rate` column reaches the running job within a second (not at
/// its next lease renewal, 40 s apart with the default lease), and the lower of
/// the two is in force.
#[test]
fn the_appliance_limit_follows_sighup_and_the_row_within_a_second() {
    let d = tempdir();
    let db = server().fresh_database("limits_reload");
    let src = Server::nbdkit(d.path(), "src", &["pattern", "size=64M"]);
    let dst = Server::nbdkit(d.path(), "dst", &["memory", "size=64M", "allocator=malloc"]);
    // The default lease (120 s): renewed every 40 s.
    let daemon = Daemon::start(d.path(), &db.url, &[]);
    // The test configuration, with its [copy] section rewritten at each reload.
    let copy_section = "[copy]\ncheckpoint_interval = \"1s\"\n";
    let base = std::fs::read_to_string(&daemon.config).unwrap().replace(copy_section, "");
    let set_appliance = |settings: &str| {
        std::fs::write(&daemon.config, format!("{base}\n{copy_section}{settings}\n")).unwrap();
        daemon.signal(nix::sys::signal::Signal::SIGHUP);
    };
    // 4M in a window that is always open (windows are tested in detail in
    // `config::windows`), none outside.
    set_appliance("max_rate = 0\n[copy.max_rate_windows]\n\"mon-sun 00:00-24:00\" = \"4M\"");
    wait_until("the reload", Duration::from_secs(5), || {
        daemon.log_text().contains(
            "SIGHUP: copy.max_rate is now 4194304 bytes/s (was 0; 0 = none, bandwidth window 'mon-sun 00:00-24:00')",
        )
    });

    db.execute(&format!("START TRANSACTION; {} COMMIT;", queue_sql("job-r", &[("disk-1", src.uri(), dst.uri())])));
    daemon.cli(&["discover"]).assert_ok();
    let p = progress_until(&daemon, "job-r", "the appliance's limit", |p| p["limited"] == true);
    assert_eq!(p["max_rate"], 4 << 20, "{p}");

    // The orchestrator lowers the job below the appliance, then lifts its own
    // limit; each change is in force within a second (3 s with slack for a
    // loaded machine), far before a renewal.
    let followed = |sql: &str, what: &str, rate: Value| {
        db.execute(sql);
        let t = Instant::now();
        progress_until(&daemon, "job-r", what, |p| p["max_rate"] == rate);
        assert!(t.elapsed() < Duration::from_secs(3), "{what} took {:?}", t.elapsed());
    };
    followed("UPDATE replication_jobs SET max_rate = 1048576 WHERE id = 'job-r'", "the row's 1M", json!(1 << 20));
    followed(
        "UPDATE replication_jobs SET max_rate = NULL WHERE id = 'job-r'",
        "the appliance's 4M again",
        json!(4 << 20),
    );

    // No limit anywhere: the rest goes at once.
    set_appliance("max_rate = 0");
    let p = progress_until(&daemon, "job-r", "no limit", |p| p["max_rate"].is_null());
    let rest = (64u64 << 20).saturating_sub(p["aggregate"]["bytes_transferred"].as_u64().unwrap());
    let lifted = Instant::now();
    wait_status(&db, "job-r", "completed", &daemon);
    let took = lifted.elapsed().as_secs_f64();
    assert!(took < rest as f64 / (4.0 * MIB) / 2.0, "{} MiB after lifting took {took:.1} s", rest >> 20);
    assert!(
        daemon.log_text().contains("bandwidth limit of the job set to 1048576 bytes/s (was none) by the job's row")
    );
}

/// The disks of a job share its limit in equal parts, as their sources see it.
#[test]
fn the_disks_of_a_job_share_its_limit_fairly() {
    let d = tempdir();
    let db = server().fresh_database("limits_fair");
    let mut sources = Vec::new();
    let mut disks = Vec::new();
    for name in ["a", "b"] {
        let log = d.path().join(format!("{name}.log"));
        let plugin =
            ["--filter=log".to_string(), "pattern".into(), "size=24M".into(), format!("logfile={}", log.display())];
        let src = Server::nbdkit(d.path(), &format!("{name}-src"), &refs(&plugin));
        let dst = Server::nbdkit(d.path(), &format!("{name}-dst"), &["memory", "size=24M", "allocator=malloc"]);
        disks.push((name, src.uri(), dst.uri()));
        sources.push((src, dst, log));
    }
    let daemon = Daemon::start(d.path(), &db.url, &[]);
    let rows: Vec<(&str, String, String)> = disks.iter().map(|(n, s, t)| (*n, s.clone(), t.clone())).collect();
    db.execute(&format!(
        "START TRANSACTION; {} UPDATE replication_jobs SET max_rate = {} WHERE id = 'job-f'; COMMIT;",
        queue_sql("job-f", &rows),
        4 << 20
    ));
    daemon.cli(&["discover"]).assert_ok();
    progress_until(&daemon, "job-f", "both disks held", |p| p["limited"] == true);
    let from = SystemTime::now();
    // Four seconds of both copying (a measurement, not a wait for an event).
    std::thread::sleep(Duration::from_secs(4));
    let to = SystemTime::now();
    wait_status(&db, "job-f", "completed", &daemon);
    let shares: Vec<f64> = sources.iter().map(|(_, _, log)| read_between(&reads_with_times(log), from, to).0).collect();
    let total: f64 = shares.iter().sum();
    let secs = to.duration_since(from).unwrap().as_secs_f64();
    assert!(total <= 4.0 * MIB * 1.10 * secs + 2.0 * MIB, "{:.2} MiB in {secs:.1} s under a 4M limit", total / MIB);
    eprintln!("shares of the job's 4M in {secs:.1} s: {:?} MiB", shares.iter().map(|s| s / MIB).collect::<Vec<_>>());
    for s in &shares {
        assert!((s / total - 0.5).abs() <= 0.15, "unequal shares of the job's limit: {shares:?}");
    }
}
