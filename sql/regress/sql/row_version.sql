-- what this shows: row_version() reads a row's current version by primary key, the
-- same number the log carried for the row's last change.
\set SHOW_CONTEXT never
CREATE TABLE docs (org int, slug text, body text, PRIMARY KEY (org, slug));
INSERT INTO docs VALUES (1, 'old', 'from before tracking');
SELECT livesync.track('docs');
SELECT livesync.row_version('docs', '{"org": 1, "slug": "old"}') AS untouched_since_tracking;

SELECT livesync.current_position() AS p0 \gset
INSERT INTO docs VALUES (1, 'readme', 'v1');
SELECT livesync.row_version('docs', '{"org": 1, "slug": "readme"}') =
       (SELECT version FROM livesync.changes_since(:p0) ORDER BY position DESC LIMIT 1) AS matches_log;
SELECT livesync.row_version('docs', '{"org": 1, "slug": "readme"}') AS v1 \gset
UPDATE docs SET body = 'v2' WHERE slug = 'readme';
SELECT livesync.row_version('docs', '{"org": 1, "slug": "readme"}') > :v1 AS moved;
-- key values may be given as JSON strings or numbers; key order does not matter
SELECT livesync.row_version('docs', '{"slug": "readme", "org": "1"}') > :v1 AS same_row;
-- a missing row has no version
SELECT livesync.row_version('docs', '{"org": 2, "slug": "readme"}') IS NULL AS absent;

-- keys that are not exactly the primary key, and tables that are not tracked
SELECT expect_error($$SELECT livesync.row_version('docs', '{"org": 1}')$$);
SELECT expect_error($$SELECT livesync.row_version('docs', '{"org": 1, "slug": "x", "body": "y"}')$$);
SELECT expect_error($$SELECT livesync.row_version('docs', '[1, "x"]')$$);
SELECT expect_error($$SELECT livesync.row_version('docs', '{"org": "one", "slug": "x"}')$$);
CREATE TABLE untracked (id int PRIMARY KEY);
SELECT expect_error($$SELECT livesync.row_version('untracked', '{"id": 1}')$$);
