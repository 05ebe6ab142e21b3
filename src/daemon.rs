//! `blockrepl serve`: loads the settings, starts logging, the database threads
//! and the actors, waits for the database (migrating it, and taking this node's
//! lock, which refuses a second daemon with the same node id), binds the admin
//! socket, signals READY to systemd, keeps systemd's watchdog fed while the
//! actors answer, and hands over to the shutdown owner until a signal ends it.
//! The database threads are joined only after the actor system has gone, before
//! `main` returns.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::actors::db_exec::ExecThreads;
use crate::actors::db_writer::DbWriter;
use crate::actors::discovery::DiscoveryActor;
use crate::actors::disk_copier::DiskSlots;
use crate::actors::job_aggregator::JobDeps;
use crate::actors::messages::Migrate;
use crate::actors::messages::Ping;
use crate::actors::timeout_watchdog::TimeoutWatchdog;
use crate::admin::{self, server::AdminDeps};
use crate::config::Settings;
use crate::db::DbError;
use crate::shutdown::{self, Components, Reload};
use crate::telemetry;

/// The exit status of a start that only a change of the configuration (or of
/// the database's grants) can fix: sysexits' `EX_CONFIG`, which the systemd
/// unit does not restart (`RestartPreventExitStatus=`), so that a wrong setting
/// is one failed start rather than a restart every few seconds.
pub const EXIT_CONFIG: u8 = 78;

/// A start that restarting cannot fix (see [`EXIT_CONFIG`]): the configuration,
/// a database URL that cannot work, a schema blockrepl cannot work with.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unfixable(pub String);

fn unfixable(e: impl std::fmt::Display) -> anyhow::Error {
    Unfixable(e.to_string()).into()
}

/// Runs the daemon until SIGTERM/SIGINT. `config`: the `--config` file, or the
/// default path (which may then be missing).
pub fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    shutdown::hold_signals();
    let explicit = config.is_some();
    let path = config.unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_PATH));
    let settings = Arc::new(Settings::load(&path, explicit).map_err(unfixable)?);
    let log = telemetry::init(settings.log.target, &settings.log.level).map_err(unfixable)?;
    let reload = Reload { path, explicit, current: settings.clone(), log };
    let node = settings.node_id();
    let exec = ExecThreads::spawn(&settings, &node)?;
    // The system, and every actor with it, is gone at the end of this statement.
    let result = actix_rt::System::new().block_on(serve(settings, node, reload, &exec));
    // Only now: no call can reach the database threads any more.
    exec.stop();
    result
}

async fn serve(settings: Arc<Settings>, node: String, reload: Reload, exec: &ExecThreads) -> anyhow::Result<()> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), node = %node, "starting");

    let mut signals = shutdown::Signals::install()?;
    let s = settings.clone();
    let client = exec.client();
    let db = Supervisor::start(move |_| DbWriter::new(&s, &client));
    // READY means the database answers: wait for it (a signal still stops us).
    loop {
        tokio::select! {
            why = signals.stop() => {
                tracing::info!(signal = why, "stopping before the database answered");
                return Ok(());
            }
            r = db.send(Migrate) => match r? {
                Ok(applied) => {
                    for v in &applied {
                        tracing::info!(migration = %v, "applied database migration");
                    }
                    break;
                }
                // Another live daemon runs under this node id: never both.
                Err(e @ DbError::NodeInUse { .. }) => return Err(e.into()),
                // A column we cannot work with: waiting will not change it, and
                // nothing was changed (the one line is the exit message).
                Err(e @ DbError::SchemaConflict { .. }) => return Err(unfixable(e)),
                // The URL is wrong, or the server turned us away (unknown
                // database, access denied): waiting will not change it.
                Err(e) if e.is_permanent() => {
                    return Err(unfixable(format!("database.url: {e}; fix the setting and start again")));
                }
                // Refused, unreachable, too busy, too slow: it may heal.
                Err(e) => {
                    let wait = settings.database.retry_interval;
                    tracing::warn!("waiting for the database: {e}; retrying in {}", humantime::format_duration(wait));
                    tokio::select! {
                        why = signals.stop() => {
                            tracing::info!(signal = why, "stopping before the database answered");
                            return Ok(());
                        }
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    // Before any job is claimed: a second daemon on the same socket stops here.
    let bound = admin::server::bind(&settings.admin)?;

    let timeout = settings.watchdog.stall_timeout;
    let watchdog = Supervisor::start(move |_| TimeoutWatchdog::new(timeout));
    let slots = DiskSlots::new(settings.copy.max_concurrent_disks);
    let (appliance_rate, window) = settings.copy.rate_at(chrono::Local::now().naive_local());
    if let Some(w) = window {
        tracing::info!("bandwidth window '{}': the appliance's limit is {appliance_rate} bytes/s (0 = none)", w.text);
    }
    let deps = JobDeps {
        db: db.clone(),
        watchdog: watchdog.clone(),
        slots: slots.clone(),
        settings: settings.clone(),
        node: node.clone(),
        limit: crate::engine::Limit::new(appliance_rate),
    };
    let discovery = Supervisor::start(move |_| DiscoveryActor::new(deps));

    // READY means the socket is bound and served.
    let admin = bound.serve(AdminDeps { discovery: discovery.clone(), db: db.clone(), slots, node })?;

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!("ready");
    if let Some(limit) = sd_notify::watchdog_enabled() {
        actix_rt::spawn(keepalive(limit, discovery.clone(), db.clone()));
    }
    shutdown::run(Components { discovery, db, watchdog, admin: Some(admin) }, reload, signals).await?;
    Ok(())
}

/// Feeds systemd's watchdog (`WatchdogSec=`, which sets `limit`): four times per
/// `limit`, a message goes through the DiscoveryActor's and the DbWriter's
/// mailboxes and back, and only then is `WATCHDOG=1` sent. This runs on the
/// actors' own thread, not on a timer thread of its own, so an actor stuck in a
/// handler, a blocked thread or a mailbox that no longer moves stops the feeding,
/// and systemd restarts the daemon. A slow database does not: the DbWriter
/// answers while its executor waits.
async fn keepalive(limit: Duration, discovery: Addr<DiscoveryActor>, db: Addr<DbWriter>) {
    let every = limit / 4;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut answering = true;
    loop {
        tick.tick().await;
        let round_trip = async { discovery.send(Ping).await.is_ok() && db.send(Ping).await.is_ok() };
        let ok = matches!(tokio::time::timeout(every, round_trip).await, Ok(true));
        if ok {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            if !answering {
                tracing::info!("the actors answer again; feeding systemd's watchdog");
            }
        } else if answering {
            tracing::error!(
                "the actors did not answer within {}; not telling systemd's watchdog that the daemon is alive",
                humantime::format_duration(every)
            );
        }
        answering = ok;
    }
}
