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
-- one lock for a batch from one client, not one per mutation (on livesync's own
-- object tag: no advisory lock, which any role could take and hold)
BEGIN;
SELECT jsonb_array_length(livesync.write_batch(
           (SELECT jsonb_agg(jsonb_build_object('rel', 'batched', 'op', 'update', 'key', jsonb_build_object('id', g),
                                                'new_values', jsonb_build_object('n', 0),
                                                'client_id', 'c1', 'mutation_id', 10000 + g))
            FROM generate_series(1, 500) g))) AS results;
SELECT count(*) AS client_locks FROM pg_locks
WHERE locktype = 'object' AND objid = 'livesync._mutations'::regclass AND pid = pg_backend_pid();
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

-- errors that used to be internal ones now have documented codes and name the
-- user's table
CREATE TABLE vetoed (id int PRIMARY KEY, a int);
SELECT livesync.track('vetoed');
INSERT INTO vetoed VALUES (1, 0);
CREATE FUNCTION skip_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
CREATE TRIGGER skip_update BEFORE UPDATE ON vetoed FOR EACH ROW EXECUTE FUNCTION skip_row();
CREATE TRIGGER skip_insert BEFORE INSERT ON vetoed FOR EACH ROW EXECUTE FUNCTION skip_row();
CREATE TRIGGER skip_delete BEFORE DELETE ON vetoed FOR EACH ROW EXECUTE FUNCTION skip_row();
SELECT expect_error($$SELECT livesync.write('vetoed', 'update', '{"id": 1}', '{"a": 1}')$$);
SELECT expect_error($$SELECT livesync.write('vetoed', 'update', '{"id": 1}', '{"a": 1}', 0, '{"a": 5}')$$);
SELECT expect_error($$SELECT livesync.write('vetoed', 'insert', '{"id": 2}', '{"a": 1}')$$);
SELECT expect_error($$SELECT livesync.write('vetoed', 'delete', '{"id": 1}', NULL)$$);
SELECT id, a FROM vetoed;

-- a row that row-level security hides from the writing role
CREATE TABLE secrets (id int PRIMARY KEY, v text);
SELECT livesync.track('secrets');
INSERT INTO secrets VALUES (1, 'hidden');
ALTER TABLE secrets ENABLE ROW LEVEL SECURITY;
CREATE ROLE livesync_rls_role;
GRANT USAGE ON SCHEMA livesync TO livesync_rls_role;
GRANT SELECT, INSERT, UPDATE, DELETE ON secrets TO livesync_rls_role;
CREATE POLICY visible ON secrets TO livesync_rls_role USING (v <> 'hidden') WITH CHECK (true);
SET ROLE livesync_rls_role;
SELECT expect_error($$SELECT livesync.write('secrets', 'upsert', '{"id": 1}', '{"v": "mine"}')$$);
SELECT livesync.write('secrets', 'upsert', '{"id": 2}', '{"v": "seen"}') ->> 'status' AS visible_row;
-- update and delete of the hidden row: for this role there is no such row, as for a
-- plain UPDATE or DELETE of it (saying it exists would reveal it): the update is
-- not_found, the delete finds it already gone; the row stays as it was
SELECT livesync.write('secrets', 'delete', '{"id": 1}', NULL) ->> 'status' AS hidden_delete;
SELECT livesync.write('secrets', 'update', '{"id": 1}', '{"v": "mine"}') ->> 'reason' AS hidden_update;
RESET ROLE;
SELECT id, v FROM secrets ORDER BY id;
DROP TABLE secrets;
REVOKE USAGE ON SCHEMA livesync FROM livesync_rls_role;
DROP ROLE livesync_rls_role;

-- NULL arguments to resolve_conflict
SELECT expect_error($$SELECT livesync.resolve_conflict(NULL, 'mine')$$);
SELECT expect_error($$SELECT livesync.resolve_conflict(1, NULL)$$);

-- temporary tables and partitions cannot be tracked
CREATE TEMP TABLE scratch (id int PRIMARY KEY);
SELECT expect_error($$SELECT livesync.track('scratch')$$);
CREATE TABLE measures (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE measures_2026 PARTITION OF measures FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
SELECT expect_error($$SELECT livesync.track('measures_2026')$$);
SELECT expect_error($$SELECT livesync.track('measures')$$);
CREATE TYPE shape_t AS (id int, label text);
CREATE TABLE typed_t OF shape_t (PRIMARY KEY (id));
SELECT expect_error($$SELECT livesync.track('typed_t')$$);
SELECT count(*) AS tracked_leftovers FROM livesync.tracked WHERE relation::text IN ('scratch', 'measures', 'measures_2026', 'typed_t');

-- a client_id longer than 256 bytes
SELECT expect_error(format($$SELECT livesync.write('vetoed', 'update', '{"id": 1}', '{"a": 1}', NULL, NULL, %L, 1)$$, repeat('x', 100000)));

-- a key column repeated in new_values is compared in its own type
CREATE TABLE things (id uuid PRIMARY KEY, n int);
SELECT livesync.track('things');
INSERT INTO things VALUES ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 0);
SELECT livesync.write('things', 'update', '{"id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"}',
                      '{"id": "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "n": 1}') ->> 'status' AS same_key;
SELECT expect_error($$SELECT livesync.write('things', 'update', '{"id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"}', '{"id": "b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "n": 2}')$$);
CREATE TABLE counted (id int PRIMARY KEY, n int);
SELECT livesync.track('counted');
INSERT INTO counted VALUES (3, 0);
SELECT livesync.write('counted', 'update', '{"id": 3}', '{"id": "3", "n": 1}') ->> 'status' AS same_key;
SELECT n FROM things UNION ALL SELECT n FROM counted;

-- an hlc far ahead of the server's clock is clamped to livesync.max_clock_skew
SELECT current_setting('livesync.max_clock_skew') AS max_clock_skew;
SELECT livesync.write('counted', 'update', '{"id": 3}', '{"n": 9}', NULL, NULL, NULL, NULL, '18446744073709551615:0:fast') ->> 'status' AS written;
SELECT (_livesync_clocks -> 'n' ->> 0)::numeric <= extract(epoch FROM clock_timestamp()) * 1000 + 60000 AS clamped
FROM counted;
