//! The job log (`job_events`): stage changes, progress milestones, retries and
//! errors, written in batches and read back newest first. Choosing which events to
//! write, and how often, is the caller's business.

use diesel::mysql::MysqlConnection;
use diesel::prelude::*;

use super::DbError;
use super::models::{JobEvent, NewJobEvent, to_micros};
use super::schema::job_events as e;

/// Inserts `events` with one multi-row INSERT and returns how many it wrote.
pub fn insert_events(conn: &mut MysqlConnection, events: &[NewJobEvent]) -> Result<usize, DbError> {
    if events.is_empty() {
        return Ok(0);
    }
    let rows: Vec<NewJobEvent> =
        events.iter().map(|ev| NewJobEvent { created_at: ev.created_at.map(to_micros), ..ev.clone() }).collect();
    diesel::insert_into(e::table)
        .values(&rows)
        .execute(conn)
        .map_err(DbError::query(format!("inserting {} job events", rows.len())))
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
    fn events_are_written_in_one_batch_and_read_newest_first() {
        let (db, mut conn) = fresh("events");
        db.execute("INSERT INTO replication_jobs (id, vm_name) VALUES ('job-1', 'vm1')");
        assert_eq!(insert_events(&mut conn, &[]).unwrap(), 0);

        let an_hour_ago = Utc::now().naive_utc() - TimeDelta::hours(1);
        let batch = [
            NewJobEvent { created_at: Some(an_hour_ago), ..event("started") },
            NewJobEvent { disk_id: Some("disk-2000".into()), level: "warn".into(), ..event("retrying at offset 0") },
            event("10% done"),
        ];
        assert_eq!(insert_events(&mut conn, &batch).unwrap(), 3);

        let events = recent_events(&mut conn, "job-1", 10).unwrap();
        let messages: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages, ["10% done", "retrying at offset 0", "started"]);
        assert_eq!(events[2].created_at, an_hour_ago.trunc_subsecs(6));
        // The others took the server's time, in UTC.
        assert!((events[0].created_at - Utc::now().naive_utc()).abs() < TimeDelta::minutes(1));
        assert_eq!((events[1].disk_id.as_deref(), events[1].level.as_str()), (Some("disk-2000"), "warn"));
        assert_eq!(recent_events(&mut conn, "job-1", 1).unwrap().len(), 1);
        assert!(recent_events(&mut conn, "job-2", 10).unwrap().is_empty());

        // The foreign key holds: no events for jobs that do not exist.
        let orphan = NewJobEvent { job_id: "ghost".into(), ..event("lost") };
        assert!(insert_events(&mut conn, &[orphan]).is_err());
    }
}
