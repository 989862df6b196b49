-- what this shows: the extension installs into its own schema, and the helpers the
-- other files use to show an error's SQLSTATE, message and hint.
CREATE EXTENSION livesync;
-- Every later file reads its own writes straight after COMMIT: sequence at commit
-- rather than in the background worker (which the end-to-end tests cover).
SELECT current_database() AS db \gset
ALTER DATABASE :"db" SET livesync.sequencer = 'commit';
SELECT extname, extversion IS NOT NULL AS has_version, n.nspname AS schema
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE extname = 'livesync';

-- Runs a statement that must fail; returns "SQLSTATE: message" and the hint.
CREATE FUNCTION public.expect_error(statement text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    state text; message text; hint text;
BEGIN
    EXECUTE statement;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT, hint = PG_EXCEPTION_HINT;
    RETURN state || ': ' || message || CASE WHEN hint <> '' THEN E'\nHINT: ' || hint ELSE '' END;
END
$$;

-- The changes after a position, without the columns that differ from run to run
-- (transaction id, commit time), positions shown relative to that position.
CREATE FUNCTION public.log_after(after bigint, max_changes int DEFAULT 1000)
RETURNS TABLE (pos bigint, relation regclass, op text, key jsonb, delta jsonb, actor text)
LANGUAGE sql AS $$
    SELECT c.position - after, c.relation, c.op, c.key, c.delta, c.actor
    FROM livesync.changes_since(after, max_changes) c ORDER BY c.position
$$;

-- A livesync.write result without what differs from run to run (the version
-- number and conflict ids: whether they are there is kept), conflicts by column.
CREATE FUNCTION public.shown(result jsonb) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT (result - 'version' - 'conflict_id' - 'conflicts')
           || CASE WHEN result ? 'version' THEN '{"version": "present"}'::jsonb ELSE '{}'::jsonb END
           || CASE WHEN result ? 'conflict_id' THEN '{"conflict_id": "present"}'::jsonb ELSE '{}'::jsonb END
           || CASE WHEN result ? 'conflicts'
                   THEN jsonb_build_object('conflicts',
                            (SELECT jsonb_agg(c - 'conflict_id' ORDER BY c ->> 'column')
                             FROM jsonb_array_elements(result -> 'conflicts') c))
                   ELSE '{}'::jsonb END
$$;

-- One column of a livesync.write result in a line: "status: column = value (outcome)".
CREATE FUNCTION public.outcome(result jsonb, col text) RETURNS text
LANGUAGE sql AS $$
    SELECT (result ->> 'status') || ': ' || col || ' = ' || coalesce(result -> 'row' ->> col, '<no row>')
           || coalesce(' (' || (SELECT c ->> 'outcome' FROM jsonb_array_elements(result -> 'conflicts') c
                                WHERE c ->> 'column' = col) || ')', '')
$$;
