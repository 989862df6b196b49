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
    -- columns on both sides (and, on a table with filter columns, a fifth element:
    -- those of them it did not change, with their value); a truncate is all nulls;
    -- a schema change has no key and {"columns": [{name, type}, ...]} before and
    -- after.
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

-- What every read of the log checks first, in the reading statement's snapshot: that
-- the caller is a member of livesync_reader, that the page has room for a change,
-- and that the log still holds the position read from (LS001: resync).
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

-- The runs of the whole transactions committed after a position, as many
-- transactions as fit in max_changes (the first one whole however large it is), in
-- position order: what change_runs returns and changes_since explodes into changes.
-- A run holding `after` itself (a reader resuming inside a transaction) comes back
-- cut to the changes after it, first_position moved along. Commit markers (op 'c')
-- hold no change and take no position: they are left out. A transaction whose rows
-- are all markers (a rolled-back savepoint took every change) is never given
-- positions (tick.rs), so it is in no batch and never read.
-- No JIT: the planner's guess for the runs made the read look expensive enough to
-- compile, which took half a second for a millisecond's work.
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

-- _runs_since's runs, one row per change, once _check_read has passed (src/log_reader.rs).
-- STABLE: the checks and the read see the same snapshot, so they cannot straddle a
-- concurrent compaction.
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
LANGUAGE c STABLE STRICT AS 'MODULE_PATHNAME', 'livesync_changes_since';
COMMENT ON FUNCTION livesync.changes_since(bigint, int) IS
    'Changes committed after a position, in commit order, whole transactions only. SQLSTATE LS001 means resync.';

-- The log as it is stored, for readers that take runs rather than rows (the bridge):
-- _runs_since's runs with the table's name as it is now.
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
