"""Lua scripts run inside Redis: the one-round-trip ingest of an event batch and flat reads
(scripts return flat arrays, so the client does no per-element work beyond the socket read)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from redis.cluster import RedisCluster


class Scripts:
    """Runs the scripts of this module on one client by SHA, loading each the first time it is
    run and again when Redis lost it."""

    def __init__(self, client: redis.Redis | RedisCluster) -> None:
        self.redis = client
        self._shas: dict[str, str] = {}

    def run(self, name: str, keys: Sequence[str], args: Sequence[object]) -> Any:
        """EVALSHA the script `name` (INGEST, REQUEST_READ, ...) with `keys` and `args`."""
        sha = self._shas.get(name)
        if sha is not None:
            try:
                return self.redis.evalsha(sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                pass  # Redis restarted or SCRIPT FLUSH ran: load it again below.
        sha = self.redis.script_load(globals()[name])
        self._shas[name] = sha
        return self.redis.evalsha(sha, len(keys), *keys, *args)


# Shared by both ingest scripts (after `now` and `cfg` are set): decayed scores are stored
# relative to a reference time per list, kept in the decay hash (KEYS[3]) for popularity
# (KEYS[1]) and trending (KEYS[2]); t_pop and t_trend are those reference times.
DECAY_REFERENCES = r"""
local function reference(field, rate, key)
  local t0 = tonumber(redis.call('HGET', KEYS[3], field))
  if not t0 then
    t0 = now
    redis.call('HSET', KEYS[3], field, t0)
  elseif rate * (now - t0) > 200 then
    -- Stored scores grow like exp(rate * t); rescale before they overflow a double.
    local factor = math.exp(-rate * (now - t0))
    redis.call('ZUNIONSTORE', key, 1, key, 'WEIGHTS', string.format('%.17g', factor))
    redis.call('ZREMRANGEBYSCORE', key, '-inf', '1e-12')
    t0 = now
    redis.call('HSET', KEYS[3], field, t0)
  end
  return t0
end
local t_pop = reference('popularity', cfg.pop_rate, KEYS[1])
local t_trend = reference('trending', cfg.trend_rate, KEYS[2])
"""

# Shared by both ingest scripts (after DECAY_REFERENCES): add_item adds one accepted event to
# its item's decayed totals and first-seen time; write_items adds the totals to popularity
# (KEYS[1]), trending (KEYS[2]) and first-seen (KEYS[4]), the batch's counts to the stats
# (KEYS[5]), and returns how many items are new.
ITEM_TOTALS = r"""
local items, item_order = {}, {}
local function add_item(iid, ts, w, uid, first)
  local it = items[iid]
  if not it then
    it = {pop = 0, trend = 0, first = ts, users = {}}
    items[iid] = it
    item_order[#item_order + 1] = iid
  end
  it.pop = it.pop + w * math.exp(cfg.pop_rate * (ts - t_pop))
  it.trend = it.trend + w * math.exp(cfg.trend_rate * (ts - t_trend))
  if ts < it.first then it.first = ts end
  if first and cfg.count_users then it.users[#it.users + 1] = uid end
end
local function write_items(accepted, duplicates)
  local new_items = 0
  for _, iid in ipairs(item_order) do
    local it = items[iid]
    if it.pop > 0 then
      redis.call('ZINCRBY', KEYS[1], string.format('%.17g', it.pop), iid)
      redis.call('ZINCRBY', KEYS[2], string.format('%.17g', it.trend), iid)
    end
    new_items = new_items + redis.call('HSETNX', KEYS[4], iid, math.floor(it.first))
    if #it.users > 0 and redis.call('HEXISTS', catalog_key, iid) == 0 then
      -- Not in the live catalog: count its distinct users for the new-item gate.
      local uk = cfg.keys.item_users[1] .. iid .. cfg.keys.item_users[2]
      if redis.call('PFADD', uk, unpack(it.users)) == 1 then
        redis.call('EXPIRE', uk, cfg.item_users_ttl)
      end
    end
  end
  if accepted > 0 then
    redis.call('HINCRBY', KEYS[5], 'accepted', accepted)
    redis.call('HINCRBY', KEYS[5], 'new_items', new_items)
  end
  if duplicates > 0 then
    redis.call('HINCRBY', KEYS[5], 'duplicates', duplicates)
  end
  return new_items
end
"""

# Ingest one batch atomically. Per event: dedupe on its event_id (SET NX with a TTL on its global
# seen_event key, which the client builds from Keys and sends in column k), XADD the
# event to the stream, update the user's recent items and count the co-view pairs with the items
# the user touched in the co-view window; per co-view pair once: its increment (and per list the
# TTL and cap); per user once: counters, TTLs and the response cache; per item once: decayed
# popularity, trending, first-seen and the TTL of its co-view list.
#
# Repeats (abuse resistance): the n-th event of a user on an item within the repeat window
# (the user's `repeats` hash, whose TTL is the window) weighs weight / n, and 0 after
# repeat_cap; only the first adds co-view and counts the user among the item's distinct users.
#
# KEYS: popularity, trending, decay, first_seen, stats, stream, catalog in_stock
# ARGV: now, config JSON, batch JSON (columns k,u,i,t,ts,w), one stream payload per event
# Returns {accepted, new_items, duplicate positions (0-based)...}
#
# User and item keys are built inside the script, from the (prefix, suffix) around the id that
# the config's `keys` carries from Keys, so this script needs a single Redis node; on Redis
# Cluster, ClusterIngest (feature_repo/ingest.py) does its work.
INGEST = (
    r"""
local now = tonumber(ARGV[1])
local cfg = cjson.decode(ARGV[2])
local b = cjson.decode(ARGV[3])
local n = #b.k
local function key_of(kind, id)
  local affixes = cfg.keys[kind]
  return affixes[1] .. id .. affixes[2]
end
local catalog_key = KEYS[7]

"""
    + DECAY_REFERENCES
    + ITEM_TOTALS
    + r"""
local accepted = 0
local out = {0, 0}
local users, user_order = {}, {}
-- The batch's co-view pairs, counted here and written once each after the loop, with one TTL and
-- cap check per list (per event they were three commands a new pair: ZINCRBY, EXPIRE, ZCARD).
local coview, coview_order = {}, {}
local function add_coview(earlier, later)
  local counts = coview[earlier]
  if not counts then
    counts = {n = {}, order = {}}
    coview[earlier] = counts
    coview_order[#coview_order + 1] = earlier
  end
  local c = counts.n[later]
  if not c then
    c = 0
    counts.order[#counts.order + 1] = later
  end
  counts.n[later] = c + 1
end

for idx = 1, n do
  local uid, iid, ts, w = b.u[idx], b.i[idx], b.ts[idx], b.w[idx]
  if redis.call('SET', b.k[idx], '1', 'NX', 'EX', cfg.dedupe_ttl) then
    accepted = accepted + 1
    redis.call('XADD', KEYS[6], '*', 'e', ARGV[3 + idx])
    local first = true
    if cfg.repeat_window > 0 then
      local prior = redis.call('HINCRBY', key_of('repeats', uid), iid, 1) - 1
      first = prior == 0
      if prior >= cfg.repeat_cap then w = 0 else w = w / (1 + prior) end
    end
    local u = users[uid]
    if not u then
      u = {counts = {}}
      users[uid] = u
      user_order[#user_order + 1] = uid
    end
    local recent = key_of('recent', uid)
    if redis.call('ZADD', recent, 'NX', ts, iid) == 1 then
      -- A new item in the user's window is co-viewed after each item still in the window
      -- (once per window: an item that left the recent items and came back adds nothing).
      local prev = {}
      if first then
        prev = redis.call('ZREVRANGEBYSCORE', recent, '+inf', ts - cfg.coview_seconds,
                          'LIMIT', 0, cfg.coview_items + 1)
      end
      local done = 0
      for _, j in ipairs(prev) do
        if j ~= iid and done < cfg.coview_items then
          done = done + 1
          add_coview(j, iid)
        end
      end
      -- The size is read once per user and then counted here (only this script's adds and
      -- trims change it), so the trim is a command only when the recent items are over the cap.
      if u.size then u.size = u.size + 1 else u.size = redis.call('ZCARD', recent) end
      if u.size > cfg.recent_cap then
        redis.call('ZREMRANGEBYRANK', recent, 0, -cfg.recent_cap - 1)
        u.size = cfg.recent_cap
      end
    else
      redis.call('ZADD', recent, 'GT', ts, iid)
    end
    local et = b.t[idx]
    u.counts[et] = (u.counts[et] or 0) + 1
    add_item(iid, ts, w, uid, first)
  else
    out[#out + 1] = idx - 1
  end
end

for _, uid in ipairs(user_order) do
  local u = users[uid]
  local counters = key_of('counters', uid)
  for et, c in pairs(u.counts) do
    redis.call('HINCRBY', counters, et, c)
  end
  redis.call('HSET', counters, 'last_seen', now)
  redis.call('EXPIRE', counters, cfg.counters_ttl)
  redis.call('EXPIRE', key_of('recent', uid), cfg.recent_ttl)
  redis.call('DEL', key_of('cache', uid))
  if cfg.repeat_window > 0 then
    local rk = key_of('repeats', uid)
    if redis.call('TTL', rk) < 0 then redis.call('EXPIRE', rk, cfg.repeat_window) end
  end
end
for _, j in ipairs(coview_order) do
  local counts, ck, grew = coview[j], key_of('coview', j), false
  for _, later in ipairs(counts.order) do
    local c = counts.n[later]
    -- The new score equals the increment only for a new member.
    if tonumber(redis.call('ZINCRBY', ck, c, later)) == c then grew = true end
  end
  if grew then
    -- New members: the key may be new (give it a TTL) and may be over its cap.
    redis.call('EXPIRE', ck, cfg.coview_ttl)
    local size = redis.call('ZCARD', ck)
    if size > cfg.coview_cap then
      redis.call('ZREMRANGEBYRANK', ck, 0, size - cfg.coview_cap - 1)
    end
  end
end
for _, iid in ipairs(item_order) do
  -- An item's own events keep its co-view list alive.
  redis.call('EXPIRE', key_of('coview', iid), cfg.coview_ttl)
end
out[1] = accepted
out[2] = write_items(accepted, #out - 2)
return out
"""
)

# The {global} part of an ingest on Redis Cluster (ClusterIngest), where every other update
# is a plain command in a pipeline: decayed popularity, trending, first-seen and stats.
# KEYS: popularity, trending, decay, first_seen, stats, catalog in_stock
# ARGV: now, config JSON, accepted events JSON (columns i, ts, w after repeats, u, f: first of
#       the user on the item in the window), accepted, duplicates
INGEST_GLOBAL = (
    r"""
local now = tonumber(ARGV[1])
local cfg = cjson.decode(ARGV[2])
local b = cjson.decode(ARGV[3])
local catalog_key = KEYS[6]
"""
    + DECAY_REFERENCES
    + ITEM_TOTALS
    + r"""
for idx = 1, #b.i do
  add_item(b.i[idx], b.ts[idx], b.w[idx], b.u[idx], b.f[idx])
end
return write_items(tonumber(ARGV[4]), tonumber(ARGV[5]))
"""
)

# Everything one recommendation request reads, in one round trip: the cached response for a
# signature (and nothing else when there is one), else recent items, batch candidates, the
# profile hash and, for each of the newest n_anchors recent items, the top-k of each named
# per-item list.
# KEYS: cache, recent, candidates, profile.
# ARGV: signature, now, cache ttl, n recent, n candidates, n anchors, k, item key prefix head
#       (`<ns>:{item:`), item key prefix tail (`}:`), list key suffixes...
# Like INGEST, it derives item keys, so it needs a single Redis node; with n anchors 0 it
# touches only the user's keys (one slot), and so runs on Redis Cluster too (ClusterReads).
REQUEST_READ = r"""
local hit = redis.call('HGET', KEYS[1], ARGV[1])
if hit then
  local sep = string.find(hit, '|', 1, true)
  if sep and tonumber(string.sub(hit, 1, sep - 1)) + tonumber(ARGV[3]) >= tonumber(ARGV[2]) then
    return {string.sub(hit, sep + 1)}
  end
end
local recent = redis.call('ZREVRANGE', KEYS[2], 0, tonumber(ARGV[4]) - 1, 'WITHSCORES')
local out = {false, recent,
             redis.call('ZREVRANGE', KEYS[3], 0, tonumber(ARGV[5]) - 1, 'WITHSCORES'),
             redis.call('HGETALL', KEYS[4])}
local anchors = math.min(tonumber(ARGV[6]), #recent / 2)
local last = tonumber(ARGV[7]) - 1
for j = 1, anchors do
  local prefix = ARGV[8] .. recent[2 * j - 1] .. ARGV[9]
  for idx = 10, #ARGV do
    out[#out + 1] = redis.call('ZREVRANGE', prefix .. ARGV[idx], 0, last, 'WITHSCORES')
  end
end
return out
"""

# The global lists: decayed popularity and trending with their reference times, the batch
# loop's popularity and the live catalog's version.
# KEYS: popularity, trending, batch_popularity, decay, catalog meta. ARGV: n.
GLOBAL_READ = r"""
local n = tonumber(ARGV[1]) - 1
return {redis.call('ZREVRANGE', KEYS[1], 0, n, 'WITHSCORES'),
        redis.call('ZREVRANGE', KEYS[2], 0, n, 'WITHSCORES'),
        redis.call('ZREVRANGE', KEYS[3], 0, n, 'WITHSCORES'),
        redis.call('HMGET', KEYS[4], 'popularity', 'trending'),
        redis.call('HGET', KEYS[5], 'version')}
"""

# The live catalog's attributes of a list of items in one round trip (every key is in the
# `{global}` slot, so this runs on Redis Cluster too): how many items the catalog has, each
# attribute hash's value per item, and, when asked, the distinct users of each item the catalog
# lacks (false for the others).
# KEYS: the in_stock hash, then the hashes of the other attributes wanted.
# ARGV: count users ('1' or '0'), item_users key head, tail, item ids...
CATALOG_READ = r"""
local n = #ARGV - 3
local out = {redis.call('HLEN', KEYS[1])}
for k = 1, #KEYS do
  local values = {}
  for start = 4, #ARGV, 1000 do
    local part = redis.call('HMGET', KEYS[k], unpack(ARGV, start, math.min(start + 999, #ARGV)))
    for j = 1, #part do values[#values + 1] = part[j] end
  end
  out[#out + 1] = values
end
local users = {}
if ARGV[1] == '1' then
  local stock = out[2]
  for j = 1, n do
    if stock[j] then
      users[j] = false
    else
      users[j] = redis.call('PFCOUNT', ARGV[2] .. ARGV[3 + j] .. ARGV[3])
    end
  end
end
out[#out + 1] = users
return out
"""

# A trend list and what the service shows with it, in one round trip (every key is in the
# `{global}` slot, so this runs on Redis Cluster too): the top n items with scores, their info
# JSON, the categories' trend JSON (all of them, or the one named) and the push metadata.
# KEYS: list, info, categories, meta. ARGV: n, category ('' for all categories).
TREND_READ = r"""
local top = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
local ids = {}
for j = 1, #top, 2 do
  ids[#ids + 1] = top[j]
end
local info = {}
if #ids > 0 then
  info = redis.call('HMGET', KEYS[2], unpack(ids))
end
local categories
if ARGV[2] == '' then
  categories = redis.call('HGETALL', KEYS[3])
else
  categories = {ARGV[2], redis.call('HGET', KEYS[3], ARGV[2])}
end
return {top, info, categories, redis.call('HGETALL', KEYS[4])}
"""

# How many entries of a stream come after an id, counted in pages inside Redis (for a server
# without XINFO's `lag`, before 7.0). KEYS: the stream. ARGV: the id (exclusive).
STREAM_COUNT_AFTER = r"""
local n, start = 0, '(' .. ARGV[1]
while true do
  local page = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 1000)
  n = n + #page
  if #page < 1000 then return n end
  start = '(' .. page[#page][1]
end
"""

# Top entries of several sorted sets at once, flat. KEYS: the sets. ARGV: n.
MULTI_TOP = r"""
local n = tonumber(ARGV[1]) - 1
local out = {}
for idx = 1, #KEYS do
  out[idx] = redis.call('ZREVRANGE', KEYS[idx], 0, n, 'WITHSCORES')
end
return out
"""


# Token buckets of the service's rate limiter, taken from all or none (KEYS: the buckets; ARGV:
# per bucket its rate per second, its capacity and how many tokens the caller would like). A
# bucket holds `tokens` counted at time `ts` and refills at `rate` up to its capacity, on Redis'
# own clock, so every worker and replica counts the same time. When every bucket has a token,
# takes from each what the caller wants up to what it has and returns {0, taken...}; else takes
# nothing and returns {milliseconds until every bucket has a token again}.
RATE_LIMIT = r"""
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
local wait = 0
local tokens = {}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[3 * i - 2])
  local capacity = tonumber(ARGV[3 * i - 1])
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local left = tonumber(state[1])
  if left == nil then
    left = capacity
  else
    left = math.min(capacity, left + math.max(0, now - tonumber(state[2])) * rate)
  end
  tokens[i] = left
  if left < 1 then
    wait = math.max(wait, (1 - left) / rate)
  end
end
if wait > 0 then
  return {math.max(1, math.ceil(wait * 1000))}
end
local taken = {0}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[3 * i - 2])
  local capacity = tonumber(ARGV[3 * i - 1])
  local take = math.max(1, math.min(tonumber(ARGV[3 * i]), math.floor(tokens[i])))
  taken[i + 1] = take
  redis.call('HSET', key, 'tokens', string.format('%.6f', tokens[i] - take),
             'ts', string.format('%.6f', now))
  -- Gone once it would be full again: an idle client leaves nothing behind.
  redis.call('PEXPIRE', key, math.ceil(capacity / rate * 1000) + 1000)
end
return taken
"""
