-- livesync 0.4.0 -> 0.5.0: resolve_conflict raises its errors itself.
-- _resolve_conflict becomes a C-interface function (symbol livesync_resolve_conflict,
-- src/write/mod.rs) that raises livesync's own SQLSTATEs, as livesync.write and
-- _write_json do; resolve_conflict returns its result as it is, and the JSON relay
-- that raised errors reported as data (livesync._checked) goes. The capture trigger
-- keeps its C symbol (_capture_wrapper), so tracked tables need nothing. Run by
-- ALTER EXTENSION livesync UPDATE; the log is untouched.

-- The body of resolve_conflict (src/write/mod.rs), raising its errors itself.
CREATE OR REPLACE FUNCTION livesync._resolve_conflict(conflict_id bigint, choice text, value jsonb) RETURNS jsonb
LANGUAGE c VOLATILE PARALLEL UNSAFE AS 'MODULE_PATHNAME', 'livesync_resolve_conflict';

CREATE OR REPLACE FUNCTION livesync.resolve_conflict(conflict_id bigint, choice text, value jsonb DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF conflict_id IS NULL OR choice IS NULL THEN
        RAISE EXCEPTION 'resolve_conflict needs a conflict id and a choice'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'choice is mine, theirs or value (with a value).';
    END IF;
    RETURN livesync._resolve_conflict(conflict_id, choice, value);
END
$$;
DROP FUNCTION livesync._checked(jsonb);
