-- Publishes a batch of events atomically, keeping each in history.
--
-- KEYS[1]      the sequence counter
-- KEYS[2..]    history streams, and caller-id index keys, as ARGV[1] says
-- ARGV[1]      JSON: {"size": N, "ttl_ms": N, "items": [
--                {"e": caller event_id or "", "c": [channels], "s": [stream key indexes],
--                 "i": caller-id index key index or 0}, ...]}
-- ARGV[2..]    the event objects, serialized, one per item (without
--              "event_id" unless the caller gave one)
-- Returns the event ids, one per item.
--
-- Each item gets the next sequence number n; its stream entries have the id
-- "n-0", so that one counter orders events across every stream. A frame
-- without a caller id gets "event_id":"n" as its first field.
local spec = cjson.decode(ARGV[1])
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
-- Numbering starts from the clock (in microseconds), so that a counter lost
-- with Redis's data never reuses a number a client may still hold as a
-- cursor. Numbers are formatted with %d: Lua's default would print 1.7e+15.
redis.call('SET', KEYS[1], now[1] .. string.format('%06d', tonumber(now[2])), 'NX')
local ids = {}
for i, item in ipairs(spec.items) do
  local n = string.format('%d', redis.call('INCR', KEYS[1]))
  local payload = ARGV[i + 1]
  local id, frame
  if item.e ~= '' then
    id = item.e
    frame = payload
    redis.call('SET', KEYS[item.i], n, 'PX', spec.ttl_ms)
  else
    id = n
    local rest = string.sub(payload, 2)
    if string.match(rest, '^%s*}') then
      frame = '{"event_id":"' .. id .. '"' .. rest
    else
      frame = '{"event_id":"' .. id .. '",' .. rest
    end
  end
  local channels = table.concat(item.c, ',')
  for _, k in ipairs(item.s) do
    redis.call('XADD', KEYS[k], 'MAXLEN', spec.size, n .. '-0', 'f', frame, 'c', channels, 't', now_ms)
    redis.call('PEXPIRE', KEYS[k], spec.ttl_ms)
  end
  for _, channel in ipairs(item.c) do
    redis.call('PUBLISH', channel, frame)
  end
  ids[i] = id
end
return ids
