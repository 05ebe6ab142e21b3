ALTER TABLE vm_disks DROP COLUMN IF EXISTS vmware_disk_key;
