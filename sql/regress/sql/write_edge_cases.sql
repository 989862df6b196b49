-- what this shows: the edge cases of livesync.write, each decided explicitly:
-- inserts of existing keys, updates and deletes of missing rows, deletes racing
-- updates, idempotent retries, batches; and every bad input raising a stable
-- SQLSTATE with nothing written.
\set SHOW_CONTEXT never
CREATE TABLE tasks (id int PRIMARY KEY, title text NOT NULL, done bool DEFAULT false, n int);
SELECT livesync.track('tasks');
SELECT livesync.current_position() AS p0 \gset

-- insert; upsert of a new key inserts, of an existing key updates
SELECT shown(livesync.write('tasks', 'insert', '{"id": 1}', '{"title": "a"}'));
SELECT shown(livesync.write('tasks', 'upsert', '{"id": 2}', '{"title": "b", "done": true}'));
SELECT shown(livesync.write('tasks', 'upsert', '{"id": 2}', '{"title": "b2"}'));
-- key columns may repeat the key in new_values
SELECT shown(livesync.write('tasks', 'insert', '{"id": 3}', '{"id": 3, "title": "c"}'));

-- insert over an existing key: merged as an update whose base is unknown (every
-- differing column is contested; lww: the insert is the later write) ...
SELECT shown(livesync.write('tasks', 'insert', '{"id": 1}', '{"title": "a again", "n": 5}'));
-- ... or rejected when the table says so
SELECT livesync.set_conflict_rules('tasks', existing_insert => 'reject');
SELECT shown(livesync.write('tasks', 'insert', '{"id": 1}', '{"title": "a third time"}'));
SELECT title FROM tasks WHERE id = 1;

-- update of a row that never existed (no base): rejected, nothing written
SELECT shown(livesync.write('tasks', 'update', '{"id": 9}', '{"title": "ghost"}'));
-- update of a row deleted since the client's base: delete_wins (the default) rejects it ...
SELECT livesync.row_version('tasks', '{"id": 3}') AS v3 \gset
DELETE FROM tasks WHERE id = 3;
SELECT shown(livesync.write('tasks', 'update', '{"id": 3}', '{"done": true}', :v3, '{"done": false}'));
-- ... update_wins recreates it from the client's base and new values
SELECT livesync.set_conflict_rules('tasks', delete_race => 'update_wins');
SELECT shown(livesync.write('tasks', 'update', '{"id": 3}', '{"done": true}', :v3, '{"title": "c", "done": false}'));
-- ... unless the client's values cannot make a row (title is NOT NULL): an error, nothing written
DELETE FROM tasks WHERE id = 3;
SELECT expect_error(format($$SELECT livesync.write('tasks', 'update', '{"id": 3}', '{"done": true}', %s, '{"done": false}')$$, :v3));

-- delete of a missing row: already the state asked for
SELECT shown(livesync.write('tasks', 'delete', '{"id": 9}', NULL));
-- a delete from a stale base: update_wins keeps the updated row ...
SELECT livesync.row_version('tasks', '{"id": 2}') AS v2 \gset
UPDATE tasks SET n = 1 WHERE id = 2;
SELECT shown(livesync.write('tasks', 'delete', '{"id": 2}', NULL, :v2));
-- ... delete_wins deletes it anyway
SELECT livesync.set_conflict_rules('tasks', delete_race => 'delete_wins', existing_insert => 'merge');
SELECT shown(livesync.write('tasks', 'delete', '{"id": 2}', NULL, :v2));
SELECT id, title, done, n FROM tasks ORDER BY id;
SELECT expect_error($$SELECT livesync.set_conflict_rules('tasks', existing_insert => 'ignore')$$);
SELECT expect_error($$SELECT livesync.set_conflict_rules('tasks', delete_race => 'nobody_wins')$$);

-- Idempotency: the same (client_id, mutation_id) returns the first result and
-- changes nothing, even when the retry carries different values.
SELECT livesync.write('tasks', 'update', '{"id": 1}', '{"n": 10}', client_id => 'phone', mutation_id => 1) AS first \gset
SELECT livesync.current_position() AS p1 \gset
SELECT livesync.write('tasks', 'update', '{"id": 1}', '{"n": 99}', client_id => 'phone', mutation_id => 1) = :'first'::jsonb AS same_result;
SELECT n FROM tasks WHERE id = 1;
SELECT count(*) AS changes_from_retry FROM livesync.changes_since(:p1);
-- another client's mutation 1 is a different mutation
SELECT livesync.write('tasks', 'update', '{"id": 1}', '{"n": 11}', client_id => 'laptop', mutation_id => 1) ->> 'status' AS laptop;
-- a rejected result is a result: the retry is rejected the same way
SELECT shown(livesync.write('tasks', 'update', '{"id": 8}', '{"n": 1}', client_id => 'phone', mutation_id => 2));
INSERT INTO tasks (id, title) VALUES (8, 'now it exists');
SELECT shown(livesync.write('tasks', 'update', '{"id": 8}', '{"n": 1}', client_id => 'phone', mutation_id => 2));
-- the log names the mutation that made each change, so a client recognises its echo
SELECT c.op, c.key, c.client_id, c.mutation_id FROM livesync.changes_since(:p0) c
WHERE c.client_id IS NOT NULL ORDER BY c.position;
-- compact() prunes mutation records with the log
SELECT count(*) AS records FROM livesync._mutations WHERE client_id IN ('phone', 'laptop');
SELECT livesync.compact('0 seconds') AS removed \gset
SELECT count(*) AS records FROM livesync._mutations WHERE client_id IN ('phone', 'laptop');

-- write_batch: in order, one result each; a failing mutation rejects only itself
SELECT jsonb_pretty(jsonb_agg(shown(r) - 'row')) FROM jsonb_array_elements(livesync.write_batch($$[
    {"rel": "tasks", "op": "insert", "key": {"id": 20}, "new_values": {"title": "one"}, "client_id": "tab", "mutation_id": 1},
    {"rel": "tasks", "op": "update", "key": {"id": 20}, "new_values": {"n": "not a number"}, "client_id": "tab", "mutation_id": 2},
    {"rel": "tasks", "op": "update", "key": {"id": 20}, "new_values": {"n": 3}, "client_id": "tab", "mutation_id": 3},
    {"rel": "no_such_table", "op": "update", "key": {"id": 20}, "new_values": {"n": 3}},
    {"rel": "tasks", "op": "update", "key": {"id": 20}, "new_values": {"n": 4}, "colour": "red"}
]$$)) r;
SELECT id, title, n FROM tasks WHERE id = 20;
-- replaying the same queue changes nothing and returns the same results
SELECT livesync.write_batch('[{"rel": "tasks", "op": "update", "key": {"id": 20}, "new_values": {"n": 30}, "client_id": "tab", "mutation_id": 3}]') -> 0 ->> 'status' AS replayed,
       (SELECT n FROM tasks WHERE id = 20) AS n;
-- all_or_nothing: one rejection aborts the whole batch
SELECT expect_error($$SELECT livesync.write_batch('[
    {"rel": "tasks", "op": "update", "key": {"id": 20}, "new_values": {"n": 100}},
    {"rel": "tasks", "op": "update", "key": {"id": 404}, "new_values": {"n": 100}}]', all_or_nothing => true)$$);
SELECT expect_error($$SELECT livesync.write_batch('[
    {"rel": "tasks", "op": "update", "key": {"id": 20}, "new_values": {"n": 100}},
    {"rel": "tasks", "op": "update", "key": {"id": 20}, "new_values": {"n": "x"}}]', all_or_nothing => true)$$);
SELECT n FROM tasks WHERE id = 20;
SELECT expect_error($$SELECT livesync.write_batch('{"rel": "tasks"}')$$);
SELECT jsonb_array_length(livesync.write_batch('[]')) AS empty_batch;

-- Bad input: a clear error with a stable SQLSTATE, and nothing written.
SELECT livesync.current_position() AS p2 \gset
SELECT expect_error($$SELECT livesync.write('tasks', 'update', '{"id": 1}', '{"colour": "red"}')$$);
SELECT expect_error($$SELECT livesync.write('tasks', 'update', '{"id": 1}', '{"_livesync_version": 1}')$$);
SELECT expect_error($$SELECT livesync.write('tasks', 'update', '{"id": 1}', '{"n": "many"}')$$);
SELECT expect_error($$SELECT livesync.write('tasks', 'update', '{"id": 1}', '{"n": 99999999999}')$$);
SELECT expect_error($$SELECT livesync.write('tasks', 'update', '{"id": 1}', '{"title": null}')$$);
SELECT expect_error($$SELECT livesync.write('tasks', 'update', '{"title": "a"}', '{"n": 1}')$$);
SELECT expect_error($$SELECT livesync.write('tasks', 'update', '{"id": 1, "n": 1}', '{"n": 1}')$$);
SELECT expect_error($$SELECT livesync.write('tasks', 'update', '{"id": 1}', '{"id": 2}')$$);
SELECT expect_error($$SELECT livesync.write('tasks', 'update', '{"id": "one"}', '{"n": 1}')$$);
SELECT expect_error($$SELECT livesync.write('tasks', 'update', '[1]', '{"n": 1}')$$);
SELECT expect_error($$SELECT livesync.write('tasks', 'update', '{"id": 1}', '"n"')$$);
SELECT expect_error($$SELECT livesync.write('tasks', 'update', '{"id": 1}', NULL)$$);
SELECT expect_error($$SELECT livesync.write('tasks', 'update', '{"id": 1}', '{"n": 1', NULL)$$);
SELECT expect_error($$SELECT livesync.write('tasks', 'merge', '{"id": 1}', '{"n": 1}')$$);
SELECT expect_error($$SELECT livesync.write('tasks', 'update', '{"id": 1}', '{"n": 1}', client_id => 'phone')$$);
SELECT expect_error($$SELECT livesync.write('tasks', 'update', '{"id": 1}', '{"n": 1}', hlc => 'yesterday')$$);
SELECT expect_error($$SELECT livesync.write('tasks', 'update', '{"id": 1}', '{"n": 1}', base_values => '{"nope": 1}')$$);
CREATE TABLE plain (id int PRIMARY KEY);
SELECT expect_error($$SELECT livesync.write('plain', 'insert', '{"id": 1}', '{}')$$);
SELECT count(*) AS written FROM livesync.changes_since(:p2);
SELECT id, title, done, n FROM tasks WHERE id = 1;

-- Identifiers are always quoted.
CREATE TABLE "Odd Table" ("Key" text PRIMARY KEY, "the value" int, "select" text, t int, r int, b int);
SELECT livesync.track('"Odd Table"');
SELECT shown(livesync.write('"Odd Table"', 'insert', '{"Key": "k"}', '{"the value": 1, "select": "from"}'));
SELECT shown(livesync.write('"Odd Table"', 'update', '{"Key": "k"}', '{"the value": 2}', 0, '{"the value": 1}'));

-- An application role needs privileges on its own table only, and they apply.
-- It sees the conflicts of tables it can read, not of others.
SELECT livesync.set_policy('"Odd Table"', 'select', 'manual');
SELECT livesync.write('"Odd Table"', 'update', '{"Key": "k"}', '{"select": "mine"}', 0, '{"select": "base"}') ->> 'status' AS odd_conflict;
SELECT livesync.set_policy('tasks', 'title', 'manual');
SELECT livesync.write('tasks', 'update', '{"id": 1}', '{"title": "mine"}', 0, '{"title": "base"}') ->> 'status' AS tasks_conflict;
DROP ROLE IF EXISTS livesync_writer;
CREATE ROLE livesync_writer;
GRANT USAGE ON SCHEMA livesync TO livesync_writer;
GRANT SELECT, INSERT, UPDATE ON tasks TO livesync_writer;
SET ROLE livesync_writer;
SELECT livesync.write('tasks', 'update', '{"id": 1}', '{"n": 7}', client_id => 'role', mutation_id => 1) ->> 'status' AS as_app_role;
SELECT expect_error($$SELECT livesync.write('plain', 'insert', '{"id": 2}', '{}')$$);
SELECT expect_error($$SELECT livesync.write('tasks', 'delete', '{"id": 1}', NULL)$$);
-- the conflicts view shows only tables the role can read
SELECT relation, column_name, mine FROM livesync.conflicts WHERE resolved_at IS NULL ORDER BY id;
RESET ROLE;
SELECT relation, column_name, mine FROM livesync.conflicts WHERE resolved_at IS NULL ORDER BY id;
SELECT n FROM tasks WHERE id = 1;
DROP TABLE "Odd Table";
DROP TABLE plain;
DROP TABLE tasks;
-- dropping a table drops its conflicts
SELECT count(*) AS conflicts_left FROM livesync._conflicts WHERE relation::oid NOT IN (SELECT oid FROM pg_class);
DROP OWNED BY livesync_writer;
DROP ROLE livesync_writer;
