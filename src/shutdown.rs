//! The shutdown owner: waits for signals, reloads the configuration on SIGHUP,
//! and on SIGTERM/SIGINT stops the daemon's components in order, logging each:
//! discovery and the running jobs first (their copiers checkpoint and the jobs
//! stay resumable), then the DbWriter, which flushes what is pending. The
//! database threads are joined after the actor system has stopped (`daemon`).
//!
//! From the first instruction of `serve` until the handlers are installed, the
//! three signals are blocked ([`hold_signals`]), so that one arriving early is
//! handled, not fatal: every stop exits with status 0.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::signal::unix::{SignalKind, signal};

use crate::actors::db_writer::DbWriter;
use crate::actors::discovery::DiscoveryActor;
use crate::actors::messages::{Flush, Reconfigure, StopDiscovery};
use crate::actors::timeout_watchdog::TimeoutWatchdog;
use crate::config::Settings;
use crate::telemetry::LogControl;

/// Time allowed for the jobs to checkpoint and stop (the engine needs about 1 s).
const JOBS_GRACE: Duration = Duration::from_secs(7);
/// Time allowed for the last database writes.
const FLUSH_GRACE: Duration = Duration::from_secs(2);

/// What has to be stopped, in order.
pub struct Components {
    pub discovery: Addr<DiscoveryActor>,
    pub db: Addr<DbWriter>,
    pub watchdog: Addr<TimeoutWatchdog>,
    /// Stops the admin server, if one runs.
    pub admin: Option<StopAdmin>,
}

/// Stops the admin server (it finishes the requests in progress).
pub type StopAdmin = Box<dyn FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>>;

/// Where the configuration came from, to reload it on SIGHUP.
pub struct Reload {
    pub path: PathBuf,
    pub explicit: bool,
    pub current: Arc<Settings>,
    pub log: LogControl,
}

/// The signals the daemon handles.
fn handled() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set
}

/// Blocks SIGTERM, SIGINT and SIGHUP on this thread, and so on every thread it
/// starts, until [`Signals::install`] unblocks them on this one: a signal that
/// arrives meanwhile waits instead of killing the daemon.
pub fn hold_signals() {
    if let Err(e) = handled().thread_block() {
        tracing::warn!(error = %e, "cannot block signals during start-up");
    }
}

/// The daemon's signal handlers, installed once at start-up so that no signal
/// takes its default action (SIGHUP would kill) while the daemon starts.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers and unblocks the signals on this thread (the
    /// actors' thread), which then receives them, pending ones included.
    pub fn install() -> std::io::Result<Self> {
        let signals = Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        };
        handled().thread_unblock().map_err(std::io::Error::from)?;
        Ok(signals)
    }

    /// Resolves on the next SIGTERM or SIGINT, naming it. A SIGHUP meanwhile
    /// stays pending for `run`.
    pub async fn stop(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Runs until SIGTERM/SIGINT, handling SIGHUP meanwhile; then stops everything.
pub async fn run(c: Components, mut reload: Reload, mut signals: Signals) -> std::io::Result<()> {
    let why = loop {
        tokio::select! {
            _ = signals.term.recv() => break "SIGTERM",
            _ = signals.int.recv() => break "SIGINT",
            _ = signals.hup.recv() => reload_settings(&c, &mut reload),
        }
    };
    tracing::info!(signal = why, "stopping");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    stop_all(c).await;
    Ok(())
}

fn reload_settings(c: &Components, r: &mut Reload) {
    match Settings::load(&r.path, r.explicit) {
        Err(e) => tracing::error!(error = %e, "SIGHUP: configuration not reloaded"),
        Ok(s) => {
            let old = &r.current;
            let database = (&s.database.url, s.database.timeout, s.database.connect_timeout);
            if database != (&old.database.url, old.database.timeout, old.database.connect_timeout)
                || s.node.id != old.node.id
                || s.admin != old.admin
            {
                tracing::warn!(
                    "SIGHUP: database.url, database.timeout, database.connect_timeout, node.id and [admin] take effect at the next restart"
                );
            }
            if let Err(e) = r.log.set_level(&s.log.level) {
                tracing::error!(error = %e, "SIGHUP: log.level not changed");
            }
            let s = Arc::new(s);
            c.db.do_send(Reconfigure(s.clone()));
            c.watchdog.do_send(Reconfigure(s.clone()));
            c.discovery.do_send(Reconfigure(s.clone()));
            r.current = s;
            tracing::info!("SIGHUP: configuration reloaded");
        }
    }
}

async fn stop_all(c: Components) {
    if let Some(stop_admin) = c.admin {
        stop_admin().await;
        tracing::info!("stopped: admin socket");
    }
    match tokio::time::timeout(JOBS_GRACE, c.discovery.send(StopDiscovery)).await {
        Ok(_) => tracing::info!("stopped: discovery and jobs (checkpointed, resumable)"),
        Err(_) => tracing::warn!("jobs did not stop within {JOBS_GRACE:?}; they resume from their last checkpoint"),
    }
    match tokio::time::timeout(FLUSH_GRACE, c.db.send(Flush)).await {
        Ok(Ok(Ok(()))) => tracing::info!("stopped: database writer (flushed)"),
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "stopped: database writer, with writes lost"),
        _ => tracing::warn!("database writer did not flush within {FLUSH_GRACE:?}"),
    }
    System::current().stop();
}
