//! One NBD server per VMware disk: a child process serving the disk of a
//! snapshot on its own Unix socket, from a command template in the
//! configuration.
//!
//! The default template is nbdkit's `vddk` plugin ([`DEFAULT_COMMAND`]), which
//! reads the snapshot's disk through VMware's VDDK library; tests use nbdkit's
//! `file` plugin on the simulator's flat files. The template is an argv (no
//! shell); `{socket}` must appear in it, and these placeholders are replaced:
//!
//! | placeholder | value |
//! |---|---|
//! | `{socket}` | the Unix socket to listen on |
//! | `{server}` | the vCenter's host name, `{port}` its port |
//! | `{user}`, `{password_file}`, `{thumbprint}` | the `[vmware.NAME]` settings |
//! | `{vm}`, `{snapshot}` | managed object ids, e.g. `vm-42`, `snapshot-7` |
//! | `{file}` | the disk's backing file, `[datastore] dir/name.vmdk` |
//! | `{datastore}`, `{path}` | its two parts, `datastore` and `dir/name.vmdk` |
//! | `{flat_path}` | `dir/name-flat.vmdk` |
//! | `{disk_key}`, `{disk_id}` | `2000`, `disk-2000` |
//!
//! Lifecycle rules, each enforced here:
//! - The process is started from a thread that lives exactly as long as it and
//!   reaps it: `PR_SET_PDEATHSIG` (which nbdkit's `--exit-with-parent` uses)
//!   fires when the *thread* that forked the child ends, so forking from a
//!   short-lived thread would kill the server early. If the daemon dies, the
//!   thread dies with it and the server gets its signal: never an orphan.
//! - It runs in a process group of its own, which `stop` signals as a whole
//!   (SIGTERM, then SIGKILL after a grace period while the leader lives), so a
//!   Ctrl-C on the daemon's terminal does not reach it.
//! - Readiness is the NBD greeting (`NBDMAGIC`) read from the socket within a
//!   deadline; a process that exits first is an error quoting its last output.
//! - `Drop` stops it; `restart` stops and starts it again with the same command.
//!
//! Nothing here knows about jobs, actors or the database.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::error::VmwareError;

/// nbdkit's vddk plugin on the snapshot's disk: read-only, one VDDK link per
/// disk, unbuffered, with the compression VMware recommends over NBD/NBDSSL.
/// The password is passed as a file (`password=+FILE`), never on the command
/// line. VDDK and the vddk plugin are installed by the operator (they are not in
/// Debian); `libdir` is where VDDK's tarball is usually unpacked.
pub const DEFAULT_COMMAND: &[&str] = &[
    "nbdkit",
    "--exit-with-parent",
    "--foreground",
    "--readonly",
    "--unix",
    "{socket}",
    "vddk",
    "libdir=/usr/lib/vmware-vix-disklib",
    "server={server}",
    "port={port}",
    "user={user}",
    "password=+{password_file}",
    "thumbprint={thumbprint}",
    "vm=moref={vm}",
    "snapshot={snapshot}",
    "file={file}",
    "single-link=true",
    "unbuffered=true",
    "compression=skipz",
];

const PLACEHOLDERS: &[&str] = &[
    "socket",
    "server",
    "port",
    "user",
    "password_file",
    "thumbprint",
    "vm",
    "snapshot",
    "file",
    "datastore",
    "path",
    "flat_path",
    "disk_key",
    "disk_id",
];

/// How long a stopped server gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How often readiness and exit are looked at.
const POLL: Duration = Duration::from_millis(20);
/// Unix socket paths longer than this do not fit `sockaddr_un`.
const MAX_SOCKET_PATH: usize = 107;

/// A validated command template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<String>);

impl Template {
    /// Checks a template: a program, and `{socket}` somewhere. Braces that are
    /// not placeholders are left alone (a shell snippet's `${VAR}`, say).
    pub fn parse(argv: &[String]) -> Result<Self, String> {
        let Some(program) = argv.first() else {
            return Err("must name a program".into());
        };
        if program.trim().is_empty() {
            return Err("must name a program".into());
        }
        if !argv.iter().any(|a| a.contains("{socket}")) {
            return Err("must contain {socket}, where the server listens".into());
        }
        Ok(Self(argv.to_vec()))
    }

    /// [`DEFAULT_COMMAND`].
    pub fn vddk() -> Self {
        Self(DEFAULT_COMMAND.iter().map(|s| s.to_string()).collect())
    }

    /// The command line for one disk.
    pub fn render(&self, vars: &Vars<'_>) -> Vec<String> {
        self.0
            .iter()
            .map(|arg| {
                let mut out = arg.clone();
                for name in PLACEHOLDERS {
                    let token = format!("{{{name}}}");
                    if out.contains(&token) {
                        out = out.replace(&token, &vars.value(name));
                    }
                }
                out
            })
            .collect()
    }
}

/// What a template's placeholders stand for, for one disk.
#[derive(Debug, Clone)]
pub struct Vars<'a> {
    pub socket: &'a Path,
    pub url: &'a url::Url,
    pub user: &'a str,
    pub password_file: &'a Path,
    pub thumbprint: &'a str,
    pub vm: &'a str,
    pub snapshot: &'a str,
    /// `[datastore] dir/name.vmdk`
    pub file: &'a str,
    pub disk_key: i32,
}

impl Vars<'_> {
    fn value(&self, name: &str) -> String {
        let (datastore, path) = split_datastore_path(self.file);
        match name {
            "socket" => self.socket.display().to_string(),
            "server" => self.url.host_str().unwrap_or_default().to_string(),
            "port" => self.url.port_or_known_default().unwrap_or(443).to_string(),
            "user" => self.user.to_string(),
            "password_file" => self.password_file.display().to_string(),
            "thumbprint" => self.thumbprint.to_string(),
            "vm" => self.vm.to_string(),
            "snapshot" => self.snapshot.to_string(),
            "file" => self.file.to_string(),
            "datastore" => datastore.to_string(),
            "path" => path.to_string(),
            "flat_path" => match path.strip_suffix(".vmdk") {
                Some(stem) => format!("{stem}-flat.vmdk"),
                None => path.to_string(),
            },
            "disk_key" => self.disk_key.to_string(),
            "disk_id" => format!("disk-{}", self.disk_key),
            _ => String::new(),
        }
    }
}

/// `[ds1] dir/a.vmdk` → (`ds1`, `dir/a.vmdk`); no brackets → (``, the whole).
pub fn split_datastore_path(file: &str) -> (&str, &str) {
    let t = file.trim();
    if let Some(rest) = t.strip_prefix('[')
        && let Some((ds, path)) = rest.split_once(']')
    {
        return (ds.trim(), path.trim());
    }
    ("", t)
}

/// A running (or stopped) NBD server for one disk.
pub struct NbdSource {
    /// The disk, for messages (`disk-2000`).
    disk: String,
    argv: Vec<String>,
    socket: PathBuf,
    log: PathBuf,
    ready_timeout: Duration,
    running: Option<Running>,
}

struct Running {
    pgid: Pid,
    /// The thread that forked the child and waits for it.
    waiter: JoinHandle<Option<ExitStatus>>,
}

impl std::fmt::Debug for NbdSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdSource")
            .field("disk", &self.disk)
            .field("socket", &self.socket)
            .field("running", &self.running.is_some())
            .finish()
    }
}

impl NbdSource {
    /// Starts `argv` (a rendered template) for `disk` and waits until it
    /// answers on `socket`. Its output goes to `log` (truncated at each start).
    pub fn start(
        disk: &str,
        argv: Vec<String>,
        socket: &Path,
        log: &Path,
        ready_timeout: Duration,
    ) -> Result<Self, VmwareError> {
        let mut s =
            Self { disk: disk.into(), argv, socket: socket.into(), log: log.into(), ready_timeout, running: None };
        s.launch()?;
        Ok(s)
    }

    /// `nbd+unix:///?socket=SOCKET`, the engine's source URI.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The process group of the running server (its leader's pid).
    pub fn pid(&self) -> Option<i32> {
        self.running.as_ref().map(|r| r.pgid.as_raw())
    }

    /// Whether the server process is still there.
    pub fn is_running(&self) -> bool {
        self.running.as_ref().is_some_and(|r| !r.waiter.is_finished())
    }

    /// Stops the server (if running) and starts it again with the same command.
    pub fn restart(&mut self) -> Result<(), VmwareError> {
        self.stop();
        self.launch()
    }

    /// SIGTERM to the process group, SIGKILL after a grace period; reaps it
    /// and removes the socket. Idempotent.
    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = killpg(r.pgid, Signal::SIGTERM);
            let end = Instant::now() + STOP_GRACE;
            while !r.waiter.is_finished() && Instant::now() < end {
                std::thread::sleep(POLL);
            }
            // Only while the leader is unreaped is the group surely still ours; a
            // wrapper must exec the server or pass the SIGTERM on.
            if !r.waiter.is_finished() {
                let _ = killpg(r.pgid, Signal::SIGKILL);
            }
            let _ = r.waiter.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    fn fail(&self, reason: String) -> VmwareError {
        VmwareError::Source { disk: self.disk.clone(), reason }
    }

    fn launch(&mut self) -> Result<(), VmwareError> {
        if self.argv.first().is_none_or(|p| p.is_empty()) {
            return Err(self.fail("the command is empty".into()));
        }
        if self.socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(self.fail(format!("socket path {} is too long for a Unix socket", self.socket.display())));
        }
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::File::create(&self.log)
            .map_err(|e| self.fail(format!("cannot create log file {}: {e}", self.log.display())))?;
        let log2 = log.try_clone().map_err(|e| self.fail(format!("log file {}: {e}", self.log.display())))?;
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..]).stdin(Stdio::null()).stdout(log).stderr(log2).process_group(0);

        let (tx, rx) = mpsc::channel();
        let program = self.argv[0].clone();
        let waiter = std::thread::Builder::new()
            .name(format!("nbd-{}", self.disk))
            .spawn(move || match cmd.spawn() {
                Ok(mut child) => {
                    let _ = tx.send(Ok(child.id()));
                    child.wait().ok()
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("cannot start {program}: {e}")));
                    None
                }
            })
            .map_err(|e| self.fail(format!("cannot start a thread: {e}")))?;
        let pid = match rx.recv() {
            Ok(Ok(pid)) => pid,
            Ok(Err(reason)) => {
                let _ = waiter.join();
                return Err(self.fail(reason));
            }
            Err(_) => {
                let _ = waiter.join();
                return Err(self.fail("the starting thread ended without a word".into()));
            }
        };
        let pgid = Pid::from_raw(i32::try_from(pid).map_err(|_| self.fail(format!("pid {pid} out of range")))?);
        self.running = Some(Running { pgid, waiter });
        tracing::debug!(disk = %self.disk, pid, socket = %self.socket.display(), "NBD source started");

        let end = Instant::now() + self.ready_timeout;
        loop {
            if greets(&self.socket) {
                return Ok(());
            }
            if !self.is_running() {
                let reason = format!("{} exited before serving: {}", self.argv[0], last_lines(&self.log, 3));
                self.stop();
                return Err(self.fail(reason));
            }
            if Instant::now() >= end {
                self.stop();
                let reason = format!(
                    "{} did not serve on {} within {:?}: {}",
                    self.argv[0],
                    self.socket.display(),
                    self.ready_timeout,
                    last_lines(&self.log, 3)
                );
                return Err(self.fail(reason));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for NbdSource {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether an NBD server answers on `socket` with its greeting.
fn greets(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC"
}

/// The last `n` non-empty lines of a log file, joined by " | ".
fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(n)..];
    if tail.is_empty() { "no output".into() } else { tail.join(" | ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(socket: &'a Path, url: &'a url::Url, pw: &'a Path) -> Vars<'a> {
        Vars {
            socket,
            url,
            user: "backup@vsphere.local",
            password_file: pw,
            thumbprint: "AB:CD",
            vm: "vm-42",
            snapshot: "snapshot-7",
            file: "[ds 1] web/web_1.vmdk",
            disk_key: 2001,
        }
    }

    #[test]
    fn the_default_template_renders_the_vddk_command() {
        let url = url::Url::parse("https://vc.example/sdk").unwrap();
        let (sock, pw) = (Path::new("/run/blockrepl/j-disk-2001.sock"), Path::new("/etc/blockrepl/vc.pw"));
        let argv = Template::vddk().render(&vars(sock, &url, pw));
        let joined = argv.join(" ");
        for expected in [
            "--unix /run/blockrepl/j-disk-2001.sock",
            "vddk libdir=",
            "server=vc.example port=443 user=backup@vsphere.local password=+/etc/blockrepl/vc.pw thumbprint=AB:CD",
            "vm=moref=vm-42 snapshot=snapshot-7",
            "single-link=true",
        ] {
            assert!(joined.contains(expected), "{expected:?} not in {joined}");
        }
        assert!(argv.contains(&"file=[ds 1] web/web_1.vmdk".to_string()), "one argument, spaces and all: {argv:?}");
        assert!(!joined.contains('{'), "every placeholder replaced: {joined}");
    }

    #[test]
    fn templates_replace_only_their_placeholders() {
        let url = url::Url::parse("https://vc.example:8443/sdk").unwrap();
        let (sock, pw) = (Path::new("/s"), Path::new("/pw"));
        let t = Template::parse(&[
            "sh".into(),
            "-c".into(),
            "exec nbdkit -U {socket} file /data/{datastore}/{flat_path} # ${HOME} {unknown} {port} {disk_id}".into(),
        ])
        .unwrap();
        assert_eq!(
            t.render(&vars(sock, &url, pw))[2],
            "exec nbdkit -U /s file /data/ds 1/web/web_1-flat.vmdk # ${HOME} {unknown} 8443 disk-2001"
        );
    }

    #[test]
    fn bad_templates_are_refused() {
        assert!(Template::parse(&[]).is_err());
        assert!(Template::parse(&["".into(), "{socket}".into()]).is_err());
        let e = Template::parse(&["nbdkit".into(), "file".into()]).unwrap_err();
        assert!(e.contains("{socket}"), "{e}");
    }

    #[test]
    fn datastore_paths_split() {
        assert_eq!(split_datastore_path("[ds1] a/b.vmdk"), ("ds1", "a/b.vmdk"));
        assert_eq!(split_datastore_path("[ds 1]a.vmdk"), ("ds 1", "a.vmdk"));
        assert_eq!(split_datastore_path("a.vmdk"), ("", "a.vmdk"));
    }
}
