-- livesync 0.4.0 -> 0.5.0: resolve_conflict raises its errors itself.
-- resolve_conflict becomes a C-interface function (symbol livesync_resolve_conflict,
-- src/write/mod.rs) that raises livesync's own SQLSTATEs, as livesync.write and
-- _write_json do; its PL/pgSQL body, the Rust body it called (_resolve_conflict)
-- and the JSON relay that raised errors reported as data (livesync._checked) go. The capture trigger
-- keeps its C symbol (_capture_wrapper), so tracked tables need nothing. row_version
-- of a tracked table that lost its primary key (possible only with livesync's event
-- trigger disabled) says so with LS003, as capture and write do. Run by ALTER
-- EXTENSION livesync UPDATE; the log is untouched.

-- resolve_conflict is itself the C-interface function (as write is); CREATE OR
-- REPLACE keeps its grants and comment.
CREATE OR REPLACE FUNCTION livesync.resolve_conflict(conflict_id bigint, choice text, value jsonb DEFAULT NULL) RETURNS jsonb
LANGUAGE c VOLATILE PARALLEL UNSAFE AS 'MODULE_PATHNAME', 'livesync_resolve_conflict';
DROP FUNCTION livesync._resolve_conflict(bigint, text, jsonb);
DROP FUNCTION livesync._checked(jsonb);

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
