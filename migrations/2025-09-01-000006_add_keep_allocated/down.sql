ALTER TABLE vm_disks DROP COLUMN IF EXISTS keep_allocated;
