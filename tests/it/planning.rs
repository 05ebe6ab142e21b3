//! Copying while planning: a full copy from a source that answers block-status
//! queries slowly (nbdkit's delay filter, behind a blocksize filter that makes it
//! answer for 1 MiB at a time, as a slow VMware source does for its allocation)
//! starts copying before the plan is complete, ends byte-identical, resumes
//! from its checkpoint after a kill -9 during planning, and never shows a
//! percentage lower than one it showed before. Driven through the daemon, whose
//! progress API shows the planning stage (`Discover`) next to the bytes moved.

use std::time::{Duration, Instant};

use crate::harness::*;
use crate::mariadb::server;
use testkit::jobs::*;

/// 1 GiB, a quarter data in 1 MiB runs (about 500 extents); the source answers
/// block status for at most 1 MiB per query, each after 40 ms: about 1,000
/// queries, some 5 s of planning with 8 in flight.
fn slow_planning_source(dir: &std::path::Path, name: &str, seed: u32, log: Option<&std::path::Path>) -> Server {
    let mut args: Vec<String> = vec!["--filter=blocksize".into(), "--filter=delay".into()];
    if log.is_some() {
        args.insert(0, "--filter=log".into());
    }
    args.extend(plugin(seed));
    args.extend(["maxdata=1M".into(), "maxlen=1M".into(), "delay-extents=40ms".into()]);
    if let Some(log) = log {
        args.extend([format!("logfile={}", log.display()), "logappend=true".into()]);
    }
    Server::nbdkit(dir, name, &refs(&args))
}

fn plugin(seed: u32) -> Vec<String> {
    sparse("1G", seed, 25)
}

/// A file-backed target of the source's size.
fn file_target(dir: &std::path::Path, name: &str) -> Server {
    let path = dir.join(format!("{name}.img"));
    std::fs::File::create(&path).unwrap().set_len(1 << 30).unwrap();
    Server::nbdkit(dir, name, &["file", &path.display().to_string()])
}

/// One look at the job through `blockrepl progress --json`.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    stage: String,
    status: String,
    percent: f64,
    transferred: u64,
    total: u64,
}

fn sample(daemon: &Daemon, id: &str) -> Option<Sample> {
    let run = daemon.cli(&["progress", id, "--json"]);
    if !run.status.success() {
        return None;
    }
    let v = run.json();
    let a = &v["aggregate"];
    Some(Sample {
        stage: v["stage"].as_str().unwrap_or_default().to_string(),
        status: v["status"].as_str().unwrap_or_default().to_string(),
        percent: a["percent"].as_f64().unwrap_or(0.0),
        transferred: a["bytes_transferred"].as_u64().unwrap_or(0),
        total: a["total_bytes"].as_u64().unwrap_or(0),
    })
}

/// Samples the job's progress until it completes.
fn watch(db: &crate::mariadb::TestDb, daemon: &Daemon, id: &str) -> Vec<Sample> {
    let end = Instant::now() + JOB_DEADLINE;
    let mut seen = Vec::new();
    loop {
        if let Some(s) = sample(daemon, id) {
            seen.push(s);
        }
        let st = job(db, id, "status").unwrap_or_default();
        if st == "completed" {
            return seen;
        }
        assert_ne!(st, "failed", "{:?}\n{}", job(db, id, "error_message"), daemon.log_text());
        assert!(Instant::now() < end, "job still {st}\n{}", daemon.log_text());
    }
}

/// Samples taken while the disk was still being planned and bytes had moved:
/// copying overlapped planning.
fn overlapped(seen: &[Sample]) -> Vec<&Sample> {
    seen.iter().filter(|s| s.stage == "Discover" && s.status == "Streaming" && s.transferred > 0).collect()
}

#[test]
fn a_full_copy_starts_before_its_plan_is_complete_and_ends_identical() {
    let d = tempdir();
    let db = server().fresh_database("plan_overlap");
    let src = slow_planning_source(d.path(), "src", 61, None);
    let dst = file_target(d.path(), "dst");
    let daemon = Daemon::start(d.path(), &db.url, &[]);
    queue(&db, "job-p", &[("disk-1", src.uri(), dst.uri())]);
    let seen = watch(&db, &daemon, "job-p");

    let during = overlapped(&seen);
    assert!(!during.is_empty(), "no sample shows bytes copied while planning: {seen:?}");
    // Asked of a copy without the delay: `nbdinfo --map` asks one query at a time.
    let clean = Server::nbdkit(d.path(), "clean", &refs(&plugin(61)));
    let data = data_bytes(&allocation_map(&clean.uri()));
    assert!(
        during.iter().any(|s| s.total < data),
        "while planning, total_bytes is what is planned so far (the plan grows to {data}): {during:?}"
    );
    assert_eq!(num(job(&db, "job-p", "total_bytes")) as u64, data);
    assert_eq!(num(job(&db, "job-p", "bytes_transferred")) as u64, data);
    assert_eq!(job(&db, "job-p", "current_operation").as_deref(), Some("PersistChangeIDs"));
    assert_eq!(checksum(&clean.uri()), checksum(&dst.uri()), "the target is byte-identical to the source");
}

#[test]
fn the_percentage_never_goes_down_while_the_plan_grows() {
    let d = tempdir();
    let db = server().fresh_database("plan_percent");
    let src = slow_planning_source(d.path(), "src", 62, None);
    let dst = file_target(d.path(), "dst");
    let daemon = Daemon::start(d.path(), &db.url, &[]);
    queue(&db, "job-m", &[("disk-1", src.uri(), dst.uri())]);
    let mut seen = watch(&db, &daemon, "job-m");
    // And once the row says completed (the job ended between two samples, or
    // its actor still shows the final figures).
    seen.extend(sample(&daemon, "job-m"));

    // The percentage divided by what is planned so far would fall each time the
    // plan grows faster than the copy; it must not.
    assert!(overlapped(&seen).len() >= 3, "too few samples while planning to judge: {seen:?}");
    let percents: Vec<f64> = seen.iter().map(|s| s.percent).collect();
    for w in percents.windows(2) {
        assert!(w[1] >= w[0], "the percentage went down from {} to {}: {percents:?}", w[0], w[1]);
    }
    assert!(
        overlapped(&seen).iter().any(|s| s.percent > 0.0 && s.percent < 100.0),
        "the percentage moves while planning: {seen:?}"
    );
    assert_eq!(percents.last(), Some(&100.0), "{percents:?}");
    assert_eq!(num(job(&db, "job-m", "progress_percent")), 100.0);
}

#[test]
fn a_kill_9_during_planning_resumes_from_the_checkpoint_and_ends_identical() {
    let d = tempdir();
    let db = server().fresh_database("plan_kill9");
    let log = d.path().join("src.log");
    let mut src = slow_planning_source(d.path(), "src", 63, Some(&log));
    let dst = file_target(d.path(), "dst");
    let env = [("BLOCKREPL__DISCOVERY__LEASE", "3s"), ("BLOCKREPL__COPY__CHECKPOINT_INTERVAL", "1s")];
    let mut daemon = Daemon::start(d.path(), &db.url, &env);
    queue(&db, "job-k", &[("disk-1", src.uri(), dst.uri())]);
    wait_until("a checkpoint while the disk is still planned", JOB_DEADLINE, || {
        let planning = job(&db, "job-k", "current_operation").as_deref() == Some("Discover")
            && job(&db, "job-k", "status").as_deref() == Some("streaming");
        planning && num(disk(&db, "job-k", "disk-1", "resume_offset")) > 0.0
    });
    daemon.kill9();
    let checkpoint = num(disk(&db, "job-k", "disk-1", "resume_offset")) as u64;
    let planned = num(disk(&db, "job-k", "disk-1", "planned_bytes")) as u64;
    let clean = Server::nbdkit(d.path(), "clean", &refs(&plugin(63)));
    let data = data_bytes(&allocation_map(&clean.uri()));
    assert!(checkpoint > 0 && planned < data, "killed during planning: {checkpoint} planned {planned} of {data}");
    // As in the daemon's kill -9 test: nbdkit 1.32 may abort a moment after its
    // client vanished mid-request; restart it (stateless) to avoid that race.
    src.stop();
    src.start();
    let log_len = std::fs::metadata(&log).unwrap().len() as usize;

    daemon.spawn();
    // While the resumed run plans again, the row keeps the earlier plan: its
    // bytes synced (which never go down) never exceed its planned bytes.
    let row = "SELECT CONCAT(bytes_synced, ' of ', planned_bytes, ' ', bytes_synced <= planned_bytes) AS v \
               FROM vm_disks WHERE job_id = 'job-k'";
    let mut looks = 0;
    let end = Instant::now() + JOB_DEADLINE;
    while job(&db, "job-k", "status").as_deref() != Some("completed") {
        let seen = one(&db, row).unwrap_or_default();
        assert!(seen.ends_with(" 1"), "bytes synced above planned bytes: {seen}");
        assert_ne!(job(&db, "job-k", "status").as_deref(), Some("failed"), "{}", daemon.log_text());
        assert!(Instant::now() < end, "not completed in {JOB_DEADLINE:?}");
        looks += 1;
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(looks > 10, "the resumed run was watched ({looks} looks)");
    assert!(daemon.log_text().contains(&format!("resuming from offset {checkpoint}")), "{}", daemon.log_text());
    let text = std::fs::read_to_string(&log).unwrap();
    let tail = d.path().join("src.tail");
    std::fs::write(&tail, &text[log_len.min(text.len())..]).unwrap();
    let reads = logged(&tail, "Read");
    assert!(!reads.is_empty(), "the resumed run read the rest");
    assert!(reads.iter().all(|r| r.offset >= checkpoint), "nothing below the checkpoint {checkpoint} is read again");
    assert_eq!(num(job(&db, "job-k", "bytes_transferred")) as u64, data);
    assert_eq!(checksum(&clean.uri()), checksum(&dst.uri()), "the target is byte-identical to the source");
}

/// The source restarted while the plan was being asked for: planning connects
/// again and goes on where it was, so the copy ends identical with its whole
/// plan, nothing read as data for want of one. Before, the lost planning
/// connection failed the disk.
#[test]
fn a_source_restarted_while_planning_is_connected_to_again_and_planning_goes_on() {
    let d = tempdir();
    let log = d.path().join("src.log");
    let mut src = slow_planning_source(d.path(), "src", 65, Some(&log));
    let dst = file_target(d.path(), "dst");
    let child = spawn_blockrepl(&["copy", "--json", &src.uri(), &dst.uri()]);
    wait_until("planning under way", READY, || logged(&log, "Extents").len() >= 40);
    src.kill();
    let asked_before = logged(&log, "Extents").len();
    src.start();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("reconnected to the source"), "{stderr}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let clean = Server::nbdkit(d.path(), "clean", &refs(&plugin(65)));
    let data = data_bytes(&allocation_map(&clean.uri()));
    assert_eq!(j["unmapped_bytes"], 0, "nothing read as data for want of a plan: {stderr}");
    assert_eq!((j["planned_bytes"].as_u64(), j["bytes_transferred"].as_u64()), (Some(data), Some(data)), "{j}");
    assert!(asked_before < 1000 && logged(&log, "Extents").len() > asked_before, "planning went on after the restart");
    assert_eq!(checksum(&clean.uri()), checksum(&dst.uri()), "the target is byte-identical to the source");
}
