-- Run once by ./run in a fresh database before the specs: the extension, and the
-- helpers the specs share. Positions, versions and ids would change whenever a spec
-- is added or changed, so the specs show positions relative to their start and
-- versions only in comparisons.
CREATE EXTENSION livesync;

-- Waits (bounded) until this database's sequencer worker runs: the specs that hold
-- ticks back test the worker's batches, not commits that sequence themselves.
CREATE FUNCTION public.await_sequencer() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..3000 LOOP
        IF livesync._ensure_sequencer() THEN
            RETURN;
        END IF;
        PERFORM pg_sleep(0.01);
    END LOOP;
    RAISE EXCEPTION 'the livesync sequencer worker did not start within 30 s';
END
$$;

-- Waits (bounded) until every committed transaction that logged a change has its
-- positions (the worker sequences a commit a moment after it), then returns the
-- newest position. Each statement of the loop sees the commits made meanwhile
-- (READ COMMITTED). Commit markers alone are never sequenced (log.sql).
CREATE FUNCTION public.await_sequenced() RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..3000 LOOP
        IF NOT EXISTS (
            SELECT 1 FROM livesync.changes c
            WHERE c.op <> 'c'
              AND NOT EXISTS (SELECT 1 FROM livesync.batches b WHERE c.tx = ANY (b.txs))
        ) THEN
            RETURN livesync.current_position();
        END IF;
        PERFORM pg_sleep(0.01);
    END LOOP;
    RAISE EXCEPTION 'committed changes still had no position after 30 s';
END
$$;

-- What a spec started from: the newest position once its setup was sequenced
-- (spec_start, one row), and a reader that pages through the log as the bridge does:
-- changes_since(the last position it saw), then remembers the last position
-- (reader_cursor). Each spec's setup calls start_spec() after committing its tables,
-- which also waits for the sequencer worker.
CREATE TABLE public.spec_start (only_row bool PRIMARY KEY DEFAULT true, pos bigint NOT NULL);
CREATE TABLE public.reader_cursor (only_row bool PRIMARY KEY DEFAULT true, pos bigint NOT NULL);
CREATE PROCEDURE public.start_spec()
LANGUAGE plpgsql AS $$
DECLARE
    start bigint;
BEGIN
    PERFORM public.await_sequencer();
    start := public.await_sequenced();
    INSERT INTO public.spec_start (pos) VALUES (start)
    ON CONFLICT (only_row) DO UPDATE SET pos = excluded.pos;
    INSERT INTO public.reader_cursor (pos) VALUES (start)
    ON CONFLICT (only_row) DO UPDATE SET pos = excluded.pos;
END
$$;

-- The reader's next page, without waiting: what a reader sees right now.
CREATE FUNCTION public.read_now()
RETURNS TABLE (pos bigint, op text, key jsonb, delta jsonb)
LANGUAGE sql AS $$
    WITH page AS (
        SELECT c.position, c.op, c.key, c.delta
        FROM public.reader_cursor r, livesync.changes_since(r.pos) c
    ), moved AS (
        UPDATE public.reader_cursor SET pos = (SELECT max(p.position) FROM page p)
        WHERE EXISTS (SELECT 1 FROM page)
    )
    SELECT p.position - s.pos, p.op, p.key, p.delta FROM page p, public.spec_start s ORDER BY p.position
$$;

-- The reader's next page once every commit so far is sequenced (with the worker,
-- a commit becomes readable a moment after COMMIT returns).
CREATE FUNCTION public.read_next()
RETURNS TABLE (pos bigint, op text, key jsonb, delta jsonb)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM public.await_sequenced();
    RETURN QUERY SELECT * FROM public.read_now();
END
$$;

-- Checks over the whole log since the spec's start, in position order: positions
-- are 1, 2, 3, ... with no gap or repeat; each key's versions only grow; how many
-- sequencing batches (ticks) gave them out.
CREATE FUNCTION public.log_checks()
RETURNS TABLE (changes bigint, positions_contiguous boolean, versions_grow_per_key boolean, batches bigint)
LANGUAGE sql AS $$
    WITH log AS (
        SELECT c.position - s.pos AS pos, row_number() OVER (ORDER BY c.position) AS nth, c.version,
               lag(c.version) OVER (PARTITION BY c.key ORDER BY c.position) AS previous_version
        FROM public.spec_start s, livesync.changes_since(s.pos) c
    )
    SELECT count(*),
           coalesce(bool_and(pos = nth), true),
           coalesce(bool_and(previous_version IS NULL OR version > previous_version), true),
           (SELECT count(*) FROM livesync.batches b, public.spec_start s WHERE b.last_position > s.pos)
    FROM log
$$;

-- A livesync.write result in one line, without what differs from run to run
-- (versions, conflict ids): status, reason, the row as stored, and each contested
-- column's outcome ("title mine").
CREATE FUNCTION public.brief(result jsonb) RETURNS text
LANGUAGE sql AS $$
    SELECT concat_ws(' | ',
        result ->> 'status',
        CASE WHEN result ? 'reason' THEN 'reason: ' || (result ->> 'reason') END,
        CASE WHEN result ? 'recreated' THEN 'recreated: ' || (result ->> 'recreated') END,
        CASE WHEN result ? 'conflict_id' THEN 'conflict stored' END,
        CASE WHEN result ? 'row' THEN 'row: ' || (result -> 'row')::text ELSE 'no row' END,
        (SELECT 'contested: ' || string_agg((c ->> 'column') || ' ' || (c ->> 'outcome'), ', ' ORDER BY c ->> 'column')
         FROM jsonb_array_elements(result -> 'conflicts') c))
$$;
