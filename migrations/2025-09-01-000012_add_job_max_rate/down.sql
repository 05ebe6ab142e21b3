ALTER TABLE replication_jobs DROP COLUMN IF EXISTS max_rate;
