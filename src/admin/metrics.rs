//! `/metrics`: the figures the server gathered (live views of the running jobs,
//! job counts, the DbWriter's counters), registered with `prometheus-client` and
//! encoded in its OpenMetrics text format. Pure: gathering is the server's
//! business.
//!
//! Per-job and per-disk series exist only while this node runs the job, so their
//! label sets stay bounded by the jobs running at once; finished jobs are counted
//! by status instead. When the database does not answer, the counts are left out
//! and `blockrepl_database_up` is 0. A fresh registry is filled for every scrape:
//! nothing here outlives a request.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeMetric;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::actors::messages::{DbStats, LiveDisk, LiveJob};

/// The content type of what [`render`] returns.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What `/metrics` shows.
#[derive(Debug, Clone)]
pub struct Figures {
    pub version: String,
    pub node: String,
    pub uptime_seconds: f64,
    /// Jobs per status (the database's words, unknown ones as they are), when
    /// the database answered.
    pub job_counts: Option<Vec<(String, i64)>>,
    pub db: DbStats,
    /// The jobs this node runs.
    pub live: Vec<LiveJob>,
    pub slots_in_use: usize,
    pub slots_capacity: usize,
}

type Labels = Vec<(&'static str, String)>;

/// A gauge of a count or a number of bytes.
fn gauge(value: u64) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    g
}

fn counter(value: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(value);
    c
}

/// A family of gauges or counters, one series per label set.
fn family<M: EncodeMetric + TypedMetric + Clone + Default + std::fmt::Debug + Send + Sync + 'static>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, M)>,
    set: impl Fn(&M, M),
) {
    let fam = Family::<Labels, M>::default();
    for (labels, value) in series {
        set(&fam.get_or_create(&labels), value);
    }
    registry.register(name, help, fam);
}

fn set_gauge(g: &Gauge, v: Gauge) {
    g.set(v.get());
}

fn set_counter(c: &Counter, v: Counter) {
    c.inc_by(v.get());
}

/// Counters are registered without their `_total`, which the encoder adds.
pub fn render(f: &Figures) -> String {
    let mut r = Registry::default();
    r.register(
        "blockrepl_build",
        "Version of the running daemon",
        Info::new(vec![("version", f.version.clone()), ("node", f.node.clone())]),
    );
    let uptime = Gauge::<f64, AtomicU64>::default();
    uptime.set(f.uptime_seconds);
    r.register("blockrepl_uptime_seconds", "Seconds since the daemon started", uptime);
    let up = f.job_counts.is_some() && f.db.available;
    r.register("blockrepl_database_up", "Whether the database answered (1) or not (0)", gauge(u64::from(up)));
    if let Some(counts) = &f.job_counts {
        let series = counts.iter().map(|(s, n)| (vec![("status", s.clone())], gauge(n.max(&0).unsigned_abs())));
        family(&mut r, "blockrepl_jobs", "Jobs in the database by status (all appliances)", series, set_gauge);
    }
    r.register("blockrepl_active_jobs", "Jobs this node is running", gauge(f.live.len() as u64));
    r.register("blockrepl_copy_slots_in_use", "Disk copy slots in use", gauge(f.slots_in_use as u64));
    r.register("blockrepl_copy_slots", "Disk copy slots (copy.max_concurrent_disks)", gauge(f.slots_capacity as u64));

    let writes = [("job", f.db.job_updates), ("disk", f.db.disk_updates), ("record", f.db.records)];
    let series = writes.map(|(kind, n)| (vec![("kind", kind.to_string())], counter(n)));
    family(&mut r, "blockrepl_db_writes", "Rows written by the database writer, by kind", series, set_counter);
    r.register("blockrepl_db_write_failures", "Database writes that failed or were dropped", counter(f.db.failures));
    r.register("blockrepl_db_pending_writes", "Writes waiting for the database", gauge(f.db.pending));

    let jobs = |value: fn(&LiveJob) -> u64| {
        f.live.iter().map(move |j| (vec![("job_id", j.job_id.clone())], value(j))).collect::<Vec<_>>()
    };
    let job_gauge = |r: &mut Registry, name: &str, help: &str, value: fn(&LiveJob) -> u64| {
        let series = jobs(value).into_iter().map(|(l, v)| (l, gauge(v)));
        family(r, name, help, series, set_gauge);
    };
    job_gauge(&mut r, "blockrepl_job_planned_bytes", "Bytes a running job must copy", |j| j.total_bytes);
    job_gauge(&mut r, "blockrepl_job_transferred_bytes", "Bytes a running job has copied", |j| j.bytes_transferred);
    job_gauge(&mut r, "blockrepl_job_throughput_bytes_per_second", "Current copy rate of a running job", |j| {
        j.throughput_bps
    });
    job_gauge(
        &mut r,
        "blockrepl_job_max_rate_bytes_per_second",
        "Bandwidth limit in force for a running job (0: none)",
        |j| j.max_rate.unwrap_or(0),
    );
    job_gauge(&mut r, "blockrepl_job_limited", "1 while the bandwidth limit holds a running job back", |j| {
        u64::from(j.limited)
    });
    let series = jobs(|j| j.retries).into_iter().map(|(l, v)| (l, counter(v)));
    family(&mut r, "blockrepl_job_retries", "Transient failures retried by a running job", series, set_counter);

    let disks = |value: fn(&LiveDisk) -> u64| {
        f.live
            .iter()
            .flat_map(|j| j.disks.iter().map(move |d| (j, d)))
            .map(move |(j, d)| (vec![("job_id", j.job_id.clone()), ("disk_id", d.disk_id.clone())], value(d)))
            .collect::<Vec<_>>()
    };
    let disk_gauge = |r: &mut Registry, name: &str, help: &str, value: fn(&LiveDisk) -> u64| {
        let series = disks(value).into_iter().map(|(l, v)| (l, gauge(v)));
        family(r, name, help, series, set_gauge);
    };
    disk_gauge(&mut r, "blockrepl_disk_planned_bytes", "Bytes a disk of a running job must copy", |d| d.planned_bytes);
    disk_gauge(&mut r, "blockrepl_disk_transferred_bytes", "Bytes a disk of a running job has copied", |d| {
        d.bytes_transferred
    });
    disk_gauge(
        &mut r,
        "blockrepl_disk_throughput_bytes_per_second",
        "Current copy rate of a disk of a running job",
        |d| d.throughput_bps,
    );
    let series = disks(|d| d.retries).into_iter().map(|(l, v)| (l, counter(v)));
    family(
        &mut r,
        "blockrepl_disk_retries",
        "Transient failures retried on a disk of a running job",
        series,
        set_counter,
    );

    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, &r);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::messages::LiveDisk;
    use crate::state::{DiskStatus, JobStatus, ReplicationType};

    fn figures(live: Vec<LiveJob>, counts: bool) -> Figures {
        Figures {
            version: "0.1.0".into(),
            node: "node \"a\"".into(),
            uptime_seconds: 12.5,
            job_counts: counts.then(|| {
                JobStatus::ALL.iter().map(|s| (s.as_db().to_string(), 2)).chain([("PENDING".into(), 1)]).collect()
            }),
            db: DbStats { job_updates: 3, disk_updates: 4, records: 5, failures: 0, pending: 1, available: true },
            live,
            slots_in_use: 1,
            slots_capacity: 8,
        }
    }

    fn live() -> LiveJob {
        LiveJob {
            job_id: "job-1".into(),
            replication_type: ReplicationType::Full,
            status: JobStatus::Streaming,
            operation: "Transfer".into(),
            started_at: None,
            total_bytes: 1 << 30,
            bytes_transferred: 1 << 29,
            throughput_bps: 123_456_789,
            percent: 50.0,
            eta_seconds: Some(4),
            retries: 3,
            max_rate: Some(4 << 20),
            limited: true,
            disks: vec![LiveDisk {
                disk_id: "disk-2000".into(),
                label: None,
                status: DiskStatus::Streaming,
                planned_bytes: 1 << 30,
                bytes_transferred: 1 << 29,
                throughput_bps: 123_456_789,
                percent: 50.0,
                connected: true,
                connected_at: None,
                retries: 3,
                previous_change_id: None,
                change_id: None,
            }],
        }
    }

    #[test]
    fn running_jobs_and_disks_have_their_series() {
        let text = render(&figures(vec![live()], true));
        for line in [
            "blockrepl_build_info{version=\"0.1.0\",node=\"node \\\"a\\\"\"} 1",
            "blockrepl_database_up 1",
            "blockrepl_jobs{status=\"completed\"} 2",
            "blockrepl_jobs{status=\"PENDING\"} 1",
            "blockrepl_active_jobs 1",
            "blockrepl_db_writes_total{kind=\"disk\"} 4",
            "blockrepl_job_transferred_bytes{job_id=\"job-1\"} 536870912",
            "blockrepl_job_throughput_bytes_per_second{job_id=\"job-1\"} 123456789",
            "blockrepl_job_retries_total{job_id=\"job-1\"} 3",
            "blockrepl_job_max_rate_bytes_per_second{job_id=\"job-1\"} 4194304",
            "blockrepl_job_limited{job_id=\"job-1\"} 1",
            "blockrepl_disk_planned_bytes{job_id=\"job-1\",disk_id=\"disk-2000\"} 1073741824",
            "blockrepl_uptime_seconds 12.5",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        // Every family is declared once, before its samples (OpenMetrics: a
        // counter's samples end in `_total`, an info's in `_info`).
        let mut declared = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                assert!(declared.insert(rest.split(' ').next().unwrap().to_string()), "{l}");
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                let family = ["_total", "_info"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
                assert!(declared.contains(name) || declared.contains(family), "{name} sampled before its TYPE");
            }
        }
        assert_eq!(text.lines().last(), Some("# EOF"));
    }

    #[test]
    fn without_the_database_counts_are_left_out() {
        let text = render(&figures(Vec::new(), false));
        assert!(text.contains("\nblockrepl_database_up 0\n"));
        assert!(!text.contains("blockrepl_jobs{"));
        assert!(text.contains("\nblockrepl_active_jobs 0\n"));
    }
}
