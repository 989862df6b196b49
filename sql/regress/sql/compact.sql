-- what this shows: compact() prunes old changes from the log, and a reader asking for
-- a position older than what is kept is told to resync (SQLSTATE LS001), never handed
-- a partial stream.
\set SHOW_CONTEXT never
CREATE TABLE pings (id int PRIMARY KEY);
SELECT livesync.track('pings');
SELECT livesync.current_position() AS p0 \gset
INSERT INTO pings VALUES (1);
INSERT INTO pings VALUES (2);
SELECT livesync.current_position() AS p1 \gset

-- nothing is older than a day: nothing goes
SELECT livesync.compact() AS removed;
SELECT count(*) FROM livesync.changes_since(:p0);

-- everything committed before this statement's transaction began goes
SELECT livesync.compact('0 seconds') > 0 AS removed_some;
SELECT regexp_replace(expect_error(format('SELECT * FROM livesync.changes_since(%s)', :p0)), '(position|through|is) [0-9]+', '\1 N', 'g') AS error;
-- the newest position stays where it was, and reading from it still works
SELECT livesync.current_position() = :p1 AS position_kept;
SELECT count(*) FROM livesync.changes_since(:p1);
-- new changes after compaction are read as usual
INSERT INTO pings VALUES (3);
SELECT pos, op, key FROM log_after(:p1);
-- compact is strict: a NULL interval prunes nothing
SELECT livesync.compact(NULL) IS NULL AS strict_null;
