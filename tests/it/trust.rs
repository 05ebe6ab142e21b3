//! Engine trust: servers that fail, hang or lie, and what `blockrepl copy` and the
//! daemon make of them. A copy either ends byte-identical, with the trouble said in
//! one line or a few, or fails with one line naming what failed; never a false
//! success, never a flood of lines, never a wait without end.
//!
//! The misbehaving targets are small nbdkit `sh` plugins over a file (see
//! [`FileTarget`]); the rest are nbdkit's own filters.

use std::time::{Duration, Instant};

use crate::harness::*;
use crate::mariadb::server;
use testkit::faulty::{FileTarget, Flush};
use testkit::jobs::{JOB_DEADLINE, disk, job, num, queue, sparse, wait_status};

fn with(filters: &[&str], plugin: &[String], params: &[&str]) -> Vec<String> {
    filters
        .iter()
        .map(|f| f.to_string())
        .chain(plugin.iter().cloned())
        .chain(params.iter().map(|p| p.to_string()))
        .collect()
}

fn lines_with(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

// ------------------------------------------------------------ flushes (item 1) --

#[test]
fn writes_a_failed_flush_dropped_are_written_again() {
    let d = tempdir();
    let plugin = sparse("16M", 61, 50);
    let src = Server::nbdkit(d.path(), "src", &refs(&plugin));
    let dst = FileTarget::start(d.path(), "dst", 16 << 20, Flush::DropsWritesAt(1));
    let run = blockrepl(&["copy", "--json", &src.uri(), &dst.uri()]);
    let j = run.json();
    assert!(j["retries"].as_u64().unwrap() >= 1, "{j}");
    assert!(run.stderr.contains("flush failed"), "the failed flush is said: {}", run.stderr);
    assert!(dst.flushes() >= 2, "flushed again after the failure");
    assert_eq!(dst.checksum(), checksum(&src.uri()), "the target holds the source's bytes");
}

#[test]
fn writes_a_failed_flush_dropped_are_written_again_over_several_connections() {
    let d = tempdir();
    let plugin = sparse("16M", 71, 60);
    let src = Server::nbdkit(d.path(), "src", &refs(&plugin));
    let dst = FileTarget::start(d.path(), "dst", 16 << 20, Flush::DropsWritesAtMultiConn(1));
    let run = blockrepl(&["copy", "--json", "--connections", "2", &src.uri(), &dst.uri()]);
    run.json();
    assert!(run.stderr.contains("flush failed"), "{}", run.stderr);
    let connections = std::fs::read_to_string(dst.file.with_file_name("connections")).unwrap();
    assert!(connections.trim().parse::<u32>().unwrap() >= 2, "two connections wrote");
    assert_eq!(dst.checksum(), checksum(&src.uri()), "the target holds the source's bytes");
}

#[test]
fn a_flush_that_keeps_failing_is_named_as_a_flush() {
    let d = tempdir();
    let src = Server::nbdkit(d.path(), "src", &["pattern", "size=4M"]);
    let dst = FileTarget::start(d.path(), "dst", 4 << 20, Flush::AlwaysFails("ENOSPC"));
    let line = blockrepl(&["copy", &src.uri(), &dst.uri()]).error_line();
    assert!(line.contains(&format!("flush of target {} failed after 1 attempt(s)", dst.uri())), "{line}");
    assert!(!line.contains("bytes at offset"), "a flush has no offset: {line}");
}

#[test]
fn a_failing_zero_request_is_named_as_a_zero_request() {
    let d = tempdir();
    let src = Server::nbdkit(d.path(), "src", &refs(&sparse("64M", 62, 20)));
    let dst = Server::nbdkit(
        d.path(),
        "dst",
        &["--filter=error", "memory", "size=64M", "error=ENOSPC", "error-zero-rate=100%"],
    );
    let line = blockrepl(&["copy", &src.uri(), &dst.uri()]).error_line();
    assert!(line.contains("zero request of") && line.contains("bytes at offset"), "{line}");
}

/// A 4 MiB copy to `dst` whose every flush fails with EIO, four attempts
/// 0.4, 0.8 and 1.6 s apart, `extra` added to the daemon's settings: how long
/// from the first flush to `failed`, and the job's error message.
fn give_up_on_flushes(d: &tempfile::TempDir, dst: &FileTarget, extra: &[(&str, &str)]) -> (Duration, String) {
    let db = server().fresh_database("flush_backoff");
    let src = Server::nbdkit(d.path(), "src", &["pattern", "size=4M"]);
    let mut policy = vec![
        ("BLOCKREPL__COPY__RETRY_ATTEMPTS", "4"),
        ("BLOCKREPL__COPY__RETRY_INITIAL_DELAY", "400ms"),
        ("BLOCKREPL__COPY__RETRY_MAX_DELAY", "10s"),
    ];
    policy.extend_from_slice(extra);
    let daemon = Daemon::start(d.path(), &db.url, &policy);
    queue(&db, "job-b", &[("disk-1", src.uri(), dst.uri())]);
    wait_until("the copy to start", JOB_DEADLINE, || dst.flushes() >= 1);
    let first = Instant::now();
    wait_status(&db, "job-b", "failed", &daemon);
    (first.elapsed(), job(&db, "job-b", "error_message").unwrap_or_default())
}

#[test]
fn failed_flushes_are_retried_with_the_usual_backoff() {
    let d = tempdir();
    let dst = FileTarget::start(d.path(), "dst", 4 << 20, Flush::AlwaysFails("EIO"));
    let (took, msg) = give_up_on_flushes(&d, &dst, &[]);
    // Waits of 0.4, 0.8 and 1.6 s between the four attempts.
    assert!(took >= Duration::from_millis(2800), "gave up after {took:?}");
    assert_eq!(dst.flushes(), 4);
    assert!(msg.contains(&format!("flush of target {} failed after 4 attempt(s)", dst.uri())), "{msg}");
}

/// Found by the chaos suite (a target that answered every flush of a
/// connection with ESHUTDOWN while it went away): with multi-conn, a worker
/// whose own chunks were done flushed again at once for the others after a
/// failed flush, and spent its whole retry budget in milliseconds.
#[test]
fn failed_flushes_on_multi_conn_are_retried_with_the_usual_backoff() {
    let d = tempdir();
    let dst = FileTarget::start(d.path(), "dst", 4 << 20, Flush::AlwaysFailsMultiConn("EIO"));
    let (took, msg) = give_up_on_flushes(&d, &dst, &[("BLOCKREPL__COPY__CONNECTIONS", "4")]);
    // Waits of 0.4, 0.8 and 1.6 s between each connection's four attempts.
    assert!(took >= Duration::from_millis(2800), "gave up after {took:?}");
    assert!(msg.contains(&format!("flush of target {} failed after 4 attempt(s)", dst.uri())), "{msg}");
}

/// Found by the chaos suite's fault matrix: the bytes a failed flush takes back
/// and the copy writes again are work. The watchdog used to count only a work
/// figure above its highest so far, so it stopped a job that was busy with its
/// flush retries ("no progress was made", naming neither disk nor server);
/// the job must instead fail with the flush's own error once they run out.
#[test]
fn writing_again_after_failed_flushes_is_progress_for_the_watchdog() {
    let d = tempdir();
    let db = server().fresh_database("flush_rewrite");
    let plugin = sparse("16M", 73, 100);
    let src = Server::nbdkit(d.path(), "src", &refs(&plugin));
    let dst = FileTarget::start(d.path(), "dst", 16 << 20, Flush::AlwaysFails("EIO"));
    // Waits of 0.5 s and then 1 s between eight flushes: far longer than the
    // stall timeout in all, each far shorter.
    let env = [
        ("BLOCKREPL__WATCHDOG__STALL_TIMEOUT", "3s"),
        ("BLOCKREPL__COPY__RETRY_ATTEMPTS", "8"),
        ("BLOCKREPL__COPY__RETRY_INITIAL_DELAY", "500ms"),
        ("BLOCKREPL__COPY__RETRY_MAX_DELAY", "1s"),
    ];
    let daemon = Daemon::start(d.path(), &db.url, &env);
    queue(&db, "job-r", &[("disk-1", src.uri(), dst.uri())]);
    wait_status(&db, "job-r", "failed", &daemon);
    let msg = job(&db, "job-r", "error_message").unwrap_or_default();
    assert!(msg.contains(&format!("flush of target {} failed after 8 attempt(s)", dst.uri())), "{msg}");
    assert!(msg.contains("disk-1"), "{msg}");
    assert_eq!(dst.flushes(), 8);
}

// ------------------------------------------------------ no flush (item 3) --

#[test]
fn a_target_without_flush_is_refused_unless_allowed() {
    let d = tempdir();
    let plugin = sparse("8M", 63, 50);
    let src = Server::nbdkit(d.path(), "src", &refs(&plugin));
    let dst = FileTarget::start(d.path(), "dst", 8 << 20, Flush::Absent);
    let untouched = dst.checksum();

    let line = blockrepl(&["copy", &src.uri(), &dst.uri()]).error_line();
    assert!(line.contains(&format!("target {} cannot flush", dst.uri())), "{line}");
    assert!(line.contains("--allow-no-flush"), "the line says how to go on: {line}");
    assert_eq!(dst.checksum(), untouched, "nothing was written");

    let run = blockrepl(&["copy", "--json", "--allow-no-flush", &src.uri(), &dst.uri()]);
    let j = run.json();
    assert_eq!(j["flushed"], false, "the summary does not claim a flush: {j}");
    assert_eq!(lines_with(&run.stderr, "cannot flush"), 1, "one warning: {}", run.stderr);
    assert_eq!(dst.checksum(), checksum(&src.uri()));
}

// ------------------------------------------------ block status (item 4) --

#[test]
fn a_source_whose_block_status_fails_is_copied_as_data() {
    let d = tempdir();
    let plugin = sparse("64M", 64, 30);
    let src = Server::nbdkit(d.path(), "src", &refs(&with(&["--filter=error"], &plugin, &["error-extents-rate=100%"])));
    let dst = Server::nbdkit(d.path(), "dst", &["memory", "size=64M"]);
    let t = Instant::now();
    let run = blockrepl(&["copy", "--json", &src.uri(), &dst.uri()]);
    let j = run.json();
    assert!(t.elapsed() < Duration::from_secs(30), "took {:?}", t.elapsed());
    assert_eq!(j["unmapped_bytes"], 64 << 20, "{j}");
    assert_eq!(j["planned_bytes"], 64 << 20, "everything is read");
    assert!(j["zeroed_bytes"].as_u64().unwrap() > 0, "zero blocks still become zero requests: {j}");
    assert_eq!(lines_with(&run.stderr, "could not say which blocks are allocated"), 1, "{}", run.stderr);
    let clean = Server::nbdkit(d.path(), "clean", &refs(&plugin));
    assert_eq!(checksum(&clean.uri()), checksum(&dst.uri()));
}

#[test]
fn a_source_without_base_allocation_is_copied_as_data_with_a_warning() {
    let d = tempdir();
    let plugin = sparse("32M", 65, 30);
    // Without structured replies a server has no meta contexts at all.
    let src = Server::nbdkit(d.path(), "src", &refs(&with(&["--no-sr"], &plugin, &[])));
    let dst = Server::nbdkit(d.path(), "dst", &["memory", "size=32M"]);
    let run = blockrepl(&["copy", "--json", &src.uri(), &dst.uri()]);
    let j = run.json();
    assert_eq!(j["unmapped_bytes"], 32 << 20, "{j}");
    assert_eq!(lines_with(&run.stderr, "does not offer base:allocation"), 1, "{}", run.stderr);
    assert_eq!(checksum(&src.uri()), checksum(&dst.uri()));
}

// --------------------------------------------------------- stalls (item 5) --

#[test]
fn a_source_that_stops_answering_fails_the_copy_after_the_stall_timeout() {
    let d = tempdir();
    let plugin = sparse("64M", 66, 50);
    // Extents answer at once; every read hangs far longer than the timeout.
    let src = Server::nbdkit(d.path(), "src", &refs(&with(&["--filter=delay"], &plugin, &["delay-read=120"])));
    let dst = Server::nbdkit(d.path(), "dst", &["memory", "size=64M"]);
    let t = Instant::now();
    let line = blockrepl(&["copy", "--stall-timeout", "3s", &src.uri(), &dst.uri()]).error_line();
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(2900) && took < Duration::from_secs(20), "took {took:?}");
    assert!(line.contains("no progress for 3s"), "{line}");
    assert!(line.contains("read of ") && line.contains("bytes at offset"), "{line}");
    assert!(line.contains(&format!("on source {}", src.uri())), "{line}");
    assert!(line.contains("has had no reply for"), "{line}");
}

#[test]
fn the_watchdog_names_the_disk_and_the_server_that_stopped_answering() {
    let d = tempdir();
    let db = server().fresh_database("stall_names");
    let plugin = sparse("64M", 67, 50);
    let src = Server::nbdkit(d.path(), "src", &refs(&with(&["--filter=delay"], &plugin, &["delay-read=120"])));
    let dst = Server::nbdkit(d.path(), "dst", &refs(&plugin));
    let daemon = Daemon::start(d.path(), &db.url, &[("BLOCKREPL__WATCHDOG__STALL_TIMEOUT", "4s")]);
    queue(&db, "job-hang", &[("disk-9", src.uri(), dst.uri())]);
    wait_status(&db, "job-hang", "failed", &daemon);
    let msg = job(&db, "job-hang", "error_message").unwrap_or_default();
    assert!(msg.contains("no progress was made for 4s"), "{msg}");
    assert!(msg.contains("disk disk-9") && msg.contains(&format!("on source {}", src.uri())), "{msg}");
    assert!(msg.contains("read of"), "the request that hung: {msg}");
}

// --------------------------------------------------------- cancel (item 6) --

#[test]
fn a_cancel_during_a_verify_retry_stops_within_a_second() {
    let d = tempdir();
    let log = d.path().join("dst.log");
    // One request's worth, so that each round of verification fails once more.
    let src = Server::nbdkit(d.path(), "src", &["pattern", "size=1M"]);
    // Writes land; every read of the target (verification) fails and is retried.
    let dst = Server::nbdkit(
        d.path(),
        "dst",
        &[
            "--filter=log",
            "--filter=error",
            "memory",
            "size=1M",
            "error-pread-rate=100%",
            &format!("logfile={}", log.display()),
        ],
    );
    let child = spawn_blockrepl(&["copy", "--verify", "--connections", "1", &src.uri(), &dst.uri()]);
    // One connection copies, one verifies, and each failed round of reads
    // reconnects after a backoff that doubles: after the fourth the wait is 4 s.
    let connects = || std::fs::read_to_string(&log).unwrap_or_default().matches(" Connect ").count();
    wait_until("verification to retry four times", JOB_DEADLINE, || connects() >= 6);
    let (took, code, stderr) = interrupt(child);
    assert!(took < Duration::from_secs(1), "took {took:?} to stop");
    assert_eq!(code, Some(130), "{stderr}");
}

#[test]
fn a_cancel_while_the_source_hangs_stops_within_a_second() {
    let d = tempdir();
    let log = d.path().join("src.log");
    let plugin = sparse("64M", 72, 50);
    let logfile = format!("logfile={}", log.display());
    let src = Server::nbdkit(
        d.path(),
        "src",
        &refs(&with(&["--filter=log", "--filter=delay"], &plugin, &["delay-read=120", &logfile])),
    );
    let dst = Server::nbdkit(d.path(), "dst", &["memory", "size=64M"]);
    let child = spawn_blockrepl(&["copy", &src.uri(), &dst.uri()]);
    wait_until("the first read", JOB_DEADLINE, || !logged(&log, "Read").is_empty());
    // The scenario: a source silent for a few seconds, not a slow one.
    let asked = Instant::now();
    wait_until("the source to have been silent for 3 s", JOB_DEADLINE, || asked.elapsed() >= Duration::from_secs(3));
    let (took, code, stderr) = interrupt(child);
    assert!(took < Duration::from_secs(1), "took {took:?} to stop");
    assert_eq!(code, Some(130), "{stderr}");
}

// ----------------------------------------------------- retry lines (item 7) --

#[test]
fn many_retries_give_a_few_lines() {
    let d = tempdir();
    let plugin = sparse("256M", 68, 100);
    let src = Server::nbdkit(d.path(), "src", &refs(&with(&["--filter=error"], &plugin, &["error-pread-rate=30%"])));
    let dst = Server::nbdkit(d.path(), "dst", &["memory", "size=256M"]);
    let run = blockrepl(&["copy", "--json", &src.uri(), &dst.uri()]);
    let j = run.json();
    let retries = j["retries"].as_u64().unwrap();
    assert!(retries >= 40, "errors were injected: {j}");
    let lines = lines_with(&run.stderr, "retrying");
    assert!((1..=6).contains(&lines), "{retries} retries, {lines} lines: {}", run.stderr);
    let clean = Server::nbdkit(d.path(), "clean", &refs(&plugin));
    assert_eq!(checksum(&clean.uri()), checksum(&dst.uri()));
}

// ------------------------------------------ checkpoints (issue 9, item 5) --

#[test]
fn checkpoints_advance_at_the_interval_when_one_connection_flushes_slowly() {
    let d = tempdir();
    let db = server().fresh_database("checkpoints");
    let size = 96 << 20;
    // About 10 s of copying over two connections (both servers are multi-conn);
    // every flush on the second target connection takes 6 s.
    let plugin = sparse("96M", 70, 100);
    let src = Server::nbdkit(d.path(), "src", &refs(&with(&["--filter=rate"], &plugin, &["rate=80M"])));
    let dst = FileTarget::start(d.path(), "dst", size, Flush::SlowOnSecondConnection(6));
    let daemon = Daemon::start(d.path(), &db.url, &[("BLOCKREPL__COPY__CONNECTIONS", "2")]);
    queue(&db, "job-c", &[("disk-1", src.uri(), dst.uri())]);
    // resume_offset as the database shows it (checkpoint_interval = 1s; the row
    // is written at least every 2 s while it changes).
    let mut changes: Vec<(Instant, u64)> = Vec::new();
    let end = Instant::now() + JOB_DEADLINE;
    loop {
        let offset = num(disk(&db, "job-c", "disk-1", "resume_offset")) as u64;
        if changes.last().is_none_or(|&(_, o)| o != offset) {
            changes.push((Instant::now(), offset));
        }
        if offset >= size as u64 || job(&db, "job-c", "status").as_deref() == Some("completed") {
            break;
        }
        assert!(Instant::now() < end, "not done: {changes:?}\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_status(&db, "job-c", "completed", &daemon);
    assert!(dst.flushes() >= 4, "flushes on both connections");
    let steps: Vec<(f64, u64)> = changes.windows(2).map(|w| ((w[1].0 - w[0].0).as_secs_f64(), w[1].1)).collect();
    let longest = steps.iter().map(|s| s.0).fold(0.0, f64::max);
    assert!(steps.len() >= 4, "the checkpoint moved a few times: {steps:?}");
    assert!(longest < 4.0, "a checkpoint at least every 4 s (interval 1 s, rows every 2 s): {steps:?}");
    let clean = Server::nbdkit(d.path(), "clean", &refs(&plugin));
    assert_eq!(dst.checksum(), checksum(&clean.uri()));
}

// ------------------------------------------------------------ the daemon --

#[test]
fn a_job_on_faulty_servers_completes_with_the_source_bytes_and_says_why_in_few_events() {
    let d = tempdir();
    let db = server().fresh_database("faulty");
    let plugin = sparse("32M", 69, 50);
    let faults = ["error-extents-rate=100%", "error-pread-rate=30%"];
    let src = Server::nbdkit(d.path(), "src", &refs(&with(&["--filter=error"], &plugin, &faults)));
    let dst = FileTarget::start(d.path(), "dst", 32 << 20, Flush::DropsWritesAt(1));
    let daemon = Daemon::start(d.path(), &db.url, &[]);
    queue(&db, "job-f", &[("disk-1", src.uri(), dst.uri())]);
    wait_status(&db, "job-f", "completed", &daemon);
    let clean = Server::nbdkit(d.path(), "clean", &refs(&plugin));
    assert_eq!(dst.checksum(), checksum(&clean.uri()), "the target holds the source's bytes");
    assert_eq!(num(disk(&db, "job-f", "disk-1", "resume_offset")) as u64, 32 << 20);
    let events: Vec<String> = db
        .column("SELECT CONCAT(level, ' ', message) AS v FROM job_events WHERE job_id = 'job-f' AND disk_id = 'disk-1'")
        .into_iter()
        .flatten()
        .collect();
    let count = |s: &str| events.iter().filter(|e| e.contains(s)).count();
    assert_eq!(count("warn the source could not say which blocks are allocated"), 1, "{events:?}");
    assert!(count("flush failed") >= 1, "{events:?}");
    let reads = events.iter().filter(|e| e.contains("retrying the source") && e.contains("read of")).count();
    assert!((1..=3).contains(&reads), "a few rows for many failed reads: {events:?}");
}

#[test]
fn the_daemon_refuses_a_target_without_flush_unless_configured() {
    let d = tempdir();
    let db = server().fresh_database("noflush");
    let src = Server::nbdkit(d.path(), "src", &["pattern", "size=4M"]);
    let dst = FileTarget::start(d.path(), "dst", 4 << 20, Flush::Absent);
    let untouched = dst.checksum();
    let mut daemon = Daemon::start(d.path(), &db.url, &[]);
    queue(&db, "job-n1", &[("disk-1", src.uri(), dst.uri())]);
    wait_status(&db, "job-n1", "failed", &daemon);
    let msg = job(&db, "job-n1", "error_message").unwrap_or_default();
    assert!(msg.contains("cannot flush"), "{msg}");
    assert_eq!(dst.checksum(), untouched);
    daemon.terminate();

    let d2 = d.path().join("allowed");
    std::fs::create_dir_all(&d2).unwrap();
    let daemon = Daemon::start(&d2, &db.url, &[("BLOCKREPL__COPY__ALLOW_NO_FLUSH", "true")]);
    queue(&db, "job-n2", &[("disk-1", src.uri(), dst.uri())]);
    wait_status(&db, "job-n2", "completed", &daemon);
    assert_eq!(dst.checksum(), checksum(&src.uri()));
    let warnings = db.column(
        "SELECT message AS v FROM job_events WHERE job_id = 'job-n2' AND level = 'warn' AND message LIKE '%cannot flush%'",
    );
    assert_eq!(warnings.len(), 1, "one warning for the disk");
}
