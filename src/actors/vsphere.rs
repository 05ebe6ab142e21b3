//! The vSphere worker of one VMware job: a thread, owned and joined by the
//! job's JobAggregator, that carries out the [`VsphereStep`]s the job's run
//! decided (log in and enable CBT, the snapshot, the changed areas, the disks'
//! NBD servers, the cleanup), in order, and answers each with one
//! [`VsphereDone`]. The calls block (HTTP to vCenter, tasks that take minutes),
//! so they never run on the actors' thread, and nothing here decides what
//! happens next: that is `JobRun`'s business.
//!
//! The worker holds the vCenter session, the job's snapshot and the disks' NBD
//! servers ([`NbdSource`]): when the job's actor stops, the worker's channel
//! closes, the servers are stopped and the thread ends. If the daemon dies, the
//! servers get their parent-death signal (see `vmware::source`).
//!
//! Transient failures (vCenter unreachable or busy) are retried with backoff,
//! a few times; everything else is answered at once, as one line.
//!
//! [`remove_left_snapshot`] is the same for discovery's sweep of snapshots that
//! jobs which ended left behind.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::messages::{AreaQuery, VsphereDone, VsphereOutcome, VsphereStep};
use crate::config::{Settings, Vcenter};
use crate::db::LeftSnapshot;
use crate::engine::CancelToken;
use crate::vmware::client::Since;
use crate::vmware::soap::Moref;
use crate::vmware::source::{NbdSource, Vars};
use crate::vmware::{Client, Endpoint, Template, Vm, VmRef, VmwareError};

/// Attempts of a step whose failures are transient, and the first wait between
/// them (doubling each time).
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// How long a disk's NBD server may take to answer.
const SOURCE_READY: Duration = Duration::from_secs(60);

/// What the worker of one job needs.
#[derive(Debug, Clone)]
pub struct VsphereJob {
    pub job_id: String,
    /// The `[vmware.NAME]` section's name and contents.
    pub vcenter_name: String,
    pub vcenter: Vcenter,
    /// Inventory path or instance UUID.
    pub vm: String,
    /// Where the disks' sockets and logs go.
    pub runtime_dir: PathBuf,
}

/// The snapshot's name for a job: how the daemon recognises its own.
pub fn snapshot_name(job_id: &str) -> String {
    format!("blockrepl-{job_id}")
}

/// The service's runtime directory: systemd's `RUNTIME_DIRECTORY` (its first
/// entry), else the admin socket's directory.
pub fn runtime_dir(settings: &Settings) -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY")
        && let Some(first) = dir.to_string_lossy().split(':').find(|s| !s.is_empty())
    {
        return PathBuf::from(first);
    }
    settings.admin.socket.parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/run/blockrepl"))
}

/// The running worker; [`VsphereWorker::stop`] (or drop) ends and joins it.
pub struct VsphereWorker {
    tx: Option<mpsc::Sender<VsphereStep>>,
    cancel: CancelToken,
    thread: Option<JoinHandle<()>>,
}

impl VsphereWorker {
    pub fn start(job: VsphereJob, report: Recipient<VsphereDone>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let cancel = CancelToken::default();
        let token = cancel.clone();
        let thread = std::thread::Builder::new().name(format!("vsphere-{}", job.job_id)).spawn(move || {
            let mut s = Session::new(job, token);
            while let Ok(step) = rx.recv() {
                let outcome = s.run(step);
                report.do_send(VsphereDone(outcome));
            }
            // The job's actor is gone: its servers and its session with it.
            s.sources.clear();
            if let Some(c) = s.client.take() {
                c.logout();
            }
        })?;
        Ok(Self { tx: Some(tx), cancel, thread: Some(thread) })
    }

    pub fn send(&self, step: VsphereStep) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(step);
        }
    }

    /// Stops waiting (a vCenter task goes on in vCenter), stops the disks'
    /// servers and joins the thread: at most one vSphere request's timeout.
    pub fn stop(&mut self) {
        self.cancel.cancel();
        self.tx = None;
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the vSphere worker panicked");
        }
    }
}

impl Drop for VsphereWorker {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Session {
    job: VsphereJob,
    cancel: CancelToken,
    client: Option<Client>,
    vm: Option<Vm>,
    snapshot: Option<Moref>,
    /// The disks as the snapshot saw them.
    snap_disks: Vec<crate::vmware::Disk>,
    sources: BTreeMap<String, NbdSource>,
}

impl Session {
    fn new(job: VsphereJob, cancel: CancelToken) -> Self {
        Self { job, cancel, client: None, vm: None, snapshot: None, snap_disks: Vec::new(), sources: BTreeMap::new() }
    }

    fn run(&mut self, step: VsphereStep) -> VsphereOutcome {
        let result = match step {
            VsphereStep::Open => self.open(),
            VsphereStep::Snapshot { keep } => self.snapshot(keep),
            VsphereStep::Query { disks } => self.query(&disks),
            VsphereStep::Export { disks } => self.export(&disks),
            VsphereStep::Cleanup { snapshot } => Ok(VsphereOutcome::CleanedUp(self.cleanup(snapshot))),
        };
        result.unwrap_or_else(|e| VsphereOutcome::Failed(e.to_string()))
    }

    /// `f` until it succeeds, fails for good, or [`ATTEMPTS`] transient failures.
    fn retrying<T>(&self, f: impl FnMut() -> Result<T, VmwareError>) -> Result<T, VmwareError> {
        retrying(&self.job.job_id, &self.cancel, f)
    }

    /// Logs in, unless logged in already.
    fn connect(&mut self) -> Result<(), VmwareError> {
        if self.client.is_none() {
            let endpoint = Endpoint::from_config(&self.job.vcenter_name, &self.job.vcenter)?;
            let cancel = self.cancel.clone();
            let c = self.retrying(|| Client::connect(endpoint.clone(), cancel.clone()))?;
            self.client = Some(c);
        }
        Ok(())
    }

    /// The session, after [`Session::connect`].
    fn client(&self) -> Result<&Client, VmwareError> {
        self.client
            .as_ref()
            .ok_or_else(|| VmwareError::Config { name: self.job.vcenter_name.clone(), reason: "not logged in".into() })
    }

    fn open(&mut self) -> Result<VsphereOutcome, VmwareError> {
        self.connect()?;
        let c = self.client()?;
        let vm = self.retrying(|| c.find_vm(&VmRef::parse(&self.job.vm)))?;
        let mut cbt_enabled_now = false;
        if !vm.cbt_enabled {
            self.retrying(|| c.enable_cbt(&vm.moref))?;
            cbt_enabled_now = true;
        }
        let moref = vm.moref.value.clone();
        self.vm = Some(vm);
        Ok(VsphereOutcome::Opened { vm: moref, cbt_enabled_now })
    }

    fn vm(&self) -> Result<&Vm, VmwareError> {
        self.vm.as_ref().ok_or_else(|| VmwareError::Config {
            name: self.job.vcenter_name.clone(),
            reason: "the VM was not looked up".into(),
        })
    }

    fn snapshot(&mut self, keep: Option<String>) -> Result<VsphereOutcome, VmwareError> {
        self.connect()?;
        let c = self.client()?;
        let vm = self.vm()?.clone();
        let name = snapshot_name(&self.job.job_id);
        let (snap, reused, removed) = self.retrying(|| {
            let mut kept = None;
            let mut removed = Vec::new();
            for s in c.snapshots(&vm.moref)? {
                if Some(&s.moref.value) == keep.as_ref() {
                    kept = Some(s.moref);
                } else if s.name == name {
                    // An earlier run's, never recorded (the daemon stopped in between).
                    c.remove_snapshot(&s.moref)?;
                    removed.push(s.moref.value);
                }
            }
            match kept {
                Some(k) => Ok((k, true, removed)),
                None => {
                    let what = format!("made by blockrepl for job {}; removed when the job ends", self.job.job_id);
                    Ok((c.create_snapshot(&vm.moref, &name, &what, false)?, false, removed))
                }
            }
        })?;
        let disks = self.retrying(|| c.snapshot_disks(&snap))?;
        let ids = disks.iter().map(|d| (d.key, d.change_id.clone())).collect();
        self.snapshot = Some(snap.clone());
        self.snap_disks = disks;
        Ok(VsphereOutcome::Snapshotted { snapshot: snap.value, reused, removed, disks: ids })
    }

    fn snap_disk(&self, key: i32) -> Result<crate::vmware::Disk, String> {
        self.snap_disks.iter().find(|d| d.key == key).cloned().ok_or_else(|| {
            let vm = self.vm.as_ref().map_or("?", |v| v.name.as_str());
            format!("VM {vm} has no virtual disk with key {key} in snapshot")
        })
    }

    fn query(&mut self, disks: &[AreaQuery]) -> Result<VsphereOutcome, VmwareError> {
        self.connect()?;
        let c = self.client()?;
        let vm = self.vm()?.moref.clone();
        let snap = self.snapshot.clone().ok_or_else(|| VmwareError::Config {
            name: self.job.vcenter_name.clone(),
            reason: "no snapshot to query".into(),
        })?;
        let mut out = Vec::new();
        for q in disks {
            let one = self.snap_disk(q.key).and_then(|disk| {
                let since = q.since.as_deref().map_or(Since::Creation, Since::ChangeId);
                self.retrying(|| c.changed_areas(&vm, &snap, &disk, since))
                    .map(|areas| (disk.capacity, areas))
                    .map_err(|e| e.to_string())
            });
            out.push((q.disk_id.clone(), one));
        }
        Ok(VsphereOutcome::Queried(out))
    }

    fn export(&mut self, disks: &[(String, i32)]) -> Result<VsphereOutcome, VmwareError> {
        let vc = &self.job.vcenter;
        let bad = |reason: String| VmwareError::Config { name: self.job.vcenter_name.clone(), reason };
        let template = match &vc.nbd_command {
            Some(argv) => Template::parse(argv).map_err(|e| bad(format!("nbd_command: {e}")))?,
            None => Template::vddk(),
        };
        let url = url::Url::parse(&vc.url).map_err(|e| bad(format!("url: {e}")))?;
        let vm = self.vm()?.moref.value.clone();
        let snap = self.snapshot.as_ref().map(|s| s.value.clone()).ok_or_else(|| bad("no snapshot to serve".into()))?;
        let mut out = Vec::new();
        for (disk_id, key) in disks {
            // A resumed job's server starts again.
            self.sources.remove(disk_id);
            let one = self.snap_disk(*key).and_then(|disk| {
                let stem = format!("{}-{disk_id}", safe(&self.job.job_id));
                let socket = self.job.runtime_dir.join(format!("{stem}.sock"));
                let argv = template.render(&Vars {
                    socket: &socket,
                    url: &url,
                    user: &vc.user,
                    password_file: &vc.password_file,
                    thumbprint: &vc.thumbprint,
                    vm: &vm,
                    snapshot: &snap,
                    file: &disk.file,
                    disk_key: disk.key,
                });
                let log = self.job.runtime_dir.join(format!("{stem}.log"));
                NbdSource::start(disk_id, argv, &socket, &log, SOURCE_READY).map_err(|e| e.to_string())
            });
            out.push((
                disk_id.clone(),
                one.map(|src| {
                    let uri = src.uri();
                    self.sources.insert(disk_id.clone(), src);
                    uri
                }),
            ));
        }
        Ok(VsphereOutcome::Exported(out))
    }

    fn cleanup(&mut self, row: Option<String>) -> Result<Option<String>, String> {
        self.sources.clear();
        let Some(snap) = self.snapshot.take().or_else(|| row.map(|v| Moref::new("VirtualMachineSnapshot", &v))) else {
            return Ok(None);
        };
        self.connect().map_err(|e| e.to_string())?;
        let c = self.client().map_err(|e| e.to_string())?;
        self.retrying(|| c.remove_snapshot(&snap)).map(|_| Some(snap.value.clone())).map_err(|e| e.to_string())
    }
}

/// `f` until it succeeds, fails for good, or [`ATTEMPTS`] transient failures
/// (waiting [`FIRST_BACKOFF`], doubling, between them; a cancel ends the wait).
fn retrying<T>(
    job_id: &str,
    cancel: &CancelToken,
    mut f: impl FnMut() -> Result<T, VmwareError>,
) -> Result<T, VmwareError> {
    let mut wait = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        match f() {
            Err(e) if e.is_transient() && attempt < ATTEMPTS && !cancel.is_cancelled() => {
                tracing::warn!(job_id = %job_id, error = %e, "vCenter call failed; retrying in {wait:?}");
                let end = Instant::now() + wait;
                while Instant::now() < end && !cancel.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                wait *= 2;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Removes a snapshot a job left behind (discovery's sweep): logs in to its
/// vCenter and removes it; one already gone counts as removed.
pub fn remove_left_snapshot(settings: &Settings, left: &LeftSnapshot, cancel: &CancelToken) -> Result<(), String> {
    let vc = settings
        .vmware
        .get(&left.vcenter)
        .ok_or_else(|| format!("no [vmware.{}] section in the configuration", left.vcenter))?;
    let endpoint = Endpoint::from_config(&left.vcenter, vc).map_err(|e| e.to_string())?;
    let client = retrying(&left.job_id, cancel, || Client::connect(endpoint.clone(), cancel.clone()))
        .map_err(|e| e.to_string())?;
    let snap = Moref::new("VirtualMachineSnapshot", &left.snapshot);
    let removed = retrying(&left.job_id, cancel, || client.remove_snapshot(&snap)).map(drop).map_err(|e| e.to_string());
    client.logout();
    removed
}

/// A job id as part of a file name.
fn safe(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_keep_only_safe_characters() {
        assert_eq!(safe("job-2025.09/x y"), "job-2025.09_x_y");
        assert_eq!(snapshot_name("job-1"), "blockrepl-job-1");
    }
}
