//! The operator's commands that talk to a running daemon over its admin socket:
//! `health`, `jobs`, `show`, `progress`, `submit`, `cancel`, `limit`, `discover`, `watch`.
//!
//! Each command makes one or a few requests with `admin::client` and prints the
//! answer for people (tables, progress bars) or, with `--json`, as the daemon's
//! JSON. What is valid is the daemon's to decide: `submit` sends the file as it
//! is, so the CLI and `curl` get the same answers. A daemon error comes back as
//! one line with its message and code; `main` prints it and exits non-zero.

use std::io::{IsTerminal, Read};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Serialize;

use crate::admin::client::{Client, ClientError};
use crate::admin::wire::*;

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Show whether the daemon and its database are healthy (exit 1 when degraded)
    Health {
        /// Print the daemon's JSON
        #[arg(long)]
        json: bool,
    },
    /// List jobs, newest first
    Jobs {
        /// Only jobs in this status (Queued, Streaming, Succeeded, ..., or the database's pending, completed, ...)
        #[arg(long, value_name = "STATUS")]
        status: Option<String>,
        /// At most this many jobs
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: u32,
        /// Print the daemon's JSON
        #[arg(long)]
        json: bool,
    },
    /// Show one job with its disks and recent events
    Show {
        /// Job id or nbd_export_name
        job: String,
        /// Print the daemon's JSON
        #[arg(long)]
        json: bool,
    },
    /// Show a job's progress
    Progress {
        /// Job id or nbd_export_name
        job: String,
        /// Print the daemon's JSON
        #[arg(long)]
        json: bool,
    },
    /// Submit a job described in JSON (see README.md, "Admin API")
    Submit {
        /// The JSON file, or '-' for standard input
        file: String,
        /// Print the daemon's JSON
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job
    Cancel {
        /// Job id
        job: String,
        /// Print the daemon's JSON
        #[arg(long)]
        json: bool,
    },
    /// Set a job's bandwidth limit: `limit JOB RATE`, or `limit --all RATE` for
    /// every job this daemon runs. RATE: bytes read per second, binary units
    /// (200M, 1G, 512K), or 0 for none. Running copies follow within a second
    Limit {
        /// Every job this daemon runs now, instead of one
        #[arg(long)]
        all: bool,
        /// JOB RATE, or RATE with --all
        #[arg(value_name = "JOB RATE", num_args = 1..=2, required = true, allow_negative_numbers = true)]
        args: Vec<String>,
        /// Print the daemon's JSON
        #[arg(long)]
        json: bool,
    },
    /// Ask the daemon to look for jobs now
    Discover {
        /// Print the daemon's JSON
        #[arg(long)]
        json: bool,
    },
    /// Follow a job until it ends: exit 0 when it succeeds, 1 when it fails or is cancelled
    Watch {
        /// Job id or nbd_export_name
        job: String,
        /// Print the progress JSON once a second, one document per line
        #[arg(long)]
        json: bool,
    },
}

/// Characters left alone in a path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

fn seg(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// The daemon's JSON with `--json`, else the line for people.
fn print_either<T: Serialize>(json: bool, v: &T, line: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
    if json {
        return print_json(v);
    }
    println!("{}", line(v));
    Ok(())
}

pub fn run(cmd: AdminCommand, socket: &std::path::Path) -> anyhow::Result<()> {
    match cmd {
        AdminCommand::Health { json } => health(&Client::new(socket), json),
        AdminCommand::Jobs { status, limit, json } => jobs(&Client::new(socket), status, limit, json),
        AdminCommand::Show { job, json } => show(&Client::new(socket), &job, json),
        AdminCommand::Progress { job, json } => {
            let p: Progress = Client::new(socket).get(&format!("{API}/progress/{}", seg(&job)))?;
            if json { print_json(&p) } else { print_progress(&p) }
        }
        AdminCommand::Submit { file, json } => submit(&Client::new(socket), &file, json),
        AdminCommand::Cancel { job, json } => {
            let r: CancelResponse = Client::new(socket).post(&format!("{API}/jobs/{}/cancel", seg(&job)), b"")?;
            print_either(json, &r, |r| format!("{}: {}", r.job_id, r.message))
        }
        AdminCommand::Limit { all, args, json } => limit(&Client::new(socket), all, &args, json),
        AdminCommand::Discover { json } => {
            let r: DiscoverResponse = Client::new(socket).post(&format!("{API}/discover"), b"")?;
            print_either(json, &r, |r| r.message.clone())
        }
        AdminCommand::Watch { job, json } => watch(&Client::new(socket), &job, json),
    }
}

fn limit(c: &Client, all: bool, args: &[String], json: bool) -> anyhow::Result<()> {
    let (path, rate) = match (all, args) {
        (true, [rate]) => (format!("{API}/limit"), rate),
        (false, [job, rate]) => (format!("{API}/jobs/{}/limit", seg(job)), rate),
        (true, _) => bail!("limit --all takes one argument, the rate (e.g. limit --all 200M)"),
        (false, _) => bail!("limit takes a job and a rate (e.g. limit job-123 200M), or --all and a rate"),
    };
    // The daemon judges the rate, so the CLI and curl get the same answers.
    let body = serde_json::to_vec(&serde_json::json!({ "max_rate": rate }))?;
    let r: LimitResponse = c.post(&path, &body)?;
    print_either(json, &r, |r| {
        let shown = if r.max_rate == 0 { "no limit".to_string() } else { format!("limit {}", rate_shown(r.max_rate)) };
        if r.jobs.is_empty() {
            return "no jobs run here; nothing changed".into();
        }
        r.jobs
            .iter()
            .map(|j| {
                let when =
                    if r.running.contains(j) { "running copies follow within a second" } else { "not running here" };
                format!("{j}: {shown} ({when})")
            })
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// A limit for people: "4.00 MiB/s", "none".
fn rate_shown(bps: u64) -> String {
    if bps == 0 { "none".into() } else { format!("{}/s", HumanBytes(bps)) }
}

fn health(c: &Client, json: bool) -> anyhow::Result<()> {
    let h: Health = c.get(&format!("{API}/health"))?;
    if json {
        print_json(&h)?;
    } else {
        println!("status:      {}", h.status);
        println!("version:     {}", h.version);
        println!("node:        {}", h.node_id);
        println!("database:    {}", if h.database_reachable { "reachable" } else { "UNREACHABLE" });
        println!("backlog:     {} write(s) waiting for the database", h.database_backlog);
        println!("active jobs: {}", h.active_jobs);
        println!(
            "uptime:      {} (since {})",
            humantime::format_duration(Duration::from_secs(h.uptime_seconds)),
            h.started_at
        );
    }
    if !h.database_reachable {
        bail!("daemon degraded: the database does not answer");
    }
    Ok(())
}

fn jobs(c: &Client, status: Option<String>, limit: u32, json: bool) -> anyhow::Result<()> {
    let mut path = format!("{API}/jobs?limit={limit}");
    if let Some(s) = status {
        path.push_str(&format!("&status={}", seg(&s)));
    }
    let list: JobList = c.get(&path)?;
    if json {
        return print_json(&list);
    }
    if list.jobs.is_empty() {
        println!("no jobs");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .jobs
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.status.clone(),
                j.stage.clone().unwrap_or_else(|| "-".into()),
                format!("{:.1}%", j.percent),
                format!("{} / {}", HumanBytes(j.bytes_transferred), HumanBytes(j.total_bytes)),
                rate(j.throughput_bps),
                j.vm_name.clone(),
                j.updated_at.clone(),
            ]
        })
        .collect();
    print_table(&["ID", "STATUS", "STAGE", "PROGRESS", "TRANSFERRED", "RATE", "VM", "UPDATED"], &rows);
    Ok(())
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn rate(bps: u64) -> String {
    if bps == 0 { "-".into() } else { format!("{}/s", HumanBytes(bps)) }
}

fn show(c: &Client, job: &str, json: bool) -> anyhow::Result<()> {
    let d: JobDetail = c.get(&format!("{API}/jobs/{}", seg(job)))?;
    if json {
        return print_json(&d);
    }
    let j = &d.job;
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!("job:         {}", j.id);
    println!("vm:          {} ({})", j.vm_name, opt(&d.vm_path));
    println!("type:        {}", j.replication_type);
    println!("status:      {} ({})", j.status, opt(&j.stage));
    println!(
        "progress:    {:.1}%, {} of {}, {}",
        j.percent,
        HumanBytes(j.bytes_transferred),
        HumanBytes(j.total_bytes),
        rate(j.throughput_bps)
    );
    println!("export:      {}", opt(&j.nbd_export_name));
    println!("owner:       {}", opt(&j.owner_node));
    println!("limit:       {}", j.max_rate.map_or_else(|| "none".into(), rate_shown));
    println!("created:     {}", j.created_at);
    println!("started:     {}", opt(&j.started_at));
    println!("completed:   {}", opt(&j.completed_at));
    if let Some(e) = &j.error {
        println!("error:       {e}");
    }
    println!();
    let rows: Vec<Vec<String>> = d
        .disks
        .iter()
        .map(|k| {
            vec![
                k.disk_id.clone(),
                k.label.clone().unwrap_or_default(),
                k.status.clone(),
                format!("{:.1}%", k.percent),
                format!("{} / {}", HumanBytes(k.bytes_transferred), HumanBytes(k.planned_bytes)),
                k.source.clone(),
                k.target.clone(),
                k.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(&["DISK", "LABEL", "STATUS", "PROGRESS", "TRANSFERRED", "SOURCE", "TARGET", "ERROR"], &rows);
    if !d.events.is_empty() {
        println!();
        println!("recent events (newest first):");
        for e in &d.events {
            let disk = e.disk_id.as_deref().map(|d| format!(" [{d}]")).unwrap_or_default();
            println!("  {} {:<5} {}{disk}: {}", e.at, e.level, e.stage, e.message);
        }
    }
    Ok(())
}

fn eta(remaining: u64, bps: u64) -> String {
    if remaining == 0 {
        "0s".into()
    } else if bps == 0 {
        "-".into()
    } else {
        humantime::format_duration(Duration::from_secs(remaining.div_ceil(bps))).to_string()
    }
}

/// One line for the job, as `progress` and a non-terminal `watch` print it.
fn job_line(p: &Progress) -> String {
    let a = &p.aggregate;
    format!(
        "{} {} ({}) {:.1}% {} of {} {} ETA {}",
        p.job_id,
        p.status,
        p.stage.as_deref().unwrap_or("-"),
        a.percent,
        HumanBytes(a.bytes_transferred),
        HumanBytes(a.total_bytes),
        rate(a.throughput_bps),
        eta(a.total_bytes.saturating_sub(a.bytes_transferred), a.throughput_bps),
    ) + &limit_note(p.max_rate, p.limited)
}

/// ", limit 4.00 MiB/s (limited)" when a limit is in force: the rate and the
/// ETA are then the limit's, not the servers'.
fn limit_note(max_rate: Option<u64>, limited: bool) -> String {
    match max_rate {
        Some(r) if r > 0 => format!(", limit {}{}", rate_shown(r), if limited { " (limited)" } else { "" }),
        _ => String::new(),
    }
}

fn print_progress(p: &Progress) -> anyhow::Result<()> {
    println!("{}", job_line(p));
    for d in &p.disks {
        let label = d.label.as_deref().map(|l| format!(" ({l})")).unwrap_or_default();
        println!(
            "  {}{label} {} {:.1}% {} of {} {}",
            d.id,
            d.status,
            d.percent,
            HumanBytes(d.bytes_transferred),
            HumanBytes(d.planned_bytes),
            rate(d.throughput_bps)
        );
    }
    if let Some(e) = &p.error {
        println!("error: {e}");
    }
    Ok(())
}

fn submit(c: &Client, file: &str, json: bool) -> anyhow::Result<()> {
    let body = if file == "-" {
        let mut v = Vec::new();
        std::io::stdin().read_to_end(&mut v).context("cannot read the job from standard input")?;
        v
    } else {
        std::fs::read(file).with_context(|| format!("cannot read job file {file}"))?
    };
    let r: SubmitResponse = c.post(&format!("{API}/jobs"), &body)?;
    print_either(json, &r, |r| format!("submitted job {}", r.job_id))
}

/// Whether a status word is final, and if so whether it is a success.
fn outcome(status: &str) -> Option<bool> {
    match status {
        "Succeeded" => Some(true),
        "Failed" | "Cancelled" => Some(false),
        _ => None,
    }
}

fn watch(c: &Client, job: &str, json: bool) -> anyhow::Result<()> {
    let path = format!("{API}/progress/{}", seg(job));
    let bars = (!json && std::io::stdout().is_terminal()).then(Bars::new);
    let interval = if bars.is_some() { Duration::from_millis(500) } else { Duration::from_secs(1) };
    let mut next = Instant::now();
    loop {
        let p: Progress = match c.get(&path) {
            Ok(p) => p,
            // The database is away for a moment: keep watching.
            Err(e @ ClientError::Api { .. }) if e.code() == Some("database_unavailable") => {
                if bars.is_none() {
                    eprintln!("blockrepl: {e}; still watching");
                }
                next += interval;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let done = outcome(&p.status);
        match &bars {
            Some(b) => b.update(&p, done.is_some()),
            None if json => println!("{}", serde_json::to_string(&p)?),
            None => println!("{}", job_line(&p)),
        }
        match done {
            Some(true) => return Ok(()),
            Some(false) => {
                let why = p.error.as_deref().unwrap_or("no reason recorded");
                let verb = if p.status == "Cancelled" { "was cancelled" } else { "failed" };
                bail!("job '{}' {verb}: {why}", p.job_id);
            }
            None => {}
        }
        next += interval;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

/// Progress bars on a terminal: one for the job, one per disk.
struct Bars {
    multi: MultiProgress,
    job: ProgressBar,
    disks: std::cell::RefCell<Vec<(String, ProgressBar)>>,
}

impl Bars {
    fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let job = multi.add(ProgressBar::new(0).with_style(Self::style()));
        Self { multi, job, disks: std::cell::RefCell::new(Vec::new()) }
    }

    fn style() -> ProgressStyle {
        ProgressStyle::with_template("{prefix:<24} [{bar:30}] {percent:>3}% {bytes:>10}/{total_bytes:<10} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ")
    }

    fn set(bar: &ProgressBar, planned: u64, done: u64, bps: u64, status: &str, note: &str, finished: bool) {
        // An empty plan is complete once finished; before planning the length is unknown.
        let len = planned.max(1);
        bar.set_length(len);
        bar.set_position(if finished && status == "Succeeded" { len } else { done.min(len) });
        bar.set_message(format!("{} ETA {} {status}{note}", rate(bps), eta(planned.saturating_sub(done), bps)));
    }

    fn update(&self, p: &Progress, finished: bool) {
        let a = &p.aggregate;
        self.job.set_prefix(format!("{} ({})", p.job_id, p.stage.as_deref().unwrap_or("-")));
        let note = limit_note(p.max_rate, p.limited);
        Self::set(&self.job, a.total_bytes, a.bytes_transferred, a.throughput_bps, &p.status, &note, finished);
        let mut disks = self.disks.borrow_mut();
        for d in &p.disks {
            let bar = match disks.iter().find(|(id, _)| *id == d.id) {
                Some((_, b)) => b.clone(),
                None => {
                    let b = self.multi.add(ProgressBar::new(0).with_style(Self::style()));
                    b.set_prefix(format!("  {}", d.label.as_deref().unwrap_or(&d.id)));
                    disks.push((d.id.clone(), b.clone()));
                    b
                }
            };
            let disk_done = finished || outcome(&d.status).is_some();
            Self::set(&bar, d.planned_bytes, d.bytes_transferred, d.throughput_bps, &d.status, "", disk_done);
        }
        if finished {
            self.job.finish();
            for (_, b) in disks.iter() {
                b.finish();
            }
        }
    }
}
