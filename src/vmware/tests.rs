//! The VMware module against real parts: the vSphere simulator
//! (`tools/vcsim-cbt`), nbdkit, and the copy engine.
//!
//! These are unit tests because the crate has no library target and they call
//! the client and the engine directly; `tests/it/vmware.rs` drives the binary.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::kill;
use nix::unistd::Pid;

use super::client::{Client, Secret, Since, VmRef};
use super::source::{NbdSource, Template, Vars};
use super::testing::vcsim::{BLOCK, Vcsim, merge_blocks};
use super::testing::{self, pattern, same_bytes};
use super::tls::Thumbprint;
use super::{CopyKind, DiskAreas, VmwareError};
use crate::engine::plan::Area;
use crate::engine::{CancelToken, Copier, CopySpec, Summary, Tuning};

fn pairs(areas: &[Area]) -> Vec<(u64, u64)> {
    areas.iter().map(|a| (a.start, a.length)).collect()
}

fn vm(c: &Client, sim: &Vcsim) -> super::Vm {
    c.find_vm(&VmRef::parse(&sim.vm_path)).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn login_accepts_only_the_pinned_certificate() {
    let dir = testing::tempdir();
    let sim = Vcsim::start(dir.path(), &[]);
    let c = testing::client(&sim);
    assert_eq!(c.about().api_type, "VirtualCenter");

    let mut ep = testing::endpoint(&sim);
    ep.thumbprint = Thumbprint::of(b"some other certificate");
    let e = Client::connect(ep, CancelToken::default()).unwrap_err();
    let VmwareError::Thumbprint { expected, presented, .. } = &e else { panic!("not a thumbprint error: {e}") };
    assert_eq!(presented, &sim.thumbprint, "the error shows what the server presented");
    assert_eq!(expected, &Thumbprint::of(b"some other certificate").to_string());
    assert!(!e.is_transient(), "a wrong certificate is not retried");
}

#[test]
fn a_wrong_password_is_refused_without_showing_it() {
    let dir = testing::tempdir();
    let sim = Vcsim::start(dir.path(), &[]);
    let mut ep = testing::endpoint(&sim);
    ep.password = Secret::new("not-the-Pa55word");
    let e = Client::connect(ep, CancelToken::default()).unwrap_err();
    assert!(matches!(e, VmwareError::Login { .. }), "{e}");
    assert!(!e.is_transient());
    for shown in [e.to_string(), format!("{e:?}")] {
        assert!(!shown.contains("not-the-Pa55word"), "{shown}");
        assert!(shown.contains(super::testing::vcsim::USER), "names the user: {shown}");
    }
    let ok = testing::client(&sim);
    assert!(!format!("{ok:?}").contains(super::testing::vcsim::PASSWORD));
}

#[test]
fn finds_the_vm_by_path_and_by_instance_uuid_with_its_disks() {
    let dir = testing::tempdir();
    let sim = Vcsim::start(dir.path(), &["-disks", "8M,4M"]);
    let c = testing::client(&sim);
    let by_path = vm(&c, &sim);
    let by_uuid = c.find_vm(&VmRef::parse(&sim.vm_uuid)).unwrap();
    assert_eq!(by_path, by_uuid);
    assert_eq!((by_path.moref.value.as_str(), by_path.name.as_str()), (sim.vm_moref.as_str(), sim.vm_name.as_str()));
    assert_eq!(by_path.instance_uuid, sim.vm_uuid);
    assert!(!by_path.cbt_enabled);
    let got: Vec<_> = by_path.disks.iter().map(|d| (d.key, d.label.clone(), d.capacity, d.file.clone())).collect();
    let want: Vec<_> = sim.disks.iter().map(|d| (d.key, d.label.clone(), d.capacity, d.file.clone())).collect();
    assert_eq!(got, want);
    assert_eq!(want.len(), 2);
    assert!(by_path.disks.iter().all(|d| d.change_id.is_none()), "no change IDs without CBT");

    for missing in ["/DC0/vm/no-such-vm", "/DC0/vm", "421c5a3e-0f7b-4c2b-9c3e-5d6e7f809a1b"] {
        let e = c.find_vm(&VmRef::parse(missing)).unwrap_err();
        assert!(matches!(e, VmwareError::VmNotFound { .. }), "{missing}: {e}");
    }
}

#[test]
fn cbt_is_enabled_when_off_and_counts_from_the_next_snapshot() {
    let dir = testing::tempdir();
    let sim = Vcsim::start(dir.path(), &["-disks", "1M"]);
    let c = testing::client(&sim);
    let v = vm(&c, &sim);
    assert!(!v.cbt_enabled);
    // A snapshot taken while CBT is off has no change IDs, and no changed areas.
    let before = c.create_snapshot(&v.moref, "before", "", false).unwrap();
    assert_eq!(c.snapshot_disks(&before).unwrap()[0].change_id, None);
    let e = c.snapshot_disk(&v, &before, 2000).unwrap_err();
    assert!(matches!(e, VmwareError::NoChangeId { .. }), "{e}");
    let e = c.snapshot_disk(&v, &before, 2001).unwrap_err();
    assert!(matches!(e, VmwareError::DiskNotFound { key: 2001, .. }), "{e}");
    let e = c.changed_areas(&v.moref, &before, &v.disks[0], Since::Creation).unwrap_err();
    assert!(matches!(&e, VmwareError::Fault { fault, .. } if fault == "FileFault"), "{e}");

    c.enable_cbt(&v.moref).unwrap();
    assert!(c.vm(&v.moref).unwrap().cbt_enabled);
    let after = c.create_snapshot(&v.moref, "after", "", false).unwrap();
    let disk = c.snapshot_disk(&v, &after, 2000).unwrap();
    assert!(disk.change_id.is_some(), "the snapshot after enabling CBT carries a change ID");
    assert!(c.changed_areas(&v.moref, &after, &v.disks[0], Since::Creation).is_ok());
}

#[test]
fn snapshots_are_created_listed_and_removed() {
    let dir = testing::tempdir();
    let sim = Vcsim::start(dir.path(), &["-disks", "1M", "-cbt"]);
    let c = testing::client(&sim);
    let v = vm(&c, &sim);
    assert!(c.snapshots(&v.moref).unwrap().is_empty());
    let s1 = c.create_snapshot(&v.moref, "blockrepl-job-1", "made by a test", false).unwrap();
    let s2 = c.create_snapshot(&v.moref, "blockrepl-job-2", "", false).unwrap();
    let listed = c.snapshots(&v.moref).unwrap();
    let names: Vec<_> = listed.iter().map(|s| (s.moref.clone(), s.name.as_str())).collect();
    assert_eq!(names, vec![(s1.clone(), "blockrepl-job-1"), (s2.clone(), "blockrepl-job-2")]);
    assert_eq!(listed[0].description, "made by a test");
    assert!(!listed[0].created.is_empty());

    assert!(c.remove_snapshot(&s1).unwrap());
    let left: Vec<_> = c.snapshots(&v.moref).unwrap().into_iter().map(|s| s.moref).collect();
    assert_eq!(left, vec![s2.clone()]);
    assert!(!c.remove_snapshot(&s1).unwrap(), "removing a removed snapshot is not an error");
    assert!(c.remove_snapshot(&s2).unwrap());
    assert!(c.snapshots(&v.moref).unwrap().is_empty());
}

#[test]
fn everything_query_answers_the_nonzero_blocks() {
    let dir = testing::tempdir();
    let sim = Vcsim::start(dir.path(), &["-disks", "2M,1M", "-cbt"]);
    sim.write(0, 0, &pattern(100, 1)); // block 0
    sim.write(0, 3 * BLOCK + 10, &[7]); // block 3, one byte
    sim.write(0, 5 * BLOCK - 1, &[1, 2]); // blocks 4 and 5
    sim.write(0, 2 * 1024 * 1024 - 1, &[9]); // the last block
    let c = testing::client(&sim);
    let v = vm(&c, &sim);
    let snap = c.create_snapshot(&v.moref, "full", "", false).unwrap();
    let disks = c.snapshot_disks(&snap).unwrap();

    let got = c.changed_areas(&v.moref, &snap, &disks[0], Since::Creation).unwrap();
    assert_eq!(pairs(&got), merge_blocks(&[0, 3, 4, 5, 31], 2 << 20));
    assert_eq!(pairs(&got), sim.nonzero_areas(0));
    let empty = c.changed_areas(&v.moref, &snap, &disks[1], Since::Creation).unwrap();
    assert!(empty.is_empty(), "an empty disk has no allocated areas: {empty:?}");
    let d = DiskAreas::new(CopyKind::Full, disks[0].capacity, &got).unwrap();
    assert_eq!(d.planned_bytes(), 5 * BLOCK, "planned bytes are the allocated areas");
}

#[test]
fn incremental_query_answers_exactly_the_changed_blocks() {
    let dir = testing::tempdir();
    let sim = Vcsim::start(dir.path(), &["-disks", "2M", "-cbt"]);
    for b in [0, 2, 7, 12] {
        sim.write(0, b * BLOCK, &pattern(BLOCK as usize, b as u8));
    }
    let c = testing::client(&sim);
    let v = vm(&c, &sim);
    let s1 = c.create_snapshot(&v.moref, "one", "", false).unwrap();
    let previous = c.snapshot_disks(&s1).unwrap()[0].change_id.clone().unwrap();
    assert!(c.remove_snapshot(&s1).unwrap(), "change IDs outlive their snapshot");

    sim.write(0, 2 * BLOCK + 100, &[0xAB; 10]); // changed
    sim.write(0, 7 * BLOCK, &pattern(BLOCK as usize, 7)); // rewritten with the same bytes: unchanged
    sim.write(0, 0, &vec![0; BLOCK as usize]); // zeroed: changed
    sim.write(0, 20 * BLOCK - 5, &[5; 10]); // blocks 19 and 20
    let s2 = c.create_snapshot(&v.moref, "two", "", false).unwrap();
    let disk = c.snapshot_disks(&s2).unwrap().remove(0);
    assert_ne!(disk.change_id.as_deref(), Some(previous.as_str()));

    let got = c.changed_areas(&v.moref, &s2, &disk, Since::ChangeId(&previous)).unwrap();
    assert_eq!(pairs(&got), merge_blocks(&[0, 2, 19, 20], 2 << 20));
    let current = disk.change_id.clone().unwrap();
    assert!(c.changed_areas(&v.moref, &s2, &disk, Since::ChangeId(&current)).unwrap().is_empty());
}

#[test]
fn paged_answers_are_followed_to_the_end_of_the_disk() {
    let dir = testing::tempdir();
    // At most two areas per answer: seven areas need four calls.
    let sim = Vcsim::start(dir.path(), &["-disks", "2M", "-cbt", "-page-areas", "2"]);
    let blocks = [1, 3, 5, 9, 10, 14, 20, 31];
    for b in blocks {
        sim.write(0, b * BLOCK, &[1]);
    }
    let c = testing::client(&sim);
    let v = vm(&c, &sim);
    let snap = c.create_snapshot(&v.moref, "paged", "", false).unwrap();
    let disk = c.snapshot_disks(&snap).unwrap().remove(0);
    let got = c.changed_areas(&v.moref, &snap, &disk, Since::Creation).unwrap();
    assert_eq!(pairs(&got), merge_blocks(&blocks, 2 << 20));
    assert_eq!(got.len(), 7);
}

#[test]
fn an_unknown_change_id_is_its_own_error_naming_it() {
    let dir = testing::tempdir();
    let sim = Vcsim::start(dir.path(), &["-disks", "1M", "-cbt"]);
    let c = testing::client(&sim);
    let v = vm(&c, &sim);
    let snap = c.create_snapshot(&v.moref, "s", "", false).unwrap();
    let disk = c.snapshot_disks(&snap).unwrap().remove(0);
    let stale = "52 de ad be ef 00 00 00-00 00 00 00 00 00 00 01/99";
    let e = c.changed_areas(&v.moref, &snap, &disk, Since::ChangeId(stale)).unwrap_err();
    let VmwareError::InvalidChangeId { change_id, disk: name, .. } = &e else { panic!("{e}") };
    assert_eq!((change_id.as_str(), name.as_str()), (stale, "Hard disk 1 (key 2000)"));
    assert!(e.to_string().contains(stale), "{e}");
    assert!(!e.is_transient(), "never retried, never a silent full copy");
}

#[test]
fn an_unreachable_vcenter_is_a_transient_error() {
    let dir = testing::tempdir();
    let mut sim = Vcsim::start(dir.path(), &["-disks", "1M"]);
    let c = testing::client(&sim);
    let v = vm(&c, &sim);
    let ep = testing::endpoint(&sim);
    sim.kill();
    let e = c.vm(&v.moref).unwrap_err();
    assert!(matches!(e, VmwareError::Unreachable { .. }) && e.is_transient(), "{e}");
    let e = Client::connect(ep, CancelToken::default()).unwrap_err();
    assert!(matches!(e, VmwareError::Unreachable { .. }) && e.is_transient(), "{e}");
}

#[test]
fn an_expired_session_is_renewed_once() {
    let dir = testing::tempdir();
    let sim = Vcsim::start(dir.path(), &["-disks", "1M"]);
    let c = testing::client(&sim);
    c.end_session_on_server().unwrap();
    assert_eq!(vm(&c, &sim).moref.value, sim.vm_moref, "logged in again");
}

// ---- NBD sources ---------------------------------------------------------

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

fn memory_source(dir: &Path, name: &str) -> NbdSource {
    let sock = dir.join(format!("{name}.sock"));
    let argv: Vec<String> = ["nbdkit", "--exit-with-parent", "--foreground", "--unix"]
        .iter()
        .map(|s| s.to_string())
        .chain([sock.display().to_string(), "memory".into(), "1M".into()])
        .collect();
    NbdSource::start(name, argv, &sock, &dir.join(format!("{name}.log")), Duration::from_secs(30)).unwrap()
}

#[test]
fn a_source_serves_until_stopped_and_can_restart() {
    let dir = testing::tempdir();
    let mut src = memory_source(dir.path(), "disk-2000");
    let pid = src.pid().unwrap();
    assert!(alive(pid) && src.is_running());
    assert_eq!(src.uri(), format!("nbd+unix:///?socket={}", dir.path().join("disk-2000.sock").display()));
    src.restart().unwrap();
    let pid2 = src.pid().unwrap();
    assert_ne!(pid, pid2);
    assert!(!alive(pid), "the old server is gone after a restart");
    assert!(src.socket().exists() && alive(pid2));
    drop(src);
    assert!(!alive(pid2), "dropping the source stops the server");
    assert!(!dir.path().join("disk-2000.sock").exists(), "and removes its socket");
}

#[test]
fn a_source_outlives_the_thread_that_started_it() {
    // nbdkit's --exit-with-parent fires when the thread that forked it ends:
    // a source started from a short-lived worker thread must keep serving.
    let dir = testing::tempdir();
    let path = dir.path().to_path_buf();
    let src = std::thread::spawn(move || memory_source(&path, "disk-2001")).join().unwrap();
    let pid = src.pid().unwrap();
    let sock = dir.path().join("disk-2001.sock");
    let end = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < end {
        assert!(alive(pid) && src.is_running(), "the server died with the thread that started it");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());
    drop(src);
    assert!(!alive(pid));
}

#[test]
fn a_source_that_exits_early_is_an_error_quoting_it() {
    let dir = testing::tempdir();
    let sock = dir.path().join("s.sock");
    let argv = vec!["sh".into(), "-c".into(), "echo 'vddk: cannot open libvixDiskLib.so.8' >&2; exit 1".into()];
    let e = NbdSource::start("disk-2000", argv, &sock, &dir.path().join("s.log"), Duration::from_secs(30)).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("NBD source for disk disk-2000:") && msg.contains("cannot open libvixDiskLib"), "{msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");
}

#[test]
fn a_source_that_never_serves_is_killed_at_its_deadline() {
    let dir = testing::tempdir();
    let sock = dir.path().join("s.sock");
    let pid_file = dir.path().join("pid");
    let script = format!("echo $$ > {}; exec sleep 60", pid_file.display());
    let argv = vec!["sh".into(), "-c".into(), script];
    let e =
        NbdSource::start("disk-2000", argv, &sock, &dir.path().join("s.log"), Duration::from_millis(500)).unwrap_err();
    assert!(e.to_string().contains("did not serve"), "{e}");
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert!(!alive(pid), "the server that missed its deadline is gone");
}

// ---- end to end, without the daemon -------------------------------------

/// A disk of the simulated VM served by nbdkit's file plugin through a
/// template, as the daemon will serve it (the vddk plugin in production).
fn serve_disk(sim: &Vcsim, dir: &Path, snapshot: &str, disk: &super::Disk) -> NbdSource {
    let ds = sim.datastore_dir();
    let template = Template::parse(&[
        "nbdkit".into(),
        "--exit-with-parent".into(),
        "--foreground".into(),
        "--readonly".into(),
        "--unix".into(),
        "{socket}".into(),
        "file".into(),
        format!("file={}/{{flat_path}}", ds.display()),
    ])
    .unwrap();
    let socket = dir.join(format!("{}.sock", disk.disk_id()));
    let url = url::Url::parse(&sim.url).unwrap();
    let argv = template.render(&Vars {
        socket: &socket,
        url: &url,
        user: super::testing::vcsim::USER,
        password_file: Path::new("/nonexistent"),
        thumbprint: &sim.thumbprint,
        vm: &sim.vm_moref,
        snapshot,
        file: &disk.file,
        disk_key: disk.key,
    });
    let log = dir.join(format!("{}.log", disk.disk_id()));
    NbdSource::start(&disk.disk_id(), argv, &socket, &log, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"))
}

/// A writable file target of `size` bytes, filled with `fill`.
fn target(dir: &Path, name: &str, size: u64, fill: u8) -> (PathBuf, NbdSource) {
    let file = dir.join(format!("{name}.img"));
    std::fs::write(&file, vec![fill; size as usize]).unwrap();
    let sock = dir.join(format!("{name}.sock"));
    let argv = vec![
        "nbdkit".into(),
        "--exit-with-parent".into(),
        "--foreground".into(),
        "--unix".into(),
        sock.display().to_string(),
        "file".into(),
        format!("file={}", file.display()),
    ];
    let src = NbdSource::start(name, argv, &sock, &dir.join(format!("{name}.log")), Duration::from_secs(30)).unwrap();
    (file, src)
}

fn copy(source: &NbdSource, target: &NbdSource, areas: &DiskAreas, destination_is_zero: bool) -> Summary {
    let spec = CopySpec {
        source: source.uri(),
        target: target.uri(),
        changes: areas.changes(destination_is_zero),
        destination_is_zero,
        allocated: false,
        allow_no_flush: false,
        resume_from: 0,
        verify: false,
        tuning: Tuning::default(),
        limit: None,
    };
    Copier::new(spec).run(&|_| {}).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_vm_is_copied_full_then_incrementally_byte_for_byte() {
    let dir = testing::tempdir();
    let d = dir.path();
    let sim = Vcsim::start(d, &["-disks", "4M,2M", "-cbt"]);
    sim.write(0, 0, &pattern(3 * BLOCK as usize, 1));
    sim.write(0, 40 * BLOCK + 7, &pattern(1000, 2));
    sim.write(1, 9 * BLOCK, &pattern(2 * BLOCK as usize + 1, 3));
    let c = testing::client(&sim);
    let v = vm(&c, &sim);

    // Full: the allocated areas onto fresh (zero) targets.
    let s1 = c.create_snapshot(&v.moref, "blockrepl-full", "", false).unwrap();
    let disks = c.snapshot_disks(&s1).unwrap();
    assert_eq!(disks.len(), 2);
    let mut targets = Vec::new();
    for (i, disk) in disks.iter().enumerate() {
        let raw = c.changed_areas(&v.moref, &s1, disk, Since::Creation).unwrap();
        let areas = DiskAreas::new(CopyKind::Full, disk.capacity, &raw).unwrap();
        let src = serve_disk(&sim, d, &s1.value, disk);
        let (file, dst) = target(d, &format!("target-{i}"), disk.capacity, 0);
        let sum = copy(&src, &dst, &areas, true);
        let allocated: u64 = sim.nonzero_areas(i).iter().map(|a| a.1).sum();
        assert_eq!(sum.planned_bytes, allocated, "disk {i}: planned bytes are the allocated areas");
        assert_eq!(sum.bytes_transferred, allocated);
        assert!(same_bytes(&sim.disks[i].flat, &file), "disk {i} differs after the full copy");
        targets.push((file, dst));
    }
    let previous: Vec<String> = disks.iter().map(|d| d.change_id.clone().unwrap()).collect();
    assert!(c.remove_snapshot(&s1).unwrap());

    // Changes: new data, data zeroed, one byte at the end of the small disk.
    sim.write(0, BLOCK + 5, &pattern(10, 9));
    sim.write(0, 40 * BLOCK, &vec![0; BLOCK as usize]);
    sim.write(0, 60 * BLOCK, &pattern(BLOCK as usize, 4));
    sim.write(1, 2 * 1024 * 1024 - 1, &[0xFF]);
    let s2 = c.create_snapshot(&v.moref, "blockrepl-incr", "", false).unwrap();
    let disks = c.snapshot_disks(&s2).unwrap();
    assert_eq!(disks.len(), 2);
    let expected_changed = [3 * BLOCK, BLOCK];
    for (i, disk) in disks.iter().enumerate() {
        let raw = c.changed_areas(&v.moref, &s2, disk, Since::ChangeId(&previous[i])).unwrap();
        let areas = DiskAreas::new(CopyKind::Incremental, disk.capacity, &raw).unwrap();
        assert_eq!(areas.planned_bytes(), expected_changed[i], "disk {i}: only the changed blocks");
        let src = serve_disk(&sim, d, &s2.value, disk);
        let sum = copy(&src, &targets[i].1, &areas, false);
        assert_eq!(sum.planned_bytes, expected_changed[i]);
        assert!(same_bytes(&sim.disks[i].flat, &targets[i].0), "disk {i} differs after the incremental copy");
    }
    assert!(c.remove_snapshot(&s2).unwrap());
}

#[test]
fn a_full_copy_onto_a_used_target_leaves_no_stale_data() {
    let dir = testing::tempdir();
    let d = dir.path();
    let sim = Vcsim::start(d, &["-disks", "2M", "-cbt"]);
    sim.write(0, 5 * BLOCK, &pattern(BLOCK as usize, 5));
    let c = testing::client(&sim);
    let v = vm(&c, &sim);
    let snap = c.create_snapshot(&v.moref, "full", "", false).unwrap();
    let disk = c.snapshot_disks(&snap).unwrap().remove(0);
    let raw = c.changed_areas(&v.moref, &snap, &disk, Since::Creation).unwrap();
    let areas = DiskAreas::new(CopyKind::Full, disk.capacity, &raw).unwrap();
    let src = serve_disk(&sim, d, &snap.value, &disk);
    let (file, dst) = target(d, "used", disk.capacity, 0xEE);
    copy(&src, &dst, &areas, false);
    assert!(
        same_bytes(&sim.disks[0].flat, &file),
        "the old content of the target survived outside the allocated areas"
    );
}
