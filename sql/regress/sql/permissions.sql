-- what this shows: an application role needs privileges on its own tables only:
-- capture writes the log on its behalf, and the role cannot write the log itself.
\set SHOW_CONTEXT never
DROP ROLE IF EXISTS livesync_app_role;
CREATE ROLE livesync_app_role;
CREATE TABLE notes (id int PRIMARY KEY, body text);
SELECT livesync.track('notes');
GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO livesync_app_role;
GRANT USAGE ON SCHEMA livesync TO livesync_app_role;
SELECT livesync.current_position() AS p0 \gset

SET ROLE livesync_app_role;
INSERT INTO notes VALUES (1, 'written by the app role');
UPDATE notes SET body = 'edited' WHERE id = 1;
SELECT expect_error($$INSERT INTO livesync.changes (tx, ordinal, relation, op, actor) VALUES (pg_current_xact_id(), 1, 'notes', 'i', 'forged')$$);
RESET ROLE;

SELECT pos, op, key, actor FROM log_after(:p0);
DROP TABLE notes;
DROP OWNED BY livesync_app_role;
DROP ROLE livesync_app_role;
