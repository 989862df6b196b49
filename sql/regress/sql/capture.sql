-- what this shows: every INSERT, UPDATE, DELETE and TRUNCATE on a tracked table lands
-- in the log with its key and delta: inserts carry only "new", deletes only "old",
-- updates only the columns whose value changed. Rolled-back work leaves nothing.
\set SHOW_CONTEXT never
CREATE TABLE todos (
    id      int PRIMARY KEY,
    title   text,
    done    bool DEFAULT false,
    tags    text[],
    due     timestamptz,
    amount  numeric,
    meta    jsonb
);
SELECT livesync.track('todos');
SET timezone = 'UTC';
SELECT livesync.current_position() AS p0 \gset

INSERT INTO todos (id, title, tags, due, amount, meta)
VALUES (1, 'milk', '{shop}', '2026-01-02 03:04:05+00', 1.50, '{"a": [1, 2]}'),
       (2, 'eggs', NULL, NULL, NULL, NULL);
UPDATE todos SET done = true WHERE id = 1;
-- a column set to NULL, and a column set to the value it already had (not in the delta)
UPDATE todos SET title = NULL, amount = 1.50 WHERE id = 1;
-- an update that changes nothing is still a write: it is logged with an empty delta
UPDATE todos SET title = title WHERE id = 2;
DELETE FROM todos WHERE id = 2;
SELECT * FROM log_after(:p0);

-- one statement touching many rows: one change per row, all in one transaction
SELECT livesync.current_position() AS p1 \gset
INSERT INTO todos (id, title) SELECT g, 'item ' || g FROM generate_series(10, 14) g;
UPDATE todos SET done = NOT done WHERE id BETWEEN 10 AND 14;
SELECT pos, op, key, delta FROM log_after(:p1);
SELECT count(DISTINCT tx) AS transactions, count(*) AS changes FROM livesync.changes_since(:p1);

-- several statements in one transaction share one transaction and consecutive positions
SELECT livesync.current_position() AS p2 \gset
BEGIN;
INSERT INTO todos (id, title) VALUES (20, 'a');
UPDATE todos SET title = 'b' WHERE id = 20;
DELETE FROM todos WHERE id = 20;
COMMIT;
SELECT pos, op, key, delta FROM log_after(:p2);
SELECT count(DISTINCT tx) AS transactions FROM livesync.changes_since(:p2);

-- rolled back: nothing captured; a rolled-back savepoint drops only its own changes
SELECT livesync.current_position() AS p3 \gset
BEGIN;
INSERT INTO todos (id, title) VALUES (30, 'rolled back');
ROLLBACK;
BEGIN;
INSERT INTO todos (id, title) VALUES (31, 'kept');
SAVEPOINT s;
INSERT INTO todos (id, title) VALUES (32, 'undone');
ROLLBACK TO SAVEPOINT s;
INSERT INTO todos (id, title) VALUES (33, 'kept too');
COMMIT;
SELECT op, key FROM log_after(:p3);
-- a statement that fails leaves nothing either
SELECT expect_error($$INSERT INTO todos (id, title) VALUES (31, 'duplicate')$$);
SELECT op, key FROM log_after(:p3);

-- changing a primary key: the old key is deleted and the new key inserted
SELECT livesync.current_position() AS p4 \gset
UPDATE todos SET id = 40 WHERE id = 31;
SELECT pos, op, key, delta FROM log_after(:p4);

-- several rows shifting keys in one statement (old and new keys overlap): rows are
-- paired by key, so key 2 is an update (it now holds row 1's values), 1 a delete, 3 an insert
CREATE TABLE slots (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, v text);
INSERT INTO slots VALUES (1, 'one'), (2, 'two');
SELECT livesync.track('slots');
SELECT livesync.current_position() AS p4b \gset
UPDATE slots SET id = id + 1;
SELECT pos, op, key, delta FROM log_after(:p4b);

-- INSERT ... ON CONFLICT: the insert path and the update path are each captured as what happened
SELECT livesync.current_position() AS p5 \gset
INSERT INTO todos (id, title) VALUES (33, 'upserted'), (50, 'new')
ON CONFLICT (id) DO UPDATE SET title = excluded.title;
INSERT INTO todos (id, title) VALUES (50, 'ignored') ON CONFLICT DO NOTHING;
SELECT pos, op, key, delta FROM log_after(:p5);

-- versions: every write gives the row a new, larger version; the log carries it
SELECT livesync.current_position() AS p6 \gset
SELECT _livesync_version AS v_before FROM todos WHERE id = 50 \gset
UPDATE todos SET title = 'v2' WHERE id = 50;
UPDATE todos SET title = 'v3' WHERE id = 50;
SELECT _livesync_version > :v_before AS grew FROM todos WHERE id = 50;
SELECT c.version = t._livesync_version AS log_matches_row
FROM livesync.changes_since(:p6) c JOIN todos t ON t.id = (c.key ->> 'id')::int
ORDER BY c.position DESC LIMIT 1;
SELECT bool_and(version IS NOT NULL) AS all_versioned,
       count(DISTINCT version) = count(*) AS all_distinct
FROM livesync.changes_since(:p0) WHERE op <> 'truncate';
-- the version column cannot be forged by a writer
UPDATE todos SET _livesync_version = 1 WHERE id = 50;
SELECT _livesync_version > 1 AS stamped_by_livesync FROM todos WHERE id = 50;

-- large values (stored out of line) are captured whole, and left out when unchanged
SELECT livesync.current_position() AS p7 \gset
INSERT INTO todos (id, title) VALUES (60, repeat('x', 100000));
UPDATE todos SET done = true WHERE id = 60;
SELECT op, length(delta -> 'title' ->> 'new') AS title_length, delta ? 'done' AS has_done
FROM livesync.changes_since(:p7) ORDER BY position;

-- the actor: livesync.actor when set, otherwise current_user
SELECT livesync.current_position() AS p8 \gset
UPDATE todos SET done = false WHERE id = 60;
SET livesync.actor = 'user:42';
UPDATE todos SET done = true WHERE id = 60;
RESET livesync.actor;
SELECT pos, actor FROM log_after(:p8);

-- TRUNCATE is one change with no key
SELECT livesync.current_position() AS p9 \gset
TRUNCATE todos;
SELECT pos, relation, op, key, delta FROM log_after(:p9);

-- two-phase commit cannot be sequenced at PREPARE time: refused, and nothing is kept
SELECT livesync.current_position() AS p10 \gset
BEGIN;
INSERT INTO todos (id, title) VALUES (70, 'prepared');
PREPARE TRANSACTION 'livesync_regress';
SELECT count(*) AS captured FROM livesync.changes_since(:p10);
SELECT count(*) AS rows_kept FROM todos WHERE id = 70;

-- values render exactly as to_jsonb renders them, for every kind of column: the
-- logged row of each insert equals to_jsonb of the stored row
CREATE DOMAIN positive AS int CHECK (VALUE > 0);
CREATE TYPE mood AS ENUM ('calm', 'busy');
CREATE TABLE kinds (
    id int8 PRIMARY KEY, s int2, i int4, b bool, t text, v varchar(20), c char(3),
    f float8, r real, n numeric(8,3), d date, ts timestamp, tz timestamptz, iv interval,
    u uuid, j json, jb jsonb, ta text[], ia int[], p positive, m mood, bt bytea, pt point
);
SELECT livesync.track('kinds');
SELECT livesync.current_position() AS p11 \gset
INSERT INTO kinds VALUES
    (1, -2, 2147483647, true, E'quote " backslash \\ newline \n tab \t é ☃', 'varchar', 'ab',
     1.5e300, 'NaN', -12.345, '2026-01-02', '2026-01-02 03:04:05.678', '2026-01-02 03:04:05+02', '1 day 02:03:04',
     'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"b": 1, "a": [true, null]}', '{"z": {"y": 1}}', '{"x", NULL, "z"}',
     '{1,2,3}', 7, 'busy', '\xdeadbeef', '(1,2)'),
    (-9223372036854775808, NULL, NULL, false, '', NULL, NULL, '-Infinity', -0.0, 'NaN', NULL, NULL, NULL, NULL,
     NULL, 'null', '[]', '{}', NULL, NULL, NULL, NULL, NULL);
SELECT k.id, l.delta_new = to_jsonb(k) - '_livesync_version' - '_livesync_clocks' AS same_as_to_jsonb
FROM kinds k
JOIN (SELECT (c.key ->> 'id')::int8 AS id,
             (SELECT jsonb_object_agg(e.key, e.value -> 'new') FROM jsonb_each(c.delta) e) AS delta_new
      FROM livesync.changes_since(:p11) c) l ON l.id = k.id
ORDER BY k.id;
-- and an update logs the changed columns' old and new values the same way
SELECT livesync.current_position() AS p12 \gset
UPDATE kinds SET t = 'plain', tz = '2027-01-01 00:00:00+00', ta = NULL, n = 1 WHERE id = 1;
SELECT key, delta FROM livesync.changes_since(:p12);
DROP TABLE kinds;
DROP TYPE mood;
DROP DOMAIN positive;

-- a statement's changes are stored in runs of up to 1000 (one log row each) and read
-- back one change per row, in statement order, at consecutive positions
CREATE TABLE bulk (id int PRIMARY KEY, v text);
SELECT livesync.track('bulk');
SELECT livesync.current_position() AS p13 \gset
INSERT INTO bulk SELECT g, 'v' || g FROM generate_series(1, 2500) g;
SELECT count(*) AS changes, count(DISTINCT position) AS positions,
       max(position) - min(position) + 1 AS span,
       bool_and((key ->> 'id')::int = position - :p13) AS in_statement_order,
       bool_and(delta -> 'v' ->> 'new' = 'v' || (key ->> 'id')) AS values_match
FROM livesync.changes_since(:p13, 5000);
SELECT op, ordinal, count FROM livesync.changes WHERE relation = 'bulk'::regclass ORDER BY ordinal;
-- very large rows end a run early (past 8 MB), however few changes it holds
SELECT livesync.current_position() AS p14 \gset
UPDATE bulk SET v = repeat(id::text, 5000000) WHERE id <= 3;
SELECT key, length(delta -> 'v' ->> 'new') AS new_length FROM livesync.changes_since(:p14) ORDER BY position;
SELECT op, count FROM livesync.changes
WHERE relation = 'bulk'::regclass AND op = 'u' ORDER BY ordinal;
DROP TABLE bulk;
