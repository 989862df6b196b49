-- livesync 0.2.0 -> 0.3.0: the privilege model (docs/sql.md, "Who may call what").
-- Reading the log needs livesync_reader; configuration needs ownership of the table
-- and runs its body as the bootstrap superuser (src/entry.rs); compact needs the
-- extension's ownership or livesync_maintainer; writes and resolve_conflict check
-- the caller's privileges first; idempotency records remember who wrote them.
-- Run by ALTER EXTENSION livesync UPDATE.

-- Mutation records now say which role wrote them, and to which table, and are per
-- role. Records made before do not say: given back to any role's retry they would
-- hand one role another's rows, so they go. A retry in flight across the update is
-- applied again (drain clients' queues first where mutations add up: sum, append).
DELETE FROM livesync._mutations;
ALTER TABLE livesync._mutations ADD COLUMN relation regclass, ADD COLUMN written_by oid NOT NULL,
    DROP CONSTRAINT _mutations_pkey,
    ADD CONSTRAINT _mutations_pkey PRIMARY KEY (written_by, client_id, mutation_id);

CREATE FUNCTION livesync._require_reader(function_name text) RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT pg_has_role('livesync_reader', 'USAGE') THEN
        RAISE EXCEPTION 'permission denied: % needs membership in role livesync_reader', function_name
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'GRANT livesync_reader TO the role that reads the change log.';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION livesync.current_position() RETURNS bigint
LANGUAGE plpgsql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM livesync._require_reader('livesync.current_position');
    RETURN greatest(
        (SELECT max(last_position) FROM livesync.batches),
        (SELECT horizon FROM livesync._retention)
    );
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
-- STABLE: every statement below sees the same snapshot, so the horizon check and
-- the read cannot straddle a concurrent compaction. No JIT: the planner's guess for
-- unnesting runs (100 changes per log row) made the read look expensive enough to
-- compile, which took half a second for a millisecond's work.
LANGUAGE plpgsql STABLE STRICT SET jit = off SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    kept_from bigint;
    newest    bigint;
BEGIN
    PERFORM livesync._require_reader('livesync.changes_since');
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

CREATE FUNCTION livesync._compact(older_than interval) RETURNS bigint
LANGUAGE plpgsql VOLATILE STRICT SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_horizon bigint;
    removed     bigint;
BEGIN
    -- Compared through now(): '1 mon -30 days' is not < '0' but reaches past now in March.
    IF now() - older_than > now() THEN
        RAISE EXCEPTION 'older_than must not reach into the future, got %', older_than
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Idempotency records and settled conflicts go with the log they belong to: a
    -- client whose queue is older than the retained log has to resync anyway.
    DELETE FROM livesync._mutations WHERE created_at < now() - older_than;
    DELETE FROM livesync._conflicts WHERE resolved_at < now() - older_than;
    -- Cut at a position, not a time: the kept log must stay a suffix of positions
    -- even when commit timestamps are not perfectly ordered.
    SELECT max(last_position) INTO new_horizon
    FROM livesync.batches WHERE committed_at < now() - older_than;
    IF new_horizon IS NULL THEN
        RETURN 0;
    END IF;
    WITH gone AS (
        DELETE FROM livesync.batches WHERE last_position <= new_horizon RETURNING txs
    ), gone_changes AS (
        DELETE FROM livesync.changes c
        USING (SELECT unnest(gone.txs) AS tx FROM gone) AS g
        WHERE c.tx = g.tx
        RETURNING c.count
    )
    SELECT coalesce(sum(count), 0) INTO removed FROM gone_changes;
    UPDATE livesync._retention SET horizon = greatest(horizon, new_horizon);
    RETURN removed;
END
$$;

CREATE OR REPLACE FUNCTION livesync.compact(older_than interval DEFAULT '24 hours') RETURNS bigint
LANGUAGE c VOLATILE STRICT AS 'MODULE_PATHNAME', 'livesync_compact';

CREATE OR REPLACE VIEW livesync.tracked WITH (security_barrier) AS
SELECT t.relation,
       ARRAY(SELECT a.attname::text
             FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = t.relation AND i.indisprimary
             ORDER BY k.ord) AS key_columns,
       t.tracked_at
FROM livesync._tracked t
-- Like conflicts and policies: a role sees the tables it may read.
WHERE has_table_privilege(t.relation, 'SELECT');

COMMENT ON VIEW livesync.tracked IS 'Tables whose changes livesync captures, with the columns that form each change''s key (those the current role may SELECT).';

CREATE FUNCTION livesync._track_table(rel regclass) RETURNS bool
LANGUAGE plpgsql VOLATILE STRICT SET search_path = pg_catalog, pg_temp AS $$
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
    IF EXISTS (SELECT 1 FROM livesync.tracked t WHERE t.relation = rel) THEN
        RAISE NOTICE 'table % is already tracked', rel;
        RETURN false;
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
    RETURN true;
END
$$;

CREATE FUNCTION livesync._track_register(rel regclass) RETURNS void
LANGUAGE sql VOLATILE STRICT SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO livesync._tracked (relation, shape) VALUES (rel, livesync._shape(rel))
$$;

CREATE OR REPLACE FUNCTION livesync.track(rel regclass) RETURNS void
LANGUAGE c VOLATILE STRICT AS 'MODULE_PATHNAME', 'livesync_track';

CREATE FUNCTION livesync._untrack_register(rel regclass) RETURNS void
LANGUAGE plpgsql VOLATILE STRICT SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM livesync._tracked WHERE relation = rel) THEN
        RAISE EXCEPTION 'table % is not tracked', rel USING ERRCODE = 'LS002';
    END IF;
    DELETE FROM livesync._tracked WHERE relation = rel;
    DELETE FROM livesync._conflicts WHERE relation = rel;
END
$$;

CREATE FUNCTION livesync._untrack_table(rel regclass) RETURNS void
LANGUAGE plpgsql VOLATILE STRICT SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    EXECUTE format('DROP TRIGGER livesync_capture_truncate ON %s', rel);
    EXECUTE format('DROP TRIGGER livesync_capture_delete ON %s', rel);
    EXECUTE format('DROP TRIGGER livesync_capture_update ON %s', rel);
    EXECUTE format('DROP TRIGGER livesync_capture_insert ON %s', rel);
    EXECUTE format('DROP TRIGGER livesync_version ON %s', rel);
    EXECUTE format('ALTER TABLE %s DROP COLUMN _livesync_version, DROP COLUMN IF EXISTS _livesync_clocks', rel);
END
$$;

CREATE OR REPLACE FUNCTION livesync.untrack(rel regclass) RETURNS void
LANGUAGE c VOLATILE STRICT AS 'MODULE_PATHNAME', 'livesync_untrack';

CREATE OR REPLACE FUNCTION livesync.row_version(rel regclass, key jsonb) RETURNS bigint
LANGUAGE plpgsql STABLE STRICT AS $$
DECLARE
    key_cols text[];
    version  bigint;
BEGIN
    -- Before anything else, so a role that may not read the table learns nothing
    -- of it (not even whether it is tracked).
    IF NOT pg_catalog.has_table_privilege(rel, 'SELECT') THEN
        RAISE EXCEPTION 'permission denied: livesync.row_version needs SELECT on table %', rel
            USING ERRCODE = 'insufficient_privilege',
                  HINT = pg_catalog.format('GRANT SELECT ON %s TO the role that reads it.', rel);
    END IF;
    SELECT t.key_columns INTO key_cols FROM livesync.tracked t WHERE t.relation = rel;
    IF key_cols IS NULL THEN
        RAISE EXCEPTION 'table % is not tracked', rel USING ERRCODE = 'LS002';
    END IF;
    IF jsonb_typeof(key) IS DISTINCT FROM 'object'
       OR ARRAY(SELECT jsonb_object_keys(key) ORDER BY 1) IS DISTINCT FROM ARRAY(SELECT pg_catalog.unnest(key_cols) ORDER BY 1) THEN
        RAISE EXCEPTION 'key % does not name exactly the primary key columns of %', key, rel
            USING ERRCODE = 'LS004',
                  HINT = pg_catalog.format('Pass a JSON object with the keys %s.', pg_catalog.array_to_string(key_cols, ', '));
    END IF;
    -- jsonb_populate_record types the key values as the table's own columns, so
    -- the lookup uses the primary key index.
    EXECUTE pg_catalog.format('SELECT t._livesync_version FROM %s t, pg_catalog.jsonb_populate_record(NULL::%s, $1) k WHERE %s',
                   rel, rel,
                   (SELECT string_agg(pg_catalog.format('t.%1$I = k.%1$I', c), ' AND ') FROM pg_catalog.unnest(key_cols) AS c))
        INTO version USING key;
    RETURN version;
END
$$;

CREATE OR REPLACE FUNCTION livesync._write_json(mutation jsonb) RETURNS jsonb
LANGUAGE c VOLATILE STRICT AS 'MODULE_PATHNAME', 'livesync_write_json';

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
                result := livesync._write_json(mutation);
                IF result ->> 'status' = 'rejected' THEN
                    RAISE EXCEPTION 'mutation % of the batch was rejected (%); nothing was applied', i, result ->> 'reason'
                        USING ERRCODE = 'LS007', DETAIL = result::text;
                END IF;
                results := results OPERATOR(pg_catalog.||) result;
                i := i + 1;
            END LOOP;
        EXCEPTION WHEN OTHERS THEN
            IF SQLSTATE = 'LS007' THEN
                RAISE;
            END IF;
            result := pg_catalog.jsonb_build_object('status', 'rejected', 'reason', 'error',
                                         'error', pg_catalog.jsonb_build_object('sqlstate', SQLSTATE, 'message', SQLERRM));
            RAISE EXCEPTION 'mutation % of the batch failed (%: %); nothing was applied', i, SQLSTATE, SQLERRM
                USING ERRCODE = 'LS007', DETAIL = result::text;
        END;
    ELSE
        FOR mutation IN SELECT m FROM jsonb_array_elements(mutations) AS e(m) LOOP
            -- Each mutation in a subtransaction of its own: one that fails is
            -- rolled back and reported, the others stand.
            BEGIN
                result := livesync._write_json(mutation);
            EXCEPTION WHEN OTHERS THEN
                result := pg_catalog.jsonb_build_object('status', 'rejected', 'reason', 'error',
                                             'error', pg_catalog.jsonb_build_object('sqlstate', SQLSTATE, 'message', SQLERRM));
            END;
            results := results OPERATOR(pg_catalog.||) result;
            i := i + 1;
        END LOOP;
    END IF;
    RETURN pg_catalog.to_jsonb(results);
END
$$;

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

CREATE OR REPLACE FUNCTION livesync._checked(result jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF result ? '_raise' THEN
        IF result #>> '{_raise,hint}' IS NULL THEN
            RAISE EXCEPTION USING ERRCODE = result #>> '{_raise,sqlstate}', MESSAGE = result #>> '{_raise,message}';
        END IF;
        RAISE EXCEPTION USING ERRCODE = result #>> '{_raise,sqlstate}', MESSAGE = result #>> '{_raise,message}',
                              HINT = result #>> '{_raise,hint}';
    END IF;
    RETURN result;
END
$$;

CREATE OR REPLACE FUNCTION livesync._on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM livesync._tracked t
    USING pg_event_trigger_dropped_objects() d
    WHERE d.classid = 'pg_class'::regclass AND d.objid = t.relation::oid AND d.objsubid = 0;
    DELETE FROM livesync._conflicts c
    USING pg_event_trigger_dropped_objects() d
    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.relation::oid AND d.objsubid = 0;
END
$$;

CREATE OR REPLACE VIEW livesync.policies WITH (security_barrier) AS
SELECT u.relation, u.column_name, u.policy, u.existing_insert, u.delete_race
FROM (SELECT t.relation, NULL::text AS column_name, t.default_policy AS policy,
             t.existing_insert, t.delete_race
      FROM livesync._tracked t
      UNION ALL
      SELECT p.relation, a.attname::text, p.policy, NULL, NULL
      FROM livesync._policies p
      JOIN pg_attribute a ON a.attrelid = p.relation AND a.attnum = p.attnum AND NOT a.attisdropped) AS u
WHERE has_table_privilege(u.relation, 'SELECT');

COMMENT ON VIEW livesync.policies IS
    'Merge policies of the tracked tables the current role may SELECT: one row per table (column_name NULL: the default and the table rules) and one per column with its own policy.';

CREATE FUNCTION livesync._row_visible(rel regclass, key jsonb) RETURNS bool
LANGUAGE plpgsql STABLE STRICT AS $$
DECLARE
    condition text;
    visible   bool;
BEGIN
    SELECT string_agg(pg_catalog.format('livesync_t.%1$I OPERATOR(%2$I.%3$s) livesync_k.%1$I', a.attname, opn.nspname, o.oprname),
                      ' AND ' ORDER BY k.ord)
    INTO condition
    FROM pg_catalog.pg_index i
    CROSS JOIN LATERAL ROWS FROM (pg_catalog.unnest(i.indkey::pg_catalog.int2[]),
                                  pg_catalog.unnest(i.indclass::pg_catalog.oid[])) WITH ORDINALITY AS k(attnum, opclass, ord)
    JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid AND a.attnum OPERATOR(pg_catalog.=) k.attnum
    JOIN pg_catalog.pg_opclass oc ON oc.oid OPERATOR(pg_catalog.=) k.opclass
    JOIN pg_catalog.pg_amop am ON am.amopfamily OPERATOR(pg_catalog.=) oc.opcfamily
                   AND am.amoplefttype OPERATOR(pg_catalog.=) oc.opcintype
                   AND am.amoprighttype OPERATOR(pg_catalog.=) oc.opcintype AND am.amopstrategy OPERATOR(pg_catalog.=) 3
    JOIN pg_catalog.pg_operator o ON o.oid OPERATOR(pg_catalog.=) am.amopopr
    JOIN pg_catalog.pg_namespace opn ON opn.oid OPERATOR(pg_catalog.=) o.oprnamespace
    WHERE i.indrelid OPERATOR(pg_catalog.=) rel AND i.indisprimary;
    IF condition IS NULL OR NOT pg_catalog.has_table_privilege(rel, 'SELECT') THEN
        RETURN false;
    END IF;
    EXECUTE pg_catalog.format('SELECT EXISTS (SELECT 1 FROM %s livesync_t, pg_catalog.jsonb_populate_record(NULL::%s, $1) livesync_k WHERE %s)',
                   rel, rel, condition)
        INTO visible USING key;
    RETURN visible;
END
$$;

CREATE OR REPLACE VIEW livesync.conflicts WITH (security_barrier) AS
SELECT c.id, c.relation, c.key, c.column_name, c.base, c.mine, c.theirs, c.actor,
       c.client_id, c.mutation_id, c.created_at, c.resolved_at, c.resolution
FROM livesync._conflicts c
WHERE CASE WHEN has_table_privilege(c.relation, 'SELECT')
           THEN NOT row_security_active(c.relation)
           ELSE false END;

CREATE FUNCTION livesync._set_policy(rel regclass, column_name text, policy text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
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

CREATE OR REPLACE FUNCTION livesync.set_policy(rel regclass, column_name text, policy text) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'livesync_set_column_policy';

CREATE FUNCTION livesync._set_policy(rel regclass, policy text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF rel IS NULL OR policy IS NULL THEN
        RAISE EXCEPTION 'set_policy needs a table and a policy' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF policy NOT IN ('lww', 'server_wins', 'client_wins', 'manual') THEN
        RAISE EXCEPTION 'policy "%" cannot be a table default', policy
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A table default applies to columns of every type: use lww, server_wins, client_wins or manual, and set type-specific policies per column.';
    END IF;
    UPDATE livesync._tracked SET default_policy = policy WHERE relation = rel;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % is not tracked', rel USING ERRCODE = 'LS002';
    END IF;
    PERFORM livesync._forget_write_settings(rel);
END
$$;

CREATE OR REPLACE FUNCTION livesync.set_policy(rel regclass, policy text) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'livesync_set_table_policy';

CREATE FUNCTION livesync._set_conflict_rules(rel regclass, existing_insert text, delete_race text)
RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF existing_insert NOT IN ('merge', 'reject') THEN
        RAISE EXCEPTION 'existing_insert must be merge or reject, got "%"', existing_insert USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF delete_race NOT IN ('delete_wins', 'update_wins') THEN
        RAISE EXCEPTION 'delete_race must be delete_wins or update_wins, got "%"', delete_race USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE livesync._tracked t
    SET existing_insert = coalesce(_set_conflict_rules.existing_insert, t.existing_insert),
        delete_race = coalesce(_set_conflict_rules.delete_race, t.delete_race)
    WHERE t.relation = rel;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % is not tracked', rel USING ERRCODE = 'LS002';
    END IF;
    PERFORM livesync._forget_write_settings(rel);
END
$$;

CREATE OR REPLACE FUNCTION livesync.set_conflict_rules(rel regclass, existing_insert text DEFAULT NULL, delete_race text DEFAULT NULL)
RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'livesync_set_conflict_rules';

-- The DDL guard runs after every command (see tracking.sql).
DROP EVENT TRIGGER livesync_ddl_end;
CREATE EVENT TRIGGER livesync_ddl_end ON ddl_command_end
    EXECUTE FUNCTION livesync._on_ddl_end();

-- The roles and grants, as a fresh install makes them (sql/privileges.sql).

-- Roles are per cluster: a second database installing livesync finds them made.
-- DROP EXTENSION leaves them (they may hold grants in other databases).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'livesync_reader') THEN
        CREATE ROLE livesync_reader NOLOGIN;
        COMMENT ON ROLE livesync_reader IS 'livesync: may read the change log of every tracked table (changes_since, current_position).';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'livesync_maintainer') THEN
        CREATE ROLE livesync_maintainer NOLOGIN;
        COMMENT ON ROLE livesync_maintainer IS 'livesync: may compact the change log (livesync.compact).';
    END IF;
END
$$;

GRANT USAGE ON SCHEMA livesync TO livesync_reader, livesync_maintainer;

-- Functions are executable by PUBLIC when created: close them all, then open the
-- entry points.
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
    livesync.compact(interval),
    -- Open to all so that a role outside livesync_reader is told what to grant.
    livesync.current_position(),
    livesync.changes_since(bigint, int)
TO PUBLIC;
-- Helpers that public PL/pgSQL functions call as the caller. None does more than its
-- entry point: _write_json is write with its arguments in one object, and checks
-- the caller the same way; _resolve_conflict checks the caller itself; _checked
-- raises the error a Rust body reported; _require_reader checks membership;
-- _row_visible tells whether the caller can see a row (resolve_conflict asks).
GRANT EXECUTE ON FUNCTION
    livesync._write_json(jsonb),
    livesync._resolve_conflict(bigint, text, jsonb),
    livesync._checked(jsonb),
    livesync._require_reader(text),
    livesync._row_visible(regclass, jsonb)
TO PUBLIC;

-- track creates the triggers as the table's owner, who needs EXECUTE on their
-- functions; _capture refuses tables track has not registered, and _stamp_version
-- only stamps the row's own version column.
GRANT EXECUTE ON FUNCTION livesync._capture(), livesync._stamp_version(), livesync._track_table(regclass),
    livesync._untrack_table(regclass) TO PUBLIC;

-- Readers read the log tables directly (changes_since runs as its caller, so its
-- speed is a plain query's).
GRANT SELECT ON livesync.changes, livesync.batches, livesync._retention TO livesync_reader;
GRANT EXECUTE ON FUNCTION livesync._delta("char", jsonb, jsonb), livesync._ensure_sequencer() TO livesync_reader;

-- The views show each role the tables it may SELECT.
GRANT SELECT ON livesync.tracked, livesync.policies, livesync.conflicts TO PUBLIC;
