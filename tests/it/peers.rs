//! `blockrepl copy` against servers with constraints of their own, after the
//! NBD-to-NBD cases of libnbd's nbdcopy test suite: minimum block sizes on either
//! side, no extents at all, an empty disk, targets that must stay allocated (TLS
//! with a PSK file over a Unix socket is `copy::tls_copy_with_psk`). Every copy
//! ends byte-identical, compared through the servers' own reads.

use std::path::Path;

use crate::harness::*;

/// A fresh qcow2 image of `size` served by qemu-nbd through QEMU's `compress`
/// driver, which advertises a minimum block size of 64 KiB (its cluster size), as
/// compressing and deduplicating cloud targets do.
fn compressing_target(dir: &Path, name: &str, size: &str) -> Server {
    let img = dir.join(format!("{name}.qcow2"));
    sh("qemu-img", &["create", "-q", "-f", "qcow2", &img.display().to_string(), size]);
    let opts = format!("driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename={}", img.display());
    Server::qemu_nbd(dir, name, &["--image-opts", &opts])
}

fn block_size_minimum(uri: &str) -> u64 {
    let out = sh("nbdinfo", &["--json", uri]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["exports"][0]["block_size_minimum"].as_u64().unwrap_or(1)
}

#[test]
fn a_target_with_a_64k_minimum_block_size_gets_whole_blocks() {
    let d = tempdir();
    let src = Server::nbdkit(d.path(), "src", &["sparse-random", "size=256M", "seed=81"]);
    for (name, extra) in [("plain", None), ("zero", Some("--destination-is-zero"))] {
        let dst = compressing_target(d.path(), name, "256M");
        assert_eq!(block_size_minimum(&dst.uri()), 65536, "the target asks for 64 KiB blocks");
        let mut args = vec!["copy", "--json"];
        args.extend(extra);
        let (s, t) = (src.uri(), dst.uri());
        args.extend([s.as_str(), t.as_str()]);
        let j = blockrepl(&args).json();
        let planned = j["planned_bytes"].as_u64().unwrap();
        let data = data_bytes(&allocation_map(&src.uri()));
        assert!(
            planned >= data && planned.is_multiple_of(65536),
            "whole blocks are read: {planned} for {data} data bytes"
        );
        assert_eq!(checksum(&src.uri()), checksum(&dst.uri()), "{name}");
    }
}

#[test]
fn a_source_with_a_64k_minimum_block_size_is_read_in_whole_blocks() {
    let d = tempdir();
    // A sparse file whose data lies in 4 KiB pieces off the 64 KiB grid: the
    // file's extents are finer than the server lets anyone read.
    let img = d.path().join("src.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(16 << 20).unwrap();
    for k in [3u64, 17, 18, 100, 1001, 2050, 4095] {
        std::os::unix::fs::FileExt::write_all_at(&f, &[k as u8 | 1; 4096], k * 4096).unwrap();
    }
    drop(f);
    let log = d.path().join("src.log");
    let src = Server::nbdkit(
        d.path(),
        "src",
        &[
            "--filter=log",
            "--filter=blocksize-policy",
            "file",
            &img.display().to_string(),
            "blocksize-minimum=64K",
            "blocksize-preferred=64K",
            "blocksize-error-policy=error",
            &format!("logfile={}", log.display()),
        ],
    );
    let dst = Server::nbdkit(d.path(), "dst", &["memory", "size=16M"]);
    let j = blockrepl(&["copy", "--json", &src.uri(), &dst.uri()]).json();
    let reads = logged(&log, "Read");
    assert!(
        reads.iter().all(|r| r.offset.is_multiple_of(65536) && r.count.is_multiple_of(65536)),
        "unaligned read in {reads:?}"
    );
    assert_eq!(j["planned_bytes"].as_u64().unwrap(), total(&reads), "planned bytes are the bytes read");
    assert_eq!(total(&reads), 6 * 65536, "six 64 KiB blocks hold the data");
    assert_eq!(file_checksum(&img), checksum(&dst.uri()));
}

#[test]
fn a_source_without_extents_is_copied_with_large_requests() {
    let d = tempdir();
    let log = d.path().join("dst.log");
    let src = Server::nbdkit(d.path(), "src", &["--filter=noextents", "sparse-random", "size=256M", "seed=83"]);
    let dst = Server::nbdkit(
        d.path(),
        "dst",
        &["--filter=log", "memory", "size=256M", &format!("logfile={}", log.display())],
    );
    let j = blockrepl(&["copy", "--json", "--request-size", "32M", &src.uri(), &dst.uri()]).json();
    assert_eq!(j["planned_bytes"], 256 << 20, "everything is read");
    let writes = logged(&log, "Write");
    assert!(writes.iter().all(|w| w.count <= 32 << 20) && !writes.is_empty());
    assert_eq!(checksum(&src.uri()), checksum(&dst.uri()));
}

#[test]
fn an_empty_source_copies_nothing() {
    let d = tempdir();
    let src = Server::nbdkit(d.path(), "src", &["null", "size=0"]);
    let dst = Server::nbdkit(d.path(), "dst", &["memory", "size=1M"]);
    let j = blockrepl(&["copy", "--json", "--verify", &src.uri(), &dst.uri()]).json();
    assert_eq!((j["disk_size"].as_u64(), j["planned_bytes"].as_u64()), (Some(0), Some(0)));
    assert_eq!(j["verified"], true);
}

#[test]
fn allocated_copies_send_zero_requests_that_keep_blocks_allocated() {
    let d = tempdir();
    let src = Server::nbdkit(d.path(), "src", &["sparse-random", "size=64M", "seed=84", "percent=20"]);
    for (allocated, trim) in [(true, "0"), (false, "1")] {
        let log = d.path().join(format!("dst-{allocated}.log"));
        let name = format!("dst-{allocated}");
        let dst = Server::nbdkit(
            d.path(),
            &name,
            &["--filter=log", "memory", "size=64M", &format!("logfile={}", log.display())],
        );
        let mut args = vec!["copy"];
        if allocated {
            args.push("--allocated");
        }
        let (s, t) = (src.uri(), dst.uri());
        args.extend([s.as_str(), t.as_str()]);
        blockrepl(&args).assert_ok();
        let text = std::fs::read_to_string(&log).unwrap();
        let zeros: Vec<&str> = text.lines().filter(|l| l.contains(" Zero id=")).collect();
        assert!(!zeros.is_empty(), "holes became zero requests");
        // The log filter shows NBD_CMD_FLAG_NO_HOLE as trim=0 (the server may not trim).
        assert!(
            zeros.iter().all(|l| l.contains(&format!(" trim={trim} "))),
            "allocated={allocated}: {:?}",
            &zeros[..zeros.len().min(3)]
        );
        assert!(logged(&log, "Trim").is_empty(), "no trim is ever sent");
        assert_eq!(checksum(&src.uri()), checksum(&dst.uri()));
    }
}
