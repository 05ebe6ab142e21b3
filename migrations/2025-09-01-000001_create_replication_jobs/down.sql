DROP TABLE IF EXISTS replication_jobs;
