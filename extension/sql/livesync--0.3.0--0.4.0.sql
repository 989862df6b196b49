-- livesync 0.3.0 -> 0.4.0: a fast read path. changes_since is native code that
-- explodes the stored runs (src/log_reader.rs) instead of PL/pgSQL calling a SQL
-- function per change (same rows, same values); livesync.change_runs returns the runs
-- as they are stored, for readers that take them whole (the bridge). Both share their
-- checks (_check_read) and their choice of runs (_runs_since). livesync._delta goes:
-- nothing calls it any more. Filter columns (livesync.set_filter_columns): capture
-- logs their value with every update of the table, so readers can filter its changes
-- on them; _tracked gains filter_columns and filter_attnums (empty for every table),
-- which the tracked view shows and the DDL trigger keeps in step. Run by ALTER
-- EXTENSION livesync UPDATE; the log is untouched.

DROP FUNCTION livesync._delta("char", jsonb, jsonb);

CREATE FUNCTION livesync._check_read(function_name text, after bigint, max_changes int) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    kept_from bigint;
    newest    bigint;
BEGIN
    PERFORM livesync._require_reader(function_name);
    -- With livesync preloaded, make sure this database's sequencer worker runs: after
    -- a server restart the first reader starts it, not only the first writer.
    PERFORM livesync._ensure_sequencer();
    IF max_changes < 1 THEN
        RAISE EXCEPTION 'max_changes must be at least 1, got %', max_changes
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- (newest as current_position() has it, read here in the same statement)
    SELECT r.horizon, greatest((SELECT max(b.last_position) FROM livesync.batches b), r.horizon)
    INTO kept_from, newest
    FROM livesync._retention r;
    IF after < kept_from THEN
        RAISE EXCEPTION 'position % is older than the retained change log (compacted through %)', after, kept_from
            USING ERRCODE = 'LS001',
                  HINT = 'Resync: load a fresh snapshot of the rows and continue from livesync.current_position().';
    END IF;
    IF after > newest THEN
        RAISE EXCEPTION 'position % is ahead of the change log (newest is %)', after, newest
            USING ERRCODE = 'LS001',
                  HINT = 'The log was reset or restored from a backup: resync from livesync.current_position().';
    END IF;
END
$$;

CREATE FUNCTION livesync._runs_since(after bigint, max_changes int)
RETURNS TABLE (
    first_position    bigint,
    tx_first_position bigint,
    tx_last_position  bigint,
    relation          regclass,
    op                "char",
    entries           jsonb,
    actor             text,
    tx                xid8,
    committed_at      timestamptz,
    client_id         text,
    mutation_id       bigint
)
LANGUAGE plpgsql STABLE STRICT SET jit = off SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY
    WITH txs AS (
        -- The transactions of the batches that hold the next max_changes positions
        -- (through the first batch that reaches after + max_changes: every batch
        -- holds at least one position), each with its block of positions (computed
        -- per batch: a subscript of a batch's array per transaction would detoast it
        -- each time, and the arrays would ride along into the sort below).
        SELECT u.tx, u.first_position, u.last_position, b.committed_at
        FROM livesync.batches b
        CROSS JOIN LATERAL (
            SELECT t.tx, t.first AS first_position,
                   coalesce(lead(t.first) OVER (ORDER BY t.i) - 1, b.last_position) AS last_position
            FROM unnest(b.txs, b.firsts) WITH ORDINALITY AS t(tx, first, i)
        ) AS u
        WHERE b.last_position > after
          AND b.last_position <= coalesce((SELECT min(e.last_position) FROM livesync.batches e
                                           WHERE e.last_position >= after + max_changes),
                                          9223372036854775807)
    ), running AS (
        -- Whole transactions in position order, as many as fit in max_changes; the
        -- first one always comes back whole however large it is. (A transaction's
        -- block fits in int4, as its ordinals do; int4 sums add up in int8, bigint
        -- sums in numeric.)
        SELECT t.*,
               sum((t.last_position - greatest(t.first_position, after + 1) + 1)::int4)
                   OVER (ORDER BY t.last_position) AS total
        FROM txs t
        WHERE t.last_position > after
    ), chosen AS (
        SELECT r.* FROM running r
        WHERE r.total <= max_changes
           OR r.first_position = (SELECT min(f.first_position) FROM running f)
    )
    SELECT greatest(c.first, after + 1),
           t.first_position,
           t.last_position,
           c.relation,
           c.op,
           CASE WHEN c.first > after THEN c.entries
                ELSE jsonb_path_query_array(c.entries, '$[$n to last]',
                                            jsonb_build_object('n', after + 1 - c.first))
           END,
           c.actor,
           c.tx,
           t.committed_at,
           c.client_id,
           c.mutation_id
    FROM chosen t
    -- A transaction's runs by the log's key. The ORDER BY keeps this a nested loop of
    -- index probes: a join the planner may turn into a scan of the whole log.
    CROSS JOIN LATERAL (
        SELECT t.first_position + l.ordinal - 1 AS first, l.*
        FROM livesync.changes l
        WHERE l.tx = t.tx AND l.op <> 'c' AND t.first_position + l.ordinal + l.count - 2 > after
        ORDER BY l.ordinal
    ) AS c
    ORDER BY 1;
END
$$;

CREATE OR REPLACE FUNCTION livesync.changes_since(after bigint, max_changes int DEFAULT 1000)
RETURNS TABLE (
    "position"   bigint,
    relation     regclass,
    op           text,
    key          jsonb,
    delta        jsonb,
    version      bigint,
    actor        text,
    tx           xid8,
    committed_at timestamptz,
    client_id    text,
    mutation_id  bigint
)
LANGUAGE c STABLE STRICT AS 'MODULE_PATHNAME', 'livesync_changes_since';

CREATE FUNCTION livesync.change_runs(after bigint, max_changes int DEFAULT 10000)
RETURNS TABLE (
    first_position    bigint,
    tx_first_position bigint,
    tx_last_position  bigint,
    relation          oid,
    schema_name       text,
    table_name        text,
    op                "char",
    entries           jsonb,
    actor             text,
    tx                bigint,
    committed_at      timestamptz,
    client_id         text,
    mutation_id       bigint
)
LANGUAGE plpgsql STABLE STRICT SET jit = off SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM livesync._check_read('livesync.change_runs', after, max_changes);
    RETURN QUERY
    SELECT r.first_position, r.tx_first_position, r.tx_last_position, r.relation::oid,
           n.nspname::text, cl.relname::text, r.op, r.entries, r.actor, r.tx::text::bigint,
           r.committed_at, r.client_id, r.mutation_id
    FROM livesync._runs_since(after, max_changes) AS r
    LEFT JOIN pg_class cl ON cl.oid = r.relation
    LEFT JOIN pg_namespace n ON n.oid = cl.relnamespace
    ORDER BY r.first_position;
END
$$;
COMMENT ON FUNCTION livesync.change_runs(bigint, int) IS
    'The stored runs of changes committed after a position ([key, old, new, version] arrays, updates of tables with filter columns a fifth element), whole transactions only. SQLSTATE LS001 means resync.';

-- Filter columns (tracking.sql).
ALTER TABLE livesync._tracked
    ADD COLUMN filter_columns text[] NOT NULL DEFAULT '{}',
    ADD COLUMN filter_attnums int2[] NOT NULL DEFAULT '{}';

CREATE OR REPLACE VIEW livesync.tracked WITH (security_barrier) AS
SELECT t.relation,
       ARRAY(SELECT a.attname::text
             FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = t.relation AND i.indisprimary
             ORDER BY k.ord) AS key_columns,
       t.tracked_at,
       t.filter_columns
FROM livesync._tracked t
-- Like conflicts and policies: a role sees the tables it may read.
WHERE has_table_privilege(t.relation, 'SELECT');
COMMENT ON VIEW livesync.tracked IS 'Tables whose changes livesync captures, with the columns that form each change''s key and the filter columns whose value every update records (those the current role may SELECT).';

CREATE FUNCTION livesync._set_filter_columns(rel regclass, columns text[]) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    wanted  record;
    names   text[] := '{}';
    attnums int2[] := '{}';
BEGIN
    IF rel IS NULL OR columns IS NULL THEN
        RAISE EXCEPTION 'set_filter_columns needs a table and an array of column names' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF array_ndims(columns) > 1 OR array_position(columns, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'set_filter_columns needs a one-dimensional array of column names without NULLs, got %', columns
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(columns) > 32 THEN
        RAISE EXCEPTION 'a table can have at most 32 filter columns, got %', cardinality(columns)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Declare the columns subscriptions filter on, not every column: each one''s value is logged with every update.';
    END IF;
    -- Waits for the transactions writing the table (as CREATE TRIGGER does), and makes
    -- the next writers wait for this one: every update committed after it carries
    -- the new columns, none before it.
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', rel);
    IF NOT EXISTS (SELECT 1 FROM livesync._tracked WHERE relation = rel) THEN
        RAISE EXCEPTION 'table % is not tracked', rel USING ERRCODE = 'LS002';
    END IF;
    FOR wanted IN
        SELECT c.name, a.attnum
        FROM unnest(columns) WITH ORDINALITY AS c(name, ord)
        LEFT JOIN pg_attribute a ON a.attrelid = rel AND a.attname = c.name AND a.attnum > 0 AND NOT a.attisdropped
                                AND a.attname NOT IN ('_livesync_version', '_livesync_clocks')
        ORDER BY c.ord
    LOOP
        IF wanted.attnum IS NULL AND wanted.name IN ('_livesync_version', '_livesync_clocks') THEN
            RAISE EXCEPTION 'column "%" of % is livesync''s own', wanted.name, rel
                USING ERRCODE = 'undefined_column', HINT = 'livesync''s own columns are never logged.';
        ELSIF wanted.attnum IS NULL THEN
            RAISE EXCEPTION 'column "%" of % does not exist', wanted.name, rel USING ERRCODE = 'undefined_column';
        END IF;
        IF wanted.attnum = ANY (attnums) THEN
            RAISE EXCEPTION 'column "%" is listed twice', wanted.name USING ERRCODE = 'invalid_parameter_value';
        END IF;
        names := names || wanted.name;
        attnums := attnums || wanted.attnum;
    END LOOP;
    UPDATE livesync._tracked SET filter_columns = names, filter_attnums = attnums WHERE relation = rel;
    -- Every backend's capture reloads the table's registration (at commit).
    PERFORM livesync._forget_write_settings(rel);
END
$$;

CREATE FUNCTION livesync.set_filter_columns(rel regclass, columns text[]) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'livesync_set_filter_columns';
COMMENT ON FUNCTION livesync.set_filter_columns(regclass, text[]) IS
    'Declares the columns whose value every update of the table logs, changed or not, so readers can filter its changes on them; an empty array clears them.';

CREATE OR REPLACE FUNCTION livesync._on_ddl_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    broken record;
    stale  record;
    new_shape jsonb;
    kept_names   text[];
    kept_attnums int2[];
    settings_changed bool;
BEGIN
    FOR broken IN
        SELECT t.relation, t.shape, t.filter_columns, t.filter_attnums,
               NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = t.relation AND i.indisprimary) AS no_key,
               NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = t.relation
                           AND a.attname = '_livesync_version' AND NOT a.attisdropped
                           AND a.atttypid = 'int8'::regtype) AS no_version,
               NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = t.relation
                           AND a.attname = '_livesync_clocks' AND NOT a.attisdropped
                           AND a.atttypid = 'jsonb'::regtype) AS no_clocks
        -- Every tracked table, not only those the command names: DROP TYPE ...
        -- CASCADE drops columns of tables it never names, and ALTER TABLE on an
        -- inheritance parent changes its children's columns. DDL is rare; a
        -- catalog look per tracked table is cheap.
        FROM livesync._tracked t
    LOOP
        IF broken.no_key THEN
            RAISE EXCEPTION 'tracked table % must keep a primary key', broken.relation
                USING ERRCODE = 'LS005',
                      HINT = format('Call livesync.untrack(%L) first, or add the new primary key in the same statement.', broken.relation);
        ELSIF broken.no_version OR broken.no_clocks THEN
            RAISE EXCEPTION 'column % of tracked table % is maintained by livesync',
                  CASE WHEN broken.no_version THEN '_livesync_version' ELSE '_livesync_clocks' END, broken.relation
                USING ERRCODE = 'LS005',
                      HINT = format('Call livesync.untrack(%L) first.', broken.relation);
        END IF;
        settings_changed := false;
        -- A policy set for the column's old type (a union on what is now text, a sum
        -- on what is now a string) would merge garbage: back to the table default.
        FOR stale IN
            SELECT p.attnum, p.policy, a.attname, a.atttypid, a.attisdropped
            FROM livesync._policies p
            JOIN pg_attribute a ON a.attrelid = p.relation AND a.attnum = p.attnum
            WHERE p.relation = broken.relation
              AND (a.attisdropped OR NOT livesync._policy_fits(p.policy, a.atttypid))
        LOOP
            settings_changed := true;
            DELETE FROM livesync._policies WHERE relation = broken.relation AND attnum = stale.attnum;
            IF NOT stale.attisdropped THEN
                RAISE NOTICE 'policy % of column "%" of % does not fit its new type %: the column now uses the table''s default policy',
                    stale.policy, stale.attname, broken.relation, format_type(stale.atttypid, NULL);
            END IF;
        END LOOP;
        -- Filter columns: one whose name is still a column stays (a retyped one
        -- too); one whose name is gone follows its attribute number when that column
        -- is still there (renamed), else leaves the list (dropped). By name first: a
        -- restored dump numbers the columns afresh, names it keeps.
        IF cardinality(broken.filter_columns) > 0 THEN
            SELECT coalesce(array_agg(c.attname::text ORDER BY c.ord), '{}'), coalesce(array_agg(c.attnum ORDER BY c.ord), '{}')
            INTO kept_names, kept_attnums
            FROM (SELECT f.ord, a.attname, a.attnum, row_number() OVER (PARTITION BY a.attnum ORDER BY f.ord) AS nth
                  FROM unnest(broken.filter_columns, broken.filter_attnums) WITH ORDINALITY AS f(name, attnum, ord)
                  CROSS JOIN LATERAL (
                      SELECT a.attname, a.attnum FROM pg_attribute a
                      WHERE a.attrelid = broken.relation AND a.attnum > 0 AND NOT a.attisdropped
                        AND a.attname NOT IN ('_livesync_version', '_livesync_clocks')
                        AND (a.attname = f.name OR a.attnum = f.attnum)
                      ORDER BY a.attname = f.name DESC
                      LIMIT 1) AS a) AS c
            WHERE c.nth = 1;
            IF kept_names IS DISTINCT FROM broken.filter_columns OR kept_attnums IS DISTINCT FROM broken.filter_attnums THEN
                UPDATE livesync._tracked SET filter_columns = kept_names, filter_attnums = kept_attnums
                WHERE relation = broken.relation;
                settings_changed := true;
            END IF;
        END IF;
        new_shape := livesync._shape(broken.relation);
        IF new_shape IS DISTINCT FROM broken.shape THEN
            PERFORM livesync._log_schema_change(broken.relation, broken.shape, new_shape);
            UPDATE livesync._tracked SET shape = new_shape WHERE relation = broken.relation;
            settings_changed := true;
        END IF;
        IF settings_changed THEN
            PERFORM livesync._forget_write_settings(broken.relation);
        END IF;
    END LOOP;
END
$$;

-- The grants of privileges.sql, as they stand in 0.4.0 (the new functions are
-- executable by PUBLIC when created: closed, then opened as in a fresh install).
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA livesync FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    livesync.track(regclass),
    livesync.untrack(regclass),
    livesync.row_version(regclass, jsonb),
    livesync.write(regclass, text, jsonb, jsonb, bigint, jsonb, text, bigint, text),
    livesync.write_batch(jsonb, boolean),
    livesync.resolve_conflict(bigint, text, jsonb),
    livesync.set_policy(regclass, text, text),
    livesync.set_policy(regclass, text),
    livesync.set_conflict_rules(regclass, text, text),
    livesync.set_filter_columns(regclass, text[]),
    livesync.compact(interval),
    -- Open to all so that a role outside livesync_reader is told what to grant.
    livesync.current_position(),
    livesync.changes_since(bigint, int),
    livesync.change_runs(bigint, int)
TO PUBLIC;
GRANT EXECUTE ON FUNCTION
    livesync._write_json(jsonb),
    livesync._resolve_conflict(bigint, text, jsonb),
    livesync._checked(jsonb),
    livesync._require_reader(text),
    livesync._check_read(text, bigint, int),
    livesync._row_visible(regclass, jsonb)
TO PUBLIC;
GRANT EXECUTE ON FUNCTION livesync._capture(), livesync._stamp_version(), livesync._track_table(regclass),
    livesync._untrack_table(regclass) TO PUBLIC;
GRANT EXECUTE ON FUNCTION livesync._runs_since(bigint, int), livesync._ensure_sequencer() TO livesync_reader;
GRANT SELECT (relation, filter_columns) ON livesync._tracked TO livesync_reader;
