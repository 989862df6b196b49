-- what this shows: track() starts capture on a table with a primary key (rows that
-- were already there are fine), refuses tables it cannot key, and untrack() stops
-- capture and puts the table back as it was.
\set SHOW_CONTEXT never
CREATE TABLE projects (id int PRIMARY KEY, name text NOT NULL);
INSERT INTO projects VALUES (1, 'before tracking');
SELECT livesync.track('projects');
SELECT relation, key_columns FROM livesync.tracked ORDER BY relation::text;
-- rows that predate tracking read as version 0
SELECT id, name, _livesync_version FROM projects ORDER BY id;

-- composite primary keys are keyed by all their columns, in index order
CREATE TABLE memberships (project_id int, user_id int, role text, PRIMARY KEY (user_id, project_id));
SELECT livesync.track('memberships');
SELECT relation, key_columns FROM livesync.tracked ORDER BY relation::text;

-- tracking twice is harmless
SELECT livesync.track('projects');

-- what cannot be tracked
CREATE TABLE no_key (id int, note text);
SELECT expect_error($$SELECT livesync.track('no_key')$$);
CREATE VIEW project_names AS SELECT name FROM projects;
SELECT expect_error($$SELECT livesync.track('project_names')$$);
SELECT expect_error($$SELECT livesync.track('livesync.changes')$$);
SELECT expect_error($$SELECT livesync.track('does_not_exist')$$);
SELECT livesync.track(NULL);

-- untrack removes the triggers and the version column; the table is left as it was
SELECT livesync.untrack('memberships');
SELECT relation FROM livesync.tracked ORDER BY relation::text;
SELECT attname FROM pg_attribute WHERE attrelid = 'memberships'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum;
SELECT count(*) AS triggers_left FROM pg_trigger WHERE tgrelid = 'memberships'::regclass;
SELECT expect_error($$SELECT livesync.untrack('memberships')$$);

-- an untracked table's writes are not captured
SELECT livesync.current_position() AS p0 \gset
INSERT INTO memberships VALUES (1, 1, 'owner');
SELECT count(*) AS captured FROM livesync.changes_since(:p0);
