//! The DiscoveryActor: every `discovery.interval` (and at once when asked) it
//! claims ready jobs through the DbWriter and starts a JobAggregator for each. It
//! keeps the registry of the jobs this node runs, for the admin API and for
//! shutdown. On start it claims at once: jobs released by a graceful stop are
//! resumed at once, those of a crashed run once their leases have expired.
//!
//! A claimed row that cannot be run (see `JobTracker::new`) fails alone, with a
//! message, written as its owner; the other claims go on. A claim has a
//! deadline, so that a database that hangs never leaves discovery "claiming".
//!
//! It also sweeps snapshots that VMware jobs left behind (a job that ended
//! while vCenter was away, or was ended in the database while it ran): at
//! start and every [`SWEEP_EVERY`] discoveries, on a thread of its own
//! (`vsphere::remove_left_snapshot`), clearing the job's `vmware_snapshot`
//! once removed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use chrono::Utc;

use super::job_aggregator::{JobAggregator, JobDeps};
use super::job_run::fence_deadline;
use super::job_tracker::{JobTracker, row_rate};
use super::messages::*;
use super::vsphere::remove_left_snapshot;
use crate::db::{JobUpdate, NewJobEvent};
use crate::engine::{CancelToken, Fence};
use crate::state::JobStatus;

pub struct DiscoveryActor {
    deps: JobDeps,
    /// Where claims go: the DbWriter (a test substitutes a collector).
    claims: Recipient<ClaimJobs>,
    active: HashMap<String, Addr<JobAggregator>>,
    claiming: bool,
    /// Another discovery was asked for while one was running.
    again: bool,
    stopping: bool,
    ticker: Option<SpawnHandle>,
    /// The database failed last time (log once per outage).
    failing: bool,
    /// Discoveries since the last sweep of snapshots left behind.
    since_sweep: u32,
    /// The sweep's thread, while it removes snapshots; joined when done.
    sweep: Option<(std::thread::JoinHandle<()>, CancelToken)>,
    /// The running jobs' `max_rate` columns are being read.
    reading_limits: bool,
}

/// How often the running jobs' `max_rate` columns are read: an orchestrator's
/// change reaches the copies within this (one statement for all the jobs).
const LIMITS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A sweep of snapshots left behind every this many discoveries (and at start).
const SWEEP_EVERY: u32 = 10;

impl DiscoveryActor {
    pub fn new(deps: JobDeps) -> Self {
        let claims = deps.db.clone().recipient();
        Self::with_claims(deps, claims)
    }

    pub fn with_claims(deps: JobDeps, claims: Recipient<ClaimJobs>) -> Self {
        Self {
            deps,
            claims,
            active: HashMap::new(),
            claiming: false,
            again: false,
            stopping: false,
            ticker: None,
            failing: false,
            since_sweep: 0,
            sweep: None,
            reading_limits: false,
        }
    }

    /// Reads the running jobs' `max_rate` columns (set by an orchestrator, or
    /// by `blockrepl limit` on any appliance) and hands each to its job, which
    /// changes its limit if the column changed.
    fn follow_limits(&mut self, ctx: &mut Context<Self>) {
        if self.reading_limits || self.stopping || self.active.is_empty() {
            return;
        }
        self.reading_limits = true;
        let job_ids: Vec<String> = self.active.keys().cloned().collect();
        tokio::time::timeout(LIMITS_EVERY, self.deps.db.send(Query::Limits { job_ids }))
            .into_actor(self)
            .map(|res, act, _| {
                act.reading_limits = false;
                // The database is away or slow: the next second tries again.
                let Ok(Ok(Ok(QueryResult::Limits(rates)))) = res else { return };
                for (id, rate) in rates {
                    if let Some(agg) = act.active.get(&id) {
                        agg.do_send(SetLimit { max_rate: row_rate(rate), by: "the job's row" });
                    }
                }
            })
            .spawn(ctx);
    }

    /// Sets the appliance's limit to what `copy` (its `max_rate` and windows)
    /// gives at `now`, local time. Returns the rate it was, the rate it is and
    /// the window that sets it, when it changed. Every running copy is below
    /// this node: they follow at their next request.
    fn set_appliance_rate<'a>(
        &self,
        copy: &'a crate::config::Copy,
        now: chrono::NaiveDateTime,
    ) -> Option<(u64, u64, Option<&'a crate::config::RateWindow>)> {
        let (rate, window) = copy.rate_at(now);
        let was = self.deps.limit.rate();
        (rate != was).then(|| {
            self.deps.limit.set_rate(rate);
            (was, rate, window)
        })
    }

    /// Follows the appliance limit's windows (asked every second, so a window
    /// begins and ends within one).
    fn follow_windows(&mut self, now: chrono::NaiveDateTime) {
        let settings = Arc::clone(&self.deps.settings);
        if settings.copy.max_rate_windows.is_empty() {
            return;
        }
        match self.set_appliance_rate(&settings.copy, now) {
            Some((was, rate, Some(w))) => tracing::info!(
                "bandwidth window '{}': the appliance's limit is now {rate} bytes/s (was {was}; 0 = none)",
                w.text
            ),
            Some((was, rate, None)) => tracing::info!(
                "outside the bandwidth windows: the appliance's limit is copy.max_rate again, {rate} bytes/s (was {was}; 0 = none)"
            ),
            None => {}
        }
    }

    /// Looks for snapshots VMware jobs left behind and removes them on a thread.
    fn sweep(&mut self, ctx: &mut Context<Self>) {
        if let Some((h, _)) = &self.sweep {
            if !h.is_finished() {
                return;
            }
            if let Some((h, _)) = self.sweep.take() {
                let _ = h.join();
            }
        }
        if self.stopping || self.deps.settings.vmware.is_empty() {
            return;
        }
        self.since_sweep = 0;
        let limit = claim_deadline(&self.deps.settings);
        tokio::time::timeout(limit, self.deps.db.send(Query::LeftSnapshots))
            .into_actor(self)
            .map(|res, act, ctx| {
                let Ok(Ok(Ok(QueryResult::Snapshots(left)))) = res else { return };
                if left.is_empty() || act.stopping || act.sweep.is_some() {
                    return;
                }
                let settings = Arc::clone(&act.deps.settings);
                let report = ctx.address().recipient::<SnapshotSwept>();
                let cancel = CancelToken::default();
                let token = cancel.clone();
                let spawned = std::thread::Builder::new().name("snapshot-sweep".into()).spawn(move || {
                    for l in left {
                        if token.is_cancelled() {
                            break;
                        }
                        let result = remove_left_snapshot(&settings, &l, &token);
                        report.do_send(SnapshotSwept { left: l, result });
                    }
                });
                match spawned {
                    Ok(h) => act.sweep = Some((h, cancel)),
                    Err(e) => tracing::warn!(error = %e, "cannot start the snapshot sweep"),
                }
            })
            .spawn(ctx);
    }

    fn schedule(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.ticker.take() {
            ctx.cancel_future(h);
        }
        self.ticker = Some(ctx.run_interval(self.deps.settings.discovery.interval, |act, ctx| act.discover(ctx)));
    }

    fn discover(&mut self, ctx: &mut Context<Self>) {
        if self.stopping {
            return;
        }
        if self.claiming {
            self.again = true;
            return;
        }
        self.since_sweep += 1;
        if self.since_sweep >= SWEEP_EVERY {
            self.sweep(ctx);
        }
        // One job per copy slot at most; a job's extra disks queue for slots.
        let room = self.deps.settings.copy.max_concurrent_disks.saturating_sub(self.active.len());
        if room == 0 {
            return;
        }
        self.claiming = true;
        let lease = self.deps.settings.discovery.lease;
        let msg = ClaimJobs {
            node: self.deps.node.clone(),
            lease,
            limit: room as i64,
            exclude: self.active.keys().cloned().collect(),
        };
        // The lease runs from when the database executed the claim, which is
        // after this: the write fence counts from here, on the safe side.
        let sent = Instant::now();
        let limit = claim_deadline(&self.deps.settings);
        tokio::time::timeout(limit, self.claims.send(msg))
            .into_actor(self)
            .map(move |res, act, ctx| {
                act.claiming = false;
                match res {
                    Ok(Ok(Ok(jobs))) => {
                        act.failing = false;
                        for claimed in jobs {
                            if act.stopping {
                                break;
                            }
                            // A row that could not be run took a place in this
                            // claim: look again for one that can.
                            if !act.start(claimed, sent, ctx) {
                                act.again = true;
                            }
                        }
                    }
                    Ok(Ok(Err(e))) => {
                        if !act.failing {
                            tracing::warn!(error = %e, "cannot look for jobs; will try again");
                        }
                        act.failing = true;
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "db writer unreachable"),
                    Err(_) => {
                        tracing::warn!(
                            "no answer to a claim within {}; waiting for the database, will try again",
                            humantime::format_duration(limit)
                        );
                        act.failing = true;
                    }
                }
                if std::mem::take(&mut act.again) {
                    act.discover(ctx);
                }
            })
            .spawn(ctx);
    }
}

/// How long a claim may take: it waits for the writes queued before it (one
/// batch) and then claims, each with its own database deadline.
fn claim_deadline(s: &crate::config::Settings) -> std::time::Duration {
    (s.database.timeout + s.database.connect_timeout) * 2
}

impl DiscoveryActor {
    /// Starts the aggregator of a claimed job, or fails the job alone when its
    /// row cannot be run (and returns false).
    fn start(&mut self, c: Claimed, sent: Instant, ctx: &mut Context<Self>) -> bool {
        let id = c.job.id.clone();
        let lease = self.deps.settings.discovery.lease;
        match JobTracker::new(&c.job, &c.disks, c.owner.run.clone()) {
            Ok(t) => {
                tracing::info!(job_id = %id, correlation_id = %c.owner.run, disks = c.disks.len(), "claimed job");
                let fence = Fence::until(fence_deadline(sent, lease));
                let agg = JobAggregator::new(
                    t,
                    c.disks,
                    c.chain,
                    c.owner,
                    fence,
                    self.deps.clone(),
                    ctx.address().recipient(),
                );
                self.active.insert(id, agg.start());
                true
            }
            Err(why) => {
                tracing::error!(job_id = %id, correlation_id = %c.owner.run, "claimed a job that cannot be run: {why}");
                let db = &self.deps.db;
                let now = Utc::now().naive_utc();
                db.do_send(Record {
                    owner: c.owner.clone(),
                    entry: Entry::Event(NewJobEvent {
                        job_id: id.clone(),
                        disk_id: None,
                        correlation_id: c.owner.run.clone(),
                        level: "error".into(),
                        stage: c.job.current_operation.clone().unwrap_or_default(),
                        message: format!("cannot run this job: {why}"),
                        created_at: Some(now),
                    }),
                });
                db.do_send(PersistJob(JobUpdate {
                    id: id.clone(),
                    owner: Some(c.owner.clone()),
                    status: Some(JobStatus::Failed),
                    error_message: Some(why),
                    completed_at: Some(now),
                    ..JobUpdate::default()
                }));
                db.do_send(ReleaseLease { job_id: id, owner: c.owner });
                false
            }
        }
    }
}

impl Actor for DiscoveryActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.discover(ctx);
        self.sweep(ctx);
        self.schedule(ctx);
        ctx.run_interval(LIMITS_EVERY, |act, ctx| {
            act.follow_windows(chrono::Local::now().naive_local());
            act.follow_limits(ctx);
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        if let Some((h, cancel)) = self.sweep.take() {
            cancel.cancel();
            let _ = h.join();
        }
    }
}

impl Handler<SnapshotSwept> for DiscoveryActor {
    type Result = ();
    fn handle(&mut self, m: SnapshotSwept, _: &mut Context<Self>) {
        let l = &m.left;
        match m.result {
            Ok(()) => {
                tracing::info!(job_id = %l.job_id, snapshot = %l.snapshot, "removed a snapshot the job left behind");
                self.deps.db.do_send(Query::ForgetSnapshot(m.left));
            }
            Err(e) => tracing::warn!(
                job_id = %l.job_id, snapshot = %l.snapshot, error = %e,
                "cannot remove a snapshot the job left behind; trying again later"
            ),
        }
    }
}

impl Supervised for DiscoveryActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        tracing::warn!("discovery restarting");
        self.claiming = false;
        self.ticker = None;
    }
}

impl Handler<Ping> for DiscoveryActor {
    type Result = ();
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) {}
}

impl Handler<DiscoverNow> for DiscoveryActor {
    type Result = ();
    fn handle(&mut self, _: DiscoverNow, ctx: &mut Context<Self>) {
        self.discover(ctx);
    }
}

impl Handler<JobEnded> for DiscoveryActor {
    type Result = ();
    fn handle(&mut self, m: JobEnded, ctx: &mut Context<Self>) {
        self.active.remove(&m.job_id);
        // A slot opened: another job may be waiting for it.
        if !self.stopping {
            self.discover(ctx);
        }
    }
}

impl Handler<FindActive> for DiscoveryActor {
    type Result = Option<Addr<JobAggregator>>;
    fn handle(&mut self, m: FindActive, _: &mut Context<Self>) -> Self::Result {
        self.active.get(&m.job_id).cloned()
    }
}

impl Handler<ListActive> for DiscoveryActor {
    type Result = Vec<String>;
    fn handle(&mut self, _: ListActive, _: &mut Context<Self>) -> Self::Result {
        self.active.keys().cloned().collect()
    }
}

impl Handler<StopDiscovery> for DiscoveryActor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: StopDiscovery, ctx: &mut Context<Self>) -> Self::Result {
        self.stopping = true;
        if let Some(h) = self.ticker.take() {
            ctx.cancel_future(h);
        }
        if let Some((_, cancel)) = &self.sweep {
            cancel.cancel();
        }
        let waits: Vec<_> = self.active.values().map(|a| a.send(Suspend)).collect();
        Box::pin(async move {
            for w in waits {
                let _ = w.await;
            }
        })
    }
}

impl Handler<Reconfigure> for DiscoveryActor {
    type Result = ();
    fn handle(&mut self, Reconfigure(s): Reconfigure, ctx: &mut Context<Self>) {
        let interval_changed = s.discovery.interval != self.deps.settings.discovery.interval;
        self.deps.slots.set_capacity(s.copy.max_concurrent_disks);
        if let Some((was, now, window)) = self.set_appliance_rate(&s.copy, chrono::Local::now().naive_local()) {
            let during = window.map(|w| format!(", bandwidth window '{}'", w.text)).unwrap_or_default();
            tracing::info!("SIGHUP: copy.max_rate is now {now} bytes/s (was {was}; 0 = none{during})");
        }
        self.deps.settings = Arc::clone(&s);
        if interval_changed && !self.stopping {
            self.schedule(ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::actors::db_writer::DbWriter;
    use crate::actors::disk_copier::DiskSlots;
    use crate::actors::timeout_watchdog::TimeoutWatchdog;
    use crate::config::Settings;
    use crate::db::DbError;

    /// Answers every claim with no jobs, and counts them.
    #[derive(Default)]
    struct Claims(u32);
    impl Actor for Claims {
        type Context = Context<Self>;
    }
    impl Handler<ClaimJobs> for Claims {
        type Result = Result<Vec<Claimed>, DbError>;
        fn handle(&mut self, _: ClaimJobs, _: &mut Context<Self>) -> Self::Result {
            self.0 += 1;
            Ok(Vec::new())
        }
    }
    #[derive(Message)]
    #[rtype(result = "u32")]
    struct Count;
    impl Handler<Count> for Claims {
        type Result = u32;
        fn handle(&mut self, _: Count, _: &mut Context<Self>) -> u32 {
            self.0
        }
    }

    /// The actors' dependencies with `settings`; the database is never called.
    fn deps(settings: Settings) -> (JobDeps, crate::actors::db_exec::ExecThreads) {
        let settings = Arc::new(settings);
        let exec = crate::actors::db_exec::ExecThreads::spawn(&settings, "n").unwrap();
        let deps = JobDeps {
            db: DbWriter::new(&settings, &exec.client()).start(),
            watchdog: TimeoutWatchdog::new(settings.watchdog.stall_timeout).start(),
            slots: DiskSlots::new(2),
            settings: settings.clone(),
            node: "n".into(),
            limit: crate::engine::Limit::new(settings.copy.max_rate),
        };
        (deps, exec)
    }

    #[actix_rt::test]
    async fn the_appliance_limit_follows_its_windows() {
        let mut settings = Settings::defaults();
        settings.copy.max_rate = 8 << 20;
        settings.copy.max_rate_windows =
            vec![crate::config::RateWindow::parse("mon-fri 08:00-18:00", 1 << 20).unwrap()];
        let (deps, exec) = deps(settings);
        let limit = Arc::clone(&deps.limit);
        let mut discovery = DiscoveryActor::new(deps);
        let monday = chrono::NaiveDate::from_ymd_opt(2026, 11, 30).unwrap();
        let at = |h, m| monday.and_hms_opt(h, m, 0).unwrap();
        discovery.follow_windows(at(7, 59));
        assert_eq!(limit.rate(), 8 << 20, "before the window: copy.max_rate");
        discovery.follow_windows(at(8, 0));
        assert_eq!(limit.rate(), 1 << 20, "the window began");
        discovery.follow_windows(at(18, 0));
        assert_eq!(limit.rate(), 8 << 20, "the window ended");
        exec.stop();
    }

    #[actix_rt::test]
    async fn claims_at_start_then_every_interval_and_when_asked_on_a_paused_clock() {
        tokio::time::pause();
        let (deps, exec) = deps(Settings::defaults());
        assert_eq!(deps.settings.discovery.interval, Duration::from_secs(30));
        // Never called here: the claims go to the collector.
        let claims = Claims::default().start();
        let discovery = DiscoveryActor::with_claims(deps, claims.clone().recipient()).start();
        let count = || claims.send(Count);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(count().await.unwrap(), 1, "at start: resume this node's jobs at once");
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(count().await.unwrap(), 1, "not before the interval");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(count().await.unwrap(), 2, "at 30 s");
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(count().await.unwrap(), 3, "at 60 s");
        discovery.send(DiscoverNow).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(count().await.unwrap(), 4, "at once when asked");
        discovery.send(StopDiscovery).await.unwrap();
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(count().await.unwrap(), 4, "nothing after stopping");
        exec.stop();
    }
}
