#!lua name=wsgateway
-- The wsgateway Redis function library (Redis 7 functions), loaded by every
-- gateway node when it connects. It numbers, keeps and publishes events in
-- one atomic step, for the gateway's publish API and for backends that
-- publish straight to Redis:
--
--   FCALL wsgateway_publish 0 <channel> [<channel> ...] <event JSON>
--
-- returns {id, "published"} or, when the tenant already used the caller's
-- `event_id` within the history window, {id, "duplicate"} (nothing is
-- published again).
--
-- The gateway loads it with its deployment's prefix (WSGATEWAY_REDIS_PREFIX)
-- in the two lines below: every key and channel starts with KEY_PREFIX,
-- every function and the library's name with FN_PREFIX, so that two
-- deployments on one server never meet.
local KEY_PREFIX = ''
local FN_PREFIX = ''
--
-- Every key of a tenant carries the tenant as its hash tag
-- (`wsgateway:{7}:...`), so that one call's keys share one hash slot
-- (Redis Cluster). Per tenant:
--   wsgateway:{t}:seq              the tenant's counter
--   wsgateway:{t}:run              the run_id of the server that last checked the tenant's data
--   wsgateway:{t}:epoch            the first number given since the data was last reloaded
--   wsgateway:{t}:history:<scope>  a scope's history stream, entries "n-0"
--   wsgateway:{t}:eid:<id>         a caller id's number, for the history's age
-- and the scope channel wsgateway:events:{t}:<scope>, where each event is
-- published once per scope as "n\n<channels>\n<frame>", so that a node
-- knows the number of every event it receives and can fill a gap from
-- history. Each scope's entry and message carry only the channels of that
-- scope (a node unites them by number).
--
-- Numbers are per tenant, never below the server's clock in microseconds:
-- a counter lost with Redis's data never gives out a number again. When a
-- tenant's data turns out to have been written by another server process
-- (Redis restarted from a snapshot or an AOF, or a replica took over), the
-- events written last before may be lost: the counter jumps ahead and the
-- epoch moves to the next number, so that no resume from an earlier cursor
-- says "recovered".

local CONFIG = KEY_PREFIX .. 'wsgateway:config'
local MAX_EVENT_ID_BYTES = 128
-- How far the counter jumps after a reload: more than the clocks of two
-- servers of one deployment may disagree.
local RELOAD_JUMP_US = 1000000

local function fail(code, detail)
  return redis.error_reply('ERR wsgateway ' .. code .. ': ' .. detail)
end

local function key(tenant, rest)
  return KEY_PREFIX .. 'wsgateway:{' .. tenant .. '}:' .. rest
end

local function digits(n)
  return string.format('%d', n)
end

-- Whether canonical decimal `a` is below `b` (no precision lost on 20 digits).
local function below(a, b)
  return #a < #b or (#a == #b and a < b)
end

local function clock_us(now)
  return tonumber(now[1]) * 1000000 + tonumber(now[2])
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

-- The run_id of this server process, read once per load of the library.
local run_id = nil
-- The tenants whose data this load has checked (see `check_data`).
local checked = {}

-- Checks, once per tenant and load, that the tenant's data was written by
-- this server process; if another one wrote it (a restart from a snapshot
-- or AOF, a failover), moves the tenant's epoch past every number given
-- before. A tenant without the marker has no data worth vouching for (new,
-- or flushed): its old cursors find no history. Only the gateway's own
-- calls check: a backend's `wsgateway_publish` runs with the backend's
-- ACL, which need not allow INFO; its numbers never go back anyway, and a
-- resume or a gap fill checks before it reads.
local function check_data(tenant, now)
  if checked[tenant] then
    return
  end
  if not run_id then
    run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
  end
  local run_key = key(tenant, 'run')
  local stored = redis.call('GET', run_key)
  if stored ~= run_id then
    if stored then
      local seq_key = key(tenant, 'seq')
      local n = math.max(tonumber(redis.call('GET', seq_key) or '0'), clock_us(now)) + RELOAD_JUMP_US
      redis.call('SET', seq_key, digits(n))
      redis.call('SET', key(tenant, 'epoch'), digits(n + 1))
    end
    redis.call('SET', run_key, run_id)
  end
  checked[tenant] = true
end

-- The tenant's next number: one more than the last, and never below the
-- clock.
local function next_number(tenant, now)
  local seq_key = key(tenant, 'seq')
  local floor = clock_us(now)
  local n = redis.call('INCR', seq_key)
  if n < floor then
    redis.call('SET', seq_key, digits(floor))
    n = floor
  end
  return digits(n)
end

-- The bounds, as the gateway recorded them (`configure`).
local function settings()
  local kept = redis.call('HMGET', CONFIG, 'size', 'ttl_ms', 'max_channels')
  return tonumber(kept[1]) or 1000, tonumber(kept[2]) or 600000, tonumber(kept[3]) or 100
end

-- Numbers, keeps and publishes one event, unless its caller id was used
-- already. `scopes` are distinct scope suffixes, `channels[k]` the channel
-- names of scope k (each name in one scope only), `payload` the event's
-- JSON text. Returns the id and whether it was a duplicate.
local function keep_and_publish(tenant, caller_id, scopes, channels, payload, size, ttl_ms, now)
  local eid_key
  if caller_id ~= '' then
    eid_key = key(tenant, 'eid:' .. caller_id)
    if redis.call('EXISTS', eid_key) == 1 then
      return caller_id, true
    end
  end
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local n = next_number(tenant, now)
  local id, frame
  if eid_key then
    id = caller_id
    frame = payload
    redis.call('SET', eid_key, n, 'PX', ttl_ms)
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
    local stream = key(tenant, 'history:' .. scope)
    redis.call('XADD', stream, 'MAXLEN', size, n .. '-0', 'f', frame, 'c', list, 't', now_ms)
    redis.call('PEXPIRE', stream, ttl_ms)
    redis.call('PUBLISH', KEY_PREFIX .. 'wsgateway:events:{' .. tenant .. '}:' .. scope, message)
  end
  return id, false
end

-- For backends: validates like the gateway's subscriber and publish API.
local function publish(keys, args)
  if #args < 2 then
    return fail('invalid_body', 'usage: FCALL ' .. FN_PREFIX .. 'wsgateway_publish 0 <channel> [<channel> ...] <event JSON>')
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
  local id, duplicate = keep_and_publish(tenant, caller_id, scopes, channels, payload, size, ttl_ms, redis.call('TIME'))
  return {id, duplicate and 'duplicate' or 'published'}
end

-- For the gateway's publish API, which has validated the batch already:
-- ARGV[1] is {"size": N, "ttl_ms": N, "items": [{"t": tenant, "e": caller
-- id or "", "s": [scope suffixes], "c": [[channels of each scope]]}, ...]},
-- ARGV[2..] the event texts, one per item. Returns {ids, duplicates}: the
-- ids, one per item, and 1 for each item whose caller id was used already.
local function publish_batch(keys, args)
  local spec = cjson.decode(args[1])
  local now = redis.call('TIME')
  local ids, duplicates = {}, {}
  for i, item in ipairs(spec.items) do
    check_data(item.t, now)
    local id, duplicate = keep_and_publish(item.t, item.e, item.s, item.c, args[i + 1], spec.size, spec.ttl_ms, now)
    ids[i] = id
    duplicates[i] = duplicate and 1 or 0
  end
  return {ids, duplicates}
end

-- The first id of a stream (nil when empty) and how many entries the size
-- bound removed (XINFO's entries-added minus length; trimming leaves
-- max-deleted-entry-id alone in Redis 7.0, so the oldest entry left is what
-- tells whether a trim reached past a point).
local function stream_bounds(stream)
  local info = redis.call('XINFO', 'STREAM', stream)
  local length, added, first = 0, 0, nil
  for j = 1, #info, 2 do
    if info[j] == 'length' then
      length = info[j + 1]
    elseif info[j] == 'entries-added' then
      added = info[j + 1]
    elseif info[j] == 'first-entry' and info[j + 1] then
      first = string.match(info[j + 1][1], '^(%d+)')
    end
  end
  return first, added - length
end

-- Reads what a resuming client of one tenant missed.
-- KEYS[1]    the caller-id key of the cursor (`eid:<cursor>`)
-- KEYS[2..]  the client's history streams
-- ARGV[1]    the tenant; ARGV[2] the cursor as a number, or "" when it is
--            not one; ARGV[3] the most entries to read, all streams together;
--            ARGV[4] the history's age bound, ms.
-- Returns {"ok", {entries of each stream after the cursor}}, or {reason}
-- when it cannot vouch for every event after the cursor: "unknown" (no
-- such event kept), "reset" (the data was reloaded since), "expired",
-- "trimmed" (a bound cut into what followed), "too_many" (more than ARGV[3]
-- entries follow). A caller id is looked up first, so an all-digit caller
-- id still works as a cursor. The read stops at the bound.
local function resume(keys, args)
  local tenant, budget, ttl_ms = args[1], tonumber(args[3]), tonumber(args[4])
  local now = redis.call('TIME')
  check_data(tenant, now)
  local seq = redis.call('GET', keys[1]) or args[2]
  if seq == '' then
    return {'unknown'}
  end
  local epoch = redis.call('GET', key(tenant, 'epoch'))
  if epoch and below(seq, epoch) then
    return {'reset'}
  end
  local kept = nil
  for k = 2, #keys do
    local at = redis.call('XRANGE', keys[k], seq .. '-0', seq .. '-0')
    if at[1] then
      local fields = at[1][2]
      for j = 1, #fields, 2 do
        if fields[j] == 't' then
          kept = tonumber(fields[j + 1])
        end
      end
      kept = kept or 0
      break
    end
  end
  if not kept then
    return {'unknown'}
  end
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  if now_ms - kept > ttl_ms then
    return {'expired'}
  end
  local streams = {}
  local read = 0
  for k = 2, #keys do
    if redis.call('EXISTS', keys[k]) == 1 then
      local first, trimmed = stream_bounds(keys[k])
      if trimmed > 0 and first and below(seq, first) then
        return {'trimmed'}
      end
      local entries = redis.call('XRANGE', keys[k], '(' .. seq .. '-0', '+', 'COUNT', budget + 1 - read)
      read = read + #entries
      if read > budget then
        return {'too_many'}
      end
      streams[#streams + 1] = entries
    end
  end
  return {'ok', streams}
end

-- Reads what a node missed while it was not subscribed (a gap).
-- KEYS[1..]  history streams
-- ARGV[1]    the most entries to read per stream; then, per stream, its
--            tenant and the last number the node is sure to have (entries
--            after it are read)
-- Returns {time, {per stream: {trimmed, first, entries, counter, epoch}}}:
-- the server's TIME; how many entries the size bound removed and the
-- oldest number left ("0": none); the entries after the given number; and
-- the tenant's counter and epoch ("0": none).
local function gap(keys, args)
  local now = redis.call('TIME')
  local max = tonumber(args[1])
  local streams = {}
  for k = 1, #keys do
    local tenant, after = args[2 * k], args[2 * k + 1]
    check_data(tenant, now)
    local trimmed, first, entries = 0, '0', {}
    if redis.call('EXISTS', keys[k]) == 1 then
      local f
      f, trimmed = stream_bounds(keys[k])
      first = f or '0'
      entries = redis.call('XRANGE', keys[k], '(' .. after .. '-0', '+', 'COUNT', max)
    end
    streams[k] = {
      trimmed, first, entries,
      redis.call('GET', key(tenant, 'seq')) or '0',
      redis.call('GET', key(tenant, 'epoch')) or '0',
    }
  end
  return {now, streams}
end

-- Records the history bounds and the channel bound for wsgateway_publish
-- (the gateway calls it with its own settings when it loads the library).
local function configure(keys, args)
  redis.call('HSET', CONFIG, 'size', args[1], 'ttl_ms', args[2], 'max_channels', args[3] or 100)
  return 'OK'
end

redis.register_function(FN_PREFIX .. 'wsgateway_publish', publish)
redis.register_function(FN_PREFIX .. 'wsgateway_publish_batch', publish_batch)
redis.register_function(FN_PREFIX .. 'wsgateway_resume', resume)
redis.register_function(FN_PREFIX .. 'wsgateway_gap', gap)
redis.register_function(FN_PREFIX .. 'wsgateway_configure', configure)
