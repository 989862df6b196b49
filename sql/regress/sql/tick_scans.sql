-- what this shows: a tick reads the log only through its primary key, and only the
-- entries of transactions new since the previous tick: no sequential scan of the
-- log, and what a tick reads does not grow with the log. Counted by the statistics
-- of the log and its primary key over fifty ticks, one per transaction, on a log
-- that already holds fifty transactions: each tick reads its own transaction's
-- entry and the previous ticking transaction's (which that tick sequenced, so it is
-- skipped), about a hundred entries in all; a tick reading the log from its start
-- would read over 3,000.
CREATE DATABASE livesync_regress_tick_scans;
\c livesync_regress_tick_scans
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
CREATE VIEW log_reads AS
SELECT t.seq_scan, i.idx_scan, i.idx_tup_read
FROM pg_stat_user_tables t, pg_stat_user_indexes i
WHERE t.relid = 'livesync.changes'::regclass AND i.indexrelid = 'livesync.changes_pkey'::regclass;
CALL write_probes(1, 50);
SELECT pg_stat_force_next_flush();
SELECT seq_scan AS seq_scans_before, idx_scan AS index_scans_before,
       idx_tup_read AS entries_read_before
FROM log_reads \gset
CALL write_probes(51, 50);
SELECT pg_stat_force_next_flush();
SELECT seq_scan - :seq_scans_before AS log_seq_scans,
       idx_scan - :index_scans_before >= 50 AS every_tick_used_the_index,
       idx_tup_read - :entries_read_before BETWEEN 50 AND 150 AS ticks_read_only_new_entries
FROM log_reads;
SELECT count(*) AS sequenced FROM livesync.changes_since(0);
\c livesync_regress
DROP DATABASE livesync_regress_tick_scans WITH (FORCE);
