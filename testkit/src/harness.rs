//! Starting and stopping real servers for tests, running the `blockrepl` binary,
//! and reading what the servers saw.
//!
//! Every server runs in the foreground as a child of the test, on a Unix socket in
//! the test's own temporary directory, and is killed when its `Server` is dropped.
//! Readiness is awaited by polling with a deadline, never by sleeping a fixed time.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

/// How long anything in the harness may take to become ready.
pub const READY: Duration = Duration::from_secs(30);

/// Polls `f` every 20 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("blockrepl-it-").tempdir().unwrap()
}

/// An NBD server child process on a Unix socket.
pub struct Server {
    child: Option<Child>,
    pub sock: PathBuf,
    log: PathBuf,
    program: &'static str,
    args: Vec<String>,
    pid_file: PathBuf,
    /// A command the server is started under (e.g. `setsid`), if any.
    wrapper: Vec<String>,
}

impl Server {
    /// `nbdkit -f -U SOCK -P PID ARGS...`; ready once the pid file exists (nbdkit
    /// writes it after it listens).
    pub fn nbdkit(dir: &Path, name: &str, args: &[&str]) -> Self {
        let mut s = Self::new(dir, name, "nbdkit", args);
        s.start();
        s
    }

    /// `qemu-nbd -t -k SOCK --pid-file PID ARGS...` (persistent, so probes and
    /// reconnects do not make it exit).
    pub fn qemu_nbd(dir: &Path, name: &str, args: &[&str]) -> Self {
        let mut s = Self::new(dir, name, "qemu-nbd", args);
        s.start();
        s
    }

    fn new(dir: &Path, name: &str, program: &'static str, args: &[&str]) -> Self {
        Self {
            child: None,
            sock: dir.join(format!("{name}.sock")),
            log: dir.join(format!("{name}.server.log")),
            program,
            args: args.iter().map(|s| s.to_string()).collect(),
            pid_file: dir.join(format!("{name}.pid")),
            wrapper: Vec::new(),
        }
    }

    /// Starts (or restarts, after `kill`) the server with the same arguments.
    pub fn start(&mut self) {
        let _ = std::fs::remove_file(&self.pid_file);
        let _ = std::fs::remove_file(&self.sock);
        let mut cmd = command_under(&self.wrapper, self.program);
        match self.program {
            "nbdkit" => {
                cmd.args(["-f", "--exit-with-parent", "-U"]).arg(&self.sock).arg("-P").arg(&self.pid_file);
            }
            _ => {
                cmd.args(["-t", "-k"]).arg(&self.sock).arg("--pid-file").arg(&self.pid_file);
            }
        }
        cmd.args(&self.args);
        let log = std::fs::File::create(&self.log).unwrap();
        cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", self.program));
        let (pid, sock, logp) = (self.pid_file.clone(), self.sock.clone(), self.log.clone());
        wait_until(&format!("{} {:?} to listen", self.program, self.args), READY, || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("{} exited with {st}: {}", self.program, std::fs::read_to_string(&logp).unwrap_or_default());
            }
            pid.exists() && std::fs::metadata(&pid).map(|m| m.len() > 0).unwrap_or(false) && sock.exists()
        });
        self.child = Some(child);
    }

    /// `nbd+unix:///?socket=SOCK`
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    /// `nbd+unix:///EXPORT?socket=SOCK`
    pub fn uri_export(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    /// SIGTERM and wait: nbdkit filters such as `stats` write their files on exit.
    pub fn stop(&mut self) {
        self.signal_and_wait(Signal::SIGTERM);
    }

    /// SIGKILL and wait: a crash.
    pub fn kill(&mut self) {
        self.signal_and_wait(Signal::SIGKILL);
    }

    fn signal_and_wait(&mut self, sig: Signal) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), sig);
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Server {
    /// Like `nbdkit`, with the server run as `WRAPPER... nbdkit ...` (which must
    /// exec nbdkit, keeping its pid, as `setsid` does).
    pub fn nbdkit_under(dir: &Path, name: &str, args: &[&str], wrapper: &[&str]) -> Self {
        let mut s = Self::new(dir, name, "nbdkit", args);
        s.wrapper = wrapper.iter().map(|w| w.to_string()).collect();
        s.start();
        s
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the server is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last `n` lines of the server's output on one line, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        tail_lines(&self.log, n, " | ")
    }
}

/// `WRAPPER... PROGRAM`, or `PROGRAM` when there is no wrapper.
fn command_under(wrapper: &[String], program: &str) -> Command {
    match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// The last `n` lines of a file joined by `sep`, or "(no output)".
pub fn tail_lines(path: &Path, n: usize, sep: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.trim().lines().collect();
    let tail = lines[lines.len().saturating_sub(n)..].join(sep);
    if tail.is_empty() { "(no output)".to_string() } else { tail }
}

/// The result of running `blockrepl`.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Asserts success and returns the parsed `--json` summary.
    pub fn json(&self) -> serde_json::Value {
        self.assert_ok();
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }

    pub fn assert_ok(&self) -> &Self {
        assert!(self.status.success(), "blockrepl failed ({}): {}", self.status, self.stderr);
        self
    }

    /// Asserts a clean failure: non-zero exit, exactly one line on stderr, no panic
    /// or backtrace. Returns that line.
    pub fn error_line(&self) -> String {
        assert!(!self.status.success(), "expected failure, got success; stdout: {}", self.stdout);
        assert_ne!(self.status.code(), Some(101), "exit code 101 is a panic: {}", self.stderr);
        let lines: Vec<&str> = self.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "expected one line on stderr, got: {:?}", self.stderr);
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        lines[0].to_string()
    }
}

/// The `blockrepl` binary: the one given to [`set_bin`], else the one cargo built
/// for this test (cargo sets `CARGO_BIN_EXE_blockrepl` when it runs an integration
/// test), else the `blockrepl` that cargo put next to this program (a test binary
/// sits one level down, in `deps/`).
pub fn bin() -> &'static str {
    BIN.get_or_init(|| {
        if let Ok(path) = std::env::var("CARGO_BIN_EXE_blockrepl") {
            return path;
        }
        let exe = std::env::current_exe().unwrap();
        let mut dir = exe.parent().unwrap().to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let path = dir.join("blockrepl");
        assert!(path.is_file(), "no blockrepl binary at {} (build it first)", path.display());
        path.display().to_string()
    })
}

static BIN: OnceLock<String> = OnceLock::new();

/// Makes [`bin`] (and so [`blockrepl`] and [`Daemon`]) use `path`; before the first
/// use only.
pub fn set_bin(path: &Path) {
    let path = path.display().to_string();
    assert!(BIN.set(path.clone()).is_ok() || bin() == path, "set_bin after bin() was used");
}

/// Runs `blockrepl ARGS` to completion.
pub fn blockrepl(args: &[&str]) -> Run {
    let out = Command::new(bin()).args(args).stdin(Stdio::null()).output().unwrap();
    Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Starts `blockrepl ARGS` in the background, its stdout and stderr captured.
pub fn spawn_blockrepl(args: &[&str]) -> Child {
    Command::new(bin()).args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Sends SIGINT to a running `blockrepl` and waits for it: how long it took to
/// exit, its exit code and its stderr.
pub fn interrupt(child: Child) -> (Duration, Option<i32>, String) {
    let t = Instant::now();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    (t.elapsed(), out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// One extent as `nbdinfo --map` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapExtent {
    pub offset: u64,
    pub length: u64,
    pub data: bool,
}

/// The `base:allocation` map of an export ("data" = not known to read as zero).
pub fn allocation_map(uri: &str) -> Vec<MapExtent> {
    let out = Command::new("nbdinfo").args(["--map", "--json", uri]).output().unwrap();
    assert!(out.status.success(), "nbdinfo --map failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| MapExtent {
            offset: e["offset"].as_u64().unwrap(),
            length: e["length"].as_u64().unwrap(),
            data: e["type"].as_u64().unwrap() & 2 == 0,
        })
        .collect()
}

pub fn data_bytes(map: &[MapExtent]) -> u64 {
    map.iter().filter(|e| e.data).map(|e| e.length).sum()
}

/// `&str`s of a list of `String`s (server arguments).
pub fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// SHA-256 of a file, as [`checksum`] gives it for an export.
pub fn file_checksum(path: &Path) -> String {
    hex(&Sha256::digest(std::fs::read(path).unwrap()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a whole export, read with nbdcopy.
pub fn checksum(uri: &str) -> String {
    let mut child = Command::new("nbdcopy").args([uri, "-"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    assert!(child.wait().unwrap().success(), "nbdcopy {uri} - failed");
    hex(&h.finalize())
}

/// A request seen by nbdkit's `log` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub op: String,
    pub offset: u64,
    pub count: u64,
    pub flags: String,
}

/// The requests of kind `op` ("Read", "Write", "Zero", "Flush", ...) in a log file
/// of nbdkit's `log` filter.
pub fn logged(logfile: &Path, op: &str) -> Vec<Logged> {
    let text = std::fs::read_to_string(logfile).unwrap_or_default();
    let needle = format!(" {op} id=");
    text.lines()
        .filter(|l| l.contains(&needle))
        .map(|l| {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .map(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap())
                    .unwrap_or(0)
            };
            Logged {
                op: op.to_string(),
                offset: field("offset="),
                count: field("count="),
                flags: l.split_whitespace().find_map(|w| w.strip_prefix("fast=")).unwrap_or("").to_string(),
            }
        })
        .collect()
}

/// Total bytes of the logged requests.
pub fn total(reqs: &[Logged]) -> u64 {
    reqs.iter().map(|r| r.count).sum()
}

/// Writes a JSON changed-areas file and returns its path.
pub fn areas_file(dir: &Path, name: &str, areas: &[(u64, u64)]) -> PathBuf {
    let v: Vec<serde_json::Value> = areas.iter().map(|&(s, l)| serde_json::json!({"start": s, "length": l})).collect();
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    p
}

/// Runs a program to success (test set-up steps such as qemu-img and qemu-io).
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ------------------------------------------------------------------ daemon --

/// `blockrepl serve` as a child process, with a configuration file in `dir`, its
/// admin socket there too, and systemd's READY notification captured on a
/// datagram socket of ours (NOTIFY_SOCKET).
pub struct Daemon {
    child: Option<Child>,
    /// The node id it runs under.
    pub node: String,
    pub config: PathBuf,
    pub admin_socket: PathBuf,
    pub log: PathBuf,
    env: Vec<(String, String)>,
    /// A command the daemon is started under (e.g. `unshare -m ...`), if any.
    wrapper: Vec<String>,
    /// What arrived on the notify socket, read all along by a thread of ours as
    /// systemd reads it (an unread datagram socket fills up, and then the
    /// daemon's sends block).
    notes: Notes,
    notify_path: PathBuf,
}

impl Daemon {
    /// Writes a configuration for database `db_url` (fast intervals for tests,
    /// overridable through `env`, e.g. `("BLOCKREPL__WATCHDOG__STALL_TIMEOUT", "3s")`)
    /// and starts the daemon; returns once it said READY.
    pub fn start(dir: &Path, db_url: &str, env: &[(&str, &str)]) -> Daemon {
        Self::start_under(dir, db_url, env, &[])
    }

    /// Like `start`, with the daemon run as `WRAPPER... blockrepl serve ...`.
    pub fn start_under(dir: &Path, db_url: &str, env: &[(&str, &str)], wrapper: &[&str]) -> Daemon {
        let mut d = Self::configure(dir, db_url, env, wrapper);
        d.spawn();
        d
    }

    /// Like `start`, with `extra` (TOML sections, e.g. `[vmware.NAME]`) added to
    /// the configuration.
    pub fn start_extra(dir: &Path, db_url: &str, env: &[(&str, &str)], extra: &str) -> Daemon {
        let mut d = Self::configure_extra(dir, db_url, env, &[], extra);
        d.spawn();
        d
    }

    /// Writes the configuration (see `start`) without starting the daemon.
    pub fn configure(dir: &Path, db_url: &str, env: &[(&str, &str)], wrapper: &[&str]) -> Daemon {
        Self::configure_extra(dir, db_url, env, wrapper, "")
    }

    fn configure_extra(dir: &Path, db_url: &str, env: &[(&str, &str)], wrapper: &[&str], extra: &str) -> Daemon {
        // Node ids are unique per live daemon on one database server (the test
        // server is shared by every test): one per configured daemon.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let node =
            format!("it-node-{}-{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let config = format!(
            "[database]\nurl = \"{db_url}\"\nretry_interval = \"300ms\"\n\
             [admin]\nsocket = \"{}\"\ngroup = \"root\"\n\
             [node]\nid = \"{node}\"\n\
             [discovery]\ninterval = \"1s\"\nlease = \"30s\"\n\
             [copy]\ncheckpoint_interval = \"1s\"\n\
             [log]\ntarget = \"stderr\"\nlevel = \"info\"\n{extra}",
            Self::admin_socket_in(dir).display()
        );
        Self::configure_with(dir, &config, &node, env, wrapper)
    }

    /// Where the daemon's admin socket must be: `dir/admin.sock`.
    pub fn admin_socket_in(dir: &Path) -> PathBuf {
        dir.join("admin.sock")
    }

    /// Starts `WRAPPER... blockrepl serve` with the configuration `config_text` (the
    /// whole TOML text, written to `dir/blockrepl.toml`; its admin socket must be
    /// [`Daemon::admin_socket_in`]`(dir)`, its node id `node`); returns once it
    /// said READY.
    pub fn start_with(dir: &Path, config_text: &str, node: &str, env: &[(&str, &str)], wrapper: &[&str]) -> Daemon {
        let mut d = Self::configure_with(dir, config_text, node, env, wrapper);
        d.spawn();
        d
    }

    fn configure_with(dir: &Path, config_text: &str, node: &str, env: &[(&str, &str)], wrapper: &[&str]) -> Daemon {
        let config = dir.join("blockrepl.toml");
        std::fs::write(&config, config_text).unwrap();
        let node = env.iter().find(|(k, _)| *k == "BLOCKREPL__NODE__ID").map_or(node, |(_, v)| v).to_string();
        let notify_path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
        notify.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let notes = Notes::read(notify);
        Daemon {
            child: None,
            node,
            config,
            admin_socket: Self::admin_socket_in(dir),
            log: dir.join("daemon.log"),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            notes,
            notify_path,
        }
    }

    /// Starts the process (again) and waits for READY.
    pub fn spawn(&mut self) {
        self.launch();
        self.wait_ready();
    }

    /// Starts the process (again) without waiting for anything.
    pub fn launch(&mut self) {
        self.notes.forget_ready();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = command_under(&self.wrapper, bin());
        let child = cmd
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("NOTIFY_SOCKET", &self.notify_path)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Waits for READY=1 on the notify socket (one sent since the last wait).
    pub fn wait_ready(&mut self) {
        let end = Instant::now() + READY;
        loop {
            if self.notes.take_ready() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("daemon exited before READY ({st}):\n{}", self.log_text());
            }
            assert!(Instant::now() < end, "daemon not READY within {READY:?}:\n{}", self.log_text());
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0))
    }

    /// The notifications (`READY=1`, `WATCHDOG=1`, ...) the daemon sends during
    /// `within`, one string per datagram.
    pub fn notifications(&self, within: Duration) -> Vec<String> {
        let from = Instant::now();
        std::thread::sleep(within);
        self.notes.since(from)
    }

    /// Whether the daemon's process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// SIGTERM; returns the exit status and how long the daemon took to exit.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let t = Instant::now();
        kill(self.pid(), Signal::SIGTERM).unwrap();
        (self.wait_exit(), t.elapsed())
    }

    /// Waits (at most 30 s) for the daemon to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        let t = Instant::now();
        let end = t + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > end {
                let _ = c.kill();
                panic!("daemon did not exit within 30 s:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a CLI command against this daemon's admin socket.
    pub fn cli(&self, args: &[&str]) -> Run {
        let mut all: Vec<&str> = args.to_vec();
        let sock = self.admin_socket.display().to_string();
        all.push("--socket");
        all.push(&sock);
        blockrepl(&all)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        self.notes.stop();
    }
}

/// The datagrams of a notify socket with the time each arrived, read by a
/// thread until `stop`.
struct Notes {
    seen: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
    /// How many READY=1 `take_ready` has consumed.
    readies: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Notes {
    fn read(socket: std::os::unix::net::UnixDatagram) -> Notes {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !st.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(n) = socket.recv(&mut buf) {
                    s.lock().unwrap().push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
                }
            }
        });
        Notes { seen, readies: 0, stop }
    }

    fn count_ready(&self) -> usize {
        self.seen.lock().unwrap().iter().filter(|(_, m)| m.lines().any(|l| l == "READY=1")).count()
    }

    /// Forgets every READY=1 so far (a new process starts).
    fn forget_ready(&mut self) {
        self.readies = self.count_ready();
    }

    fn take_ready(&mut self) -> bool {
        let n = self.count_ready();
        if n > self.readies {
            self.readies = n;
            true
        } else {
            false
        }
    }

    fn since(&self, from: Instant) -> Vec<String> {
        self.seen.lock().unwrap().iter().filter(|(t, _)| *t >= from).map(|(_, m)| m.clone()).collect()
    }

    fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

// ------------------------------------------------------------------- proxy --

/// A Unix-socket proxy in front of a server, to take the server "down" (every
/// connection cut, new ones refused) and bring it back, without touching the
/// server itself, which other tests share.
pub struct Proxy {
    pub path: PathBuf,
    target: PathBuf,
    state: std::sync::Arc<std::sync::Mutex<ProxyState>>,
}

#[derive(Default)]
struct ProxyState {
    up: bool,
    generation: u64,
    /// Connections of generations up to this one forward nothing any more.
    stalled: u64,
    streams: Vec<std::os::unix::net::UnixStream>,
}

impl Proxy {
    pub fn start(path: &Path, target: &Path) -> Proxy {
        let p = Proxy {
            path: path.to_path_buf(),
            target: target.to_path_buf(),
            state: std::sync::Arc::new(std::sync::Mutex::new(ProxyState::default())),
        };
        p.up();
        p
    }

    /// Accepts connections (again).
    pub fn up(&self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = std::os::unix::net::UnixListener::bind(&self.path).unwrap();
        let generation = {
            let mut s = self.state.lock().unwrap();
            s.up = true;
            s.generation += 1;
            s.generation
        };
        let (state, target) = (self.state.clone(), self.target.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                let mut s = state.lock().unwrap();
                if !s.up || s.generation != generation {
                    return; // this listener was retired by `down`
                }
                let Ok(server) = std::os::unix::net::UnixStream::connect(&target) else { continue };
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    let state = state.clone();
                    std::thread::spawn(move || forward(from, to, generation, &state));
                }
                s.streams.push(client);
                s.streams.push(server);
            }
        });
    }

    /// A proxy (`dir/db-proxy.sock`) in front of the database server that `db_url`
    /// reaches over its Unix socket, and `db_url` through the proxy.
    pub fn for_database(dir: &Path, db_url: &str) -> (Proxy, String) {
        let (_, query) = db_url.split_once("unix_socket=").expect("the test server is reached over a Unix socket");
        let real_socket = query.split('&').next().unwrap();
        let proxy = Proxy::start(&dir.join("db-proxy.sock"), Path::new(real_socket));
        let url = db_url.replace(real_socket, &proxy.path.display().to_string());
        (proxy, url)
    }

    /// The path goes silent, as a network that drops packets would: the open
    /// connections stay open but nothing passes through them any more, ever, and
    /// new connections are refused until [`Proxy::up`], which serves new ones
    /// (the silent ones stay silent).
    pub fn stall(&self) {
        let mut s = self.state.lock().unwrap();
        s.up = false;
        s.stalled = s.generation;
        s.streams.clear(); // closes nothing: the forwarders hold their own handles
        drop(s);
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }

    /// Cuts every connection and refuses new ones.
    pub fn down(&self) {
        let mut s = self.state.lock().unwrap();
        s.up = false;
        for st in s.streams.drain(..) {
            let _ = st.shutdown(std::net::Shutdown::Both);
        }
        drop(s);
        // Wake the accept loop so that it sees it is retired, then disappear.
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Copies `from` to `to` until either side closes; once the proxy stalls this
/// connection's generation, what arrives is swallowed and the sockets stay open.
fn forward(
    mut from: std::os::unix::net::UnixStream,
    mut to: std::os::unix::net::UnixStream,
    generation: u64,
    state: &std::sync::Mutex<ProxyState>,
) {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if state.lock().unwrap().stalled >= generation {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    if state.lock().unwrap().stalled < generation {
        let _ = to.shutdown(std::net::Shutdown::Both);
    }
}
