//! The orchestrator's contract for change IDs and history, end to end (issue 12):
//! the change-ID chain of incremental disks, one `cbt_history` row per disk per
//! attempt that ended, and rows rewritten only when a value changed. The daemon
//! runs as a child process against the private MariaDB; jobs are queued with
//! plain SQL, as an orchestrator does; targets are files whose bytes are checked.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::mariadb::{TestDb, server};
use testkit::jobs::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// `len` bytes of a pattern that differs with `seed`.
fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8).collect()
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
}

/// A file of `size` zero bytes.
fn zero_file(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// A VM disk on a file served by nbdkit, its target another file, and a daemon
/// that has made the target a copy of the source with a full job recording
/// change ID `cid-1` for `vm-c` disk `disk-1`.
struct Synced {
    db: TestDb,
    src_file: PathBuf,
    dst_file: PathBuf,
    src: Server,
    dst: Server,
    daemon: Daemon,
    /// Last: removed after the servers and the daemon stopped.
    _dir: tempfile::TempDir,
}

impl Synced {
    fn new(prefix: &str) -> Synced {
        let dir = tempdir();
        let db = server().fresh_database(prefix);
        let (src_file, dst_file) = (dir.path().join("src.img"), dir.path().join("dst.img"));
        zero_file(&src_file, SIZE);
        write_at(&src_file, 0, &pattern(1, SIZE));
        zero_file(&dst_file, SIZE);
        let src = Server::nbdkit(dir.path(), "src", &["file", src_file.to_str().unwrap()]);
        let dst = Server::nbdkit(dir.path(), "dst", &["file", dst_file.to_str().unwrap()]);
        let daemon = Daemon::start(dir.path(), &db.url, &[]);
        let s = Synced { db, src_file, dst_file, src, dst, daemon, _dir: dir };
        s.db.execute(&format!(
            "INSERT INTO replication_jobs (id, vm_name, replication_type, status) VALUES ('base', 'vm-c', 'full', 'pending');
             INSERT INTO vm_disks (job_id, disk_id, source_uri, target_uri, change_id)
               VALUES ('base', 'disk-1', '{}', '{}', 'cid-1');",
            s.src.uri(),
            s.dst.uri()
        ));
        wait_status(&s.db, "base", "completed", &s.daemon);
        assert_eq!(file_checksum(&s.dst_file), file_checksum(&s.src_file), "the full copy");
        s
    }

    /// Changes 1 MiB of the source at `offset` (what the VM wrote since).
    fn change_source(&self, offset: u64, seed: u8) {
        write_at(&self.src_file, offset, &pattern(seed, MIB));
    }

    /// Queues an incremental job of `vm` for disk-1 that copies the MiB at
    /// `offset`, relative to `previous`, making the target `change_id`.
    fn incremental(&self, id: &str, vm: &str, previous: &str, change_id: &str, offset: u64, skip: bool) {
        self.db.execute(&format!(
            "INSERT INTO replication_jobs (id, vm_name, replication_type, status, skip_change_check)
               VALUES ('{id}', '{vm}', 'incremental', 'pending', {skip});
             INSERT INTO vm_disks (job_id, disk_id, source_uri, target_uri, changed_areas, previous_change_id, change_id)
               VALUES ('{id}', 'disk-1', '{}', '{}', '[{{\"start\": {offset}, \"length\": {MIB}}}]', '{previous}', '{change_id}');",
            self.src.uri(),
            self.dst.uri()
        ));
    }

    fn successes(&self, id: &str) -> String {
        one(
            &self.db,
            &format!("SELECT CAST(COUNT(*) AS CHAR) AS v FROM cbt_history WHERE job_id = '{id}' AND sync_success"),
        )
        .unwrap_or_default()
    }
}

#[test]
fn an_incremental_disk_that_breaks_its_change_id_chain_fails_before_anything_is_written() {
    let s = Synced::new("chain_broken");
    s.change_source(4 * MIB, 2);
    let before = file_checksum(&s.dst_file);

    // The target holds cid-1; a delta relative to cid-0 would corrupt it.
    s.incremental("broken", "vm-c", "cid-0", "cid-2", 4 * MIB, false);
    wait_status(&s.db, "broken", "failed", &s.daemon);
    let msg = job(&s.db, "broken", "error_message").unwrap_or_default();
    assert_eq!(
        msg,
        "disk disk-1: change ID chain broken: previous_change_id is 'cid-0' but the last successful sync of vm \
         'vm-c' disk 'disk-1' recorded change_id 'cid-1'; nothing was copied (set skip_change_check to copy anyway)"
    );
    assert_eq!(disk(&s.db, "broken", "disk-1", "sync_status").as_deref(), Some("failed"));
    assert_eq!(disk(&s.db, "broken", "disk-1", "disk_change_id"), None);
    assert_eq!(s.successes("broken"), "0", "no success in the history");
    assert_eq!(file_checksum(&s.dst_file), before, "not one byte of the target changed");

    // A disk of a VM nothing was recorded for has no chain to continue.
    s.incremental("unknown", "vm-new", "cid-1", "cid-2", 4 * MIB, false);
    wait_status(&s.db, "unknown", "failed", &s.daemon);
    let msg = job(&s.db, "unknown", "error_message").unwrap_or_default();
    assert!(msg.contains("previous_change_id is 'cid-1' but no successful sync of vm 'vm-new' disk 'disk-1'"), "{msg}");
    assert_eq!(file_checksum(&s.dst_file), before, "not one byte of the target changed");

    // The intact chain: copied, and the chain moves on to cid-2 (the broken
    // job's failure is no link in it).
    s.incremental("intact", "vm-c", "cid-1", "cid-2", 4 * MIB, false);
    wait_status(&s.db, "intact", "completed", &s.daemon);
    assert_eq!(file_checksum(&s.dst_file), file_checksum(&s.src_file));
    assert_eq!(disk(&s.db, "intact", "disk-1", "disk_change_id").as_deref(), Some("cid-2"));
    assert_eq!(s.successes("intact"), "1");
    s.change_source(8 * MIB, 3);
    s.incremental("next", "vm-c", "cid-2", "cid-3", 8 * MIB, false);
    wait_status(&s.db, "next", "completed", &s.daemon);
    assert_eq!(file_checksum(&s.dst_file), file_checksum(&s.src_file));
}

#[test]
fn skip_change_check_copies_an_incremental_disk_whose_chain_is_broken() {
    let s = Synced::new("chain_skip");
    s.change_source(4 * MIB, 2);
    s.incremental("skip", "vm-c", "cid-0", "cid-2", 4 * MIB, true);
    wait_status(&s.db, "skip", "completed", &s.daemon);
    assert_eq!(file_checksum(&s.dst_file), file_checksum(&s.src_file));
    assert_eq!(disk(&s.db, "skip", "disk-1", "disk_change_id").as_deref(), Some("cid-2"));

    // The progress API shows the disk's change IDs and its history row.
    let p = s.daemon.cli(&["progress", "skip", "--json"]).json();
    let cbt = &p["disks"][0]["cbt"];
    assert_eq!(
        (cbt["type"].as_str(), cbt["previous_change_id"].as_str(), cbt["change_id"].as_str()),
        (Some("incremental"), Some("cid-0"), Some("cid-2")),
        "{p}"
    );
    assert_eq!(cbt["disk_change_id"], "cid-2", "{p}");
    assert_eq!((cbt["attempt"].as_i64(), cbt["sync_success"].as_bool()), (Some(1), Some(true)), "{p}");
    assert_eq!((cbt["blocks_changed"].as_u64(), cbt["bytes_transferred"].as_u64()), (Some(1), Some(MIB)), "{p}");
    assert_eq!(p["cbt"]["previous_change_id"], "cid-0", "the job-level section stays: {p}");
}

#[test]
fn a_failed_attempt_is_recorded_with_its_bytes_so_far_and_a_retry_adds_a_row() {
    let d = tempdir();
    let db = server().fresh_database("attempts");
    let trigger = d.path().join("fail-reads");
    let size = 256 * MIB;
    // About 12 MB/s; every read fails with EIO while the trigger file exists.
    let plugin = sparse("256M", 11, 50);
    let pread_file = format!("error-pread-file={}", trigger.display());
    let mut args = vec!["--filter=error", "--filter=rate"];
    args.extend(refs(&plugin));
    args.extend(["rate=100M", "error-pread=EIO", "error-pread-rate=100%", pread_file.as_str()]);
    let mut src = Server::nbdkit(d.path(), "src", &args);
    let dst_file = d.path().join("dst.img");
    zero_file(&dst_file, size);
    let dst = Server::nbdkit(d.path(), "dst", &["file", dst_file.to_str().unwrap()]);
    let daemon = Daemon::start(
        d.path(),
        &db.url,
        &[
            ("BLOCKREPL__COPY__RETRY_ATTEMPTS", "2"),
            ("BLOCKREPL__COPY__RETRY_INITIAL_DELAY", "50ms"),
            ("BLOCKREPL__COPY__RETRY_MAX_DELAY", "100ms"),
        ],
    );
    queue(&db, "job-r", &[("disk-1", src.uri(), dst.uri())]);
    wait_until("16 MiB copied", JOB_DEADLINE, || {
        num(disk(&db, "job-r", "disk-1", "bytes_synced")) >= (16 * MIB) as f64
    });
    std::fs::write(&trigger, b"").unwrap();
    wait_status(&db, "job-r", "failed", &daemon);

    let history = |db: &TestDb| {
        db.column(
            "SELECT CONCAT_WS(' ', attempt, sync_success, bytes_transferred, sync_duration_seconds > 0, sync_type)
               AS v FROM cbt_history WHERE job_id = 'job-r' ORDER BY attempt",
        )
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
    };
    let rows = history(&db);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let f: Vec<&str> = rows[0].split(' ').collect();
    let so_far: u64 = f[2].parse().unwrap();
    let planned = num(disk(&db, "job-r", "disk-1", "planned_bytes")) as u64;
    assert_eq!((f[0], f[1], f[3], f[4]), ("1", "0", "1", "full"), "{rows:?}");
    assert!(so_far >= 8 * MIB && so_far < planned, "bytes so far {so_far} of {planned}");
    assert_eq!(so_far, num(disk(&db, "job-r", "disk-1", "bytes_synced")) as u64, "what the disk row shows");

    // The orchestrator queues it again: a new attempt, with a row of its own.
    wait_until("the lease to be released", READY, || job(&db, "job-r", "owner_node").is_none());
    std::fs::remove_file(&trigger).unwrap();
    // nbdkit 1.32 may abort when a client vanished mid-request: restart it (it
    // is stateless), so that the retry does not depend on that race.
    src.stop();
    src.start();
    db.execute("UPDATE replication_jobs SET status = 'pending' WHERE id = 'job-r'");
    wait_status(&db, "job-r", "completed", &daemon);
    assert_eq!(job(&db, "job-r", "attempt").as_deref(), Some("2"));
    assert_eq!(job(&db, "job-r", "error_message"), None, "the first attempt's error is gone");
    let rows = history(&db);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows[0].starts_with("1 0 ") && rows[1].starts_with(&format!("2 1 {planned} ")), "{rows:?}");
    let clean = Server::nbdkit(d.path(), "clean", &refs(&plugin));
    assert_eq!(checksum(&clean.uri()), file_checksum(&dst_file), "the target is byte-identical to the source");
}

#[test]
fn a_stalled_copy_leaves_updated_at_alone_until_the_watchdog_fails_it() {
    let d = tempdir();
    let db = server().fresh_database("stall_rows");
    let plugin = sparse("64M", 5, 50);
    // Extents answer at once; every read hangs far longer than the test.
    let mut args = vec!["--filter=delay"];
    args.extend(refs(&plugin));
    args.push("delay-read=120");
    let src = Server::nbdkit(d.path(), "src", &args);
    let dst = Server::nbdkit(d.path(), "dst", &["memory", "size=64M"]);
    // Lease renewals every second (a third of the lease) while it stalls.
    let env = [("BLOCKREPL__WATCHDOG__STALL_TIMEOUT", "14s"), ("BLOCKREPL__DISCOVERY__LEASE", "3s")];
    let daemon = Daemon::start(d.path(), &db.url, &env);
    queue(&db, "job-s", &[("disk-1", src.uri(), dst.uri())]);
    wait_until("the copy to be streaming", JOB_DEADLINE, || {
        job(&db, "job-s", "status").as_deref() == Some("streaming")
            && disk(&db, "job-s", "disk-1", "sync_status").as_deref() == Some("streaming")
    });
    let rows = || {
        (
            job(&db, "job-s", "updated_at").unwrap_or_default(),
            disk(&db, "job-s", "disk-1", "updated_at").unwrap_or_default(),
            job(&db, "job-s", "lease_expires_at").unwrap_or_default(),
        )
    };
    // The last changes (the stage, the plan's figures) land within one throttle
    // interval; from then on nothing changes. Without the rule, the rows were
    // rewritten every 2 s and never settle.
    let settle = Duration::from_secs(3);
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut seen = vec![rows()];
    let mut since = Instant::now();
    while since.elapsed() < settle {
        assert!(Instant::now() < deadline, "rows rewritten while the copy stalls: {seen:?}\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(100));
        let now = rows();
        if (&now.0, &now.1) != (&seen.last().unwrap().0, &seen.last().unwrap().1) {
            since = Instant::now();
        }
        seen.push(now);
    }
    // A bounded observation window, through several lease renewals.
    let (job_at, disk_at, lease_at) = rows();
    let window = Instant::now() + Duration::from_secs(4);
    while Instant::now() < window {
        let (j, dk, _) = rows();
        assert_eq!((&j, &dk), (&job_at, &disk_at), "updated_at moved while stalled\n{}", daemon.log_text());
        assert_eq!(job(&db, "job-s", "status").as_deref(), Some("streaming"), "still stalled, not yet failed");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_ne!(rows().2, lease_at, "the lease was renewed meanwhile");

    wait_status(&db, "job-s", "failed", &daemon);
    assert!(job(&db, "job-s", "error_message").unwrap_or_default().contains("no progress was made for 14s"));
    let (j, dk, _) = rows();
    assert!(j > job_at && dk > disk_at, "the failure is a change: {j} {dk} after {job_at} {disk_at}");
}
