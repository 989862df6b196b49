-- what this shows: the limits an adversarial user hit are gone or explicit: a
-- 1,000-column table takes writes on every path, big list merges are linear,
-- deeply nested values in other columns do not stop a write, a batch has a
-- documented maximum (54000) and reports an all-or-nothing failure as LS007, a
-- non-array for a list policy is refused (22023), and a table dropped and
-- re-created under the same name takes writes in the same session.
\set SHOW_CONTEXT never

-- 1,000 columns: insert, fast-path update, merge path (stale base), delete
SELECT format('CREATE TABLE wide (id int PRIMARY KEY, %s)',
              string_agg(format('c%s int', g), ', ')) AS ddl
FROM generate_series(1, 1000) g \gset
:ddl;
SELECT livesync.track('wide');
SELECT (SELECT jsonb_object_agg('c' || g, g) FROM generate_series(1, 1000) g) AS all_values \gset
SELECT shown(livesync.write('wide', 'insert', '{"id": 1}', :'all_values')) - 'row' AS inserted;
SELECT c1, c500, c1000 FROM wide;
SELECT (SELECT jsonb_object_agg('c' || g, -g) FROM generate_series(1, 1000) g) AS negated \gset
SELECT livesync.row_version('wide', '{"id": 1}') AS v1 \gset
SELECT livesync.write('wide', 'update', '{"id": 1}', :'negated', :v1) ->> 'status' AS fast_path;
SELECT c1, c500, c1000 FROM wide;
-- a stale base on every column: the merge path (lww)
SELECT livesync.write('wide', 'update', '{"id": 1}', :'all_values', :v1, :'negated') ->> 'status' AS merge_path;
SELECT c1, c500, c1000 FROM wide;
SELECT livesync.write('wide', 'delete', '{"id": 1}', NULL) ->> 'status' AS deleted;
SELECT count(*) FROM wide;

-- union / append of 40,000-item lists (a quadratic merge took 15 s here)
CREATE TABLE lists (id int PRIMARY KEY, tags int[], log jsonb);
SELECT livesync.track('lists');
SELECT livesync.set_policy('lists', 'tags', 'union');
SELECT livesync.set_policy('lists', 'log', 'append');
INSERT INTO lists SELECT 1, array_agg(g), jsonb_agg(g) FROM generate_series(1, 40000) g;
-- the client's base: the first 39,000; it removed 1..1000 and added 40001..41000
SELECT (SELECT jsonb_agg(g) FROM generate_series(1, 39000) g) AS base_list,
       (SELECT jsonb_agg(g) FROM generate_series(1001, 39000) g)
       || (SELECT jsonb_agg(g) FROM generate_series(40001, 41000) g) AS my_list \gset
SELECT livesync.write('lists', 'update', '{"id": 1}',
                      jsonb_build_object('tags', :'my_list'::jsonb, 'log', :'my_list'::jsonb), 0,
                      jsonb_build_object('tags', :'base_list'::jsonb, 'log', :'base_list'::jsonb)) ->> 'status' AS status;
SELECT cardinality(tags), tags[1], tags[39000], tags[40000],
       jsonb_array_length(log), log -> 0, log -> -1
FROM lists;
-- a value that is not an array cannot be merged as a list
SELECT expect_error($$SELECT livesync.write('lists', 'update', '{"id": 1}', '{"log": {"not": "a list"}}', 0, '{"log": []}')$$);

-- a value nested deeper than serde_json's default 128 levels, in a column the
-- write does not touch, and one in the write itself
CREATE TABLE deep_docs (id int PRIMARY KEY, deep jsonb, title text);
SELECT livesync.track('deep_docs');
INSERT INTO deep_docs VALUES (1, (repeat('[', 500) || repeat(']', 500))::jsonb, 'a');
SELECT livesync.write('deep_docs', 'update', '{"id": 1}', '{"title": "b"}', 0, '{"title": "z"}') ->> 'status' AS merged;
SELECT livesync.write('deep_docs', 'update', '{"id": 1}', jsonb_build_object('deep', (repeat('[', 300) || '1' || repeat(']', 300))::jsonb)) ->> 'status' AS deep_written;
SELECT title, length(deep::text) FROM deep_docs;
-- deeper than livesync reads: a clear error
SELECT expect_error(format($$SELECT livesync.write('deep_docs', 'update', '{"id": 1}', jsonb_build_object('deep', %L::jsonb))$$,
                           repeat('[', 2500) || repeat(']', 2500)));
SELECT livesync.write('deep_docs', 'delete', '{"id": 1}', NULL) ->> 'status' AS deleted;

-- write_batch: a maximum size, and linear in its size
SET livesync.max_batch_mutations = 3;
SELECT expect_error($$SELECT livesync.write_batch('[{}, {}, {}, {}]')$$);
RESET livesync.max_batch_mutations;
SELECT current_setting('livesync.max_batch_mutations') AS default_max;
CREATE TABLE batched (id int PRIMARY KEY, n int);
SELECT livesync.track('batched');
SELECT jsonb_array_length(livesync.write_batch(
           (SELECT jsonb_agg(jsonb_build_object('rel', 'batched', 'op', 'insert', 'key', jsonb_build_object('id', g),
                                                'new_values', jsonb_build_object('n', g),
                                                'client_id', 'c1', 'mutation_id', g))
            FROM generate_series(1, 2000) g))) AS results;
SELECT count(*), sum(n) FROM batched;
-- one advisory lock for a batch from one client, not one per mutation
BEGIN;
SELECT jsonb_array_length(livesync.write_batch(
           (SELECT jsonb_agg(jsonb_build_object('rel', 'batched', 'op', 'update', 'key', jsonb_build_object('id', g),
                                                'new_values', jsonb_build_object('n', 0),
                                                'client_id', 'c1', 'mutation_id', 10000 + g))
            FROM generate_series(1, 500) g))) AS results;
SELECT count(*) AS advisory_locks FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid();
COMMIT;

-- a table dropped and re-created under the same name, in the same session
CREATE TABLE again (id int PRIMARY KEY, a int);
SELECT livesync.track('again');
SELECT livesync.write('again', 'insert', '{"id": 1}', '{"a": 1}') ->> 'status' AS first_table;
DROP TABLE again;
CREATE TABLE again (id int PRIMARY KEY, b text, a int);
SELECT livesync.track('again');
SELECT livesync.write('again', 'insert', '{"id": 1}', '{"a": 2, "b": "x"}') ->> 'status' AS second_table;
SELECT livesync.write('again', 'update', '{"id": 1}', '{"b": "y"}') ->> 'status' AS updated;
SELECT id, b, a FROM again;
