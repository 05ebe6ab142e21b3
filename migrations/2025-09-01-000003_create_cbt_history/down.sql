DROP TABLE IF EXISTS cbt_history;
