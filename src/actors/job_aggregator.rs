//! The JobAggregator: one per running job. It starts a DiskCopier per unfinished
//! disk, sums their progress into the job's figures, moves the job through its
//! states, renews its lease, and reports to the DbWriter and the TimeoutWatchdog.
//!
//! A thin shell: the figures are [`JobTracker`] (`job_tracker.rs`), and every
//! decision (which status follows, when the job is done, what is written on a
//! failure, a cancel, a shutdown or a lost lease) is [`JobRun`] (`job_run.rs`),
//! which returns [`Effect`]s that the actor carries out in order. Both are plain
//! structs that unit tests drive.
//!
//! The aggregator writes as its job's owner (node and run) and only while its
//! lease holds: the engine's write fence of every disk is the lease's deadline on
//! this machine's monotonic clock, extended only by a renewal the database
//! confirmed. When it expires, the copies stop sending to their targets at once,
//! and the aggregator stops without writing another row of the job.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use chrono::Utc;

use super::db_writer::DbWriter;
use super::disk_copier::{DiskCopier, DiskSlots};
use super::job_run::{Effect, JobRun, Level};
use super::job_tracker::{JobTracker, row_rate};
use super::messages::*;
use super::timeout_watchdog::TimeoutWatchdog;
use super::vsphere::{VsphereJob, VsphereWorker, runtime_dir};
use crate::config::Settings;
use crate::db::{Disk, Owner};
use crate::engine::{Copier, Fence, Limit};

/// What a job needs from the rest of the daemon.
#[derive(Clone)]
pub struct JobDeps {
    pub db: Addr<DbWriter>,
    pub watchdog: Addr<TimeoutWatchdog>,
    pub slots: DiskSlots,
    pub settings: Arc<Settings>,
    pub node: String,
    /// The appliance's bandwidth limit (`copy.max_rate`), above every job's.
    pub limit: Arc<Limit>,
}

/// `d` to the second, for messages.
fn round_s(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_secs(d.as_secs())
}

/// How often the aggregator looks at its fence (the copies check it themselves
/// before every request; this stops the job's actors and rows).
const FENCE_CHECK: std::time::Duration = std::time::Duration::from_millis(200);

/// How long an ended job's actor waits for its last rows to be written (it
/// shows the job's final figures meanwhile); the database may be away.
const LAST_WRITES: std::time::Duration = std::time::Duration::from_secs(30);

pub struct JobAggregator {
    deps: JobDeps,
    discovery: Recipient<JobEnded>,
    /// The job's figures and decisions.
    run: JobRun,
    /// The claim's disk rows, until the copies are started.
    rows: Vec<Disk>,
    /// The claim's change-ID chain of each disk (see `Claimed::chain`).
    chain: BTreeMap<String, Option<String>>,
    copiers: HashMap<String, Addr<DiskCopier>>,
    suspend_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
    disk_started: HashMap<String, Instant>,
    /// A VMware job's vSphere worker, started with its first step.
    vsphere: Option<VsphereWorker>,
    /// The job ended (its actor waits for its last writes): nothing more is done.
    ending: bool,
    /// The lease renewals and fence checks, cancelled when the job ends.
    timers: Vec<SpawnHandle>,
    /// The job's bandwidth limit, below the appliance's; each disk's copy gets
    /// a node below it, so the disks share it fairly.
    limit: Arc<Limit>,
}

impl JobAggregator {
    /// The aggregator of a claimed job: `t` its tracker (whose correlation id is
    /// the run of `owner`), `rows` its disks, `chain` their change-ID chains,
    /// `fence` open until the claim's lease deadline.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        t: JobTracker,
        rows: Vec<Disk>,
        chain: BTreeMap<String, Option<String>>,
        owner: Owner,
        fence: Fence,
        deps: JobDeps,
        discovery: Recipient<JobEnded>,
    ) -> Self {
        let limit = deps.limit.child(t.max_rate);
        Self {
            deps,
            discovery,
            limit,
            run: JobRun::new(t, owner, fence),
            rows,
            chain,
            copiers: HashMap::new(),
            suspend_waiters: Vec::new(),
            disk_started: HashMap::new(),
            vsphere: None,
            ending: false,
            timers: Vec::new(),
        }
    }

    /// Carries out what the job's run decided, in order. Writes were decided
    /// only while the rows were ours ([`JobRun::may_write`]).
    fn carry_out(&mut self, effects: Vec<Effect>, ctx: &mut Context<Self>) {
        if self.ending {
            // The job ended; its last writes are on their way.
            return;
        }
        let job_id = self.run.t.job_id.clone();
        for e in effects {
            match e {
                Effect::Log { disk, level, message } => {
                    let (disk, cid) = (disk.as_deref(), &self.run.t.correlation_id);
                    match level {
                        Level::Error => {
                            tracing::error!(job_id = %job_id, disk_id = disk, correlation_id = %cid, "{message}")
                        }
                        Level::Warn => {
                            tracing::warn!(job_id = %job_id, disk_id = disk, correlation_id = %cid, "{message}")
                        }
                        Level::Info => {
                            tracing::info!(job_id = %job_id, disk_id = disk, correlation_id = %cid, "{message}")
                        }
                    }
                }
                Effect::Event(e) => self.record(Entry::Event(e)),
                Effect::Cbt(c) => self.record(Entry::Cbt(c)),
                Effect::Job(u) => self.deps.db.do_send(PersistJob(u)),
                Effect::Disk(update) => {
                    self.deps.db.do_send(PersistDisk { owner: self.run.owner().clone(), update });
                }
                Effect::StartCopy { disk_id, mut spec } => {
                    spec.limit = Some(self.limit.child(0));
                    let copier = DiskCopier::new(
                        disk_id.clone(),
                        Copier::new(spec).with_fence(self.run.fence().clone()),
                        ctx.address().recipient(),
                        self.deps.slots.clone(),
                    );
                    self.copiers.insert(disk_id, copier.start());
                }
                Effect::Vsphere(step) => self.vsphere_step(step, ctx),
                Effect::StartTransfer => self.copiers.values().for_each(|c| c.do_send(StartTransfer)),
                Effect::CancelCopies => self.copiers.values().for_each(|c| c.do_send(CancelCopy)),
                Effect::Heartbeat(work) => self.deps.watchdog.do_send(Heartbeat { job_id: job_id.clone(), work }),
                Effect::Stop { release } => {
                    self.ending = true;
                    self.timers.drain(..).for_each(|t| {
                        ctx.cancel_future(t);
                    });
                    self.deps.watchdog.do_send(Unwatch { job_id: job_id.clone() });
                    for w in self.suspend_waiters.drain(..) {
                        let _ = w.send(());
                    }
                    if !release {
                        self.end(ctx);
                        return;
                    }
                    let owner = self.run.owner().clone();
                    self.deps.db.do_send(ReleaseLease { job_id: job_id.clone(), owner });
                    // Until the job's last rows are written, `progress` shows
                    // this actor's final figures: without it, it would show the
                    // rows as they were, a job that seems to go back.
                    let written = tokio::time::timeout(LAST_WRITES, self.deps.db.send(JobWritten { job_id }));
                    written.into_actor(self).map(|_, act, ctx| act.end(ctx)).spawn(ctx);
                    return;
                }
            }
        }
    }

    /// The job's actor is gone: discovery may count its slot free.
    fn end(&mut self, ctx: &mut Context<Self>) {
        self.discovery.do_send(JobEnded { job_id: self.run.t.job_id.clone() });
        ctx.stop();
    }

    /// Hands `step` to the job's vSphere worker, starting it with the first.
    fn vsphere_step(&mut self, step: VsphereStep, ctx: &mut Context<Self>) {
        if self.vsphere.is_none() {
            let vm = self.run.t.vmware.clone();
            let section = vm.as_ref().and_then(|v| self.deps.settings.vmware.get(&v.vcenter).map(|s| (v, s)));
            let started = match section {
                Some((v, vc)) => VsphereWorker::start(
                    VsphereJob {
                        job_id: self.run.t.job_id.clone(),
                        vcenter_name: v.vcenter.clone(),
                        vcenter: vc.clone(),
                        vm: v.vm.clone(),
                        runtime_dir: runtime_dir(&self.deps.settings),
                    },
                    ctx.address().recipient(),
                )
                .map_err(|e| format!("cannot start the vSphere worker: {e}")),
                None => Err("not a VMware job with a configured vCenter".to_string()),
            };
            match started {
                Ok(w) => self.vsphere = Some(w),
                Err(e) => {
                    let effects = self.run.vsphere(VsphereOutcome::Failed(e));
                    self.carry_out(effects, ctx);
                    return;
                }
            }
        }
        if let Some(w) = &self.vsphere {
            w.send(step);
        }
    }

    /// The job's limit is now `rate` (0: none), as `by` says; running copies
    /// follow at their next request.
    fn set_limit(&mut self, rate: u64, by: &str) {
        let was = self.limit.rate();
        if was == rate {
            return;
        }
        self.limit.set_rate(rate);
        let show = |r: u64| if r == 0 { "none".to_string() } else { format!("{r} bytes/s") };
        tracing::info!(
            job_id = %self.run.t.job_id,
            correlation_id = %self.run.t.correlation_id,
            "bandwidth limit of the job set to {} (was {}) by {by}",
            show(rate),
            show(was)
        );
    }

    fn record(&self, entry: Entry) {
        self.deps.db.do_send(Record { owner: self.run.owner().clone(), entry });
    }

    /// Sends a lease renewal; a confirmed one moves the write fence forward,
    /// counting from when it was sent.
    fn renew(&mut self, ctx: &mut Context<Self>) {
        let lease = self.deps.settings.discovery.lease;
        let sent = Instant::now();
        let msg = RenewLease { job_id: self.run.t.job_id.clone(), owner: self.run.owner().clone(), lease };
        // No answer by the next renewal counts as no renewal.
        let wait = lease / 3;
        let reply = tokio::time::timeout(wait, self.deps.db.send(msg));
        reply
            .into_actor(self)
            .map(move |res, act, ctx| match res {
                // The job ended while the renewal was out.
                _ if act.ending => {}
                Ok(Ok(Ok(Renewal::Held { max_rate }))) => {
                    act.run.renewed(sent, lease);
                    act.set_limit(row_rate(max_rate), "the job's row");
                }
                Ok(Ok(Ok(Renewal::Lost))) => {
                    let effects = act.run.lease_lost();
                    act.carry_out(effects, ctx);
                }
                Ok(Ok(Err(e))) => tracing::warn!(
                    job_id = %act.run.t.job_id,
                    error = %e,
                    "cannot renew the lease; the copies stop in {} unless a renewal succeeds",
                    humantime::format_duration(round_s(act.run.fence().remaining().unwrap_or_default()))
                ),
                Ok(Err(_)) => {}
                Err(_) => tracing::warn!(
                    job_id = %act.run.t.job_id,
                    "no answer to a lease renewal within {}; the copies stop in {} unless a renewal succeeds",
                    humantime::format_duration(wait),
                    humantime::format_duration(round_s(act.run.fence().remaining().unwrap_or_default()))
                ),
            })
            .spawn(ctx);
    }
}

impl Actor for JobAggregator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let notify = ctx.address().recipient();
        self.deps.watchdog.do_send(Watch { job_id: self.run.t.job_id.clone(), notify });
        // Lease renewal; losing the job stops it without touching its rows, and so
        // does a fence that expires because no renewal got through in time.
        let lease = self.deps.settings.discovery.lease;
        self.timers.push(ctx.run_interval(lease / 3, |act, ctx| act.renew(ctx)));
        self.timers.push(ctx.run_interval(FENCE_CHECK, |act, ctx| {
            let effects = act.run.check_fence();
            act.carry_out(effects, ctx);
        }));
        let rows = std::mem::take(&mut self.rows);
        let chain = std::mem::take(&mut self.chain);
        let effects = self.run.start(&rows, &self.deps.settings, &chain);
        self.carry_out(effects, ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // The disks' NBD servers stop with the worker.
        if let Some(mut w) = self.vsphere.take() {
            w.stop();
        }
    }
}

impl Handler<VsphereDone> for JobAggregator {
    type Result = ();

    fn handle(&mut self, m: VsphereDone, ctx: &mut Context<Self>) {
        let effects = self.run.vsphere(m.0);
        self.carry_out(effects, ctx);
    }
}

impl Handler<DiskReport> for JobAggregator {
    type Result = ();

    fn handle(&mut self, r: DiskReport, ctx: &mut Context<Self>) {
        let mut copy_seconds = None;
        match &r.kind {
            DiskReportKind::Started => {
                self.disk_started.insert(r.disk_id.clone(), Instant::now());
            }
            DiskReportKind::Finished(_) => {
                if let Some(c) = self.copiers.remove(&r.disk_id) {
                    c.do_send(Dismiss);
                }
                copy_seconds = self.disk_started.remove(&r.disk_id).map(|s| s.elapsed().as_secs_f64());
            }
            _ => {}
        }
        let effects = self.run.report(&r.disk_id, r.kind, copy_seconds);
        self.carry_out(effects, ctx);
    }
}

impl Handler<Stalled> for JobAggregator {
    type Result = ();
    fn handle(&mut self, m: Stalled, ctx: &mut Context<Self>) {
        let effects = self.run.stalled(m.idle);
        self.carry_out(effects, ctx);
    }
}

impl Handler<CancelJob> for JobAggregator {
    type Result = ();
    fn handle(&mut self, _: CancelJob, ctx: &mut Context<Self>) {
        let effects = self.run.cancel();
        self.carry_out(effects, ctx);
    }
}

impl Handler<SetLimit> for JobAggregator {
    type Result = ();
    fn handle(&mut self, m: SetLimit, _: &mut Context<Self>) {
        self.set_limit(m.max_rate, m.by);
    }
}

impl Handler<Suspend> for JobAggregator {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Suspend, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.ending {
            // Already ended: nothing to suspend.
            let _ = tx.send(());
        } else {
            self.suspend_waiters.push(tx);
        }
        let effects = self.run.suspend();
        self.carry_out(effects, ctx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<GetLive> for JobAggregator {
    type Result = MessageResult<GetLive>;
    fn handle(&mut self, _: GetLive, _: &mut Context<Self>) -> Self::Result {
        let t = &self.run.t;
        let now = Utc::now();
        MessageResult(LiveJob {
            job_id: t.job_id.clone(),
            replication_type: t.replication_type,
            status: t.status,
            operation: t.operation.as_str().to_string(),
            started_at: t.started_at,
            total_bytes: t.planned(),
            bytes_transferred: t.done(),
            throughput_bps: t.throughput(),
            percent: t.percent(),
            eta_seconds: t.eta_seconds(),
            retries: t.disks.iter().map(|d| d.retries).sum(),
            max_rate: self.limit.in_force(),
            limited: t.disks.iter().any(|d| d.limited),
            disks: t
                .disks
                .iter()
                .map(|d| LiveDisk {
                    disk_id: d.disk_id.clone(),
                    label: d.label.clone(),
                    status: d.status,
                    planned_bytes: d.planned,
                    bytes_transferred: d.done.min(d.planned),
                    throughput_bps: d.throughput,
                    percent: d.percent(),
                    connected: d.copying,
                    connected_at: self
                        .disk_started
                        .get(&d.disk_id)
                        .filter(|_| d.copying)
                        .and_then(|at| chrono::TimeDelta::from_std(at.elapsed()).ok())
                        .map(|ago| (now - ago).naive_utc()),
                    retries: d.retries,
                    previous_change_id: d.previous_change_id.clone(),
                    change_id: d.change_id.clone(),
                })
                .collect(),
        })
    }
}
