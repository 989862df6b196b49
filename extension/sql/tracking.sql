-- Which tables are tracked, and the functions that start and stop capture on them.

CREATE TABLE livesync._tracked (
    relation        regclass    PRIMARY KEY,
    tracked_at      timestamptz NOT NULL DEFAULT now(),
    -- How livesync.write settles contested columns and racing operations on this
    -- table (see writes.sql and livesync.set_policy / set_conflict_rules).
    default_policy  text        NOT NULL DEFAULT 'lww',
    existing_insert text        NOT NULL DEFAULT 'merge',
    delete_race     text        NOT NULL DEFAULT 'delete_wins',
    -- The columns (livesync._shape) as of the last change logged for this table:
    -- a DDL that changes them is logged as a schema change.
    shape           jsonb       NOT NULL DEFAULT '[]',
    -- The filter columns (livesync.set_filter_columns), whose value capture records
    -- with every update: by name, as capture and readers use them (livesync_reader
    -- may read filter_columns), and by attribute number, so that a renamed one can
    -- be followed; the DDL trigger keeps both in step.
    filter_columns  text[]      NOT NULL DEFAULT '{}',
    filter_attnums  int2[]      NOT NULL DEFAULT '{}'
);
SELECT pg_catalog.pg_extension_config_dump('livesync._tracked', '');

-- security_barrier (all three views): a caller's own condition in its WHERE clause
-- must not see rows before the view's privilege filter has dropped them.
CREATE VIEW livesync.tracked WITH (security_barrier) AS
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

-- livesync.track (declared below) in two steps, run by src/entry.rs once the caller
-- is known to own the table and every table inheriting from it:
--   _track_table, as the caller: the table's new columns and triggers, the DDL its
--     owner could run by hand (so any event trigger fires as the owner, as for the
--     owner's own ALTER TABLE); false when the table is already tracked;
--   _track_register, as the bootstrap superuser: livesync's record of the table
--     (capture refuses tables without one, so the triggers alone log nothing).
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

CREATE FUNCTION livesync.track(rel regclass) RETURNS void
LANGUAGE c VOLATILE STRICT AS 'MODULE_PATHNAME', 'livesync_track';
COMMENT ON FUNCTION livesync.track(regclass) IS
    'Starts capturing every change to a table with a primary key; adds its _livesync_version and _livesync_clocks columns.';

-- livesync.untrack in two steps, the other way round: livesync's record goes first
-- (as the bootstrap superuser), then the columns and triggers (as the caller).
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

CREATE FUNCTION livesync.untrack(rel regclass) RETURNS void
LANGUAGE c VOLATILE STRICT AS 'MODULE_PATHNAME', 'livesync_untrack';
COMMENT ON FUNCTION livesync.untrack(regclass) IS
    'Stops capture on a table and removes its _livesync_version and _livesync_clocks columns; its past changes stay in the log.';

-- The body of livesync.set_filter_columns (declared below), run as the bootstrap
-- superuser once the caller is known to own the table (src/entry.rs).
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

-- Runs as the caller with its search_path (like a plain SELECT: the key's = and the
-- table's RLS policies resolve as they would there); livesync's own calls name
-- their schema.
CREATE FUNCTION livesync.row_version(rel regclass, key jsonb) RETURNS bigint
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
    -- (only if its primary key was dropped with livesync's event trigger disabled)
    IF key_cols = '{}' THEN
        RAISE EXCEPTION 'tracked table % has no primary key', rel
            USING ERRCODE = 'LS003',
                  HINT = pg_catalog.format('Add the primary key back (ALTER TABLE %s ADD PRIMARY KEY ...), or untrack the table.', rel);
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
COMMENT ON FUNCTION livesync.row_version(regclass, jsonb) IS
    'The current version of the row with this primary key (0 if not written since tracking began, NULL if absent).';

-- Schema changes on tracked tables: dropping the table stops tracking it; a change
-- that would break capture (losing the primary key or the version column) is refused.
-- SECURITY DEFINER: the role dropping the table (its owner) has no privileges on
-- livesync's tables.
CREATE FUNCTION livesync._on_sql_drop() RETURNS event_trigger
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

-- After DDL on tracked tables: refuse what would break capture, reset column
-- policies that no longer fit their column's type, and log a change of columns.
-- SECURITY DEFINER: it writes livesync's own tables, which the role running the DDL
-- (the table's owner) has no privileges on.
CREATE FUNCTION livesync._on_ddl_end() RETURNS event_trigger
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

-- Only the DDL trigger logs schema changes: nobody may forge them.
REVOKE EXECUTE ON FUNCTION livesync._log_schema_change(oid, jsonb, jsonb) FROM PUBLIC;

CREATE EVENT TRIGGER livesync_sql_drop ON sql_drop EXECUTE FUNCTION livesync._on_sql_drop();
-- Every command, not a list of tags: a tracked table's key or columns can go with
-- objects it only depends on (DROP COLLATION, OPERATOR CLASS, EXTENSION, SCHEMA,
-- OWNED ... CASCADE), and a command missed here would leave a broken table that
-- every later DDL in the database trips over.
CREATE EVENT TRIGGER livesync_ddl_end ON ddl_command_end
    EXECUTE FUNCTION livesync._on_ddl_end();
