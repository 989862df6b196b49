-- what this shows: livesync.write merges a stale client's values field by field.
-- A column only the client changed is applied, one only others changed is kept,
-- and one both changed goes to the column's policy. Each policy below, then the
-- users' scenario of two offline devices editing one row.
\set SHOW_CONTEXT never
SET timezone = 'UTC';
CREATE TABLE items (
    id       int PRIMARY KEY,
    title    text,           -- lww (the table default)
    notes    text,           -- concat
    duration int,            -- max
    low      int,            -- min
    due      timestamptz,    -- max over timestamps
    tags     text[],         -- union
    playlist jsonb,          -- append
    likes    int,            -- sum
    balance  numeric(12,2),  -- sum over numeric
    owner    text,           -- server_wins
    color    text,           -- client_wins
    status   text            -- manual
);
SELECT livesync.track('items');
SELECT livesync.set_policy('items', 'notes', 'concat');
SELECT livesync.set_policy('items', 'duration', 'max');
SELECT livesync.set_policy('items', 'low', 'min');
SELECT livesync.set_policy('items', 'due', 'max');
SELECT livesync.set_policy('items', 'tags', 'union');
SELECT livesync.set_policy('items', 'playlist', 'append');
SELECT livesync.set_policy('items', 'likes', 'sum');
SELECT livesync.set_policy('items', 'balance', 'sum');
SELECT livesync.set_policy('items', 'owner', 'server_wins');
SELECT livesync.set_policy('items', 'color', 'client_wins');
SELECT livesync.set_policy('items', 'status', 'manual');
SELECT column_name, policy FROM livesync.policies WHERE relation = 'items'::regclass ORDER BY column_name NULLS FIRST;

-- The base row both devices start from.
SELECT shown(livesync.write('items', 'insert', '{"id": 1}',
    '{"title": "Trip", "notes": "pack", "duration": 10, "low": 50, "due": "2026-05-01T00:00:00Z",
      "tags": ["travel"], "playlist": ["intro"], "likes": 0, "balance": 10.00,
      "owner": "ana", "color": "red", "status": "draft"}', hlc => '1000:0:server'));
SELECT livesync.row_version('items', '{"id": 1}') AS v0 \gset
SELECT livesync.current_position() AS p0 \gset

-- If the row has not moved since the base, the write is simply applied.
SELECT shown(livesync.write('items', 'update', '{"id": 1}', '{"title": "Trip!"}', :v0, '{"title": "Trip"}', hlc => '1500:0:phone-a'));
SELECT title FROM items WHERE id = 1;
SELECT livesync.write('items', 'update', '{"id": 1}', '{"title": "Trip"}', NULL, NULL, hlc => '1600:0:phone-a') ->> 'status' AS plain_overwrite;
SELECT livesync.row_version('items', '{"id": 1}') AS v0 \gset

-- Device A (offline at clock 2000) edits every column and syncs first: applied.
SELECT shown(livesync.write('items', 'update', '{"id": 1}',
    '{"title": "Trip to Oslo", "notes": "pack, tickets", "duration": 25, "low": 40, "due": "2026-06-01T00:00:00Z",
      "tags": ["travel", "work"], "playlist": ["intro", "song-a"], "likes": 1, "balance": 10.10,
      "owner": "bea", "color": "blue", "status": "booked"}',
    :v0,
    '{"title": "Trip", "notes": "pack", "duration": 10, "low": 50, "due": "2026-05-01T00:00:00Z",
      "tags": ["travel"], "playlist": ["intro"], "likes": 0, "balance": 10.00,
      "owner": "ana", "color": "red", "status": "draft"}',
    'phone-a', 1, '2000:0:phone-a'));

-- Device B edited the same base offline (clock 3000 for title: a later edit) and
-- syncs second: every column is contested and settled by its policy.
SELECT jsonb_pretty(shown(livesync.write('items', 'update', '{"id": 1}',
    '{"title": "Trip to Bergen", "notes": "pack, passport", "duration": 15, "low": 30, "due": "2026-05-15T00:00:00Z",
      "tags": ["travel", "family"], "playlist": ["intro", "song-b", "song-a"], "likes": 1, "balance": 10.20,
      "owner": "cai", "color": "green", "status": "cancelled"}',
    :v0,
    '{"title": "Trip", "notes": "pack", "duration": 10, "low": 50, "due": "2026-05-01T00:00:00Z",
      "tags": ["travel"], "playlist": ["intro"], "likes": 0, "balance": 10.00,
      "owner": "ana", "color": "red", "status": "draft"}',
    'phone-b', 1, '3000:0:phone-b')));
-- the stored row: every decision above, and status still A's (manual waits for a person)
SELECT id, title, notes, duration, low, due, tags, playlist, likes, balance, owner, color, status,
       (_livesync_clocks -> 'title') - 3 AS title_clock,
       (_livesync_clocks -> 'title' ->> 3)::int8 = jsonb_hash_extended(to_jsonb(title), 0) AS clock_hash_matches
FROM items WHERE id = 1;
-- both devices' writes are in the log, each tagged with its client and mutation
SELECT pos, op, delta, actor FROM log_after(:p0);
SELECT client_id, mutation_id FROM livesync.changes_since(:p0) ORDER BY position;
-- the manual column's conflict is stored for resolve_conflict
SELECT relation, key, column_name, base, mine, theirs, client_id, mutation_id, resolved_at IS NULL AS open
FROM livesync.conflicts;

-- lww in detail: the comparison is with the clock of the write that set the stored value.
SELECT livesync.row_version('items', '{"id": 1}') AS v1 \gset
-- an older clock than the stored title's (3000:0:phone-b) loses
SELECT outcome(livesync.write('items', 'update', '{"id": 1}', '{"title": "old edit"}', :v1 - 1, '{"title": "Trip to Oslo"}', hlc => '2500:0:phone-c'), 'title');
-- an equal wall time and counter: the node id breaks the tie ("phone-c" > "phone-b")
SELECT outcome(livesync.write('items', 'update', '{"id": 1}', '{"title": "tie"}', :v1 - 1, '{"title": "Trip to Oslo"}', hlc => '3000:0:phone-c'), 'title');
-- ...and the same clock from a lower node loses
SELECT outcome(livesync.write('items', 'update', '{"id": 1}', '{"title": "tie lost"}', :v1 - 1, '{"title": "Trip to Oslo"}', hlc => '3000:0:phone-a'), 'title');
-- a write without a clock is stamped by the server after every clock the row holds
SELECT outcome(livesync.write('items', 'update', '{"id": 1}', '{"title": "server time"}', :v1 - 1, '{"title": "Trip to Oslo"}'), 'title');
-- a value set by plain SQL carries no clock: any client clock beats it
UPDATE items SET title = 'set by SQL' WHERE id = 1;
SELECT outcome(livesync.write('items', 'update', '{"id": 1}', '{"title": "any clock"}', :v1 - 1, '{"title": "Trip to Oslo"}', hlc => '1:0:old-phone'), 'title');
SELECT title FROM items WHERE id = 1;

-- A column only the client changed is applied; one only others changed is kept;
-- the same change on both sides needs nothing.
UPDATE items SET owner = 'dan' WHERE id = 1;
SELECT shown(livesync.write('items', 'update', '{"id": 1}', '{"color": "black", "low": 30}',
    :v1, '{"color": "green", "low": 30}')) - 'row';
SELECT owner, color, low FROM items WHERE id = 1;

-- Counters: two devices that each counted +1 from the same base make +2, even
-- though the stored value already equals each device's new value.
CREATE TABLE counters (id int PRIMARY KEY, n int, amount numeric);
SELECT livesync.track('counters');
SELECT livesync.set_policy('counters', 'n', 'sum');
SELECT livesync.set_policy('counters', 'amount', 'sum');
INSERT INTO counters VALUES (1, 5, 0.1);
SELECT livesync.row_version('counters', '{"id": 1}') AS c0 \gset
SELECT shown(livesync.write('counters', 'update', '{"id": 1}', '{"n": 6, "amount": 0.3}', :c0, '{"n": 5, "amount": 0.1}'));
SELECT shown(livesync.write('counters', 'update', '{"id": 1}', '{"n": 6, "amount": 0.2}', :c0, '{"n": 5, "amount": 0.1}'));
SELECT n, amount FROM counters;
-- a counter cannot be merged without its base: the write is rejected, nothing changes
SELECT shown(livesync.write('counters', 'update', '{"id": 1}', '{"n": 9}', :c0, '{}'));
SELECT n FROM counters;

-- union and append in detail: only the client's own additions and removals since its
-- base are applied to the stored list; what others removed stays removed
CREATE TABLE lists (id int PRIMARY KEY, tags text[], songs jsonb);
SELECT livesync.track('lists');
SELECT livesync.set_policy('lists', 'tags', 'union');
SELECT livesync.set_policy('lists', 'songs', 'append');
INSERT INTO lists VALUES (1, '{a,b}', '["s1", "s2", "s1"]');
SELECT livesync.row_version('lists', '{"id": 1}') AS l0 \gset
UPDATE lists SET tags = '{a,d}', songs = '["s1", "s1", "s3"]' WHERE id = 1;  -- others: -b +d, -s2 +s3
-- the client removed a, added c (tags) and appended s4 (songs), from the old base
SELECT outcome(r, 'tags'), outcome(r, 'songs')
FROM livesync.write('lists', 'update', '{"id": 1}', '{"tags": ["b", "c"], "songs": ["s1", "s2", "s1", "s4"]}',
                    :l0, '{"tags": ["a", "b"], "songs": ["s1", "s2", "s1"]}') AS r;
-- with no base value, nothing counts as removed and every item sent as added
SELECT outcome(r, 'tags')
FROM livesync.write('lists', 'update', '{"id": 1}', '{"tags": ["z", "d"]}', :l0) AS r;
DROP TABLE lists;

-- manual: resolve_conflict settles the stored conflict, itself a captured write
SELECT id AS conflict FROM livesync.conflicts WHERE column_name = 'status' \gset
SELECT livesync.current_position() AS p1 \gset
SELECT outcome(livesync.resolve_conflict(:conflict, 'mine'), 'status');
SELECT status FROM items WHERE id = 1;
SELECT pos, op, delta FROM log_after(:p1);
SELECT resolved_at IS NOT NULL AS resolved, resolution - 'version' AS resolution FROM livesync.conflicts WHERE id = :conflict;
SELECT regexp_replace(expect_error(format('SELECT livesync.resolve_conflict(%s, %L)', :conflict, 'theirs')), 'conflict \d+', 'conflict N') AS expect_error;
SELECT expect_error('SELECT livesync.resolve_conflict(-1, ''mine'')');
-- two more conflicts, settled with an explicit value and with theirs
SELECT livesync.row_version('items', '{"id": 1}') AS v2 \gset
SELECT outcome(livesync.write('items', 'update', '{"id": 1}', '{"status": "paused"}', :v2 - 1, '{"status": "booked"}'), 'status');
SELECT outcome(livesync.write('items', 'update', '{"id": 1}', '{"status": "done"}', :v2 - 1, '{"status": "booked"}'), 'status');
SELECT array_agg(id ORDER BY id) AS open FROM livesync.conflicts WHERE resolved_at IS NULL \gset
SELECT expect_error(format('SELECT livesync.resolve_conflict(%s, %L)', (:'open'::int8[])[1], 'value'));
SELECT expect_error(format('SELECT livesync.resolve_conflict(%s, %L)', (:'open'::int8[])[1], 'both'));
SELECT outcome(livesync.resolve_conflict((:'open'::int8[])[1], 'value', '"on hold"'), 'status');
SELECT shown(livesync.resolve_conflict((:'open'::int8[])[2], 'theirs'));
SELECT status FROM items WHERE id = 1;
SELECT column_name, mine, resolution ->> 'choice' AS choice, resolution -> 'value' AS value
FROM livesync.conflicts ORDER BY id;

-- set_policy checks what it is given
SELECT expect_error($$SELECT livesync.set_policy('items', 'title', 'newest')$$);
SELECT expect_error($$SELECT livesync.set_policy('items', 'title', 'sum')$$);
SELECT expect_error($$SELECT livesync.set_policy('items', 'title', 'union')$$);
SELECT expect_error($$SELECT livesync.set_policy('items', 'duration', 'concat')$$);
SELECT expect_error($$SELECT livesync.set_policy('items', 'id', 'max')$$);
SELECT expect_error($$SELECT livesync.set_policy('items', 'nope', 'max')$$);
SELECT expect_error($$SELECT livesync.set_policy('items', '_livesync_clocks', 'lww')$$);
SELECT expect_error($$SELECT livesync.set_policy('items', 'sum')$$);
CREATE TABLE not_tracked_here (id int PRIMARY KEY, v int);
SELECT expect_error($$SELECT livesync.set_policy('not_tracked_here', 'v', 'max')$$);
SELECT expect_error($$SELECT livesync.set_policy('not_tracked_here', 'lww')$$);
SELECT livesync.set_policy('items', 'server_wins');
SELECT policy FROM livesync.policies WHERE relation = 'items'::regclass AND column_name IS NULL;
DROP TABLE not_tracked_here;
DROP TABLE counters;
