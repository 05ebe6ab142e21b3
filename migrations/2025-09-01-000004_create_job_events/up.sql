-- Mirrors schema.sql. One statement per migration: MariaDB commits DDL implicitly.
-- Idempotent (IF NOT EXISTS), so it can run on a database made from schema.sql.
CREATE TABLE IF NOT EXISTS job_events (
    id             BIGINT       NOT NULL AUTO_INCREMENT,
    job_id         VARCHAR(64)  NOT NULL,
    disk_id        VARCHAR(64)  NULL,
    correlation_id VARCHAR(64)  NOT NULL,
    level          VARCHAR(16)  NOT NULL,
    stage          VARCHAR(32)  NOT NULL,
    message        TEXT         NOT NULL,
    created_at     DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    KEY idx_events_job (job_id, created_at),
    CONSTRAINT fk_events_job FOREIGN KEY (job_id) REFERENCES replication_jobs (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
