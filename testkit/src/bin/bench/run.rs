//! Running the copy tools and timing them from outside, and what may stop a run:
//! a signal to the benchmark (Ctrl-C, SIGTERM, SIGHUP) stops the tools it is
//! timing, and everything else is stopped by the scenario's servers and daemon
//! being dropped on the way out.
//!
//! Also the CPU counters of the machine and of processes, read from /proc.

use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Why a scenario stopped before its end.
#[derive(Debug)]
pub enum Stop {
    /// A run failed, or a server or the daemon died: the message says which and why.
    Failed(String),
    /// The benchmark was told to stop.
    Interrupted,
}

impl Stop {
    pub fn failed(msg: impl Into<String>) -> Stop {
        Stop::Failed(msg.into())
    }
}

/// What the NBD servers run under: a session of their own each, as the servers of
/// this benchmark always ran. It matters for the figures: with autogroup
/// scheduling (Debian's default) Linux shares CPU time between sessions first, so
/// two servers and a copier in one session compete differently, with each other and
/// with the rest of the machine, than in three. A Ctrl-C then reaches the
/// benchmark and the tools it times, and the benchmark stops the servers itself.
pub const OWN_SESSION: &[&str] = &["setsid"];

/// What the daemon runs under: a session of its own, and SIGTERM when the
/// benchmark dies, even by SIGKILL.
pub const DAEMON_WRAPPER: &[&str] = &["setpriv", "--pdeathsig", "TERM", "setsid"];

/// Set once a stop signal arrived.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// The tools being timed, by pid, while they are not yet reaped: the signal thread
/// stops them, and a pid leaves this list (under its lock) before it is reaped, so a
/// reused pid is never signalled.
static TIMED: Mutex<Vec<Pid>> = Mutex::new(Vec::new());

/// Catches SIGINT, SIGTERM and SIGHUP for the rest of the process: the benchmark
/// stops the tools it is timing and unwinds, stopping its servers on the way.
pub fn catch_signals() -> std::io::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    // Lives as long as the process; it owns nothing that needs joining.
    std::thread::spawn(move || {
        for _ in signals.forever() {
            STOPPING.store(true, Ordering::SeqCst);
            for &pid in TIMED.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let _ = kill(pid, Signal::SIGTERM);
            }
        }
    });
    Ok(())
}

/// Whether a stop signal arrived.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::SeqCst)
}

/// `Err(Stop::Interrupted)` once a stop signal arrived: call it in every loop.
pub fn check() -> Result<(), Stop> {
    if stopping() { Err(Stop::Interrupted) } else { Ok(()) }
}

/// What one timed run of one or more processes started together did.
pub struct Timed {
    /// The exit status of each command.
    pub statuses: Vec<ExitStatus>,
    /// Seconds from the first start to the last exit, on the monotonic clock.
    pub wall: f64,
    /// User and system CPU seconds of all the commands together.
    pub cpu: f64,
    pub stdouts: Vec<String>,
    pub stderrs: Vec<String>,
}

impl Timed {
    /// The first command that failed, if any.
    pub fn first_failure(&self) -> Option<usize> {
        self.statuses.iter().position(|s| !s.success())
    }
}

/// A child's exit status as a number, the way a shell shows it (128 + signal).
pub fn status_code(status: &ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Starts every command at once (their output into `dir/TAG.N.out` and `.err`) and
/// waits for all of them. A stop signal during the run stops them and gives
/// `Err(Stop::Interrupted)`.
pub fn timed(cmds: &[Vec<String>], dir: &Path, tag: &str) -> Result<Timed, Stop> {
    let files = |i: usize, ext: &str| dir.join(format!("{tag}.{i}.{ext}"));
    let cpu_before = children_cpu();
    let start = Instant::now();
    let mut children = Running(Vec::new());
    for (i, cmd) in cmds.iter().enumerate() {
        let (Some(program), Ok(out), Ok(err)) =
            (cmd.first(), File::create(files(i, "out")), File::create(files(i, "err")))
        else {
            return Err(Stop::failed(format!(
                "cannot start {cmd:?} (no command, or no output file in {})",
                dir.display()
            )));
        };
        let child = Command::new(program)
            .args(&cmd[1..])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| Stop::failed(format!("cannot start {program}: {e}")))?;
        TIMED.lock().unwrap_or_else(|e| e.into_inner()).push(Pid::from_raw(child.id() as i32));
        children.0.push(child);
    }
    for child in &children.0 {
        wait_exited(child)?;
    }
    let wall = start.elapsed().as_secs_f64();
    let mut statuses = Vec::new();
    for mut child in children.0.drain(..) {
        let mut timed = TIMED.lock().unwrap_or_else(|e| e.into_inner());
        timed.retain(|&p| p.as_raw() != child.id() as i32);
        statuses.push(child.wait().map_err(|e| Stop::failed(format!("cannot reap a copy process: {e}")))?);
    }
    let cpu = children_cpu() - cpu_before;
    check()?;
    let read = |i: usize, ext: &str| std::fs::read_to_string(files(i, ext)).unwrap_or_default();
    Ok(Timed {
        statuses,
        wall,
        cpu,
        stdouts: (0..cmds.len()).map(|i| read(i, "out")).collect(),
        stderrs: (0..cmds.len()).map(|i| read(i, "err")).collect(),
    })
}

/// Started processes that must not outlive an early return: killed and reaped when
/// dropped with any left.
struct Running(Vec<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let mut timed = TIMED.lock().unwrap_or_else(|e| e.into_inner());
            timed.retain(|&p| p.as_raw() != child.id() as i32);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until `child` has exited, without reaping it (so that its pid stays ours).
fn wait_exited(child: &Child) -> Result<(), Stop> {
    let pid = Pid::from_raw(child.id() as i32);
    loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Stop::failed(format!("cannot wait for process {pid}: {e}"))),
        }
    }
}

/// Clock ticks per second in /proc: USER_HZ, which Linux fixes at 100 for user space.
const TICKS: f64 = 100.0;

/// User and system CPU seconds of a running process, from /proc.
pub fn process_cpu(pid: u32) -> Option<f64> {
    stat_seconds(&pid.to_string(), 11)
}

/// The sum of the two clock-tick fields of `/proc/PID/stat` that start at
/// `first` (counted after the command name), in seconds.
fn stat_seconds(pid: &str, first: usize) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it may not.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let a: f64 = fields.get(first)?.parse().ok()?;
    let b: f64 = fields.get(first + 1)?.parse().ok()?;
    Some((a + b) / TICKS)
}

/// CPU seconds all CPUs spent busy since boot: everything but idle and iowait.
pub fn system_busy() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<f64> = stat.lines().next()?.split_whitespace().skip(1).map_while(|x| x.parse().ok()).collect();
    let busy: f64 = v.get(..8)?.iter().sum::<f64>() - v[3] - v[4];
    Some(busy / TICKS)
}

/// User and system CPU seconds of this process.
pub fn own_cpu() -> f64 {
    stat_seconds("self", 11).unwrap_or(0.0)
}

/// User and system CPU seconds of this process's reaped children (cutime, cstime).
fn children_cpu() -> f64 {
    stat_seconds("self", 13).unwrap_or(0.0)
}

/// Whether `program` is an executable file on PATH.
pub fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .any(|d| std::fs::metadata(d.join(program)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}
