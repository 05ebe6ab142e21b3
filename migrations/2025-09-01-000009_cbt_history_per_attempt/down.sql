ALTER TABLE cbt_history
    DROP INDEX IF EXISTS idx_cbt_disk_success,
    DROP INDEX IF EXISTS uq_cbt_job_disk_attempt,
    ADD UNIQUE KEY uq_cbt_job_disk (job_id, disk_id),
    DROP COLUMN IF EXISTS attempt;
