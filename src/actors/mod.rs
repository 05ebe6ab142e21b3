//! The daemon's actors (actix), one file each, exchanging the messages of
//! `messages.rs`:
//!
//! - `chain`: whether an incremental disk continues its change-ID chain (a pure check)
//! - `discovery`: claims ready jobs, starts a JobAggregator for each
//! - `job_aggregator`: one per job; carries out what its `JobRun` decides, renews its lease
//! - `job_tracker`, `job_run`: a job's figures, and its decisions as values (plain structs)
//! - `disk_copier`: one per disk; runs the engine on its own thread
//! - `db_writer`: the only place that touches the database; throttles and coalesces
//! - `throttle`: the DbWriter's throttle and the merge of pending updates
//! - `db_exec`: the DbWriter's executor thread (the writer's connection), the reader
//!   threads (the admin's reads), and the deadline guard of both
//! - `timeout_watchdog`: fails jobs that stopped making progress
//! - `vsphere`: a VMware job's worker thread: the vSphere steps its `JobRun` decides
//!
//! The logic of each is a plain struct (`JobTracker` and `JobRun`, `Throttle`,
//! `StallTracker`, `DiskSlots`) that unit tests drive; the actors are thin shells
//! around them.
//! Nothing here knows about sockets or the command line.

pub mod chain;
pub mod db_exec;
pub mod db_writer;
pub mod discovery;
pub mod disk_copier;
pub mod job_aggregator;
pub mod job_run;
pub mod job_tracker;
pub mod messages;
pub mod throttle;
pub mod timeout_watchdog;
pub mod vsphere;

/// What a caught panic said, for a log line or an error message.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
