-- what this shows: a database on livesync 0.1.0 is brought to the current version by
-- ALTER EXTENSION livesync UPDATE, through 0.2.0 and 0.3.0: its log rows are kept (and
-- a transaction that committed unsequenced is sequenced after it), positions,
-- policies and open conflicts are kept, its tracked tables are captured as before,
-- and its objects are the same as a fresh install's. On the way, its objects at 0.3.0
-- are those of 0.3.0's released install script, and every kind of change logged
-- under 0.3.0 reads the same after the update to 0.4.0 (whose changes_since is
-- another implementation), page by page, from positions inside transactions too.
-- A database created at 0.4.0 runs on this library before its update, and after it.
\set SHOW_CONTEXT never
SELECT current_database() AS fresh_db \gset
-- livesync's objects as a view, one line each (include/livesync_objects.sql): made
-- in a fresh install and in an upgraded one, which must match.
\i include/livesync_objects.sql
SELECT string_agg(item, E'\n' ORDER BY item) AS fresh FROM public.livesync_objects \gset

CREATE DATABASE livesync_upgrade;
\c livesync_upgrade
SET client_min_messages = warning;
SET livesync.sequencer = commit;
CREATE EXTENSION livesync VERSION '0.1.0';
CREATE TABLE notes (id int PRIMARY KEY, body text);
SELECT livesync.track('notes');
SELECT livesync.set_policy('notes', 'body', 'manual');
-- a transaction that committed a change under 0.1.0 (in 0.1.0's log layout) but was
-- not sequenced yet when the upgrade ran
INSERT INTO livesync.changes
VALUES (pg_current_xact_id(), 1, 1, 'notes', 'i', '[[{"id": 1}, null, {"id": 1, "body": "old"}, 1]]', 'postgres', NULL, NULL);

ALTER EXTENSION livesync UPDATE TO '0.2.0';
SELECT extversion FROM pg_extension WHERE extname = 'livesync';
SELECT ordinal, count, commit_seq, op, entries FROM livesync.changes;

-- On 0.2.0: changes with positions, an open conflict, a mutation record.
INSERT INTO notes VALUES (10, 'before');
SELECT livesync.write('notes', 'update', '{"id": 10}', '{"body": "mine"}', 0, '{"body": "base"}') ->> 'status' AS wrote;
SELECT livesync.write('notes', 'insert', '{"id": 11}', '{"body": "queued"}', client_id => 'phone', mutation_id => 1) ->> 'status' AS wrote;
SELECT string_agg(format('%s %s %s %s %s', position, relation, op, key, delta), E'\n' ORDER BY position) AS log_before
FROM livesync.changes_since(0) \gset
SELECT id AS conflict FROM livesync.conflicts WHERE resolved_at IS NULL \gset

ALTER EXTENSION livesync UPDATE TO '0.3.0';
SELECT extversion FROM pg_extension WHERE extname = 'livesync';
-- the log reads the same, positions included; the policy and the conflict stand
SELECT string_agg(format('%s %s %s %s %s', position, relation, op, key, delta), E'\n' ORDER BY position) = :'log_before' AS same_log
FROM livesync.changes_since(0);
SELECT relation, column_name, policy FROM livesync.policies WHERE column_name IS NOT NULL;
SELECT column_name, mine, theirs, resolved_at IS NULL AS open FROM livesync.conflicts;
SELECT livesync.resolve_conflict(:conflict, 'mine') -> 'row' ->> 'body' AS resolved;
-- mutation records from before 0.3.0 (they do not say which role wrote them) are
-- gone: a retry is applied again, here merging into the row it inserted
SELECT count(*) AS old_records FROM livesync._mutations;
SELECT livesync.write('notes', 'insert', '{"id": 11}', '{"body": "changed since"}', client_id => 'phone', mutation_id => 1) -> 'row' ->> 'body' AS applied_again;

-- Its objects are those of a database created at 0.3.0 by the released script
-- (extension/released/livesync--0.3.0.sql).
\i include/livesync_objects.sql
SELECT string_agg(item, E'\n' ORDER BY item) AS upgraded_to_0_3_0 FROM public.livesync_objects \gset
DROP VIEW public.livesync_objects;
CREATE DATABASE livesync_at_0_3_0;
\c livesync_at_0_3_0
SET client_min_messages = warning;
CREATE EXTENSION livesync VERSION '0.3.0';
\i include/livesync_objects.sql
SELECT item AS only_in_0_3_0_as_released FROM public.livesync_objects
EXCEPT SELECT item FROM unnest(string_to_array(:'upgraded_to_0_3_0', E'\n')) AS f(item) ORDER BY 1;
SELECT item AS only_in_0_3_0_upgraded FROM unnest(string_to_array(:'upgraded_to_0_3_0', E'\n')) AS f(item)
EXCEPT SELECT item FROM public.livesync_objects ORDER BY 1;
\c livesync_upgrade
DROP DATABASE livesync_at_0_3_0 WITH (FORCE);
SET client_min_messages = warning;
SET livesync.sequencer = commit;

-- On 0.3.0: every kind of change, in transactions of one change, of a few kinds, and
-- of more than one run (over 1,000 changes); values of many types, NULLs, an update
-- that changes nothing, client mutations.
CREATE TABLE kinds (id int PRIMARY KEY, body text, tags text[], doc jsonb, n numeric, at timestamptz);
SELECT livesync.track('kinds');
INSERT INTO kinds SELECT g, 'row ' || g, ARRAY['a', g::text], jsonb_build_object('g', g, 'list', jsonb_build_array(g, NULL, 'x')),
                         g / 8.0, '2026-12-04 10:00+00'::timestamptz + g * interval '1 minute'
FROM generate_series(1, 1200) g;
UPDATE kinds SET body = NULL, n = n + 1, tags = tags || '{b}' WHERE id % 100 = 0;
UPDATE kinds SET body = body WHERE id = 1;
DELETE FROM kinds WHERE id > 1190;
BEGIN;
INSERT INTO kinds (id, body, doc) VALUES (2000, 'in a mixed transaction', '{"deep": {"er": [1, {"est": true}]}}');
UPDATE kinds SET doc = NULL WHERE id = 2;
DELETE FROM kinds WHERE id = 3;
UPDATE kinds SET body = 'again' WHERE id = 2000;
COMMIT;
ALTER TABLE kinds ADD COLUMN extra int;
ALTER TABLE kinds RENAME COLUMN extra TO more;
SELECT livesync.write('kinds', 'update', '{"id": 4}', '{"body": "from a phone"}', client_id => 'phone', mutation_id => 2) ->> 'status' AS wrote;
TRUNCATE kinds;
INSERT INTO kinds (id, body) VALUES (1, 'after the truncate');
SELECT u.first AS big_first FROM livesync.batches, unnest(txs, firsts) AS u(tx, first)
WHERE (SELECT sum(c.count) FROM livesync.changes c WHERE c.tx = u.tx) = 1200 \gset
-- The whole log as 0.3.0 reads it, every column; and page by page, from every
-- position but most of those inside the 1,200-change transaction, with pages of 1,
-- 7 and 1,000 changes.
SELECT md5(string_agg(format('%s %s %s %s %s %s %s %s %s %s %s', position, relation, op, key, delta, version,
                             actor, tx, committed_at, client_id, mutation_id), E'\n' ORDER BY position)) AS log_at_0_3_0
FROM livesync.changes_since(0, 100000) \gset
CREATE FUNCTION public.pages(big_first bigint) RETURNS text LANGUAGE sql AS $$
    SELECT md5(string_agg(format('%s/%s: %s', after, size, page), E'\n' ORDER BY after, size))
    FROM generate_series(0, livesync.current_position()) AS after,
         unnest(ARRAY[1, 7, 1000]) AS size,
         LATERAL (SELECT string_agg(format('%s %s %s %s %s', position, op, key, delta, version), ' ' ORDER BY position)
                  FROM livesync.changes_since(after, size)) AS p(page)
    WHERE after NOT BETWEEN big_first + 2 AND big_first + 1196 OR after % 97 = 0
$$;
SELECT pages(:big_first) AS pages_at_0_3_0 \gset

ALTER EXTENSION livesync UPDATE;
SELECT extversion FROM pg_extension WHERE extname = 'livesync';
-- the log reads the same, every column of every change, and page by page
SELECT md5(string_agg(format('%s %s %s %s %s %s %s %s %s %s %s', position, relation, op, key, delta, version,
                             actor, tx, committed_at, client_id, mutation_id), E'\n' ORDER BY position)) = :'log_at_0_3_0' AS same_log
FROM livesync.changes_since(0, 100000);
SELECT pages(:big_first) = :'pages_at_0_3_0' AS same_pages;
-- and change_runs returns the same changes as runs
SELECT sum(jsonb_array_length(entries)) AS changes_in_runs, (SELECT count(*) FROM livesync.changes_since(0, 100000)) AS changes
FROM livesync.change_runs(0, 100000);

-- the same objects as a fresh install
\i include/livesync_objects.sql
SELECT item AS only_in_a_fresh_install FROM unnest(string_to_array(:'fresh', E'\n')) AS f(item)
EXCEPT SELECT item FROM public.livesync_objects ORDER BY 1;
SELECT item AS only_after_the_upgrade FROM public.livesync_objects
EXCEPT SELECT item FROM unnest(string_to_array(:'fresh', E'\n')) AS f(item) ORDER BY 1;

-- tracked tables carry on: their triggers fire under the replica role too, a
-- change and a schema change are captured, and the unsequenced 0.1.0 change is
-- read first
SELECT DISTINCT tgenabled FROM pg_trigger WHERE tgrelid = 'notes'::regclass AND tgname LIKE 'livesync%';
INSERT INTO notes VALUES (2, 'new');
ALTER TABLE notes ADD COLUMN due date;
SELECT position, op, key, delta FROM livesync.changes_since(0, 100000) WHERE relation = 'notes'::regclass ORDER BY position;
-- and take filter columns (new in 0.4.0): an update then logs their value
SELECT livesync.current_position() AS before_filter \gset
SELECT livesync.set_filter_columns('notes', '{body}');
UPDATE notes SET due = '2026-12-24' WHERE id = 2;
SELECT (entries -> 0) - 3 AS update_with_a_filter_column FROM livesync.change_runs(:before_filter);
-- and the roles of the privilege model exist
SELECT rolname FROM pg_roles WHERE rolname IN ('livesync_reader', 'livesync_maintainer') ORDER BY 1;

-- A database created at 0.4.0 by its released script keeps working on this library
-- before it is updated: its resolve_conflict (through 0.4.0's _checked) settles a
-- conflict, and an error keeps livesync's SQLSTATE (LS006). The update to 0.5.0
-- drops _checked, errors keep their code, capture goes on, and the objects are a
-- fresh install's.
CREATE DATABASE livesync_at_0_4_0;
\c livesync_at_0_4_0
SET client_min_messages = warning;
SET livesync.sequencer = commit;
CREATE EXTENSION livesync VERSION '0.4.0';
CREATE TABLE notes (id int PRIMARY KEY, body text);
SELECT livesync.track('notes');
SELECT livesync.set_policy('notes', 'body', 'manual');
INSERT INTO notes VALUES (1, 'stored');
SELECT livesync.write('notes', 'update', '{"id": 1}', '{"body": "mine"}', 0, '{"body": "base"}') ->> 'status' AS wrote;
SELECT id AS conflict FROM livesync.conflicts WHERE resolved_at IS NULL \gset
SELECT livesync.resolve_conflict(:conflict, 'mine') -> 'row' ->> 'body' AS resolved_at_0_4_0;
\set VERBOSITY sqlstate
SELECT livesync.resolve_conflict(:conflict, 'mine');
\set VERBOSITY default
ALTER EXTENSION livesync UPDATE;
SELECT extversion FROM pg_extension WHERE extname = 'livesync';
SELECT count(*) AS relays_left FROM pg_proc WHERE proname = '_checked';
\set VERBOSITY sqlstate
SELECT livesync.resolve_conflict(:conflict, 'mine');
\set VERBOSITY default
UPDATE notes SET body = 'after the update' WHERE id = 1;
SELECT op, key, delta FROM livesync.changes_since(0) ORDER BY position;
\i include/livesync_objects.sql
SELECT item AS only_in_a_fresh_install FROM unnest(string_to_array(:'fresh', E'\n')) AS f(item)
EXCEPT SELECT item FROM public.livesync_objects ORDER BY 1;
SELECT item AS only_after_the_update_from_0_4_0 FROM public.livesync_objects
EXCEPT SELECT item FROM unnest(string_to_array(:'fresh', E'\n')) AS f(item) ORDER BY 1;

\c :fresh_db
DROP DATABASE livesync_at_0_4_0 WITH (FORCE);
DROP DATABASE livesync_upgrade WITH (FORCE);
DROP VIEW public.livesync_objects;
