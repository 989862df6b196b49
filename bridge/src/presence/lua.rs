//! The Lua scripts of the Redis presence store: each runs atomically on keys of one
//! room (or the node registry) only, so they work on Redis Cluster (one hash slot
//! per room thanks to the `{room}` tag) and two nodes never race each other.
//!
//! Room scripts get the room's seven keys (see `redis::room_keys`) and
//! `ARGV[1]` = how long to keep an idle room's keys (the color memory, ms),
//! `ARGV[2]` = the member TTL (ms), then their own arguments. A member is returned
//! as `{connection, meta json, state json, deadline ms}`; `meta` holds
//! `{user, node, color, joined_at, ttl}` and is the only JSON Lua reads: the client's
//! state is stored as sent and never decoded by cjson (which would turn `[]` into `{}`
//! and round numbers).
//!
//! Times come from Redis (`TIME`), so bridges' clocks need not agree.

use std::sync::LazyLock;

use redis::Script;

use super::palette::PALETTE;

/// Shared by every room script.
const ROOM_PRELUDE: &str = r#"
local MEMBERS, STATE, EXPIRY, USERS, HELD, COLORS, SEEN =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local MEMORY, TTL = tonumber(ARGV[1]), tonumber(ARGV[2])

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fmt(n) return string.format('%d', n) end

-- Idle rooms vanish by themselves: every write pushes back all their keys' expiry
-- together.
local function touch()
  for i = 1, 7 do redis.call('PEXPIRE', KEYS[i], MEMORY) end
end

local function entry(conn)
  local meta = redis.call('HGET', MEMBERS, conn)
  if not meta then return nil end
  local state = redis.call('HGET', STATE, conn) or 'null'
  local deadline = redis.call('ZSCORE', EXPIRY, conn) or '0'
  return {conn, meta, state, deadline}
end

local function decode(meta)
  local ok, m = pcall(cjson.decode, meta)
  if ok and type(m) == 'table' and type(m.user) == 'string' then return m end
  return nil
end

-- USERS: user -> "<connections present> <color>"
local function user_slot(user)
  local v = redis.call('HGET', USERS, user)
  if not v then return 0, nil end
  local n, color = string.match(v, '^(%d+) (.+)$')
  if not n then return 0, nil end
  return tonumber(n), color
end

local function held(color)
  return tonumber(redis.call('HGET', HELD, color) or '0') > 0
end

local function user_hash(user)
  local h = 0
  for i = 1, #user do h = (h * 31 + string.byte(user, i)) % 4294967296 end
  return h
end

-- palette.rs rules 2-4 (rule 1, another tab, is the caller's).
local function choose(user, remembered)
  if remembered and not held(remembered) then return remembered end
  for _, c in ipairs(PALETTE) do
    if not held(c) then return c end
  end
  if remembered then return remembered end
  return PALETTE[user_hash(user) % #PALETTE + 1]
end

local function remove(conn)
  local e = entry(conn)
  redis.call('HDEL', MEMBERS, conn)
  redis.call('HDEL', STATE, conn)
  redis.call('ZREM', EXPIRY, conn)
  if not e then return nil end
  local m = decode(e[2])
  if m then
    local n, color = user_slot(m.user)
    if n <= 1 then
      redis.call('HDEL', USERS, m.user)
      if color and redis.call('HINCRBY', HELD, color, -1) <= 0 then
        redis.call('HDEL', HELD, color)
      end
      -- The color is remembered from the user's last departure.
      redis.call('ZADD', SEEN, fmt(now_ms()), m.user)
    else
      redis.call('HSET', USERS, m.user, fmt(n - 1) .. ' ' .. color)
    end
  end
  return e
end

-- Removes members past their deadline, every member of `dead_node` (when not '') and
-- the `force`d connections; returns them.
local function expire(now, dead_node, force)
  local out = {}
  local function take(conn)
    local e = remove(conn)
    if e then table.insert(out, e) end
  end
  for _, conn in ipairs(redis.call('ZRANGEBYSCORE', EXPIRY, '-inf', '(' .. fmt(now))) do
    take(conn)
  end
  for _, conn in ipairs(force) do take(conn) end
  if dead_node ~= '' then
    local all = redis.call('HGETALL', MEMBERS)
    for i = 1, #all, 2 do
      local m = decode(all[i + 1])
      if m and m.node == dead_node then take(all[i]) end
    end
  end
  return out
end

local function live_members(now)
  local out = {}
  for _, conn in ipairs(redis.call('ZRANGEBYSCORE', EXPIRY, fmt(now), '+inf')) do
    local e = entry(conn)
    if e then table.insert(out, e) end
  end
  return out
end

-- Forgets the colors of users gone for longer than the color memory (a few per call).
local function forget(now)
  local old = redis.call('ZRANGEBYSCORE', SEEN, '-inf', '(' .. fmt(now - MEMORY), 'LIMIT', 0, 32)
  for _, u in ipairs(old) do
    redis.call('ZREM', SEEN, u)
    if user_slot(u) == 0 then redis.call('HDEL', COLORS, u) end
  end
end

-- Adds a member whose color is decided; `n` is the user's connections already here.
local function insert(conn, user, node, color, joined_at, state, now, n)
  if n == 0 then redis.call('HINCRBY', HELD, color, 1) end
  redis.call('HSET', USERS, user, fmt(n + 1) .. ' ' .. color)
  redis.call('HSET', COLORS, user, color)
  redis.call('ZADD', SEEN, fmt(now), user)
  redis.call('HSET', MEMBERS, conn,
    cjson.encode({user = user, node = node, color = color, joined_at = joined_at, ttl = TTL}))
  redis.call('HSET', STATE, conn, state)
  redis.call('ZADD', EXPIRY, fmt(now + TTL), conn)
  touch()
end
"#;

/// ARGV[3..]: connection, user, node, state.
/// Returns `{member, expired members, members now}`.
const JOIN: &str = r#"
local conn, user, node, state = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local now = now_ms()
local expired = expire(now, '', {})
local meta = redis.call('HGET', MEMBERS, conn)
if meta then
  local m = decode(meta)
  if m and m.user == user then
    -- Joining again: new state, same color and joined_at.
    redis.call('HSET', STATE, conn, state)
    redis.call('ZADD', EXPIRY, fmt(now + TTL), conn)
    touch()
    return {entry(conn), expired, live_members(now)}
  end
  local e = remove(conn)
  if e then table.insert(expired, e) end
end
forget(now)
local n, color = user_slot(user)
if n == 0 then
  color = choose(user, redis.call('HGET', COLORS, user))
end
insert(conn, user, node, color, now, state, now, n)
return {entry(conn), expired, live_members(now)}
"#;

/// ARGV[3..]: connection, state. Returns the member, or an empty list.
const UPDATE: &str = r#"
local conn, state = ARGV[3], ARGV[4]
if redis.call('HEXISTS', MEMBERS, conn) == 0 then return {} end
redis.call('HSET', STATE, conn, state)
redis.call('ZADD', EXPIRY, fmt(now_ms() + TTL), conn)
touch()
return entry(conn)
"#;

/// ARGV[3]: connection. Returns the member removed, or an empty list.
const LEAVE: &str = r#"
return remove(ARGV[3]) or {}
"#;

/// Returns the members whose deadline has not passed.
const MEMBERS: &str = r#"
return live_members(now_ms())
"#;

/// ARGV[3..]: connections. Pushes back their deadlines; returns those not members.
const REFRESH: &str = r#"
local deadline = fmt(now_ms() + TTL)
local missing = {}
for i = 3, #ARGV do
  if redis.call('HEXISTS', MEMBERS, ARGV[i]) == 1 then
    redis.call('ZADD', EXPIRY, deadline, ARGV[i])
  else
    table.insert(missing, ARGV[i])
  end
end
touch()
return missing
"#;

/// ARGV[3]: a dead node ('' for none); ARGV[4..]: connections to remove anyway.
/// Returns the members removed.
const SWEEP: &str = r#"
local force = {}
for i = 4, #ARGV do table.insert(force, ARGV[i]) end
return expire(now_ms(), ARGV[3], force)
"#;

/// ARGV[3..]: connection, user, node, color, joined_at, state: a member the node
/// holds, put back if missing (keeping its color unless another present user took it
/// meanwhile). Returns `{'1' if put back else '0', member}`.
const RESTORE: &str = r#"
local conn, user, node, color, joined_at, state = ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
local now = now_ms()
if redis.call('HEXISTS', MEMBERS, conn) == 1 then
  redis.call('ZADD', EXPIRY, fmt(now + TTL), conn)
  touch()
  return {'0', entry(conn)}
end
local n, current = user_slot(user)
if n > 0 then
  color = current
elseif held(color) then
  color = choose(user, false)
end
insert(conn, user, node, color, joined_at, state, now, n)
return {'1', entry(conn)}
"#;

/// KEYS[1]: the node registry. ARGV: node, TTL (ms). Returns 1 if the node was not
/// registered (first beat, or reaped by other nodes, or Redis lost it).
const NODE_BEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZADD', KEYS[1], string.format('%d', now + tonumber(ARGV[2])), ARGV[1])
"#;

/// KEYS[1]: the node registry. ARGV: this node, how many. Returns nodes whose
/// heartbeat deadline passed.
const DEAD_NODES: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%d', now), 'LIMIT', 0, tonumber(ARGV[2]))) do
  if node ~= ARGV[1] then table.insert(out, node) end
end
return out
"#;

/// KEYS[1]: the node registry. ARGV[1]: a reaped node. Unregisters it unless it came
/// back meanwhile.
const NODE_FORGET: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if deadline and tonumber(deadline) < now then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"#;

fn room_script(body: &str) -> Script {
    let palette: Vec<String> = PALETTE.iter().map(|c| format!("'{c}'")).collect();
    Script::new(&format!(
        "local PALETTE = {{{}}}\n{ROOM_PRELUDE}\n{body}",
        palette.join(", ")
    ))
}

pub(super) static JOIN_SCRIPT: LazyLock<Script> = LazyLock::new(|| room_script(JOIN));
pub(super) static UPDATE_SCRIPT: LazyLock<Script> = LazyLock::new(|| room_script(UPDATE));
pub(super) static LEAVE_SCRIPT: LazyLock<Script> = LazyLock::new(|| room_script(LEAVE));
pub(super) static MEMBERS_SCRIPT: LazyLock<Script> = LazyLock::new(|| room_script(MEMBERS));
pub(super) static REFRESH_SCRIPT: LazyLock<Script> = LazyLock::new(|| room_script(REFRESH));
pub(super) static SWEEP_SCRIPT: LazyLock<Script> = LazyLock::new(|| room_script(SWEEP));
pub(super) static RESTORE_SCRIPT: LazyLock<Script> = LazyLock::new(|| room_script(RESTORE));
pub(super) static NODE_BEAT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(NODE_BEAT));
pub(super) static DEAD_NODES_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(DEAD_NODES));
pub(super) static NODE_FORGET_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(NODE_FORGET));
