// @generated automatically by Diesel CLI.

diesel::table! {
    cbt_history (id) {
        id -> Bigint,
        #[max_length = 64]
        job_id -> Varchar,
        #[max_length = 64]
        disk_id -> Varchar,
        attempt -> Integer,
        #[max_length = 255]
        change_id -> Nullable<Varchar>,
        #[max_length = 255]
        previous_change_id -> Nullable<Varchar>,
        #[max_length = 16]
        sync_type -> Varchar,
        blocks_changed -> Bigint,
        bytes_transferred -> Bigint,
        sync_duration_seconds -> Double,
        sync_success -> Bool,
        created_at -> Datetime,
    }
}

diesel::table! {
    job_events (id) {
        id -> Bigint,
        #[max_length = 64]
        job_id -> Varchar,
        #[max_length = 64]
        disk_id -> Nullable<Varchar>,
        #[max_length = 64]
        correlation_id -> Varchar,
        #[max_length = 16]
        level -> Varchar,
        #[max_length = 32]
        stage -> Varchar,
        message -> Text,
        created_at -> Datetime,
    }
}

diesel::table! {
    replication_jobs (id) {
        #[max_length = 64]
        id -> Varchar,
        #[max_length = 255]
        vm_name -> Varchar,
        #[max_length = 1024]
        vm_path -> Nullable<Varchar>,
        #[max_length = 64]
        vmware_vcenter -> Nullable<Varchar>,
        #[max_length = 1024]
        vmware_vm -> Nullable<Varchar>,
        #[max_length = 64]
        vmware_snapshot -> Nullable<Varchar>,
        #[max_length = 16]
        replication_type -> Varchar,
        skip_change_check -> Bool,
        max_rate -> Nullable<Bigint>,
        #[max_length = 32]
        status -> Varchar,
        #[max_length = 32]
        current_operation -> Nullable<Varchar>,
        progress_percent -> Decimal,
        setup_progress_percent -> Decimal,
        bytes_transferred -> Bigint,
        total_bytes -> Bigint,
        transfer_speed_bps -> Bigint,
        eta_seconds -> Nullable<Bigint>,
        #[max_length = 255]
        nbd_export_name -> Nullable<Varchar>,
        error_message -> Nullable<Text>,
        #[max_length = 255]
        owner_node -> Nullable<Varchar>,
        lease_expires_at -> Nullable<Datetime>,
        #[max_length = 64]
        owner_run -> Nullable<Varchar>,
        attempt -> Integer,
        last_progress_at -> Nullable<Datetime>,
        created_at -> Datetime,
        updated_at -> Datetime,
        started_at -> Nullable<Datetime>,
        completed_at -> Nullable<Datetime>,
    }
}

diesel::table! {
    vm_disks (id) {
        id -> Bigint,
        #[max_length = 64]
        job_id -> Varchar,
        #[max_length = 64]
        disk_id -> Varchar,
        #[max_length = 255]
        label -> Nullable<Varchar>,
        vmware_disk_key -> Nullable<Integer>,
        source_uri -> Text,
        target_uri -> Text,
        destination_is_zero -> Bool,
        keep_allocated -> Bool,
        capacity_bytes -> Bigint,
        planned_bytes -> Bigint,
        bytes_synced -> Bigint,
        skipped_bytes -> Bigint,
        #[max_length = 32]
        sync_status -> Varchar,
        sync_progress_percent -> Decimal,
        throughput_bps -> Bigint,
        #[max_length = 255]
        dirty_bitmap -> Nullable<Varchar>,
        changed_areas -> Nullable<Longtext>,
        #[max_length = 255]
        previous_change_id -> Nullable<Varchar>,
        #[max_length = 255]
        change_id -> Nullable<Varchar>,
        #[max_length = 255]
        disk_change_id -> Nullable<Varchar>,
        resume_offset -> Bigint,
        error_message -> Nullable<Text>,
        updated_at -> Datetime,
    }
}

diesel::joinable!(cbt_history -> replication_jobs (job_id));
diesel::joinable!(job_events -> replication_jobs (job_id));
diesel::joinable!(vm_disks -> replication_jobs (job_id));

diesel::allow_tables_to_appear_in_same_query!(cbt_history, job_events, replication_jobs, vm_disks,);
