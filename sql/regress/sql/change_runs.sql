-- what this shows: change_runs() returns the log as it is stored, in runs of
-- [key, old, new, version], holding exactly the changes changes_since() returns for
-- the same page at the same positions: whole transactions, the rest of one when read
-- from inside it (the run holding that position cut after it), one larger than the
-- page whole. Commit markers and the positions of rolled-back changes hold nothing.
-- It names each run's table as it is now (NULL once dropped), and refuses what
-- changes_since refuses.
\set SHOW_CONTEXT never
CREATE TABLE stock (id int PRIMARY KEY, name text, qty int, tags text[], doc jsonb, price numeric, seen timestamptz);
CREATE TABLE gone (id int PRIMARY KEY);
SELECT livesync.track('stock'), livesync.track('gone');
SELECT livesync.current_position() AS p0 \gset

-- Every kind of change, in transactions of one change, of several kinds, and of
-- several runs (capture writes at most 1,000 changes to a run).
INSERT INTO stock SELECT g, 'item ' || g, g % 7, ARRAY['t', g::text], jsonb_build_object('g', g, 'l', jsonb_build_array(g, NULL)),
                         g / 4.0, '2026-12-04 10:00+00'::timestamptz + g * interval '1 second'
FROM generate_series(1, 2500) g;                                     -- one transaction, three runs
UPDATE stock SET qty = qty + 1, name = NULL WHERE id % 250 = 0;      -- 10 updates
UPDATE stock SET name = name WHERE id = 1;                           -- an update that changes nothing
INSERT INTO gone VALUES (1);
DELETE FROM stock WHERE id > 2495;
BEGIN;
INSERT INTO stock (id, name) VALUES (3000, 'mixed');
UPDATE stock SET doc = '{"deep": {"er": [1, {"est": true}]}}' WHERE id = 2;
DELETE FROM stock WHERE id = 3;
COMMIT;
-- a savepoint rolled back between two statements (a gap in the transaction's
-- positions) and one that took the transaction's last run (a commit marker row)
BEGIN;
INSERT INTO stock (id, name) VALUES (3001, 'kept');
SAVEPOINT s;
INSERT INTO stock (id, name) VALUES (3002, 'rolled back');
ROLLBACK TO s;
INSERT INTO stock (id, name) VALUES (3003, 'kept too');
SAVEPOINT t;
UPDATE stock SET name = 'rolled back' WHERE id = 3001;
ROLLBACK TO t;
COMMIT;
ALTER TABLE stock ADD COLUMN extra int;
SELECT livesync.write('stock', 'update', '{"id": 4}', '{"name": "from a phone"}', client_id => 'phone', mutation_id => 7) ->> 'status' AS wrote;
TRUNCATE gone;
INSERT INTO gone VALUES (2);
SELECT livesync.current_position() - :p0 AS newest;
SELECT count(*) AS commit_markers FROM livesync.changes WHERE op = 'c';

-- The runs as stored, from the start.
SELECT first_position - :p0 AS first, tx_first_position - :p0 AS tx_first, tx_last_position - :p0 AS tx_last,
       schema_name, table_name, op, jsonb_array_length(entries) AS changes, client_id, mutation_id,
       relation = (schema_name || '.' || table_name)::regclass::oid AS relation_matches
FROM livesync.change_runs(:p0) ORDER BY first_position;
-- an entry of an update holds only the columns that changed, then the row's version
SELECT (entries -> 0) - 3 AS first_update, jsonb_typeof(entries -> 0 -> 3) AS version
FROM livesync.change_runs(:p0) WHERE op = 'u' ORDER BY first_position LIMIT 1;

-- changes_since's rows, rebuilt from the runs: each entry at first_position + its
-- index, its delta built as 0.3.0's SQL built it (livesync._delta, kept here as the
-- reference changes_since is held to).
CREATE FUNCTION public.reference_delta(op "char", old jsonb, new jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(
        CASE op
            WHEN 'i' THEN (SELECT jsonb_object_agg(k, jsonb_build_object('new', v)) FROM jsonb_each(new) AS e(k, v))
            WHEN 'd' THEN (SELECT jsonb_object_agg(k, jsonb_build_object('old', v)) FROM jsonb_each(old) AS e(k, v))
            WHEN 'u' THEN (SELECT jsonb_object_agg(k, jsonb_build_object('old', old -> k, 'new', v)) FROM jsonb_each(new) AS e(k, v))
            WHEN 's' THEN jsonb_build_object('columns', jsonb_build_object('old', old -> 'columns', 'new', new -> 'columns'))
        END,
        '{}'::jsonb)
$$;
-- One page as text, every column, from changes_since or from change_runs.
CREATE FUNCTION public.page_read(after bigint, max_changes int) RETURNS text
LANGUAGE sql AS $$
    SELECT string_agg(format('%s %s %s %s %s %s %s %s %s %s %s', position, relation, op, key, delta, version,
                             actor, tx, committed_at, client_id, mutation_id), E'\n' ORDER BY position)
    FROM livesync.changes_since(after, max_changes)
$$;
CREATE FUNCTION public.page_from_runs(after bigint, max_changes int) RETURNS text
LANGUAGE sql AS $$
    SELECT string_agg(format('%s %s %s %s %s %s %s %s %s %s %s', r.first_position + e.n - 1, r.relation::regclass,
                             CASE r.op WHEN 'i' THEN 'insert' WHEN 'u' THEN 'update' WHEN 'd' THEN 'delete'
                                       WHEN 't' THEN 'truncate' WHEN 's' THEN 'schema' END,
                             nullif(e.change -> 0, 'null'), public.reference_delta(r.op, e.change -> 1, e.change -> 2),
                             (e.change ->> 3)::bigint, r.actor, r.tx, r.committed_at, r.client_id, r.mutation_id),
                      E'\n' ORDER BY r.first_position + e.n)
    FROM livesync.change_runs(after, max_changes) AS r
    CROSS JOIN LATERAL jsonb_array_elements(r.entries) WITH ORDINALITY AS e(change, n)
$$;
-- The same page, with pages of 1 change (a transaction larger than the page comes
-- back whole), 5, 1,000 and 10,000, from every position after the 2,500-change
-- transaction and from its start; from inside it (where every page size returns the
-- rest of it) at the ends of its runs and in between.
SELECT count(*) AS pages_compared,
       count(*) FILTER (WHERE page_read(after, size) IS DISTINCT FROM page_from_runs(after, size)) AS pages_that_differ
FROM generate_series(:p0, livesync.current_position()) AS after, unnest(ARRAY[1, 5, 1000, 10000]) AS size
WHERE after - :p0 >= 2499 OR after = :p0
   OR (after - :p0 IN (1, 2, 500, 999, 1000, 1001, 1999, 2000, 2001, 2498) AND size = 1);

-- A position inside a run: the run comes back cut, every entry after the position.
SELECT first_position - :p0 AS first, tx_first_position - :p0 AS tx_first, tx_last_position - :p0 AS tx_last,
       jsonb_array_length(entries) AS changes, entries #>> '{0,0,id}' AS first_key
FROM livesync.change_runs(:p0 + 1500) ORDER BY first_position;
-- max_changes cuts between transactions: the 2,500 changes do not fit in 2,000, the
-- ten updates after them do not fit in what is left of 2,501
SELECT count(*) AS runs, min(tx_first_position) - :p0 AS tx_first, max(tx_last_position) - :p0 AS tx_last
FROM livesync.change_runs(:p0, 2000);
SELECT count(*) AS runs, max(tx_last_position) - :p0 AS tx_last FROM livesync.change_runs(:p0, 2501);
SELECT count(*) AS runs, max(tx_last_position) - :p0 AS tx_last FROM livesync.change_runs(:p0, 2510);

-- Paging by tx_last_position, as a reader does, reads every change once, in order.
WITH RECURSIVE pages(after, page, changes) AS (
    SELECT :p0::bigint, 0, 0::bigint
    UNION ALL
    SELECT (SELECT max(tx_last_position) FROM livesync.change_runs(after, 3)), page + 1,
           (SELECT sum(jsonb_array_length(entries)) FROM livesync.change_runs(after, 3))
    FROM pages WHERE after < livesync.current_position()
)
SELECT count(*) - 1 AS pages, sum(changes) AS changes,
       sum(changes) = (SELECT count(*) FROM livesync.changes_since(:p0, 100000)) AS every_change_once
FROM pages;
SELECT count(*) AS rows_read_from_the_newest FROM livesync.change_runs(livesync.current_position());

-- A dropped table's runs stay, without a name.
DROP TABLE gone;
SELECT first_position - :p0 AS first, schema_name, table_name, op, relation > 0 AS has_relation
FROM livesync.change_runs(:p0) WHERE table_name IS DISTINCT FROM 'stock' ORDER BY first_position;

-- A run that capture would not write (forged here by a superuser: an update whose new
-- side is not an object) is refused by changes_since (XX001) and returned as it is
-- by change_runs.
SELECT livesync.current_position() AS p1 \gset
INSERT INTO livesync.changes VALUES (pg_current_xact_id(), 1, 1, 0, 'stock', 'u', '[[{"id": 1}, null, 5, 1]]', 'forger', NULL, NULL);
INSERT INTO stock (id) VALUES (4000);  -- its commit's tick sequences both transactions
SELECT expect_error(format('SELECT * FROM livesync.changes_since(%s)', :p1));
SELECT first_position - :p1 AS first, op, entries, actor FROM livesync.change_runs(:p1) WHERE actor = 'forger';
DELETE FROM livesync.changes WHERE actor = 'forger';

-- What it refuses: LS001 for positions ahead of the log or compacted away, 22023 for
-- an empty page; a NULL argument returns no rows.
SELECT expect_error($$SELECT * FROM livesync.change_runs(0, 0)$$);
SELECT regexp_replace(expect_error(format('SELECT * FROM livesync.change_runs(%s)', livesync.current_position() + 1)), '(position|through|is) [0-9]+', '\1 N', 'g') AS error;
SELECT count(*) AS null_position_rows FROM livesync.change_runs(NULL);
SELECT livesync.compact('0 seconds') > 0 AS compacted;
SELECT regexp_replace(expect_error(format('SELECT * FROM livesync.change_runs(%s)', :p0)), '(position|through|is) [0-9]+', '\1 N', 'g') AS error;

DROP FUNCTION public.page_read(bigint, int), public.page_from_runs(bigint, int), public.reference_delta("char", jsonb, jsonb);
DROP TABLE stock;
