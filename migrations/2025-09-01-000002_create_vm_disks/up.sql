-- Mirrors schema.sql. One statement per migration: MariaDB commits DDL implicitly.
-- Idempotent (IF NOT EXISTS), so it can run on a database made from schema.sql.
CREATE TABLE IF NOT EXISTS vm_disks (
    id                    BIGINT       NOT NULL AUTO_INCREMENT,
    job_id                VARCHAR(64)  NOT NULL,
    disk_id               VARCHAR(64)  NOT NULL,
    label                 VARCHAR(255) NULL,
    source_uri            TEXT         NOT NULL,
    target_uri            TEXT         NOT NULL,
    destination_is_zero   BOOLEAN      NOT NULL DEFAULT FALSE,
    capacity_bytes        BIGINT       NOT NULL DEFAULT 0,
    planned_bytes         BIGINT       NOT NULL DEFAULT 0,
    bytes_synced          BIGINT       NOT NULL DEFAULT 0,
    skipped_bytes         BIGINT       NOT NULL DEFAULT 0,
    sync_status           VARCHAR(32)  NOT NULL DEFAULT 'pending',
    sync_progress_percent DECIMAL(5,2) NOT NULL DEFAULT 0.00,
    throughput_bps        BIGINT       NOT NULL DEFAULT 0,
    dirty_bitmap          VARCHAR(255) NULL,
    changed_areas         LONGTEXT     NULL,
    previous_change_id    VARCHAR(255) NULL,
    change_id             VARCHAR(255) NULL,
    disk_change_id        VARCHAR(255) NULL,
    resume_offset         BIGINT       NOT NULL DEFAULT 0,
    error_message         TEXT         NULL,
    updated_at            DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    UNIQUE KEY uq_disks_job_disk (job_id, disk_id),
    CONSTRAINT fk_disks_job FOREIGN KEY (job_id) REFERENCES replication_jobs (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
