//! The vSphere simulator of the tests (`tools/vcsim-cbt`) as a child process.
//!
//! Shared by the integration tests and the unit tests of `src/vmware/`.
//!
//! The simulator is built by `scripts/setup`; if the binary is missing or older
//! than its source, the first test that needs it builds it (once per test
//! binary). It serves on 127.0.0.1 with a fresh certificate, keeps its
//! datastore in the test's directory, and exits when its standard input closes,
//! so it cannot outlive the test.
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// How long the simulator may take to print its first line (a loaded machine
/// starts it in about a second).
const STARTUP: Duration = Duration::from_secs(60);

/// The user and password the simulator accepts.
pub const USER: &str = "backup@vsphere.local";
pub const PASSWORD: &str = "s3cret-Pa55";

/// Where the CBT emulation draws its lines.
pub const BLOCK: u64 = 64 * 1024;

/// The simulator binary, built if needed.
pub fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // testkit/ sits in the repository's root.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let out = Command::new(root.join("tools/vcsim-cbt/build"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run tools/vcsim-cbt/build (run scripts/setup): {e}"));
        assert!(
            out.status.success(),
            "tools/vcsim-cbt/build failed (run scripts/setup): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        root.join("target/tools/vcsim-cbt")
    })
}

/// A disk of the simulated VM.
#[derive(Debug, Clone)]
pub struct SimDisk {
    pub key: i32,
    pub label: String,
    /// `[LocalDS_0] blockrepl-vm/blockrepl-vm.vmdk`
    pub file: String,
    /// The local flat file behind it: write here to change the disk.
    pub flat: PathBuf,
    pub capacity: u64,
}

/// A running simulator with one VM.
pub struct Vcsim {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    /// `https://127.0.0.1:PORT/sdk`
    pub url: String,
    /// SHA-256 thumbprint of its certificate, `AB:CD:...`
    pub thumbprint: String,
    pub vm_name: String,
    /// `/DC0/vm/blockrepl-vm`
    pub vm_path: String,
    pub vm_uuid: String,
    pub vm_moref: String,
    pub disks: Vec<SimDisk>,
}

impl Vcsim {
    /// Starts `vcsim-cbt ARGS` with its datastore under `dir`, e.g.
    /// `&["-disks", "8M,4M", "-page-areas", "3"]`.
    pub fn start(dir: &Path, args: &[&str]) -> Vcsim {
        let log = std::fs::File::create(dir.join("vcsim.log")).unwrap();
        let mut child = Command::new(binary())
            .args(["-user", USER, "-password", PASSWORD])
            .args(args)
            .env("TMPDIR", dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start vcsim-cbt: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep reading, so that a later line cannot hit a closed pipe; the
            // thread ends with the process.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = rx.recv_timeout(STARTUP).unwrap_or_default();
        if line.trim().is_empty() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vcsim-cbt printed nothing: {}", std::fs::read_to_string(dir.join("vcsim.log")).unwrap_or_default());
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("vcsim-cbt said {line:?}: {e}"));
        let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        let disks = v["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| SimDisk {
                key: d["key"].as_i64().unwrap() as i32,
                label: s(&d["label"]),
                file: s(&d["file"]),
                flat: PathBuf::from(s(&d["flat"])),
                capacity: d["capacity"].as_u64().unwrap(),
            })
            .collect();
        Vcsim {
            stdin: child.stdin.take(),
            child: Some(child),
            url: s(&v["url"]),
            thumbprint: s(&v["thumbprint"]),
            vm_name: s(&v["vm"]["name"]),
            vm_path: s(&v["vm"]["path"]),
            vm_uuid: s(&v["vm"]["uuid"]),
            vm_moref: s(&v["vm"]["moref"]),
            disks,
        }
    }

    /// Writes `data` into disk `i` at `offset` (between snapshots: the CBT
    /// emulation compares the flat files' blocks at snapshot time).
    pub fn write(&self, i: usize, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&self.disks[i].flat).unwrap();
        f.write_all_at(data, offset).unwrap();
        f.sync_all().unwrap();
    }

    /// The non-zero 64 KiB blocks of disk `i`'s flat file as merged
    /// `(start, length)` areas: what `"*"` must answer.
    pub fn nonzero_areas(&self, i: usize) -> Vec<(u64, u64)> {
        let data = std::fs::read(&self.disks[i].flat).unwrap();
        let capacity = self.disks[i].capacity;
        let mut blocks = Vec::new();
        for (n, chunk) in data.chunks(BLOCK as usize).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                blocks.push(n as u64);
            }
        }
        merge_blocks(&blocks, capacity)
    }

    /// The directory of the datastore (`[LocalDS_0] x` is `<dir>/x`).
    pub fn datastore_dir(&self) -> PathBuf {
        let d = &self.disks[0];
        let rel = d.file.split_once("] ").map(|(_, p)| p).unwrap_or_default();
        let flat_rel = rel.strip_suffix(".vmdk").map(|s| format!("{s}-flat.vmdk")).unwrap_or_default();
        let flat = d.flat.to_string_lossy().into_owned();
        PathBuf::from(flat.strip_suffix(&flat_rel).unwrap_or(&flat))
    }

    /// Kills the simulator (vCenter going away); idempotent.
    pub fn kill(&mut self) {
        self.stdin.take();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Asks it to stop through its standard input, as a test ends.
    pub fn close(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.flush();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `len` bytes of a pattern that differs by `seed` (never all zeros), to
/// write into a disk.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
}

/// Block numbers (sorted) as merged `(start, length)` areas, cut at `capacity`.
pub fn merge_blocks(blocks: &[u64], capacity: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        let start = b * BLOCK;
        let end = ((b + 1) * BLOCK).min(capacity);
        match out.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 = end - last.0,
            _ => out.push((start, end - start)),
        }
    }
    out
}
