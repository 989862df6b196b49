-- what this shows: schema changes on a tracked table keep capture correct or are
-- refused: new columns appear in later deltas, dropped ones disappear, renames are
-- followed, and dropping the table stops tracking it without disturbing other tables.
\set SHOW_CONTEXT never
CREATE TABLE cards (id int PRIMARY KEY, title text, color text);
CREATE TABLE boards (id int PRIMARY KEY, name text);
SELECT livesync.track('cards');
SELECT livesync.track('boards');
SELECT livesync.current_position() AS p0 \gset

INSERT INTO cards VALUES (1, 'one', 'red');
ALTER TABLE cards ADD COLUMN points int DEFAULT 3;
INSERT INTO cards (id, title) VALUES (2, 'two');
UPDATE cards SET points = 5 WHERE id = 1;
ALTER TABLE cards DROP COLUMN color;
INSERT INTO cards (id, title) VALUES (3, 'three');
DELETE FROM cards WHERE id = 2;
ALTER TABLE cards RENAME TO tickets;
UPDATE tickets SET title = 'renamed' WHERE id = 1;
ALTER TABLE tickets ALTER COLUMN points TYPE bigint;
UPDATE tickets SET points = 9000000000 WHERE id = 3;
SELECT pos, relation, op, key, delta FROM log_after(:p0);
SELECT relation FROM livesync.tracked WHERE relation::text IN ('cards', 'tickets', 'boards') ORDER BY relation::text;

-- changes that would break capture are refused, and nothing is changed
SELECT expect_error($$ALTER TABLE tickets DROP CONSTRAINT cards_pkey$$);
SELECT expect_error($$ALTER TABLE tickets DROP COLUMN id$$);
SELECT expect_error($$ALTER TABLE tickets DROP COLUMN _livesync_version$$);
SELECT expect_error($$ALTER TABLE tickets RENAME COLUMN _livesync_version TO v$$);
-- swapping the primary key for another in one statement is allowed
ALTER TABLE tickets DROP CONSTRAINT cards_pkey, ADD PRIMARY KEY (id, title);
SELECT relation, key_columns FROM livesync.tracked WHERE relation::text IN ('cards', 'tickets', 'boards') ORDER BY relation::text;
SELECT livesync.current_position() AS p1 \gset
UPDATE tickets SET points = 1 WHERE id = 1;
SELECT pos, op, key FROM log_after(:p1);

-- dropping a tracked table stops tracking it; the other table keeps working
DROP TABLE tickets;
SELECT relation FROM livesync.tracked WHERE relation::text IN ('cards', 'tickets', 'boards') ORDER BY relation::text;
SELECT livesync.current_position() AS p2 \gset
INSERT INTO boards VALUES (1, 'still captured');
SELECT pos, relation, op, key FROM log_after(:p2);
-- the log keeps the dropped table's history, shown by its old oid
SELECT count(*) > 0 AS history_kept FROM livesync.changes_since(:p0) WHERE relation::text ~ '^[0-9]+$';
