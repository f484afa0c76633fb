-- Reads what a node missed while it was not subscribed (a gap).
--
-- KEYS[1..]   the history streams of the scopes of the node's connections
-- ARGV[1]     the first sequence number that may be missing (the last one
--             the node received, plus one)
-- ARGV[2]     the most entries to read per stream
-- Returns {counter, {per stream: {trimmed, first_seq, {entries...}}}} where
-- counter is the sequence counter now (false when Redis has none), trimmed
-- how many entries the size bound removed (XINFO's entries-added minus
-- length), first_seq the number of the oldest entry left, and entries raw
-- XRANGE results from ARGV[1] on. A missing stream yields {0, "0", {}}.
-- (Trimming leaves max-deleted-entry-id alone in Redis 7.0, so the oldest
-- entry left is what tells whether the trim reached into the gap.)
local streams = {}
for k = 1, #KEYS do
  local trimmed, first, entries = 0, '0', {}
  if redis.call('EXISTS', KEYS[k]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[k])
    local length, added = 0, 0
    for j = 1, #info, 2 do
      if info[j] == 'length' then
        length = info[j + 1]
      elseif info[j] == 'entries-added' then
        added = info[j + 1]
      elseif info[j] == 'first-entry' and info[j + 1] then
        first = string.match(info[j + 1][1], '^(%d+)')
      end
    end
    trimmed = added - length
    entries = redis.call('XRANGE', KEYS[k], ARGV[1] .. '-0', '+', 'COUNT', tonumber(ARGV[2]))
  end
  streams[k] = {trimmed, first, entries}
end
return {redis.call('GET', 'wsgateway:history:seq'), streams}
