-- Mirrors schema.sql. One statement per migration: MariaDB commits DDL implicitly.
-- The job's bandwidth limit in bytes read per second (NULL or 0: none), set by
-- the orchestrator or `blockrepl limit`; a running job follows a change.
ALTER TABLE replication_jobs ADD COLUMN IF NOT EXISTS max_rate BIGINT NULL AFTER skip_change_check;
