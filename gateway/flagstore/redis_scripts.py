"""The Lua scripts behind every Redis flag store write (see `gateway.flagstore.redis`).

Each write is one script so that the compare, the write, the audit entry and the change message
happen atomically: no replica can see a new version without its audit event, and two writers
with the same If-Match cannot both win. Every key a script touches is passed in KEYS (all under
one hash tag), so the scripts also run on Redis Cluster.

Conventions shared with the Python side:
- absent values travel as '' (Lua tables cannot hold nil);
- the audit event arrives as a flat name/value list at the end of ARGV (the comment above
  each script says from where); put and delete fill in version_before/version_after;
- the flag and rollout scripts reply `{status, value}`, status 'ok', 'exists', 'conflict',
  'missing' or 'overlap' (value: the other flag); the counting scripts reply with the counts
  after.
"""

from __future__ import annotations

# Routes of every flag, for the checks that span flags: `{P}:routes` maps a flag key to its
# route as JSON [path prefix without trailing '/', host or '', [methods] or [] for any]. A flag
# written before that hash existed has no entry there: its route is read from its document
# (its hash shares the hash tag, so this also runs on a cluster).
_ROUTES = """
local function route_of_doc(doc)
  local ok, d = pcall(cjson.decode, doc or '')
  if not ok or type(d) ~= 'table' or type(d.route) ~= 'table' then return nil end
  local r = d.route
  if type(r.path_prefix) ~= 'string' then return nil end
  local host = type(r.host) == 'string' and string.lower(r.host) or ''
  local methods = {}
  if type(r.methods) == 'table' then
    for _, m in ipairs(r.methods) do methods[#methods + 1] = string.upper(tostring(m)) end
  end
  return {(string.gsub(r.path_prefix, '/+$', '')), host, methods}
end

local function overlaps(a, b)
  if a[1] ~= b[1] then return false end
  if a[2] ~= '' and b[2] ~= '' and a[2] ~= b[2] then return false end
  if #a[3] == 0 or #b[3] == 0 then return true end
  for _, m in ipairs(a[3]) do
    for _, n in ipairs(b[3]) do
      if m == n then return true end
    end
  end
  return false
end

-- The first other flag whose route overlaps `route`, or nil.
local function overlapping(index, routes, flag_prefix, key, route)
  for _, other in ipairs(redis.call('SMEMBERS', index)) do
    if other ~= key then
      local raw = redis.call('HGET', routes, other)
      local theirs
      if raw then
        theirs = cjson.decode(raw)
      else
        theirs = route_of_doc(redis.call('HGET', flag_prefix .. other, 'doc'))
      end
      if theirs and overlaps(route, theirs) then return other end
    end
  end
  return nil
end
"""

# put(KEYS: flag, index, audit, routes;
#     ARGV: key, if_match, doc, updated_at, updated_by, maxlen, channel, message, route,
#           audit...). Key uniqueness and route overlap are checked here, with the
# compare-and-set, so two concurrent creates cannot both pass them: 'overlap' names the flag.
PUT = (
    _ROUTES
    + """
local current = redis.call('HGET', KEYS[1], 'version')
if ARGV[2] == '' then
  if current then return {'exists', current} end
elseif current ~= ARGV[2] then
  return {'conflict', current or ''}
end
local flag_prefix = string.sub(KEYS[1], 1, #KEYS[1] - #ARGV[1])
local other = overlapping(KEYS[2], KEYS[4], flag_prefix, ARGV[1], cjson.decode(ARGV[9]))
if other then return {'overlap', other} end
local after = tostring((tonumber(current) or 0) + 1)
redis.call('HSET', KEYS[1], 'doc', ARGV[3], 'version', after,
           'updated_at', ARGV[4], 'updated_by', ARGV[5])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[9])
local fields = {'version_before', current or '', 'version_after', after}
for i = 10, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', unpack(fields))
redis.call('PUBLISH', ARGV[7], ARGV[8])
return {'ok', after}
"""
)

# delete(KEYS: flag, index, rollout, guard, audit, routes;
#        ARGV: key, if_match, maxlen, channel, message, audit...)
DELETE = """
local current = redis.call('HGET', KEYS[1], 'version')
if not current then return {'missing', ''} end
if ARGV[2] == '' then return {'exists', current} end
if current ~= ARGV[2] then return {'conflict', current} end
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[6], ARGV[1])
local fields = {'version_before', current, 'version_after', ''}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {'ok', current}
"""

# save_rollout(KEYS: rollout, audit;
#              ARGV: expected state JSON ('' = must not exist), new state JSON, maxlen,
#                    channel, message, audit...). The caller compared the stored state with
# its `expected` Rollout semantically; this compares the exact bytes it compared, so nothing can
# slip in between (no ABA: a revision alone could come round again after a delete).
SAVE_ROLLOUT = """
local stored = redis.call('HGET', KEYS[1], 'state') or ''
if stored ~= ARGV[1] then return {'conflict', stored} end
redis.call('HSET', KEYS[1], 'state', ARGV[2])
local rev = redis.call('HINCRBY', KEYS[1], 'rev', 1)
if #ARGV >= 6 then
  local fields = {}
  for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {'ok', tostring(rev)}
"""

# The guard scripts reply with the whole state, as text (a Lua number would come back truncated
# to an integer): rollout, test, accepts, n, k, llr, cn, ce, sn, se, step_from. A missing
# field is the GuardState default. Replica seqs live in the same hash as fields 'seq:<replica>',
# so everything about one flag's guard is one key (easy to copy, restore or delete).
_GUARD_STATE = """
local function state()
  local s = redis.call('HMGET', KEYS[1], 'rollout', 'test', 'accepts', 'n', 'k', 'llr',
                       'cn', 'ce', 'sn', 'se', 'step_from')
  local defaults = {'', '1', '0', '0', '0', '0', '0', '0', '0', '0', '1'}
  for i = 1, 11 do if not s[i] then s[i] = defaults[i] end end
  return s
end
local function clear_seqs()
  local fields = redis.call('HKEYS', KEYS[1])
  for _, f in ipairs(fields) do
    if string.sub(f, 1, 4) == 'seq:' then redis.call('HDEL', KEYS[1], f) end
  end
end
"""

# guard_state(KEYS: guard) -> state
GUARD_STATE = _GUARD_STATE + "return state()\n"

# add_guard_delta(KEYS: guard;
#                 ARGV: rollout, test, replica, seq, n, k, llr, cn, ce, sn, se) -> state after.
# At most once per (replica, seq): the seq of the last delta applied is kept per replica.
ADD_GUARD_DELTA = (
    _GUARD_STATE
    + """
local s = state()
local test = tonumber(ARGV[2])
if s[1] ~= ARGV[1] or test < tonumber(s[11]) or test > tonumber(s[2]) then return s end
local seq_field = 'seq:' .. ARGV[3]
local last = tonumber(redis.call('HGET', KEYS[1], seq_field) or '0')
if tonumber(ARGV[4]) <= last then return s end
redis.call('HSET', KEYS[1], seq_field, ARGV[4])
if test == tonumber(s[2]) then
  redis.call('HINCRBY', KEYS[1], 'n', ARGV[5])
  redis.call('HINCRBY', KEYS[1], 'k', ARGV[6])
  if tonumber(ARGV[7]) ~= 0 then redis.call('HINCRBYFLOAT', KEYS[1], 'llr', ARGV[7]) end
end
redis.call('HINCRBY', KEYS[1], 'cn', ARGV[8])
redis.call('HINCRBY', KEYS[1], 'ce', ARGV[9])
redis.call('HINCRBY', KEYS[1], 'sn', ARGV[10])
redis.call('HINCRBY', KEYS[1], 'se', ARGV[11])
return state()
"""
)

# end_guard_test(KEYS: guard; ARGV: rollout, test, accepted (0|1), new_step (0|1), channel,
#                message) -> state now
END_GUARD_TEST = (
    _GUARD_STATE
    + """
local s = state()
if s[1] ~= ARGV[1] or s[2] ~= ARGV[2] then return s end
local after = tonumber(ARGV[2]) + 1
redis.call('HSET', KEYS[1], 'rollout', ARGV[1], 'test', after, 'n', 0, 'k', 0, 'llr', 0,
           'accepts', tonumber(s[3]) + tonumber(ARGV[3]))
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'cn', 0, 'ce', 0, 'sn', 0, 'se', 0, 'step_from', after)
  clear_seqs()
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return state()
"""
)

# start_guard(KEYS: guard; ARGV: rollout, channel, message) -> state now
START_GUARD = (
    _GUARD_STATE
    + """
local s = state()
if s[1] == ARGV[1] then return s end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'rollout', ARGV[1], 'test', 1, 'accepts', 0, 'n', 0, 'k', 0,
           'llr', 0, 'cn', 0, 'ce', 0, 'sn', 0, 'se', 0, 'step_from', 1)
redis.call('PUBLISH', ARGV[2], ARGV[3])
return state()
"""
)

# merge_shadow_stats(KEYS: stats, pairs; ARGV: n, mean, m2, unmeasured, p_look, metric, maxlen,
#                    line...) -> {n, mean, m2, tau ('' = not yet), p_min, unmeasured}
# `Totals.merge` step for step: Chan's formula in the same order of operations as
# `RunningStats.merge`, so every replica's merge gives the same bits; tau frozen at the first n
# >= 100 (DEFAULT_TAU_AT_N) as sqrt(m2 / (n - 1)), the same IEEE operations as Python's; numbers
# travel as '%.17g' text, which round-trips a double exactly (a Lua number returned as such
# would be truncated to an integer reply).
MERGE_SHADOW_STATS = """
local fmt = '%.17g'
local stored = redis.call('HMGET', KEYS[1], 'n', 'mean', 'm2', 'tau', 'p_min', 'unmeasured')
local n, mean, m2 = tonumber(stored[1]) or 0, tonumber(stored[2]) or 0, tonumber(stored[3]) or 0
local tau, p_min, lost = tonumber(stored[4]), tonumber(stored[5]) or 1, tonumber(stored[6]) or 0
local n_b, mean_b, m2_b = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lost_b, p_look = tonumber(ARGV[4]), tonumber(ARGV[5])
if n_b > 0 then
  if n == 0 then
    n, mean, m2 = n_b, mean_b, m2_b
  else
    local total = n + n_b
    local delta = mean_b - mean
    mean = mean + delta * (n_b / total)
    m2 = m2 + m2_b + delta * delta * (n * n_b / total)
    n = total
  end
end
if tau == nil and n >= 100 and m2 > 0 then
  tau = math.sqrt(m2 / (n - 1))
end
if p_look < p_min then
  p_min = p_look
end
lost = lost + lost_b
local tau_text = ''
if tau ~= nil then
  tau_text = string.format(fmt, tau)
end
if n_b > 0 or lost_b > 0 or p_look < 1 then
  redis.call('HSET', KEYS[1], 'n', string.format('%d', n), 'mean', string.format(fmt, mean),
             'm2', string.format(fmt, m2), 'tau', tau_text, 'p_min', string.format(fmt, p_min),
             'unmeasured', string.format('%d', lost), 'metric', ARGV[6])
end
for i = 8, #ARGV do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'line', ARGV[i])
end
return {string.format('%d', n), string.format(fmt, mean), string.format(fmt, m2), tau_text,
        string.format(fmt, p_min), string.format('%d', lost)}
"""
