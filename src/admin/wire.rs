//! The admin protocol's types: every request and response body that crosses the
//! socket, defined once and used by the server (serialising) and the CLI's client
//! (deserialising). Field order is the order on the wire.
//!
//! Requests deny unknown fields, so a typo is an error rather than a silently
//! ignored setting. Responses do not, so an older CLI keeps working against a
//! newer daemon that adds fields. Times are RFC 3339 strings in UTC with a `Z`
//! (second precision), so that the wire carries no chrono types; status words are
//! the capitalised API forms (`Queued`, `Streaming`, `Succeeded`, ...).
//!
//! How values are computed from rows and live views is `view`'s business;
//! validation of a submitted job is `submit`'s.

use serde::{Deserialize, Serialize};

/// Every endpoint but `/metrics` lives under this prefix.
pub const API: &str = "/api/v1";

// ------------------------------------------------------------- requests ----

/// `POST /api/v1/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// Generated (`job-YYYYMMDD-HHMMSS-xxxx`) when absent.
    #[serde(default)]
    pub id: Option<String>,
    pub vm_name: String,
    #[serde(default)]
    pub vm_path: Option<String>,
    /// `full` or `incremental`; checked by `submit` so that the error names it.
    pub replication_type: String,
    #[serde(default)]
    pub nbd_export_name: Option<String>,
    /// A VMware job: the daemon drives vSphere and serves the disks itself
    /// (the disks then name a device key instead of a source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmware: Option<VmwareRequest>,
    /// Run incremental disks even when their `previous_change_id` does not
    /// continue the change-ID chain recorded for the VM's disk.
    #[serde(default)]
    pub skip_change_check: bool,
    /// The job's bandwidth limit, as in `POST /api/v1/jobs/{id}/limit`
    /// (`"200M"` or bytes/s); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate: Option<serde_json::Value>,
    pub disks: Vec<DiskRequest>,
}

/// The VMware source of a [`SubmitRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmwareRequest {
    /// The name of a `[vmware.NAME]` section of the daemon's configuration.
    pub vcenter: String,
    /// Inventory path (`/DC/vm/folder/name`) or instance UUID.
    pub vm: String,
}

/// One disk of a [`SubmitRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRequest {
    pub disk_id: String,
    #[serde(default)]
    pub label: Option<String>,
    /// Source NBD URI; none in a VMware job.
    #[serde(default)]
    pub source: String,
    /// A VMware job: the virtual disk's device key (2000, 2001, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmware_disk_key: Option<i32>,
    /// Target NBD URI.
    pub target: String,
    #[serde(default)]
    pub destination_is_zero: bool,
    /// The target is thick-provisioned: zero requests keep its blocks allocated.
    #[serde(default)]
    pub keep_allocated: bool,
    /// Incremental: the source's `qemu:dirty-bitmap:NAME`.
    #[serde(default)]
    pub dirty_bitmap: Option<String>,
    /// Incremental: `[{"start": N, "length": N}, ...]`, kept as JSON so that
    /// `submit` can report what is wrong with it as a changed-areas error.
    #[serde(default)]
    pub changed_areas: Option<serde_json::Value>,
    #[serde(default)]
    pub previous_change_id: Option<String>,
    #[serde(default)]
    pub change_id: Option<String>,
}

// ------------------------------------------------------------ responses ----

/// Every error: `{"error": {"code": "not_found", "message": "job 'x' not found"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable snake_case code (see `AdminError::code`).
    pub code: String,
    /// One lower-case line for people.
    pub message: String,
}

/// `201` answer to a submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitResponse {
    pub job_id: String,
}

/// `GET /api/v1/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// `ok`, or `degraded` while the database does not answer.
    pub status: String,
    pub version: String,
    pub node_id: String,
    /// Whether the database answered a ping on a connection of the readers,
    /// apart from the writer's.
    pub database_reachable: bool,
    /// Writes the daemon holds for the database (waiting, or being written):
    /// large while the database is slow for writes, even if it answers reads.
    #[serde(default)]
    pub database_backlog: u64,
    /// Jobs this node is running now.
    pub active_jobs: u64,
    pub uptime_seconds: u64,
    pub started_at: String,
}

/// `GET /api/v1/jobs`, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobSummary>,
}

/// One job as listed; figures are those of its row (written a few times a second
/// at most).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    pub id: String,
    pub vm_name: String,
    pub replication_type: String,
    /// Incremental disks run even when their change-ID chain is broken.
    pub skip_change_check: bool,
    /// 1 for a new job; one more each time it is queued again after it ended.
    pub attempt: i32,
    pub status: String,
    /// `current_operation`; null until the job is started.
    pub stage: Option<String>,
    pub percent: f64,
    pub bytes_transferred: u64,
    pub total_bytes: u64,
    pub throughput_bps: u64,
    pub eta_seconds: Option<u64>,
    pub nbd_export_name: Option<String>,
    pub owner_node: Option<String>,
    /// The job's own bandwidth limit (its row), bytes/s; null: none.
    #[serde(default)]
    pub max_rate: Option<u64>,
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
}

/// `GET /api/v1/jobs/{id}`: the job, its disks and its newest events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobDetail {
    #[serde(flatten)]
    pub job: JobSummary,
    pub vm_path: Option<String>,
    /// A VMware job: its vCenter (section name), VM, and the snapshot the
    /// daemon holds for it (null once removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmware: Option<VmwareView>,
    pub disks: Vec<DiskDetail>,
    /// Newest first.
    pub events: Vec<EventView>,
}

/// The VMware side of a [`JobDetail`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmwareView {
    pub vcenter: String,
    pub vm: Option<String>,
    pub snapshot: Option<String>,
}

/// One disk row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskDetail {
    pub disk_id: String,
    pub label: Option<String>,
    /// A VMware job's device key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmware_disk_key: Option<i32>,
    pub source: String,
    pub target: String,
    pub destination_is_zero: bool,
    pub keep_allocated: bool,
    pub status: String,
    pub capacity_bytes: u64,
    pub planned_bytes: u64,
    pub bytes_transferred: u64,
    pub skipped_bytes: u64,
    pub percent: f64,
    pub throughput_bps: u64,
    pub dirty_bitmap: Option<String>,
    /// Whether changed areas were given (the list itself can be large).
    pub has_changed_areas: bool,
    pub previous_change_id: Option<String>,
    pub change_id: Option<String>,
    /// Set only once the copy succeeded and the target was flushed.
    pub disk_change_id: Option<String>,
    pub resume_offset: u64,
    pub error: Option<String>,
    pub updated_at: String,
}

/// One `job_events` row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventView {
    pub at: String,
    pub level: String,
    pub stage: String,
    pub disk_id: Option<String>,
    pub message: String,
    pub correlation_id: String,
}

/// `GET /api/v1/progress/{job_id or nbd_export_name}`: the shape README.md
/// documents, with extra fields after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub job_id: String,
    /// `current_operation` (e.g. `Transfer`); null until the job is started.
    pub stage: Option<String>,
    pub status: String,
    /// Null until the job is started.
    pub started_at: Option<String>,
    pub updated_at: String,
    pub aggregate: Aggregate,
    pub cbt: Cbt,
    pub nbd: Nbd,
    pub disks: Vec<DiskProgress>,
    /// Seconds to go at the current rate; null when unknown.
    pub eta_seconds: Option<u64>,
    pub error: Option<String>,
    /// `live` (this node runs the job; figures from its aggregator) or `database`.
    pub source: String,
    /// The bandwidth limit in force, bytes/s: live, the lower of the job's and
    /// the appliance's; otherwise the job's own (its row). Null: none.
    #[serde(default)]
    pub max_rate: Option<u64>,
    /// The limit holds the copy back now: the rate and the ETA are the limit's.
    #[serde(default)]
    pub limited: bool,
}

/// `POST /api/v1/jobs/{id}/limit` and `POST /api/v1/limit`: a bandwidth limit,
/// `"200M"` (bytes/s, binary units), a number of bytes/s, or `0`/`"none"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitRequest {
    pub max_rate: serde_json::Value,
}

/// The answer to a limit request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimitResponse {
    /// The jobs whose limit was set.
    pub jobs: Vec<String>,
    /// Bytes/s; 0: none.
    pub max_rate: u64,
    /// Those of `jobs` running here, whose copies follow within a second
    /// (the others take it up when they are claimed, or at their owner's next
    /// lease renewal).
    pub running: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    /// Planned bytes of all disks (the denominator).
    pub total_bytes: u64,
    pub bytes_transferred: u64,
    pub throughput_bps: u64,
    pub percent: f64,
}

/// The change IDs the job moves the target between (those of its first disk
/// that has any), kept for older readers: change IDs are per disk, see
/// [`DiskProgress::cbt`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cbt {
    #[serde(rename = "type")]
    pub kind: String,
    pub previous_change_id: Option<String>,
    pub change_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Nbd {
    pub exports: Vec<Export>,
}

/// One target export, one per disk. There is no `/dev/nbdX` here (the daemon
/// talks NBD itself), so `device` is the target URI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Export {
    pub name: String,
    pub device: String,
    /// The daemon holds open connections to it now.
    pub connected: bool,
    /// When the current connection started; null when not connected.
    pub started_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskProgress {
    pub id: String,
    pub label: Option<String>,
    pub planned_bytes: u64,
    pub bytes_transferred: u64,
    pub throughput_bps: u64,
    pub percent: f64,
    pub status: String,
    pub error: Option<String>,
    /// This disk's change IDs and the CBT history of its latest ended attempt.
    pub cbt: DiskCbt,
}

/// The change-ID side of one disk (VMware change IDs are per disk): what the
/// copy moves the target between, what the target was last made consistent with,
/// and the `cbt_history` row of the disk's latest attempt in this job that ended
/// (all `null` while none has).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskCbt {
    #[serde(rename = "type")]
    pub kind: String,
    pub previous_change_id: Option<String>,
    pub change_id: Option<String>,
    /// `change_id`, once the copy succeeded and the target was flushed.
    pub disk_change_id: Option<String>,
    pub attempt: Option<i32>,
    pub sync_success: Option<bool>,
    /// The number of ranges the copy read after merging adjacent ones (changed
    /// ranges, or allocated data ranges for a full copy).
    pub blocks_changed: Option<u64>,
    pub bytes_transferred: Option<u64>,
    pub sync_duration_seconds: Option<f64>,
}

/// `POST /api/v1/jobs/{id}/cancel`: `202` when this node stops the running job
/// (within a second), `200` when the job was cancelled in the database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelResponse {
    pub job_id: String,
    /// True when this node was running the job and is stopping it.
    pub stopping: bool,
    pub message: String,
}

/// `POST /api/v1/discover` (`202`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiscoverResponse {
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_submission_parses() {
        let body = r#"{"id": "optional-job-id", "vm_name": "vm1", "vm_path": "/DC/vm/vm1", "replication_type": "full",
             "nbd_export_name": "migration-vol-1",
             "disks": [{"disk_id": "disk-2000", "label": "Hard disk 1", "source": "nbd+unix:///?socket=/tmp/s.sock",
                        "target": "nbd+unix:///?socket=/tmp/d.sock", "destination_is_zero": false,
                        "dirty_bitmap": null, "changed_areas": null, "previous_change_id": null, "change_id": null}]}"#;
        let r: SubmitRequest = serde_json::from_str(body).unwrap();
        assert_eq!(r.id.as_deref(), Some("optional-job-id"));
        assert_eq!(r.disks[0].changed_areas, None);
        let minimal = r#"{"vm_name": "v", "replication_type": "full", "disks": []}"#;
        assert!(serde_json::from_str::<SubmitRequest>(minimal).is_ok());
        let typo = r#"{"vm_name": "v", "replication_type": "full", "disks": [], "vm_nmae": "x"}"#;
        assert!(serde_json::from_str::<SubmitRequest>(typo).unwrap_err().to_string().contains("unknown field"));
    }

    #[test]
    fn cbt_type_is_named_type_on_the_wire() {
        let c = Cbt { kind: "full".into(), previous_change_id: None, change_id: Some("1".into()) };
        assert_eq!(serde_json::to_string(&c).unwrap(), r#"{"type":"full","previous_change_id":null,"change_id":"1"}"#);
    }
}
