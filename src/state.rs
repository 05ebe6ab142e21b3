//! The job and disk state machines: the states, their names in the database and
//! on the admin API, and which transitions are legal.
//!
//! Pure: no I/O. The database refuses illegal transitions with the same rules
//! (`db::jobs` updates with `WHERE status IN (predecessors)`), so a terminal state
//! never changes even when two writers race.

use std::fmt;
use std::str::FromStr;

/// `replication_jobs.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobStatus {
    Pending,
    Preparing,
    Snapshotting,
    Streaming,
    Finalizing,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 8] = [
        JobStatus::Pending,
        JobStatus::Preparing,
        JobStatus::Snapshotting,
        JobStatus::Streaming,
        JobStatus::Finalizing,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    /// The value stored in the database.
    pub fn as_db(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Preparing => "preparing",
            JobStatus::Snapshotting => "snapshotting",
            JobStatus::Streaming => "streaming",
            JobStatus::Finalizing => "finalizing",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a database value; `replicating` (written by older orchestrators) is
    /// read as `pending`.
    pub fn from_db(s: &str) -> Option<Self> {
        match s {
            "replicating" => Some(JobStatus::Pending),
            _ => Self::ALL.into_iter().find(|j| j.as_db() == s),
        }
    }

    /// The capitalised word of the admin API (Queued = pending, Succeeded = completed).
    pub fn as_api(self) -> &'static str {
        match self {
            JobStatus::Pending => "Queued",
            JobStatus::Preparing => "Preparing",
            JobStatus::Snapshotting => "Snapshotting",
            JobStatus::Streaming => "Streaming",
            JobStatus::Finalizing => "Finalizing",
            JobStatus::Completed => "Succeeded",
            JobStatus::Failed => "Failed",
            JobStatus::Cancelled => "Cancelled",
        }
    }

    pub fn from_api(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|j| j.as_api().eq_ignore_ascii_case(s))
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled)
    }

    /// Position along the happy path; terminal failure states have none.
    fn rank(self) -> Option<u8> {
        match self {
            JobStatus::Pending => Some(0),
            JobStatus::Preparing => Some(1),
            JobStatus::Snapshotting => Some(2),
            JobStatus::Streaming => Some(3),
            JobStatus::Finalizing => Some(4),
            JobStatus::Completed => Some(5),
            JobStatus::Failed | JobStatus::Cancelled => None,
        }
    }

    /// Legal moves: forward along pending → preparing → (snapshotting) → streaming
    /// → finalizing → completed (stages may be skipped, e.g. a resumed job), or to
    /// failed/cancelled from any non-terminal state. Terminal states never change.
    /// Staying in the same non-terminal state is allowed (progress updates).
    pub fn can_become(self, next: JobStatus) -> bool {
        if self.is_terminal() {
            return false;
        }
        if self == next {
            return true;
        }
        match (self.rank(), next.rank()) {
            (_, None) => true,
            (Some(a), Some(b)) => b > a,
            (None, _) => false,
        }
    }

    /// The states from which `next` may be reached (for guarded UPDATEs).
    pub fn predecessors(next: JobStatus) -> Vec<JobStatus> {
        Self::ALL.into_iter().filter(|s| s.can_become(next)).collect()
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_db())
    }
}

impl FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::from_db(&s.to_ascii_lowercase())
            .or_else(|| Self::from_api(s))
            .ok_or_else(|| format!("unknown job status '{s}'"))
    }
}

/// `replication_jobs.current_operation`, in pipeline order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Discover,
    /// A VMware job: CBT is checked, and turned on when off.
    EnableCbt,
    QueryCbt,
    /// A VMware job: the daemon takes the job's snapshot.
    Snapshot,
    // PrepareVolumes is the orchestrator's stage: the daemon never sets it, but
    // it is named so that the pipeline is complete.
    #[allow(dead_code)]
    PrepareVolumes,
    StartExports,
    Transfer,
    Finalize,
    PersistChangeIds,
    /// A VMware job: the snapshot is removed (at the end, on failure, on cancel).
    Cleanup,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Discover => "Discover",
            Operation::EnableCbt => "EnableCBT",
            Operation::QueryCbt => "QueryCBT",
            Operation::Snapshot => "Snapshot",
            Operation::PrepareVolumes => "PrepareVolumes",
            Operation::StartExports => "StartExports",
            Operation::Transfer => "Transfer",
            Operation::Finalize => "Finalize",
            Operation::PersistChangeIds => "PersistChangeIDs",
            Operation::Cleanup => "Cleanup",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `vm_disks.sync_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskStatus {
    Pending,
    Streaming,
    Completed,
    Failed,
    Cancelled,
}

impl DiskStatus {
    pub fn as_db(self) -> &'static str {
        match self {
            DiskStatus::Pending => "pending",
            DiskStatus::Streaming => "streaming",
            DiskStatus::Completed => "completed",
            DiskStatus::Failed => "failed",
            DiskStatus::Cancelled => "cancelled",
        }
    }

    pub fn from_db(s: &str) -> Option<Self> {
        use DiskStatus::*;
        [Pending, Streaming, Completed, Failed, Cancelled].into_iter().find(|d| d.as_db() == s)
    }

    /// The admin API's word, aligned with the job's (Queued, Streaming, Succeeded, ...).
    pub fn as_api(self) -> &'static str {
        match self {
            DiskStatus::Pending => "Queued",
            DiskStatus::Streaming => "Streaming",
            DiskStatus::Completed => "Succeeded",
            DiskStatus::Failed => "Failed",
            DiskStatus::Cancelled => "Cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, DiskStatus::Completed | DiskStatus::Failed | DiskStatus::Cancelled)
    }
}

/// `replication_jobs.replication_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicationType {
    Full,
    Incremental,
}

impl ReplicationType {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationType::Full => "full",
            ReplicationType::Incremental => "incremental",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "full" => Some(ReplicationType::Full),
            "incremental" => Some(ReplicationType::Incremental),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::JobStatus::*;
    use super::*;

    fn check(from: JobStatus, to: JobStatus, legal: bool) {
        assert_eq!(from.can_become(to), legal, "{from} -> {to}");
    }

    #[test]
    fn the_happy_path_moves_forward() {
        for w in [Pending, Preparing, Snapshotting, Streaming, Finalizing, Completed].windows(2) {
            check(w[0], w[1], true);
            check(w[1], w[0], false);
        }
        check(Pending, Streaming, true); // stages the daemon does not perform are skipped
        check(Streaming, Streaming, true);
        check(Finalizing, Preparing, false);
    }

    #[test]
    fn any_live_state_can_fail_or_be_cancelled() {
        for s in [Pending, Preparing, Snapshotting, Streaming, Finalizing] {
            check(s, Failed, true);
            check(s, Cancelled, true);
        }
    }

    #[test]
    fn terminal_states_never_change() {
        for t in [Completed, Failed, Cancelled] {
            for s in JobStatus::ALL {
                check(t, s, false);
            }
        }
    }

    #[test]
    fn predecessors_match_the_rule() {
        assert_eq!(JobStatus::predecessors(Completed), vec![Pending, Preparing, Snapshotting, Streaming, Finalizing]);
        assert_eq!(JobStatus::predecessors(Preparing), vec![Pending, Preparing]);
        assert_eq!(JobStatus::predecessors(Cancelled), vec![Pending, Preparing, Snapshotting, Streaming, Finalizing]);
    }

    #[test]
    fn names_round_trip() {
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::from_db(s.as_db()), Some(s));
            assert_eq!(JobStatus::from_api(s.as_api()), Some(s));
            assert_eq!(s.as_db().parse::<JobStatus>(), Ok(s));
        }
        assert_eq!(JobStatus::from_db("replicating"), Some(Pending));
        assert_eq!(JobStatus::from_api("Succeeded"), Some(Completed));
        assert!("bogus".parse::<JobStatus>().is_err());
        assert_eq!(Operation::PersistChangeIds.as_str(), "PersistChangeIDs");
        assert_eq!(Operation::EnableCbt.as_str(), "EnableCBT");
        assert_eq!(Operation::Cleanup.as_str(), "Cleanup");
    }

    #[test]
    fn a_vmware_job_passes_through_snapshotting() {
        // preparing (EnableCBT) -> snapshotting (Snapshot, QueryCBT, StartExports)
        // -> streaming -> finalizing (Cleanup) -> completed; never back.
        for w in [Pending, Preparing, Snapshotting, Streaming, Finalizing, Completed].windows(2) {
            check(w[0], w[1], true);
        }
        check(Streaming, Snapshotting, false);
        check(Snapshotting, Preparing, false);
        // Cleanup on a failure or a cancel happens before the outcome is written.
        check(Snapshotting, Failed, true);
        check(Snapshotting, Cancelled, true);
    }
}
