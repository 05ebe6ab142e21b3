ALTER TABLE replication_jobs DROP COLUMN IF EXISTS vmware_vcenter, DROP COLUMN IF EXISTS vmware_vm, DROP COLUMN IF EXISTS vmware_snapshot;
