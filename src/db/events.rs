//! The job log (`job_events`): stage changes, progress milestones, retries and
//! errors, written as the job's owner and read back newest first. Choosing which
//! events to write, and how often, is the caller's business.

use diesel::mysql::MysqlConnection;
use diesel::prelude::*;

use super::DbError;
use super::models::{JobEvent, NewJobEvent, Owner};
use super::schema::job_events as e;

/// Inserts `events` of jobs `owner` holds (see `batch::insert_owned_events`): an
/// event of a job `owner` no longer holds is not written; returns how many were.
pub fn insert_events(conn: &mut MysqlConnection, owner: &Owner, events: &[NewJobEvent]) -> Result<usize, DbError> {
    let events: Vec<(&Owner, &NewJobEvent)> = events.iter().map(|e| (owner, e)).collect();
    super::batch::insert_owned_events(conn, &events)
}

/// Up to `limit` events of a job, newest first.
pub fn recent_events(conn: &mut MysqlConnection, job: &str, limit: i64) -> Result<Vec<JobEvent>, DbError> {
    e::table
        .filter(e::job_id.eq(job))
        .order((e::created_at.desc(), e::id.desc()))
        .limit(limit)
        .select(JobEvent::as_select())
        .load(conn)
        .map_err(DbError::query(format!("loading the events of job '{job}'")))
}

#[cfg(test)]
mod tests {
    use chrono::{SubsecRound, TimeDelta, Utc};

    use super::super::testing::fresh;
    use super::*;

    fn event(message: &str) -> NewJobEvent {
        NewJobEvent {
            job_id: "job-1".into(),
            disk_id: None,
            correlation_id: "run-1".into(),
            level: "info".into(),
            stage: "Transfer".into(),
            message: message.into(),
            created_at: None,
        }
    }

    #[test]
    fn events_are_written_only_as_the_owner_and_read_newest_first() {
        let (db, mut conn) = fresh("events");
        db.execute(
            "INSERT INTO replication_jobs (id, vm_name, owner_node, owner_run) VALUES ('job-1', 'vm1', 'n', 'run-1')",
        );
        let owner = Owner { node: "n".into(), run: "run-1".into() };
        assert_eq!(insert_events(&mut conn, &owner, &[]).unwrap(), 0);

        let an_hour_ago = Utc::now().naive_utc() - TimeDelta::hours(1);
        let batch = [
            NewJobEvent { created_at: Some(an_hour_ago), ..event("started") },
            NewJobEvent { disk_id: Some("disk-2000".into()), level: "warn".into(), ..event("retrying at offset 0") },
            event("10% done"),
        ];
        assert_eq!(insert_events(&mut conn, &owner, &batch).unwrap(), 3);

        let events = recent_events(&mut conn, "job-1", 10).unwrap();
        let messages: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages, ["10% done", "retrying at offset 0", "started"]);
        assert_eq!(events[2].created_at, an_hour_ago.trunc_subsecs(6));
        // The others took the server's time, in UTC.
        assert!((events[0].created_at - Utc::now().naive_utc()).abs() < TimeDelta::minutes(1));
        assert_eq!((events[1].disk_id.as_deref(), events[1].level.as_str()), (Some("disk-2000"), "warn"));
        assert_eq!(recent_events(&mut conn, "job-1", 1).unwrap().len(), 1);
        assert!(recent_events(&mut conn, "job-2", 10).unwrap().is_empty());

        // Another run of the same node, another node, a job that does not exist:
        // nothing is written.
        for (node, run, job) in [("n", "run-0", "job-1"), ("m", "run-1", "job-1"), ("n", "run-1", "ghost")] {
            let who = Owner { node: node.into(), run: run.into() };
            let ev = NewJobEvent { job_id: job.into(), ..event("stale") };
            assert_eq!(insert_events(&mut conn, &who, &[ev]).unwrap(), 0, "{node} {run} {job}");
        }
        assert_eq!(recent_events(&mut conn, "job-1", 10).unwrap().len(), 3);
    }
}
