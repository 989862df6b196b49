-- The change log: what capture writes, what readers read.
--
-- Capture writes the changes of one statement as a few `changes` rows: each row
-- holds a run of up to a thousand changes of one kind, as a jsonb array, keyed by
-- (transaction, ordinal of the run's first change within the transaction). Positions
-- are not stored per change: once it has committed, the transaction is given one
-- contiguous block of positions by a sequencing tick, and a change's position is
-- `first_position + ordinal - 1`. A tick records the blocks of all the transactions
-- it sequenced in one `batches` row. That keeps the sequencing work at one row per
-- tick, and the capture work at one row per run, however many rows changed.

-- Only livesync writes the log tables. They carry no CHECK constraints: Postgres
-- re-reads those from the catalog on every internal insert.
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

CREATE TABLE livesync.batches (
    last_position  int8        PRIMARY KEY,
    first_position int8        NOT NULL,
    -- The transactions the tick sequenced, in position order, and the first position
    -- of each (a transaction's block ends where the next one's starts).
    txs            xid8[]      NOT NULL,
    firsts         int8[]      NOT NULL,
    committed_at   timestamptz NOT NULL
);
COMMENT ON TABLE livesync.batches IS
    'One row per sequencing tick: the committed transactions it gave positions to, and their blocks of positions.';
-- A busy tick's arrays pass the 2 kB at which Postgres starts compressing a row;
-- compressing them took a quarter of the sequencer's time (and every reader
-- decompresses them again). Rows are stored as they are up to a page; a tick large
-- enough to need more is compressed with lz4 where the server has it.
ALTER TABLE livesync.batches SET (toast_tuple_target = 8160);

-- Runs of similar rows compress well; lz4 does it at a fraction of pglz's cost.
DO $$
BEGIN
    ALTER TABLE livesync.changes ALTER COLUMN entries SET COMPRESSION lz4;
    ALTER TABLE livesync.batches ALTER COLUMN txs SET COMPRESSION lz4,
                                 ALTER COLUMN firsts SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    NULL; -- a server built without lz4 keeps the default compression
END
$$;

-- Positions are drawn from this sequence by the sequencer, under the sequencer lock
-- (ExclusiveLock on livesync.batches); a tick that fails after drawing leaves a
-- numeric gap that no reader waits on.
CREATE SEQUENCE livesync.position_seq AS int8 MINVALUE 1;

-- The snapshot the last sequencing tick ran with: every transaction visible in it
-- has been given positions. The next tick looks only at transactions that were
-- still running then (its xip list) or started after (at or past its xmax), except
-- those the last tick sequenced: a tick run by a committing transaction includes
-- that transaction, which its own snapshot does not yet show as committed.
CREATE TABLE livesync._sequencer (
    only_row  bool        PRIMARY KEY DEFAULT true,
    snapshot  pg_snapshot NOT NULL,
    sequenced xid8[]      NOT NULL DEFAULT '{}'
);
INSERT INTO livesync._sequencer (snapshot) VALUES (pg_current_snapshot());

-- Row versions: every write to a tracked row stamps a new value into its
-- `_livesync_version` column. One nextval reserves a block of 1000, which the
-- backends of the database share through shared memory (versions.rs); a row's
-- versions only ever grow.
CREATE SEQUENCE livesync.version_seq AS int8 MINVALUE 1 INCREMENT BY 1000;

-- Everything at or below `horizon` has been compacted away.
CREATE TABLE livesync._retention (
    only_row bool PRIMARY KEY DEFAULT true CHECK (only_row),
    horizon  int8 NOT NULL DEFAULT 0
);
INSERT INTO livesync._retention DEFAULT VALUES;

-- The log is not dumped: its transaction ids mean nothing in another cluster. A
-- database restored from a dump starts with an empty log, and readers holding old
-- positions are told to resync (LS001).

-- Reading the log is for members of livesync_reader (see privileges.sql). The grants
-- on the log tables enforce it; this check turns their "permission denied for table
-- batches" into an error that says what to grant.
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

CREATE FUNCTION livesync.current_position() RETURNS bigint
LANGUAGE plpgsql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM livesync._require_reader('livesync.current_position');
    RETURN greatest(
        (SELECT max(last_position) FROM livesync.batches),
        (SELECT horizon FROM livesync._retention)
    );
END
$$;
COMMENT ON FUNCTION livesync.current_position() IS
    'The newest position a reader can see now; changes_since() of it returns only later commits.';

CREATE FUNCTION livesync._delta(op "char", old jsonb, new jsonb) RETURNS jsonb
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

CREATE FUNCTION livesync.changes_since(after bigint, max_changes int DEFAULT 1000)
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
COMMENT ON FUNCTION livesync.changes_since(bigint, int) IS
    'Changes committed after a position, in commit order, whole transactions only. SQLSTATE LS001 means resync.';

-- The body of livesync.compact (declared below), run as the bootstrap superuser once
-- the caller is known to own the extension or be a member of livesync_maintainer
-- (src/entry.rs); no ordinary role may call it.
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

CREATE FUNCTION livesync.compact(older_than interval DEFAULT '24 hours') RETURNS bigint
LANGUAGE c VOLATILE STRICT AS 'MODULE_PATHNAME', 'livesync_compact';
COMMENT ON FUNCTION livesync.compact(interval) IS
    'Prunes changes committed longer ago than older_than; returns how many changes were removed.';
