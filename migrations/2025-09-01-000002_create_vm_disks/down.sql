DROP TABLE vm_disks;
