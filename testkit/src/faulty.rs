//! NBD targets that misbehave on purpose: small nbdkit `sh` plugins over a
//! file, shared by the integration tests (`tests/it/trust.rs`) and the chaos
//! suite's fault matrix. nbdkit 1.32's error filter cannot fail a flush, nor
//! drop what was not flushed; these can.

use std::path::{Path, PathBuf};

use crate::harness::{Server, file_checksum, sh};

/// How a [`FileTarget`] treats flushes.
#[derive(Clone, Copy)]
pub enum Flush {
    /// Writes wait in an overlay until a flush applies them to the file; flush
    /// number N fails with EIO and drops the overlay, as Linux's fsync does after
    /// a writeback error (the data written since the last good flush is gone).
    DropsWritesAt(u32),
    /// The same with multi-conn: the overlay is shared by every connection, and
    /// each other connection learns of the error at its next flush, once (as each
    /// file descriptor does on Linux).
    DropsWritesAtMultiConn(u32),
    /// Every flush fails with this error (ENOSPC is not worth retrying, EIO is).
    AlwaysFails(&'static str),
    /// The same with multi-conn and requests in parallel.
    AlwaysFailsMultiConn(&'static str),
    /// The server does not offer flush at all; writes go straight to the file.
    Absent,
    /// Multi-conn, requests in parallel, writes straight to the file; a flush on
    /// the second connection takes this many seconds.
    SlowOnSecondConnection(u32),
}

/// A target served by an nbdkit `sh` plugin over `disk.img` in its own directory,
/// which starts filled with 0xa5 so that a missing write or zero shows. Reads see
/// only what reached the file (the copy never reads its target before the end).
pub struct FileTarget {
    pub server: Server,
    /// The file the writes reach once flushed (or at once, without an overlay).
    pub file: PathBuf,
}

impl FileTarget {
    pub fn start(dir: &Path, name: &str, size: usize, flush: Flush) -> Self {
        let home = dir.join(name);
        std::fs::create_dir_all(home.join("overlay")).unwrap();
        let file = home.join("disk.img");
        std::fs::write(&file, vec![0xa5u8; size]).unwrap();
        let direct = (r#"put "$4""#.to_string(), r#"head -c "$3" /dev/zero | put "$4""#.to_string());
        // (can_flush and can_multi_conn exit codes, thread model, pwrite, zero, flush)
        let overlay = (
            r#"cat > "$ov/$(printf %08d "$(next seq)").$4""#.to_string(),
            r#"head -c "$3" /dev/zero > "$ov/$(printf %08d "$(next seq)").$4""#.to_string(),
        );
        let apply = r#"for w in $(ls "$ov"); do put "${w#*.}" < "$ov/$w"; rm "$ov/$w"; done"#;
        let always_fails =
            |errno: &str| format!(r#"next flushes >/dev/null; echo "{errno} the flush failed" >&2; exit 1"#);
        let (can_flush, multi_conn, threads, (pwrite, zero), flush) = match flush {
            Flush::DropsWritesAtMultiConn(n) => (
                0,
                0,
                "serialize_all_requests",
                overlay,
                format!(
                    r#"if [ "$(next flushes)" = {n} ]; then rm -f "$ov"/*; next errors > "$d/seen.$2"; echo "EIO writeback error, unflushed writes lost" >&2; exit 1; fi
    if [ "$(cat "$d/errors" 2>/dev/null)" != "$(cat "$d/seen.$2" 2>/dev/null)" ]; then cp "$d/errors" "$d/seen.$2"; echo "EIO an earlier writeback error" >&2; exit 1; fi
    {apply}"#
                ),
            ),
            Flush::DropsWritesAt(n) => (
                0,
                3,
                "serialize_all_requests",
                overlay,
                format!(
                    r#"if [ "$(next flushes)" = {n} ]; then rm -f "$ov"/*; echo "EIO writeback error, unflushed writes lost" >&2; exit 1; fi
    {apply}"#
                ),
            ),
            Flush::AlwaysFails(errno) => (0, 3, "serialize_all_requests", direct, always_fails(errno)),
            Flush::AlwaysFailsMultiConn(errno) => (0, 0, "parallel", direct, always_fails(errno)),
            Flush::Absent => (3, 3, "serialize_all_requests", direct, "exit 2".to_string()),
            Flush::SlowOnSecondConnection(secs) => (
                0,
                0,
                "parallel",
                direct,
                format!(r#"next flushes >/dev/null; if [ "$2" = 2 ]; then sleep {secs}; fi"#),
            ),
        };
        let script = format!(
            r#"#!/bin/bash
d='{home}'; disk="$d/disk.img"; ov="$d/overlay"
# A counter in a file, safe under parallel requests.
next() {{ ( flock 9; local n=$(( $(cat "$d/$1" 2>/dev/null || echo 0) + 1 )); echo $n > "$d/$1"; echo $n ) 9>>"$d/lock"; }}
put() {{ dd of="$disk" seek="$1" oflag=seek_bytes conv=notrunc status=none; }}
case "$1" in
  thread_model) echo {threads} ;;
  open) h=$(next connections); cat "$d/errors" > "$d/seen.$h" 2>/dev/null; echo $h ;;
  get_size) stat -c %s "$disk" ;;
  can_write|can_zero) exit 0 ;;
  can_flush) exit {can_flush} ;;
  can_multi_conn) exit {multi_conn} ;;
  pread) dd if="$disk" skip="$4" count="$3" iflag=skip_bytes,count_bytes status=none ;;
  pwrite) {pwrite} ;;
  zero) {zero} ;;
  flush)
    {flush} ;;
  *) exit 2 ;;
esac
"#,
            home = home.display()
        );
        let plugin = home.join("plugin.sh");
        std::fs::write(&plugin, script).unwrap();
        sh("chmod", &["+x", &plugin.display().to_string()]);
        let server = Server::nbdkit(dir, name, &["sh", &plugin.display().to_string()]);
        FileTarget { server, file }
    }

    pub fn uri(&self) -> String {
        self.server.uri()
    }

    /// How many flushes the server was asked for.
    pub fn flushes(&self) -> u32 {
        let n = std::fs::read_to_string(self.file.with_file_name("flushes")).unwrap_or_default();
        n.trim().parse().unwrap_or(0)
    }

    pub fn checksum(&self) -> String {
        file_checksum(&self.file)
    }
}
