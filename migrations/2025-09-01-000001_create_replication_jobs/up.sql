-- Mirrors schema.sql. One statement per migration: MariaDB commits DDL implicitly.
-- Idempotent (IF NOT EXISTS), so it can run on a database made from schema.sql.
CREATE TABLE IF NOT EXISTS replication_jobs (
    id                     VARCHAR(64)  NOT NULL,
    vm_name                VARCHAR(255) NOT NULL,
    vm_path                VARCHAR(1024) NULL,
    replication_type       VARCHAR(16)  NOT NULL DEFAULT 'full',
    status                 VARCHAR(32)  NOT NULL DEFAULT 'pending',
    current_operation      VARCHAR(32)  NULL,
    progress_percent       DECIMAL(5,2) NOT NULL DEFAULT 0.00,
    setup_progress_percent DECIMAL(5,2) NOT NULL DEFAULT 0.00,
    bytes_transferred      BIGINT       NOT NULL DEFAULT 0,
    total_bytes            BIGINT       NOT NULL DEFAULT 0,
    transfer_speed_bps     BIGINT       NOT NULL DEFAULT 0,
    eta_seconds            BIGINT       NULL,
    nbd_export_name        VARCHAR(255) NULL,
    error_message          TEXT         NULL,
    owner_node             VARCHAR(255) NULL,
    lease_expires_at       DATETIME(6)  NULL,
    last_progress_at       DATETIME(6)  NULL,
    created_at             DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at             DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    started_at             DATETIME(6)  NULL,
    completed_at           DATETIME(6)  NULL,
    PRIMARY KEY (id),
    KEY idx_jobs_status_export (status, nbd_export_name(50)),
    KEY idx_jobs_status_updated (status, updated_at),
    KEY idx_jobs_status_completed (status, completed_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
