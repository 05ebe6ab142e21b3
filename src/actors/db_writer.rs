//! The DbWriter: the only actor that touches the database.
//!
//! [`DbWriter`] is an async actor that never blocks: it receives progress,
//! throttles it per job and per disk with [`Throttle`] (`throttle.rs`, which also
//! merges pending updates), drops a state that changes no value of what it last
//! wrote for the row ([`Written`]: a stalled copy leaves `updated_at` alone),
//! coalesces it to the latest state, and every tick
//! hands one batch to the executor (`db_exec`), the one thread that owns the
//! connection and does the blocking diesel calls, each under a deadline. At most
//! one batch is in flight, so while the database is slow or away, updates pile
//! up as one latest state per row rather than as a queue; when a batch fails it
//! goes back into the pending state and is retried after `retry_interval`.
//! Queries (claiming jobs, leases, the admin's commands) go straight to the
//! executor, the admin's reads to its reader threads (see `db_exec`). Every write carries the owner (node and run) of its job, and the
//! database applies it only while that owner holds the job.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use actix::prelude::*;
use tokio::time::Instant;

use super::messages::*;
use super::throttle::{Key, Throttle, Written, disk_mark, job_mark, merge_disk, merge_job};
use crate::config::Settings;
use crate::db::{DbError, JobUpdate};

/// How often the writer looks for due writes.
const TICK: Duration = Duration::from_millis(200);
/// Most append-only records kept while the database is away; older ones are
/// dropped (and counted as failures) beyond this.
const MAX_RECORDS: usize = 100_000;

type Answer<T> = tokio::sync::oneshot::Sender<Result<T, DbError>>;

/// See the module documentation.
pub struct DbWriter {
    /// The executor, as two recipients so that a test can stand in for it.
    batches: Recipient<Batch>,
    exec: Recipient<Exec>,
    throttle: Throttle,
    /// What was last handed to the database per row: unchanged rows are not rewritten.
    written: Written,
    retry_interval: Duration,
    jobs: BTreeMap<String, JobUpdate>,
    disks: BTreeMap<(String, String), PersistDisk>,
    records: VecDeque<Record>,
    releases: Vec<ReleaseLease>,
    /// Renewals waiting for the next batch, and those in the batch in flight.
    renewals: Vec<(RenewLease, Answer<Renewal>)>,
    renewing: Vec<Answer<Renewal>>,
    in_flight: bool,
    /// Writes in the batch in flight (part of the backlog).
    in_flight_writes: usize,
    /// No batch before this (the database failed recently).
    retry_at: Option<Instant>,
    flush_waiters: Vec<tokio::sync::oneshot::Sender<Result<(), DbError>>>,
    /// Ending jobs waiting for their last writes ([`JobWritten`]).
    job_waiters: Vec<(String, tokio::sync::oneshot::Sender<Result<(), DbError>>)>,
    stats: DbStats,
}

impl DbWriter {
    /// The writer (not yet started), calling the executor through `exec`.
    pub fn new(settings: &Settings, exec: &Addr<super::db_exec::ExecClient>) -> Self {
        Self::with_executor(settings, exec.clone().recipient(), exec.clone().recipient())
    }

    pub fn with_executor(settings: &Settings, batches: Recipient<Batch>, exec: Recipient<Exec>) -> Self {
        Self {
            batches,
            exec,
            throttle: Throttle::new(settings.progress.min_percent_step, settings.progress.min_interval),
            written: Written::default(),
            retry_interval: settings.database.retry_interval,
            jobs: BTreeMap::new(),
            disks: BTreeMap::new(),
            records: VecDeque::new(),
            releases: Vec::new(),
            renewals: Vec::new(),
            renewing: Vec::new(),
            in_flight: false,
            in_flight_writes: 0,
            retry_at: None,
            flush_waiters: Vec::new(),
            job_waiters: Vec::new(),
            stats: DbStats { available: true, ..DbStats::default() },
        }
    }

    fn pending(&self) -> usize {
        self.jobs.len() + self.disks.len() + self.records.len() + self.releases.len() + self.renewals.len()
    }

    /// Something of `job` waits to be written, or may be in the batch in flight.
    fn holds(&self, job: &str) -> bool {
        self.in_flight
            || self.jobs.contains_key(job)
            || self.disks.keys().any(|(j, _)| j == job)
            || self.releases.iter().any(|r| r.job_id == job)
    }

    /// Answers the ending jobs whose writes are all out, or all of them with
    /// `error` (the database is away: their rows catch up later).
    fn answer_jobs(&mut self, error: Option<&DbError>) {
        let waiters = std::mem::take(&mut self.job_waiters);
        for (job, w) in waiters {
            match error {
                Some(e) => {
                    let _ = w.send(Err(DbError::Unflushed { error: e.to_string() }));
                }
                None if !self.holds(&job) => {
                    let _ = w.send(Ok(()));
                }
                None => self.job_waiters.push((job, w)),
            }
        }
    }

    /// Takes what is due into a batch and sends it, unless one is in flight.
    fn send_due(&mut self, ctx: &mut Context<Self>, all: bool) {
        let now = Instant::now();
        if self.in_flight || self.retry_at.is_some_and(|t| now < t) {
            return;
        }
        let mut batch = Vec::new();
        // A job whose lease is being released gets its last figures written first,
        // in the same batch: afterwards the rows are no longer ours to update.
        let releasing: std::collections::HashSet<&str> = self.releases.iter().map(|r| r.job_id.as_str()).collect();
        let due_disks: Vec<_> = self
            .disks
            .keys()
            .filter(|(j, d)| {
                all || releasing.contains(j.as_str()) || self.throttle.due(&Key::Disk(j.clone(), d.clone()), now)
            })
            .cloned()
            .collect();
        for k in due_disks {
            if let Some(u) = self.disks.remove(&k) {
                // A state that changes no value of the row is dropped unwritten.
                let Some(state) = self.written.disk_change(&u) else { continue };
                self.written.wrote_disk(state);
                let key = Key::Disk(k.0, k.1);
                self.throttle.wrote(&key, disk_mark(&u.update), now);
                batch.push(Write::Disk(u));
            }
        }
        batch.extend(self.records.drain(..).map(Write::Record));
        let due_jobs: Vec<_> = self
            .jobs
            .keys()
            .filter(|j| all || releasing.contains(j.as_str()) || self.throttle.due(&Key::Job((*j).clone()), now))
            .cloned()
            .collect();
        for k in due_jobs {
            if let Some(u) = self.jobs.remove(&k) {
                let Some(state) = self.written.job_change(&u) else { continue };
                let terminal = u.status.is_some_and(|s| s.is_terminal());
                let key = Key::Job(k);
                self.throttle.wrote(&key, job_mark(&u), now);
                if terminal {
                    self.throttle.forget_job(&u.id);
                    self.written.forget_job(&u.id);
                } else {
                    self.written.wrote_job(state);
                }
                batch.push(Write::Job(u));
            }
        }
        for r in &self.releases {
            self.throttle.forget_job(&r.job_id);
            self.written.forget_job(&r.job_id);
        }
        batch.append(&mut self.releases.drain(..).map(Write::Release).collect());
        for (m, answer) in self.renewals.drain(..) {
            batch.push(Write::Renew(m));
            self.renewing.push(answer);
        }
        if batch.is_empty() {
            self.answer_flushes(Ok(()));
            return;
        }
        self.in_flight = true;
        self.in_flight_writes = batch.len();
        self.batches
            .send(Batch(batch))
            .into_actor(self)
            .map(|res, act, ctx| {
                act.in_flight = false;
                act.in_flight_writes = 0;
                let done = res.unwrap_or_else(|e| {
                    BatchDone::failed(Vec::new(), DbError::Internal { error: format!("database thread gone: {e}") })
                });
                act.batch_done(done, ctx);
            })
            .spawn(ctx);
    }

    fn batch_done(&mut self, mut done: BatchDone, ctx: &mut Context<Self>) {
        let mut answers = std::mem::take(&mut done.renewals).into_iter();
        for answer in self.renewing.drain(..) {
            let _ = answer.send(answers.next().ok_or_else(|| DbError::Unflushed {
                error: done.error.as_ref().map_or_else(|| "no answer".to_string(), |e| e.to_string()),
            }));
        }
        self.stats.job_updates += done.jobs;
        self.stats.disk_updates += done.disks;
        self.stats.records += done.records;
        match done.error {
            None => {
                if !self.stats.available {
                    tracing::info!("database reachable again; catching up");
                }
                self.stats.available = true;
                self.retry_at = None;
                self.answer_jobs(None);
                if !self.job_waiters.is_empty() {
                    // Their releases and last rows go out now, not at the next tick.
                    self.send_due(ctx, false);
                }
                if self.pending() == 0 {
                    self.answer_flushes(Ok(()));
                } else if !self.flush_waiters.is_empty() {
                    self.send_due(ctx, true);
                }
            }
            // Another writer held the rows (two daemons' batches, or a claim):
            // the database is fine; everything goes back and out again at the
            // next tick.
            Some(e) if e.is_lock_conflict() => {
                tracing::info!(error = %e, "a batch of writes met another transaction's locks; writing it again");
                self.put_back(done.unwritten);
                // Whoever waits for a flush (a stop, a claim) waits for the retry.
                if !self.flush_waiters.is_empty() {
                    self.send_due(ctx, true);
                }
            }
            Some(e) => {
                self.stats.failures += 1;
                if self.stats.available {
                    tracing::warn!(error = %e, "database unavailable; progress is kept and written when it returns");
                }
                self.stats.available = false;
                self.retry_at = Some(Instant::now() + self.retry_interval);
                self.put_back(done.unwritten);
                self.answer_jobs(Some(&e));
                self.answer_flushes(Err(e));
            }
        }
        self.stats.pending = self.pending() as u64;
    }

    /// Unwritten writes go back under what arrived since (newer fields win).
    fn put_back(&mut self, unwritten: Vec<Write>) {
        let mut records = VecDeque::new();
        for w in unwritten {
            match w {
                Write::Job(u) => {
                    let key = Key::Job(u.id.clone());
                    let merged = match self.jobs.remove(&u.id) {
                        Some(newer) => merge_job(u, newer),
                        None => u,
                    };
                    self.throttle.retry(&key);
                    self.written.forget(&key);
                    self.jobs.insert(merged.id.clone(), merged);
                }
                Write::Disk(u) => {
                    let k = (u.update.job_id.clone(), u.update.disk_id.clone());
                    let merged = match self.disks.remove(&k) {
                        Some(newer) => merge_disk(u, newer),
                        None => u,
                    };
                    let key = Key::Disk(k.0.clone(), k.1.clone());
                    self.throttle.retry(&key);
                    self.written.forget(&key);
                    self.disks.insert(k, merged);
                }
                Write::Record(r) => records.push_back(r),
                Write::Release(r) => self.releases.insert(0, r),
                // Answered with the error; the job renews again on its own schedule.
                Write::Renew(_) => {}
            }
        }
        records.extend(self.records.drain(..));
        while records.len() > MAX_RECORDS {
            records.pop_front();
            self.stats.failures += 1;
        }
        self.records = records;
    }

    fn answer_flushes(&mut self, r: Result<(), DbError>) {
        for w in self.flush_waiters.drain(..) {
            let reply = match &r {
                Ok(()) => Ok(()),
                Err(e) => Err(DbError::Unflushed { error: e.to_string() }),
            };
            let _ = w.send(reply);
        }
    }

    fn exec<T: 'static>(
        &self,
        msg: Exec,
        pick: impl FnOnce(ExecReply) -> Option<T> + 'static,
    ) -> ResponseFuture<Result<T, DbError>> {
        let fut = self.exec.send(msg);
        Box::pin(async move {
            match fut.await {
                Ok(Ok(reply)) => pick(reply).ok_or_else(|| DbError::Internal { error: "unexpected reply".into() }),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(DbError::Internal { error: format!("database thread gone: {e}") }),
            }
        })
    }
}

impl Actor for DbWriter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(TICK, |act, ctx| act.send_due(ctx, false));
    }
}

impl Supervised for DbWriter {
    fn restarting(&mut self, _: &mut Context<Self>) {
        tracing::warn!("db writer restarting");
        self.in_flight = false;
        self.in_flight_writes = 0;
        self.renewing.clear();
    }
}

impl Handler<PersistJob> for DbWriter {
    type Result = ();
    fn handle(&mut self, PersistJob(u): PersistJob, ctx: &mut Context<Self>) {
        let key = Key::Job(u.id.clone());
        let merged = match self.jobs.remove(&u.id) {
            Some(older) => merge_job(older, u),
            None => u,
        };
        self.throttle.offer(&key, &job_mark(&merged));
        let urgent = merged.status.is_some_and(|s| s.is_terminal());
        self.jobs.insert(merged.id.clone(), merged);
        if urgent {
            self.send_due(ctx, false);
        }
    }
}

impl Handler<PersistDisk> for DbWriter {
    type Result = ();
    fn handle(&mut self, u: PersistDisk, _: &mut Context<Self>) {
        let k = (u.update.job_id.clone(), u.update.disk_id.clone());
        let merged = match self.disks.remove(&k) {
            Some(older) => merge_disk(older, u),
            None => u,
        };
        self.throttle.offer(&Key::Disk(k.0.clone(), k.1.clone()), &disk_mark(&merged.update));
        self.disks.insert(k, merged);
    }
}

impl Handler<Record> for DbWriter {
    type Result = ();
    fn handle(&mut self, r: Record, _: &mut Context<Self>) {
        self.records.push_back(r);
    }
}

impl Handler<ReleaseLease> for DbWriter {
    type Result = ();
    fn handle(&mut self, r: ReleaseLease, ctx: &mut Context<Self>) {
        self.releases.push(r);
        self.send_due(ctx, false);
    }
}

impl Handler<Flush> for DbWriter {
    type Result = ResponseFuture<Result<(), DbError>>;
    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.flush_waiters.push(tx);
        self.retry_at = None;
        self.send_due(ctx, true);
        Box::pin(async move { rx.await.unwrap_or(Ok(())) })
    }
}

impl Handler<JobWritten> for DbWriter {
    type Result = ResponseFuture<Result<(), DbError>>;
    fn handle(&mut self, m: JobWritten, ctx: &mut Context<Self>) -> Self::Result {
        if !self.holds(&m.job_id) {
            return Box::pin(async { Ok(()) });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.job_waiters.push((m.job_id, tx));
        self.send_due(ctx, false);
        Box::pin(async move { rx.await.unwrap_or(Ok(())) })
    }
}

impl Handler<ClaimJobs> for DbWriter {
    type Result = ResponseFuture<Result<Vec<Claimed>, DbError>>;

    /// Claims only after everything queued before the claim is written: a job
    /// that just ended here has its final status and lease release pending, and
    /// claiming before they land would find it live and ours, and run it again.
    fn handle(&mut self, m: ClaimJobs, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.flush_waiters.push(tx);
        self.send_due(ctx, true);
        let claim = self.exec.clone();
        Box::pin(async move {
            // A failed flush (database away) makes the claim fail the same way.
            let _ = rx.await;
            match claim.send(Exec::Claim(m)).await {
                Ok(Ok(ExecReply::Claimed(v))) => Ok(v),
                Ok(Ok(_)) => Err(DbError::Internal { error: "unexpected reply".into() }),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(DbError::Internal { error: format!("database thread gone: {e}") }),
            }
        })
    }
}

impl Handler<RenewLease> for DbWriter {
    type Result = ResponseFuture<Result<Renewal, DbError>>;
    fn handle(&mut self, m: RenewLease, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.renewals.push((m, tx));
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| Err(DbError::Internal { error: "the database writer restarted".into() }))
        })
    }
}

impl Handler<Query> for DbWriter {
    type Result = ResponseFuture<Result<QueryResult, DbError>>;
    fn handle(&mut self, q: Query, _: &mut Context<Self>) -> Self::Result {
        self.exec(Exec::Query(q), |r| match r {
            ExecReply::Query(q) => Some(q),
            _ => None,
        })
    }
}

impl Handler<Migrate> for DbWriter {
    type Result = ResponseFuture<Result<Vec<String>, DbError>>;
    fn handle(&mut self, _: Migrate, _: &mut Context<Self>) -> Self::Result {
        self.exec(Exec::Migrate, |r| match r {
            ExecReply::Migrated(v) => Some(v),
            _ => None,
        })
    }
}

impl Handler<Ping> for DbWriter {
    type Result = ();
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) {}
}

impl Handler<GetDbStats> for DbWriter {
    type Result = MessageResult<GetDbStats>;
    fn handle(&mut self, _: GetDbStats, _: &mut Context<Self>) -> Self::Result {
        self.stats.pending = (self.pending() + self.in_flight_writes) as u64;
        MessageResult(self.stats)
    }
}

impl Handler<Reconfigure> for DbWriter {
    type Result = ();
    fn handle(&mut self, Reconfigure(s): Reconfigure, _: &mut Context<Self>) {
        self.throttle.step = s.progress.min_percent_step;
        self.throttle.interval = s.progress.min_interval;
        self.retry_interval = s.database.retry_interval;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{DiskUpdate, Owner};
    use crate::state::{JobStatus, Operation};

    /// Stands in for the executor: records what reaches the database, in order.
    #[derive(Default)]
    struct FakeDb(Vec<String>);
    impl Actor for FakeDb {
        type Context = Context<Self>;
    }
    impl Handler<Batch> for FakeDb {
        type Result = MessageResult<Batch>;
        fn handle(&mut self, Batch(writes): Batch, _: &mut Context<Self>) -> Self::Result {
            for w in &writes {
                self.0.push(match w {
                    Write::Job(u) => format!("job {}", u.status.map(|s| s.as_db()).unwrap_or("-")),
                    Write::Disk(u) => format!("disk {}", u.update.disk_id),
                    Write::Record(_) => "record".into(),
                    Write::Release(r) => format!("release {}", r.job_id),
                    Write::Renew(m) => format!("renew {}", m.job_id),
                });
            }
            let renewals = writes.iter().filter(|w| matches!(w, Write::Renew(_))).map(|_| Renewal::Lost).collect();
            MessageResult(BatchDone { renewals, ..BatchDone::default() })
        }
    }
    impl Handler<Exec> for FakeDb {
        type Result = Result<ExecReply, DbError>;
        fn handle(&mut self, m: Exec, _: &mut Context<Self>) -> Self::Result {
            match m {
                Exec::Claim(_) => {
                    self.0.push("claim".into());
                    Ok(ExecReply::Claimed(Vec::new()))
                }
                _ => Err(DbError::NotFound { job: "fake".into() }),
            }
        }
    }
    #[derive(Message)]
    #[rtype(result = "Vec<String>")]
    struct Take;
    impl Handler<Take> for FakeDb {
        type Result = MessageResult<Take>;
        fn handle(&mut self, _: Take, _: &mut Context<Self>) -> Self::Result {
            MessageResult(std::mem::take(&mut self.0))
        }
    }

    fn writer(fake: &Addr<FakeDb>) -> Addr<DbWriter> {
        let settings = crate::config::Settings::defaults();
        DbWriter::with_executor(&settings, fake.clone().recipient(), fake.clone().recipient()).start()
    }

    fn update(percent: f64, status: JobStatus) -> JobUpdate {
        JobUpdate {
            id: "j".into(),
            status: Some(status),
            current_operation: Some(Operation::Transfer),
            progress_percent: Some(percent),
            ..JobUpdate::default()
        }
    }

    #[actix_rt::test]
    async fn the_writer_throttles_progress_on_a_paused_clock() {
        tokio::time::pause();
        let fake = FakeDb::default().start();
        let w = writer(&fake);
        // 0.02 points every 100 ms for 10 s: never a full point between writes,
        // so the 2 s interval alone decides.
        for i in 0..100 {
            w.do_send(PersistJob(update(f64::from(i) * 0.02, JobStatus::Streaming)));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let writes = fake.send(Take).await.unwrap();
        assert!((5..=6).contains(&writes.len()), "one write per 2 s over 10 s: {writes:?}");
        // A status change goes out at the next tick (200 ms), not 2 s later.
        w.do_send(PersistJob(update(2.0, JobStatus::Finalizing)));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(fake.send(Take).await.unwrap(), vec!["job finalizing"]);
        // A terminal state at once, without waiting for a tick.
        w.do_send(PersistJob(update(100.0, JobStatus::Completed)));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(fake.send(Take).await.unwrap(), vec!["job completed"]);
    }

    #[actix_rt::test]
    async fn a_claim_waits_for_the_writes_queued_before_it() {
        tokio::time::pause();
        let fake = FakeDb::default().start();
        let w = writer(&fake);
        let disk = DiskUpdate { job_id: "j".into(), disk_id: "d".into(), ..DiskUpdate::default() };
        w.do_send(PersistDisk { owner: Owner::default(), update: disk });
        // A job ends: its terminal state goes out at once (a batch in flight), its
        // lease release must wait for that batch, and discovery claims at once.
        w.do_send(PersistJob(update(100.0, JobStatus::Completed)));
        w.do_send(ReleaseLease { job_id: "j".into(), owner: Owner::default() });
        let claimed = w.send(ClaimJobs { node: "n".into(), lease: Duration::from_secs(60), limit: 1, exclude: vec![] });
        assert!(claimed.await.unwrap().unwrap().is_empty());
        assert_eq!(
            fake.send(Take).await.unwrap(),
            vec!["disk d", "job completed", "release j", "claim"],
            "the last figures, then the release, then the claim: a claim that came first would find the job live and ours"
        );
    }

    #[actix_rt::test]
    async fn an_ending_job_hears_once_its_last_writes_are_out_and_not_before() {
        tokio::time::pause();
        let fake = FakeDb::default().start();
        let w = writer(&fake);
        // Another job's throttled progress is not hurried by it.
        w.do_send(PersistJob(JobUpdate { id: "other".into(), ..update(10.0, JobStatus::Streaming) }));
        tokio::time::sleep(Duration::from_millis(250)).await;
        w.do_send(PersistJob(JobUpdate { id: "other".into(), ..update(10.5, JobStatus::Streaming) }));
        let disk = DiskUpdate { job_id: "j".into(), disk_id: "d".into(), ..DiskUpdate::default() };
        w.do_send(PersistDisk { owner: Owner::default(), update: disk });
        w.do_send(PersistJob(update(100.0, JobStatus::Completed)));
        w.do_send(ReleaseLease { job_id: "j".into(), owner: Owner::default() });
        w.send(JobWritten { job_id: "j".into() }).await.unwrap().unwrap();
        let out = fake.send(Take).await.unwrap();
        assert_eq!(
            out,
            vec!["job streaming", "disk d", "job completed", "release j"],
            "answered after the job's last figures and its release, without the other job's throttled write"
        );
        // Nothing of the job left: answered at once.
        w.send(JobWritten { job_id: "j".into() }).await.unwrap().unwrap();
        assert!(fake.send(Take).await.unwrap().is_empty());
    }

    /// Issue 15: renewals share the writer's batch (one transaction, two
    /// statements for all of them) and each gets its own answer.
    #[actix_rt::test]
    async fn lease_renewals_of_many_jobs_go_out_in_one_batch_with_the_progress() {
        tokio::time::pause();
        let fake = FakeDb::default().start();
        let w = writer(&fake);
        w.do_send(PersistJob(update(10.0, JobStatus::Streaming)));
        let renew =
            |job: &str| RenewLease { job_id: job.into(), owner: Owner::default(), lease: Duration::from_secs(60) };
        let (a, b) = (w.send(renew("a")), w.send(renew("b")));
        let (a, b) = tokio::join!(a, b);
        assert_eq!((a.unwrap().unwrap(), b.unwrap().unwrap()), (Renewal::Lost, Renewal::Lost), "the fake's answers");
        assert_eq!(fake.send(Take).await.unwrap(), vec!["job streaming", "renew a", "renew b"], "one batch");
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct StopNow;
    impl Handler<StopNow> for DbWriter {
        type Result = ();
        fn handle(&mut self, _: StopNow, ctx: &mut Context<Self>) {
            ctx.stop();
        }
    }

    #[derive(Message)]
    #[rtype(result = "usize")]
    struct Remembered;
    impl Handler<Remembered> for DbWriter {
        type Result = usize;
        fn handle(&mut self, _: Remembered, _: &mut Context<Self>) -> usize {
            self.throttle.remembered() + self.written.remembered() + self.jobs.len() + self.disks.len()
        }
    }

    /// Issue 15: a daemon that has run 10,000 jobs keeps nothing of them.
    #[actix_rt::test]
    async fn a_finished_or_released_job_leaves_nothing_in_the_writer() {
        tokio::time::pause();
        let fake = FakeDb::default().start();
        let w = writer(&fake);
        for job in ["a", "b"] {
            for disk in ["d1", "d2"] {
                let u = DiskUpdate { job_id: job.into(), disk_id: disk.into(), ..DiskUpdate::default() };
                w.do_send(PersistDisk { owner: Owner::default(), update: u });
            }
            w.do_send(PersistJob(JobUpdate { id: job.into(), ..update(10.0, JobStatus::Streaming) }));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Each row twice: in the throttle and as the state last written.
        assert_eq!(w.send(Remembered).await.unwrap(), 12, "two jobs of two disks are tracked");
        // One ends here; the other is released (a graceful stop, a lost lease).
        w.do_send(PersistJob(JobUpdate { id: "a".into(), ..update(100.0, JobStatus::Completed) }));
        w.do_send(ReleaseLease { job_id: "b".into(), owner: Owner::default() });
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(w.send(Remembered).await.unwrap(), 0, "{:?}", fake.send(Take).await.unwrap());
    }

    #[actix_rt::test]
    async fn a_stopped_writer_is_restarted_by_its_supervisor_and_keeps_what_it_had_not_written() {
        tokio::time::pause();
        let fake = FakeDb::default().start();
        let settings = crate::config::Settings::defaults();
        let (b, e) = (fake.clone().recipient(), fake.clone().recipient());
        let w = Supervisor::start(move |_| DbWriter::with_executor(&settings, b, e));
        w.send(PersistJob(update(1.0, JobStatus::Streaming))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(fake.send(Take).await.unwrap(), vec!["job streaming"]);
        // A small move waits for the interval; the writer stops meanwhile.
        w.send(PersistJob(update(1.5, JobStatus::Streaming))).await.unwrap();
        w.send(StopNow).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(fake.send(Take).await.unwrap(), vec!["job streaming"], "the pending write survived the restart");
        w.send(PersistJob(update(100.0, JobStatus::Completed))).await.expect("restarted");
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(fake.send(Take).await.unwrap(), vec!["job completed"]);
    }
}
