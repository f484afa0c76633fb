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

-- Validation: the rules of PROTOCOL.md §5 as the gateway applies them to a
-- publish API item and to a plain PUBLISH (src/event.rs), in the same
-- order, refused with the same codes and texts. Redis's JSON decoder would
-- not do: it reads 1.0 and 5e0 as 1 and 5, [] as {}, and takes NaN, hex
-- and leading zeros. So the event's text is read here as serde_json reads
-- it, keeping the raw text of each top-level field.

-- The gateway's own frame types, never an event's (src/event.rs
-- RESERVED_TYPES, which a unit test keeps equal to this list).
local RESERVED_TYPES = {'connected', 'pong', 'error', 'resync', 'token_refreshed', 'sectors_updated'}
local RESERVED = {}
for i = 1, #RESERVED_TYPES do
  RESERVED[RESERVED_TYPES[i]] = true
end

-- serde_json's nesting limit: 128 nested arrays or objects are refused.
local MAX_DEPTH = 127
local LITERALS = {t = 'true', f = 'false', n = 'null'}

-- Whether s is UTF-8 as Rust's `str` takes it: no overlong form, no
-- surrogate, nothing beyond U+10FFFF.
local function is_utf8(s)
  local i = 1
  while true do
    i = string.find(s, '[\128-\255]', i)
    if not i then
      return true
    end
    local c = string.byte(s, i)
    local n, lo, hi
    if c >= 0xC2 and c <= 0xDF then
      n, lo, hi = 2, 0x80, 0xBF
    elseif c == 0xE0 then
      n, lo, hi = 3, 0xA0, 0xBF
    elseif c == 0xED then
      n, lo, hi = 3, 0x80, 0x9F
    elseif c >= 0xE1 and c <= 0xEF then
      n, lo, hi = 3, 0x80, 0xBF
    elseif c == 0xF0 then
      n, lo, hi = 4, 0x90, 0xBF
    elseif c >= 0xF1 and c <= 0xF3 then
      n, lo, hi = 4, 0x80, 0xBF
    elseif c == 0xF4 then
      n, lo, hi = 4, 0x80, 0x8F
    else
      return false
    end
    local b = string.byte(s, i + 1)
    if not b or b < lo or b > hi then
      return false
    end
    for k = i + 2, i + n - 1 do
      b = string.byte(s, k)
      if not b or b < 0x80 or b > 0xBF then
        return false
      end
    end
    i = i + n
  end
end

local function skip_space(s, i)
  return string.match(s, '^[ \t\n\r]*()', i)
end

-- Each scanner reads one JSON value of s starting at i and returns the
-- position just after it, or nil when it is not valid JSON.

local function scan_string(s, i)
  i = i + 1
  while true do
    local j = string.find(s, '[%z\1-\31"\\]', i)
    if not j or string.byte(s, j) < 32 then
      return nil
    end
    if string.byte(s, j) == 34 then
      return j + 1
    end
    local e = string.sub(s, j + 1, j + 1)
    if e == 'u' then
      local hex = string.match(s, '^%x%x%x%x', j + 2)
      local u = hex and tonumber(hex, 16)
      i = j + 6
      -- A surrogate must be a high one followed by a low one.
      if not u or (u >= 0xDC00 and u <= 0xDFFF) then
        return nil
      end
      if u >= 0xD800 and u <= 0xDBFF then
        local low = string.match(s, '^\\u(%x%x%x%x)', i)
        low = low and tonumber(low, 16)
        if not low or low < 0xDC00 or low > 0xDFFF then
          return nil
        end
        i = i + 6
      end
    elseif e ~= '' and string.find('"\\/bfnrt', e, 1, true) then
      i = j + 2
    else
      return nil
    end
  end
end

-- A number, also refused when beyond a double's range (serde_json's
-- "number out of range").
local function scan_number(s, i)
  local j = string.match(s, '^%-?0()', i) or string.match(s, '^%-?[1-9]%d*()', i)
  if j and string.sub(s, j, j) == '.' then
    j = string.match(s, '^%d+()', j + 1)
  end
  if j and string.find(s, '^[eE]', j) then
    j = string.match(s, '^[+-]?%d+()', j + 1)
  end
  local v = j and tonumber(string.sub(s, i, j - 1))
  if not v or v == math.huge or v == -math.huge then
    return nil
  end
  return j
end

-- Any value; `fields`, when given and the value is an object, gets the raw
-- text of each of its members' values by name (the last of a name counts,
-- as with serde_json).
local function scan_value(s, i, depth, fields)
  local c = string.sub(s, i, i)
  if c == '"' then
    return scan_string(s, i)
  elseif c == '{' or c == '[' then
    if depth >= MAX_DEPTH then
      return nil
    end
    local close = c == '{' and '}' or ']'
    i = skip_space(s, i + 1)
    if string.sub(s, i, i) == close then
      return i + 1
    end
    while true do
      if c == '{' then
        if string.sub(s, i, i) ~= '"' then
          return nil
        end
        local key_end = scan_string(s, i)
        if not key_end then
          return nil
        end
        local key = string.sub(s, i, key_end - 1)
        i = skip_space(s, key_end)
        if string.sub(s, i, i) ~= ':' then
          return nil
        end
        i = skip_space(s, i + 1)
        local value_end = scan_value(s, i, depth + 1, nil)
        if not value_end then
          return nil
        end
        if fields then
          if string.find(key, '\\', 1, true) then
            key = cjson.decode(key)
          else
            key = string.sub(key, 2, -2)
          end
          fields[key] = string.sub(s, i, value_end - 1)
        end
        i = value_end
      else
        i = scan_value(s, i, depth + 1, nil)
        if not i then
          return nil
        end
      end
      i = skip_space(s, i)
      local after = string.sub(s, i, i)
      if after == close then
        return i + 1
      elseif after ~= ',' then
        return nil
      end
      i = skip_space(s, i + 1)
    end
  end
  local word = LITERALS[c]
  if word then
    return string.sub(s, i, i + #word - 1) == word and i + #word or nil
  end
  return scan_number(s, i)
end

-- Checks a call as the gateway checks a publish API item: the event
-- (tenant, caller id or '', scopes, the channels of each scope, and its
-- text), or nil and the refusal, an error reply `ERR wsgateway <code>:
-- <reason>` whose code and reason are the publish API's (PROTOCOL.md §5,
-- "Refusals"). `now` is Redis's TIME.
local function validate(args, max_channels, now)
  if #args < 2 then
    return nil, fail('invalid_body', 'usage: FCALL wsgateway_publish 0 <channel> [<channel> ...] <event JSON>')
  end
  if #args - 1 > max_channels then
    return nil, fail('too_many_channels', (#args - 1) .. ' channels; at most ' .. max_channels
      .. ' per event (WSGATEWAY_MAX_PUBLISH_CHANNELS)')
  end
  local named = {}
  for i = 1, #args - 1 do
    local scope, b, s, session = parse_channel(args[i])
    if not scope then
      return nil, fail('unknown_channel', 'unknown channel "' .. string.sub(args[i], 1, 200) .. '"')
    end
    named[i] = {name = args[i], scope = scope, branch = b, sector = s, session = session}
  end

  local invalid = function(reason)
    return nil, fail('invalid_event', reason)
  end
  local text = args[#args]
  if not is_utf8(text) then
    return invalid('the event is not valid UTF-8')
  end
  local raw = {}
  local first = skip_space(text, 1)
  local last = scan_value(text, first, 0, raw)
  if not last or skip_space(text, last) <= #text then
    return invalid('the event is not valid JSON')
  end
  if string.sub(text, first, first) ~= '{' then
    return invalid('the event is not a JSON object')
  end
  local payload = string.sub(text, first, last - 1)
  -- A field's raw text; null counts as absent.
  local function field(name)
    if raw[name] == 'null' then
      return nil
    end
    return raw[name]
  end
  local function wrong(name)
    return invalid("the event's field `" .. name .. '` has the wrong type')
  end

  local t = field('type')
  if not t then
    return invalid('the event lacks the required field `type`')
  end
  if string.sub(t, 1, 1) ~= '"' or t == '""' then
    return wrong('type')
  end
  t = cjson.decode(t)
  if RESERVED[t] then
    return nil, fail('reserved_type', 'the type `' .. t .. "` is reserved for the gateway's own frames")
  end
  -- Integers as serde_json's i64: digits only (no fraction, no exponent;
  -- serde_json reads -0 as a float), within a signed 64-bit integer.
  local ints = {}
  for _, name in ipairs({'tenant_id', 'branch_id', 'sector_id', 'session_id', 'table_id'}) do
    local v = field(name)
    if v then
      local minus, digits = string.match(v, '^(%-?)(%d+)$')
      local max = minus == '' and '9223372036854775807' or '9223372036854775808'
      if not digits or v == '-0' or #digits > 19 or (#digits == 19 and digits > max) then
        return wrong(name)
      end
      ints[name] = v
    elseif name == 'tenant_id' or name == 'branch_id' then
      return invalid('the event lacks the required field `' .. name .. '`')
    end
  end
  local entity = field('entity')
  if entity and string.sub(entity, 1, 1) ~= '{' then
    return wrong('entity')
  end
  local ts = field('ts')
  if ts and not string.find(ts, '^[%-%d]') then
    return wrong('ts')
  end
  local caller_id = ''
  local given_id = field('event_id')
  if given_id then
    caller_id = string.sub(given_id, 1, 1) == '"' and cjson.decode(given_id) or ''
    if caller_id == '' or #caller_id > MAX_EVENT_ID_BYTES then
      return invalid('`event_id` must be a non-empty string of at most ' .. MAX_EVENT_ID_BYTES .. ' bytes')
    end
  end
  -- Ids are compared as text: both are canonical decimals.
  for _, c in ipairs(named) do
    local differs
    if c.branch and c.branch ~= ints.branch_id then
      differs = 'branch_id'
    elseif c.sector and ints.sector_id and c.sector ~= ints.sector_id then
      differs = 'sector_id'
    elseif c.session and ints.session_id and c.session ~= ints.session_id then
      differs = 'session_id'
    end
    if differs then
      return invalid("the event's `" .. differs .. "` differs from its channel's (" .. c.name .. ')')
    end
  end
  if ts then
    -- In milliseconds (below 10^11 it is seconds), truncated, as
    -- src/event.rs reads it; older than the stale limit by Redis's clock.
    local ms = tonumber(ts)
    if ms < 1e11 then
      ms = ms * 1000
    end
    ms = ms < 0 and math.ceil(ms) or math.floor(ms)
    local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    local stale_ms = tonumber(redis.call('HGET', CONFIG, 'stale_ms')) or 30000
    if now_ms - ms > stale_ms then
      return nil, fail('stale_event', "the event's `ts` is older than the stale limit")
    end
  end
  -- The gateway's own rules end here. Lua numbers are doubles, which hold
  -- ids exactly only below 2^53 in magnitude: beyond, two tenants would
  -- share one history.
  for _, name in ipairs({'tenant_id', 'branch_id', 'sector_id', 'session_id', 'table_id'}) do
    if ints[name] and not is_integer(tonumber(ints[name])) then
      return invalid("the event's field `" .. name .. '` is 2^53 or more in magnitude, more than the function'
        .. ' reads exactly; publish it through the API')
    end
  end

  local scopes, channels, seen, scope_index = {}, {}, {}, {}
  for _, c in ipairs(named) do
    if not seen[c.name] then
      seen[c.name] = true
      local k = scope_index[c.scope]
      if not k then
        k = #scopes + 1
        scope_index[c.scope] = k
        scopes[k] = c.scope
        channels[k] = {}
      end
      channels[k][#channels[k] + 1] = c.name
    end
  end
  return {
    tenant = ints.tenant_id,
    caller_id = caller_id,
    scopes = scopes,
    channels = channels,
    payload = payload,
  }
end

-- For backends: validates like the gateway's subscriber and publish API.
local function publish(keys, args)
  local size, ttl_ms, max_channels = settings()
  local now = redis.call('TIME')
  local event, refusal = validate(args, max_channels, now)
  if not event then
    return refusal
  end
  return keep_and_publish(event.tenant, event.caller_id, event.scopes, event.channels, event.payload,
    size, ttl_ms, now)
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

-- Records the history bounds, the channel bound and the stale limit (in
-- ms) for wsgateway_publish (the gateway calls it with its own settings
-- when it loads the library). Without the stale limit (a caller that
-- passes three arguments), the one recorded before stays, or else 30 s.
local function configure(keys, args)
  redis.call('HSET', CONFIG, 'size', args[1], 'ttl_ms', args[2], 'max_channels', args[3] or 100)
  if args[4] then
    redis.call('HSET', CONFIG, 'stale_ms', args[4])
  end
  return 'OK'
end

redis.register_function('wsgateway_publish', publish)
redis.register_function('wsgateway_publish_batch', publish_batch)
redis.register_function('wsgateway_configure', configure)
