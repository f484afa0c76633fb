#!lua name=wsgateway
-- The wsgateway Redis function library (Redis 7 functions), loaded by every
-- gateway node when it connects. It numbers, keeps and publishes events in
-- one atomic step, for the gateway's publish API and for backends that
-- publish straight to Redis:
--
--   FCALL wsgateway_publish 0 <channel> [<channel> ...] <event JSON>
--
-- returns the event's id (the caller's `event_id`, or the sequence number).
--
-- Every event gets the next number n of one counter; it is appended, with
-- the stream id "n-0", to the history stream of each scope (a tenant's
-- branch, table session, user or whole staff) its channels name, and published once per scope
-- on the gateway's scope channel as "n\n<channels>\n<frame>", so that a node
-- knows the number of every event it receives and can fill a gap from
-- history. Each scope's entry and message carry only the channels of that
-- scope (a node unites them by number), so that what an event keeps is
-- linear in its channels, not channels times scopes. A frame without a
-- caller id gets "event_id":"n" as its first field. Caller ids map to their
-- number (the resume cursor) for the history's age.

local SEQ = 'wsgateway:history:seq'
local CONFIG = 'wsgateway:config'
local MAX_EVENT_ID_BYTES = 128

local function fail(code, detail)
  return redis.error_reply('ERR wsgateway ' .. code .. ': ' .. detail)
end

-- Lua numbers are doubles: beyond 2^53 two ids share one double (an event
-- of tenant 9007199254740993 would be published as tenant
-- 9007199254740992's), so only integers a double holds exactly are ids.
local function is_integer(v)
  return type(v) == 'number' and v == math.floor(v) and v > -2 ^ 53 and v < 2 ^ 53
end

-- A channel's id as the gateway reads it (a signed 64-bit integer, in
-- decimal), or nil: "0077" and ids beyond 2^63 - 1 are no ids, so that the
-- scope key the function writes is the one a resume reads.
local function id(digits)
  if not digits or (#digits > 1 and string.sub(digits, 1, 1) == '0') then
    return nil
  end
  if #digits > 19 or (#digits == 19 and digits > '9223372036854775807') then
    return nil
  end
  return digits
end

-- The scope suffix ("branch:5", "session:77", "user:7", "staff") of a
-- channel, and the branch, sector and session it names; nil when it is not
-- a channel.
local function parse_channel(name)
  if name == 'channel:tenant:staff' then
    return 'staff', nil, nil, nil
  end
  local b, role = string.match(name, '^channel:branch:(%d+):(%a+)$')
  if id(b) and (role == 'waiters' or role == 'kitchen' or role == 'admin') then
    return 'branch:' .. b, b, nil, nil
  end
  local sb, s = string.match(name, '^channel:sector:(%d+):(%d+):waiters$')
  if id(sb) and id(s) then
    return 'branch:' .. sb, sb, s, nil
  end
  local session = id(string.match(name, '^channel:session:(%d+)$'))
  if session then
    return 'session:' .. session, nil, nil, session
  end
  local user = id(string.match(name, '^channel:user:(%d+)$'))
  if user then
    return 'user:' .. user, nil, nil, nil
  end
  return nil
end

local function digits(n)
  return string.format('%d', n)
end

-- Numbers, keeps and publishes one event. `scopes` are distinct scope
-- suffixes, `channels[k]` the channel names of scope k (each name in one
-- scope only), `payload` the event's JSON text.
local function keep_and_publish(tenant, caller_id, scopes, channels, payload, size, ttl_ms, now)
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  -- Numbering starts from the clock (in microseconds), so that a counter
  -- lost with Redis's data never reuses a number a client may still hold as
  -- a cursor.
  redis.call('SET', SEQ, now[1] .. string.format('%06d', tonumber(now[2])), 'NX')
  local n = digits(redis.call('INCR', SEQ))
  local id, frame
  if caller_id ~= '' then
    id = caller_id
    frame = payload
    redis.call('SET', 'wsgateway:history:' .. tenant .. ':eid:' .. caller_id, n, 'PX', ttl_ms)
  else
    id = n
    local rest = string.sub(payload, 2)
    if string.match(rest, '^%s*}') then
      frame = '{"event_id":"' .. id .. '"' .. rest
    else
      frame = '{"event_id":"' .. id .. '",' .. rest
    end
  end
  for k, scope in ipairs(scopes) do
    local list = table.concat(channels[k], ',')
    local message = n .. '\n' .. list .. '\n' .. frame
    local stream = 'wsgateway:history:' .. tenant .. ':' .. scope
    redis.call('XADD', stream, 'MAXLEN', size, n .. '-0', 'f', frame, 'c', list, 't', now_ms)
    redis.call('PEXPIRE', stream, ttl_ms)
    redis.call('PUBLISH', 'wsgateway:events:' .. tenant .. ':' .. scope, message)
  end
  return id
end

local function settings()
  local kept = redis.call('HMGET', CONFIG, 'size', 'ttl_ms', 'max_channels')
  return tonumber(kept[1]) or 1000, tonumber(kept[2]) or 600000, tonumber(kept[3]) or 100
end

-- For backends: validates like the gateway's subscriber and publish API.
local function publish(keys, args)
  if #args < 2 then
    return fail('invalid_body', 'usage: FCALL wsgateway_publish 0 <channel> [<channel> ...] <event JSON>')
  end
  local size, ttl_ms, max_channels = settings()
  if #args - 1 > max_channels then
    return fail('too_many_channels', (#args - 1) .. ' channels; at most ' .. max_channels
      .. ' per event (WSGATEWAY_MAX_PUBLISH_CHANNELS)')
  end
  local payload = string.match(args[#args], '^%s*(.-)%s*$')
  local ok, event = pcall(cjson.decode, payload)
  if not ok or type(event) ~= 'table' or string.sub(payload, 1, 1) ~= '{' then
    return fail('invalid_event', 'the event is not a JSON object')
  end
  if type(event.type) ~= 'string' or event.type == '' then
    return fail('invalid_event', 'the event lacks the required field `type`')
  end
  if not is_integer(event.tenant_id) then
    return fail('invalid_event', '`tenant_id` must be an integer')
  end
  if not is_integer(event.branch_id) then
    return fail('invalid_event', '`branch_id` must be an integer')
  end
  for _, field in ipairs({'sector_id', 'session_id', 'table_id'}) do
    if event[field] ~= nil and event[field] ~= cjson.null and not is_integer(event[field]) then
      return fail('invalid_event', '`' .. field .. '` must be an integer')
    end
  end
  local caller_id = ''
  if event.event_id ~= nil and event.event_id ~= cjson.null then
    if type(event.event_id) ~= 'string' or event.event_id == '' or #event.event_id > MAX_EVENT_ID_BYTES then
      return fail('invalid_event', '`event_id` must be a non-empty string of at most 128 bytes')
    end
    caller_id = event.event_id
  end
  local tenant = digits(event.tenant_id)
  local branch = digits(event.branch_id)
  local channels, scopes, seen_channel, scope_index = {}, {}, {}, {}
  for i = 1, #args - 1 do
    local name = args[i]
    local scope, b, s, session = parse_channel(name)
    if not scope then
      return fail('unknown_channel', 'unknown channel ' .. string.sub(name, 1, 200))
    end
    if b and b ~= branch then
      return fail('invalid_event', "the event's `branch_id` differs from its channel's (" .. name .. ')')
    end
    if s and is_integer(event.sector_id) and digits(event.sector_id) ~= s then
      return fail('invalid_event', "the event's `sector_id` differs from its channel's (" .. name .. ')')
    end
    if session and is_integer(event.session_id) and digits(event.session_id) ~= session then
      return fail('invalid_event', "the event's `session_id` differs from its channel's (" .. name .. ')')
    end
    if not seen_channel[name] then
      seen_channel[name] = true
      local k = scope_index[scope]
      if not k then
        k = #scopes + 1
        scope_index[scope] = k
        scopes[k] = scope
        channels[k] = {}
      end
      channels[k][#channels[k] + 1] = name
    end
  end
  return keep_and_publish(tenant, caller_id, scopes, channels, payload, size, ttl_ms, redis.call('TIME'))
end

-- For the gateway's publish API, which has validated the batch already:
-- ARGV[1] is {"size": N, "ttl_ms": N, "items": [{"t": tenant, "e": caller
-- id or "", "s": [scope suffixes], "c": [[channels of each scope]]}, ...]},
-- ARGV[2..] the event texts, one per item. Returns the ids, one per item.
local function publish_batch(keys, args)
  local spec = cjson.decode(args[1])
  local now = redis.call('TIME')
  local ids = {}
  for i, item in ipairs(spec.items) do
    ids[i] = keep_and_publish(item.t, item.e, item.s, item.c, args[i + 1], spec.size, spec.ttl_ms, now)
  end
  return ids
end

-- Records the history bounds and the channel bound for wsgateway_publish
-- (the gateway calls it with its own settings when it loads the library).
local function configure(keys, args)
  redis.call('HSET', CONFIG, 'size', args[1], 'ttl_ms', args[2], 'max_channels', args[3] or 100)
  return 'OK'
end

redis.register_function('wsgateway_publish', publish)
redis.register_function('wsgateway_publish_batch', publish_batch)
redis.register_function('wsgateway_configure', configure)
