-- what this shows: every committed transaction carries its commit sequence (the WAL
-- position just before it committed) on its last log row, which is what ticks order
-- transactions by; when no such row is left to write at commit (a savepoint rolled
-- back over it, or the last changes came from a subtransaction) a commit marker
-- carries it instead, which takes no position and never reaches readers.
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

-- The last changes rolled back with their savepoint: the insert made before it
-- (held back at the top level) carries the sequence; the update is gone.
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
-- Everything rolled back: the marker is all there is, and takes no position.
BEGIN;
SAVEPOINT s;
INSERT INTO co VALUES (6, 1);
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT op, count FROM livesync.changes
WHERE tx = (SELECT max(tx) FROM livesync.changes) ORDER BY ordinal;
SELECT pos, op, key, delta FROM log_after(:start);
-- A later commit still follows on at the next position.
INSERT INTO co VALUES (7, 1);
SELECT pos, op, key FROM log_after(:start) WHERE pos > 5;

-- A transaction's last run is held back until its next statement or its commit, so
-- the commit sequence rides on a row written anyway; a subtransaction writes what
-- it holds when it is released, and a deeper one never writes an outer level's
-- (its rows could roll back): order still follows the statements.
SELECT livesync.current_position() AS held \gset
BEGIN;
INSERT INTO co VALUES (10, 1);          -- held at the top level
SAVEPOINT s;
INSERT INTO co VALUES (11, 1);          -- written at once: the top level holds one
RELEASE SAVEPOINT s;
INSERT INTO co VALUES (12, 1);          -- writes 10, holds 12
SAVEPOINT t;
INSERT INTO co VALUES (13, 1);          -- written in t ...
ROLLBACK TO SAVEPOINT t;                -- ... and gone with it
COMMIT;                                 -- writes 12 with the commit sequence
SELECT pos, op, key FROM log_after(:held);
SELECT ordinal, count, commit_seq > 0 AS sealed
FROM livesync.changes WHERE tx = (SELECT max(tx) FROM livesync.changes) ORDER BY ordinal;
-- the same as a PL/pgSQL exception block (write_batch's way): each block's last
-- run is written when the block ends, the commit sequence goes into a marker
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
