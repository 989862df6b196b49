-- livesync 0.1.0 -> 0.2.0: commit order inside a tick (a commit sequence on each
-- transaction's last log row), schema changes in the log, column policies
-- re-checked after type changes, capture under session_replication_role = replica,
-- and the write path's new limits and errors. Run by ALTER EXTENSION livesync UPDATE.

-- livesync.changes gains commit_seq as its 4th column: capture and ticks address
-- the log's columns by position, so the table is rebuilt. Rows already there keep
-- commit_seq 0 (what a tick sorts first; they are all committed before the upgrade).
-- Indexes added to the log by hand are not carried over.
ALTER TABLE livesync.changes RENAME TO _changes_0_1_0;
ALTER INDEX livesync.changes_pkey RENAME TO _changes_0_1_0_pkey;


CREATE TABLE livesync.changes (
    tx       xid8     NOT NULL,
    ordinal  int4     NOT NULL, -- the first change's; the run holds ordinal .. ordinal + count - 1
    count    int4     NOT NULL, -- = jsonb_array_length(entries), kept so ticks never read entries
    -- Set on the transaction's last row just before it commits (0 on the others):
    -- the WAL insert position then. A transaction that waited for another's lock,
    -- or began after another committed, has a larger one; ticks order the
    -- transactions they sequence by it (see sequencer.rs).
    commit_seq int8   NOT NULL,
    relation regclass NOT NULL,
    op       "char"   NOT NULL, -- i(nsert), u(pdate), d(elete), t(runcate), s(chema), c(ommit marker: no changes)
    -- One [key, old, new, version] array per change, in ordinal order. An insert
    -- has no old (JSON null), a delete no new, an update holds only the changed
    -- columns on both sides; a truncate is all nulls; a schema change has no key
    -- and {"columns": [{name, type}, ...]} before and after.
    entries  jsonb    NOT NULL,
    actor    text     NOT NULL,
    -- Set when the changes were made by livesync.write for a client mutation, so
    -- the client can recognise its own echo.
    client_id   text,
    mutation_id int8,
    PRIMARY KEY (tx, ordinal)
);
COMMENT ON TABLE livesync.changes IS
    'Captured row changes, in runs; read them with livesync.changes_since(), which gives each change its position.';


INSERT INTO livesync.changes (tx, ordinal, count, commit_seq, relation, op, entries, actor, client_id, mutation_id)
SELECT tx, ordinal, count, 0, relation, op, entries, actor, client_id, mutation_id
FROM livesync._changes_0_1_0;
DROP TABLE livesync._changes_0_1_0;
DO $$
BEGIN
    ALTER TABLE livesync.changes ALTER COLUMN entries SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    NULL; -- a server built without lz4 keeps the default compression
END
$$;


CREATE OR REPLACE FUNCTION livesync._delta(op "char", old jsonb, new jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(
        CASE op
            WHEN 'i' THEN (SELECT jsonb_object_agg(k, jsonb_build_object('new', v)) FROM jsonb_each(new) AS e(k, v))
            WHEN 'd' THEN (SELECT jsonb_object_agg(k, jsonb_build_object('old', v)) FROM jsonb_each(old) AS e(k, v))
            WHEN 'u' THEN (SELECT jsonb_object_agg(k, jsonb_build_object('old', old -> k, 'new', v)) FROM jsonb_each(new) AS e(k, v))
            WHEN 's' THEN jsonb_build_object('columns', jsonb_build_object('old', old -> 'columns', 'new', new -> 'columns'))
        END,
        '{}'::jsonb)
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
-- STABLE: every statement below sees the same snapshot, so the horizon check and
-- the read cannot straddle a concurrent compaction. No JIT: the planner's guess for
-- unnesting runs (100 changes per log row) made the read look expensive enough to
-- compile, which took half a second for a millisecond's work.
LANGUAGE plpgsql STABLE STRICT SET jit = off AS $$
DECLARE
    kept_from bigint;
    newest    bigint;
BEGIN
    -- With livesync preloaded, make sure this database's sequencer worker runs: after
    -- a server restart the first reader starts it, not only the first writer.
    PERFORM livesync._ensure_sequencer();
    IF max_changes < 1 THEN
        RAISE EXCEPTION 'max_changes must be at least 1, got %', max_changes
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT horizon INTO kept_from FROM livesync._retention;
    IF after < kept_from THEN
        RAISE EXCEPTION 'position % is older than the retained change log (compacted through %)', after, kept_from
            USING ERRCODE = 'LS001',
                  HINT = 'Resync: load a fresh snapshot of the rows and continue from livesync.current_position().';
    END IF;
    newest := livesync.current_position();
    IF after > newest THEN
        RAISE EXCEPTION 'position % is ahead of the change log (newest is %)', after, newest
            USING ERRCODE = 'LS001',
                  HINT = 'The log was reset or restored from a backup: resync from livesync.current_position().';
    END IF;

    RETURN QUERY
    WITH batches AS (
        -- The next batches, up to the one that reaches max_changes (each batch holds
        -- at least one change, so max_changes batches are always enough).
        SELECT k.*,
               sum(k.last_position - greatest(k.first_position, after + 1) + 1)
                   OVER (ORDER BY k.last_position) AS upto
        FROM (SELECT * FROM livesync.batches k
              WHERE k.last_position > after
              ORDER BY k.last_position
              LIMIT max_changes) AS k
    ), txs AS (
        -- Their transactions, each with its block of positions.
        SELECT u.tx, u.first AS first_position,
               coalesce(b.firsts[u.i + 1] - 1, b.last_position) AS last_position,
               b.committed_at
        FROM batches b
        CROSS JOIN LATERAL unnest(b.txs, b.firsts) WITH ORDINALITY AS u(tx, first, i)
        WHERE b.upto - (b.last_position - greatest(b.first_position, after + 1) + 1) < max_changes
    ), running AS (
        -- Whole transactions in position order, as many as fit in max_changes; the
        -- first one always comes back whole however large it is.
        SELECT t.*,
               sum(t.last_position - greatest(t.first_position, after + 1) + 1)
                   OVER (ORDER BY t.last_position) AS total
        FROM txs t
        WHERE t.last_position > after
    ), chosen AS (
        SELECT r.* FROM running r
        WHERE r.total <= max_changes
           OR r.first_position = (SELECT min(first_position) FROM running)
    )
    SELECT t.first_position + c.ordinal + e.n - 2,
           c.relation,
           CASE c.op WHEN 'i' THEN 'insert' WHEN 'u' THEN 'update' WHEN 'd' THEN 'delete' WHEN 't' THEN 'truncate' WHEN 's' THEN 'schema' END,
           nullif(e.change -> 0, 'null'),
           livesync._delta(c.op, e.change -> 1, e.change -> 2),
           (e.change ->> 3)::bigint,
           c.actor,
           c.tx,
           t.committed_at,
           c.client_id,
           c.mutation_id
    FROM chosen t
    JOIN livesync.changes c ON c.tx = t.tx
    CROSS JOIN LATERAL jsonb_array_elements(c.entries) WITH ORDINALITY AS e(change, n)
    WHERE t.first_position + c.ordinal + e.n - 2 > after
    ORDER BY 1;
END
$$;
COMMENT ON FUNCTION livesync.changes_since(bigint, int) IS
    'Changes committed after a position, in commit order, whole transactions only. SQLSTATE LS001 means resync.';

-- Tracked tables remember their columns as last logged.
ALTER TABLE livesync._tracked ADD COLUMN shape jsonb NOT NULL DEFAULT '[]';

-- A table's columns as readers see them: name and type, in column order, without
-- livesync's own. A schema change in the log carries this list before and after.
CREATE FUNCTION livesync._shape(rel regclass) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('name', a.attname, 'type', format_type(a.atttypid, a.atttypmod))
                              ORDER BY a.attnum), '[]')
    FROM pg_attribute a
    WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
      AND a.attname NOT IN ('_livesync_version', '_livesync_clocks')
$$;

UPDATE livesync._tracked SET shape = livesync._shape(relation);

CREATE OR REPLACE FUNCTION livesync.track(rel regclass) RETURNS void
LANGUAGE plpgsql VOLATILE STRICT AS $$
DECLARE
    kind        "char";
    persistence "char";
    partition   bool;
    typed       bool;
BEGIN
    SELECT relkind, relpersistence, relispartition, reloftype <> 0 INTO kind, persistence, partition, typed
    FROM pg_class WHERE oid = rel;
    IF kind IS DISTINCT FROM 'r' THEN
        RAISE EXCEPTION '% is not an ordinary table', rel
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'livesync tracks ordinary tables; views, partitioned tables and foreign tables cannot be tracked yet.';
    END IF;
    -- A temporary table vanishes with its session, leaving livesync's records of it
    -- behind; and no other session (the bridge) could read it anyway.
    IF persistence = 't' THEN
        RAISE EXCEPTION '% is a temporary table', rel
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'livesync tracks permanent (or unlogged) tables.';
    END IF;
    IF typed THEN
        RAISE EXCEPTION '% is a typed table (CREATE TABLE ... OF type)', rel
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'livesync adds columns to the tables it tracks, which a typed table cannot have.';
    END IF;
    IF partition THEN
        RAISE EXCEPTION '% is a partition', rel
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'Partitioned tables cannot be tracked yet; neither can their partitions one by one.';
    END IF;
    IF rel::oid IN (SELECT objid FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
                    WHERE e.extname = 'livesync' AND d.classid = 'pg_class'::regclass) THEN
        RAISE EXCEPTION '% belongs to livesync and cannot be tracked', rel USING ERRCODE = 'wrong_object_type';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = rel AND indisprimary) THEN
        RAISE EXCEPTION 'table % has no primary key', rel
            USING ERRCODE = 'LS003',
                  HINT = format('Changes are keyed by primary key: add one (ALTER TABLE %s ADD PRIMARY KEY (...)) and call livesync.track again.', rel);
    END IF;
    IF EXISTS (SELECT 1 FROM livesync._tracked WHERE relation = rel) THEN
        RAISE NOTICE 'table % is already tracked', rel;
        RETURN;
    END IF;

    -- A constant default adds the column without rewriting the table: rows that
    -- have not been written since tracking began read as version 0.
    EXECUTE format('ALTER TABLE %s ADD COLUMN _livesync_version bigint NOT NULL DEFAULT 0', rel);
    EXECUTE format('COMMENT ON COLUMN %s._livesync_version IS %L', rel,
                   'Row version maintained by livesync: changes on every write.');
    -- Per-column write clocks for last-writer-wins merges (livesync.write); NULL
    -- until the row is first written through livesync.write.
    EXECUTE format('ALTER TABLE %s ADD COLUMN _livesync_clocks jsonb', rel);
    EXECUTE format('COMMENT ON COLUMN %s._livesync_clocks IS %L', rel,
                   'Per-column write clocks kept by livesync.write for last-writer-wins merges.');
    EXECUTE format('CREATE TRIGGER livesync_version BEFORE INSERT OR UPDATE ON %s
                    FOR EACH ROW EXECUTE FUNCTION livesync._stamp_version()', rel);
    EXECUTE format('CREATE TRIGGER livesync_capture_insert AFTER INSERT ON %s
                    REFERENCING NEW TABLE AS livesync_new
                    FOR EACH STATEMENT EXECUTE FUNCTION livesync._capture()', rel);
    EXECUTE format('CREATE TRIGGER livesync_capture_update AFTER UPDATE ON %s
                    REFERENCING OLD TABLE AS livesync_old NEW TABLE AS livesync_new
                    FOR EACH STATEMENT EXECUTE FUNCTION livesync._capture()', rel);
    EXECUTE format('CREATE TRIGGER livesync_capture_delete AFTER DELETE ON %s
                    REFERENCING OLD TABLE AS livesync_old
                    FOR EACH STATEMENT EXECUTE FUNCTION livesync._capture()', rel);
    EXECUTE format('CREATE TRIGGER livesync_capture_truncate AFTER TRUNCATE ON %s
                    FOR EACH STATEMENT EXECUTE FUNCTION livesync._capture()', rel);
    -- ALWAYS: also under session_replication_role = replica, which logical
    -- replication's apply workers (and some bulk loaders) run with; an ordinary
    -- trigger would let those changes bypass the log and the row versions.
    EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER livesync_version,
                                   ENABLE ALWAYS TRIGGER livesync_capture_insert,
                                   ENABLE ALWAYS TRIGGER livesync_capture_update,
                                   ENABLE ALWAYS TRIGGER livesync_capture_delete,
                                   ENABLE ALWAYS TRIGGER livesync_capture_truncate', rel);
    INSERT INTO livesync._tracked (relation, shape) VALUES (rel, livesync._shape(rel));
END
$$;
COMMENT ON FUNCTION livesync.track(regclass) IS
    'Starts capturing every change to a table with a primary key; adds its _livesync_version and _livesync_clocks columns.';

CREATE FUNCTION livesync._log_schema_change(rel oid, before jsonb, after jsonb) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', '_log_schema_change_wrapper';
REVOKE EXECUTE ON FUNCTION livesync._log_schema_change(oid, jsonb, jsonb) FROM PUBLIC;

-- Whether a column policy can merge values of a type (a domain counts as its base
-- type). Checked by set_policy, and again after DDL changes a column's type.
CREATE FUNCTION livesync._policy_fits(policy text, type_oid oid) RETURNS bool
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE policy
        -- sum: the types whose + is exact arithmetic on the same type (not money
        -- or oid, whose category is also numeric).
        WHEN 'sum' THEN b.base IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype,
                                   'numeric'::regtype, 'float4'::regtype, 'float8'::regtype)
        WHEN 'max' THEN b.category IN ('N', 'D', 'T', 'S') AND b.base <> 'oid'::regtype
        WHEN 'min' THEN b.category IN ('N', 'D', 'T', 'S') AND b.base <> 'oid'::regtype
        WHEN 'union' THEN b.category = 'A' OR b.base IN ('json'::regtype, 'jsonb'::regtype)
        WHEN 'append' THEN b.category = 'A' OR b.base IN ('json'::regtype, 'jsonb'::regtype)
        WHEN 'concat' THEN b.category = 'S'
        ELSE true
    END
    FROM (SELECT coalesce(bt.typcategory, t.typcategory) AS category,
                 coalesce(nullif(t.typbasetype, 0), t.oid)::regtype AS base
          FROM pg_type t LEFT JOIN pg_type bt ON bt.oid = t.typbasetype
          WHERE t.oid = type_oid) AS b
$$;

-- After DDL on tracked tables: refuse what would break capture, reset column
-- policies that no longer fit their column's type, and log a change of columns.
-- SECURITY DEFINER: it writes livesync's own tables, which the role running the DDL
-- (the table's owner) has no privileges on.
CREATE OR REPLACE FUNCTION livesync._on_ddl_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    broken record;
    stale  record;
    new_shape jsonb;
    settings_changed bool;
BEGIN
    FOR broken IN
        SELECT t.relation, t.shape,
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

DROP EVENT TRIGGER livesync_ddl_end;
CREATE EVENT TRIGGER livesync_ddl_end ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE', 'ALTER INDEX', 'DROP INDEX', 'ALTER TYPE', 'DROP TYPE',
                 'ALTER DOMAIN', 'DROP DOMAIN', 'DROP FUNCTION')
    EXECUTE FUNCTION livesync._on_ddl_end();

CREATE OR REPLACE FUNCTION livesync.set_policy(rel regclass, column_name text, policy text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    col record;
BEGIN
    IF rel IS NULL OR column_name IS NULL OR policy IS NULL THEN
        RAISE EXCEPTION 'set_policy needs a table, a column and a policy' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM livesync._tracked WHERE relation = rel) THEN
        RAISE EXCEPTION 'table % is not tracked', rel USING ERRCODE = 'LS002';
    END IF;
    SELECT a.attnum, a.atttypid, coalesce(bt.typcategory, t.typcategory) AS category,
           coalesce(nullif(t.typbasetype, 0), t.oid) AS basetype,
           EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = rel AND i.indisprimary
                   AND a.attnum = ANY (i.indkey)) AS is_key
    INTO col
    FROM pg_attribute a
    JOIN pg_type t ON t.oid = a.atttypid
    LEFT JOIN pg_type bt ON bt.oid = t.typbasetype
    WHERE a.attrelid = rel AND a.attname = column_name AND a.attnum > 0 AND NOT a.attisdropped
      AND a.attname NOT IN ('_livesync_version', '_livesync_clocks');
    IF NOT FOUND THEN
        RAISE EXCEPTION 'column "%" of % does not exist', column_name, rel USING ERRCODE = 'undefined_column';
    END IF;
    IF col.is_key THEN
        RAISE EXCEPTION 'column "%" is part of the primary key of %; key columns are never merged', column_name, rel
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF policy NOT IN ('lww', 'server_wins', 'client_wins', 'max', 'min', 'sum', 'union', 'append', 'concat', 'manual') THEN
        RAISE EXCEPTION 'unknown policy "%"', policy
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Policies: lww, server_wins, client_wins, max, min, sum, union, append, concat, manual.';
    END IF;
    IF NOT livesync._policy_fits(policy, col.atttypid) THEN
        RAISE EXCEPTION 'policy % does not fit column "%" of type %', policy, column_name, format_type(col.atttypid, NULL)
            USING ERRCODE = 'datatype_mismatch',
                  HINT = 'sum: integer, numeric and floating-point types; max and min: numbers, text, dates and times; union and append: arrays or json arrays; concat: text.';
    END IF;
    INSERT INTO livesync._policies (relation, attnum, policy) VALUES (rel, col.attnum, policy)
    ON CONFLICT ON CONSTRAINT _policies_pkey DO UPDATE SET policy = EXCLUDED.policy;
    PERFORM livesync._forget_write_settings(rel);
END
$$;
COMMENT ON FUNCTION livesync.set_policy(regclass, text, text) IS
    'Sets how livesync.write settles a column both a client and others changed since the client''s base.';

CREATE OR REPLACE FUNCTION livesync.write_batch(mutations jsonb, all_or_nothing boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    mutation jsonb;
    result   jsonb;
    -- Appending to an array variable is done in place (amortised O(1)); appending
    -- to a jsonb array copied it every time, which made a batch quadratic.
    results  jsonb[] := '{}';
    i        int := 0;
    size     int;
    maximum  int := coalesce(nullif(current_setting('livesync.max_batch_mutations', true), '')::int, 10000);
BEGIN
    IF jsonb_typeof(mutations) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'mutations must be a JSON array of mutation objects' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    size := jsonb_array_length(mutations);
    IF size > maximum THEN
        RAISE EXCEPTION 'a batch of % mutations is larger than livesync.max_batch_mutations (%)', size, maximum
            USING ERRCODE = 'program_limit_exceeded',
                  HINT = 'Split the batch, or raise livesync.max_batch_mutations.';
    END IF;
    IF all_or_nothing THEN
        -- One subtransaction for the whole batch: any error (raised by a mutation or
        -- a rejection) undoes everything and is reported as LS007 with the failing
        -- mutation's result.
        BEGIN
            FOR mutation IN SELECT m FROM jsonb_array_elements(mutations) AS e(m) LOOP
                result := livesync._checked(livesync._write_json(mutation));
                IF result ->> 'status' = 'rejected' THEN
                    RAISE EXCEPTION 'mutation % of the batch was rejected (%); nothing was applied', i, result ->> 'reason'
                        USING ERRCODE = 'LS007', DETAIL = result::text;
                END IF;
                results := results || result;
                i := i + 1;
            END LOOP;
        EXCEPTION WHEN OTHERS THEN
            IF SQLSTATE = 'LS007' THEN
                RAISE;
            END IF;
            result := jsonb_build_object('status', 'rejected', 'reason', 'error',
                                         'error', jsonb_build_object('sqlstate', SQLSTATE, 'message', SQLERRM));
            RAISE EXCEPTION 'mutation % of the batch failed (%: %); nothing was applied', i, SQLSTATE, SQLERRM
                USING ERRCODE = 'LS007', DETAIL = result::text;
        END;
    ELSE
        FOR mutation IN SELECT m FROM jsonb_array_elements(mutations) AS e(m) LOOP
            -- Each mutation in a subtransaction of its own: one that fails is
            -- rolled back and reported, the others stand.
            BEGIN
                result := livesync._checked(livesync._write_json(mutation));
            EXCEPTION WHEN OTHERS THEN
                result := jsonb_build_object('status', 'rejected', 'reason', 'error',
                                             'error', jsonb_build_object('sqlstate', SQLSTATE, 'message', SQLERRM));
            END;
            results := results || result;
            i := i + 1;
        END LOOP;
    END IF;
    RETURN to_jsonb(results);
END
$$;
COMMENT ON FUNCTION livesync.write_batch(jsonb, boolean) IS
    'Applies an array of mutations in order in one transaction, one result each; all_or_nothing makes any rejection abort the batch (LS007).';

CREATE OR REPLACE FUNCTION livesync.resolve_conflict(conflict_id bigint, choice text, value jsonb DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF conflict_id IS NULL OR choice IS NULL THEN
        RAISE EXCEPTION 'resolve_conflict needs a conflict id and a choice'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'choice is mine, theirs or value (with a value).';
    END IF;
    RETURN livesync._checked(livesync._resolve_conflict(conflict_id, choice, value));
END
$$;
COMMENT ON FUNCTION livesync.resolve_conflict(bigint, text, jsonb) IS
    'Settles a stored conflict: mine (the client''s value), theirs (keep the stored value) or value (the given one); a captured write.';

-- Capture fires under session_replication_role = replica too (logical
-- replication's apply workers), on the tables tracked already.
DO $$
DECLARE
    rel regclass;
BEGIN
    FOR rel IN SELECT relation FROM livesync._tracked LOOP
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER livesync_version,
                                       ENABLE ALWAYS TRIGGER livesync_capture_insert,
                                       ENABLE ALWAYS TRIGGER livesync_capture_update,
                                       ENABLE ALWAYS TRIGGER livesync_capture_delete,
                                       ENABLE ALWAYS TRIGGER livesync_capture_truncate', rel);
    END LOOP;
END
$$;
