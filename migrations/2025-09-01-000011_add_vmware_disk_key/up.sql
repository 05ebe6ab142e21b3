-- Mirrors schema.sql. One statement per migration: MariaDB commits DDL implicitly.
-- The virtual disk's device key (2000, 2001, ...) in a VMware job.
ALTER TABLE vm_disks ADD COLUMN IF NOT EXISTS vmware_disk_key INT NULL AFTER label;
