//! The admin server: actix-web on the Unix socket `admin.socket`.
//!
//! Binding: an exclusive lock on `<socket>.lock` is taken first, so a second
//! daemon fails with one line instead of removing the live socket of the first;
//! only then is a stale socket file removed and the socket bound, with mode 0660
//! and group `admin.group`. Every connection's peer credentials (SO_PEERCRED) are
//! read when it is accepted: root, the group as primary gid, or the group among
//! the peer's supplementary groups may use the API; anyone else gets 403.
//! State-changing requests are logged with the peer's uid.
//!
//! Handlers answer through the actors: reads and commands through the DbWriter
//! (`Query`, always under a timeout, so a database that hangs makes the API answer
//! 503 rather than hang; reads and the health check's ping are answered on the
//! readers' own connections, never behind the writer's backlog), the running jobs through the DiscoveryActor and their
//! aggregators. Request bodies are read here (at most [`MAX_BODY`]); validation is
//! `submit`'s, the shape of responses `view`'s, the metrics text `metrics`'s.

use std::any::Any;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use actix::Addr;
use actix_web::body::BoxBody;
use actix_web::dev::{Extensions, Service, ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, ResponseError, web};
use chrono::Utc;
use nix::fcntl::{Flock, FlockArg};

use super::wire::*;
use super::{AdminError, MAX_BODY, metrics, submit, view};
use crate::actors::db_writer::DbWriter;
use crate::actors::discovery::DiscoveryActor;
use crate::actors::disk_copier::DiskSlots;
use crate::actors::job_aggregator::JobAggregator;
use crate::actors::messages::{
    CancelJob, DiscoverNow, FindActive, GetDbStats, GetLive, ListActive, LiveJob, Query, QueryResult, SetLimit,
};
use crate::config;
use crate::shutdown::StopAdmin;
use crate::state::JobStatus;

/// How long a database query may take before the API answers 503.
const DB_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the health check (and /metrics) waits for the database's ping: a
/// database that does not answer within it counts as unreachable, so that
/// `blockrepl health` answers within 2 s whatever the database does.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an actor in this process may take to answer.
const ACTOR_TIMEOUT: Duration = Duration::from_secs(5);
/// Events shown with one job.
const EVENTS: i64 = 20;
/// Default and largest page of `GET /jobs`.
const LIST_DEFAULT: i64 = 100;
const LIST_MAX: i64 = 1000;

/// Why the admin socket could not be set up; start-up fails with this one line.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("admin socket {socket} is in use by another blockrepl daemon{holder} (lock {lock} is held)")]
    InUse { socket: PathBuf, lock: PathBuf, holder: String },

    #[error("admin.group: no such group '{0}'")]
    NoGroup(String),

    #[error("admin socket {path}: cannot {what}: {error}")]
    Io { path: PathBuf, what: &'static str, error: String },
}

/// What the handlers need from the rest of the daemon.
pub struct AdminDeps {
    pub discovery: Addr<DiscoveryActor>,
    pub db: Addr<DbWriter>,
    pub slots: DiskSlots,
    pub node: String,
}

/// Shared by every request.
struct State {
    deps: AdminDeps,
    group: String,
    started: Instant,
    started_at: chrono::NaiveDateTime,
}

/// The peer of a connection, as SO_PEERCRED and /proc tell.
#[derive(Debug, Clone)]
struct Peer {
    uid: u32,
    pid: Option<i32>,
    allowed: bool,
}

/// The socket, bound and locked, not yet served: taken before the daemon claims
/// any job, so that a second daemon stops before it has touched anything.
pub struct Bound {
    socket: PathBuf,
    group: String,
    gid: u32,
    listener: std::os::unix::net::UnixListener,
    lock: Flock<std::fs::File>,
}

/// Takes the lock, removes a stale socket, binds, and sets mode and group.
pub fn bind(settings: &config::Admin) -> Result<Bound, BindError> {
    let socket = settings.socket.clone();
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| BindError::Io { path, what, error: e.to_string() }
    };
    let gid = nix::unistd::Group::from_name(&settings.group)
        .ok()
        .flatten()
        .ok_or_else(|| BindError::NoGroup(settings.group.clone()))?
        .gid;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(io("create its directory", dir))?;
    }
    let lock = lock(&socket)?;
    match std::fs::remove_file(&socket) {
        Ok(()) => tracing::info!(socket = %socket.display(), "removed a stale admin socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove the stale socket file", &socket)(e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(&socket).map_err(io("bind", &socket))?;
    nix::unistd::chown(&socket, None, Some(gid)).map_err(|e| BindError::Io {
        path: socket.clone(),
        what: "set its group",
        error: e.to_string(),
    })?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660)).map_err(io("set its mode", &socket))?;
    Ok(Bound { socket, group: settings.group.clone(), gid: gid.as_raw(), listener, lock })
}

impl Bound {
    /// Serves until the returned closure is called (by the shutdown owner), which
    /// stops the server, removes the socket and releases the lock.
    pub fn serve(self, deps: AdminDeps) -> Result<StopAdmin, BindError> {
        let Bound { socket, group, gid: admin_gid, listener, lock } = self;
        let state = web::Data::new(State {
            deps,
            group: group.clone(),
            started: Instant::now(),
            started_at: Utc::now().naive_utc(),
        });
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .app_data(
                    web::QueryConfig::default()
                        .error_handler(|e, _| AdminError::InvalidRequest(format!("bad query string: {e}")).into()),
                )
                .wrap_fn(check_peer)
                .service(resource("/api/v1/health").route(web::get().to(health)))
                .service(resource("/api/v1/jobs").route(web::get().to(list_jobs)).route(web::post().to(submit_job)))
                .service(resource("/api/v1/jobs/{id}").route(web::get().to(show_job)))
                .service(resource("/api/v1/jobs/{id}/cancel").route(web::post().to(cancel_job)))
                .service(resource("/api/v1/jobs/{id}/limit").route(web::post().to(limit_job)))
                .service(resource("/api/v1/limit").route(web::post().to(limit_all)))
                .service(resource("/api/v1/progress/{key}").route(web::get().to(progress)))
                .service(resource("/api/v1/discover").route(web::post().to(discover)))
                .service(resource("/metrics").route(web::get().to(metrics)))
                .default_service(web::to(unknown_route))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(2)
        .on_connect(move |conn: &dyn Any, ext: &mut Extensions| {
            if let Some(stream) = conn.downcast_ref::<actix_web::rt::net::UnixStream>()
                && let Ok(cred) = stream.peer_cred()
            {
                ext.insert(peer(cred.uid(), cred.gid(), cred.pid(), admin_gid));
            }
        })
        .listen_uds(listener)
        .map_err(|e| BindError::Io { path: socket.clone(), what: "listen", error: e.to_string() })?
        .run();
        let handle = server.handle();
        let task = actix_rt::spawn(server);
        tracing::info!(socket = %socket.display(), group = %group, "admin socket bound");
        Ok(Box::new(move || {
            Box::pin(async move {
                handle.stop(true).await;
                let _ = task.await;
                let _ = std::fs::remove_file(&socket);
                // Released only now that the socket is gone: the next daemon may bind.
                drop(lock);
            })
        }))
    }
}

/// Takes the exclusive lock `<socket>.lock` and writes our pid into it.
fn lock(socket: &Path) -> Result<Flock<std::fs::File>, BindError> {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o640)
        .open(&path)
        .map_err(|e| BindError::Io { path: path.clone(), what: "open its lock file", error: e.to_string() })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut locked) => {
            let _ = locked.set_len(0).and_then(|()| writeln!(locked, "{}", std::process::id()));
            Ok(locked)
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            Err(BindError::InUse { socket: socket.to_path_buf(), lock: path, holder })
        }
        Err((_, e)) => Err(BindError::Io { path, what: "lock its lock file", error: e.to_string() }),
    }
}

/// Who may use the API: root, the group as primary gid, or a member of it.
fn peer(uid: u32, gid: u32, pid: Option<i32>, admin_gid: u32) -> Peer {
    let allowed = uid == 0 || gid == admin_gid || supplementary_groups(uid, gid, pid).contains(&admin_gid);
    Peer { uid, pid, allowed }
}

/// The peer process's supplementary groups, as the kernel has them
/// (`/proc/PID/status`); when that cannot be read (a hardened /proc), the
/// groups the user database gives the user.
fn supplementary_groups(uid: u32, gid: u32, pid: Option<i32>) -> Vec<u32> {
    let from_proc = pid.and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok()).and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .map(|g| g.split_whitespace().filter_map(|n| n.parse().ok()).collect::<Vec<u32>>())
    });
    from_proc.unwrap_or_else(|| {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten();
        user.and_then(|u| std::ffi::CString::new(u.name).ok())
            .and_then(|name| nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid)).ok())
            .map(|gs| gs.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default()
    })
}

/// Middleware: refuses peers that may not use the API.
fn check_peer<S>(
    req: ServiceRequest,
    srv: &S,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<ServiceResponse<BoxBody>, actix_web::Error>>>>
where
    S: Service<ServiceRequest, Response = ServiceResponse<BoxBody>, Error = actix_web::Error>,
    S::Future: 'static,
{
    let peer = req.conn_data::<Peer>().cloned();
    if peer.as_ref().is_some_and(|p| p.allowed) {
        return Box::pin(srv.call(req));
    }
    let group = req.app_data::<web::Data<State>>().map(|s| s.group.clone()).unwrap_or_default();
    let uid = peer.as_ref().map_or(u32::MAX, |p| p.uid);
    tracing::warn!(uid, pid = peer.and_then(|p| p.pid), path = %req.path(), "admin request refused: not root or in the admin group");
    let resp = AdminError::Forbidden { uid, group }.error_response();
    Box::pin(async move { Ok(req.into_response(resp)) })
}

/// A resource whose other methods answer 405 in JSON.
fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(|req: HttpRequest| async move {
        Err::<HttpResponse, _>(AdminError::MethodNotAllowed {
            method: req.method().to_string(),
            path: req.path().to_string(),
        })
    }))
}

impl ResponseError for AdminError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(self.body())
    }
}

fn uid(req: &HttpRequest) -> Option<u32> {
    req.conn_data::<Peer>().map(|p| p.uid)
}

impl State {
    async fn query_within(&self, q: Query, limit: Duration) -> Result<QueryResult, AdminError> {
        match tokio::time::timeout(limit, self.deps.db.send(q)).await {
            Err(_) => Err(AdminError::DatabaseUnavailable(format!("no answer within {} s", limit.as_secs()))),
            Ok(Err(e)) => Err(AdminError::Internal(format!("database writer unreachable: {e}"))),
            Ok(Ok(r)) => r.map_err(AdminError::from),
        }
    }

    /// The DbWriter's figures (answered by the actor, never by the database).
    async fn db_stats(&self) -> Result<crate::actors::messages::DbStats, AdminError> {
        tokio::time::timeout(ACTOR_TIMEOUT, self.deps.db.send(GetDbStats))
            .await
            .map_err(|_| AdminError::Internal("database writer did not answer".into()))?
            .map_err(|e| AdminError::Internal(format!("database writer unreachable: {e}")))
    }

    async fn query(&self, q: Query) -> Result<QueryResult, AdminError> {
        self.query_within(q, DB_TIMEOUT).await
    }

    async fn ask<M>(&self, m: M) -> Result<M::Result, AdminError>
    where
        M: actix::Message + Send + 'static,
        M::Result: Send,
        DiscoveryActor: actix::Handler<M>,
    {
        match tokio::time::timeout(ACTOR_TIMEOUT, self.deps.discovery.send(m)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(AdminError::Internal(format!("discovery unreachable: {e}"))),
            Err(_) => Err(AdminError::Internal("discovery did not answer".into())),
        }
    }

    /// The aggregator of `job_id` if this node runs it.
    async fn active(&self, job_id: &str) -> Result<Option<Addr<JobAggregator>>, AdminError> {
        self.ask(FindActive { job_id: job_id.to_string() }).await
    }

    /// The live view of `job_id` if this node runs it (and its aggregator answers).
    async fn live(&self, job_id: &str) -> Result<Option<LiveJob>, AdminError> {
        Ok(match self.active(job_id).await? {
            None => None,
            Some(agg) => tokio::time::timeout(ACTOR_TIMEOUT, agg.send(GetLive)).await.ok().and_then(Result::ok),
        })
    }

    async fn find(&self, key: &str) -> Result<(crate::db::Job, Vec<crate::db::Disk>), AdminError> {
        match self.query(Query::FindJob { key: key.to_string() }).await? {
            QueryResult::Job(Some(found)) => Ok(found),
            QueryResult::Job(None) => Err(AdminError::JobNotFound(key.to_string())),
            _ => Err(unexpected()),
        }
    }
}

fn unexpected() -> AdminError {
    AdminError::Internal("unexpected reply from the database writer".into())
}

/// A path segment, fully decoded: actix leaves `%25`, `%2F` and `%2B` encoded.
fn path_param(req: &HttpRequest, name: &str) -> String {
    percent_encoding::percent_decode_str(req.match_info().query(name)).decode_utf8_lossy().into_owned()
}

async fn health(st: web::Data<State>) -> Result<HttpResponse, AdminError> {
    let reachable = matches!(st.query_within(Query::Ping, PING_TIMEOUT).await, Ok(QueryResult::Done));
    let backlog = st.db_stats().await?.pending;
    let active = st.ask(ListActive).await?.len() as u64;
    Ok(HttpResponse::Ok().json(Health {
        status: if reachable { "ok" } else { "degraded" }.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        node_id: st.deps.node.clone(),
        database_reachable: reachable,
        database_backlog: backlog,
        active_jobs: active,
        uptime_seconds: st.started.elapsed().as_secs(),
        started_at: view::time(st.started_at),
    }))
}

/// The query string of `GET /api/v1/jobs`; any other parameter is refused.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    status: Option<String>,
    /// Kept as text so that a bad value gets our own message.
    limit: Option<String>,
}

async fn list_jobs(params: web::Query<ListParams>, st: web::Data<State>) -> Result<HttpResponse, AdminError> {
    let ListParams { status, limit } = params.into_inner();
    let status = match status.filter(|s| !s.is_empty()) {
        Some(s) => Some(s.parse::<JobStatus>().map_err(|_| AdminError::InvalidStatus(s.clone()))?),
        None => None,
    };
    let limit = match limit {
        None => LIST_DEFAULT,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=LIST_MAX).contains(n))
            .ok_or_else(|| AdminError::InvalidRequest(format!("limit must be 1 to {LIST_MAX}, not '{v}'")))?,
    };
    match st.query(Query::ListJobs { status, limit }).await? {
        QueryResult::Jobs(jobs) => {
            Ok(HttpResponse::Ok().json(JobList { jobs: jobs.iter().map(view::job_summary).collect() }))
        }
        _ => Err(unexpected()),
    }
}

async fn show_job(req: HttpRequest, st: web::Data<State>) -> Result<HttpResponse, AdminError> {
    let (job, disks) = st.find(&path_param(&req, "id")).await?;
    let events = match st.query(Query::Events { job_id: job.id.clone(), limit: EVENTS }).await? {
        QueryResult::Events(e) => e,
        _ => return Err(unexpected()),
    };
    Ok(HttpResponse::Ok().json(view::job_detail(&job, &disks, &events)))
}

async fn submit_job(req: HttpRequest, payload: web::Payload, st: web::Data<State>) -> Result<HttpResponse, AdminError> {
    let request = submit::parse(&body(&req, payload).await?)?;
    let s = submit::validate(request, || {
        let r = uuid::Uuid::new_v4();
        let b = r.as_bytes();
        submit::generate_id(Utc::now(), u16::from_be_bytes([b[0], b[1]]))
    })?;
    let job_id = s.job.id.clone();
    let disks = s.disks.len();
    match st.query(Query::Submit { job: s.job, disks: s.disks }).await? {
        QueryResult::Done => {}
        _ => return Err(unexpected()),
    }
    tracing::info!(job_id = %job_id, disks, uid = uid(&req), "job submitted through the admin socket");
    st.deps.discovery.do_send(DiscoverNow);
    Ok(HttpResponse::Created().json(SubmitResponse { job_id }))
}

async fn cancel_job(req: HttpRequest, st: web::Data<State>) -> Result<HttpResponse, AdminError> {
    let job_id = path_param(&req, "id");
    if let Some(agg) = st.active(&job_id).await? {
        // The aggregator may be finishing: only a live answer counts, else ask the database.
        if let Ok(Ok(live)) = tokio::time::timeout(ACTOR_TIMEOUT, agg.send(GetLive)).await {
            if live.status.is_terminal() {
                return Err(AdminError::JobFinished { job: job_id, status: live.status.as_api().to_string() });
            }
            if agg.send(CancelJob).await.is_ok() {
                tracing::info!(job_id = %job_id, uid = uid(&req), "job cancelled through the admin socket (running here)");
                return Ok(HttpResponse::Accepted().json(CancelResponse {
                    job_id,
                    stopping: true,
                    message: "cancel requested; the job stops within a second".into(),
                }));
            }
        }
    }
    let status = match st.query(Query::Cancel { job_id: job_id.clone() }).await? {
        QueryResult::Status(s) => s,
        _ => return Err(unexpected()),
    };
    tracing::info!(job_id = %job_id, uid = uid(&req), "job cancelled through the admin socket (in the database)");
    let message = format!("job {}", status.as_api().to_lowercase());
    Ok(HttpResponse::Ok().json(CancelResponse { job_id, stopping: false, message }))
}

/// Reads a request body of at most [`MAX_BODY`].
async fn body(req: &HttpRequest, payload: web::Payload) -> Result<web::Bytes, AdminError> {
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(AdminError::PayloadTooLarge);
    }
    payload
        .to_bytes_limited(MAX_BODY)
        .await
        .map_err(|_| AdminError::PayloadTooLarge)?
        .map_err(|e| AdminError::InvalidRequest(format!("cannot read the request body: {e}")))
}

/// The rate of a limit request, in bytes/s (0: none).
fn rate_of(body: &[u8]) -> Result<u64, AdminError> {
    let r: LimitRequest = submit::parse_json(body)?;
    submit::rate(&r.max_rate)
}

/// Sets the limit of the jobs named, in their rows and, for those running here,
/// live. Returns those running here.
async fn apply_limit(st: &State, jobs: &[String], rate: u64) -> Result<Vec<String>, AdminError> {
    let mut running = Vec::new();
    for job_id in jobs {
        match st.query(Query::SetMaxRate { job_id: job_id.clone(), max_rate: rate }).await? {
            QueryResult::Done => {}
            _ => return Err(unexpected()),
        }
        if let Some(agg) = st.active(job_id).await?
            && agg.send(SetLimit { max_rate: rate, by: "the admin socket" }).await.is_ok()
        {
            running.push(job_id.clone());
        }
    }
    Ok(running)
}

async fn limit_job(req: HttpRequest, payload: web::Payload, st: web::Data<State>) -> Result<HttpResponse, AdminError> {
    let rate = rate_of(&body(&req, payload).await?)?;
    let (job, _) = st.find(&path_param(&req, "id")).await?;
    let status = job.status.known();
    if let Some(s) = status.filter(|s| s.is_terminal()) {
        return Err(AdminError::JobFinished { job: job.id, status: s.as_api().to_string() });
    }
    let jobs = vec![job.id.clone()];
    let running = apply_limit(&st, &jobs, rate).await?;
    tracing::info!(job_id = %job.id, max_rate = rate, uid = uid(&req), "job limit set through the admin socket");
    Ok(HttpResponse::Ok().json(LimitResponse { jobs, max_rate: rate, running }))
}

/// Every job this appliance runs now gets the limit.
async fn limit_all(req: HttpRequest, payload: web::Payload, st: web::Data<State>) -> Result<HttpResponse, AdminError> {
    let rate = rate_of(&body(&req, payload).await?)?;
    let mut jobs: Vec<String> = st.ask(ListActive).await?;
    jobs.sort();
    let running = apply_limit(&st, &jobs, rate).await?;
    tracing::info!(
        jobs = jobs.len(),
        max_rate = rate,
        uid = uid(&req),
        "limit of every running job set through the admin socket"
    );
    Ok(HttpResponse::Ok().json(LimitResponse { jobs, max_rate: rate, running }))
}

async fn progress(req: HttpRequest, st: web::Data<State>) -> Result<HttpResponse, AdminError> {
    let key = path_param(&req, "key");
    let now = Utc::now().naive_utc();
    match st.find(&key).await {
        Ok((job, disks)) => {
            let history = match st.query(Query::History { job_id: job.id.clone() }).await? {
                QueryResult::History(h) => h,
                _ => return Err(unexpected()),
            };
            let live = st.live(&job.id).await?;
            Ok(HttpResponse::Ok().json(view::progress(&job, &disks, &history, live.as_ref(), now)))
        }
        // A job this node runs can still be followed while the database is away.
        Err(AdminError::DatabaseUnavailable(e)) => match st.live(&key).await? {
            Some(live) => Ok(HttpResponse::Ok().json(view::live_progress(&live, now))),
            None => Err(AdminError::DatabaseUnavailable(e)),
        },
        Err(e) => Err(e),
    }
}

async fn discover(req: HttpRequest, st: web::Data<State>) -> HttpResponse {
    tracing::info!(uid = uid(&req), "discovery requested through the admin socket");
    st.deps.discovery.do_send(DiscoverNow);
    HttpResponse::Accepted().json(DiscoverResponse { message: "looking for jobs now".into() })
}

async fn metrics(st: web::Data<State>) -> Result<HttpResponse, AdminError> {
    let mut live = Vec::new();
    for id in st.ask(ListActive).await? {
        if let Some(l) = st.live(&id).await? {
            live.push(l);
        }
    }
    live.sort_by(|a, b| a.job_id.cmp(&b.job_id));
    let job_counts = match st.query_within(Query::CountJobs, PING_TIMEOUT).await {
        Ok(QueryResult::Counts(c)) => Some(c),
        _ => None,
    };
    let db = st.db_stats().await?;
    let text = metrics::render(&metrics::Figures {
        version: env!("CARGO_PKG_VERSION").to_string(),
        node: st.deps.node.clone(),
        uptime_seconds: st.started.elapsed().as_secs_f64(),
        job_counts,
        db,
        live,
        slots_in_use: st.deps.slots.in_use(),
        slots_capacity: st.deps.slots.capacity(),
    });
    Ok(HttpResponse::Ok().content_type(metrics::CONTENT_TYPE).body(text))
}

async fn unknown_route(req: HttpRequest) -> HttpResponse {
    AdminError::UnknownRoute { method: req.method().to_string(), path: req.path().to_string() }.error_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_the_primary_group_may_use_the_api() {
        assert!(peer(0, 0, None, 999).allowed);
        assert!(peer(1000, 999, None, 999).allowed);
        // No pid and no such user: no supplementary groups to find.
        assert!(!peer(4_000_000, 4_000_000, None, 999).allowed);
    }

    #[test]
    fn supplementary_groups_come_from_proc() {
        let me = std::process::id() as i32;
        let status = std::fs::read_to_string(format!("/proc/{me}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
        let expected: Vec<u32> = line["Groups:".len()..].split_whitespace().map(|g| g.parse().unwrap()).collect();
        assert_eq!(supplementary_groups(4_000_000, 4_000_000, Some(me)), expected);
    }
}
