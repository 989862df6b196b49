-- what this shows: who may call what (docs/sql.md, "Who may call what"). For every
-- function and view, a role with exactly the privilege it needs succeeds, and a role
-- without it gets 42501 and changes and learns nothing.
\set SHOW_CONTEXT never
SET client_min_messages = warning;
DROP ROLE IF EXISTS ls_owner, ls_app, ls_twin, ls_viewer, ls_stranger, ls_bridge, ls_janitor;
RESET client_min_messages;
CREATE ROLE ls_owner;                          -- owns the tables
CREATE ROLE ls_app;                            -- reads and writes notes
CREATE ROLE ls_twin;                           -- the same grants as ls_app
CREATE ROLE ls_viewer;                         -- may only read notes
CREATE ROLE ls_stranger;                       -- no privilege on any table
CREATE ROLE ls_bridge IN ROLE livesync_reader; -- reads the log, nothing else
CREATE ROLE ls_janitor IN ROLE livesync_maintainer;
GRANT USAGE ON SCHEMA livesync TO ls_owner, ls_app, ls_twin, ls_viewer, ls_stranger;
GRANT CREATE ON SCHEMA public TO ls_owner, ls_stranger;

-- What any role may reach at all: the functions open to PUBLIC, and the relations
-- it may read. Everything else in the schema is closed to it.
SELECT p.oid::regprocedure AS open_to_every_role
FROM pg_proc p WHERE p.pronamespace = 'livesync'::regnamespace
  AND has_function_privilege('ls_stranger', p.oid, 'EXECUTE') ORDER BY p.oid::regprocedure::text;
SELECT c.relname AS readable_by_every_role
FROM pg_class c WHERE c.relnamespace = 'livesync'::regnamespace AND c.relkind IN ('r', 'v', 'S')
  AND (has_table_privilege('ls_stranger', c.oid, 'SELECT') OR has_table_privilege('ls_stranger', c.oid, 'INSERT')
       OR has_table_privilege('ls_stranger', c.oid, 'UPDATE') OR has_table_privilege('ls_stranger', c.oid, 'DELETE'))
ORDER BY 1;
-- What livesync_reader adds, and that it writes nothing.
SELECT p.oid::regprocedure AS open_to_readers
FROM pg_proc p WHERE p.pronamespace = 'livesync'::regnamespace
  AND has_function_privilege('ls_bridge', p.oid, 'EXECUTE')
  AND NOT has_function_privilege('ls_stranger', p.oid, 'EXECUTE') ORDER BY p.oid::regprocedure::text;
SELECT c.relname AS readers_read,
       has_table_privilege('ls_bridge', c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE') AS readers_write
FROM pg_class c WHERE c.relnamespace = 'livesync'::regnamespace AND c.relkind IN ('r', 'v', 'S')
  AND has_table_privilege('ls_bridge', c.oid, 'SELECT')
  AND NOT has_table_privilege('ls_stranger', c.oid, 'SELECT') ORDER BY 1;
-- and the columns it reads of tables it may not read whole (which tables have filter
-- columns: the bridge checks subscriptions' filters against them)
SELECT c.relname AS readers_read_of, a.attname AS column_name,
       has_column_privilege('ls_bridge', c.oid, a.attnum, 'INSERT, UPDATE') AS readers_write
FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relnamespace = 'livesync'::regnamespace AND c.relkind IN ('r', 'v', 'S')
  AND has_column_privilege('ls_bridge', c.oid, a.attnum, 'SELECT')
  AND NOT has_table_privilege('ls_bridge', c.oid, 'SELECT')
  AND NOT has_column_privilege('ls_stranger', c.oid, a.attnum, 'SELECT') ORDER BY 1, a.attnum;
-- Every function that runs with livesync's own rights pins its search_path: those
-- declared SECURITY DEFINER, and the steps src/entry.rs runs as the superuser.
SELECT p.proname AS runs_privileged, p.prosecdef AS security_definer,
       coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false) AS search_path_pinned
FROM pg_proc p WHERE p.pronamespace = 'livesync'::regnamespace
  AND (p.prosecdef OR p.proname IN ('_track_register', '_untrack_register', '_set_policy', '_set_conflict_rules',
                                     '_set_filter_columns', '_compact'))
ORDER BY 1, 2;

-- A fingerprint of everything the calls below could change or reveal: tracking,
-- policies, conflicts, mutation records and the log.
CREATE FUNCTION public.livesync_state() RETURNS text
LANGUAGE sql AS $$
    SELECT md5(concat_ws('|',
        (SELECT string_agg(format('%s %s %s %s %s %s %s', relation, default_policy, existing_insert, delete_race, shape,
                                  filter_columns, filter_attnums), ',' ORDER BY relation::text) FROM livesync._tracked),
        (SELECT string_agg(format('%s %s %s', relation, attnum, policy), ',' ORDER BY relation::text, attnum) FROM livesync._policies),
        (SELECT string_agg(format('%s %s %s', id, resolved_at IS NULL, resolution), ',' ORDER BY id) FROM livesync._conflicts),
        (SELECT count(*) FROM livesync._mutations),
        (SELECT max(last_position) FROM livesync.batches),
        (SELECT count(*) FROM livesync.changes),
        (SELECT horizon FROM livesync._retention)))
$$;

-- Configuration: the table's owner (not a superuser) tracks and configures it.
SET ROLE ls_owner;
CREATE TABLE notes (id int PRIMARY KEY, body text, score int);
CREATE TABLE drafts (id int PRIMARY KEY, body text);
CREATE TABLE secrets (id int PRIMARY KEY, body text);
SELECT livesync.track('notes'), livesync.track('drafts'), livesync.track('secrets');
SELECT livesync.set_policy('notes', 'body', 'manual'), livesync.set_policy('notes', 'score', 'max'),
       livesync.set_policy('notes', 'server_wins'), livesync.set_conflict_rules('notes', 'merge', 'update_wins');
SELECT livesync.set_policy('notes', 'lww'), livesync.set_conflict_rules('notes', delete_race => 'delete_wins');
SELECT livesync.set_filter_columns('notes', '{score}');
GRANT SELECT, INSERT, UPDATE, DELETE ON notes, drafts TO ls_app, ls_twin;
GRANT SELECT ON notes TO ls_viewer;
-- the owner may not read the log: that is livesync_reader's
SELECT expect_error('SELECT livesync.current_position()');
RESET ROLE;
SELECT relation, key_columns, filter_columns FROM livesync.tracked
WHERE relation IN ('notes'::regclass, 'drafts'::regclass, 'secrets'::regclass) ORDER BY relation::text;
SELECT * FROM livesync.policies WHERE relation = 'notes'::regclass ORDER BY column_name NULLS FIRST;
SELECT livesync.current_position() AS p0 \gset
SET ROLE ls_owner;
INSERT INTO secrets VALUES (1, 'the owner''s secret');
RESET ROLE;

-- The application role writes its tables, plainly and through livesync.write, and
-- reads row versions; capture logs its changes although it has no privilege on the log.
SET ROLE ls_app;
INSERT INTO notes VALUES (1, 'written by the app', 1);
UPDATE notes SET score = 2 WHERE id = 1;
SELECT shown(livesync.write('notes', 'update', '{"id": 1}', '{"score": 5}'));
SELECT shown(livesync.write('notes', 'insert', '{"id": 2}', '{"body": "second"}', client_id => 'phone-1', mutation_id => 1));
SELECT shown(livesync.write('notes', 'delete', '{"id": 2}', NULL));
SELECT shown(livesync.write_batch('[{"rel": "notes", "op": "upsert", "key": {"id": 3}, "new_values": {"body": "batched"}}]')->0);
SELECT livesync.row_version('notes', '{"id": 1}') > 0 AS has_version;
-- and the views show it notes and drafts, never secrets
SELECT relation AS tracked_seen FROM livesync.tracked ORDER BY relation::text;
SELECT DISTINCT relation::text AS policies_seen FROM livesync.policies ORDER BY 1;
RESET ROLE;
SELECT livesync_state() AS before \gset

-- Everything it may not do: 42501 each, naming the table and the privilege.
SET ROLE ls_app;
SELECT expect_error($$SELECT livesync.track('secrets')$$);
SELECT expect_error($$SELECT livesync.untrack('notes')$$);
SELECT expect_error($$SELECT livesync.set_policy('notes', 'body', 'lww')$$);
SELECT expect_error($$SELECT livesync.set_policy('notes', 'manual')$$);
SELECT expect_error($$SELECT livesync.set_conflict_rules('notes', 'reject')$$);
SELECT expect_error($$SELECT livesync.set_filter_columns('notes', '{body}')$$);
SELECT expect_error($$SELECT livesync.set_filter_columns('secrets', '{}')$$);
SELECT expect_error($$SELECT livesync.compact('0 seconds')$$);
SELECT expect_error($$SELECT livesync.changes_since(0)$$);
SELECT expect_error($$SELECT livesync.change_runs(0)$$);
SELECT expect_error($$SELECT livesync.current_position()$$);
SELECT expect_error($$SELECT livesync.row_version('secrets', '{"id": 1}')$$);
SELECT expect_error($$SELECT livesync.write('secrets', 'update', '{"id": 1}', '{"body": "mine now"}')$$);
SELECT expect_error($$SELECT livesync.write('secrets', 'insert', '{"id": 9}', '{"body": "planted"}')$$);
SELECT livesync.write_batch('[{"rel": "secrets", "op": "delete", "key": {"id": 1}}]') #>> '{0,error}' AS batch_error;
-- nor livesync's own tables and bodies, directly
SELECT expect_error($$SELECT * FROM livesync.changes$$);
SELECT expect_error($$SELECT * FROM livesync._runs_since(0, 10)$$);
SELECT expect_error($$SELECT * FROM livesync._mutations$$);
SELECT expect_error($$INSERT INTO livesync.changes (tx, ordinal, count, commit_seq, relation, op, entries, actor) VALUES (pg_current_xact_id(), 1, 1, 0, 'notes', 'i', '[]', 'forged')$$);
SELECT expect_error($$UPDATE livesync._tracked SET default_policy = 'client_wins'$$);
SELECT expect_error($$SELECT livesync._track_register('secrets')$$);
SELECT expect_error($$SELECT livesync._track_table('secrets')$$);
SELECT expect_error($$SELECT livesync._compact('0 seconds')$$);
SELECT expect_error($$SELECT livesync._set_policy('notes', 'client_wins')$$);
SELECT expect_error($$SELECT livesync._set_filter_columns('notes', '{body}')$$);
SELECT expect_error($$SELECT t.filter_columns FROM livesync._tracked t WHERE t.relation = 'notes'::regclass$$);
SELECT expect_error($$SELECT livesync._log_schema_change('secrets'::regclass, '[]', '[]')$$);
-- nor make livesync log a table of its own by attaching the capture trigger by hand
-- (track creates the triggers as the owner, so anyone may attach them; capture
-- refuses a table track has not registered)
SELECT expect_error($$CREATE TEMP TABLE mine (id int PRIMARY KEY); CREATE TRIGGER forge AFTER INSERT ON mine REFERENCING NEW TABLE AS livesync_new FOR EACH STATEMENT EXECUTE FUNCTION livesync._capture(); INSERT INTO mine VALUES (1)$$);
RESET ROLE;
SELECT livesync_state() = :'before' AS nothing_changed;

-- A SECURITY DEFINER function is checked as its owner, not as whoever calls it: a
-- stranger's function cannot untrack the owner's table, even when the owner calls it.
SET ROLE ls_stranger;
CREATE FUNCTION public.stranger_untracks() RETURNS text
LANGUAGE sql SECURITY DEFINER AS $$ SELECT expect_error($q$SELECT livesync.untrack('notes')$q$) $$;
RESET ROLE;
SET ROLE ls_owner;
SELECT stranger_untracks();
RESET ROLE;
SELECT livesync_state() = :'before' AS nothing_changed;

-- Mutation records: a retry gets its first result back, for the same table only.
SET ROLE ls_app;
SELECT shown(livesync.write('notes', 'insert', '{"id": 2}', '{"body": "second"}', client_id => 'phone-1', mutation_id => 1)) AS retried;
SELECT expect_error($$SELECT livesync.write('drafts', 'insert', '{"id": 2}', '{"body": "other"}', client_id => 'phone-1', mutation_id => 1)$$);
RESET ROLE;
SELECT livesync_state() = :'before' AS nothing_changed;
-- Records are per role: another role using the same ids neither reads the first
-- result (which holds the row) nor is refused by it: its write is its own.
SET ROLE ls_twin;
SELECT shown(livesync.write('notes', 'update', '{"id": 1}', '{"score": 7}', client_id => 'phone-1', mutation_id => 1)) AS twin_writes;
RESET ROLE;
SELECT livesync_state() AS before \gset

-- The reader role reads every tracked table's changes (secrets too: the bridge
-- decides per subscriber) and nothing else: no rows, no writes, no configuration.
SET ROLE ls_bridge;
SELECT livesync.current_position() = (SELECT max(last_position) FROM livesync.batches) AS reader_sees_the_newest;
SELECT pos, relation, op, key, delta, actor FROM log_after(:p0);
SELECT first_position - :p0 AS pos, schema_name, table_name, op, jsonb_array_length(entries) AS changes
FROM livesync.change_runs(:p0) ORDER BY first_position;
SELECT expect_error($$SELECT livesync.row_version('notes', '{"id": 1}')$$);
SELECT expect_error($$SELECT livesync.write('notes', 'update', '{"id": 1}', '{"body": "bridge"}')$$);
SELECT expect_error($$SELECT livesync.compact('0 seconds')$$);
SELECT expect_error($$DELETE FROM livesync.changes$$);
SELECT count(*) AS tracked_seen FROM livesync.tracked;
-- it reads each table's filter columns (the bridge's own query), and nothing else
-- of livesync's records of the tables
PREPARE filter_columns AS SELECT t.filter_columns FROM livesync._tracked t WHERE t.relation = $1;
EXECUTE filter_columns('notes'::regclass);
EXECUTE filter_columns('secrets'::regclass);
DEALLOCATE filter_columns;
SELECT expect_error($$SELECT t.shape FROM livesync._tracked t$$);
SELECT expect_error($$SELECT * FROM livesync._tracked$$);
SELECT expect_error($$UPDATE livesync._tracked SET filter_columns = '{body}'$$);
SELECT expect_error($$SELECT livesync.set_filter_columns('notes', '{body}')$$);
RESET ROLE;
SELECT livesync_state() = :'before' AS nothing_changed;

-- Conflicts: only roles that may SELECT and UPDATE the table settle them, whatever
-- the choice ('theirs' writes nothing, so the table's privileges would never be
-- asked); roles that may not read the table neither see them nor learn their table.
SET ROLE ls_owner;
SELECT livesync.set_policy('notes', 'body', 'manual');
RESET ROLE;
SET ROLE ls_app;
SELECT shown(livesync.write('notes', 'update', '{"id": 1}', '{"body": "mine"}', 0, '{"body": "old"}')) AS conflicted;
RESET ROLE;
SELECT id AS conflict FROM livesync._conflicts WHERE resolved_at IS NULL \gset
SELECT livesync_state() AS before \gset
SET ROLE ls_stranger;
SELECT count(*) AS conflicts_seen FROM livesync.conflicts;
SELECT regexp_replace(expect_error(format($$SELECT livesync.resolve_conflict(%s, 'theirs')$$, :conflict)), 'conflict \d+', 'conflict N') AS stranger_resolves;
SET ROLE ls_bridge;
SELECT regexp_replace(expect_error(format($$SELECT livesync.resolve_conflict(%s, 'theirs')$$, :conflict)), 'conflict \d+', 'conflict N') AS reader_resolves;
SET ROLE ls_viewer;
SELECT count(*) AS conflicts_seen FROM livesync.conflicts;
SELECT expect_error(format($$SELECT livesync.resolve_conflict(%s, 'theirs')$$, :conflict)) AS viewer_resolves;
SELECT expect_error(format($$SELECT livesync.resolve_conflict(%s, 'mine')$$, :conflict)) AS viewer_resolves;
RESET ROLE;
SELECT livesync_state() = :'before' AS nothing_changed;
SET ROLE ls_app;
SELECT livesync.resolve_conflict(:conflict, 'theirs') ->> 'status' AS settled;
RESET ROLE;
SELECT resolved_at IS NOT NULL AS closed FROM livesync.conflicts WHERE id = :conflict;

-- Maintenance: a livesync_maintainer member compacts (and nobody else without
-- ownership of the extension, checked above).
SET ROLE ls_janitor;
SELECT livesync.compact('1 hour') AS compacted;
RESET ROLE;

-- The owner untracks, and drops a tracked table (the drop's event trigger cleans
-- livesync's records although the owner has no privilege on them).
SET ROLE ls_owner;
SELECT livesync.untrack('drafts');
DROP TABLE secrets;
RESET ROLE;
SELECT relation AS still_tracked FROM livesync._tracked
WHERE relation::text IN ('notes', 'drafts') ORDER BY relation::text;
SELECT count(*) AS records_of_dropped_tables FROM livesync._tracked WHERE relation::text ~ '^\d+$';

-- Nothing of a caller's runs with livesync's rights. A role puts its own hashtext,
-- = operators and a domain CHECK in the way of the statements livesync runs as the
-- superuser (mutation records, write settings, conflicts, the existence probe after
-- a write had no effect); each says so (a NOTICE, which no rollback takes back) if
-- it ever runs as anyone but that role.
CREATE SCHEMA ls_trap AUTHORIZATION ls_stranger;
SET ROLE ls_stranger;
CREATE FUNCTION ls_trap.caught() RETURNS bool LANGUAGE plpgsql AS $f$
BEGIN
    IF current_user <> 'ls_stranger' THEN
        RAISE NOTICE 'a trap ran as %', current_user;
    END IF;
    RETURN true;
END $f$;
CREATE FUNCTION ls_trap.hashtext(t text) RETURNS int LANGUAGE sql AS $f$
SELECT CASE WHEN ls_trap.caught() THEN pg_catalog.hashtext(t) END $f$;
CREATE FUNCTION ls_trap.eq(a bigint, b bigint) RETURNS bool LANGUAGE sql AS $f$
SELECT ls_trap.caught() AND a OPERATOR(pg_catalog.=) b $f$;
CREATE OPERATOR ls_trap.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = ls_trap.eq);
CREATE FUNCTION ls_trap.eq(a regclass, b regclass) RETURNS bool LANGUAGE sql AS $f$
SELECT ls_trap.caught() AND a OPERATOR(pg_catalog.=) b $f$;
CREATE OPERATOR ls_trap.= (LEFTARG = regclass, RIGHTARG = regclass, FUNCTION = ls_trap.eq);
CREATE DOMAIN ls_trap.watched_int AS int CHECK (ls_trap.caught());
CREATE TABLE ls_trap.t (id ls_trap.watched_int PRIMARY KEY, v text);
CREATE TABLE ls_trap.skipped (id ls_trap.watched_int PRIMARY KEY, v text);
CREATE FUNCTION ls_trap.skip() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN RETURN NULL; END $f$;
CREATE TRIGGER a_skip BEFORE INSERT ON ls_trap.skipped FOR EACH ROW EXECUTE FUNCTION ls_trap.skip();
SELECT livesync.track('ls_trap.t'), livesync.track('ls_trap.skipped');
SELECT livesync.set_policy('ls_trap.t', 'v', 'manual');
SET search_path = ls_trap, pg_catalog;
SELECT livesync.write('ls_trap.t', 'insert', '{"id": 1}', '{"v": "x"}', client_id => 'c', mutation_id => 1) ->> 'status' AS trapped_write;
SELECT livesync.write('ls_trap.t', 'update', '{"id": 1}', '{"v": "y"}', 0, '{"v": "w"}', client_id => 'c', mutation_id => 2) ->> 'status' AS trapped_conflict;
SELECT public.expect_error($q$SELECT livesync.write('ls_trap.skipped', 'insert', '{"id": 1}', '{"v": "x"}')$q$);
SELECT public.expect_error($q$SELECT livesync.resolve_conflict(999999, 'theirs')$q$);
RESET search_path;
RESET ROLE;
-- track's DDL (columns, triggers) runs as the caller, so another party's event
-- trigger with an invoker-rights function fires as the table's owner, exactly as for
-- the owner's own ALTER TABLE, never as the superuser.
CREATE FUNCTION public.audit_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $f$
BEGIN RAISE NOTICE '% ran as %', tg_tag, current_user; END $f$;
CREATE EVENT TRIGGER ls_audit ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'CREATE TRIGGER', 'COMMENT')
    EXECUTE FUNCTION public.audit_ddl();
SET ROLE ls_owner;
CREATE TABLE audited (id int PRIMARY KEY);
SELECT livesync.track('audited');
SELECT livesync.untrack('audited');
DROP TABLE audited;
RESET ROLE;
DROP EVENT TRIGGER ls_audit;
DROP FUNCTION public.audit_ddl();

-- The maintenance check asks who owns the extension: a role that owns another one (a
-- trusted extension it created) and an = that matches that one instead gains nothing.
SELECT current_database() AS db \gset
GRANT CREATE ON DATABASE :"db" TO ls_stranger;
SET ROLE ls_stranger;
CREATE EXTENSION pgcrypto SCHEMA ls_trap;
CREATE FUNCTION ls_trap.eq(a name, b text) RETURNS bool LANGUAGE sql AS $f$
SELECT a::text OPERATOR(pg_catalog.=) 'pgcrypto' $f$;
CREATE OPERATOR ls_trap.= (LEFTARG = name, RIGHTARG = text, FUNCTION = ls_trap.eq);
CREATE FUNCTION ls_trap.eq(a name, b name) RETURNS bool LANGUAGE sql AS $f$
SELECT a::text OPERATOR(pg_catalog.=) 'pgcrypto' $f$;
CREATE OPERATOR ls_trap.= (LEFTARG = name, RIGHTARG = name, FUNCTION = ls_trap.eq);
SET search_path = ls_trap, pg_catalog;
SELECT public.expect_error($q$SELECT livesync.compact('1 hour')$q$);
RESET search_path;
DROP EXTENSION pgcrypto;
RESET ROLE;
REVOKE CREATE ON DATABASE :"db" FROM ls_stranger;

-- Conflicts on a table with row-level security: the view shows them only to roles the
-- policies do not apply to (asking the policies would run the table's code for
-- whoever browses); resolve_conflict asks them, so a role settles only conflicts
-- of rows it can see.
SET ROLE ls_owner;
CREATE TABLE shared_notes (id int PRIMARY KEY, owner text NOT NULL, body text);
SELECT livesync.track('shared_notes'), livesync.set_policy('shared_notes', 'body', 'manual');
ALTER TABLE shared_notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON shared_notes USING (owner = current_user);
GRANT SELECT, UPDATE ON shared_notes TO ls_app, ls_twin;
INSERT INTO shared_notes VALUES (1, 'ls_app', 'app''s note'), (2, 'ls_twin', 'twin''s note');
RESET ROLE;
SET ROLE ls_app;
SELECT livesync.write('shared_notes', 'update', '{"id": 1}', '{"body": "private draft"}', 0, '{"body": "older"}') ->> 'status' AS app_conflicts;
RESET ROLE;
SELECT id AS hidden_conflict FROM livesync._conflicts WHERE relation = 'shared_notes'::regclass AND resolved_at IS NULL \gset
SET ROLE ls_twin;
SELECT count(*) AS conflicts_seen FROM livesync.conflicts WHERE relation = 'shared_notes'::regclass;
SELECT regexp_replace(expect_error(format($$SELECT livesync.resolve_conflict(%s, 'theirs')$$, :hidden_conflict)), 'conflict \d+', 'conflict N') AS twin_resolves;
SET ROLE ls_app;
SELECT count(*) AS conflicts_seen FROM livesync.conflicts WHERE relation = 'shared_notes'::regclass;
RESET ROLE;
SELECT resolved_at IS NULL AS still_open FROM livesync._conflicts WHERE id = :hidden_conflict;
SET ROLE ls_owner;
SELECT count(*) AS owner_sees FROM livesync.conflicts WHERE relation = 'shared_notes'::regclass;
SET ROLE ls_app;
SELECT livesync.resolve_conflict(:hidden_conflict, 'theirs') ->> 'status' AS app_settles_its_own;
RESET ROLE;

-- The views filter before a caller's own condition sees a row (security_barrier):
-- a cheap function that reports what it is shown sees nothing of other tables.
CREATE FUNCTION public.peek(r regclass, detail text) RETURNS bool
LANGUAGE plpgsql COST 0.0000001 AS $f$ BEGIN RAISE NOTICE 'peeked at % %', r, detail; RETURN true; END $f$;
SET ROLE ls_stranger;
SELECT count(*) AS conflicts_seen FROM livesync.conflicts WHERE peek(relation, theirs::text);
SELECT count(*) AS tracked_seen FROM livesync.tracked WHERE peek(relation, key_columns::text);
SELECT count(*) AS policies_seen FROM livesync.policies WHERE peek(relation, policy);
RESET ROLE;
DROP FUNCTION public.peek(regclass, text);

-- track and untrack change the columns of tables inheriting from the table too, so
-- they need ownership of those as well (as ALTER TABLE does).
SET ROLE ls_owner;
CREATE TABLE parent (id int PRIMARY KEY, v text);
CREATE TABLE child (extra int) INHERITS (parent);
RESET ROLE;
ALTER TABLE child OWNER TO ls_app;
SET ROLE ls_owner;
SELECT expect_error($$SELECT livesync.track('parent')$$);
RESET ROLE;
SELECT count(*) AS livesync_columns_on_child FROM pg_attribute
WHERE attrelid = 'child'::regclass AND attname LIKE '\_livesync%' AND NOT attisdropped;
DROP TABLE child, parent;

-- DDL that takes a tracked table's key away through an object it depends on is
-- refused like a direct one; compact refuses a negative age.
SET ROLE ls_owner;
CREATE COLLATION ls_c FROM "C";
CREATE TABLE keyed (k text COLLATE ls_c PRIMARY KEY, v text);
SELECT livesync.track('keyed');
SELECT expect_error('DROP COLLATION ls_c CASCADE');
RESET ROLE;
SELECT expect_error($$SELECT livesync.compact('-1 day')$$);
SELECT expect_error($$SELECT livesync.compact('1 mon -40 days')$$);

-- _write_json (PUBLIC: write_batch calls it as the caller) fails like write, with an
-- ERROR, so a direct call keeps nothing of what it did before failing (here a
-- manual conflict stored before a trigger vetoed the update).
CREATE TABLE vetoing (id int PRIMARY KEY, v text, w text);
SELECT livesync.track('vetoing'), livesync.set_policy('vetoing', 'v', 'manual');
INSERT INTO vetoing VALUES (1, 'a', 'a');
CREATE FUNCTION public.veto() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN IF NEW.w = 'veto' THEN RETURN NULL; END IF; RETURN NEW; END $f$;
CREATE TRIGGER a_veto BEFORE UPDATE ON vetoing FOR EACH ROW EXECUTE FUNCTION public.veto();
SELECT expect_error($$SELECT livesync._write_json('{"rel": "vetoing", "op": "update", "key": {"id": 1}, "new_values": {"v": "b", "w": "veto"}, "base_values": {"v": "x", "w": "x"}}')$$);
SELECT count(*) AS conflicts_left FROM livesync._conflicts WHERE relation = 'vetoing'::regclass;

-- Functions that run as the caller keep the caller's search_path, so keys whose =
-- lives outside pg_catalog (citext) compare as the table does.
CREATE EXTENSION IF NOT EXISTS citext;
CREATE TABLE tags (name citext PRIMARY KEY, n int);
SELECT livesync.track('tags');
INSERT INTO tags VALUES ('Rust', 1);
SELECT livesync.row_version('tags', '{"name": "rust"}') > 0 AS found_case_insensitively;
SELECT livesync.write('tags', 'update', '{"name": "RUST"}', '{"n": 2}') -> 'row' AS written;

DROP TABLE vetoing, tags;
DROP FUNCTION public.veto();
DROP TABLE shared_notes, keyed, ls_trap.t, ls_trap.skipped;
DROP SCHEMA ls_trap CASCADE;
DROP COLLATION ls_c;
DROP FUNCTION public.stranger_untracks();
DROP FUNCTION public.livesync_state();
DROP TABLE notes, drafts;
DROP OWNED BY ls_owner, ls_app, ls_twin, ls_viewer, ls_stranger, ls_bridge, ls_janitor;
DROP ROLE ls_owner, ls_app, ls_twin, ls_viewer, ls_stranger, ls_bridge, ls_janitor;
