"""The Lua scripts behind every Redis flag store write (see `gateway.flagstore.redis`).

Each write is one script so that the compare, the write, the audit entry and the change message
happen atomically: no replica can see a new version without its audit event, and two writers
with the same If-Match cannot both win. Every key a script touches is passed in KEYS (all under
one hash tag), so the scripts also run on Redis Cluster.

Conventions shared with the Python side:
- absent values travel as '' (Lua tables cannot hold nil);
- the audit event arrives as a flat name/value list at the end of ARGV (the comment above
  each script says from where); put and delete fill in version_before/version_after;
- the flag and rollout scripts reply `{status, value}`, status 'ok', 'exists', 'conflict' or
  'missing'; the counting scripts reply with the counts after.
"""

from __future__ import annotations

# put(KEYS: flag, index, audit;
#     ARGV: key, if_match, doc, updated_at, updated_by, maxlen, channel, message, audit...)
PUT = """
local current = redis.call('HGET', KEYS[1], 'version')
if ARGV[2] == '' then
  if current then return {'exists', current} end
elseif current ~= ARGV[2] then
  return {'conflict', current or ''}
end
local after = tostring((tonumber(current) or 0) + 1)
redis.call('HSET', KEYS[1], 'doc', ARGV[3], 'version', after,
           'updated_at', ARGV[4], 'updated_by', ARGV[5])
redis.call('SADD', KEYS[2], ARGV[1])
local fields = {'version_before', current or '', 'version_after', after}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', unpack(fields))
redis.call('PUBLISH', ARGV[7], ARGV[8])
return {'ok', after}
"""

# delete(KEYS: flag, index, rollout, guard, audit;
#        ARGV: key, if_match, maxlen, channel, message, audit...)
DELETE = """
local current = redis.call('HGET', KEYS[1], 'version')
if not current then return {'missing', ''} end
if ARGV[2] == '' then return {'exists', current} end
if current ~= ARGV[2] then return {'conflict', current} end
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
redis.call('SREM', KEYS[2], ARGV[1])
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

# add_guard_counts(KEYS: guard; ARGV: epoch, n, k) -> {n, k, epoch} after.
# A missing hash is epoch 0 with n = k = 0, as in the memory store.
ADD_GUARD_COUNTS = """
local epoch = redis.call('HGET', KEYS[1], 'epoch') or '0'
if epoch == ARGV[1] then
  local n = redis.call('HINCRBY', KEYS[1], 'n', ARGV[2])
  local k = redis.call('HINCRBY', KEYS[1], 'k', ARGV[3])
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  return {n, k, tonumber(epoch)}
end
local counts = redis.call('HMGET', KEYS[1], 'n', 'k')
return {tonumber(counts[1]) or 0, tonumber(counts[2]) or 0, tonumber(epoch)}
"""

# reset_guard(KEYS: guard; ARGV: epoch, channel, message) -> {n, k, epoch} now.
RESET_GUARD = """
local epoch = redis.call('HGET', KEYS[1], 'epoch') or '0'
if epoch == ARGV[1] then
  local after = tonumber(epoch) + 1
  redis.call('HSET', KEYS[1], 'n', 0, 'k', 0, 'epoch', after)
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return {0, 0, after}
end
local counts = redis.call('HMGET', KEYS[1], 'n', 'k')
return {tonumber(counts[1]) or 0, tonumber(counts[2]) or 0, tonumber(epoch)}
"""

# merge_shadow_stats(KEYS: stats, pairs; ARGV: n, mean, m2, maxlen, line...) -> {n, mean, m2}
# Chan's formula in the same order of operations as `RunningStats.merge`, so every replica's
# merge gives the same bits; numbers travel as '%.17g' text, which round-trips a double exactly
# (a Lua number returned as such would be truncated to an integer reply).
MERGE_SHADOW_STATS = """
local fmt = '%.17g'
local stored = redis.call('HMGET', KEYS[1], 'n', 'mean', 'm2')
local n, mean, m2 = tonumber(stored[1]) or 0, tonumber(stored[2]) or 0, tonumber(stored[3]) or 0
local n_b, mean_b, m2_b = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
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
  redis.call('HSET', KEYS[1], 'n', string.format('%d', n),
             'mean', string.format(fmt, mean), 'm2', string.format(fmt, m2))
end
for i = 5, #ARGV do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'line', ARGV[i])
end
return {string.format('%d', n), string.format(fmt, mean), string.format(fmt, m2)}
"""
