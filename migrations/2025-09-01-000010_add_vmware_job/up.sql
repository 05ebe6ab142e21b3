-- Mirrors schema.sql. One statement per migration: MariaDB commits DDL implicitly.
-- A VMware job: the [vmware.NAME] section of the configuration, the VM (inventory
-- path or instance UUID), and the snapshot the daemon made for it (to remove).
ALTER TABLE replication_jobs
    ADD COLUMN IF NOT EXISTS vmware_vcenter VARCHAR(64) NULL AFTER vm_path,
    ADD COLUMN IF NOT EXISTS vmware_vm VARCHAR(1024) NULL AFTER vmware_vcenter,
    ADD COLUMN IF NOT EXISTS vmware_snapshot VARCHAR(64) NULL AFTER vmware_vm;
