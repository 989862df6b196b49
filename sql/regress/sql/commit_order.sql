-- what this shows: every committed transaction carries its commit sequence (the WAL
-- position just before it committed) on its last log row, which is what ticks order
-- transactions by; a savepoint rolled back over the last row leaves a commit marker
-- instead, which takes no position and never reaches readers.
CREATE TABLE co (id int PRIMARY KEY, v int);
SELECT livesync.track('co');
SELECT livesync.current_position() AS start \gset

-- Three commits one after another: their sequences grow in commit order.
INSERT INTO co VALUES (1, 1);
INSERT INTO co VALUES (2, 1);
UPDATE co SET v = 2 WHERE id = 1;
SELECT count(*) AS txs,
       bool_and(commit_seq > 0) AS sealed,
       array_agg(commit_seq ORDER BY tx) = array_agg(commit_seq ORDER BY commit_seq) AS in_commit_order
FROM livesync.changes WHERE relation = 'co'::regclass AND commit_seq > 0;
-- Only a transaction's last row carries it.
BEGIN;
INSERT INTO co VALUES (3, 1);
UPDATE co SET v = 3 WHERE id = 3;
COMMIT;
SELECT ordinal, op, commit_seq > 0 AS sealed
FROM livesync.changes
WHERE tx = (SELECT max(tx) FROM livesync.changes WHERE relation = 'co'::regclass)
ORDER BY ordinal;

-- The last row rolled back with its savepoint: a marker (op c, ordinal 0) carries
-- the sequence; the surviving change is read as usual.
BEGIN;
INSERT INTO co VALUES (4, 1);
SAVEPOINT s;
UPDATE co SET v = 4 WHERE id = 4;
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT ordinal, op, count, commit_seq > 0 AS sealed
FROM livesync.changes
WHERE tx = (SELECT max(tx) FROM livesync.changes)
ORDER BY ordinal;
-- Nested: the tail written in a subtransaction that was released into one that
-- then rolled back is gone too.
BEGIN;
INSERT INTO co VALUES (5, 1);
SAVEPOINT outer_sp;
SAVEPOINT inner_sp;
UPDATE co SET v = 5 WHERE id = 5;
RELEASE SAVEPOINT inner_sp;
ROLLBACK TO SAVEPOINT outer_sp;
COMMIT;
-- Everything rolled back: nothing to seal, no row left behind (a marker would
-- never be sequenced, so compact() would never remove it).
BEGIN;
SELECT pg_current_xact_id() AS all_gone \gset
SAVEPOINT s;
INSERT INTO co VALUES (6, 1);
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT count(*) AS rows_left FROM livesync.changes WHERE tx = :'all_gone';
SELECT pos, op, key, delta FROM log_after(:start);
-- A later commit still follows on at the next position.
INSERT INTO co VALUES (7, 1);
SELECT pos, op, key FROM log_after(:start) WHERE pos > 5;

-- Savepoints released and rolled back in one transaction: the last surviving row
-- is not the last written one, so a marker carries the sequence; order still
-- follows the statements.
SELECT livesync.current_position() AS held \gset
BEGIN;
INSERT INTO co VALUES (10, 1);
SAVEPOINT s;
INSERT INTO co VALUES (11, 1);
RELEASE SAVEPOINT s;
INSERT INTO co VALUES (12, 1);
SAVEPOINT t;
INSERT INTO co VALUES (13, 1);          -- the last row ...
ROLLBACK TO SAVEPOINT t;                -- ... gone with its savepoint
COMMIT;
SELECT pos, op, key FROM log_after(:held);
SELECT ordinal, count, commit_seq > 0 AS sealed
FROM livesync.changes WHERE tx = (SELECT max(tx) FROM livesync.changes) ORDER BY ordinal;
-- PL/pgSQL exception blocks (write_batch's way): the last block's row, released
-- into the transaction, carries the sequence; the rolled-back block's is gone
SELECT livesync.current_position() AS blocks \gset
DO $$
BEGIN
    FOR i IN 20..22 LOOP
        BEGIN
            INSERT INTO co VALUES (i, 1);
            IF i = 21 THEN
                RAISE EXCEPTION 'roll this one back';
            END IF;
        EXCEPTION WHEN raise_exception THEN
            NULL;
        END;
    END LOOP;
END
$$;
SELECT pos, op, key FROM log_after(:blocks);
SELECT op, count, commit_seq > 0 AS sealed
FROM livesync.changes WHERE tx = (SELECT max(tx) FROM livesync.changes) ORDER BY ordinal;

-- capture also runs under session_replication_role = replica (logical
-- replication's apply workers): the triggers are ENABLE ALWAYS
SELECT livesync.current_position() AS replica \gset
BEGIN;
SET LOCAL session_replication_role = replica;
UPDATE co SET v = 555 WHERE id = 1;
COMMIT;
SELECT pos, op, key, delta FROM log_after(:replica);
SELECT DISTINCT tgenabled FROM pg_trigger WHERE tgrelid = 'co'::regclass AND tgname LIKE 'livesync%';
