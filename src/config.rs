//! The daemon's settings: `config/blockrepl.toml` (compiled in as the defaults),
//! then the file given with `--config`, then `BLOCKREPL__SECTION__KEY` environment
//! variables. Validation happens here, once, so a wrong setting stops start-up
//! with one line naming the key; the rest of the daemon trusts `Settings`.
//!
//! Durations and sizes are parsed here too (`"30s"`, `"1M"`), for the CLI as well.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::engine::{RetryPolicy, Tuning};

mod windows;
pub use windows::RateWindow;

/// The documented defaults, which are also the shipped configuration file.
pub const DEFAULTS: &str = include_str!("../config/blockrepl.toml");

/// Where `serve` looks when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/blockrepl/blockrepl.toml";

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: Database,
    pub admin: Admin,
    #[serde(default)]
    pub node: Node,
    pub discovery: Discovery,
    pub watchdog: Watchdog,
    pub progress: ProgressSettings,
    pub copy: Copy,
    pub log: Log,
    /// vCenters by name (`[vmware.NAME]`); none by default.
    #[serde(default)]
    pub vmware: std::collections::BTreeMap<String, Vcenter>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Database {
    pub url: String,
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// Longest any statement may take before its connection is cut.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Longest connecting may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub socket: PathBuf,
    pub group: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// `None`: the host name and this machine's id (see [`Settings::node_id`]).
    pub id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Watchdog {
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProgressSettings {
    pub min_percent_step: f64,
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Copy {
    pub max_concurrent_disks: usize,
    /// `None`: the engine's default (one per CPU, at most 4).
    #[serde(default)]
    pub connections: Option<usize>,
    pub requests: usize,
    #[serde(deserialize_with = "size")]
    pub request_size: usize,
    #[serde(deserialize_with = "size")]
    pub memory: usize,
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    pub retry_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub retry_initial_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
    pub verify: bool,
    /// Copy to targets that cannot flush (refused otherwise).
    pub allow_no_flush: bool,
    /// The appliance's bandwidth limit in bytes/s, 0 = none (see `engine::limit`).
    #[serde(default, deserialize_with = "rate")]
    pub max_rate: u64,
    /// Rates in force at times of the week instead of `max_rate`
    /// (`[copy.max_rate_windows]`, see `windows`).
    #[serde(default, deserialize_with = "rate_windows")]
    pub max_rate_windows: Vec<RateWindow>,
}

impl Copy {
    /// The appliance's limit at `now` (local time), and the window that sets
    /// it, if one does.
    pub fn rate_at(&self, now: chrono::NaiveDateTime) -> (u64, Option<&RateWindow>) {
        windows::rate_at(&self.max_rate_windows, self.max_rate, now)
    }
}

/// One vCenter (or ESXi host) that VMware jobs name: `[vmware.NAME]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Vcenter {
    /// `https://vcenter.example.com/sdk`
    pub url: String,
    pub user: String,
    /// A file holding the password (never the password itself).
    pub password_file: PathBuf,
    /// SHA-256 of the server's certificate, `AB:CD:...`: the only certificate accepted.
    pub thumbprint: String,
    #[serde(default = "vc_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "vc_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Longest wait for a reconfigure or snapshot task.
    #[serde(default = "vc_task_timeout", with = "humantime_serde")]
    pub task_timeout: Duration,
    /// The command serving one disk over NBD; `None`: nbdkit's vddk plugin
    /// (see `vmware::source`).
    #[serde(default)]
    pub nbd_command: Option<Vec<String>>,
}

fn vc_connect_timeout() -> Duration {
    Duration::from_secs(15)
}
fn vc_request_timeout() -> Duration {
    Duration::from_secs(120)
}
fn vc_task_timeout() -> Duration {
    Duration::from_secs(3600)
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogTarget {
    Auto,
    Journald,
    Stderr,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Log {
    pub target: LogTarget,
    pub level: String,
}

impl Settings {
    /// Loads the defaults, then `path` (required when `explicit`), then the
    /// environment, and validates the result.
    pub fn load(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        Self::load_with_env(path, explicit, std::env::vars())
    }

    fn load_with_env(
        path: &Path,
        explicit: bool,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        if explicit && !path.is_file() {
            return Err(ConfigError(format!("cannot read {}: no such file", path.display())));
        }
        let vars: config::Map<String, String> = env.into_iter().filter(|(k, _)| k.starts_with("BLOCKREPL__")).collect();
        let built = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .add_source(config::File::from(path).format(config::FileFormat::Toml).required(explicit))
            .add_source(
                config::Environment::with_prefix("BLOCKREPL")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(vars)),
            )
            .build()
            .map_err(|e| ConfigError(one_line(&e.to_string())))?;
        let s: Settings = built.try_deserialize().map_err(|e| ConfigError(one_line(&e.to_string())))?;
        s.validate()?;
        Ok(s)
    }

    /// The documented defaults alone (tests).
    #[cfg(test)]
    pub fn defaults() -> Self {
        Self::load_with_env(Path::new("/nonexistent/blockrepl.toml"), false, std::iter::empty())
            .unwrap_or_else(|e| panic!("the shipped defaults are valid: {e}"))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        // The same check as at connect time; a URL that cannot work fails here,
        // at start-up and on reload, before anything waits for it.
        if let Err(e) = crate::db::check_url(&self.database.url) {
            return bad("database.url", &e.to_string());
        }
        if !self.admin.socket.is_absolute() {
            return bad("admin.socket", "must be an absolute path");
        }
        if self.admin.group.is_empty() {
            return bad("admin.group", "must not be empty");
        }
        if self.node.id.as_deref().is_some_and(|id| id.is_empty() || id.len() > 255) {
            return bad("node.id", "must be 1 to 255 characters");
        }
        for (key, d) in [
            ("database.retry_interval", self.database.retry_interval),
            ("database.timeout", self.database.timeout),
            ("database.connect_timeout", self.database.connect_timeout),
            ("discovery.interval", self.discovery.interval),
            ("discovery.lease", self.discovery.lease),
            ("watchdog.stall_timeout", self.watchdog.stall_timeout),
            ("copy.checkpoint_interval", self.copy.checkpoint_interval),
            ("copy.connect_timeout", self.copy.connect_timeout),
            ("copy.request_timeout", self.copy.request_timeout),
        ] {
            if d.is_zero() {
                return bad(key, "must be longer than 0s");
            }
        }
        if self.discovery.lease < Duration::from_secs(3) {
            return bad("discovery.lease", "must be at least 3s");
        }
        let step = self.progress.min_percent_step;
        if !(step > 0.0 && step <= 100.0) {
            return bad("progress.min_percent_step", "must be in (0, 100]");
        }
        let c = &self.copy;
        if c.max_concurrent_disks == 0 {
            return bad("copy.max_concurrent_disks", "must be at least 1");
        }
        if c.connections.is_some_and(|n| !(1..=64).contains(&n)) {
            return bad("copy.connections", "must be 1 to 64");
        }
        if !(1..=1024).contains(&c.requests) {
            return bad("copy.requests", "must be 1 to 1024");
        }
        if !(4096..=crate::engine::spec::MAX_REQUEST).contains(&c.request_size) {
            return bad("copy.request_size", "must be 4K to 32M");
        }
        if c.memory < c.request_size {
            return bad("copy.memory", "must hold at least one request");
        }
        if c.retry_attempts == 0 {
            return bad("copy.retry_attempts", "must be at least 1");
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| ConfigError(format!("log.level: {e}")))?;
        for (name, vc) in &self.vmware {
            crate::vmware::validate_vcenter(name, vc)
                .map_err(|(key, why)| ConfigError(format!("vmware.{name}.{key}: {why}")))?;
        }
        Ok(())
    }

    /// This appliance's name as an owner of jobs: `node.id`, or else the host
    /// name and the first 12 hex digits of `/etc/machine-id`, which differ even
    /// between appliances cloned from one image with one host name (systemd gives
    /// each its own machine id on first boot). A second live daemon with the same
    /// id is refused at start-up (see `db::lock_node`).
    pub fn node_id(&self) -> String {
        self.node.id.clone().unwrap_or_else(|| {
            let host = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok());
            let machine = std::fs::read_to_string("/etc/machine-id").ok();
            default_node_id(host.as_deref(), machine.as_deref())
        })
    }

    /// The engine's tuning from `[copy]`.
    pub fn tuning(&self) -> Tuning {
        let c = &self.copy;
        Tuning {
            connections: c.connections.unwrap_or_else(crate::engine::spec::default_connections),
            requests: c.requests,
            request_size: c.request_size,
            buffer_bytes: c.memory,
            checkpoint_interval: c.checkpoint_interval,
            connect_timeout: c.connect_timeout,
            request_timeout: c.request_timeout,
            retry: RetryPolicy {
                max_attempts: c.retry_attempts,
                initial_delay: c.retry_initial_delay,
                max_delay: c.retry_max_delay,
            },
            // The watchdog watches jobs; its message names what hung.
            stall_timeout: None,
            // At most a few rows of job_events per minute for one kind of retry.
            retry_report_interval: Duration::from_secs(20),
            retry_first_connect: true,
        }
    }
}

/// `host-machine` (see [`Settings::node_id`]); either part may be missing.
fn default_node_id(host: Option<&str>, machine_id: Option<&str>) -> String {
    let host = host.map(str::trim).filter(|h| !h.is_empty()).unwrap_or("localhost");
    let machine: String = machine_id.unwrap_or("").trim().chars().filter(char::is_ascii_hexdigit).take(12).collect();
    let id = if machine.is_empty() { host.to_string() } else { format!("{host}-{}", machine.to_ascii_lowercase()) };
    id.chars().take(255).collect()
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parses a byte count with an optional binary suffix: `4096`, `256K`, `1M`, `2GiB`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num.parse().map_err(|_| format!("'{s}' is not a size (e.g. 4096, 256K, 4M, 1G)"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        _ => return Err(format!("'{s}' has an unknown unit (use K, M or G)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))
}

/// Parses a bandwidth limit: a size per second (`200M`, `1G`, `512K`,
/// `1048576`, binary units as for sizes; `/s` may follow), or `0`, `none`, `off`
/// for no limit. Returns bytes/s, 0 = none.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    if ["none", "off"].contains(&t.to_ascii_lowercase().as_str()) {
        return Ok(0);
    }
    let n = parse_size(t).map_err(|_| format!("'{s}' is not a rate (e.g. 200M, 1G, 0 for none)"))? as u64;
    if n > crate::engine::limit::MAX_RATE {
        return Err(format!("'{s}' is above the highest rate, 1024G"));
    }
    Ok(n)
}

/// A number, or a string with a unit (rates and sizes).
#[derive(Deserialize)]
#[serde(untagged)]
enum Amount {
    N(u64),
    S(String),
}

impl Amount {
    fn text(self) -> String {
        match self {
            Amount::N(n) => n.to_string(),
            Amount::S(s) => s,
        }
    }
}

/// A rate in the configuration: a number of bytes/s or a string like `"200M"`.
fn rate<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    parse_rate(&Amount::deserialize(d)?.text()).map_err(serde::de::Error::custom)
}

/// `"WINDOW" = RATE` pairs (see `windows`).
fn rate_windows<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<RateWindow>, D::Error> {
    let pairs = std::collections::BTreeMap::<String, Amount>::deserialize(d)?;
    pairs
        .into_iter()
        .map(|(window, rate)| {
            let rate = parse_rate(&rate.text()).map_err(|e| format!("'{window}': {e}"))?;
            RateWindow::parse(&window, rate)
        })
        .collect::<Result<_, String>>()
        .map_err(serde::de::Error::custom)
}

/// A size given as a number of bytes or as a string with a unit.
fn size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match Amount::deserialize(d)? {
        Amount::N(n) => usize::try_from(n).map_err(serde::de::Error::custom),
        Amount::S(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.toml");
        if let Some(text) = file {
            std::fs::write(&path, text).unwrap();
        }
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Settings::load_with_env(&path, file.is_some(), env)
    }

    #[test]
    fn defaults_are_the_documented_file() {
        let s = load(None, &[]).unwrap();
        assert_eq!(s.discovery.interval, Duration::from_secs(30));
        assert_eq!(s.watchdog.stall_timeout, Duration::from_secs(300));
        assert_eq!(s.progress.min_percent_step, 1.0);
        assert_eq!(s.progress.min_interval, Duration::from_secs(2));
        assert_eq!(s.copy.max_concurrent_disks, 8);
        assert_eq!(s.copy.request_size, 1 << 20);
        assert_eq!(s.admin.socket, PathBuf::from("/run/blockrepl/admin.sock"));
        assert_eq!(s.log.target, LogTarget::Auto);
        assert_eq!((s.database.timeout, s.database.connect_timeout), (Duration::from_secs(10), Duration::from_secs(5)));
        assert!(!s.node_id().is_empty());
        assert_eq!(s.tuning(), Tuning { ..s.tuning() });
    }

    #[test]
    fn the_default_node_id_is_the_host_and_the_machine() {
        let check = |host, machine, expected: &str| assert_eq!(default_node_id(host, machine), expected);
        check(Some("appliance"), Some("4f1c2e9a8b7d6c5e4f3a2b1c0d9e8f7a\n"), "appliance-4f1c2e9a8b7d");
        check(Some("appliance"), Some("4F1C2E9A8B7D6C5E\n"), "appliance-4f1c2e9a8b7d");
        check(Some("appliance"), None, "appliance");
        check(None, Some("0123456789abcdef"), "localhost-0123456789ab");
        check(Some(" "), Some(""), "localhost");
        // Two clones with one host name but their own machine ids differ.
        assert_ne!(
            default_node_id(Some("a"), Some("11112222333344445555")),
            default_node_id(Some("a"), Some("99990000"))
        );
        let s = load(None, &[]).unwrap();
        if let Ok(m) = std::fs::read_to_string("/etc/machine-id") {
            assert!(s.node_id().ends_with(&m.trim()[..12]), "{} has this machine's id", s.node_id());
        }
    }

    #[test]
    fn file_then_environment_override() {
        let s = load(
            Some("[discovery]\ninterval = \"5s\"\n[copy]\nrequest_size = 65536\n[node]\nid = \"a1\"\n"),
            &[("BLOCKREPL__WATCHDOG__STALL_TIMEOUT", "90s"), ("BLOCKREPL__COPY__VERIFY", "true"), ("OTHER", "x")],
        )
        .unwrap();
        assert_eq!(s.discovery.interval, Duration::from_secs(5));
        assert_eq!(s.discovery.lease, Duration::from_secs(120), "untouched keys keep their defaults");
        assert_eq!(s.copy.request_size, 65536);
        assert_eq!(s.watchdog.stall_timeout, Duration::from_secs(90));
        assert!(s.copy.verify);
        assert_eq!(s.node_id(), "a1");
        assert_eq!(s.copy.max_rate, 0, "no limit by default");
        let s = load(Some("[copy]\nmax_rate = \"200M\"\n"), &[]).unwrap();
        assert_eq!(s.copy.max_rate, 200 << 20);
        let s = load(None, &[("BLOCKREPL__COPY__MAX_RATE", "4M")]).unwrap();
        assert_eq!(s.copy.max_rate, 4 << 20);
    }

    #[test]
    fn rate_windows_are_read_and_checked() {
        assert!(load(None, &[]).unwrap().copy.max_rate_windows.is_empty(), "none by default");
        let s = load(
            Some("[copy]\nmax_rate = \"1G\"\n[copy.max_rate_windows]\n\"mon-fri 08:00-18:00\" = \"100M\"\n\"sat,sun 10:00-12:00\" = 0\n"),
            &[],
        )
        .unwrap();
        let monday_noon = chrono::NaiveDate::from_ymd_opt(2026, 11, 30).unwrap().and_hms_opt(12, 0, 0).unwrap();
        let (rate, window) = s.copy.rate_at(monday_noon);
        assert_eq!((rate, window.map(|w| w.text.as_str())), (100 << 20, Some("mon-fri 08:00-18:00")));
        assert_eq!(s.copy.rate_at(monday_noon + chrono::Duration::hours(8)), (1 << 30, None));
        let windows = |body: &str| format!("[copy.max_rate_windows]\n{body}\n");
        check_err(Some(&windows("\"mon-fri 8-18\" = \"100M\"")), &[], "'mon-fri 8-18': '8' is not a time of day");
        check_err(Some(&windows("\"mon-fri 8-18\" = \"100M\"")), &[], "copy.max_rate_windows");
        check_err(Some(&windows("\"mon-fri 08:00-18:00\" = \"fast\"")), &[], "'fast' is not a rate");
        check_err(Some(&windows("\"someday 08:00-18:00\" = \"1M\"")), &[], "'someday' is not a day");
    }

    fn check_err(file: Option<&str>, env: &[(&str, &str)], names: &str) {
        let e = load(file, env).unwrap_err().to_string();
        assert!(e.contains(names), "error '{e}' should name '{names}'");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn wrong_settings_name_their_key() {
        check_err(Some("[discovery]\ninterval = \"soon\"\n"), &[], "discovery.interval");
        check_err(Some("[discovery]\nintervall = \"5s\"\n"), &[], "intervall");
        check_err(Some("[copy]\nconnections = 0\n"), &[], "copy.connections");
        check_err(Some("[copy]\nrequest_size = \"12Q\"\n"), &[], "copy.request_size");
        check_err(Some("[copy]\nmax_rate = \"fast\"\n"), &[], "copy.max_rate");
        check_err(None, &[("BLOCKREPL__COPY__MAX_RATE", "-5")], "copy.max_rate");
        check_err(None, &[("BLOCKREPL__COPY__MAX_RATE", "5000G")], "copy.max_rate");
        check_err(Some("[database]\nurl = \"\"\n"), &[], "database.url");
        check_err(Some("[database]\nurl = \"mysql://app:pw@db.example\"\n"), &[], "database.url: invalid database URL");
        check_err(Some("[progress]\nmin_percent_step = 0\n"), &[], "progress.min_percent_step");
        check_err(Some("not toml at all ["), &[], "configuration");
        check_err(None, &[("BLOCKREPL__WATCHDOG__STALL_TIMEOUT", "0s")], "watchdog.stall_timeout");
        check_err(None, &[("BLOCKREPL__LOG__TARGET", "syslog")], "syslog");
    }

    #[test]
    fn vmware_sections_are_read_and_checked() {
        let tp = "AB:".repeat(31) + "AB";
        let vc = |extra: &str| {
            format!(
                "[vmware.vc-1]\nurl = \"https://vc.example/sdk\"\nuser = \"u\"\npassword_file = \"/etc/pw\"\nthumbprint = \"{tp}\"\n{extra}"
            )
        };
        let s = load(Some(&vc("")), &[("BLOCKREPL__VMWARE__VC-1__USER", "backup")]).unwrap();
        let v = &s.vmware["vc-1"];
        assert_eq!((v.user.as_str(), v.task_timeout), ("backup", Duration::from_secs(3600)));
        assert_eq!(v.nbd_command, None);
        assert!(load(None, &[]).unwrap().vmware.is_empty(), "no vCenter by default");
        check_err(Some(&vc("").replace(&tp, "AB:CD")), &[], "vmware.vc-1.thumbprint");
        check_err(Some(&vc("").replace("https:", "http:")), &[], "vmware.vc-1.url");
        check_err(Some(&vc("").replace("/etc/pw", "pw")), &[], "vmware.vc-1.password_file");
        check_err(Some(&vc("nbd_command = [\"nbdkit\", \"file\"]")), &[], "vmware.vc-1.nbd_command");
        check_err(Some(&vc("pasword = \"x\"")), &[], "pasword");
    }

    #[test]
    fn a_missing_explicit_file_is_an_error() {
        let e = Settings::load(Path::new("/nonexistent/blockrepl.toml"), true).unwrap_err();
        assert_eq!(e.to_string(), "configuration: cannot read /nonexistent/blockrepl.toml: no such file");
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256K"), Ok(256 << 10));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("1T").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn rates_parse_as_sizes_per_second() {
        assert_eq!(parse_rate("200M"), Ok(200 << 20));
        assert_eq!(parse_rate("4M/s"), Ok(4 << 20));
        assert_eq!(parse_rate("0"), Ok(0));
        assert_eq!(parse_rate("none"), Ok(0));
        assert_eq!(parse_rate("1048576"), Ok(1 << 20));
        for bad in ["-1", "fast", "", "12Q", "2000G", "99999999999999999999", "1.5M"] {
            assert!(parse_rate(bad).is_err(), "{bad} parsed");
        }
    }
}
