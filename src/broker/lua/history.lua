-- Reads what a resuming client missed.
--
-- KEYS[1]      the caller-id index key of the cursor
-- KEYS[2..]    the client's history streams
-- ARGV[1]      the cursor as a sequence number, or "" when it is not one
-- ARGV[2]      the most entries to read per stream
-- Returns {cursor_seq or false, {per stream: {trimmed, first_seq, {entries...}}}}
-- where trimmed is how many entries the size bound removed, first_seq the
-- sequence number of the oldest entry left, and entries raw XRANGE results
-- from the cursor (inclusive) on. A caller-supplied id is looked up first,
-- so an all-digit caller id still works as a cursor.
local seq = redis.call('GET', KEYS[1])
if not seq then
  seq = ARGV[1]
  if seq == '' then
    return {false, {}}
  end
end
local streams = {}
for k = 2, #KEYS do
  if redis.call('EXISTS', KEYS[k]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[k])
    local length, added, first = 0, 0, '0-0'
    for j = 1, #info, 2 do
      if info[j] == 'length' then
        length = info[j + 1]
      elseif info[j] == 'entries-added' then
        added = info[j + 1]
      elseif info[j] == 'first-entry' and info[j + 1] then
        first = info[j + 1][1]
      end
    end
    local entries = redis.call('XRANGE', KEYS[k], seq .. '-0', '+', 'COUNT', tonumber(ARGV[2]) + 1)
    streams[#streams + 1] = {added - length, first, entries}
  end
end
return {seq, streams}
