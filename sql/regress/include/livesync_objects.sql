-- livesync's objects, one line each: functions (with their bodies and grants),
-- columns (with their grants), relations, indexes, views, event triggers. Included
-- by upgrade.sql in a fresh install and in an upgraded one, which must match.
CREATE VIEW public.livesync_objects AS
SELECT 'function ' || p.oid::regprocedure::text || ' ' || md5(pg_get_functiondef(p.oid))
       || ' ' || coalesce(p.proacl::text, '') AS item
FROM pg_proc p WHERE p.pronamespace = 'livesync'::regnamespace
UNION ALL
SELECT format('column %s.%s %s #%s %s %s %s %s', c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
              a.attnum, a.attnotnull, a.attcompression, pg_get_expr(d.adbin, d.adrelid), coalesce(a.attacl::text, ''))
FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
WHERE c.relnamespace = 'livesync'::regnamespace
UNION ALL
SELECT format('relation %s %s %s %s', c.relname, c.relkind, coalesce(c.reloptions::text, ''), coalesce(c.relacl::text, ''))
FROM pg_class c WHERE c.relnamespace = 'livesync'::regnamespace
UNION ALL
SELECT 'index ' || pg_get_indexdef(i.indexrelid)
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid WHERE c.relnamespace = 'livesync'::regnamespace
UNION ALL
SELECT 'view ' || c.relname || ' ' || md5(pg_get_viewdef(c.oid))
FROM pg_class c WHERE c.relnamespace = 'livesync'::regnamespace AND c.relkind = 'v'
UNION ALL
SELECT format('event trigger %s %s %s %s', e.evtname, e.evtevent, e.evtfoid::regproc, e.evttags)
FROM pg_event_trigger e;
