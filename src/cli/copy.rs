//! `blockrepl copy`: one disk, in the foreground, with a progress bar and an
//! optional JSON summary. The interface is scripted by other tools: keep it stable.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::engine::{Changes, Copier, CopyError, CopySpec, Event, Limit, Progress, Snapshot, Tuning, plan};

fn default_tuning() -> Tuning {
    Tuning::default()
}

#[derive(Debug, clap::Args)]
pub struct CopyArgs {
    /// Source NBD URI (nbd://, nbd+unix://, nbds://, nbds+unix://)
    pub source: String,
    /// Target NBD URI
    pub target: String,
    /// Incremental: changed ranges from qemu:dirty-bitmap:NAME on the source
    #[arg(long, value_name = "NAME", conflicts_with = "changed_areas")]
    pub dirty_bitmap: Option<String>,
    /// Incremental: changed ranges from a JSON file [{"start":N,"length":N},...]
    #[arg(long, value_name = "FILE")]
    pub changed_areas: Option<PathBuf>,
    /// The target reads as zeros: skip holes and zero extents
    #[arg(long)]
    pub destination_is_zero: bool,
    /// Keep the target fully allocated: zero requests never punch holes
    /// (for thick-provisioned volumes)
    #[arg(long)]
    pub allocated: bool,
    /// Copy to a target that cannot flush, whose writes are never known to be
    /// durable (refused otherwise)
    #[arg(long)]
    pub allow_no_flush: bool,
    /// Most connections per server, used when both servers advertise multi-conn
    /// [default: one per CPU, at most 4]
    #[arg(long, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub connections: Option<usize>,
    /// Most requests in flight per connection
    #[arg(long, value_name = "N", default_value_t = default_tuning().requests,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub requests: usize,
    /// Largest request in bytes (K, M suffixes allowed; at most 32M)
    #[arg(long, value_name = "BYTES", default_value = "1M", value_parser = crate::config::parse_size)]
    pub request_size: usize,
    /// Most buffer memory for the copy in bytes
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = crate::config::parse_size)]
    pub memory: usize,
    /// Bandwidth limit: bytes read from the source per second (K, M, G
    /// suffixes, binary; 0 = none). Zero requests do not count
    #[arg(long, value_name = "RATE", allow_hyphen_values = true)]
    pub max_rate: Option<String>,
    /// Fail when nothing moves for this long, naming the request that hung
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,
    /// Resume from this durable watermark (byte offset) of an earlier run
    #[arg(long, value_name = "OFFSET", default_value_t = 0)]
    pub resume_from: u64,
    /// Hash-compare source and target over the planned ranges after copying
    #[arg(long)]
    pub verify: bool,
    /// A progress bar on stderr (default when stderr is a terminal)
    #[arg(long)]
    pub progress: bool,
    /// Print a JSON summary on stdout at the end
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct JsonSummary {
    planned_bytes: u64,
    bytes_transferred: u64,
    zeroed_bytes: u64,
    skipped_bytes: u64,
    seconds: f64,
    throughput_bps: u64,
    verified: Option<bool>,
    bytes_written: u64,
    disk_size: u64,
    retries: u64,
    unmapped_bytes: u64,
    flushed: bool,
    planning_seconds: f64,
}

fn changes(args: &CopyArgs) -> anyhow::Result<Changes> {
    if let Some(name) = &args.dirty_bitmap {
        return Ok(Changes::DirtyBitmap(name.clone()));
    }
    if let Some(path) = &args.changed_areas {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read changed-areas file {}", path.display()))?;
        let areas = plan::parse_areas(&text).with_context(|| format!("bad changed-areas file {}", path.display()))?;
        return Ok(Changes::ChangedAreas(areas));
    }
    Ok(Changes::Full)
}

pub fn run(args: CopyArgs) -> anyhow::Result<()> {
    // Parsed here rather than by clap, so a bad rate is one line like every other error.
    let max_rate = match &args.max_rate {
        Some(r) => crate::config::parse_rate(r).map_err(|e| anyhow::anyhow!("--max-rate: {e}"))?,
        None => 0,
    };
    let spec = CopySpec {
        source: args.source.clone(),
        target: args.target.clone(),
        changes: changes(&args)?,
        destination_is_zero: args.destination_is_zero,
        allocated: args.allocated,
        allow_no_flush: args.allow_no_flush,
        resume_from: args.resume_from,
        verify: args.verify,
        tuning: Tuning {
            connections: args.connections.unwrap_or(default_tuning().connections),
            requests: args.requests,
            request_size: args.request_size,
            buffer_bytes: args.memory,
            stall_timeout: Some(args.stall_timeout),
            ..Tuning::default()
        },
        limit: (max_rate > 0).then(|| Limit::new(max_rate)),
    };
    let copier = Copier::new(spec);
    let bar = (args.progress || std::io::stderr().is_terminal()).then(new_bar);

    let cancel = copier.cancel_token();
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .context("cannot install signal handlers")?;
    let signal_handle = signals.handle();
    let (done_tx, done_rx) = mpsc::channel::<()>();

    let result = std::thread::scope(|s| {
        s.spawn(|| {
            if signals.forever().next().is_some() {
                cancel.cancel();
            }
        });
        if let Some(bar) = &bar {
            let progress = copier.progress();
            s.spawn(move || draw_until_done(bar, &progress, &done_rx));
        }
        let on_event = |e: Event| {
            let Some(line) = e.describe() else { return };
            match &bar {
                Some(b) => b.println(line),
                None => eprintln!("blockrepl: {line}"),
            }
        };
        let r = copier.run(&on_event);
        signal_handle.close();
        drop(done_tx);
        r
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let summary = result.map_err(|e| match e {
        CopyError::NoFlush { .. } => anyhow::anyhow!("{e} (--allow-no-flush)"),
        e => e.into(),
    })?;
    if args.json {
        let j = JsonSummary {
            planned_bytes: summary.planned_bytes,
            bytes_transferred: summary.bytes_transferred,
            zeroed_bytes: summary.zeroed_bytes,
            skipped_bytes: summary.skipped_bytes,
            seconds: summary.seconds,
            throughput_bps: summary.throughput_bps,
            verified: summary.verified,
            bytes_written: summary.bytes_written,
            disk_size: summary.disk_size,
            retries: summary.retries,
            unmapped_bytes: summary.unmapped_bytes,
            flushed: summary.flushed,
            planning_seconds: summary.planning_seconds,
        };
        println!("{}", serde_json::to_string(&j)?);
    } else if bar.is_some() {
        eprintln!(
            "copied {} of {} planned in {:.1} s ({}/s){}",
            human_bytes(summary.bytes_transferred),
            human_bytes(summary.planned_bytes),
            summary.seconds,
            human_bytes(summary.throughput_bps),
            if summary.verified == Some(true) { ", verified" } else { "" }
        );
    }
    Ok(())
}

fn new_bar() -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(4));
    let style = ProgressStyle::with_template("{prefix:>9} [{bar:40}] {percent:>3}% {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// Redraws the bar from the engine's own figures (not indicatif's estimates) until
/// the copy ends.
fn draw_until_done(bar: &ProgressBar, progress: &Progress, done: &mpsc::Receiver<()>) {
    loop {
        let s = progress.snapshot();
        // While planning, the bar's end is the most the plan can come to, so that
        // it never moves back (see `Snapshot::percent`).
        let total = (s.planned_bytes + s.unplanned_bytes).max(1);
        bar.set_length(total);
        bar.set_position(s.bytes_done.min(total));
        bar.set_prefix(format!("{:?}", s.stage).to_lowercase());
        bar.set_message(progress_line(&s));
        if done.recv_timeout(Duration::from_millis(250)) != Err(mpsc::RecvTimeoutError::Timeout) {
            return;
        }
    }
}

/// "1.2 GiB / 4.0 GiB  310 MiB/s  ETA 9s", and " (limited)" while the
/// bandwidth limit holds the copy back.
pub fn progress_line(s: &Snapshot) -> String {
    let eta = match s.eta {
        Some(d) => human_duration(d),
        None => "-".into(),
    };
    format!(
        "{} / {}{}  {}/s  ETA {}{}",
        human_bytes(s.bytes_done),
        human_bytes(s.planned_bytes),
        if s.planning() { " planned so far" } else { "" },
        human_bytes(s.throughput_bps),
        eta,
        if s.limited { "  (limited)" } else { "" }
    )
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_duration(Duration::from_secs(59)), "59s");
        assert_eq!(human_duration(Duration::from_secs(61)), "1m01s");
        assert_eq!(human_duration(Duration::from_secs(7260)), "2h01m");
    }
}
