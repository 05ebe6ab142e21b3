DROP TABLE replication_jobs;
