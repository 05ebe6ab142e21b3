//! The DbWriter's executor: the one thread that holds a database connection and
//! makes the blocking diesel calls, and the guard thread that holds every call
//! to a deadline. Both are owned by [`ExecThreads`] and joined by its `stop`,
//! after the actor system has gone: a thread that touched the database must not
//! outlive `main` (the MySQL client's TLS library tears down per-thread state
//! that its exit handlers would free a second time).
//!
//! Deadlines: the client library would wait forever for a server that stopped
//! answering, and diesel offers none of its timeouts, so every call is
//! registered with the guard, which cuts the connection's socket when the call
//! overruns (see `db::deadline`). The call then fails at once as "unavailable",
//! the connection is dropped, and the next call reconnects. Connecting (and
//! taking the node lock) has `database.connect_timeout`; every statement
//! `database.timeout`; migrations longer, since they may wait for another
//! daemon's.
//!
//! The DbWriter reaches the thread through [`ExecClient`], a small actor, so
//! that a test can stand in for the database with an actor of its own.

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::messages::*;
use crate::config::Settings;
use crate::db::{self, DbError, Owner};

/// How long a migration may take (it may wait for another daemon's first).
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long taking the node lock may wait for a daemon that just died.
const NODE_LOCK_WAIT: Duration = Duration::from_secs(3);
/// How often the guard looks at the call in progress.
const GUARD_TICK: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------- guard ----

/// The call in progress, as the guard sees it.
struct Busy {
    what: String,
    limit: Duration,
    deadline: Instant,
    cut: bool,
}

#[derive(Default)]
struct GuardState {
    busy: Mutex<Option<Busy>>,
    wake: Condvar,
    /// The daemon is exiting: nobody waits for the call in progress any more.
    hurry: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
}

impl GuardState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Busy>> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn begin(&self, what: impl Into<String>, limit: Duration) {
        *self.lock() = Some(Busy { what: what.into(), limit, deadline: Instant::now() + limit, cut: false });
    }

    /// Ends the call; whether the guard cut it.
    fn end(&self) -> Option<(String, Duration)> {
        self.lock().take().filter(|b| b.cut).map(|b| (b.what, b.limit))
    }
}

/// The guard thread: cuts the connection of a call that overran its deadline.
fn guard(state: Arc<GuardState>, peer: Option<db::deadline::Peer>) {
    let mut busy = state.lock();
    while !state.stop.load(std::sync::atomic::Ordering::SeqCst) {
        let hurry = state.hurry.load(std::sync::atomic::Ordering::SeqCst);
        if let Some(b) = busy.as_mut()
            && !b.cut
            && (hurry || Instant::now() >= b.deadline)
        {
            b.cut = true;
            let (what, limit) = (b.what.clone(), b.limit);
            drop(busy);
            let cut = peer.as_ref().map_or(0, db::deadline::cut_connections);
            if hurry {
                tracing::info!("stopping: cut the database call in progress ({what})");
            } else {
                tracing::warn!(
                    "the database did not answer within {} while {what}; cut its connection ({cut} socket(s)), will reconnect",
                    humantime::format_duration(limit)
                );
            }
            busy = state.lock();
            continue;
        }
        busy = state.wake.wait_timeout(busy, GUARD_TICK).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
    }
}

// ------------------------------------------------------------- executor ----

/// A call to the executor thread, answered on its channel.
enum Call {
    Batch(Vec<Write>, tokio::sync::oneshot::Sender<BatchDone>),
    Exec(Exec, tokio::sync::oneshot::Sender<Result<ExecReply, DbError>>),
    Stop,
}

/// Owns the database connection on the executor thread; reconnects on demand.
struct DbExec {
    url: String,
    node: String,
    conn: Option<diesel::MysqlConnection>,
    /// This process's last database session, which may still hold the node lock.
    session: Option<u64>,
    timeout: Duration,
    connect_timeout: Duration,
    guard: Arc<GuardState>,
}

impl DbExec {
    /// Runs `f` on the connection (connecting and taking the node lock first if
    /// needed), within `limit`.
    fn with_conn<T>(
        &mut self,
        what: impl FnOnce() -> String,
        limit: Duration,
        f: impl FnOnce(&mut diesel::MysqlConnection) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        if self.conn.is_none() {
            self.guard.begin("connecting to the database", self.connect_timeout + NODE_LOCK_WAIT);
            let r = guarded(|| {
                let mut conn = db::connect(&self.url)?;
                let id = db::lock_node(&mut conn, &self.node, self.session, NODE_LOCK_WAIT)?;
                Ok((conn, id))
            });
            let cut = self.guard.end();
            match (r, cut) {
                (Ok((conn, id)), None) => {
                    self.conn = Some(conn);
                    self.session = Some(id);
                }
                (Ok(_), Some((what, limit))) | (Err(_), Some((what, limit))) => {
                    return Err(DbError::Timeout { what, seconds: limit.as_secs() });
                }
                (Err(e), None) => return Err(e),
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(DbError::Internal { error: "no connection".into() });
        };
        self.guard.begin(what(), limit);
        let r = guarded(|| f(conn));
        let r = match self.guard.end() {
            // The guard shut the connection's socket down: even a call that made
            // it just in time leaves a connection that is no use.
            Some((what, limit)) => {
                self.conn = None;
                r.map_err(|_| DbError::Timeout { what, seconds: limit.as_secs() })
            }
            None => r,
        };
        if let Err(e) = &r
            && (e.is_unavailable() || matches!(e, DbError::Internal { .. }))
        {
            self.conn = None;
        }
        r
    }

    fn write(&mut self, w: &Write) -> Result<(), DbError> {
        let limit = self.timeout;
        match w {
            Write::Disk(p) => self.with_conn(
                || format!("writing disk {} of job {}", p.update.disk_id, p.update.job_id),
                limit,
                |c| db::update_disk(c, &p.owner, &p.update),
            ),
            Write::Record(r) => self.with_conn(
                || format!("recording an event of job {}", r.job_id()),
                limit,
                |c| match &r.entry {
                    Entry::Event(e) => db::insert_events(c, &r.owner, std::slice::from_ref(e)).map(drop),
                    Entry::Cbt(cbt) => db::record_cbt(c, &r.owner, cbt).map(drop),
                },
            ),
            Write::Job(u) => self.with_conn(|| format!("writing job {}", u.id), limit, |c| db::update_job(c, u)),
            Write::Release(r) => self.with_conn(
                || format!("releasing the lease on job {}", r.job_id),
                limit,
                |c| db::release_lease(c, &r.job_id, &r.owner).map(drop),
            ),
        }
    }

    fn batch(&mut self, writes: Vec<Write>) -> BatchDone {
        let mut done = BatchDone { jobs: 0, disks: 0, records: 0, unwritten: Vec::new(), error: None };
        let mut it = writes.into_iter();
        while let Some(w) = it.next() {
            match self.write(&w) {
                Ok(()) => match w {
                    Write::Job(_) => done.jobs += 1,
                    Write::Disk(_) => done.disks += 1,
                    Write::Record(_) => done.records += 1,
                    Write::Release(_) => {}
                },
                Err(e) if e.is_unavailable() => {
                    done.unwritten.push(w);
                    done.unwritten.extend(it);
                    done.error = Some(e);
                    break;
                }
                // Refused, not unavailable (e.g. an illegal transition because the
                // operator cancelled the job meanwhile, or a job this run no longer
                // owns): retrying cannot help.
                Err(e) => tracing::warn!(error = %e, "database refused a write; dropped"),
            }
        }
        done
    }

    fn exec(&mut self, msg: Exec) -> Result<ExecReply, DbError> {
        let limit = self.timeout;
        match msg {
            Exec::Migrate => {
                self.with_conn(|| "applying migrations".into(), MIGRATE_TIMEOUT, db::migrate).map(ExecReply::Migrated)
            }
            Exec::Claim(m) => {
                self.with_conn(|| "claiming jobs".into(), limit, |c| claim(c, &m)).map(ExecReply::Claimed)
            }
            Exec::Renew(m) => self
                .with_conn(
                    || format!("renewing the lease on job {}", m.job_id),
                    limit,
                    |c| {
                        if !db::renew_lease(c, &m.job_id, &m.owner, m.lease)? {
                            return Ok(Renewal::Lost);
                        }
                        Ok(Renewal::Held { max_rate: db::job_max_rate(c, &m.job_id)? })
                    },
                )
                .map(ExecReply::Renewed),
            Exec::Query(q) => self
                .with_conn(
                    || "answering an admin request".into(),
                    limit,
                    |c| {
                        Ok(match q {
                            Query::Ping => db::ping(c).map(|()| QueryResult::Done)?,
                            Query::ListJobs { status, limit } => QueryResult::Jobs(db::list_jobs(c, status, limit)?),
                            Query::FindJob { key } => QueryResult::Job(db::find_job(c, &key)?),
                            Query::CountJobs => QueryResult::Counts(db::count_jobs_by_status(c)?),
                            Query::Submit { job, disks } => {
                                db::insert_job(c, &job, &disks).map(|()| QueryResult::Done)?
                            }
                            Query::Cancel { job_id } => QueryResult::Status(db::cancel_job(c, &job_id)?),
                            Query::History { job_id } => QueryResult::History(db::load_cbt(c, &job_id)?),
                            Query::SetMaxRate { job_id, max_rate } => {
                                db::set_max_rate(c, &job_id, max_rate).map(|()| QueryResult::Done)?
                            }
                            Query::Events { job_id, limit } => {
                                QueryResult::Events(db::recent_events(c, &job_id, limit)?)
                            }
                            Query::LeftSnapshots => QueryResult::Snapshots(db::left_snapshots(c)?),
                            Query::ForgetSnapshot(left) => db::forget_snapshot(c, &left).map(|_| QueryResult::Done)?,
                        })
                    },
                )
                .map(ExecReply::Query),
        }
    }
}

/// Claims jobs and loads each. One that cannot be loaded fails alone, with a
/// message, and does not stop the others.
fn claim(c: &mut diesel::MysqlConnection, m: &ClaimJobs) -> Result<Vec<Claimed>, DbError> {
    let ids = db::claim_jobs(c, &m.node, m.lease, m.limit, &m.exclude)?;
    let mut claimed = Vec::with_capacity(ids.len());
    for (id, owner) in ids {
        match db::load_job(c, &id) {
            Ok((job, disks)) => {
                let chain = if job.replication_type.known() == Some(crate::state::ReplicationType::Incremental) {
                    match db::last_change_ids(c, &job.id, &job.vm_name) {
                        Ok(chain) => chain,
                        // The claimed jobs stay ours until their leases expire.
                        Err(e) if e.is_unavailable() => return Err(e),
                        Err(e) => {
                            tracing::error!(job_id = %id, error = %e, "cannot read the change-ID chain; failing the job");
                            fail_claimed(c, &id, &owner, &format!("cannot read the change-ID chain: {e}"));
                            continue;
                        }
                    }
                } else {
                    Default::default()
                };
                claimed.push(Claimed { job, disks, owner, chain })
            }
            // The claimed jobs stay ours until their leases expire.
            Err(e) if e.is_unavailable() => return Err(e),
            Err(e) => {
                tracing::error!(job_id = %id, error = %e, "claimed a job that cannot be read; failing it");
                fail_claimed(c, &id, &owner, &format!("cannot read the job: {e}"));
            }
        }
    }
    Ok(claimed)
}

/// Marks a claimed job failed with `message` and releases it, as its owner.
fn fail_claimed(c: &mut diesel::MysqlConnection, id: &str, owner: &Owner, message: &str) {
    let u = crate::db::JobUpdate {
        id: id.to_string(),
        owner: Some(owner.clone()),
        status: Some(crate::state::JobStatus::Failed),
        error_message: Some(message.to_string()),
        completed_at: Some(chrono::Utc::now().naive_utc()),
        ..Default::default()
    };
    if let Err(e) = db::update_job(c, &u).and_then(|()| db::release_lease(c, id, owner).map(drop)) {
        tracing::error!(job_id = %id, error = %e, "cannot mark the job failed");
    }
}

/// Runs one database call, turning a panic into an error: a panic would end the
/// executor's thread, and with it every later write.
pub fn guarded<T>(f: impl FnOnce() -> Result<T, DbError>) -> Result<T, DbError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = super::panic_message(&*panic);
        tracing::error!(panic = %what, "database call panicked");
        Err(DbError::Internal { error: format!("database call panicked: {what}") })
    })
}

fn run(mut exec: DbExec, calls: mpsc::Receiver<Call>) {
    while let Ok(call) = calls.recv() {
        match call {
            Call::Batch(writes, reply) => {
                let _ = reply.send(exec.batch(writes));
            }
            Call::Exec(msg, reply) => {
                let _ = reply.send(exec.exec(msg));
            }
            Call::Stop => break,
        }
    }
    // The connection is closed here, on the thread that made it.
    exec.conn = None;
}

// --------------------------------------------------------------- owners ----

/// The executor's two threads, until `stop` joins them.
pub struct ExecThreads {
    calls: mpsc::Sender<Call>,
    exec: Option<JoinHandle<()>>,
    guard: Option<JoinHandle<()>>,
    state: Arc<GuardState>,
}

impl ExecThreads {
    /// Starts the threads. Nothing connects until the first call.
    pub fn spawn(settings: &Settings, node: &str) -> std::io::Result<Self> {
        let state = Arc::new(GuardState::default());
        let exec = DbExec {
            url: settings.database.url.clone(),
            node: node.to_string(),
            conn: None,
            session: None,
            timeout: settings.database.timeout,
            connect_timeout: settings.database.connect_timeout,
            guard: state.clone(),
        };
        let peer = db::deadline::Peer::of(&settings.database.url);
        let (calls, rx) = mpsc::channel();
        let g = state.clone();
        let guard = std::thread::Builder::new().name("db-guard".into()).spawn(move || guard(g, peer))?;
        let exec = match std::thread::Builder::new().name("db-exec".into()).spawn(move || run(exec, rx)) {
            Ok(h) => h,
            Err(e) => {
                state.stop.store(true, std::sync::atomic::Ordering::SeqCst);
                state.wake.notify_all();
                let _ = guard.join();
                return Err(e);
            }
        };
        Ok(Self { calls, exec: Some(exec), guard: Some(guard), state })
    }

    /// The actor through which the DbWriter calls the executor (inside a system).
    pub fn client(&self) -> Addr<ExecClient> {
        ExecClient { calls: self.calls.clone() }.start()
    }

    /// Cuts the call in progress, if any (nobody waits for its answer any more),
    /// then joins both threads.
    pub fn stop(mut self) {
        let _ = self.calls.send(Call::Stop);
        self.state.hurry.store(true, std::sync::atomic::Ordering::SeqCst);
        self.state.wake.notify_all();
        if let Some(h) = self.exec.take()
            && h.join().is_err()
        {
            tracing::error!("the database thread panicked");
        }
        self.state.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.state.wake.notify_all();
        if let Some(h) = self.guard.take() {
            let _ = h.join();
        }
        tracing::info!("stopped: database threads (joined)");
    }
}

/// Forwards the DbWriter's calls to the executor thread.
pub struct ExecClient {
    calls: mpsc::Sender<Call>,
}

impl Actor for ExecClient {
    type Context = Context<Self>;
}

fn gone() -> DbError {
    DbError::Internal { error: "the database thread has stopped".into() }
}

impl Handler<Batch> for ExecClient {
    type Result = ResponseFuture<BatchDone>;
    fn handle(&mut self, Batch(writes): Batch, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Err(mpsc::SendError(Call::Batch(writes, _))) = self.calls.send(Call::Batch(writes, tx)) {
            return Box::pin(async move { BatchDone::failed(writes, gone()) });
        }
        Box::pin(async move { rx.await.unwrap_or_else(|_| BatchDone::failed(Vec::new(), gone())) })
    }
}

impl Handler<Exec> for ExecClient {
    type Result = ResponseFuture<Result<ExecReply, DbError>>;
    fn handle(&mut self, msg: Exec, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = self.calls.send(Call::Exec(msg, tx)).is_ok();
        Box::pin(async move { if sent { rx.await.unwrap_or_else(|_| Err(gone())) } else { Err(gone()) } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_database_call_is_an_error() {
        assert!(
            matches!(guarded(|| -> Result<(), DbError> { panic!("boom") }), Err(DbError::Internal { error }) if error.contains("boom"))
        );
        assert!(matches!(guarded(|| Ok(7)), Ok(7)));
    }

    #[test]
    fn the_guard_reports_a_call_it_cut() {
        let state = Arc::new(GuardState::default());
        let g = state.clone();
        let guard = std::thread::spawn(move || guard(g, None));
        state.begin("waiting for nothing", Duration::from_millis(50));
        let end = Instant::now() + Duration::from_secs(10);
        while !state.lock().as_ref().is_some_and(|b| b.cut) {
            assert!(Instant::now() < end, "the guard did not act");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(state.end().map(|(w, _)| w).as_deref(), Some("waiting for nothing"));
        state.begin("quick", Duration::from_secs(60));
        assert_eq!(state.end(), None, "a call within its deadline was not cut");
        state.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        state.wake.notify_all();
        guard.join().unwrap();
    }
}
