ALTER TABLE replication_jobs DROP COLUMN owner_run;
