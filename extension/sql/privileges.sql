-- Who may call what. The model and its reasons are in docs/sql.md ("Who may call
-- what"); in short:
--   - reading the log (changes_since, change_runs, current_position) is for members
--     of livesync_reader, who see every tracked table's changes (the bridge is one);
--   - row_version, write, write_batch and resolve_conflict run as the caller and
--     need the caller's own privileges on the table (checked, 42501);
--   - track, untrack, set_policy, set_conflict_rules and set_filter_columns need
--     ownership of the table, compact the extension's ownership or membership in
--     livesync_maintainer (checked in src/entry.rs, then run as the bootstrap
--     superuser);
--   - livesync's own tables and its `_` functions are closed to ordinary roles,
--     except the few helpers the public PL/pgSQL functions call as the caller.
-- Applied last (pgrx `finalize`), once every function exists.

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
    livesync.set_filter_columns(regclass, text[]),
    livesync.compact(interval),
    -- Open to all so that a role outside livesync_reader is told what to grant.
    livesync.current_position(),
    livesync.changes_since(bigint, int),
    livesync.change_runs(bigint, int)
TO PUBLIC;
-- Helpers that public PL/pgSQL functions call as the caller. None does more than its
-- entry point: _write_json is write with its arguments in one object, and checks
-- the caller the same way; _require_reader checks membership, and
-- _check_read does so before anything else; _row_visible tells whether the caller
-- can see a row (resolve_conflict asks).
GRANT EXECUTE ON FUNCTION
    livesync._write_json(jsonb),
    livesync._require_reader(text),
    livesync._check_read(text, bigint, int),
    livesync._row_visible(regclass, jsonb)
TO PUBLIC;

-- track creates the triggers as the table's owner, who needs EXECUTE on their
-- functions; _capture refuses tables track has not registered, and _stamp_version
-- only stamps the row's own version column.
GRANT EXECUTE ON FUNCTION livesync._capture(), livesync._stamp_version(), livesync._track_table(regclass),
    livesync._untrack_table(regclass) TO PUBLIC;

-- changes_since and change_runs run as their caller, who reads the log tables with
-- these grants (members may also read them directly: the same information) and
-- calls the runs' choice (_runs_since).
GRANT SELECT ON livesync.changes, livesync.batches, livesync._retention TO livesync_reader;
GRANT EXECUTE ON FUNCTION livesync._runs_since(bigint, int), livesync._ensure_sequencer() TO livesync_reader;
-- Which columns a table's updates carry whole (set_filter_columns): a reader (the
-- bridge) checks a subscription's row filter against them. The other columns of
-- _tracked (policies, shapes) stay closed.
GRANT SELECT (relation, filter_columns) ON livesync._tracked TO livesync_reader;

-- The views show each role the tables it may SELECT.
GRANT SELECT ON livesync.tracked, livesync.policies, livesync.conflicts TO PUBLIC;
