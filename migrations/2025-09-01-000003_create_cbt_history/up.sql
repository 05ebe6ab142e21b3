-- Mirrors schema.sql. One statement per migration: MariaDB commits DDL implicitly.
-- Idempotent (IF NOT EXISTS), so it can run on a database made from schema.sql.
CREATE TABLE IF NOT EXISTS cbt_history (
    id                    BIGINT       NOT NULL AUTO_INCREMENT,
    job_id                VARCHAR(64)  NOT NULL,
    disk_id               VARCHAR(64)  NOT NULL,
    change_id             VARCHAR(255) NULL,
    previous_change_id    VARCHAR(255) NULL,
    sync_type             VARCHAR(16)  NOT NULL,
    blocks_changed        BIGINT       NOT NULL DEFAULT 0,
    bytes_transferred     BIGINT       NOT NULL DEFAULT 0,
    sync_duration_seconds DOUBLE       NOT NULL DEFAULT 0,
    sync_success          BOOLEAN      NOT NULL DEFAULT FALSE,
    created_at            DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    UNIQUE KEY uq_cbt_job_disk (job_id, disk_id),
    CONSTRAINT fk_cbt_job FOREIGN KEY (job_id) REFERENCES replication_jobs (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
