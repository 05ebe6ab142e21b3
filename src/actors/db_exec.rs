//! The database threads: the DbWriter's executor, the one thread that holds the
//! writer's connection and makes its blocking diesel calls in order; a small
//! pool of reader threads, each with a connection of its own, for the admin
//! API's reads and the health check's ping; and the guard thread that holds
//! every call of all of them to a deadline. All are owned by [`ExecThreads`]
//! and joined by its `stop`, after the actor system has gone: a thread that
//! touched the database must not outlive `main` (the MySQL client's TLS library
//! tears down per-thread state that its exit handlers would free a second time).
//! This is also why the readers are not r2d2's pool: its scheduled thread pool
//! is never joined.
//!
//! Reads apart from writes: the writer's queue stays ordered (a batch, a claim,
//! a lease renewal, an admin command such as submit or cancel, each in turn),
//! and a read of the admin API never waits behind it, so `health` and `jobs`
//! answer while the writer is stuck behind a slow statement or a backlog.
//!
//! Deadlines: the client library would wait forever for a server that stopped
//! answering, and diesel offers none of its timeouts, so every call is
//! registered with the guard, which cuts the socket of that call's connection
//! when the call overruns (see `db::deadline`; connections are made one at a
//! time, so that each knows its socket). The call then fails at once as
//! "unavailable", the connection is dropped, and the next call reconnects.
//! Connecting has `database.connect_timeout`; taking the node lock a few
//! seconds more; every statement `database.timeout`; migrations longer, since
//! they may wait for another daemon's.
//!
//! The DbWriter reaches the threads through [`ExecClient`], a small actor that
//! sends reads to the readers and everything else to the executor, so that a
//! test can stand in for the database with an actor of its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix::prelude::*;
use diesel::{Connection, MysqlConnection};

use super::messages::*;
use crate::config::Settings;
use crate::db::deadline::{Cut, Peer};
use crate::db::{self, DbError, Owner};

/// How long a migration may take (it may wait for another daemon's first).
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long taking the node lock may wait for a daemon that just died.
const NODE_LOCK_WAIT: Duration = Duration::from_secs(3);
/// How often the guard looks at the calls in progress.
const GUARD_TICK: Duration = Duration::from_millis(100);
/// How many reader threads (and so connections) answer the admin API's reads.
pub const READERS: usize = 3;

// ---------------------------------------------------------------- guard ----

/// A call in progress, as the guard sees it.
struct Busy {
    what: String,
    limit: Duration,
    deadline: Instant,
    cut: bool,
}

/// One thread's connection, as the guard sees it.
#[derive(Default)]
struct Slot {
    busy: Option<Busy>,
    /// The inode of the connection's socket, once it is known.
    socket: Option<u64>,
}

#[derive(Default)]
struct GuardState {
    slots: Mutex<Vec<Slot>>,
    wake: Condvar,
    /// Held while a connection is being made, so that the one socket that
    /// appears meanwhile is that connection's.
    connecting: Mutex<()>,
    /// The daemon is exiting: nobody waits for the calls in progress any more.
    hurry: AtomicBool,
    stop: AtomicBool,
}

impl GuardState {
    fn lock(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new slot, for one thread's connection.
    fn watch(self: &Arc<Self>) -> Watch {
        let mut slots = self.lock();
        slots.push(Slot::default());
        Watch { state: self.clone(), index: slots.len() - 1 }
    }

    fn hurrying(&self) -> bool {
        self.hurry.load(Ordering::SeqCst)
    }
}

/// One thread's handle on the guard: registers its calls and its connection's
/// socket.
struct Watch {
    state: Arc<GuardState>,
    index: usize,
}

impl Watch {
    fn with<T>(&self, f: impl FnOnce(&mut Slot) -> T) -> Option<T> {
        self.state.lock().get_mut(self.index).map(f)
    }

    fn begin(&self, what: impl Into<String>, limit: Duration) {
        let busy = Busy { what: what.into(), limit, deadline: Instant::now() + limit, cut: false };
        self.with(|s| s.busy = Some(busy));
    }

    /// Ends the call; whether the guard cut it.
    fn end(&self) -> Option<(String, Duration)> {
        self.with(|s| s.busy.take().filter(|b| b.cut).map(|b| (b.what, b.limit))).flatten()
    }

    fn set_socket(&self, socket: Option<u64>) {
        self.with(|s| s.socket = socket);
    }
}

/// The guard thread: cuts the connection of a call that overran its deadline.
fn guard(state: Arc<GuardState>, peer: Option<Peer>) {
    let mut slots = state.lock();
    while !state.stop.load(Ordering::SeqCst) {
        let hurry = state.hurrying();
        let now = Instant::now();
        let known: std::collections::BTreeSet<u64> = slots.iter().filter_map(|s| s.socket).collect();
        let overrun = slots.iter_mut().find_map(|s| match s.busy.as_mut() {
            Some(b) if !b.cut && (hurry || now >= b.deadline) => {
                b.cut = true;
                // A connection being made has no known socket yet: it is the one
                // socket to the server that no other thread knows as its own.
                let which = s.socket.map_or_else(|| Cut::AllBut(known.clone()), Cut::One);
                Some((b.what.clone(), b.limit, which))
            }
            _ => None,
        });
        if let Some((what, limit, which)) = overrun {
            drop(slots);
            let cut = peer.as_ref().map_or(0, |p| db::deadline::cut_connections(p, &which));
            if hurry {
                tracing::info!("stopping: cut the database call in progress ({what})");
            } else {
                tracing::warn!(
                    "the database did not answer within {} while {what}; cut its connection ({cut} socket(s)), will reconnect",
                    humantime::format_duration(limit)
                );
            }
            slots = state.lock();
            continue;
        }
        slots = state.wake.wait_timeout(slots, GUARD_TICK).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
    }
}

// ----------------------------------------------------------------- link ----

/// One thread's connection, made on demand and held to deadlines by the guard.
struct Link {
    url: String,
    peer: Option<Peer>,
    conn: Option<MysqlConnection>,
    connect_timeout: Duration,
    watch: Watch,
}

impl Link {
    fn new(settings: &Settings, state: &Arc<GuardState>) -> Self {
        Link {
            url: settings.database.url.clone(),
            peer: Peer::of(&settings.database.url),
            conn: None,
            connect_timeout: settings.database.connect_timeout,
            watch: state.watch(),
        }
    }

    /// Connects, one connection of this process at a time, and remembers the
    /// connection's socket for the guard.
    fn connect(&mut self) -> Result<(), DbError> {
        let _one_at_a_time = self.watch.state.connecting.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.peer.as_ref().map(db::deadline::sockets_to);
        self.watch.begin("connecting to the database", self.connect_timeout);
        let r = guarded(|| db::connect(&self.url));
        match (r, self.watch.end()) {
            (Ok(conn), None) => {
                let socket = match (&self.peer, before) {
                    (Some(peer), Some(before)) => {
                        let new: Vec<u64> = db::deadline::sockets_to(peer).difference(&before).copied().collect();
                        match new.as_slice() {
                            [one] => Some(*one),
                            _ => None,
                        }
                    }
                    _ => None,
                };
                self.watch.set_socket(socket);
                self.conn = Some(conn);
                Ok(())
            }
            (_, Some((what, limit))) => Err(DbError::Timeout { what, seconds: limit.as_secs() }),
            (Err(e), None) => Err(e),
        }
    }

    fn disconnect(&mut self) {
        self.conn = None;
        self.watch.set_socket(None);
    }

    /// Runs `f` on the connection (which must be made) within `limit`.
    fn run<T>(
        &mut self,
        what: impl FnOnce() -> String,
        limit: Duration,
        f: impl FnOnce(&mut MysqlConnection) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(DbError::Internal { error: "no connection".into() });
        };
        self.watch.begin(what(), limit);
        let r = guarded(|| f(conn));
        let r = match self.watch.end() {
            // The guard shut the connection's socket down: even a call that made
            // it just in time leaves a connection that is no use.
            Some((what, limit)) => {
                self.disconnect();
                r.map_err(|_| DbError::Timeout { what, seconds: limit.as_secs() })
            }
            None => r,
        };
        if let Err(e) = &r
            && (e.is_unavailable() || matches!(e, DbError::Internal { .. }))
        {
            self.disconnect();
        }
        r
    }
}

// ------------------------------------------------------------- executor ----

/// A call to the executor thread, answered on its channel.
enum Call {
    Batch(Vec<Write>, tokio::sync::oneshot::Sender<BatchDone>),
    Exec(Exec, tokio::sync::oneshot::Sender<Result<ExecReply, DbError>>),
    Stop,
}

/// Owns the writer's connection on the executor thread; reconnects on demand,
/// taking the node lock on every new connection.
struct DbExec {
    link: Link,
    node: String,
    /// This process's last database session, which may still hold the node lock.
    session: Option<u64>,
    timeout: Duration,
    /// The server ends the writer's session when it idles inside a transaction
    /// this long (see `db::limit_idle_transactions`): a third of the lease.
    idle_limit: Duration,
    /// Whether the server was found to have no such limit (said once).
    no_idle_limit: bool,
}

impl DbExec {
    /// Runs `f` on the connection (connecting and taking the node lock first if
    /// needed), within `limit`.
    fn with_conn<T>(
        &mut self,
        what: impl FnOnce() -> String,
        limit: Duration,
        f: impl FnOnce(&mut MysqlConnection) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        if self.link.conn.is_none() {
            self.link.connect()?;
            let (node, session) = (&self.node, self.session);
            let lock_limit = self.link.connect_timeout + NODE_LOCK_WAIT;
            match self.link.run(
                || "taking the node lock".into(),
                lock_limit,
                |c| db::lock_node(c, node, session, NODE_LOCK_WAIT),
            ) {
                Ok(id) => {
                    self.session = Some(id);
                    if let Err(e) =
                        self.link.run(|| "choosing the isolation level".into(), lock_limit, db::prefer_read_committed)
                    {
                        self.link.disconnect();
                        return Err(e);
                    }
                    let idle = self.idle_limit;
                    match self.link.run(
                        || "limiting idle transactions".into(),
                        lock_limit,
                        |c| db::limit_idle_transactions(c, idle),
                    ) {
                        Ok(true) => {}
                        Ok(false) => {
                            if !std::mem::replace(&mut self.no_idle_limit, true) {
                                tracing::warn!(
                                    "the database server cannot end idle transactions (no idle_transaction_timeout): \
                                     if this daemon is ever paused in the middle of a write, the rows it locked stay \
                                     locked until its connection ends, and another appliance waits for them"
                                );
                            }
                        }
                        Err(e) => {
                            self.link.disconnect();
                            return Err(e);
                        }
                    }
                }
                Err(e) => {
                    // Never write on a connection that does not hold the lock.
                    self.link.disconnect();
                    return Err(e);
                }
            }
        }
        self.link.run(what, limit, f)
    }

    /// Writes a batch in one transaction: all of it, or (the database being
    /// unavailable, or the transaction rolled back by a deadlock) none of it,
    /// to be tried again. Writes the database refuses one by one (an illegal
    /// transition because the operator cancelled the job meanwhile, a job this
    /// run no longer owns) are logged and dropped: retrying cannot help.
    fn batch(&mut self, writes: Vec<Write>) -> BatchDone {
        let limit = self.timeout;
        let n = writes.len();
        let r = self.with_conn(
            || format!("writing a batch of {n} changes"),
            limit,
            |c| c.transaction(|c| write_all(c, &writes)),
        );
        match r {
            Ok(done) => done,
            Err(e) if e.is_retryable() => BatchDone::failed(writes, e),
            // Not the database's state but something in the batch the server
            // cannot take (and rolled back): one write at a time, each in its
            // own transaction, so that only what is refused is lost.
            Err(e) => {
                tracing::warn!(error = %e, "database refused a batch of {n} changes; writing them one at a time");
                let mut done = BatchDone::default();
                let mut it = writes.into_iter();
                while let Some(w) = it.next() {
                    let one = std::slice::from_ref(&w);
                    match self.with_conn(
                        || "writing one change".into(),
                        limit,
                        |c| c.transaction(|c| write_all(c, one)),
                    ) {
                        Ok(d) => done.add(d),
                        Err(e) if e.is_retryable() => {
                            done.unwritten.push(w);
                            done.unwritten.extend(it);
                            done.error = Some(e);
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "database refused a write; dropped");
                            if matches!(w, Write::Renew(_)) {
                                done.renewals.push(Renewal::Lost);
                            }
                        }
                    }
                }
                done
            }
        }
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
            Exec::Query(q) => {
                self.with_conn(|| "answering an admin request".into(), limit, |c| answer(c, q)).map(ExecReply::Query)
            }
        }
    }
}

/// The writes of a batch on `c`, a few statements in all, in the batch's
/// order by kind: disks, records, jobs (a job's final status after its disks'
/// last figures), lease releases (after everything of their job), renewals.
fn write_all(c: &mut MysqlConnection, writes: &[Write]) -> Result<BatchDone, DbError> {
    let mut done = BatchDone::default();
    let disks: Vec<(&Owner, &db::DiskUpdate)> = writes
        .iter()
        .filter_map(|w| match w {
            Write::Disk(p) => Some((&p.owner, &p.update)),
            _ => None,
        })
        .collect();
    for (i, why) in db::update_disks(c, &disks)? {
        tracing::warn!(job_id = %disks[i].1.job_id, disk_id = %disks[i].1.disk_id, error = %why, "database refused a write; dropped");
    }
    done.disks = disks.len() as u64;
    let events: Vec<(&Owner, &db::NewJobEvent)> = writes
        .iter()
        .filter_map(|w| match w {
            Write::Record(Record { owner, entry: Entry::Event(e) }) => Some((owner, e)),
            _ => None,
        })
        .collect();
    db::insert_owned_events(c, &events)?;
    done.records += events.len() as u64;
    for w in writes {
        if let Write::Record(Record { owner, entry: Entry::Cbt(cbt) }) = w {
            db::record_cbt(c, owner, cbt)?;
            done.records += 1;
        }
    }
    let jobs: Vec<db::JobUpdate> = writes
        .iter()
        .filter_map(|w| match w {
            Write::Job(u) => Some(u.clone()),
            _ => None,
        })
        .collect();
    for (i, why) in db::update_jobs(c, &jobs)? {
        tracing::warn!(job_id = %jobs[i].id, error = %why, "database refused a write; dropped");
    }
    done.jobs = jobs.len() as u64;
    for w in writes {
        if let Write::Release(r) = w {
            db::release_lease(c, &r.job_id, &r.owner)?;
        }
    }
    let renewals: Vec<&RenewLease> = writes
        .iter()
        .filter_map(|w| match w {
            Write::Renew(m) => Some(m),
            _ => None,
        })
        .collect();
    // One lease length for all (the setting); a reload between two renewals
    // only moves which one applies.
    if let Some(lease) = renewals.iter().map(|m| m.lease).max() {
        let jobs: Vec<(&str, &Owner)> = renewals.iter().map(|m| (m.job_id.as_str(), &m.owner)).collect();
        done.renewals = db::renew_leases(c, &jobs, lease)?
            .into_iter()
            .map(|held| match held {
                Some(max_rate) => Renewal::Held { max_rate },
                None => Renewal::Lost,
            })
            .collect();
    }
    Ok(done)
}

/// Answers a query on `c`: the one place that maps a [`Query`] to the database
/// functions, whichever thread runs it.
fn answer(c: &mut MysqlConnection, q: Query) -> Result<QueryResult, DbError> {
    Ok(match q {
        Query::Ping => db::ping(c).map(|()| QueryResult::Done)?,
        Query::ListJobs { status, limit } => QueryResult::Jobs(db::list_jobs(c, status, limit)?),
        Query::FindJob { key } => QueryResult::Job(db::find_job(c, &key)?),
        Query::CountJobs => QueryResult::Counts(db::count_jobs_by_status(c)?),
        Query::Submit { job, disks } => db::insert_job(c, &job, &disks).map(|()| QueryResult::Done)?,
        Query::Cancel { job_id } => QueryResult::Status(db::cancel_job(c, &job_id)?),
        Query::History { job_id } => QueryResult::History(db::load_cbt(c, &job_id)?),
        Query::Limits { job_ids } => QueryResult::Limits(db::job_max_rates(c, &job_ids)?),
        Query::SetMaxRate { job_id, max_rate } => db::set_max_rate(c, &job_id, max_rate).map(|()| QueryResult::Done)?,
        Query::Events { job_id, limit } => QueryResult::Events(db::recent_events(c, &job_id, limit)?),
        Query::LeftSnapshots => QueryResult::Snapshots(db::left_snapshots(c)?),
        Query::ForgetSnapshot(left) => db::forget_snapshot(c, &left).map(|_| QueryResult::Done)?,
    })
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
    exec.link.disconnect();
}

// -------------------------------------------------------------- readers ----

/// A read for the reader threads, answered on its channel.
enum Read {
    Query(Query, tokio::sync::oneshot::Sender<Result<QueryResult, DbError>>),
    Stop,
}

/// One reader thread: takes the next read from the queue the readers share and
/// answers it on its own connection (no node lock: readers only read).
fn read(mut link: Link, timeout: Duration, reads: Arc<Mutex<mpsc::Receiver<Read>>>) {
    loop {
        let next = reads.lock().unwrap_or_else(|e| e.into_inner()).recv();
        match next {
            Ok(Read::Query(q, reply)) => {
                // Nobody waits for the answer any more (the admin request timed
                // out, or the daemon is stopping): spare the database.
                if reply.is_closed() || link.watch.state.hurrying() {
                    continue;
                }
                let r = if link.conn.is_none() { link.connect() } else { Ok(()) }
                    .and_then(|()| link.run(|| "answering an admin read".into(), timeout, |c| answer(c, q)));
                let _ = reply.send(r);
            }
            Ok(Read::Stop) | Err(_) => break,
        }
    }
    // The connection is closed here, on the thread that made it.
    link.disconnect();
}

// --------------------------------------------------------------- owners ----

/// The executor's thread, the readers' and the guard's, until `stop` joins them.
pub struct ExecThreads {
    calls: mpsc::Sender<Call>,
    reads: mpsc::Sender<Read>,
    exec: Option<JoinHandle<()>>,
    readers: Vec<JoinHandle<()>>,
    guard: Option<JoinHandle<()>>,
    state: Arc<GuardState>,
}

impl ExecThreads {
    /// Starts the threads. Nothing connects until the first call.
    pub fn spawn(settings: &Settings, node: &str) -> std::io::Result<Self> {
        let state = Arc::new(GuardState::default());
        let (calls, rx) = mpsc::channel();
        let (reads, read_rx) = mpsc::channel();
        let read_rx = Arc::new(Mutex::new(read_rx));
        let mut threads =
            ExecThreads { calls, reads, exec: None, readers: Vec::new(), guard: None, state: state.clone() };
        let peer = Peer::of(&settings.database.url);
        let g = state.clone();
        // On an error, dropping `threads` stops and joins what was started.
        threads.guard = Some(std::thread::Builder::new().name("db-guard".into()).spawn(move || guard(g, peer))?);
        let exec = DbExec {
            link: Link::new(settings, &state),
            node: node.to_string(),
            session: None,
            timeout: settings.database.timeout,
            idle_limit: settings.discovery.lease / 3,
            no_idle_limit: false,
        };
        threads.exec = Some(std::thread::Builder::new().name("db-exec".into()).spawn(move || run(exec, rx))?);
        for i in 0..READERS {
            let (link, timeout, reads) = (Link::new(settings, &state), settings.database.timeout, read_rx.clone());
            let h =
                std::thread::Builder::new().name(format!("db-read-{i}")).spawn(move || read(link, timeout, reads))?;
            threads.readers.push(h);
        }
        Ok(threads)
    }

    /// The actor through which the DbWriter calls the threads (inside a system).
    pub fn client(&self) -> Addr<ExecClient> {
        ExecClient { calls: self.calls.clone(), reads: self.reads.clone() }.start()
    }

    /// Cuts the calls in progress, if any (nobody waits for their answers any
    /// more), then joins every thread.
    pub fn stop(mut self) {
        self.join();
        tracing::info!("stopped: database threads (joined)");
    }

    fn join(&mut self) {
        let _ = self.calls.send(Call::Stop);
        for _ in &self.readers {
            let _ = self.reads.send(Read::Stop);
        }
        self.state.hurry.store(true, Ordering::SeqCst);
        self.state.wake.notify_all();
        if let Some(h) = self.exec.take()
            && h.join().is_err()
        {
            tracing::error!("the database thread panicked");
        }
        for h in self.readers.drain(..) {
            if h.join().is_err() {
                tracing::error!("a database reader thread panicked");
            }
        }
        self.state.stop.store(true, Ordering::SeqCst);
        self.state.wake.notify_all();
        if let Some(h) = self.guard.take() {
            let _ = h.join();
        }
    }
}

impl Drop for ExecThreads {
    /// Joins whatever `stop` did not (a failed `spawn`, an early return).
    fn drop(&mut self) {
        if self.guard.is_some() {
            self.join();
        }
    }
}

/// Forwards the DbWriter's calls: reads to the readers, the rest to the executor.
pub struct ExecClient {
    calls: mpsc::Sender<Call>,
    reads: mpsc::Sender<Read>,
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
        match msg {
            Exec::Query(q) if q.is_read() => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let sent = self.reads.send(Read::Query(q, tx)).is_ok();
                Box::pin(async move {
                    if sent { rx.await.unwrap_or_else(|_| Err(gone())).map(ExecReply::Query) } else { Err(gone()) }
                })
            }
            msg => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let sent = self.calls.send(Call::Exec(msg, tx)).is_ok();
                Box::pin(async move { if sent { rx.await.unwrap_or_else(|_| Err(gone())) } else { Err(gone()) } })
            }
        }
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
        let (slow, quick) = (state.watch(), state.watch());
        let g = state.clone();
        let guard = std::thread::spawn(move || guard(g, None));
        quick.begin("quick", Duration::from_secs(60));
        slow.begin("waiting for nothing", Duration::from_millis(50));
        let end = Instant::now() + Duration::from_secs(10);
        while !slow.with(|s| s.busy.as_ref().is_some_and(|b| b.cut)).unwrap_or(false) {
            assert!(Instant::now() < end, "the guard did not act");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(slow.end().map(|(w, _)| w).as_deref(), Some("waiting for nothing"));
        assert_eq!(quick.end(), None, "a call within its deadline was not cut, though another was");
        state.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        state.wake.notify_all();
        guard.join().unwrap();
    }
}
