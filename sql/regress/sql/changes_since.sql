-- what this shows: changes_since() pages through the log in position order, never
-- splits a transaction across two calls, and refuses positions it cannot answer for.
\set SHOW_CONTEXT never
CREATE TABLE events (id int PRIMARY KEY, n int);
SELECT livesync.track('events');
SELECT livesync.current_position() AS p0 \gset

INSERT INTO events VALUES (1, 1);                                    -- tx A: 1 change
INSERT INTO events SELECT g, g FROM generate_series(2, 4) g;         -- tx B: 3 changes
INSERT INTO events VALUES (5, 5);                                    -- tx C: 1 change
SELECT livesync.current_position() - :p0 AS newest;

-- max_changes = 2: A fits, B would overflow, so the page stops after A
SELECT pos, key FROM log_after(:p0, 2);
-- max_changes = 1 from A's end: B comes back whole although it is larger than the page
SELECT pos, key FROM log_after(:p0 + 1, 1);
-- max_changes = 4: A and B (4 changes), not C
SELECT pos, key FROM log_after(:p0, 4);
-- a position inside a transaction returns the rest of it
SELECT pos, key FROM log_after(:p0 + 2, 1000);
-- reading from the newest position returns nothing
SELECT count(*) FROM livesync.changes_since(livesync.current_position());

-- paging through everything, page after page, yields each change exactly once, in order
WITH RECURSIVE pages(after, page) AS (
    SELECT :p0::bigint, 0
    UNION ALL
    SELECT (SELECT max(position) FROM livesync.changes_since(after, 2)), page + 1
    FROM pages WHERE after < livesync.current_position()
)
SELECT page, after - :p0 AS read_through FROM pages ORDER BY page;

-- what it refuses
SELECT expect_error($$SELECT * FROM livesync.changes_since(0, 0)$$);
SELECT regexp_replace(expect_error(format('SELECT * FROM livesync.changes_since(%s)', livesync.current_position() + 1)), '(position|through|is) [0-9]+', '\1 N', 'g') AS error;
SELECT count(*) AS null_position_rows FROM livesync.changes_since(NULL);

-- every transaction is in exactly one batch, also those that sequenced themselves at
-- commit (which the stored snapshot still shows as running)
SELECT count(*) > 0 AS has_batches, count(*) = count(DISTINCT t) AS each_once
FROM livesync.batches, unnest(txs) AS t;
