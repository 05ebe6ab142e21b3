//! `/metrics`: the Prometheus text exposition format (version 0.0.4), rendered
//! from figures the server gathered (live views of the running jobs, job counts,
//! the DbWriter's counters). Pure: gathering is the server's business.
//!
//! Per-job and per-disk series exist only while this node runs the job, so their
//! label sets stay bounded by the jobs running at once; finished jobs are counted
//! by status instead. When the database does not answer, the counts are left out
//! and `blockrepl_database_up` is 0.

use std::fmt::Write as _;

use crate::actors::messages::{DbStats, LiveJob};

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

/// A metric family being written.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {}", number(value));
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// A label value with `\`, `"` and newlines escaped as the format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{v}")
    }
}

pub fn render(f: &Figures) -> String {
    let mut o = Out(String::new());
    o.family("blockrepl_build_info", "gauge", "Version of the running daemon (always 1).");
    o.sample("blockrepl_build_info", &[("version", &f.version), ("node", &f.node)], 1.0);
    o.one("blockrepl_uptime_seconds", "gauge", "Seconds since the daemon started.", f.uptime_seconds);
    o.one(
        "blockrepl_database_up",
        "gauge",
        "Whether the database answered (1) or not (0).",
        if f.job_counts.is_some() && f.db.available { 1.0 } else { 0.0 },
    );
    if let Some(counts) = &f.job_counts {
        o.family("blockrepl_jobs", "gauge", "Jobs in the database by status (all appliances).");
        for (status, n) in counts {
            o.sample("blockrepl_jobs", &[("status", status)], *n as f64);
        }
    }
    o.one("blockrepl_active_jobs", "gauge", "Jobs this node is running.", f.live.len() as f64);
    o.one("blockrepl_copy_slots_in_use", "gauge", "Disk copy slots in use.", f.slots_in_use as f64);
    o.one("blockrepl_copy_slots", "gauge", "Disk copy slots (copy.max_concurrent_disks).", f.slots_capacity as f64);

    o.family("blockrepl_db_writes_total", "counter", "Rows written by the database writer, by kind.");
    for (kind, n) in [("job", f.db.job_updates), ("disk", f.db.disk_updates), ("record", f.db.records)] {
        o.sample("blockrepl_db_writes_total", &[("kind", kind)], n as f64);
    }
    o.one(
        "blockrepl_db_write_failures_total",
        "counter",
        "Database writes that failed or were dropped.",
        f.db.failures as f64,
    );
    o.one("blockrepl_db_pending_writes", "gauge", "Writes waiting for the database.", f.db.pending as f64);

    let jobs: Vec<(&LiveJob, [(&str, &str); 1])> =
        f.live.iter().map(|j| (j, [("job_id", j.job_id.as_str())])).collect();
    let job_family = |o: &mut Out, name: &str, kind: &str, help: &str, value: &dyn Fn(&LiveJob) -> f64| {
        o.family(name, kind, help);
        for (j, labels) in &jobs {
            o.sample(name, labels, value(j));
        }
    };
    job_family(&mut o, "blockrepl_job_planned_bytes", "gauge", "Bytes a running job must copy.", &|j| {
        j.total_bytes as f64
    });
    job_family(&mut o, "blockrepl_job_transferred_bytes", "gauge", "Bytes a running job has copied.", &|j| {
        j.bytes_transferred as f64
    });
    job_family(
        &mut o,
        "blockrepl_job_throughput_bytes_per_second",
        "gauge",
        "Current copy rate of a running job.",
        &|j| j.throughput_bps as f64,
    );
    job_family(
        &mut o,
        "blockrepl_job_retries_total",
        "counter",
        "Transient failures retried by a running job.",
        &|j| j.retries as f64,
    );

    let disk_family =
        |o: &mut Out, name: &str, kind: &str, help: &str, value: &dyn Fn(&crate::actors::messages::LiveDisk) -> f64| {
            o.family(name, kind, help);
            for j in &f.live {
                for d in &j.disks {
                    o.sample(name, &[("job_id", &j.job_id), ("disk_id", &d.disk_id)], value(d));
                }
            }
        };
    disk_family(&mut o, "blockrepl_disk_planned_bytes", "gauge", "Bytes a disk of a running job must copy.", &|d| {
        d.planned_bytes as f64
    });
    disk_family(
        &mut o,
        "blockrepl_disk_transferred_bytes",
        "gauge",
        "Bytes a disk of a running job has copied.",
        &|d| d.bytes_transferred as f64,
    );
    disk_family(
        &mut o,
        "blockrepl_disk_throughput_bytes_per_second",
        "gauge",
        "Current copy rate of a disk of a running job.",
        &|d| d.throughput_bps as f64,
    );
    disk_family(
        &mut o,
        "blockrepl_disk_retries_total",
        "counter",
        "Transient failures retried on a disk of a running job.",
        &|d| d.retries as f64,
    );
    o.0
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
            "blockrepl_disk_planned_bytes{job_id=\"job-1\",disk_id=\"disk-2000\"} 1073741824",
            "blockrepl_uptime_seconds 12.5",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        // Every family is declared once, before its samples.
        let mut declared = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                assert!(declared.insert(rest.split(' ').next().unwrap().to_string()), "{l}");
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(declared.contains(name), "{name} sampled before its TYPE");
            }
        }
    }

    #[test]
    fn without_the_database_counts_are_left_out() {
        let text = render(&figures(Vec::new(), false));
        assert!(text.contains("blockrepl_database_up 0\n"));
        assert!(!text.contains("blockrepl_jobs{"));
        assert!(text.contains("blockrepl_active_jobs 0\n"));
    }

    #[test]
    fn numbers_and_labels_follow_the_format() {
        assert_eq!(number(1.0), "1");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(escape("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }
}
