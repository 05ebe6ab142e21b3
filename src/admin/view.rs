//! Database rows and the aggregators' live views turned into the wire's
//! responses. Pure functions (the current time is passed in), so the shape of
//! every response is unit-tested without a daemon.
//!
//! Progress prefers the live view: when this node runs the job, its aggregator's
//! figures are fresher than the row, which the DbWriter writes only when the
//! percentage moved or a couple of seconds passed. The row still supplies what the
//! aggregator does not keep (labels, URIs, export names, error messages).

use chrono::{NaiveDateTime, SecondsFormat};

use super::wire::*;
use crate::actors::messages::{LiveDisk, LiveJob};
use crate::db::{CbtRecord, Disk, Job, JobEvent};
use crate::state::{DiskStatus, JobStatus, ReplicationType};

/// A UTC time as RFC 3339 with a `Z`, to the second.
pub fn time(t: NaiveDateTime) -> String {
    t.and_utc().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn bytes(v: i64) -> u64 {
    v.max(0) as u64
}

/// A percentage to two decimals, as the database keeps it.
fn pct(p: f64) -> f64 {
    if p.is_finite() { (p.clamp(0.0, 100.0) * 100.0).round() / 100.0 } else { 0.0 }
}

/// The job's own limit from its row; `None`: none.
fn job_rate(j: &Job) -> Option<u64> {
    Some(crate::actors::job_tracker::row_rate(j.max_rate)).filter(|&r| r > 0)
}

pub fn job_summary(j: &Job) -> JobSummary {
    JobSummary {
        id: j.id.clone(),
        vm_name: j.vm_name.clone(),
        replication_type: j.replication_type.shown(ReplicationType::as_str),
        skip_change_check: j.skip_change_check,
        attempt: j.attempt,
        status: j.status.shown(JobStatus::as_api),
        stage: j.current_operation.clone(),
        percent: pct(j.progress_percent),
        bytes_transferred: bytes(j.bytes_transferred),
        total_bytes: bytes(j.total_bytes),
        throughput_bps: bytes(j.transfer_speed_bps),
        eta_seconds: j.eta_seconds.map(bytes),
        nbd_export_name: j.nbd_export_name.clone(),
        owner_node: j.owner_node.clone(),
        max_rate: job_rate(j),
        error: j.error_message.clone(),
        created_at: time(j.created_at),
        updated_at: time(j.updated_at),
        started_at: j.started_at.map(time),
        completed_at: j.completed_at.map(time),
    }
}

pub fn job_detail(j: &Job, disks: &[Disk], events: &[JobEvent]) -> JobDetail {
    JobDetail {
        job: job_summary(j),
        vm_path: j.vm_path.clone(),
        vmware: j.vmware_vcenter.as_ref().map(|vc| VmwareView {
            vcenter: vc.clone(),
            vm: j.vmware_vm.clone(),
            snapshot: j.vmware_snapshot.clone(),
        }),
        disks: disks
            .iter()
            .map(|d| DiskDetail {
                disk_id: d.disk_id.clone(),
                label: d.label.clone(),
                vmware_disk_key: d.vmware_disk_key,
                source: d.source_uri.clone(),
                target: d.target_uri.clone(),
                destination_is_zero: d.destination_is_zero,
                keep_allocated: d.keep_allocated,
                status: d.sync_status.shown(DiskStatus::as_api),
                capacity_bytes: bytes(d.capacity_bytes),
                planned_bytes: bytes(d.planned_bytes),
                bytes_transferred: bytes(d.bytes_synced),
                skipped_bytes: bytes(d.skipped_bytes),
                percent: pct(d.sync_progress_percent),
                throughput_bps: bytes(d.throughput_bps),
                dirty_bitmap: d.dirty_bitmap.clone(),
                has_changed_areas: d.changed_areas.is_some(),
                previous_change_id: d.previous_change_id.clone(),
                change_id: d.change_id.clone(),
                disk_change_id: d.disk_change_id.clone(),
                resume_offset: bytes(d.resume_offset),
                error: d.error_message.clone(),
                updated_at: time(d.updated_at),
            })
            .collect(),
        events: events
            .iter()
            .map(|e| EventView {
                at: time(e.created_at),
                level: e.level.clone(),
                stage: e.stage.clone(),
                disk_id: e.disk_id.clone(),
                message: e.message.clone(),
                correlation_id: e.correlation_id.clone(),
            })
            .collect(),
    }
}

/// The export name of a disk: the target URI's export when it names one, else the
/// job's `nbd_export_name` for its first disk (the primary export), else
/// `{job_id}-{disk_id}`.
fn export_name(job: &Job, index: usize, d: &Disk) -> String {
    let from_uri = url::Url::parse(&d.target_uri)
        .ok()
        .map(|u| {
            percent_encoding::percent_decode_str(u.path().trim_start_matches('/')).decode_utf8_lossy().into_owned()
        })
        .filter(|s| !s.is_empty());
    from_uri
        .or_else(|| job.nbd_export_name.clone().filter(|_| index == 0))
        .unwrap_or_else(|| format!("{}-{}", job.id, d.disk_id))
}

/// A disk's change IDs and the newest of its `history` rows (its latest ended
/// attempt in this job), if any.
fn disk_cbt(kind: String, d: &Disk, history: &[CbtRecord]) -> DiskCbt {
    let last = history.iter().filter(|r| r.disk_id == d.disk_id).max_by_key(|r| r.attempt);
    DiskCbt {
        kind,
        previous_change_id: d.previous_change_id.clone(),
        change_id: d.change_id.clone(),
        disk_change_id: d.disk_change_id.clone(),
        attempt: last.map(|r| r.attempt),
        sync_success: last.map(|r| r.sync_success),
        blocks_changed: last.map(|r| bytes(r.blocks_changed)),
        bytes_transferred: last.map(|r| bytes(r.bytes_transferred)),
        sync_duration_seconds: last.map(|r| r.sync_duration_seconds),
    }
}

/// The progress of a job from its row, disks and CBT history, overlaid with
/// `live` when this node runs it. `now` stands for `updated_at` of a live view.
pub fn progress(
    job: &Job,
    disks: &[Disk],
    history: &[CbtRecord],
    live: Option<&LiveJob>,
    now: NaiveDateTime,
) -> Progress {
    let kind = || job.replication_type.shown(ReplicationType::as_str);
    let live_disk = |id: &str| live.and_then(|l| l.disks.iter().find(|d| d.disk_id == id));
    let change_ids = disks.iter().find(|d| d.change_id.is_some() || d.previous_change_id.is_some());
    Progress {
        job_id: job.id.clone(),
        stage: live.map(|l| l.operation.clone()).or_else(|| job.current_operation.clone()),
        status: live.map_or_else(|| job.status.shown(JobStatus::as_api), |l| l.status.as_api().to_string()),
        started_at: live.and_then(|l| l.started_at).or(job.started_at).map(time),
        updated_at: time(if live.is_some() { now } else { job.updated_at }),
        aggregate: match live {
            Some(l) => Aggregate {
                total_bytes: l.total_bytes,
                bytes_transferred: l.bytes_transferred,
                throughput_bps: l.throughput_bps,
                percent: pct(l.percent),
            },
            None => Aggregate {
                total_bytes: bytes(job.total_bytes),
                bytes_transferred: bytes(job.bytes_transferred),
                throughput_bps: bytes(job.transfer_speed_bps),
                percent: pct(job.progress_percent),
            },
        },
        cbt: Cbt {
            kind: kind(),
            previous_change_id: change_ids.and_then(|d| d.previous_change_id.clone()),
            change_id: change_ids.and_then(|d| d.change_id.clone()),
        },
        nbd: Nbd {
            exports: disks
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let l = live_disk(&d.disk_id);
                    Export {
                        name: export_name(job, i, d),
                        device: d.target_uri.clone(),
                        connected: l.is_some_and(|l| l.connected),
                        started_at: l.and_then(|l| l.connected_at).map(time),
                    }
                })
                .collect(),
        },
        disks: disks
            .iter()
            .map(|d| match live_disk(&d.disk_id) {
                Some(l) => disk_progress(
                    l,
                    d.label.clone().or_else(|| l.label.clone()),
                    d.error_message.clone(),
                    disk_cbt(kind(), d, history),
                ),
                None => DiskProgress {
                    id: d.disk_id.clone(),
                    label: d.label.clone(),
                    planned_bytes: bytes(d.planned_bytes),
                    bytes_transferred: bytes(d.bytes_synced),
                    throughput_bps: bytes(d.throughput_bps),
                    percent: pct(d.sync_progress_percent),
                    status: d.sync_status.shown(DiskStatus::as_api),
                    error: d.error_message.clone(),
                    cbt: disk_cbt(kind(), d, history),
                },
            })
            .collect(),
        eta_seconds: match live {
            Some(l) => l.eta_seconds,
            None => job.eta_seconds.map(bytes),
        },
        error: job.error_message.clone(),
        source: if live.is_some() { "live" } else { "database" }.to_string(),
        max_rate: live.map_or_else(|| job_rate(job), |l| l.max_rate),
        limited: live.is_some_and(|l| l.limited),
    }
}

fn disk_progress(l: &LiveDisk, label: Option<String>, error: Option<String>, cbt: DiskCbt) -> DiskProgress {
    DiskProgress {
        id: l.disk_id.clone(),
        label,
        planned_bytes: l.planned_bytes,
        bytes_transferred: l.bytes_transferred,
        throughput_bps: l.throughput_bps,
        percent: pct(l.percent),
        status: l.status.as_api().to_string(),
        error,
        cbt,
    }
}

/// The progress of a job this node runs while the database does not answer:
/// the live view alone, so URIs and export names are unknown (`nbd.exports` is
/// empty) and labels are the aggregator's.
pub fn live_progress(l: &LiveJob, now: NaiveDateTime) -> Progress {
    let change_ids = l.disks.iter().find(|d| d.change_id.is_some() || d.previous_change_id.is_some());
    Progress {
        job_id: l.job_id.clone(),
        stage: Some(l.operation.clone()),
        status: l.status.as_api().to_string(),
        started_at: l.started_at.map(time),
        updated_at: time(now),
        aggregate: Aggregate {
            total_bytes: l.total_bytes,
            bytes_transferred: l.bytes_transferred,
            throughput_bps: l.throughput_bps,
            percent: pct(l.percent),
        },
        cbt: Cbt {
            kind: l.replication_type.as_str().to_string(),
            previous_change_id: change_ids.and_then(|d| d.previous_change_id.clone()),
            change_id: change_ids.and_then(|d| d.change_id.clone()),
        },
        nbd: Nbd { exports: Vec::new() },
        disks: l
            .disks
            .iter()
            .map(|d| {
                // Without the database: the change IDs the aggregator keeps, no history.
                let cbt = DiskCbt {
                    kind: l.replication_type.as_str().to_string(),
                    previous_change_id: d.previous_change_id.clone(),
                    change_id: d.change_id.clone(),
                    disk_change_id: None,
                    attempt: None,
                    sync_success: None,
                    blocks_changed: None,
                    bytes_transferred: None,
                    sync_duration_seconds: None,
                };
                disk_progress(d, d.label.clone(), None, cbt)
            })
            .collect(),
        eta_seconds: l.eta_seconds,
        error: None,
        source: "live".to_string(),
        max_rate: l.max_rate,
        limited: l.limited,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn at(h: u32, m: u32, s: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(2025, 9, 4).unwrap().and_hms_micro_opt(h, m, s, 123_456).unwrap()
    }

    fn job() -> Job {
        Job {
            id: "job-123".into(),
            vm_name: "vm1".into(),
            vm_path: None,
            vmware_vcenter: None,
            vmware_vm: None,
            vmware_snapshot: None,
            replication_type: ReplicationType::Incremental.into(),
            skip_change_check: false,
            max_rate: None,
            status: JobStatus::Streaming.into(),
            current_operation: Some("Transfer".into()),
            progress_percent: 37.0,
            setup_progress_percent: 0.0,
            bytes_transferred: 456_789_012,
            total_bytes: 1_234_567_890,
            transfer_speed_bps: 98_765_432,
            eta_seconds: Some(8),
            nbd_export_name: Some("migration-vol-1".into()),
            error_message: None,
            owner_node: Some("a1".into()),
            lease_expires_at: None,
            owner_run: None,
            attempt: 1,
            last_progress_at: None,
            created_at: at(11, 59, 0),
            updated_at: at(12, 0, 10),
            started_at: Some(at(12, 0, 0)),
            completed_at: None,
        }
    }

    fn disk(id: &str, target: &str) -> Disk {
        Disk {
            id: 1,
            job_id: "job-123".into(),
            disk_id: id.into(),
            label: Some("Hard disk 1".into()),
            vmware_disk_key: None,
            source_uri: "nbd+unix:///?socket=/s".into(),
            target_uri: target.into(),
            destination_is_zero: false,
            keep_allocated: false,
            capacity_bytes: 2_000_000_000,
            planned_bytes: 987_654_321,
            bytes_synced: 345_678_901,
            skipped_bytes: 0,
            sync_status: DiskStatus::Streaming.into(),
            sync_progress_percent: 35.0,
            throughput_bps: 54_321_098,
            dirty_bitmap: None,
            changed_areas: Some("[]".into()),
            previous_change_id: Some("123-abc".into()),
            change_id: Some("456-def".into()),
            disk_change_id: None,
            resume_offset: 0,
            error_message: None,
            updated_at: at(12, 0, 9),
        }
    }

    #[test]
    fn times_are_rfc3339_utc_with_z() {
        assert_eq!(time(at(12, 0, 2)), "2025-09-04T12:00:02Z");
    }

    #[test]
    fn progress_from_the_database_has_the_spec_shape() {
        let disks = [disk("disk-0", "nbd+unix:///?socket=/d"), disk("disk-1", "nbd://h/vol%201")];
        let history = [CbtRecord {
            job_id: "job-123".into(),
            disk_id: "disk-1".into(),
            attempt: 2,
            change_id: Some("456-def".into()),
            previous_change_id: Some("123-abc".into()),
            sync_type: ReplicationType::Incremental,
            blocks_changed: 3,
            bytes_transferred: 4096,
            sync_duration_seconds: 1.5,
            sync_success: false,
        }];
        let p = progress(&job(), &disks, &history, None, at(13, 0, 0));
        let v = serde_json::to_value(&p).unwrap();
        let expected = serde_json::json!({
            "job_id": "job-123", "stage": "Transfer", "status": "Streaming",
            "started_at": "2025-09-04T12:00:00Z", "updated_at": "2025-09-04T12:00:10Z",
            "aggregate": {"total_bytes": 1234567890u64, "bytes_transferred": 456789012, "throughput_bps": 98765432,
                          "percent": 37.0},
            "cbt": {"type": "incremental", "previous_change_id": "123-abc", "change_id": "456-def"},
            "nbd": {"exports": [
                {"name": "migration-vol-1", "device": "nbd+unix:///?socket=/d", "connected": false, "started_at": null},
                {"name": "vol 1", "device": "nbd://h/vol%201", "connected": false, "started_at": null}]},
            "disks": [
                {"id": "disk-0", "label": "Hard disk 1", "planned_bytes": 987654321, "bytes_transferred": 345678901,
                 "throughput_bps": 54321098, "percent": 35.0, "status": "Streaming", "error": null,
                 "cbt": {"type": "incremental", "previous_change_id": "123-abc", "change_id": "456-def",
                         "disk_change_id": null, "attempt": null, "sync_success": null, "blocks_changed": null,
                         "bytes_transferred": null, "sync_duration_seconds": null}},
                {"id": "disk-1", "label": "Hard disk 1", "planned_bytes": 987654321, "bytes_transferred": 345678901,
                 "throughput_bps": 54321098, "percent": 35.0, "status": "Streaming", "error": null,
                 "cbt": {"type": "incremental", "previous_change_id": "123-abc", "change_id": "456-def",
                         "disk_change_id": null, "attempt": 2, "sync_success": false, "blocks_changed": 3,
                         "bytes_transferred": 4096, "sync_duration_seconds": 1.5}}],
            "eta_seconds": 8, "error": null, "source": "database", "max_rate": null, "limited": false
        });
        assert_eq!(v, expected);
    }

    #[test]
    fn the_live_view_wins_over_the_row() {
        let live = LiveJob {
            job_id: "job-123".into(),
            replication_type: ReplicationType::Incremental,
            status: JobStatus::Finalizing,
            operation: "Finalize".into(),
            started_at: Some(at(12, 0, 0)),
            total_bytes: 100,
            bytes_transferred: 100,
            throughput_bps: 7,
            percent: 100.0,
            eta_seconds: Some(0),
            retries: 2,
            max_rate: Some(4 << 20),
            limited: true,
            disks: vec![LiveDisk {
                disk_id: "disk-0".into(),
                label: None,
                status: DiskStatus::Completed,
                planned_bytes: 100,
                bytes_transferred: 100,
                throughput_bps: 7,
                percent: 100.0,
                connected: true,
                connected_at: Some(at(12, 0, 2)),
                retries: 2,
                previous_change_id: None,
                change_id: None,
            }],
        };
        let disks = [disk("disk-0", "nbd+unix:///?socket=/d"), disk("disk-9", "nbd+unix:///?socket=/e")];
        let p = progress(&job(), &disks, &[], Some(&live), at(13, 0, 0));
        assert_eq!(
            (p.status.as_str(), p.stage.as_deref(), p.source.as_str()),
            ("Finalizing", Some("Finalize"), "live")
        );
        assert_eq!(p.updated_at, "2025-09-04T13:00:00Z");
        assert_eq!(p.aggregate.percent, 100.0);
        assert_eq!(p.disks[0].status, "Succeeded");
        assert_eq!(p.disks[0].label.as_deref(), Some("Hard disk 1"), "labels come from the row");
        assert_eq!(p.disks[1].status, "Streaming", "a disk the live view lacks comes from its row");
        assert!(p.nbd.exports[0].connected);
        assert_eq!(p.nbd.exports[0].started_at.as_deref(), Some("2025-09-04T12:00:02Z"));
        assert_eq!(p.nbd.exports[1].name, "job-123-disk-9");
        assert_eq!((p.max_rate, p.limited), (Some(4 << 20), true), "the limit in force comes from the live view");
        let alone = live_progress(&live, at(13, 0, 0));
        assert_eq!((alone.status.as_str(), alone.disks.len(), alone.nbd.exports.len()), ("Finalizing", 1, 0));
        assert_eq!((alone.max_rate, alone.limited), (Some(4 << 20), true));
    }

    #[test]
    fn job_details_show_rows_in_api_words() {
        let mut j = job();
        j.status = JobStatus::Pending.into();
        j.current_operation = None;
        let d = job_detail(&j, &[disk("disk-0", "nbd://h/x")], &[]);
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["status"], "Queued");
        assert_eq!(v["stage"], serde_json::Value::Null);
        assert_eq!(v["disks"][0]["status"], "Streaming");
        assert_eq!(v["disks"][0]["has_changed_areas"], true);
        assert_eq!(v["created_at"], "2025-09-04T11:59:00Z");
    }

    #[test]
    fn words_the_daemon_does_not_know_are_shown_as_they_are() {
        let mut j = job();
        j.status = crate::db::Word::Unknown("initializing".into());
        j.replication_type = crate::db::Word::Unknown("differential".into());
        let mut d = disk("disk-0", "nbd://h/x");
        d.sync_status = crate::db::Word::Unknown("syncing".into());
        let v = serde_json::to_value(job_detail(&j, std::slice::from_ref(&d), &[])).unwrap();
        assert_eq!(
            (v["status"].as_str(), v["replication_type"].as_str()),
            (Some("initializing"), Some("differential"))
        );
        assert_eq!(v["disks"][0]["status"], "syncing");
        let p = progress(&j, &[d], &[], None, at(12, 0, 0));
        assert_eq!((p.status.as_str(), p.disks[0].status.as_str()), ("initializing", "syncing"));
    }
}
