-- Mirrors schema.sql. One statement per migration: MariaDB commits DDL implicitly.
-- Idempotent (IF [NOT] EXISTS). cbt_history holds one row per disk per attempt
-- that ended (completed, failed or cancelled), so the unique key takes the
-- attempt; the second key serves the change-ID chain's look-up (the last
-- successful sync of a disk).
ALTER TABLE cbt_history
    ADD COLUMN IF NOT EXISTS attempt INT NOT NULL DEFAULT 1 AFTER disk_id,
    DROP INDEX IF EXISTS uq_cbt_job_disk,
    ADD UNIQUE KEY IF NOT EXISTS uq_cbt_job_disk_attempt (job_id, disk_id, attempt),
    ADD KEY IF NOT EXISTS idx_cbt_disk_success (disk_id, sync_success, created_at);
