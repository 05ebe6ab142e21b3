//! VMware through the binary, against the vSphere simulator
//! (`tools/vcsim-cbt`): `blockrepl vmware-check`, and VMware jobs run by the
//! daemon (queued by SQL; CBT, the snapshot, the changed areas, one NBD server
//! per disk, the copies, the change IDs, the cleanup). Each disk's NBD server
//! is nbdkit's `file` plugin on the simulator's flat file (the vddk plugin in
//! production). The client's calls, the changed areas and the copies without
//! the daemon are unit tests in `src/vmware/tests.rs`.

use std::path::{Path, PathBuf};

use crate::harness::{Daemon, Server, blockrepl, tempdir, wait_until};
use crate::mariadb::{TestDb, server};
use crate::vcsim::{BLOCK, PASSWORD, USER, Vcsim, pattern};
use testkit::jobs::{JOB_DEADLINE, disk, job, num, one, wait_status};

/// A `[vmware.sim]` section (and its password file in `dir`).
fn section(dir: &Path, sim: &Vcsim, thumbprint: &str, password: &str) -> String {
    let pw = dir.join("vc.password");
    std::fs::write(&pw, format!("{password}\n")).unwrap();
    format!(
        "[vmware.sim]\nurl = \"{}\"\nuser = \"{USER}\"\npassword_file = \"{}\"\nthumbprint = \"{thumbprint}\"\n",
        sim.url,
        pw.display()
    )
}

/// A configuration file with one `[vmware.sim]` section.
fn config(dir: &Path, sim: &Vcsim, thumbprint: &str, password: &str) -> PathBuf {
    let path = dir.join("blockrepl.toml");
    std::fs::write(&path, section(dir, sim, thumbprint, password)).unwrap();
    path
}

#[test]
fn vmware_check_lists_the_disks_of_a_vm_by_path_or_uuid() {
    let dir = tempdir();
    let sim = Vcsim::start(dir.path(), &["-disks", "8M,4M"]);
    let cfg = config(dir.path(), &sim, &sim.thumbprint, PASSWORD);
    let cfg = cfg.to_str().unwrap();
    for vm in [sim.vm_path.as_str(), sim.vm_uuid.as_str()] {
        let out = blockrepl(&["vmware-check", "--config", cfg, "sim", vm, "--json"]).json();
        assert_eq!(out["vcenter"]["api_type"], "VirtualCenter");
        assert_eq!(out["vm"]["moref"], sim.vm_moref.as_str());
        assert_eq!(out["vm"]["cbt_enabled"], false);
        let disks = out["vm"]["disks"].as_array().unwrap();
        let got: Vec<(i64, &str, u64)> = disks
            .iter()
            .map(|d| (d["key"].as_i64().unwrap(), d["label"].as_str().unwrap(), d["capacity"].as_u64().unwrap()))
            .collect();
        assert_eq!(got, vec![(2000, "Hard disk 1", 8 << 20), (2001, "Hard disk 2", 4 << 20)]);
    }
    let text = blockrepl(&["vmware-check", "--config", cfg, "sim", &sim.vm_path]);
    text.assert_ok();
    assert!(text.stdout.contains("disk-2001  Hard disk 2  4194304 bytes"), "{}", text.stdout);
}

#[test]
fn vmware_check_refuses_another_certificate_in_one_line() {
    let dir = tempdir();
    let sim = Vcsim::start(dir.path(), &[]);
    let other = "00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF";
    let cfg = config(dir.path(), &sim, other, PASSWORD);
    let line = blockrepl(&["vmware-check", "--config", cfg.to_str().unwrap(), "sim"]).error_line();
    assert!(line.contains("does not match"), "{line}");
    assert!(line.contains(&sim.thumbprint) && line.contains(other), "both thumbprints: {line}");
}

#[test]
fn vmware_check_with_a_wrong_password_says_so_without_showing_it() {
    let dir = tempdir();
    let sim = Vcsim::start(dir.path(), &[]);
    let cfg = config(dir.path(), &sim, &sim.thumbprint, "Wr0ng-pa55word");
    let run = blockrepl(&["vmware-check", "--config", cfg.to_str().unwrap(), "sim", &sim.vm_path]);
    let line = run.error_line();
    assert!(line.contains(&format!("login as {USER} refused")), "{line}");
    assert!(!run.stderr.contains("Wr0ng-pa55word") && !run.stdout.contains("Wr0ng-pa55word"));
}

#[test]
fn vmware_check_names_a_missing_vm_or_section_or_bad_key() {
    let dir = tempdir();
    let sim = Vcsim::start(dir.path(), &[]);
    let cfg = config(dir.path(), &sim, &sim.thumbprint, PASSWORD);
    let cfg_s = cfg.to_str().unwrap();
    let line = blockrepl(&["vmware-check", "--config", cfg_s, "sim", "/DC0/vm/nope"]).error_line();
    assert!(line.contains("no virtual machine /DC0/vm/nope"), "{line}");
    let line = blockrepl(&["vmware-check", "--config", cfg_s, "other"]).error_line();
    assert!(line.contains("no [vmware.other] section"), "{line}");

    let text = std::fs::read_to_string(&cfg).unwrap().replace(&sim.thumbprint, "AB:CD");
    std::fs::write(&cfg, text).unwrap();
    let line = blockrepl(&["vmware-check", "--config", cfg_s, "sim"]).error_line();
    assert!(line.contains("vmware.sim.thumbprint"), "{line}");
}

// ---- VMware jobs run by the daemon ----------------------------------------

/// The daemon's `[vmware.sim]`: the simulator, and nbdkit's file plugin on the
/// simulator's flat files as each disk's NBD server.
fn daemon_section(dir: &Path, sim: &Vcsim) -> String {
    format!(
        "{}nbd_command = [\"nbdkit\", \"--exit-with-parent\", \"--foreground\", \"--readonly\", \"--unix\", \
         \"{{socket}}\", \"file\", \"file={}/{{flat_path}}\"]\n",
        section(dir, sim, &sim.thumbprint, PASSWORD),
        sim.datastore_dir().display()
    )
}

/// A file-backed target of `size` zero bytes, and its NBD server (`filters`:
/// `--filter=...` options and their parameters, e.g. a rate limit).
fn target(dir: &Path, name: &str, size: u64, filters: &[&str]) -> (PathBuf, Server) {
    let file = dir.join(format!("{name}.img"));
    std::fs::File::create(&file).unwrap().set_len(size).unwrap();
    let spec = format!("file={}", file.display());
    let (options, params): (Vec<&str>, Vec<&str>) = filters.iter().partition(|a| a.starts_with("--"));
    let mut args = options;
    args.extend(["file", spec.as_str()]);
    args.extend(params);
    (file.clone(), Server::nbdkit(dir, name, &args))
}

/// One disk of a VMware job: its device key, target, previous change ID, and
/// whether the target is known to read as zeros.
struct VmDisk<'a> {
    key: i32,
    target: &'a Server,
    previous: Option<String>,
    zero: bool,
}

/// Queues a VMware job of the simulator's VM by SQL, as an orchestrator does.
fn queue_vm(db: &TestDb, id: &str, kind: &str, sim: &Vcsim, disks: &[VmDisk<'_>]) {
    queue_vm_with(db, id, kind, false, sim, disks);
}

/// [`queue_vm`], with the job's `skip_change_check`.
fn queue_vm_with(db: &TestDb, id: &str, kind: &str, skip_check: bool, sim: &Vcsim, disks: &[VmDisk<'_>]) {
    let mut sql = format!(
        "INSERT INTO replication_jobs (id, vm_name, replication_type, skip_change_check, status, vmware_vcenter, \
           vmware_vm) VALUES ('{id}', '{}', '{kind}', {}, 'pending', 'sim', '{}');",
        sim.vm_name, skip_check as u8, sim.vm_path
    );
    for d in disks {
        let previous = d.previous.as_ref().map_or("NULL".to_string(), |p| format!("'{p}'"));
        sql.push_str(&format!(
            "INSERT INTO vm_disks (job_id, disk_id, vmware_disk_key, source_uri, target_uri, destination_is_zero, \
               previous_change_id) VALUES ('{id}', 'disk-{}', {}, '', '{}', {}, {previous});",
            d.key,
            d.key,
            d.target.uri(),
            d.zero as u8
        ));
    }
    db.execute(&format!("START TRANSACTION; {sql} COMMIT;"));
}

/// The VM's snapshots, as `vmware-check` lists them.
fn snapshots(daemon: &Daemon, sim: &Vcsim) -> Vec<String> {
    let out = blockrepl(&["vmware-check", "--config", daemon.config.to_str().unwrap(), "sim", &sim.vm_path, "--json"]);
    let v = out.json();
    v["snapshots"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_string()).collect()
}

fn events(db: &TestDb, id: &str) -> Vec<String> {
    db.column(&format!("SELECT message AS v FROM job_events WHERE job_id = '{id}' ORDER BY id"))
        .into_iter()
        .flatten()
        .collect()
}

fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[test]
fn a_vm_is_copied_full_then_incrementally_by_the_daemon() {
    let dir = tempdir();
    let d = dir.path();
    // CBT is off: the job turns it on.
    let sim = Vcsim::start(d, &["-disks", "4M,2M"]);
    sim.write(0, 0, &pattern(3 * BLOCK as usize, 1));
    sim.write(0, 40 * BLOCK + 7, &pattern(1000, 2));
    sim.write(1, 9 * BLOCK, &pattern(2 * BLOCK as usize + 1, 3));
    let db = server().fresh_database("vm_full_incr");
    let daemon = Daemon::start_extra(d, &db.url, &[], &daemon_section(d, &sim));
    let targets: Vec<_> =
        sim.disks.iter().enumerate().map(|(i, disk)| target(d, &format!("t{i}"), disk.capacity, &[])).collect();
    let keys = [sim.disks[0].key, sim.disks[1].key];

    // Full: the allocated areas onto fresh (zero) targets.
    let full: Vec<_> =
        (0..2).map(|i| VmDisk { key: keys[i], target: &targets[i].1, previous: None, zero: true }).collect();
    queue_vm(&db, "vm-full", "full", &sim, &full);
    wait_status(&db, "vm-full", "completed", &daemon);
    let allocated: Vec<u64> = (0..2).map(|i| sim.nonzero_areas(i).iter().map(|a| a.1).sum()).collect();
    assert_eq!(num(job(&db, "vm-full", "total_bytes")) as u64, allocated.iter().sum::<u64>());
    let mut previous = Vec::new();
    for i in 0..2 {
        let id = format!("disk-{}", keys[i]);
        assert_eq!(num(disk(&db, "vm-full", &id, "planned_bytes")) as u64, allocated[i], "{id}: allocated areas");
        assert!(same_file(&sim.disks[i].flat, &targets[i].0), "{id} differs after the full copy");
        let change_id = disk(&db, "vm-full", &id, "disk_change_id").expect("a change ID after the flush");
        assert_eq!(disk(&db, "vm-full", &id, "change_id").as_deref(), Some(change_id.as_str()));
        let cbt =
            one(&db, &format!("SELECT change_id AS v FROM cbt_history WHERE job_id='vm-full' AND disk_id='{id}'"));
        assert_eq!(cbt.as_deref(), Some(change_id.as_str()));
        previous.push(change_id);
    }
    let ev = events(&db, "vm-full");
    for want in ["CBT was off", "Snapshotting (Snapshot)", "(QueryCBT)", "(StartExports)", "(Cleanup)", "removed"] {
        assert!(ev.iter().any(|e| e.contains(want)), "no '{want}' event in {ev:?}");
    }
    assert_eq!(job(&db, "vm-full", "vmware_snapshot"), None, "the snapshot is removed");
    assert!(snapshots(&daemon, &sim).is_empty(), "no snapshot is left behind");

    // Changes: new data, data zeroed, one byte at the end of the small disk.
    sim.write(0, BLOCK + 5, &pattern(10, 9));
    sim.write(0, 40 * BLOCK, &vec![0; BLOCK as usize]);
    sim.write(0, 60 * BLOCK, &pattern(BLOCK as usize, 4));
    sim.write(1, 2 * 1024 * 1024 - 1, &[0xFF]);
    let incr: Vec<_> = (0..2)
        .map(|i| VmDisk { key: keys[i], target: &targets[i].1, previous: Some(previous[i].clone()), zero: false })
        .collect();
    queue_vm(&db, "vm-incr", "incremental", &sim, &incr);
    wait_status(&db, "vm-incr", "completed", &daemon);
    let changed = [3 * BLOCK, BLOCK];
    for i in 0..2 {
        let id = format!("disk-{}", keys[i]);
        assert_eq!(num(disk(&db, "vm-incr", &id, "planned_bytes")) as u64, changed[i], "{id}: only the changed areas");
        assert!(same_file(&sim.disks[i].flat, &targets[i].0), "{id} differs after the incremental copy");
        let now = disk(&db, "vm-incr", &id, "disk_change_id").expect("a new change ID");
        assert_ne!(now, previous[i]);
        let cbt = one(
            &db,
            &format!(
                "SELECT CONCAT_WS('|', change_id, previous_change_id, sync_type) AS v FROM cbt_history \
                 WHERE job_id='vm-incr' AND disk_id='{id}'"
            ),
        );
        assert_eq!(cbt, Some(format!("{now}|{}|incremental", previous[i])));
    }
    assert!(!events(&db, "vm-incr").iter().any(|e| e.contains("CBT was off")), "CBT stays on");
    assert!(snapshots(&daemon, &sim).is_empty(), "no snapshot is left behind");
}

#[test]
fn an_invalid_previous_change_id_fails_the_disk_naming_it() {
    let dir = tempdir();
    let d = dir.path();
    let sim = Vcsim::start(d, &["-disks", "1M", "-cbt"]);
    sim.write(0, 0, &pattern(BLOCK as usize, 1));
    let db = server().fresh_database("vm_bad_change_id");
    let daemon = Daemon::start_extra(d, &db.url, &[], &daemon_section(d, &sim));
    let (file, t) = target(d, "t0", sim.disks[0].capacity, &[]);
    let stale = "52 de ad be ef 00 00 00-00 00 00 00 00 00 00 01/99";
    let disks = [VmDisk { key: sim.disks[0].key, target: &t, previous: Some(stale.into()), zero: false }];
    // No sync of this VM's disk is recorded: the chain check refuses it at the
    // claim. Skipping that check, vCenter refuses the change ID itself.
    for (id, skip, what) in [("vm-unchained", false, "change ID chain broken"), ("vm-bad", true, "not valid")] {
        queue_vm_with(&db, id, "incremental", skip, &sim, &disks);
        wait_status(&db, id, "failed", &daemon);
        let err = disk(&db, id, "disk-2000", "error_message").unwrap_or_default();
        assert!(err.contains(stale) && err.contains(what) && !err.contains('\n'), "one line naming the ID: {err}");
        assert!(job(&db, id, "error_message").unwrap_or_default().contains(stale));
        assert!(std::fs::read(&file).unwrap().iter().all(|&b| b == 0), "never a silent full copy");
        assert_eq!(disk(&db, id, "disk-2000", "disk_change_id"), None);
        assert!(snapshots(&daemon, &sim).is_empty(), "the snapshot is removed on failure");
    }
}

#[test]
fn a_cancelled_vm_job_removes_its_snapshot() {
    let dir = tempdir();
    let db = server().fresh_database("vm_cancel");
    let (sim, daemon, _, _t) = slow_job(dir.path(), &db, &[], "vm-c");
    wait_until("the transfer to start", JOB_DEADLINE, || num(job(&db, "vm-c", "bytes_transferred")) > 0.0);
    assert_eq!(snapshots(&daemon, &sim), ["blockrepl-vm-c"], "the job's snapshot exists while it copies");
    daemon.cli(&["cancel", "vm-c"]).assert_ok();
    wait_status(&db, "vm-c", "cancelled", &daemon);
    assert!(snapshots(&daemon, &sim).is_empty(), "the snapshot is removed on cancel");
    assert_eq!(job(&db, "vm-c", "vmware_snapshot"), None);
    assert!(events(&db, "vm-c").iter().any(|e| e.contains("removed")));
}

#[test]
fn after_kill_9_a_vm_job_resumes_on_its_snapshot() {
    let dir = tempdir();
    let db = server().fresh_database("vm_kill9");
    let env = [("BLOCKREPL__DISCOVERY__LEASE", "3s")];
    let (sim, mut daemon, file, mut t) = slow_job(dir.path(), &db, &env, "vm-k");
    wait_until("a first checkpoint", JOB_DEADLINE, || num(disk(&db, "vm-k", "disk-2000", "resume_offset")) > 0.0);
    daemon.kill9();
    let checkpoint = num(disk(&db, "vm-k", "disk-2000", "resume_offset")) as u64;
    assert!(checkpoint < 12 << 20, "killed during the transfer");
    let snapshot = job(&db, "vm-k", "vmware_snapshot").expect("the snapshot is recorded");
    // nbdkit may abort when its client vanished mid-request: restart it.
    t.stop();
    t.start();
    daemon.spawn();
    wait_status(&db, "vm-k", "completed", &daemon);
    assert!(same_file(&sim.disks[0].flat, &file), "the target is byte-identical to the disk");
    let ev = events(&db, "vm-k");
    assert!(ev.iter().any(|e| e.contains(&format!("snapshot {snapshot} kept"))), "resumed on its snapshot: {ev:?}");
    assert!(ev.iter().any(|e| e.contains("resuming from offset")), "from its checkpoint: {ev:?}");
    assert!(snapshots(&daemon, &sim).is_empty(), "no snapshot is left behind");
    assert!(daemon.log_text().lines().all(|l| !l.contains(PASSWORD)), "the password is never logged");
}

/// A one-disk VM (16 MiB, 12 MiB of data, CBT on), a daemon (`env`), and a
/// target that takes about 1 MB/s, so that a full job copies for seconds.
fn slow_job(d: &Path, db: &TestDb, env: &[(&str, &str)], id: &str) -> (Vcsim, Daemon, PathBuf, Server) {
    let sim = Vcsim::start(d, &["-disks", "16M", "-cbt"]);
    sim.write(0, 0, &pattern(12 << 20, 5));
    let daemon = Daemon::start_extra(d, &db.url, env, &daemon_section(d, &sim));
    let (file, t) = target(d, "t0", sim.disks[0].capacity, &["--filter=rate", "rate=8M"]);
    queue_vm(db, id, "full", &sim, &[VmDisk { key: sim.disks[0].key, target: &t, previous: None, zero: true }]);
    (sim, daemon, file, t)
}

#[test]
fn vcenter_down_at_the_end_completes_the_job_and_keeps_the_snapshot_named() {
    let dir = tempdir();
    let db = server().fresh_database("vm_vc_down");
    let (mut sim, daemon, file, _t) = slow_job(dir.path(), &db, &[], "vm-d");
    wait_until("the transfer to start", JOB_DEADLINE, || num(job(&db, "vm-d", "bytes_transferred")) > 0.0);
    let flat = std::fs::read(&sim.disks[0].flat).unwrap();
    sim.kill();
    // The copy needs no vCenter; the cleanup retries with backoff, then gives up.
    wait_status(&db, "vm-d", "completed", &daemon);
    assert!(std::fs::read(&file).unwrap() == flat, "the target is byte-identical to the disk");
    assert!(disk(&db, "vm-d", "disk-2000", "disk_change_id").is_some());
    let ev = events(&db, "vm-d");
    assert!(ev.iter().any(|e| e.contains("cannot remove the job's snapshot") && e.contains("unreachable")), "{ev:?}");
    assert!(job(&db, "vm-d", "vmware_snapshot").is_some(), "named, for the sweep once vCenter is back");
}

#[test]
fn a_snapshot_left_by_a_job_ended_in_the_database_is_swept() {
    let dir = tempdir();
    let db = server().fresh_database("vm_sweep");
    let env = [("BLOCKREPL__DISCOVERY__LEASE", "3s")];
    let (sim, daemon, _, _t) = slow_job(dir.path(), &db, &env, "vm-s");
    wait_until("the transfer to start", JOB_DEADLINE, || num(job(&db, "vm-s", "bytes_transferred")) > 0.0);
    assert_eq!(snapshots(&daemon, &sim), ["blockrepl-vm-s"]);
    // An operator ends the job behind the daemon's back: its renewal is refused
    // (or its fence closes first) and it stops without touching the job, whose
    // snapshot stays.
    db.execute("UPDATE replication_jobs SET status = 'cancelled' WHERE id = 'vm-s'");
    wait_until("the daemon to let go", JOB_DEADLINE, || {
        let log = daemon.log_text();
        log.contains("no longer ours") || log.contains("lease not renewed in time")
    });
    wait_until("the sweep", JOB_DEADLINE, || job(&db, "vm-s", "vmware_snapshot").is_none());
    assert!(snapshots(&daemon, &sim).is_empty(), "the sweep removed it");
    assert!(daemon.log_text().contains("removed a snapshot the job left behind"));
    assert_eq!(job(&db, "vm-s", "status").as_deref(), Some("cancelled"));
}

#[test]
fn a_vm_job_submitted_through_the_admin_socket_runs() {
    let dir = tempdir();
    let d = dir.path();
    let sim = Vcsim::start(d, &["-disks", "2M", "-cbt"]);
    sim.write(0, 5 * BLOCK, &pattern(BLOCK as usize, 7));
    let db = server().fresh_database("vm_submit");
    let daemon = Daemon::start_extra(d, &db.url, &[], &daemon_section(d, &sim));
    let (file, t) = target(d, "t0", sim.disks[0].capacity, &[]);
    let body = serde_json::json!({
        "id": "vm-api", "vm_name": sim.vm_name, "replication_type": "full",
        "vmware": {"vcenter": "sim", "vm": sim.vm_uuid},
        "disks": [{"disk_id": "disk-2000", "vmware_disk_key": sim.disks[0].key, "target": t.uri(),
                   "destination_is_zero": true}]
    });
    let path = d.join("job.json");
    std::fs::write(&path, body.to_string()).unwrap();
    assert_eq!(daemon.cli(&["submit", path.to_str().unwrap(), "--json"]).json()["job_id"], "vm-api");
    wait_status(&db, "vm-api", "completed", &daemon);
    assert!(same_file(&sim.disks[0].flat, &file));
    assert_eq!(num(job(&db, "vm-api", "total_bytes")) as u64, BLOCK, "the allocated areas");
    let shown = daemon.cli(&["show", "vm-api", "--json"]).json();
    assert_eq!(shown["vmware"]["vcenter"], "sim");
    assert_eq!(shown["disks"][0]["vmware_disk_key"], sim.disks[0].key);
    // Credentials never reach the database.
    let row = one(
        &db,
        "SELECT CONCAT_WS('|', vmware_vcenter, vmware_vm, IFNULL(vmware_snapshot, '-')) AS v FROM replication_jobs",
    );
    assert_eq!(row, Some(format!("sim|{}|-", sim.vm_uuid)));
}

#[test]
fn a_vcenter_that_stays_down_fails_the_job_in_one_line_after_retries() {
    let dir = tempdir();
    let d = dir.path();
    let mut sim = Vcsim::start(d, &["-disks", "1M", "-cbt"]);
    let db = server().fresh_database("vm_vc_gone");
    let daemon = Daemon::start_extra(d, &db.url, &[], &daemon_section(d, &sim));
    let (_, t) = target(d, "t0", sim.disks[0].capacity, &[]);
    sim.kill();
    let started = std::time::Instant::now();
    queue_vm(&db, "vm-g", "full", &sim, &[VmDisk { key: sim.disks[0].key, target: &t, previous: None, zero: true }]);
    wait_status(&db, "vm-g", "failed", &daemon);
    let err = job(&db, "vm-g", "error_message").unwrap_or_default();
    assert!(err.contains("vCenter sim") && err.contains("unreachable") && !err.contains('\n'), "{err}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(10), "retried with backoff first");
    assert!(daemon.log_text().contains("retrying in"), "the retries are logged");
    assert_eq!(job(&db, "vm-g", "vmware_snapshot"), None);
}

/// A cancel while vCenter takes the job's snapshot (the simulator holds the
/// CreateSnapshot_Task request for 3 s): the job ends `cancelled`, nothing is
/// copied, and the snapshot the step made is removed.
#[test]
fn a_vm_job_cancelled_during_its_snapshot_removes_the_snapshot() {
    let dir = tempdir();
    let d = dir.path();
    let sim = Vcsim::start(d, &["-disks", "1M", "-cbt", "-snapshot-delay", "3s"]);
    sim.write(0, 0, &pattern(BLOCK as usize, 3));
    let db = server().fresh_database("vm_cancel_snapshot");
    let daemon = Daemon::start_extra(d, &db.url, &[], &daemon_section(d, &sim));
    let (file, t) = target(d, "t0", sim.disks[0].capacity, &[]);
    let disks = [VmDisk { key: sim.disks[0].key, target: &t, previous: None, zero: true }];
    queue_vm(&db, "vm-cs", "full", &sim, &disks);
    wait_until("the snapshot step", JOB_DEADLINE, || {
        job(&db, "vm-cs", "current_operation").as_deref() == Some("Snapshot")
    });
    assert_eq!(job(&db, "vm-cs", "status").as_deref(), Some("snapshotting"));
    daemon.cli(&["cancel", "vm-cs"]).assert_ok();
    wait_status(&db, "vm-cs", "cancelled", &daemon);
    assert!(snapshots(&daemon, &sim).is_empty(), "the snapshot is removed on cancel");
    assert_eq!(job(&db, "vm-cs", "vmware_snapshot"), None);
    assert!(std::fs::read(&file).unwrap().iter().all(|&b| b == 0), "nothing was copied");
}
