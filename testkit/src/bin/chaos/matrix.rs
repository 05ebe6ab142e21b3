//! The NBD fault matrix (scenario `matrix`): one job of one 32 MiB disk per
//! cell, each cell once, on one daemon and one database. The source is a file
//! with data, holes and written zeros; the target a file that starts full of
//! 0xa5, so that a missing write or zero shows.
//!
//! Cells: source read errors (1, 10, 100 %; EIO and EPERM), source block-status
//! errors, target write and zero errors (1 and 100 %; EIO and ENOSPC), flushes
//! that fail once (dropping what was not flushed, as Linux's fsync does after
//! a writeback error) or always, a source and a target killed and started
//! again mid-copy, a source that never answers a read, a target that stops
//! answering mid-copy (nbdkit's pause filter). The cells without a mid-copy
//! action run together (the daemon copies 8 disks at a time), the others one
//! after the other.
//!
//! Each cell is judged: completed with identical bytes, or failed with one
//! line naming the disk, the server and (for a data request) the offset. A
//! `completed` with different data is a false success; a failure where the
//! cell must complete (transient errors within the retry budget), a completion
//! where it must fail, or an error line that does not name what failed is
//! wrong. The time to give up (or to complete) is the job's `started_at` to
//! `completed_at`.
//!
//! The daemon's retry budget is shortened (6 attempts, 100 ms doubling to 1 s:
//! about 2.5 s) and so is its stall timeout (6 s instead of 5 min); requests are
//! 64 KiB so that a 1 % rate meets a few errors.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use testkit::faulty::{FileTarget, Flush};
use testkit::harness::{Daemon, Server, file_checksum, logged, tempdir, wait_until};
use testkit::jobs::{JOB_DEADLINE, job, one, queue};
use testkit::mariadb::server;

use crate::image::{Rng, write_image};
use crate::{Round, Tally, Verdict, wait_terminal};

const SIZE: u64 = 32 << 20;
const STALL: &str = "6s";

/// Which server a failure must name.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    Source,
    Target,
}

#[derive(Clone, Copy, PartialEq)]
enum Expect {
    Complete,
    Fail,
    /// A permanent error at a low rate: failed if one was met, else completed.
    Either,
}

#[derive(Clone, Copy, PartialEq)]
enum During {
    Nothing,
    RestartSource,
    RestartTarget,
    PauseTarget,
}

enum Dst {
    /// nbdkit's file plugin with these filters and parameters.
    File(Vec<String>, Vec<String>),
    /// A [`FileTarget`] `sh` plugin.
    Sh(Flush),
}

struct Cell {
    name: String,
    /// Filters and parameters of the source.
    src: (Vec<String>, Vec<String>),
    dst: Dst,
    during: During,
    expect: Expect,
    /// The server a failure names, and whether it names an offset.
    side: Side,
    offset: bool,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn cells() -> Vec<Cell> {
    let plain = || Dst::File(vec![], vec![]);
    let mut cells = Vec::new();
    for (errno, permanent) in [("EIO", false), ("EPERM", true)] {
        for rate in [1, 10, 100] {
            cells.push(Cell {
                name: format!("source read {errno} {rate}%"),
                src: (
                    strings(&["--filter=error"]),
                    vec![format!("error={errno}"), format!("error-pread-rate={rate}%")],
                ),
                dst: plain(),
                during: During::Nothing,
                expect: match (permanent, rate) {
                    (_, 100) => Expect::Fail,
                    (true, _) => Expect::Either,
                    (false, _) => Expect::Complete,
                },
                side: Side::Source,
                offset: true,
            });
        }
    }
    for rate in [10, 100] {
        cells.push(Cell {
            name: format!("source block-status EIO {rate}%"),
            src: (strings(&["--filter=error"]), vec!["error=EIO".into(), format!("error-extents-rate={rate}%")]),
            dst: plain(),
            during: During::Nothing,
            expect: Expect::Complete,
            side: Side::Source,
            offset: false,
        });
    }
    for op in ["pwrite", "zero"] {
        for (errno, permanent) in [("EIO", false), ("ENOSPC", true)] {
            for rate in [1, 100] {
                let what = if op == "pwrite" { "write" } else { "zero" };
                cells.push(Cell {
                    name: format!("target {what} {errno} {rate}%"),
                    src: (vec![], vec![]),
                    dst: Dst::File(
                        strings(&["--filter=error"]),
                        vec![format!("error={errno}"), format!("error-{op}-rate={rate}%")],
                    ),
                    during: During::Nothing,
                    expect: match (permanent, rate) {
                        (_, 100) => Expect::Fail,
                        (true, _) => Expect::Either,
                        (false, _) => Expect::Complete,
                    },
                    side: Side::Target,
                    offset: true,
                });
            }
        }
    }
    let flush = |name: &str, f: Flush, expect| Cell {
        name: name.to_string(),
        src: (vec![], vec![]),
        dst: Dst::Sh(f),
        during: During::Nothing,
        expect,
        side: Side::Target,
        offset: false,
    };
    cells.push(flush("flush fails once, drops unflushed", Flush::DropsWritesAt(1), Expect::Complete));
    cells.push(flush("flush EIO always", Flush::AlwaysFails("EIO"), Expect::Fail));
    cells.push(flush("flush ENOSPC always", Flush::AlwaysFails("ENOSPC"), Expect::Fail));
    cells.push(Cell {
        name: "source never answers a read".into(),
        src: (strings(&["--filter=delay"]), strings(&["delay-read=120"])),
        dst: plain(),
        during: During::Nothing,
        expect: Expect::Fail,
        side: Side::Source,
        offset: true,
    });
    for (name, during, side) in [
        ("source killed and restarted mid-copy", During::RestartSource, Side::Source),
        ("target killed and restarted mid-copy", During::RestartTarget, Side::Target),
        ("target stops answering mid-copy", During::PauseTarget, Side::Target),
    ] {
        cells.push(Cell {
            name: name.into(),
            // Slow enough that "mid-copy" lasts a while.
            src: (strings(&["--filter=rate"]), strings(&["rate=48M"])), // bits a second
            dst: if during == During::PauseTarget { Dst::File(strings(&["--filter=pause"]), vec![]) } else { plain() },
            during,
            expect: if during == During::PauseTarget { Expect::Fail } else { Expect::Complete },
            side,
            offset: during == During::PauseTarget,
        });
    }
    cells
}

/// One cell's servers and job.
struct Running {
    cell: Cell,
    id: String,
    src: Server,
    src_log: PathBuf,
    dst: Target,
    /// The target's request log (file targets).
    dst_log: PathBuf,
    pause_socket: PathBuf,
}

enum Target {
    Nbdkit(Server, PathBuf),
    Sh(FileTarget),
}

impl Target {
    fn uri(&self) -> String {
        match self {
            Target::Nbdkit(s, _) => s.uri(),
            Target::Sh(t) => t.uri(),
        }
    }

    fn file(&self) -> &Path {
        match self {
            Target::Nbdkit(_, f) => f,
            Target::Sh(t) => &t.file,
        }
    }
}

pub fn run(rng: &mut Rng) -> Tally {
    let mut tally = Tally { failures_expected: true, ..Tally::default() };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| matrix(rng, &mut tally)));
    if let Err(e) = outcome {
        tally.gave_up("matrix", e);
    }
    tally
}

fn matrix(rng: &mut Rng, tally: &mut Tally) {
    let dir = tempdir();
    let d = dir.path();
    let db = server().fresh_database("chaos_matrix");
    let source = d.join("source.img");
    write_image(&source, SIZE, rng);
    let daemon_dir = d.join("daemon");
    std::fs::create_dir_all(&daemon_dir).unwrap();
    let mut daemon = Daemon::start(
        &daemon_dir,
        &db.url,
        &[
            ("BLOCKREPL__WATCHDOG__STALL_TIMEOUT", STALL),
            ("BLOCKREPL__COPY__RETRY_ATTEMPTS", "6"),
            ("BLOCKREPL__COPY__RETRY_INITIAL_DELAY", "100ms"),
            ("BLOCKREPL__COPY__RETRY_MAX_DELAY", "1s"),
            ("BLOCKREPL__COPY__REQUEST_SIZE", "64K"),
        ],
    );
    let (passive, active): (Vec<Cell>, Vec<Cell>) = cells().into_iter().partition(|c| c.during == During::Nothing);

    // The passive cells together.
    let running: Vec<Running> = passive.into_iter().enumerate().map(|(i, c)| start(d, &source, i, c)).collect();
    for r in &running {
        queue(&db, &r.id, &[("disk-m", r.src.uri(), r.dst.uri())]);
    }
    for r in running {
        let ended = wait_terminal(&db, &r.id, &mut daemon, &mut [], &mut []);
        judge(&db, &source, r, ended, tally);
    }
    // The others one by one.
    for (i, c) in active.into_iter().enumerate() {
        let mut r = start(d, &source, 100 + i, c);
        queue(&db, &r.id, &[("disk-m", r.src.uri(), r.dst.uri())]);
        let enough = 40; // 64 KiB requests: 2.5 MiB into the copy
        match r.cell.during {
            During::RestartSource => {
                wait_until("reads from the source", JOB_DEADLINE, || logged(&r.src_log, "Read").len() >= enough);
                r.src.kill();
                r.src.start();
            }
            During::RestartTarget => {
                wait_until("writes to the target", JOB_DEADLINE, || logged(&r.dst_log, "Write").len() >= enough);
                if let Target::Nbdkit(s, _) = &mut r.dst {
                    s.kill();
                    s.start();
                }
            }
            During::PauseTarget => {
                wait_until("writes to the target", JOB_DEADLINE, || logged(&r.dst_log, "Write").len() >= enough);
                control(&r.pause_socket, b'p');
            }
            During::Nothing => {}
        }
        let ended = wait_terminal(&db, &r.id, &mut daemon, &mut [], &mut []);
        if r.cell.during == During::PauseTarget {
            control(&r.pause_socket, b'r');
        }
        judge(&db, &source, r, ended, tally);
    }
    if let Some(exit) = daemon.exited() {
        tally.add(
            "matrix",
            Round {
                verdict: Verdict::Crash(format!("the daemon exited ({exit})")),
                reread: 0,
                recover: Duration::ZERO,
            },
        );
    }
}

fn start(d: &Path, source: &Path, i: usize, cell: Cell) -> Running {
    let home = d.join(format!("cell{i}"));
    std::fs::create_dir_all(&home).unwrap();
    let src_log = home.join("src.log");
    let dst_log = home.join("dst.log");
    let pause_socket = home.join("pause.sock");
    let mut args: Vec<String> = strings(&["-r", "--filter=log"]);
    args.extend(cell.src.0.iter().cloned());
    args.push("file".into());
    args.push(format!("file={}", source.display()));
    args.extend(cell.src.1.iter().cloned());
    args.push(format!("logfile={}", src_log.display()));
    args.push("logappend=true".into());
    let src = Server::nbdkit(&home, "src", &args.iter().map(String::as_str).collect::<Vec<_>>());
    let dst = match &cell.dst {
        Dst::Sh(flush) => Target::Sh(FileTarget::start(&home, "dst", SIZE as usize, *flush)),
        Dst::File(filters, params) => {
            let file = home.join("target.img");
            std::fs::write(&file, vec![0xa5u8; SIZE as usize]).unwrap();
            let mut args: Vec<String> = strings(&["--filter=log"]);
            args.extend(filters.iter().cloned());
            args.push("file".into());
            args.push(format!("file={}", file.display()));
            args.extend(params.iter().cloned());
            args.push(format!("logfile={}", dst_log.display()));
            args.push("logappend=true".into());
            if cell.during == During::PauseTarget {
                args.push(format!("pause-control={}", pause_socket.display()));
            }
            Target::Nbdkit(Server::nbdkit(&home, "dst", &args.iter().map(String::as_str).collect::<Vec<_>>()), file)
        }
    };
    Running { cell, id: format!("job-cell-{i}"), src, src_log, dst, dst_log, pause_socket }
}

/// Sends a command to nbdkit's pause filter and waits (a little) for its echo.
fn control(socket: &Path, command: u8) {
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("cannot reach the pause filter at {}: {e}", socket.display()));
    s.write_all(&[command]).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let _ = s.read(&mut [0u8; 1]);
}

fn judge(db: &testkit::mariadb::TestDb, source: &Path, r: Running, ended: Result<String, String>, tally: &mut Tally) {
    let c = &r.cell;
    let took = one(
        db,
        &format!(
            "SELECT CAST(TIMESTAMPDIFF(MICROSECOND, started_at, completed_at) / 1e6 AS CHAR) AS v \
             FROM replication_jobs WHERE id = '{}'",
            r.id
        ),
    )
    .and_then(|v| v.parse::<f64>().ok())
    .map_or(Duration::ZERO, Duration::from_secs_f64);
    let message = job(db, &r.id, "error_message").unwrap_or_default();
    let server = match c.side {
        Side::Source => r.src.uri(),
        Side::Target => r.dst.uri(),
    };
    let (verdict, outcome) = match ended {
        Err(m) => (Verdict::Stuck(format!("{}: {m}", c.name)), "stuck".to_string()),
        Ok(status) if status == "completed" => {
            let same = file_checksum(source) == file_checksum(r.dst.file());
            if !same {
                (
                    Verdict::FalseSuccess(format!("{}: completed, but the target differs", c.name)),
                    "FALSE SUCCESS".into(),
                )
            } else if c.expect == Expect::Fail {
                (Verdict::Wrong(format!("{}: completed where it cannot", c.name)), "completed?!".into())
            } else {
                (Verdict::Identical, "completed, identical".into())
            }
        }
        Ok(status) => {
            let mut missing = Vec::new();
            if !message.contains("disk-m") {
                missing.push("the disk");
            }
            if !message.contains(&server) {
                missing.push(if c.side == Side::Source { "the source" } else { "the target" });
            }
            if c.offset && !message.contains("offset") {
                missing.push("the offset");
            }
            if message.contains('\n') {
                missing.push("one line");
            }
            let outcome = format!("{status} after {:.1} s: {message}", took.as_secs_f64());
            if c.expect == Expect::Complete {
                (Verdict::Wrong(format!("{}: {outcome}", c.name)), outcome)
            } else if !missing.is_empty() {
                (Verdict::Wrong(format!("{}: the error line lacks {}: {message}", c.name, missing.join(", "))), outcome)
            } else {
                (Verdict::FailedCleanly(format!("{}: {message}", c.name)), outcome)
            }
        }
    };
    tally.notes.push(format!("{:<40} {outcome}", c.name));
    tally.add(&c.name, Round { verdict, reread: 0, recover: took });
}
