-- Conflict-aware writes: per-column policies, idempotency records, stored
-- conflicts, and the SQL entry points whose bodies are in Rust (src/write/).

-- Per-column merge policies, by attribute number so a renamed column keeps its
-- policy. Columns without a row here use the table default (_tracked.default_policy).
CREATE TABLE livesync._policies (
    relation regclass NOT NULL REFERENCES livesync._tracked ON DELETE CASCADE,
    attnum   int2     NOT NULL,
    policy   text     NOT NULL,
    PRIMARY KEY (relation, attnum)
);
SELECT pg_catalog.pg_extension_config_dump('livesync._policies', '');

-- The filter is outside the UNION ALL: a caller's condition is pushed into the
-- branches of a union, security_barrier or not, so the barrier has to sit above it.
CREATE VIEW livesync.policies WITH (security_barrier) AS
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

-- (client_id, mutation_id) -> the result livesync.write returned, so a retried
-- mutation returns it again instead of applying twice. Pruned by compact().
CREATE TABLE livesync._mutations (
    client_id   text        NOT NULL,
    mutation_id int8        NOT NULL,
    result      jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- The table written, and the role that wrote it. Records are per role: a
    -- result (which holds the row) goes back only to a retry by the role that
    -- wrote it, and another role's use of the same ids neither reads nor blocks
    -- it.
    relation    regclass,
    written_by  oid         NOT NULL,
    PRIMARY KEY (written_by, client_id, mutation_id)
);

-- Conflicts on `manual` columns, kept until livesync.resolve_conflict settles them.
CREATE TABLE livesync._conflicts (
    id          int8        GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    relation    regclass    NOT NULL,
    key         jsonb       NOT NULL,
    column_name text        NOT NULL,
    base        jsonb,      -- SQL NULL: the client sent no base for the column
    mine        jsonb       NOT NULL,
    theirs      jsonb       NOT NULL,
    actor       text        NOT NULL,
    client_id   text,
    mutation_id int8,
    created_at  timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    resolution  jsonb
);
CREATE INDEX ON livesync._conflicts (relation) WHERE resolved_at IS NULL;

-- Whether the current role can see the row of a table with this primary key (its
-- row-level security policies let it): resolve_conflict asks before settling. Runs
-- as the caller with its search_path, so the table's policies work as in a plain
-- SELECT; the key columns are compared with the primary key's own equality
-- operators, named with their schema, so that path cannot swap in an = that
-- matches any row.
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

-- A role sees the conflicts of the tables it can read; on a table with row-level
-- security, only if the policies do not apply to it (its owner, a BYPASSRLS role).
-- Asking the policies row by row would run the table's policy functions, another
-- role's code, for whoever browses the view; resolve_conflict does ask them, for the
-- one conflict the caller names.
CREATE VIEW livesync.conflicts WITH (security_barrier) AS
SELECT c.id, c.relation, c.key, c.column_name, c.base, c.mine, c.theirs, c.actor,
       c.client_id, c.mutation_id, c.created_at, c.resolved_at, c.resolution
FROM livesync._conflicts c
WHERE CASE WHEN has_table_privilege(c.relation, 'SELECT')
           THEN NOT row_security_active(c.relation)
           ELSE false END;
COMMENT ON VIEW livesync.conflicts IS
    'Conflicts on manual-policy columns (open ones have resolved_at NULL); settle them with livesync.resolve_conflict().';

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

-- The bodies of set_policy and set_conflict_rules (declared after them), run as the
-- bootstrap superuser once the caller is known to own the table (src/entry.rs).
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

CREATE FUNCTION livesync.set_policy(rel regclass, column_name text, policy text) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'livesync_set_column_policy';
COMMENT ON FUNCTION livesync.set_policy(regclass, text, text) IS
    'Sets how livesync.write settles a column both a client and others changed since the client''s base.';

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

CREATE FUNCTION livesync.set_policy(rel regclass, policy text) RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'livesync_set_table_policy';
COMMENT ON FUNCTION livesync.set_policy(regclass, text) IS
    'Sets the policy of a table''s columns that have none of their own (default lww).';

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

CREATE FUNCTION livesync.set_conflict_rules(rel regclass, existing_insert text DEFAULT NULL, delete_race text DEFAULT NULL)
RETURNS void
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'livesync_set_conflict_rules';
COMMENT ON FUNCTION livesync.set_conflict_rules(regclass, text, text) IS
    'How livesync.write treats an insert of an existing key (merge | reject) and a delete racing an update (delete_wins | update_wins).';

-- A C-interface function (src/write/mod.rs): it raises livesync's own SQLSTATEs itself.
CREATE FUNCTION livesync.write(
    rel          regclass,
    op           text,
    key          jsonb,
    new_values   jsonb,
    base_version bigint DEFAULT NULL,
    base_values  jsonb  DEFAULT NULL,
    client_id    text   DEFAULT NULL,
    mutation_id  bigint DEFAULT NULL,
    hlc          text   DEFAULT NULL
) RETURNS jsonb
LANGUAGE c VOLATILE CALLED ON NULL INPUT AS 'MODULE_PATHNAME', 'livesync_write';
COMMENT ON FUNCTION livesync.write(regclass, text, jsonb, jsonb, bigint, jsonb, text, bigint, text) IS
    'Applies one client mutation with a field-level three-way merge against its base; returns {status, version, row, conflicts, conflict_id}.';

-- One element of write_batch's array (src/write/mod.rs): livesync.write with its
-- arguments in one object ({rel, op, key, new_values, ...}), raising its errors.
CREATE FUNCTION livesync._write_json(mutation jsonb) RETURNS jsonb
LANGUAGE c VOLATILE STRICT AS 'MODULE_PATHNAME', 'livesync_write_json';

-- No pinned search_path here or in resolve_conflict, unlike livesync's other
-- functions: the writes they make fire the table's own triggers, which must run
-- with the caller's search_path, as they do for a plain UPDATE. Variadic and
-- polymorphic functions are named with their schema instead: a function of the
-- exact argument types in a schema on that path would be chosen over them.
CREATE FUNCTION livesync.write_batch(mutations jsonb, all_or_nothing boolean DEFAULT false) RETURNS jsonb
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
COMMENT ON FUNCTION livesync.write_batch(jsonb, boolean) IS
    'Applies an array of mutations in order in one transaction, one result each; all_or_nothing makes any rejection abort the batch (LS007).';

-- A C-interface function (src/write/mod.rs), like write: it raises livesync's own
-- SQLSTATEs itself.
CREATE FUNCTION livesync.resolve_conflict(conflict_id bigint, choice text, value jsonb DEFAULT NULL) RETURNS jsonb
LANGUAGE c VOLATILE PARALLEL UNSAFE AS 'MODULE_PATHNAME', 'livesync_resolve_conflict';
COMMENT ON FUNCTION livesync.resolve_conflict(bigint, text, jsonb) IS
    'Settles a stored conflict: mine (the client''s value), theirs (keep the stored value) or value (the given one); a captured write.';
