DROP TABLE job_events;
