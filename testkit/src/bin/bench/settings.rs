//! The command line of `scripts/bench`, and the settings it resolves to (sizes
//! chosen, defaults applied, every value checked).

use clap::Parser;
use clap::error::ErrorKind;

const EXAMPLES: &str = "examples:
  scripts/bench                       # all scenarios, 5 runs each (~5 min on 2 cores)
  scripts/bench --quick               # smoke run, small sizes, 1 run
  scripts/bench dense latency --runs 3
  scripts/bench daemon                # one daemon job of 4 disks vs 4 x nbdcopy, 4 x blockrepl copy
  scripts/bench daemon --disks 8 --daemon-size 512M --runs 7
  scripts/bench load                  # 1,000 small jobs, 2 daemons on one database (only when named)
  scripts/bench load --jobs 10000 --daemons 1
  scripts/bench load --steady 16K --load-size 64M   # 1,000 jobs running at once
  scripts/bench dense --blockrepl-args= --blockrepl-args='--connections 2' --nbdcopy-args='-C 4'";

/// Benchmark `blockrepl copy` (and, in the daemon scenario, `blockrepl serve` with a
/// private MariaDB) against `nbdcopy --flush` on the same nbdkit servers.
#[derive(Parser, Debug)]
#[command(name = "scripts/bench", bin_name = "scripts/bench", after_help = EXAMPLES)]
pub struct Options {
    /// Scenarios to run (default: all of dense, sparse, sparse-zero, latency,
    /// wan-25ms-1gbit, wan-50ms-10gbit, slow-extents, daemon; daemon is skipped with a note when MariaDB is not installed and it
    /// was not named; load runs only when named)
    #[arg(value_name = "SCENARIO")]
    pub scenarios: Vec<String>,
    /// Timed runs per tool and scenario (default 5; 1 with --quick)
    #[arg(long)]
    runs: Option<u32>,
    /// Untimed runs of each tool first (default 1; 0 with --quick): fills the memory
    /// target's pages
    #[arg(long)]
    warmup: Option<u32>,
    /// Smoke run: small sizes, 1 run, no warm-up
    #[arg(long)]
    quick: bool,
    /// Default 4G (256M with --quick)
    #[arg(long, value_parser = parse_size)]
    dense_size: Option<u64>,
    /// Default 64G (4G with --quick)
    #[arg(long, value_parser = parse_size)]
    sparse_size: Option<u64>,
    /// sparse-random percent=
    #[arg(long, default_value_t = 3)]
    sparse_percent: u32,
    /// sparse-random seed=
    #[arg(long, default_value_t = 4242)]
    seed: u64,
    /// Default 2G (256M with --quick)
    #[arg(long, value_parser = parse_size)]
    latency_size: Option<u64>,
    /// WAN scenarios (wan-25ms-1gbit, wan-50ms-10gbit): default 1G (256M with --quick)
    #[arg(long, value_parser = parse_size)]
    wan_size: Option<u64>,
    /// slow-extents scenario: size of the source (sparse-random, 50 %); default
    /// 4G (1G with --quick)
    #[arg(long, value_parser = parse_size)]
    extents_size: Option<u64>,
    /// slow-extents scenario: nbdkit's delay-extents, added to every
    /// block-status query (each answered for at most 4 MiB)
    #[arg(long, default_value = "20ms")]
    extents_delay: String,
    /// Latency scenario: delay per request, nbdkit syntax
    #[arg(long, default_value = "2ms")]
    delay: String,
    /// Latency scenario: delay only the source's reads
    #[arg(long)]
    no_write_delay: bool,
    /// Daemon scenario: disks in the job
    #[arg(long, default_value_t = 4)]
    disks: u32,
    /// Daemon scenario: size of each disk (default 1G; 256M with --quick)
    #[arg(long, value_parser = parse_size)]
    daemon_size: Option<u64>,
    /// Daemon scenario: sparse-random percent= of each source (100 = pattern
    /// plugin, fully allocated); seeds --seed, --seed+1, ...
    #[arg(long, default_value_t = 50)]
    daemon_percent: u32,
    /// Daemon scenario: the daemon's discovery.interval
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    discovery_interval: String,
    /// Daemon scenario: the daemon's copy.max_concurrent_disks (default: the
    /// daemon's, 8)
    #[arg(long, value_name = "N")]
    max_concurrent_disks: Option<u32>,
    /// Load scenario: jobs queued at once (one small disk each)
    #[arg(long, default_value_t = 1000)]
    jobs: u32,
    /// Load scenario: daemons on the one database
    #[arg(long, default_value_t = 2)]
    daemons: u32,
    /// Load scenario: size of each job's disk (sparse-random, 50 %)
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    load_size: u64,
    /// Load scenario, steady state: run every job at once, each limited to RATE
    /// bytes/s (e.g. 16K, with --load-size 64M), and count the statements the
    /// daemons make per second once all are running, instead of draining
    #[arg(long, value_parser = parse_size, value_name = "RATE")]
    steady: Option<u64>,
    /// Daemon scenario: POST /api/v1/discover on the admin socket after each INSERT,
    /// so that the job does not wait for the next discovery tick
    #[arg(long)]
    kick: bool,
    /// blockrepl binary to use (default: the release build next to this program,
    /// which scripts/bench builds)
    #[arg(long, value_name = "PATH")]
    pub blockrepl: Option<String>,
    /// Do not run cargo build; use the existing release binaries (scripts/bench
    /// reads it)
    #[arg(long)]
    pub no_build: bool,
    /// Extra arguments for blockrepl copy (one shell-quoted string; write
    /// --blockrepl-args=--verify when it starts with a dash); repeat it to compare
    /// several settings in the same rounds ('' = defaults)
    #[arg(long, value_name = "ARGS")]
    pub blockrepl_args: Vec<String>,
    /// Extra arguments for nbdcopy (one shell-quoted string, --nbdcopy-args=-C1 form)
    #[arg(long, default_value = "", hide_default_value = true, value_name = "ARGS")]
    pub nbdcopy_args: String,
    /// Keep the temporary directory (logs, outputs)
    #[arg(long)]
    pub keep_tmp: bool,
    /// Show the tools' stderr
    #[arg(short, long)]
    pub verbose: bool,
}

/// The settings every scenario reads.
#[derive(Debug, Clone)]
pub struct Settings {
    pub runs: u32,
    pub warmup: u32,
    pub dense_size: u64,
    pub sparse_size: u64,
    pub sparse_percent: u32,
    pub seed: u64,
    pub latency_size: u64,
    pub wan_size: u64,
    pub extents_size: u64,
    pub extents_delay: String,
    pub delay: String,
    pub no_write_delay: bool,
    pub disks: u32,
    pub daemon_size: u64,
    pub daemon_percent: u32,
    pub discovery_interval: String,
    /// `discovery_interval` in seconds.
    pub interval_seconds: f64,
    pub max_concurrent_disks: Option<u32>,
    pub kick: bool,
    pub jobs: u32,
    pub daemons: u32,
    pub load_size: u64,
    /// The steady-state load run's per-job rate (see `load.rs`).
    pub steady: Option<u64>,
    pub verbose: bool,
}

impl Options {
    /// The settings, or a usage error (exit status 2, as for any usage error).
    pub fn settings(&self) -> Settings {
        let size =
            |given: Option<u64>, normal: u64, quick: u64| given.unwrap_or(if self.quick { quick } else { normal });
        let runs = self.runs.unwrap_or(if self.quick { 1 } else { 5 });
        if runs < 1 {
            usage("--runs must be >= 1 and --warmup >= 0");
        }
        if !(1..=100).contains(&self.sparse_percent) {
            usage("--sparse-percent must be in 1..100");
        }
        if !(1..=100).contains(&self.daemon_percent) {
            usage("--daemon-percent must be in 1..100");
        }
        if self.disks < 1 {
            usage("--disks must be >= 1");
        }
        if self.jobs < 1 || self.daemons < 1 || self.load_size < 4096 {
            usage("--jobs and --daemons must be >= 1, --load-size >= 4K");
        }
        if self.steady == Some(0) {
            usage("--steady must be a rate above 0");
        }
        if self.max_concurrent_disks == Some(0) {
            usage("--max-concurrent-disks must be >= 1");
        }
        let interval_seconds = match parse_duration(&self.discovery_interval) {
            Ok(s) if s > 0.0 => s,
            Ok(_) => usage("--discovery-interval: must be > 0"),
            Err(e) => usage(&format!("--discovery-interval: {e}")),
        };
        Settings {
            runs,
            warmup: self.warmup.unwrap_or(if self.quick { 0 } else { 1 }),
            dense_size: size(self.dense_size, 4 << 30, 256 << 20),
            sparse_size: size(self.sparse_size, 64 << 30, 4 << 30),
            sparse_percent: self.sparse_percent,
            seed: self.seed,
            latency_size: size(self.latency_size, 2 << 30, 256 << 20),
            wan_size: size(self.wan_size, 1 << 30, 256 << 20),
            extents_size: size(self.extents_size, 4 << 30, 1 << 30),
            extents_delay: self.extents_delay.clone(),
            delay: self.delay.clone(),
            no_write_delay: self.no_write_delay,
            disks: self.disks,
            daemon_size: size(self.daemon_size, 1 << 30, 256 << 20),
            daemon_percent: self.daemon_percent,
            discovery_interval: self.discovery_interval.clone(),
            interval_seconds,
            max_concurrent_disks: self.max_concurrent_disks,
            kick: self.kick,
            jobs: self.jobs,
            daemons: self.daemons,
            load_size: self.load_size,
            steady: self.steady,
            verbose: self.verbose,
        }
    }
}

/// Prints a usage error the way clap does and exits with status 2.
pub fn usage(msg: &str) -> ! {
    use clap::CommandFactory;
    Options::command().error(ErrorKind::ValueValidation, msg).exit()
}

/// `512M`, `4G`, `4GiB`, `1024` (bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("bad size '{text}' (e.g. 512M, 4G)");
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..digits].parse().map_err(|_| bad())?;
    let rest = t[digits..].trim_start().to_ascii_uppercase();
    let (unit, suffix) = rest.split_at(rest.chars().next().filter(|c| "KMGT".contains(*c)).map_or(0, |_| 1));
    if !["", "B", "IB", "I"].contains(&suffix) {
        return Err(bad());
    }
    let shift = match unit {
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => 0,
    };
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// A size the way nbdkit takes it: `4G` when it is a whole number of a unit.
pub fn human(n: u64) -> String {
    for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

/// `1s`, `500ms`, `1.5`, `2m`, `1h` in seconds.
pub fn parse_duration(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let end = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let scale = match t[end..].trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("bad duration '{text}' (e.g. 1s, 500ms)")),
    };
    let n: f64 = t[..end].parse().map_err(|_| format!("bad duration '{text}' (e.g. 1s, 500ms)"))?;
    Ok(n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_the_python_bench_did() {
        for (text, want) in
            [("512M", Some(512 << 20)), ("4G", Some(4 << 30)), ("4GiB", Some(4 << 30)), ("4gb", Some(4 << 30))]
        {
            assert_eq!(parse_size(text).ok(), want, "{text}");
        }
        for (text, want) in [("1024", Some(1024)), (" 2 K ", Some(2048)), ("4X", None), ("G", None), ("1.5G", None)] {
            assert_eq!(parse_size(text).ok(), want, "{text}");
        }
        assert_eq!(human(4 << 30), "4G");
        assert_eq!(human(1536 << 20), "1536M");
        assert_eq!(human(1000), "1000");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("1s"), Ok(1.0));
        assert_eq!(parse_duration("500ms"), Ok(0.5));
        assert_eq!(parse_duration("2m"), Ok(120.0));
        assert_eq!(parse_duration("1.5"), Ok(1.5));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("1d").is_err());
    }
}
