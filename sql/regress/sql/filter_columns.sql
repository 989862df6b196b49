-- what this shows: set_filter_columns() declares the columns whose value every update
-- of a table logs, changed or not, so a reader can tell whether the row matches a
-- filter on them. An update of such a table is stored as [key, old, new, version,
-- {filter columns it did not change: their value}]; old and new still hold only the
-- changed columns, and changes_since's delta is unchanged. Tables without filter
-- columns, inserts and deletes keep four elements. The list follows renames, loses
-- dropped columns, and is refused what is not a column.
\set SHOW_CONTEXT never
CREATE TABLE tasks (id int PRIMARY KEY, project_id int, owner text, title text, done bool, note text);
SELECT livesync.track('tasks');
INSERT INTO tasks SELECT g, g % 3, 'user' || g % 2, 'task ' || g, false, NULL FROM generate_series(1, 6) g;

-- The changes after a position as capture stored them (change_runs), each entry
-- without its version (checked to be a number, fourth as before), and the deltas
-- changes_since reads for the same positions.
CREATE FUNCTION public.entries_after(after bigint)
RETURNS TABLE (pos bigint, op "char", elements int, entry jsonb, version_is_a_number bool)
LANGUAGE sql AS $$
    SELECT r.first_position + e.n - 1 - after, r.op, jsonb_array_length(e.change), e.change - 3,
           jsonb_typeof(e.change -> 3) = 'number'
    FROM livesync.change_runs(after) AS r
    CROSS JOIN LATERAL jsonb_array_elements(r.entries) WITH ORDINALITY AS e(change, n)
    ORDER BY 1
$$;

-- No filter columns: updates are four elements.
SELECT relation, key_columns, filter_columns FROM livesync.tracked WHERE relation = 'tasks'::regclass;
SELECT livesync.current_position() AS p0 \gset
UPDATE tasks SET title = 'first task' WHERE id = 1;
SELECT * FROM entries_after(:p0);

-- Declared: each update carries the filter columns it did not change, with their
-- current value, as a fifth element; one it changed is in old and new only.
SELECT livesync.set_filter_columns('tasks', '{project_id, owner}');
SELECT relation, key_columns, filter_columns FROM livesync.tracked WHERE relation = 'tasks'::regclass;
SELECT filter_columns, filter_attnums FROM livesync._tracked WHERE relation = 'tasks'::regclass;
SELECT livesync.current_position() AS p1 \gset
UPDATE tasks SET title = 'only the title' WHERE id = 1;             -- both unchanged
UPDATE tasks SET project_id = 7 WHERE id = 2;                        -- one changed
UPDATE tasks SET project_id = 8, owner = 'ana' WHERE id = 3;         -- both changed: {}
UPDATE tasks SET done = done WHERE id = 4;                           -- nothing changed
UPDATE tasks SET owner = NULL WHERE id = 5;
UPDATE tasks SET title = 'a NULL filter value' WHERE id = 5;         -- a NULL is a value
INSERT INTO tasks VALUES (7, 1, 'bo', 'inserted', false, NULL);      -- whole rows: four elements
DELETE FROM tasks WHERE id = 7;
SELECT * FROM entries_after(:p1);
-- changes_since reads the same changes as before: the delta holds what changed
SELECT pos, op, key, delta FROM log_after(:p1);

-- A statement of many rows, and one that changes keys (re-paired by key: the rows
-- whose key changed are a delete and an insert, the others updates as above).
SELECT livesync.current_position() AS p2 \gset
UPDATE tasks SET done = true WHERE id <= 3;
UPDATE tasks SET id = CASE id WHEN 6 THEN 60 ELSE id END, note = 'moved' WHERE id IN (5, 6);
SELECT * FROM entries_after(:p2);
SELECT pos, op, key, delta FROM log_after(:p2);

-- A key column may be listed too: its value is also in the key.
SELECT livesync.set_filter_columns('tasks', '{id, owner}');
SELECT livesync.current_position() AS p3 \gset
UPDATE tasks SET title = 'keyed' WHERE id = 1;
SELECT * FROM entries_after(:p3);

-- Within a transaction: the declaration counts from the next statement, and a
-- rollback takes it back.
SELECT livesync.set_filter_columns('tasks', '{}');
SELECT livesync.current_position() AS p4 \gset
BEGIN;
SELECT livesync.set_filter_columns('tasks', ARRAY['project_id']);
UPDATE tasks SET title = 'in the transaction' WHERE id = 1;
ROLLBACK;
UPDATE tasks SET title = 'after the rollback' WHERE id = 1;
BEGIN;
SELECT livesync.set_filter_columns('tasks', ARRAY['project_id']);
UPDATE tasks SET title = 'declared in this transaction' WHERE id = 1;
COMMIT;
SELECT livesync.set_filter_columns('tasks', '{}');                    -- an empty array clears them
UPDATE tasks SET title = 'cleared' WHERE id = 1;
SELECT * FROM entries_after(:p4);
SELECT filter_columns, filter_attnums FROM livesync._tracked WHERE relation = 'tasks'::regclass;

-- What it refuses (and nothing changes).
SELECT livesync.set_filter_columns('tasks', '{project_id, owner}');
CREATE TABLE not_tracked (id int PRIMARY KEY, v int);
SELECT expect_error($$SELECT livesync.set_filter_columns('not_tracked', '{v}')$$);
SELECT expect_error($$SELECT livesync.set_filter_columns('no_such_table', '{v}')$$);
SELECT expect_error($$SELECT livesync.set_filter_columns('tasks', '{project_id, nope}')$$);
SELECT expect_error($$SELECT livesync.set_filter_columns('tasks', '{_livesync_version}')$$);
SELECT expect_error($$SELECT livesync.set_filter_columns('tasks', '{_livesync_clocks}')$$);
SELECT expect_error($$SELECT livesync.set_filter_columns('tasks', '{ctid}')$$);
SELECT expect_error($$SELECT livesync.set_filter_columns('tasks', '{owner, project_id, owner}')$$);
SELECT expect_error($$SELECT livesync.set_filter_columns('tasks', ARRAY['owner', NULL])$$);
SELECT expect_error($$SELECT livesync.set_filter_columns('tasks', '{{owner}, {title}}')$$);
SELECT expect_error($$SELECT livesync.set_filter_columns('tasks', NULL)$$);
SELECT expect_error($$SELECT livesync.set_filter_columns(NULL, '{owner}')$$);
SELECT expect_error($$SELECT livesync.set_filter_columns('tasks', ARRAY(SELECT 'c' || g FROM generate_series(1, 33) g))$$);
SELECT filter_columns, filter_attnums FROM livesync._tracked WHERE relation = 'tasks'::regclass;
-- 32 columns are fine
CREATE TABLE wide (id int PRIMARY KEY);
SELECT format('ALTER TABLE wide %s', string_agg(format('ADD COLUMN c%s int', g), ', ')) FROM generate_series(1, 32) g \gexec
SELECT livesync.track('wide');
SELECT livesync.set_filter_columns('wide', ARRAY(SELECT 'c' || g FROM generate_series(1, 32) g));
SELECT cardinality(filter_columns) FROM livesync.tracked WHERE relation = 'wide'::regclass;
DROP TABLE wide, not_tracked;

-- Schema changes: a renamed filter column stays under its new name, a retyped one
-- stays, a dropped one leaves the list (a column of the same name added in the same
-- statement takes its place: the list is of names).
SELECT livesync.set_filter_columns('tasks', '{project_id, owner, note}');
SELECT livesync.current_position() AS p5 \gset
ALTER TABLE tasks RENAME COLUMN project_id TO project;
SELECT filter_columns, filter_attnums FROM livesync._tracked WHERE relation = 'tasks'::regclass;
ALTER TABLE tasks ALTER COLUMN owner TYPE varchar(20);
SELECT filter_columns, filter_attnums FROM livesync._tracked WHERE relation = 'tasks'::regclass;
ALTER TABLE tasks DROP COLUMN note;
SELECT filter_columns, filter_attnums FROM livesync._tracked WHERE relation = 'tasks'::regclass;
UPDATE tasks SET title = 'after the changes' WHERE id = 1;
ALTER TABLE tasks DROP COLUMN owner, ADD COLUMN owner text DEFAULT 'new';
SELECT filter_columns, filter_attnums FROM livesync._tracked WHERE relation = 'tasks'::regclass;
UPDATE tasks SET title = 'owner again' WHERE id = 1;
ALTER TABLE tasks DROP COLUMN owner;
ALTER TABLE tasks RENAME TO jobs;
SELECT relation, filter_columns FROM livesync.tracked WHERE relation = 'jobs'::regclass;
UPDATE jobs SET title = 'renamed table' WHERE id = 1;
SELECT pos, op, elements, CASE op WHEN 's' THEN '(a change of columns)' ELSE entry::text END AS entry
FROM entries_after(:p5);
-- renames in turn (a swap through a third name) follow each column
ALTER TABLE jobs ADD COLUMN a int DEFAULT 1, ADD COLUMN b int DEFAULT 2;
SELECT livesync.set_filter_columns('jobs', '{a}');
ALTER TABLE jobs RENAME COLUMN a TO tmp;
ALTER TABLE jobs RENAME COLUMN b TO a;
ALTER TABLE jobs RENAME COLUMN tmp TO b;
SELECT filter_columns FROM livesync._tracked WHERE relation = 'jobs'::regclass;
SELECT livesync.current_position() AS p6 \gset
UPDATE jobs SET title = 'swapped' WHERE id = 1;
SELECT entry FROM entries_after(:p6);
-- a list out of step with the attribute numbers (as a restored dump leaves it, its
-- columns numbered afresh) is capture-correct by name, and put right by the next DDL
UPDATE livesync._tracked SET filter_attnums = '{42}' WHERE relation = 'jobs'::regclass;
SELECT livesync.current_position() AS p7 \gset
UPDATE jobs SET title = 'out of step' WHERE id = 1;
SELECT entry FROM entries_after(:p7);
COMMENT ON TABLE jobs IS 'any DDL';
SELECT filter_columns, filter_attnums = ARRAY[(SELECT attnum FROM pg_attribute WHERE attrelid = 'jobs'::regclass AND attname = 'b')] AS attnums_right
FROM livesync._tracked WHERE relation = 'jobs'::regclass;

-- untrack forgets the declaration; tracking again starts without one
SELECT livesync.untrack('jobs');
SELECT livesync.track('jobs');
SELECT filter_columns FROM livesync.tracked WHERE relation = 'jobs'::regclass;

DROP TABLE jobs;
DROP FUNCTION public.entries_after(bigint);
