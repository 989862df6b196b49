-- livesync 0.3.0 -> 0.4.0: a fast read path. changes_since is native code that
-- explodes the stored runs (src/log_reader.rs) instead of PL/pgSQL calling a SQL
-- function per change (same rows, same values); livesync.change_runs returns the runs
-- as they are stored, for readers that take them whole (the bridge). Both share their
-- checks (_check_read) and their choice of runs (_runs_since). livesync._delta goes:
-- nothing calls it any more. Run by ALTER EXTENSION livesync UPDATE; the log is
-- untouched.

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
    'The stored runs of changes committed after a position ([key, old, new, version] arrays), whole transactions only. SQLSTATE LS001 means resync.';

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
