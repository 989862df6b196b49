-- what this shows: schema changes on a tracked table keep capture correct or are
-- refused: new columns appear in later deltas, dropped ones disappear, renames are
-- followed, and dropping the table stops tracking it without disturbing other tables.
\set SHOW_CONTEXT never
CREATE TABLE cards (id int PRIMARY KEY, title text, color text);
CREATE TABLE boards (id int PRIMARY KEY, name text);
SELECT livesync.track('cards');
SELECT livesync.track('boards');
SELECT livesync.current_position() AS p0 \gset

INSERT INTO cards VALUES (1, 'one', 'red');
ALTER TABLE cards ADD COLUMN points int DEFAULT 3;
INSERT INTO cards (id, title) VALUES (2, 'two');
UPDATE cards SET points = 5 WHERE id = 1;
ALTER TABLE cards DROP COLUMN color;
INSERT INTO cards (id, title) VALUES (3, 'three');
DELETE FROM cards WHERE id = 2;
ALTER TABLE cards RENAME TO tickets;
UPDATE tickets SET title = 'renamed' WHERE id = 1;
ALTER TABLE tickets ALTER COLUMN points TYPE bigint;
UPDATE tickets SET points = 9000000000 WHERE id = 3;
SELECT pos, relation, op, key, delta FROM log_after(:p0);
SELECT relation FROM livesync.tracked WHERE relation::text IN ('cards', 'tickets', 'boards') ORDER BY relation::text;

-- changes that would break capture are refused, and nothing is changed
SELECT expect_error($$ALTER TABLE tickets DROP CONSTRAINT cards_pkey$$);
SELECT expect_error($$ALTER TABLE tickets DROP COLUMN id$$);
SELECT expect_error($$ALTER TABLE tickets DROP COLUMN _livesync_version$$);
SELECT expect_error($$ALTER TABLE tickets RENAME COLUMN _livesync_version TO v$$);
-- swapping the primary key for another in one statement is allowed
ALTER TABLE tickets DROP CONSTRAINT cards_pkey, ADD PRIMARY KEY (id, title);
SELECT relation, key_columns FROM livesync.tracked WHERE relation::text IN ('cards', 'tickets', 'boards') ORDER BY relation::text;
SELECT livesync.current_position() AS p1 \gset
UPDATE tickets SET points = 1 WHERE id = 1;
SELECT pos, op, key FROM log_after(:p1);

-- dropping a tracked table stops tracking it; the other table keeps working
DROP TABLE tickets;
SELECT relation FROM livesync.tracked WHERE relation::text IN ('cards', 'tickets', 'boards') ORDER BY relation::text;
SELECT livesync.current_position() AS p2 \gset
INSERT INTO boards VALUES (1, 'still captured');
SELECT pos, relation, op, key FROM log_after(:p2);
-- the log keeps the dropped table's history, shown by its old oid
SELECT count(*) > 0 AS history_kept FROM livesync.changes_since(:p0) WHERE relation::text ~ '^[0-9]+$';

-- a renamed column and a column added with a default reach readers as schema
-- changes, in commit order with the row changes around them
CREATE TABLE memos (id int PRIMARY KEY, body text);
SELECT livesync.track('memos');
INSERT INTO memos VALUES (1, 'a');
SELECT livesync.current_position() AS p3 \gset
BEGIN;
ALTER TABLE memos RENAME COLUMN body TO text_body;
UPDATE memos SET text_body = 'b' WHERE id = 1;
COMMIT;
ALTER TABLE memos ADD COLUMN x int DEFAULT 5;
-- DDL that leaves the columns as they were logs nothing
ALTER TABLE memos ALTER COLUMN x SET DEFAULT 6;
CREATE INDEX ON memos (x);
SELECT pos, op, key, delta FROM log_after(:p3);
-- nobody but the DDL trigger can log one
CREATE ROLE livesync_forger;
GRANT USAGE ON SCHEMA livesync TO livesync_forger;
SET ROLE livesync_forger;
SELECT expect_error($$SELECT livesync._log_schema_change('memos'::regclass, '[]', '[]')$$);
RESET ROLE;
REVOKE USAGE ON SCHEMA livesync FROM livesync_forger;
DROP ROLE livesync_forger;

-- a column policy that no longer fits its column's type after ALTER COLUMN TYPE
-- is reset (with a NOTICE), so a merge never uses it on the new type
CREATE TABLE tagged (id int PRIMARY KEY, tags text[], n int, label text);
SELECT livesync.track('tagged');
SELECT livesync.set_policy('tagged', 'tags', 'union');
SELECT livesync.set_policy('tagged', 'n', 'sum');
SELECT livesync.set_policy('tagged', 'label', 'concat');
INSERT INTO tagged VALUES (1, '{a}', 1, 'x');
ALTER TABLE tagged ALTER COLUMN tags TYPE text USING tags::text;
ALTER TABLE tagged ALTER COLUMN n TYPE text;
-- still fits: kept
ALTER TABLE tagged ALTER COLUMN label TYPE varchar(20);
SELECT column_name, policy FROM livesync.policies WHERE relation = 'tagged'::regclass ORDER BY 1 NULLS FIRST;
-- the merge uses the default (lww): the client's value, not a garbled union
SELECT shown(livesync.write('tagged', 'update', '{"id": 1}', '{"tags": "{b}"}', NULL, '{"tags": "{z}"}'));
SELECT tags FROM tagged;
-- sum only on types whose + is plain arithmetic
CREATE TABLE money_t (id int PRIMARY KEY, m money, o oid, r real);
SELECT livesync.track('money_t');
SELECT expect_error($$SELECT livesync.set_policy('money_t', 'm', 'sum')$$);
SELECT expect_error($$SELECT livesync.set_policy('money_t', 'o', 'sum')$$);
SELECT livesync.set_policy('money_t', 'r', 'sum');

-- columns a command drops or adds without naming the tracked table: a type or
-- domain dropped with CASCADE, a column added to an inheritance parent
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TABLE feelings (id int PRIMARY KEY, m mood, d posint);
SELECT livesync.track('feelings');
CREATE TABLE parent_t (v int);
CREATE TABLE child_t (id int PRIMARY KEY) INHERITS (parent_t);
SELECT livesync.track('child_t');
SELECT livesync.current_position() AS p4 \gset
DROP TYPE mood CASCADE;
DROP DOMAIN posint CASCADE;
ALTER TABLE parent_t ADD COLUMN nv text;
ALTER TABLE parent_t RENAME COLUMN v TO vv;
SELECT pos, relation, op, delta FROM log_after(:p4);

-- A superuser who disables livesync's event trigger can drop a tracked table's
-- primary key; capture then refuses the table's writes with LS003, the code track
-- gives a table without one, and the hint says how to repair it.
CREATE TABLE lost_key (id int PRIMARY KEY, v text);
SELECT livesync.track('lost_key');
ALTER EVENT TRIGGER livesync_ddl_end DISABLE;
ALTER TABLE lost_key DROP CONSTRAINT lost_key_pkey;
ALTER EVENT TRIGGER livesync_ddl_end ENABLE;
SELECT expect_error($$INSERT INTO lost_key VALUES (1, 'x')$$);
SELECT count(*) AS rows_written FROM lost_key;
-- so do livesync.write and row_version (which have no key to look a row up by)
SELECT expect_error($$SELECT livesync.write('lost_key', 'insert', '{}', '{"v": "x"}')$$);
SELECT expect_error($$SELECT livesync.write('lost_key', 'update', '{"id": 1}', '{"v": "x"}')$$);
SELECT expect_error($$SELECT livesync.row_version('lost_key', '{}')$$);
-- (a key again, and the table goes: every later DDL checks the tracked tables)
ALTER TABLE lost_key ADD PRIMARY KEY (id);
INSERT INTO lost_key VALUES (1, 'x');
SELECT count(*) AS rows_written FROM lost_key;
DROP TABLE lost_key;
