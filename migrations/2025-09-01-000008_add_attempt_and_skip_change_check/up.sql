-- Mirrors schema.sql. One statement per migration: MariaDB commits DDL implicitly.
-- Idempotent (IF NOT EXISTS): a database that has the columns already is left as it is.
-- skip_change_check: the orchestrator's explicit consent to run an incremental
-- copy whose previous_change_id does not continue the recorded chain.
-- attempt: 1 for a new job; the claim adds one when a job a daemon ran before is
-- queued again (status set back to pending).
ALTER TABLE replication_jobs
    ADD COLUMN IF NOT EXISTS skip_change_check BOOLEAN NOT NULL DEFAULT FALSE AFTER replication_type,
    ADD COLUMN IF NOT EXISTS attempt INT NOT NULL DEFAULT 1 AFTER owner_run;
