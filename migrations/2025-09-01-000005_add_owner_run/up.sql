-- Mirrors schema.sql. One statement per migration: MariaDB commits DDL implicitly.
-- The run (claim) that holds or last held a job's lease: every write the daemon
-- makes to a job's rows names the owner and this run in its WHERE.
ALTER TABLE replication_jobs ADD COLUMN IF NOT EXISTS owner_run VARCHAR(64) NULL AFTER lease_expires_at;
