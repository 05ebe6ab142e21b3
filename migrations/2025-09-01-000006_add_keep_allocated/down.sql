ALTER TABLE vm_disks DROP COLUMN keep_allocated;
