ALTER TABLE replication_jobs DROP COLUMN IF EXISTS skip_change_check, DROP COLUMN IF EXISTS attempt;
