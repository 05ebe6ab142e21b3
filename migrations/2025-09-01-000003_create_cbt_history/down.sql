DROP TABLE cbt_history;
