//! Logging for the daemon: journald when started by systemd, text on stderr
//! otherwise.
//!
//! Structured fields are passed on every event that concerns a job or a disk as
//! `job_id`, `disk_id` and `correlation_id`. The journald layer is configured with
//! no field prefix, and journald upper-cases names, so they arrive as `JOB_ID`,
//! `DISK_ID` and `CORRELATION_ID`:
//!
//! ```text
//! journalctl -u blockrepl JOB_ID=job-20250905-171611
//! ```

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, reload};

use crate::config::LogTarget;

/// Changes the level filter of the running subscriber (SIGHUP).
pub struct LogControl {
    handle: reload::Handle<EnvFilter, tracing_subscriber::Registry>,
}

impl LogControl {
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let f = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        self.handle.reload(f).map_err(|e| e.to_string())
    }
}

/// Whether journald should receive the logs: asked for, or `auto` and our stderr
/// is connected to the journal (systemd sets `JOURNAL_STREAM` for services).
fn use_journald(target: LogTarget) -> bool {
    match target {
        LogTarget::Journald => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => std::env::var_os("JOURNAL_STREAM").is_some(),
    }
}

/// Installs the global subscriber. Fails only when journald was asked for
/// explicitly and its socket cannot be opened.
pub fn init(target: LogTarget, level: &str) -> Result<LogControl, String> {
    let filter = EnvFilter::try_new(level).map_err(|e| format!("log.level: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let journald = if use_journald(target) {
        match tracing_journald::layer() {
            Ok(l) => Some(l.with_field_prefix(None).with_syslog_identifier("blockrepl".into())),
            Err(e) if target == LogTarget::Journald => return Err(format!("cannot open the journal: {e}")),
            Err(_) => None,
        }
    } else {
        None
    };
    let text = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .boxed()
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(text)
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))?;
    Ok(LogControl { handle })
}
