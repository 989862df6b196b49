-- what this shows: a database on livesync 0.1.0 is brought to the current version by
-- ALTER EXTENSION livesync UPDATE, through 0.2.0: its log rows are kept (and a
-- transaction that committed unsequenced is sequenced after it), positions, policies
-- and open conflicts are kept, its tracked tables are captured as before, and its
-- objects are the same as a fresh install's.
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

ALTER EXTENSION livesync UPDATE;
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
SELECT position, op, key, delta FROM livesync.changes_since(0) ORDER BY position;
-- and the roles of the privilege model exist
SELECT rolname FROM pg_roles WHERE rolname LIKE 'livesync\_%' ORDER BY 1;

\c :fresh_db
DROP DATABASE livesync_upgrade WITH (FORCE);
DROP VIEW public.livesync_objects;
