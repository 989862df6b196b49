-- what this shows: the sequencer's tick finds new transactions through the log's
-- primary key, never by scanning the whole log, however the statistics looked when
-- the session's first tick ran. (When the tick was a kept SQL plan, one made while
-- the statistics said the log was empty, as after a compaction or TRUNCATE and a
-- vacuum, scanned the whole log on every later tick.) The statistics count the
-- log's sequential and index scans.
CREATE DATABASE livesync_regress_tick_plan;
\c livesync_regress_tick_plan
CREATE EXTENSION livesync;
SET livesync.sequencer = commit;
CREATE TABLE probe (id int PRIMARY KEY, n int);
SELECT livesync.track('probe');
CREATE PROCEDURE write_probes(first int, transactions int) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN first..first + transactions - 1 LOOP
        INSERT INTO probe VALUES (i, i);
        COMMIT;
    END LOOP;
END
$$;
-- the first tick plans, with the log empty and vacuumed
VACUUM (ANALYZE) livesync.changes;
CALL write_probes(1, 1);
SELECT pg_stat_force_next_flush();
SELECT seq_scan AS seq_scans_before, idx_scan AS index_scans_before
FROM pg_stat_user_tables WHERE relid = 'livesync.changes'::regclass \gset
-- fifty more ticks, the log growing
CALL write_probes(2, 50);
SELECT pg_stat_force_next_flush();
SELECT seq_scan - :seq_scans_before AS log_seq_scans,
       idx_scan - :index_scans_before >= 50 AS log_index_used_by_every_tick
FROM pg_stat_user_tables WHERE relid = 'livesync.changes'::regclass;
SELECT count(*) AS sequenced FROM livesync.changes_since(0);
\c livesync_regress
DROP DATABASE livesync_regress_tick_plan WITH (FORCE);
