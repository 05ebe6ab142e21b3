-- blockrepl database schema (MySQL 8 / MariaDB >= 10.6). All times are UTC DATETIME(6).
-- The daemon reads this file (compiled in) and brings its database to it at start-up,
-- adding only what is missing (src/db/adopt.rs): keep one column or key a line.
-- The diesel migrations in migrations/ are the same changes as idempotent steps;
-- a test keeps this file and the migrations equal.

CREATE TABLE replication_jobs (
    id                     VARCHAR(64)  NOT NULL,
    vm_name                VARCHAR(255) NOT NULL,
    vm_path                VARCHAR(1024) NULL,
    -- A VMware job: the [vmware.NAME] section naming the vCenter, the VM (inventory
    -- path or instance UUID), and the snapshot the daemon made (removed at the end).
    vmware_vcenter         VARCHAR(64)  NULL,
    vmware_vm              VARCHAR(1024) NULL,
    vmware_snapshot        VARCHAR(64)  NULL,
    replication_type       VARCHAR(16)  NOT NULL DEFAULT 'full',
    -- The orchestrator's explicit consent to run an incremental disk whose
    -- previous_change_id is not the change_id of the last successful sync recorded
    -- in cbt_history for the same vm_name and disk_id (in an earlier job). Without
    -- it such a disk fails before anything is written to its target.
    skip_change_check      BOOLEAN      NOT NULL DEFAULT FALSE,
    -- The job's bandwidth limit in bytes read per second (NULL or 0: none), shared
    -- fairly by its disks, under the appliance's copy.max_rate. Set by the
    -- orchestrator or `blockrepl limit`; a running job follows a change.
    max_rate               BIGINT       NULL,
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
    -- The run (claim) that holds or last held the lease: every write of job state
    -- names owner_node and owner_run in its WHERE.
    owner_run              VARCHAR(64)  NULL,
    -- 1 for a new job. A claim adds one when the job was run before and is
    -- pending again (the orchestrator queued it again after it failed or was
    -- cancelled); a run resumed after a crash or a stop is the same attempt.
    attempt                INT          NOT NULL DEFAULT 1,
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

CREATE TABLE vm_disks (
    id                    BIGINT       NOT NULL AUTO_INCREMENT,
    job_id                VARCHAR(64)  NOT NULL,
    disk_id               VARCHAR(64)  NOT NULL,
    label                 VARCHAR(255) NULL,
    -- The virtual disk's device key in a VMware job (its source is the daemon's).
    vmware_disk_key       INT          NULL,
    source_uri            TEXT         NOT NULL,
    target_uri            TEXT         NOT NULL,
    destination_is_zero   BOOLEAN      NOT NULL DEFAULT FALSE,
    -- Thick-provisioned target: zero requests keep blocks allocated (NO_HOLE).
    keep_allocated        BOOLEAN      NOT NULL DEFAULT FALSE,
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

-- One row per disk per attempt that ended (replication_jobs.attempt): completed
-- (sync_success = 1, written only after the target's final flush), failed or
-- cancelled (sync_success = 0, with the bytes transferred so far). A run resumed
-- after a crash or a stop is the same attempt and adds no row; an attempt stopped
-- by a shutdown or a lost lease has not ended and has no row yet. A disk that had
-- completed in an earlier attempt is not copied again and gets no row.
-- blocks_changed: the number of ranges the copy reads after merging adjacent
-- ones (changed ranges for an incremental copy, allocated data ranges for a full
-- one), as planned; 0 when the disk ended before it was planned.
-- sync_duration_seconds: how long the disk's copy ran in the run that ended it.
CREATE TABLE cbt_history (
    id                    BIGINT       NOT NULL AUTO_INCREMENT,
    job_id                VARCHAR(64)  NOT NULL,
    disk_id               VARCHAR(64)  NOT NULL,
    attempt               INT          NOT NULL DEFAULT 1,
    change_id             VARCHAR(255) NULL,
    previous_change_id    VARCHAR(255) NULL,
    sync_type             VARCHAR(16)  NOT NULL,
    blocks_changed        BIGINT       NOT NULL DEFAULT 0,
    bytes_transferred     BIGINT       NOT NULL DEFAULT 0,
    sync_duration_seconds DOUBLE       NOT NULL DEFAULT 0,
    sync_success          BOOLEAN      NOT NULL DEFAULT FALSE,
    created_at            DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    UNIQUE KEY uq_cbt_job_disk_attempt (job_id, disk_id, attempt),
    KEY idx_cbt_disk_success (disk_id, sync_success, created_at),
    CONSTRAINT fk_cbt_job FOREIGN KEY (job_id) REFERENCES replication_jobs (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE job_events (
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
