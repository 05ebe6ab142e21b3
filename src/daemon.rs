//! `blockrepl serve`: loads the settings, starts logging and the actors, waits
//! for the database (migrating it), binds the admin socket, signals READY to
//! systemd, and hands over to the shutdown owner until a signal ends it.

use std::path::PathBuf;
use std::sync::Arc;

use actix::prelude::*;

use crate::actors::db_writer::{DbWriter, Migrate};
use crate::actors::discovery::DiscoveryActor;
use crate::actors::disk_copier::DiskSlots;
use crate::actors::job_aggregator::JobDeps;
use crate::actors::timeout_watchdog::TimeoutWatchdog;
use crate::admin::{self, server::AdminDeps};
use crate::config::Settings;
use crate::shutdown::{self, Components, Reload};
use crate::telemetry;

/// Runs the daemon until SIGTERM/SIGINT. `config`: the `--config` file, or the
/// default path (which may then be missing).
pub fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let explicit = config.is_some();
    let path = config.unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_PATH));
    let settings = Arc::new(Settings::load(&path, explicit)?);
    let log = telemetry::init(settings.log.target, &settings.log.level).map_err(anyhow::Error::msg)?;
    let reload = Reload { path, explicit, current: settings.clone(), log };
    actix_rt::System::new().block_on(serve(settings, reload))
}

async fn serve(settings: Arc<Settings>, reload: Reload) -> anyhow::Result<()> {
    let node = settings.node_id();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), node = %node, "starting");

    let mut signals = shutdown::Signals::install()?;
    let s = settings.clone();
    let db = Supervisor::start(move |_| DbWriter::new(&s));
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
                Err(e) => {
                    let wait = settings.database.retry_interval;
                    tracing::warn!(error = %e, "database not ready; retrying in {}", humantime::format_duration(wait));
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
    let deps = JobDeps {
        db: db.clone(),
        watchdog: watchdog.clone(),
        slots: slots.clone(),
        settings: settings.clone(),
        node: node.clone(),
    };
    let discovery = Supervisor::start(move |_| DiscoveryActor::new(deps));

    // READY means the socket is bound and served.
    let admin = bound.serve(AdminDeps { discovery: discovery.clone(), db: db.clone(), slots, node })?;

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!("ready");
    shutdown::run(Components { discovery, db, watchdog, admin: Some(admin) }, reload, signals).await?;
    Ok(())
}
