//! The vSphere control-plane client: log in, find a VM, list its disks, enable
//! CBT, create and remove snapshots, and ask for changed disk areas.
//!
//! Blocking, one HTTPS request per call (ureq's agent keeps the connection
//! alive between calls), safe to share between threads (`&self` everywhere; the
//! session cookie is behind a mutex). It does exactly what it is asked, once:
//! retrying an unreachable vCenter, and for how long, is the caller's policy
//! ([`VmwareError::is_transient`]). The one thing it repeats by itself is a
//! login, when vCenter says the session expired (`NotAuthenticated`): that call
//! was not executed, so sending it again is safe.
//!
//! Only calls that VMware documents for backup clients are used: `RetrieveServiceContent`,
//! `Login`/`Logout`, `SearchIndex.FindByInventoryPath`/`FindByUuid`,
//! `PropertyCollector.RetrievePropertiesEx`, `ReconfigVM_Task`,
//! `CreateSnapshot_Task`, `RemoveSnapshot_Task` and `QueryChangedDiskAreas`.
//!
//! The password and the session cookie never appear in `Debug`, in errors or in
//! logs; request bodies are never logged.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::VmwareError;
use super::soap::{self, Answer, Moref, Node, text_element};
use super::tls::{PinnedVerifier, Thumbprint};
use crate::config::Vcenter;
use crate::engine::CancelToken;
use crate::engine::plan::Area;

/// The API version we speak: every call here exists since vSphere 4.0, and
/// vCenter 6.7 to 8 accept it.
const SOAP_ACTION: &str = "urn:vim25/6.7";
/// Answers larger than this are refused (a disk's changed areas come in pages).
const MAX_ANSWER: u64 = 64 << 20;
/// The session cookie vCenter sets at login.
const SESSION_COOKIE: &str = "vmware_soap_session";
/// How often a running task is looked at, at most.
const TASK_POLL_MAX: Duration = Duration::from_millis(500);
/// Granularity of sleeps while waiting (cancellation is seen this quickly).
const TICK: Duration = Duration::from_millis(100);
/// Logging out is a courtesy (sessions expire): it never holds up a drop long.
const LOGOUT_TIMEOUT: Duration = Duration::from_secs(5);

/// A secret string (a password, a session cookie) that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Time limits of the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing the TCP and TLS connection.
    pub connect: Duration,
    /// One SOAP call, from sending to the end of the answer.
    pub request: Duration,
    /// A task (reconfigure, snapshot create or remove) to finish.
    pub task: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { connect: Duration::from_secs(15), request: Duration::from_secs(120), task: Duration::from_secs(3600) }
    }
}

/// Where and as whom to log in: a `[vmware.NAME]` section with its password read.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The section's name, for messages.
    pub name: String,
    /// `https://host[:port]/sdk`
    pub url: url::Url,
    pub user: String,
    pub password: Secret,
    pub thumbprint: Thumbprint,
    pub timeouts: Timeouts,
}

impl Endpoint {
    /// Reads the password file of a validated `[vmware.NAME]` section.
    pub fn from_config(name: &str, vc: &Vcenter) -> Result<Self, VmwareError> {
        let bad = |reason: String| VmwareError::Config { name: name.into(), reason };
        let mut url = url::Url::parse(&vc.url).map_err(|e| bad(format!("url '{}': {e}", vc.url)))?;
        if url.path() == "/" {
            url.set_path("/sdk");
        }
        let thumbprint = Thumbprint::parse(&vc.thumbprint).map_err(|e| bad(format!("thumbprint: {e}")))?;
        let password = read_password(&vc.password_file).map_err(bad)?;
        Ok(Self {
            name: name.into(),
            url,
            user: vc.user.clone(),
            password,
            thumbprint,
            timeouts: Timeouts { connect: vc.connect_timeout, request: vc.request_timeout, task: vc.task_timeout },
        })
    }

    /// `NAME (host:port)`, how errors name the vCenter.
    pub fn server(&self) -> String {
        let host = self.url.host_str().unwrap_or("?");
        match self.url.port() {
            Some(p) => format!("{} ({host}:{p})", self.name),
            None => format!("{} ({host})", self.name),
        }
    }
}

/// Reads a password file: its content without one trailing newline.
pub fn read_password(path: &std::path::Path) -> Result<Secret, String> {
    let raw = std::fs::read_to_string(path).map_err(|e| format!("password file {}: {e}", path.display()))?;
    let pw = raw.strip_suffix('\n').map(|s| s.strip_suffix('\r').unwrap_or(s)).unwrap_or(&raw);
    if pw.is_empty() {
        return Err(format!("password file {} is empty", path.display()));
    }
    Ok(Secret::new(pw))
}

/// How a VM is named in a job: its inventory path or its instance UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmRef {
    /// `/Datacenter/vm/Folder/Name`
    Path(String),
    /// `config.instanceUuid` (the vCenter-wide id; not the BIOS UUID)
    InstanceUuid(String),
}

impl VmRef {
    /// A UUID (8-4-4-4-12 hex digits) is an instance UUID; anything else a path.
    pub fn parse(s: &str) -> Self {
        let t = s.trim();
        let groups: Vec<&str> = t.split('-').collect();
        let is_uuid = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
            && groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()));
        if is_uuid { VmRef::InstanceUuid(t.to_ascii_lowercase()) } else { VmRef::Path(t.to_string()) }
    }
}

impl std::fmt::Display for VmRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmRef::Path(p) => write!(f, "{p}"),
            VmRef::InstanceUuid(u) => write!(f, "with instance UUID {u}"),
        }
    }
}

/// What the server says it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct About {
    pub full_name: String,
    pub version: String,
    /// `VirtualCenter` or `HostAgent` (an ESXi host).
    pub api_type: String,
    pub instance_uuid: String,
}

/// A virtual disk, as the VM's or a snapshot's configuration describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Disk {
    /// The device key (2000, 2001, ...): stable for the life of the disk.
    pub key: i32,
    /// `Hard disk 1`
    pub label: String,
    pub capacity: u64,
    /// The backing file: `[datastore] dir/name.vmdk`
    pub file: String,
    /// The CBT change ID of this state of the disk, when CBT is active.
    pub change_id: Option<String>,
}

impl Disk {
    /// `disk-2000`: the `vm_disks.disk_id` of this disk.
    pub fn disk_id(&self) -> String {
        format!("disk-{}", self.key)
    }

    /// `Hard disk 1 (key 2000)`, how errors name it.
    pub fn name(&self) -> String {
        format!("{} (key {})", self.label, self.key)
    }
}

/// A VM and its disks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Vm {
    #[serde(serialize_with = "moref_value")]
    pub moref: Moref,
    pub name: String,
    pub instance_uuid: String,
    pub cbt_enabled: bool,
    pub disks: Vec<Disk>,
}

fn moref_value<S: serde::Serializer>(m: &Moref, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&m.value)
}

/// One snapshot of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub moref: Moref,
    pub name: String,
    pub description: String,
    /// As vCenter writes it (ISO 8601).
    pub created: String,
}

/// Which changes `QueryChangedDiskAreas` is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since<'a> {
    /// `"*"`: every allocated area, for a full copy.
    Creation,
    /// Areas changed since this change ID, for an incremental copy.
    ChangeId(&'a str),
}

struct Content {
    property_collector: Moref,
    search_index: Moref,
    session_manager: Moref,
    about: About,
}

/// A logged-in session with one vCenter (or ESXi host).
pub struct Client {
    endpoint: Endpoint,
    server: String,
    agent: ureq::Agent,
    verifier: Arc<PinnedVerifier>,
    cookie: Mutex<Option<Secret>>,
    content: Content,
    cancel: CancelToken,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("server", &self.server).field("user", &self.endpoint.user).finish()
    }
}

impl Client {
    /// Connects, checks the certificate against the thumbprint and logs in.
    /// `cancel` stops waiting for tasks (the task itself goes on in vCenter).
    pub fn connect(endpoint: Endpoint, cancel: CancelToken) -> Result<Self, VmwareError> {
        let server = endpoint.server();
        let verifier = Arc::new(PinnedVerifier::new(endpoint.thumbprint));
        let tls =
            verifier.client_config().map_err(|reason| VmwareError::Config { name: endpoint.name.clone(), reason })?;
        let agent = ureq::AgentBuilder::new()
            .tls_config(Arc::new(tls))
            .timeout_connect(endpoint.timeouts.connect)
            .timeout(endpoint.timeouts.request)
            .redirects(0)
            .https_only(true)
            .user_agent(concat!("blockrepl/", env!("CARGO_PKG_VERSION")))
            .build();
        let mut client = Self {
            endpoint,
            server,
            agent,
            verifier,
            cookie: Mutex::new(None),
            content: Content {
                property_collector: Moref::new("PropertyCollector", "propertyCollector"),
                search_index: Moref::new("SearchIndex", "SearchIndex"),
                session_manager: Moref::new("SessionManager", "SessionManager"),
                about: About::default(),
            },
            cancel,
        };
        client.content = client.retrieve_content()?;
        client.login()?;
        Ok(client)
    }

    pub fn about(&self) -> &About {
        &self.content.about
    }

    /// `NAME (host:port)`
    pub fn server(&self) -> &str {
        &self.server
    }

    fn retrieve_content(&self) -> Result<Content, VmwareError> {
        let method = "RetrieveServiceContent";
        let r = self.call(method, &Moref::new("ServiceInstance", "ServiceInstance").xml("_this"))?;
        let rv = r.child("returnval").ok_or_else(|| self.protocol(method, "no returnval"))?;
        let moref = |name: &str| rv.child(name).and_then(Node::moref).ok_or_else(|| self.protocol(method, name));
        let text = |path: &[&str]| rv.text_at(path).unwrap_or_default().to_string();
        Ok(Content {
            property_collector: moref("propertyCollector")?,
            search_index: moref("searchIndex")?,
            session_manager: moref("sessionManager")?,
            about: About {
                full_name: text(&["about", "fullName"]),
                version: text(&["about", "version"]),
                api_type: text(&["about", "apiType"]),
                instance_uuid: text(&["about", "instanceUuid"]),
            },
        })
    }

    fn login(&self) -> Result<(), VmwareError> {
        *self.lock_cookie() = None;
        let body = format!(
            "{}{}{}",
            self.content.session_manager.xml("_this"),
            text_element("userName", &self.endpoint.user),
            text_element("password", self.endpoint.password.expose())
        );
        match self.send("Login", &body) {
            Ok(_) => {}
            Err(VmwareError::Fault { fault, .. }) if fault == "InvalidLogin" => {
                return Err(VmwareError::Login { server: self.server.clone(), user: self.endpoint.user.clone() });
            }
            Err(e) => return Err(e),
        }
        if self.lock_cookie().is_none() {
            return Err(self.protocol("Login", "no session cookie in the answer"));
        }
        tracing::debug!(server = %self.server, user = %self.endpoint.user, "logged in to vCenter");
        Ok(())
    }

    /// Ends the session (best effort: an unreachable vCenter expires it itself).
    pub fn logout(&self) {
        if self.lock_cookie().is_none() {
            return;
        }
        let _ = self.send("Logout", &self.content.session_manager.xml("_this"));
        *self.lock_cookie() = None;
    }

    /// Test-only: ends the session on the server but keeps the cookie, as
    /// vCenter's idle timeout does.
    #[cfg(test)]
    pub fn end_session_on_server(&self) -> Result<(), VmwareError> {
        self.send("Logout", &self.content.session_manager.xml("_this")).map(|_| ())
    }

    fn lock_cookie(&self) -> std::sync::MutexGuard<'_, Option<Secret>> {
        self.cookie.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Finds a VM and reads its configuration.
    pub fn find_vm(&self, vm: &VmRef) -> Result<Vm, VmwareError> {
        let si = self.content.search_index.xml("_this");
        let (method, body) = match vm {
            VmRef::Path(p) => ("FindByInventoryPath", format!("{si}{}", text_element("inventoryPath", p))),
            VmRef::InstanceUuid(u) => (
                "FindByUuid",
                format!("{si}{}<vmSearch>true</vmSearch><instanceUuid>true</instanceUuid>", text_element("uuid", u)),
            ),
        };
        let r = self.call(method, &body)?;
        match r.child("returnval").and_then(Node::moref) {
            Some(m) if m.kind == "VirtualMachine" => self.vm(&m),
            _ => Err(VmwareError::VmNotFound { server: self.server.clone(), vm: vm.to_string() }),
        }
    }

    /// Reads a VM's name, instance UUID, CBT setting and disks.
    pub fn vm(&self, moref: &Moref) -> Result<Vm, VmwareError> {
        let paths = ["name", "config.instanceUuid", "config.changeTrackingEnabled", "config.hardware.device"];
        let props = self.properties(moref, &paths)?;
        let text = |p: &str| props.get(p).map(|n| n.text.trim().to_string()).unwrap_or_default();
        Ok(Vm {
            moref: moref.clone(),
            name: text("name"),
            instance_uuid: text("config.instanceUuid"),
            cbt_enabled: text("config.changeTrackingEnabled") == "true",
            disks: props.get("config.hardware.device").map(disks).unwrap_or_default(),
        })
    }

    /// Turns CBT on for a VM (`ReconfigVM_Task` with `changeTrackingEnabled`)
    /// and waits for it. vSphere starts tracking only at the VM's next stun (a
    /// snapshot, a power cycle or a vMotion); the job's own snapshot is one.
    pub fn enable_cbt(&self, vm: &Moref) -> Result<(), VmwareError> {
        let body = format!("{}<spec><changeTrackingEnabled>true</changeTrackingEnabled></spec>", vm.xml("_this"));
        let task = self.task_ref("ReconfigVM_Task", &body)?;
        self.wait_task(&task, "enable CBT")?;
        Ok(())
    }

    /// Creates a snapshot without memory and returns it.
    pub fn create_snapshot(
        &self,
        vm: &Moref,
        name: &str,
        description: &str,
        quiesce: bool,
    ) -> Result<Moref, VmwareError> {
        let body = format!(
            "{}{}{}<memory>false</memory><quiesce>{quiesce}</quiesce>",
            vm.xml("_this"),
            text_element("name", name),
            text_element("description", description)
        );
        let task = self.task_ref("CreateSnapshot_Task", &body)?;
        let what = format!("create snapshot {name}");
        let result = self.wait_task(&task, &what)?;
        result
            .as_ref()
            .and_then(Node::moref)
            .filter(|m| m.kind == "VirtualMachineSnapshot")
            .ok_or_else(|| self.protocol("CreateSnapshot_Task", "the task's result is not a snapshot"))
    }

    /// Removes a snapshot (its children stay; the disks are consolidated).
    /// A snapshot that is already gone is not an error: returns `false`.
    pub fn remove_snapshot(&self, snapshot: &Moref) -> Result<bool, VmwareError> {
        let body =
            format!("{}<removeChildren>false</removeChildren><consolidate>true</consolidate>", snapshot.xml("_this"));
        let task = match self.task_ref("RemoveSnapshot_Task", &body) {
            Ok(t) => t,
            Err(VmwareError::Fault { fault, .. }) if fault == "ManagedObjectNotFound" => return Ok(false),
            Err(e) => return Err(e),
        };
        self.wait_task(&task, &format!("remove snapshot {snapshot}"))?;
        Ok(true)
    }

    /// Every snapshot of a VM, parents before children.
    pub fn snapshots(&self, vm: &Moref) -> Result<Vec<SnapshotInfo>, VmwareError> {
        let props = self.properties(vm, &["snapshot"])?;
        let mut out = Vec::new();
        if let Some(info) = props.get("snapshot") {
            for tree in info.children("rootSnapshotList") {
                snapshot_tree(tree, &mut out);
            }
        }
        Ok(out)
    }

    /// The disks as the snapshot saw them, with their change IDs.
    pub fn snapshot_disks(&self, snapshot: &Moref) -> Result<Vec<Disk>, VmwareError> {
        let props = self.properties(snapshot, &["config.hardware.device"])?;
        Ok(props.get("config.hardware.device").map(disks).unwrap_or_default())
    }

    /// Disk `key` of `vm` as `snapshot` saw it, with the change ID a copy of
    /// it makes the target consistent with. A disk without one (CBT off, or
    /// not yet active) is an error: its changes cannot be tracked.
    pub fn snapshot_disk(&self, vm: &Vm, snapshot: &Moref, key: i32) -> Result<Disk, VmwareError> {
        let disk = self
            .snapshot_disks(snapshot)?
            .into_iter()
            .find(|d| d.key == key)
            .ok_or_else(|| VmwareError::DiskNotFound { server: self.server.clone(), vm: vm.name.clone(), key })?;
        if disk.change_id.is_none() {
            return Err(VmwareError::NoChangeId {
                server: self.server.clone(),
                disk: disk.name(),
                snapshot: snapshot.value.clone(),
            });
        }
        Ok(disk)
    }

    /// The areas of `disk` (as of `snapshot`) that hold data (`Since::Creation`)
    /// or changed since a change ID, in the order vCenter gives them. Pages
    /// through the disk with `startOffset` until its capacity is covered.
    pub fn changed_areas(
        &self,
        vm: &Moref,
        snapshot: &Moref,
        disk: &Disk,
        since: Since<'_>,
    ) -> Result<Vec<Area>, VmwareError> {
        let method = "QueryChangedDiskAreas";
        let change_id = match since {
            Since::Creation => "*",
            Since::ChangeId(id) => id,
        };
        let mut areas = Vec::new();
        let mut offset = 0u64;
        while offset < disk.capacity {
            let body = format!(
                "{}{}<deviceKey>{}</deviceKey><startOffset>{offset}</startOffset>{}",
                vm.xml("_this"),
                snapshot.xml("snapshot"),
                disk.key,
                text_element("changeId", change_id)
            );
            let r = match self.call(method, &body) {
                Err(VmwareError::Fault { fault, message, .. })
                    if fault == "InvalidArgument" && since != Since::Creation && message.contains("changeId") =>
                {
                    return Err(VmwareError::InvalidChangeId {
                        server: self.server.clone(),
                        disk: disk.name(),
                        change_id: change_id.to_string(),
                    });
                }
                other => other?,
            };
            let rv = r.child("returnval").ok_or_else(|| self.protocol(method, "no returnval"))?;
            let number = |n: &Node, name: &str| -> Result<u64, VmwareError> {
                n.text_at(&[name])
                    .and_then(|t| t.parse().ok())
                    .ok_or_else(|| self.protocol(method, &format!("{name} missing or not a number")))
            };
            let start = number(rv, "startOffset")?;
            let length = number(rv, "length")?;
            for a in rv.children("changedArea") {
                areas.push(Area { start: number(a, "start")?, length: number(a, "length")? });
            }
            let next = start.saturating_add(length);
            if start > offset || next <= offset {
                return Err(self.protocol(
                    method,
                    &format!("asked from offset {offset}, got startOffset {start} and length {length}"),
                ));
            }
            offset = next;
        }
        Ok(areas)
    }

    /// `RetrievePropertiesEx` of some properties of one object; unset
    /// properties are absent from the map.
    fn properties(&self, obj: &Moref, paths: &[&str]) -> Result<HashMap<String, Node>, VmwareError> {
        let method = "RetrievePropertiesEx";
        let path_set: String = paths.iter().map(|p| text_element("pathSet", p)).collect();
        let body = format!(
            "{}<specSet><propSet>{}{path_set}</propSet><objectSet>{}</objectSet></specSet><options></options>",
            self.content.property_collector.xml("_this"),
            text_element("type", &obj.kind),
            obj.xml("obj")
        );
        let r = self.call(method, &body)?;
        let mut out = HashMap::new();
        for objects in r.children("returnval").flat_map(|rv| rv.children("objects")) {
            if let Some(missing) = objects.child("missingSet") {
                let fault = missing.at(&["fault", "fault"]).and_then(Node::type_name).unwrap_or("unknown");
                let path = missing.text_at(&["path"]).unwrap_or_default();
                return Err(VmwareError::Fault {
                    server: self.server.clone(),
                    method: method.into(),
                    fault: fault.into(),
                    message: format!("{obj}: property {path}"),
                });
            }
            for prop in objects.children("propSet") {
                if let (Some(name), Some(val)) = (prop.text_at(&["name"]), prop.child("val")) {
                    out.insert(name.to_string(), val.clone());
                }
            }
        }
        Ok(out)
    }

    /// Calls a `..._Task` method and returns the task.
    fn task_ref(&self, method: &str, body: &str) -> Result<Moref, VmwareError> {
        let r = self.call(method, body)?;
        r.child("returnval")
            .and_then(Node::moref)
            .filter(|m| m.kind == "Task")
            .ok_or_else(|| self.protocol(method, "no task in the answer"))
    }

    /// Polls a task until it ends; returns its result. Stops waiting (not the
    /// task) when cancelled.
    fn wait_task(&self, task: &Moref, what: &str) -> Result<Option<Node>, VmwareError> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(20);
        loop {
            let props = self.properties(task, &["info"])?;
            let info = props.get("info").ok_or_else(|| self.protocol("RetrievePropertiesEx", "task without info"))?;
            match info.text_at(&["state"]) {
                Some("success") => return Ok(info.child("result").cloned()),
                Some("error") => {
                    let fault = info.at(&["error", "fault"]).and_then(Node::type_name).unwrap_or("unknown");
                    return Err(VmwareError::TaskFailed {
                        server: self.server.clone(),
                        task: task.value.clone(),
                        what: what.into(),
                        fault: fault.into(),
                        message: info.text_at(&["error", "localizedMessage"]).unwrap_or_default().into(),
                    });
                }
                _ => {}
            }
            if started.elapsed() >= self.endpoint.timeouts.task {
                return Err(VmwareError::TaskTimeout {
                    server: self.server.clone(),
                    task: task.value.clone(),
                    what: what.into(),
                    seconds: self.endpoint.timeouts.task.as_secs(),
                });
            }
            let until = Instant::now() + delay;
            while Instant::now() < until {
                if self.cancel.is_cancelled() {
                    return Err(VmwareError::Cancelled { server: self.server.clone(), what: what.into() });
                }
                std::thread::sleep(TICK.min(until.saturating_duration_since(Instant::now())));
            }
            delay = (delay * 2).min(TASK_POLL_MAX);
        }
    }

    /// One call; logs in again once if the session expired.
    fn call(&self, method: &str, body: &str) -> Result<Node, VmwareError> {
        match self.send(method, body) {
            Err(VmwareError::Fault { fault, .. }) if fault == "NotAuthenticated" && self.lock_cookie().is_some() => {
                tracing::info!(server = %self.server, method, "vCenter session expired; logging in again");
                self.login()?;
                self.send(method, body)
            }
            other => other,
        }
    }

    /// Sends one request and reads its answer: the response element, or the
    /// fault as an error.
    fn send(&self, method: &str, body: &str) -> Result<Node, VmwareError> {
        tracing::trace!(server = %self.server, method, "vSphere call");
        let mut req = self
            .agent
            .request_url("POST", &self.endpoint.url)
            .set("Content-Type", "text/xml; charset=utf-8")
            .set("SOAPAction", SOAP_ACTION);
        if let Some(c) = self.lock_cookie().as_ref() {
            req = req.set("Cookie", c.expose());
        }
        if method == "Logout" {
            req = req.timeout(LOGOUT_TIMEOUT);
        }
        let resp = match req.send_string(&soap::envelope(method, body)) {
            Ok(resp) => resp,
            Err(ureq::Error::Status(code, resp)) => {
                let text = read_body(resp).unwrap_or_default();
                return Err(match soap::parse_answer(&text) {
                    Ok(Answer::Fault(f)) => self.fault(method, f.kind, f.message),
                    _ if (502..=504).contains(&code) => VmwareError::Unreachable {
                        server: self.server.clone(),
                        reason: format!("HTTP {code} from {method}"),
                    },
                    _ => self.protocol(method, &format!("HTTP {code}")),
                });
            }
            Err(ureq::Error::Transport(t)) => {
                if let Some(presented) = self.verifier.take_refused() {
                    return Err(VmwareError::Thumbprint {
                        server: self.server.clone(),
                        expected: self.endpoint.thumbprint.to_string(),
                        presented: presented.to_string(),
                    });
                }
                return Err(VmwareError::Unreachable { server: self.server.clone(), reason: transport_reason(&t) });
            }
        };
        if method == "Login" {
            let cookie = resp
                .all("set-cookie")
                .into_iter()
                .filter_map(|c| c.split(';').next())
                .find(|c| c.trim_start().starts_with(SESSION_COOKIE))
                .map(|c| Secret::new(c.trim()));
            *self.lock_cookie() = cookie;
        }
        let text = read_body(resp).map_err(|e| VmwareError::Unreachable {
            server: self.server.clone(),
            reason: format!("reading the answer to {method}: {e}"),
        })?;
        match soap::parse_answer(&text).map_err(|e| self.protocol(method, &e))? {
            Answer::Response(node) => Ok(node),
            Answer::Fault(f) => Err(self.fault(method, f.kind, f.message)),
        }
    }

    fn fault(&self, method: &str, fault: String, message: String) -> VmwareError {
        VmwareError::Fault { server: self.server.clone(), method: method.into(), fault, message }
    }

    fn protocol(&self, method: &str, reason: &str) -> VmwareError {
        VmwareError::Protocol { server: self.server.clone(), method: method.into(), reason: reason.into() }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.logout();
    }
}

fn read_body(resp: ureq::Response) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    resp.into_reader().take(MAX_ANSWER).read_to_end(&mut out)?;
    Ok(out)
}

/// A transport error in one line, with its cause.
fn transport_reason(t: &ureq::Transport) -> String {
    let mut s = t.kind().to_string();
    if let Some(m) = t.message() {
        s = format!("{s}: {m}");
    }
    let mut source = std::error::Error::source(t);
    while let Some(e) = source {
        s = format!("{s}: {e}");
        source = e.source();
    }
    s
}

/// The virtual disks in a `config.hardware.device` value.
pub fn disks(devices: &Node) -> Vec<Disk> {
    devices
        .children
        .iter()
        .filter(|d| d.type_name() == Some("VirtualDisk"))
        .filter_map(|d| {
            let key = d.text_at(&["key"])?.parse().ok()?;
            let capacity = match d.text_at(&["capacityInBytes"]).and_then(|t| t.parse::<u64>().ok()) {
                Some(b) if b > 0 => b,
                _ => d.text_at(&["capacityInKB"])?.parse::<u64>().ok()?.checked_mul(1024)?,
            };
            let change_id = d.text_at(&["backing", "changeId"]).filter(|c| !c.is_empty()).map(str::to_string);
            Some(Disk {
                key,
                label: d.text_at(&["deviceInfo", "label"]).unwrap_or_default().to_string(),
                capacity,
                file: d.text_at(&["backing", "fileName"]).unwrap_or_default().to_string(),
                change_id,
            })
        })
        .collect()
}

fn snapshot_tree(tree: &Node, out: &mut Vec<SnapshotInfo>) {
    if let Some(moref) = tree.child("snapshot").and_then(Node::moref) {
        out.push(SnapshotInfo {
            moref,
            name: tree.text_at(&["name"]).unwrap_or_default().into(),
            description: tree.text_at(&["description"]).unwrap_or_default().into(),
            created: tree.text_at(&["createTime"]).unwrap_or_default().into(),
        });
    }
    for child in tree.children("childSnapshotList") {
        snapshot_tree(child, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_refs_tell_uuids_from_paths() {
        assert_eq!(
            VmRef::parse("421C5A3E-0F7B-4C2B-9C3E-5D6E7F809A1B"),
            VmRef::InstanceUuid("421c5a3e-0f7b-4c2b-9c3e-5d6e7f809a1b".into())
        );
        assert_eq!(VmRef::parse("/DC0/vm/web-1"), VmRef::Path("/DC0/vm/web-1".into()));
        assert_eq!(VmRef::parse("421c5a3e-0f7b-4c2b-9c3e"), VmRef::Path("421c5a3e-0f7b-4c2b-9c3e".into()));
        assert_eq!(
            VmRef::parse("zzzzzzzz-0f7b-4c2b-9c3e-5d6e7f809a1b"),
            VmRef::Path("zzzzzzzz-0f7b-4c2b-9c3e-5d6e7f809a1b".into())
        );
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        let e = Endpoint {
            name: "vc".into(),
            url: url::Url::parse("https://vc.example/sdk").unwrap(),
            user: "u".into(),
            password: s,
            thumbprint: Thumbprint::of(b""),
            timeouts: Timeouts::default(),
        };
        assert!(!format!("{e:?}").contains("hunter2"));
        assert_eq!(e.server(), "vc (vc.example)");
    }

    #[test]
    fn password_files_lose_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let check = |content: &str| {
            let p = dir.path().join("pw");
            std::fs::write(&p, content).unwrap();
            read_password(&p).map(|s| s.expose().to_string())
        };
        assert_eq!(check("s3cret\n").unwrap(), "s3cret");
        assert_eq!(check("s3cret\r\n").unwrap(), "s3cret");
        assert_eq!(check(" s3 cret \n\n").unwrap(), " s3 cret \n");
        let e = check("\n").unwrap_err();
        assert!(e.contains("is empty"), "{e}");
        let e = read_password(std::path::Path::new("/nonexistent/pw")).unwrap_err();
        assert!(e.starts_with("password file /nonexistent/pw:"), "{e}");
    }

    #[test]
    fn disks_are_read_from_a_device_list() {
        // As vCenter writes config.hardware.device (abridged).
        let xml = r#"<val xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="ArrayOfVirtualDevice">
            <VirtualDevice xsi:type="VirtualIDEController"><key>200</key></VirtualDevice>
            <VirtualDevice xsi:type="VirtualDisk"><key>2000</key>
              <deviceInfo><label>Hard disk 1</label><summary>8,192 KB</summary></deviceInfo>
              <backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds1] web/web.vmdk</fileName>
                <changeId>52 3c 1a 9e 6b 2f 80 4d-a1 2e 55 90 6c 11 ef 03/17</changeId></backing>
              <capacityInKB>8192</capacityInKB><capacityInBytes>8388608</capacityInBytes></VirtualDevice>
            <VirtualDevice xsi:type="VirtualDisk"><key>2001</key>
              <deviceInfo><label>Hard disk 2</label></deviceInfo>
              <backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds1] web/web_1.vmdk</fileName></backing>
              <capacityInKB>4096</capacityInKB></VirtualDevice>
            <VirtualDevice xsi:type="VirtualCdrom"><key>3002</key></VirtualDevice>
          </val>"#;
        let node = soap::parse(xml.as_bytes()).unwrap();
        assert_eq!(
            disks(&node),
            vec![
                Disk {
                    key: 2000,
                    label: "Hard disk 1".into(),
                    capacity: 8 << 20,
                    file: "[ds1] web/web.vmdk".into(),
                    change_id: Some("52 3c 1a 9e 6b 2f 80 4d-a1 2e 55 90 6c 11 ef 03/17".into()),
                },
                Disk {
                    key: 2001,
                    label: "Hard disk 2".into(),
                    capacity: 4 << 20,
                    file: "[ds1] web/web_1.vmdk".into(),
                    change_id: None,
                },
            ]
        );
        assert_eq!(disks(&node)[0].disk_id(), "disk-2000");
    }
}
