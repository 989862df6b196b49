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

-- resolve_conflict settles a table's conflict only for a role that may UPDATE the
-- table, whatever the choice: 'theirs' writes nothing, so the table's own
-- privileges were never asked, and a role with none could settle it
CREATE TABLE cards (id int PRIMARY KEY, status text);
SELECT livesync.track('cards');
SELECT livesync.set_policy('cards', 'status', 'manual');
INSERT INTO cards VALUES (1, 'open');
SELECT livesync.write('cards', 'update', '{"id": 1}', '{"status": "done"}', 0, '{"status": "new"}') ->> 'status' AS stored;
SELECT id AS conflict FROM livesync.conflicts WHERE relation = 'cards'::regclass \gset
CREATE ROLE livesync_outsider;
GRANT USAGE ON SCHEMA livesync TO livesync_outsider;
CREATE ROLE livesync_reader_only;
GRANT USAGE ON SCHEMA livesync TO livesync_reader_only;
GRANT SELECT ON cards TO livesync_reader_only;
SET ROLE livesync_outsider;
SELECT count(*) AS conflicts_seen FROM livesync.conflicts;
SELECT expect_error(format($$SELECT livesync.resolve_conflict(%s, 'theirs')$$, :conflict));
SET ROLE livesync_reader_only;
SELECT count(*) AS conflicts_seen FROM livesync.conflicts;
SELECT expect_error(format($$SELECT livesync.resolve_conflict(%s, 'theirs')$$, :conflict));
RESET ROLE;
SELECT resolved_at IS NULL AS still_open FROM livesync.conflicts WHERE id = :conflict;
GRANT UPDATE ON cards TO livesync_reader_only;
SET ROLE livesync_reader_only;
SELECT livesync.resolve_conflict(:conflict, 'theirs') ->> 'status' AS settled;
RESET ROLE;
SELECT resolved_at IS NOT NULL AS closed FROM livesync.conflicts WHERE id = :conflict;
DROP TABLE cards;
DROP OWNED BY livesync_outsider, livesync_reader_only;
DROP ROLE livesync_outsider;
DROP ROLE livesync_reader_only;
