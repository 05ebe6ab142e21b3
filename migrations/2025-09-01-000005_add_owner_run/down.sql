ALTER TABLE replication_jobs DROP COLUMN IF EXISTS owner_run;
