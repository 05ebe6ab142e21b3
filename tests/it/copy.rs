//! `blockrepl copy` against real NBD servers: nbdkit (sparse-random targets verify
//! every byte written to them when they share the source's seed) and qemu-nbd
//! (qcow2 images with persistent dirty bitmaps).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::*;

fn sparse_random(size: &str, seed: u32, percent: u32) -> Vec<String> {
    vec![
        "sparse-random".into(),
        format!("size={size}"),
        format!("seed={seed}"),
        format!("percent={percent}"),
        // Short runs give many extents, which exercises planning and dispatch.
        "runlength=131072".into(),
    ]
}

#[test]
fn dense_copy_writes_every_byte() {
    let d = tempdir();
    let args = sparse_random("256M", 11, 100);
    let src = Server::nbdkit(d.path(), "src", &refs(&args));
    // Same seed: the target checks every write against the data it expects.
    let dst = Server::nbdkit(d.path(), "dst", &refs(&args));
    let j = blockrepl(&["copy", "--json", &src.uri(), &dst.uri()]).json();
    let size = 256 << 20;
    assert_eq!(j["planned_bytes"], size);
    assert_eq!(j["bytes_transferred"], size);
    assert_eq!(j["bytes_written"], size);
    assert_eq!(j["skipped_bytes"], 0);
    assert!(j["throughput_bps"].as_u64().unwrap() > 0);
    assert_eq!(j["verified"], serde_json::Value::Null);
}

#[test]
fn dense_copy_to_memory_is_identical_and_verifies() {
    let d = tempdir();
    let src = Server::nbdkit(d.path(), "src", &["pattern", "size=300M"]);
    let dst = Server::nbdkit(d.path(), "dst", &["memory", "size=300M", "allocator=malloc"]);
    let j = blockrepl(&["copy", "--json", "--verify", &src.uri(), &dst.uri()]).json();
    assert_eq!(j["verified"], true);
    assert_eq!(checksum(&src.uri()), checksum(&dst.uri()));
}

#[test]
fn sparse_copy_reads_only_data_extents() {
    let d = tempdir();
    let log = d.path().join("src.log");
    let stats = d.path().join("src.stats");
    let mut sargs = vec!["--filter=log".to_string(), "--filter=stats".into()];
    sargs.extend(sparse_random("2G", 7, 5));
    sargs.push(format!("logfile={}", log.display()));
    sargs.push(format!("statsfile={}", stats.display()));
    let mut src = Server::nbdkit(d.path(), "src", &refs(&sargs));
    let dst = Server::nbdkit(d.path(), "dst", &refs(&sparse_random("2G", 7, 5)));

    let map = allocation_map(&src.uri());
    let data = data_bytes(&map);
    assert!(data > 0 && data < (2u64 << 30) / 10, "the source is sparse: {data} data bytes");

    let j = blockrepl(&["copy", "--json", &src.uri(), &dst.uri()]).json();
    assert_eq!(j["planned_bytes"], data);
    assert_eq!(j["bytes_transferred"], data);
    assert_eq!(j["zeroed_bytes"].as_u64().unwrap(), (2u64 << 30) - data, "holes become zero requests");

    // Exactly the data extents were read, nothing in a hole.
    let reads = logged(&log, "Read");
    assert_eq!(total(&reads), data);
    for r in &reads {
        let inside = map.iter().any(|e| e.data && e.offset <= r.offset && r.offset + r.count <= e.offset + e.length);
        assert!(inside, "read {r:?} touches a hole");
    }
    // The stats filter agrees (it prints sizes rounded to 3 significant digits).
    src.stop();
    let st = std::fs::read_to_string(&stats).unwrap();
    let read_line = st.lines().find(|l| l.starts_with("read:")).expect("stats has a read line");
    let mib: f64 = read_line.split(", ").nth(2).unwrap().trim_end_matches(" MiB").parse().unwrap();
    let expect = data as f64 / (1 << 20) as f64;
    assert!((mib - expect).abs() / expect < 0.01, "stats read {mib} MiB, data is {expect} MiB");
}

#[test]
fn destination_is_zero_skips_holes() {
    let d = tempdir();
    let src = Server::nbdkit(d.path(), "src", &refs(&sparse_random("1G", 3, 4)));
    let log = d.path().join("dst.log");
    let dst =
        Server::nbdkit(d.path(), "dst", &["--filter=log", "memory", "size=1G", &format!("logfile={}", log.display())]);
    let data = data_bytes(&allocation_map(&src.uri()));
    let j = blockrepl(&["copy", "--json", "--destination-is-zero", &src.uri(), &dst.uri()]).json();
    assert_eq!(j["skipped_bytes"].as_u64().unwrap(), (1u64 << 30) - data);
    assert_eq!(j["zeroed_bytes"], 0);
    assert!(logged(&log, "Zero").is_empty(), "no zero requests to a target that is zero");
    assert_eq!(total(&logged(&log, "Write")), data);
    assert!(!logged(&log, "Flush").is_empty(), "the target is flushed");
    assert_eq!(checksum(&src.uri()), checksum(&dst.uri()));
}

#[test]
fn zero_blocks_in_data_become_zero_requests() {
    let d = tempdir();
    // A raw file whose every block is allocated, half of them zeros.
    let img = d.path().join("src.img");
    let mut bytes = vec![0u8; 16 << 20];
    for (i, b) in bytes.chunks_mut(65536).enumerate() {
        if i % 2 == 0 {
            b.fill(0xa5);
        }
    }
    std::fs::write(&img, &bytes).unwrap();
    let src = Server::nbdkit(d.path(), "src", &["file", &img.display().to_string()]);
    let log = d.path().join("dst.log");
    let dst =
        Server::nbdkit(d.path(), "dst", &["--filter=log", "memory", "size=16M", &format!("logfile={}", log.display())]);
    let j = blockrepl(&["copy", "--json", &src.uri(), &dst.uri()]).json();
    assert_eq!(j["planned_bytes"], 16 << 20, "allocated zeros are read");
    assert_eq!(j["bytes_written"], 8 << 20);
    assert_eq!(j["zeroed_bytes"], 8 << 20);
    assert_eq!(total(&logged(&log, "Write")), 8 << 20);
    assert_eq!(total(&logged(&log, "Zero")), 8 << 20);
    assert_eq!(checksum(&src.uri()), checksum(&dst.uri()));
}

#[test]
fn refused_fast_zero_falls_back_to_plain_zero() {
    let d = tempdir();
    let src = Server::nbdkit(d.path(), "src", &refs(&sparse_random("256M", 5, 10)));
    let log = d.path().join("dst.log");
    // Advertises fast zero but refuses every fast zero with ENOTSUP.
    let dst = Server::nbdkit(
        d.path(),
        "dst",
        &[
            "--filter=log",
            "--filter=nozero",
            "memory",
            "size=256M",
            "zeromode=plugin",
            "fastzeromode=slow",
            &format!("logfile={}", log.display()),
        ],
    );
    blockrepl(&["copy", "--json", &src.uri(), &dst.uri()]).json();
    let zeros = logged(&log, "Zero");
    assert!(zeros.iter().any(|z| z.flags == "1"), "a fast zero was tried");
    assert!(zeros.iter().any(|z| z.flags == "0"), "then plain zeros were used");
    assert_eq!(checksum(&src.uri()), checksum(&dst.uri()));
}

#[test]
fn target_without_zero_support_gets_zeros_as_data() {
    let d = tempdir();
    let src = Server::nbdkit(d.path(), "src", &refs(&sparse_random("128M", 9, 10)));
    let dst = Server::nbdkit(d.path(), "dst", &["--filter=nozero", "memory", "size=128M", "zeromode=none"]);
    let j = blockrepl(&["copy", "--json", &src.uri(), &dst.uri()]).json();
    assert_eq!(j["zeroed_bytes"].as_u64().unwrap() + j["bytes_written"].as_u64().unwrap(), 128 << 20);
    assert_eq!(checksum(&src.uri()), checksum(&dst.uri()));
}

/// A qcow2 pair for incremental tests: `base` is the target as of the last sync,
/// `src` the source with a persistent dirty bitmap `b0` tracking the changes since.
struct QcowPair {
    src: std::path::PathBuf,
    dst: std::path::PathBuf,
}

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let img = img.display().to_string();
    args.push(&img);
    sh("qemu-io", &args);
}

fn qcow_pair(dir: &Path) -> QcowPair {
    let src = dir.join("src.qcow2");
    let dst = dir.join("dst.qcow2");
    let s = src.display().to_string();
    sh("qemu-img", &["create", "-q", "-f", "qcow2", &s, "64M"]);
    qemu_io(&src, &["write -P 0x11 0 8M", "write -P 0x22 16M 4M", "write -P 0x33 40M 2M"]);
    std::fs::copy(&src, &dst).unwrap();
    sh("qemu-img", &["bitmap", "--add", "--enable", "-f", "qcow2", &s, "b0"]);
    // Changes since the "last sync": new data, overwritten data, and data that
    // became zero (must be zeroed on the target, not skipped).
    qemu_io(&src, &["write -P 0x44 1M 64k", "write -P 0x55 20M 128k", "write -z 40M 64k", "write -P 0x66 60M 64k"]);
    QcowPair { src, dst }
}

/// Bytes the bitmap marks dirty: the writes above at its 64 KiB granularity.
const DIRTY: u64 = 64 * 1024 + 128 * 1024 + 64 * 1024 + 64 * 1024;

fn qemu_img_compare(a: &Path, b: &Path) {
    sh("qemu-img", &["compare", "-f", "qcow2", "-F", "qcow2", &a.display().to_string(), &b.display().to_string()]);
}

#[test]
fn incremental_from_dirty_bitmap_copies_only_changes() {
    let d = tempdir();
    let p = qcow_pair(d.path());
    let mut src = Server::qemu_nbd(d.path(), "src", &["-r", "-f", "qcow2", "-B", "b0", &p.src.display().to_string()]);
    let mut dst = Server::qemu_nbd(d.path(), "dst", &["-f", "qcow2", &p.dst.display().to_string()]);
    let j = blockrepl(&["copy", "--json", "--dirty-bitmap", "b0", &src.uri(), &dst.uri()]).json();
    assert_eq!(j["planned_bytes"], DIRTY, "only the dirty ranges are read");
    assert_eq!(j["bytes_transferred"], DIRTY);
    assert_eq!(j["zeroed_bytes"], 64 * 1024, "the area that became zero is zeroed");
    src.stop();
    dst.stop();
    qemu_img_compare(&p.src, &p.dst);
}

#[test]
fn incremental_from_changed_areas_copies_only_changes() {
    let d = tempdir();
    let base = d.path().join("dst.img");
    let new = d.path().join("src.img");
    let mut bytes: Vec<u8> = (0..32u32 << 20).map(|i| (i / 4096) as u8 | 1).collect();
    std::fs::write(&base, &bytes).unwrap();
    let areas = [(1u64 << 20, 65536u64), (8 << 20, 4096), (20 << 20, 1 << 20)];
    bytes[(1 << 20)..(1 << 20) + 65536].fill(0x42);
    bytes[(8 << 20)..(8 << 20) + 4096].fill(0x43);
    bytes[(20 << 20)..(21 << 20)].fill(0); // became zero
    std::fs::write(&new, &bytes).unwrap();
    // Given out of order, with one overlapping duplicate: sorted and merged.
    let file = areas_file(d.path(), "areas.json", &[areas[2], areas[0], areas[1], (1 << 20, 4096)]);

    let log = d.path().join("src.log");
    let src = Server::nbdkit(
        d.path(),
        "src",
        &["--filter=log", "file", &new.display().to_string(), &format!("logfile={}", log.display())],
    );
    let dst = Server::nbdkit(d.path(), "dst", &["file", &base.display().to_string()]);
    let changed: u64 = areas.iter().map(|a| a.1).sum();
    let j = blockrepl(&["copy", "--json", "--changed-areas", file.to_str().unwrap(), &src.uri(), &dst.uri()]).json();
    assert_eq!(j["planned_bytes"], changed);
    assert_eq!(j["zeroed_bytes"], 1 << 20);
    assert_eq!(total(&logged(&log, "Read")), changed, "only changed bytes are read");
    drop((src, dst));
    assert!(std::fs::read(&base).unwrap() == bytes, "target equals source");
}

#[test]
fn retries_under_injected_errors_end_identical() {
    let d = tempdir();
    let mut sargs = vec!["--filter=error".to_string()];
    sargs.extend(sparse_random("512M", 21, 30));
    sargs.push("error-pread-rate=2%".into());
    let src = Server::nbdkit(d.path(), "src", &refs(&sargs));
    let dst = Server::nbdkit(
        d.path(),
        "dst",
        &["--filter=error", "memory", "size=512M", "error-pwrite-rate=1%", "error-zero-rate=1%"],
    );
    let j = blockrepl(&["copy", "--json", &src.uri(), &dst.uri()]).json();
    assert!(j["retries"].as_u64().unwrap() > 0, "errors were injected and retried: {j}");
    // The same data without the error filter, to compare against.
    let clean = Server::nbdkit(d.path(), "clean", &refs(&sparse_random("512M", 21, 30)));
    assert_eq!(checksum(&clean.uri()), checksum(&dst.uri()));
}

#[test]
fn permanent_errors_fail_at_once_naming_offset() {
    let d = tempdir();
    let src = Server::nbdkit(d.path(), "src", &["pattern", "size=64M"]);
    let dst = Server::nbdkit(
        d.path(),
        "dst",
        &["--filter=error", "memory", "size=64M", "error=ENOSPC", "error-pwrite-rate=100%"],
    );
    let t = Instant::now();
    let line = blockrepl(&["copy", &src.uri(), &dst.uri()]).error_line();
    assert!(t.elapsed() < Duration::from_secs(10), "no retries for ENOSPC");
    assert!(line.contains("write") && line.contains("at offset") && line.contains("target"), "{line}");
    assert!(line.contains("after 1 attempt"), "{line}");
}

#[test]
fn tls_copy_with_psk() {
    let d = tempdir();
    let psk = d.path().join("keys.psk");
    std::fs::write(&psk, "alice:0123456789abcdef0123456789abcdef\n").unwrap();
    let psk_arg = format!("--tls-psk={}", psk.display());
    let mut sargs = vec!["--tls=require".to_string(), psk_arg.clone()];
    sargs.extend(sparse_random("128M", 4, 20));
    let src = Server::nbdkit(d.path(), "src", &refs(&sargs));
    let mut dargs = vec!["--tls=require".to_string(), psk_arg];
    dargs.extend(sparse_random("128M", 4, 20));
    let dst = Server::nbdkit(d.path(), "dst", &refs(&dargs));
    let tls = |s: &Server| format!("nbds+unix://alice@/?socket={}&tls-psk-file={}", s.sock.display(), psk.display());
    let j = blockrepl(&["copy", "--json", "--verify", &tls(&src), &tls(&dst)]).json();
    assert_eq!(j["verified"], true);
    // Without TLS the server refuses us, with a clean error.
    let line = blockrepl(&["copy", &src.uri(), &tls(&dst)]).error_line();
    assert!(line.contains("cannot connect to source"), "{line}");
}

#[test]
fn multi_connection_copy_between_qemu_nbd_servers() {
    let d = tempdir();
    let a = d.path().join("a.qcow2");
    let b = d.path().join("b.qcow2");
    sh("qemu-img", &["create", "-q", "-f", "qcow2", &a.display().to_string(), "96M"]);
    sh("qemu-img", &["create", "-q", "-f", "qcow2", &b.display().to_string(), "96M"]);
    qemu_io(&a, &["write -P 0x61 0 32M", "write -P 0x62 50M 10M", "write -z 70M 1M"]);
    let mut src = Server::qemu_nbd(d.path(), "src", &["-r", "-e", "4", "-f", "qcow2", &a.display().to_string()]);
    let mut dst = Server::qemu_nbd(d.path(), "dst", &["-e", "4", "-f", "qcow2", &b.display().to_string()]);
    let j = blockrepl(&["copy", "--json", "--connections", "4", "--verify", &src.uri(), &dst.uri()]).json();
    assert_eq!(j["verified"], true);
    assert_eq!(j["planned_bytes"], 42 << 20);
    src.stop();
    dst.stop();
    qemu_img_compare(&a, &b);
}

#[test]
fn verify_detects_a_target_that_loses_writes() {
    let d = tempdir();
    let src = Server::nbdkit(d.path(), "src", &["pattern", "size=32M"]);
    let dst = Server::nbdkit(d.path(), "dst", &["null", "size=32M"]);
    let line = blockrepl(&["copy", "--verify", &src.uri(), &dst.uri()]).error_line();
    assert!(line.contains("verification failed: source and target differ in the 4096 bytes at offset"), "{line}");
}

#[test]
fn resume_reads_only_after_the_watermark() {
    let d = tempdir();
    let log = d.path().join("src.log");
    let mut sargs = vec!["--filter=log".to_string()];
    sargs.extend(sparse_random("512M", 13, 50));
    sargs.push(format!("logfile={}", log.display()));
    let src = Server::nbdkit(d.path(), "src", &refs(&sargs));
    let dst = Server::nbdkit(d.path(), "dst", &refs(&sparse_random("512M", 13, 50)));
    let map = allocation_map(&src.uri());
    let from: u64 = 200 << 20;
    let above: u64 = map
        .iter()
        .filter(|e| e.data && e.offset + e.length > from)
        .map(|e| e.offset + e.length - e.offset.max(from))
        .sum();
    let j = blockrepl(&["copy", "--json", "--resume-from", &from.to_string(), &src.uri(), &dst.uri()]).json();
    assert_eq!(j["planned_bytes"], data_bytes(&map), "planned bytes are the whole plan");
    assert_eq!(j["bytes_transferred"], data_bytes(&map), "below the watermark counts as done");
    let reads = logged(&log, "Read");
    assert_eq!(total(&reads), above);
    assert!(reads.iter().all(|r| r.offset >= from), "nothing below the watermark is read");
}

#[test]
fn cancel_stops_within_a_second_and_reports_the_watermark() {
    let d = tempdir();
    let log = d.path().join("dst.log");
    let src = Server::nbdkit(d.path(), "src", &["--filter=delay", "pattern", "size=1G", "delay-read=100ms"]);
    let dst =
        Server::nbdkit(d.path(), "dst", &["--filter=log", "memory", "size=1G", &format!("logfile={}", log.display())]);
    let child = spawn_blockrepl(&["copy", &src.uri(), &dst.uri()]);
    wait_until("the first write", READY, || !logged(&log, "Write").is_empty());
    let (took, code, err) = interrupt(child);
    assert!(took < Duration::from_millis(1500), "took {took:?} to stop");
    assert_eq!(code, Some(130));
    assert!(err.contains("cancelled; the target is consistent up to offset"), "{err}");
}

#[test]
fn reconnects_when_the_target_restarts() {
    let d = tempdir();
    let img = d.path().join("dst.img");
    std::fs::File::create(&img).unwrap().set_len(256 << 20).unwrap();
    let log = d.path().join("dst.log");
    // The source is slowed down so the copy is still running when the target dies.
    let src = Server::nbdkit(d.path(), "src", &["--filter=rate", "pattern", "size=256M", "rate=512M"]);
    let mut dst = Server::nbdkit(
        d.path(),
        "dst",
        &["--filter=log", "file", &img.display().to_string(), &format!("logfile={}", log.display())],
    );
    let child = spawn_blockrepl(&["copy", "--json", &src.uri(), &dst.uri()]);
    wait_until("the first writes", READY, || total(&logged(&log, "Write")) >= 16 << 20);
    dst.kill();
    dst.start();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("reconnected to the target"), "{stderr}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["bytes_transferred"], 256 << 20);
    assert_eq!(checksum(&src.uri()), checksum(&dst.uri()));
}

mod bad_input {
    use super::*;

    #[test]
    fn unreachable_unix_socket() {
        let line =
            blockrepl(&["copy", "nbd+unix:///?socket=/nonexistent/s.sock", "nbd+unix:///?socket=/x"]).error_line();
        assert!(
            line.starts_with("blockrepl: cannot connect to source nbd+unix:///?socket=/nonexistent/s.sock"),
            "{line}"
        );
    }

    #[test]
    fn unreachable_tcp_server() {
        let line = blockrepl(&["copy", "nbd://127.0.0.1:1/", "nbd://127.0.0.1:1/"]).error_line();
        assert!(line.contains("cannot connect to source nbd://127.0.0.1:1/"), "{line}");
    }

    #[test]
    fn bad_uris() {
        for (src, dst, want) in [
            ("http://x/", "nbd://h/", "bad source URI 'http://x/'"),
            ("nbd://h/", "/dev/sdb", "bad target URI '/dev/sdb'"),
            ("nbd+unix:///export", "nbd://h/", "needs ?socket=PATH"),
        ] {
            let line = blockrepl(&["copy", src, dst]).error_line();
            assert!(line.contains(want), "{line}");
        }
    }

    #[test]
    fn export_not_found() {
        let d = tempdir();
        let img = d.path().join("a.qcow2");
        sh("qemu-img", &["create", "-q", "-f", "qcow2", &img.display().to_string(), "16M"]);
        let src = Server::qemu_nbd(d.path(), "src", &["-x", "disk0", "-f", "qcow2", &img.display().to_string()]);
        let line = blockrepl(&["copy", &src.uri_export("nope"), &src.uri_export("disk0")]).error_line();
        assert!(line.contains("cannot connect to source") && line.contains("nope"), "{line}");
    }

    #[test]
    fn target_smaller_than_source_changes_nothing() {
        let d = tempdir();
        let log = d.path().join("dst.log");
        let src = Server::nbdkit(d.path(), "src", &["pattern", "size=64M"]);
        let dst = Server::nbdkit(
            d.path(),
            "dst",
            &["--filter=log", "memory", "size=32M", &format!("logfile={}", log.display())],
        );
        let line = blockrepl(&["copy", &src.uri(), &dst.uri()]).error_line();
        assert!(line.contains("is smaller than the source (33554432 < 67108864 bytes)"), "{line}");
        assert!(logged(&log, "Write").is_empty() && logged(&log, "Zero").is_empty());
    }

    #[test]
    fn bad_changed_areas_files() {
        let d = tempdir();
        let src = Server::nbdkit(d.path(), "src", &["pattern", "size=1M"]);
        let dst = Server::nbdkit(d.path(), "dst", &["memory", "size=1M"]);
        let write = |name: &str, text: &str| {
            let p = d.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let cases = [
            (write("a.json", "[{\"start\": 0,"), "bad changed-areas file"),
            (write("b.json", "{\"start\":0,\"length\":1}"), "bad changed-areas file"),
            (write("c.json", "[{\"start\":1048000,\"length\":4096}]"), "ends beyond the disk"),
            (write("d.json", "[{\"start\":0,\"length\":0}]"), "has length 0"),
            (d.path().join("missing.json").display().to_string(), "cannot read changed-areas file"),
        ];
        for (file, want) in cases {
            let line = blockrepl(&["copy", "--changed-areas", &file, &src.uri(), &dst.uri()]).error_line();
            assert!(line.contains(want), "{file}: {line}");
        }
    }

    #[test]
    fn missing_dirty_bitmap_never_becomes_a_full_copy() {
        let d = tempdir();
        let img = d.path().join("a.qcow2");
        sh("qemu-img", &["create", "-q", "-f", "qcow2", &img.display().to_string(), "16M"]);
        let src = Server::qemu_nbd(d.path(), "src", &["-r", "-f", "qcow2", &img.display().to_string()]);
        let log = d.path().join("dst.log");
        let dst = Server::nbdkit(
            d.path(),
            "dst",
            &["--filter=log", "memory", "size=16M", &format!("logfile={}", log.display())],
        );
        let line = blockrepl(&["copy", "--dirty-bitmap", "b0", &src.uri(), &dst.uri()]).error_line();
        assert!(line.contains("has no dirty bitmap 'b0'"), "{line}");
        assert!(logged(&log, "Write").is_empty() && logged(&log, "Zero").is_empty());
    }

    #[test]
    fn conflicting_and_invalid_options() {
        for args in [
            vec!["copy", "--dirty-bitmap", "b", "--changed-areas", "f", "nbd://a/", "nbd://b/"],
            vec!["copy", "--request-size", "12Q", "nbd://a/", "nbd://b/"],
            vec!["copy", "--connections", "0", "nbd://a/", "nbd://b/"],
            vec!["copy", "nbd://a/"],
        ] {
            let r = blockrepl(&args);
            assert_eq!(r.status.code(), Some(2), "{args:?}: usage errors exit 2");
            assert!(!r.stderr.contains("panicked"));
        }
    }
}
