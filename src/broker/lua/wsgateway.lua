#!lua name=wsgateway
-- The wsgateway Redis function library (Redis 7 functions), loaded by every
-- gateway node when it connects. It numbers, keeps and publishes events in
-- one atomic step, for the gateway's publish API and for backends that
-- publish straight to Redis:
--
--   FCALL wsgateway_publish 0 <channel> [<channel> ...] <event JSON>
--   FCALL wsgateway_publish 1 wsgateway:{<tenant>}:seq <channel> ... <event JSON>
--
-- (the second form, whose key routes the call to the tenant's shard, is
-- the only one a Redis Cluster takes)
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
-- and the key that signs every message it publishes for the nodes (see
-- `sign`), which only the nodes and this source hold:
local SIGNING_KEY = ''
-- and the gateway's bounds (WSGATEWAY_HISTORY_SIZE, _HISTORY_TTL_S,
-- _MAX_PUBLISH_CHANNELS, _STALE_EVENT_S), here rather than in a key, whose
-- hash slot would not be a tenant's:
local BOUNDS = {size = 1000, ttl_ms = 600000, max_channels = 100, stale_ms = 30000}
--
-- Every key of a tenant carries the tenant as its hash tag
-- (`wsgateway:{7}:...`), so that one call's keys share one hash slot
-- (Redis Cluster). Per tenant:
--   wsgateway:{t}:seq              the tenant's counter
--   wsgateway:{t}:run              the run_id of the server that last checked the tenant's data
--   wsgateway:{t}:epoch            the first number given since the data was last reloaded
--   wsgateway:{t}:history:<scope>  a scope's history stream: entry "n-0", one field
--                                  e = "<kept at, ms>\n<channels>\n<frame>" (one
--                                  field: a resume reads hundreds of entries,
--                                  and each field costs Lua a string both ways)
--   wsgateway:{t}:eid:<id>         a caller id's number, for the history's age
-- Each event is published once per scope as
-- "n\n<channels>\n<signature>\n<frame>", so that a node knows the number of
-- every event it receives and can fill a gap from history, on the scope
-- channel wsgateway:events:{t}:<scope>: a node subscribes to a scope's
-- channel only while it has connections of that scope. In a Redis Cluster
-- with SPUBLISH: the channel carries the tenant's hash tag, so the message
-- stays on the tenant's shard. Each scope's entry and message carry only
-- the channels of that scope (a node unites them by number).
--
-- Numbers are per tenant, never below the server's clock in microseconds:
-- a counter lost with Redis's data never gives out a number again. When a
-- tenant's data turns out to have been written by another server process
-- (Redis restarted from a snapshot or an AOF, or a replica took over), the
-- events written last before may be lost: the counter jumps ahead and the
-- epoch moves to the next number, so that no resume from an earlier cursor
-- says "recovered".

local MAX_EVENT_ID_BYTES = 128
-- How far the counter jumps after a reload: more than the clocks of two
-- servers of one deployment may disagree.
local RELOAD_JUMP_US = 1000000

-- Whether this server is a cluster node (then messages are published on
-- shard channels); asked once per library load.
local sharded = nil
local function is_sharded()
  if sharded == nil then
    sharded = string.find(redis.call('INFO', 'cluster'), 'cluster_enabled:1', 1, true) ~= nil
  end
  return sharded
end

local function fail(code, detail)
  return redis.error_reply('ERR wsgateway ' .. code .. ': ' .. detail)
end

local function key(tenant, rest)
  return KEY_PREFIX .. 'wsgateway:{' .. tenant .. '}:' .. rest
end

local function digits(n)
  return string.format('%d', n)
end

-- HMAC-SHA1 (RFC 2104) of `text` with SIGNING_KEY, in hex: the pads are
-- made at the first call (the library's loading code may not use `string`).
local IPAD, OPAD
local function sign(text)
  if not IPAD then
    local function pad(byte)
      local out = {}
      for i = 1, 64 do
        out[i] = string.char(bit.bxor(string.byte(SIGNING_KEY, i) or 0, byte))
      end
      return table.concat(out)
    end
    IPAD, OPAD = pad(0x36), pad(0x5c)
  end
  local inner = string.gsub(redis.sha1hex(IPAD .. text), '%x%x', function(h)
    return string.char(tonumber(h, 16))
  end)
  return redis.sha1hex(OPAD .. inner)
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

-- Checks that the tenant's data was last written by this server process.
-- If another one wrote it (a restart from a snapshot or AOF, a failover),
-- what it wrote last may be lost: the counter jumps ahead and the epoch
-- moves past every number given before, so that no earlier cursor is
-- vouched for and a node whose gap began before it resyncs. Without the
-- note (the tenant's first event, or its data flushed) there is nothing
-- left to vouch for: the note is written, nothing else. Returns "ok",
-- "reloaded" or "new". Every call checks before it numbers or reads (a
-- backend's ACL must allow INFO and GET).
local function server_run()
  if not run_id then
    run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
  end
  return run_id
end

-- What the note holds: the run_id; on a cluster node, its node id first
-- ("<node id>:<run_id>"), so that data a resharding moved here is told
-- from data a failover or a restart left here.
local mark = nil
local function server_mark()
  if not mark then
    mark = server_run()
    if is_sharded() then
      mark = redis.call('CLUSTER', 'MYID') .. ':' .. mark
    end
  end
  return mark
end

-- Whether data noted `stored` was written by another primary of this
-- cluster that is still a healthy primary: a resharding moved it here
-- whole (MIGRATE moves a slot's keys; a tenant's keys share one slot),
-- and nothing of it was lost. A noting primary that failed, or is a
-- replica now (a failover), or is gone, vouches for nothing. The cluster
-- permission (CLUSTER MYID, NODES) is needed on a cluster.
local function moved_here(stored)
  if not is_sharded() then
    return false
  end
  local node = string.match(stored, '^(%x+):')
  if not node or node == redis.call('CLUSTER', 'MYID') then
    return false
  end
  for line in string.gmatch(redis.call('CLUSTER', 'NODES'), '[^\n]+') do
    local id, flags = string.match(line, '^(%x+) %S+ (%S+)')
    if id == node then
      return string.find(flags, 'master', 1, true) ~= nil and string.find(flags, 'fail', 1, true) == nil
    end
  end
  return false
end

local function check_data(tenant, now)
  local run_key = key(tenant, 'run')
  local stored = redis.call('GET', run_key)
  if stored == server_mark() then
    return 'ok'
  end
  redis.call('SET', run_key, server_mark())
  if not stored then
    return 'new'
  end
  if moved_here(stored) then
    return 'ok'
  end
  local seq_key = key(tenant, 'seq')
  local n = math.max(tonumber(redis.call('GET', seq_key) or '0'), clock_us(now)) + RELOAD_JUMP_US
  redis.call('SET', seq_key, digits(n))
  redis.call('SET', key(tenant, 'epoch'), digits(n + 1))
  return 'reloaded'
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

-- Defined with the acknowledgements, below.
local track

-- The bounds the library was loaded with.
local function settings()
  return BOUNDS.size, BOUNDS.ttl_ms, BOUNDS.max_channels
end

-- Numbers, keeps and publishes one event, unless its caller id was used
-- already. `scopes` are distinct scope suffixes, `channels[k]` the channel
-- names of scope k (each name in one scope only), `payload` the event's
-- JSON text. Returns the id and whether it was a duplicate.
-- `ack`, when the event asks for one: {ms = within, branch = its branch,
-- type = its type}. `ready`: `payload` is the frame already, its
-- `event_id` written (an escalation's names the event it reports).
local function keep_and_publish(tenant, caller_id, scopes, channels, payload, size, ttl_ms, now, ack, ready)
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
  elseif ready then
    id = n
    frame = payload
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
    local stream = key(tenant, 'history:' .. scope)
    redis.call('XADD', stream, 'MAXLEN', size, n .. '-0', 'e', now_ms .. '\n' .. list .. '\n' .. frame)
    redis.call('PEXPIRE', stream, ttl_ms)
    local channel = KEY_PREFIX .. 'wsgateway:events:{' .. tenant .. '}:' .. scope
    local signature = sign(channel .. '\n' .. n .. '\n' .. list .. '\n' .. frame)
    redis.call(is_sharded() and 'SPUBLISH' or 'PUBLISH', channel, n .. '\n' .. list .. '\n' .. signature .. '\n' .. frame)
  end
  if ack then
    track(tenant, id, n, frame, scopes, channels, ack, ttl_ms, now_ms)
  end
  return id, false
end


-- Acknowledgements (PROTOCOL.md §5, "Acknowledgements"). Per tenant:
--   wsgateway:{t}:acks        deadlines: event id -> the next deadline, ms
--   wsgateway:{t}:ack:<id>    the event's state: `state` pending, acked or
--                             escalated; `stage` 1 until its redelivery,
--                             then 2; `w` the window, ms; `aud` how many
--                             connections got it; `n` its number; `frame`;
--                             `s`, `c` its scopes and their channels (JSON);
--                             `type`, `branch`, `channel` for the escalation
-- and, outside any tenant's slot (not written in a cluster, whose nodes
-- also sweep the tenants of their connections):
--   wsgateway:ack-tenants     tenant -> until when it may have deadlines, ms
-- Whoever sweeps (every node does), each step is taken once: the sweep is
-- one atomic call, and so is the escalation's publication inside it.
local ACK_SWEEP_MAX = 200

local function ack_tenants()
  return KEY_PREFIX .. 'wsgateway:ack-tenants'
end

track = function(tenant, id, n, frame, scopes, channels, ack, ttl_ms, now_ms)
  local state = key(tenant, 'ack:' .. id)
  redis.call('HSET', state, 'state', 'pending', 'stage', '1', 'w', ack.ms, 'aud', 0, 'n', n,
    'frame', frame, 's', cjson.encode(scopes), 'c', cjson.encode(channels),
    'type', ack.type, 'branch', ack.branch, 'channel', channels[1][1])
  redis.call('PEXPIRE', state, 2 * ack.ms + ttl_ms)
  redis.call('ZADD', key(tenant, 'acks'), now_ms + ack.ms, id)
  if not is_sharded() then
    redis.call('ZADD', ack_tenants(), 'GT', now_ms + 2 * ack.ms + 60000, tenant)
  end
end

-- Sends the event once more to every scope it was published on, beside
-- the numbered sequence: "r<n>\n<channels>\n<signature>\n<frame>".
local function redeliver(tenant, st)
  local scopes, channels = cjson.decode(st.s), cjson.decode(st.c)
  local frame = '{"redelivered":true,' .. string.sub(st.frame, 2)
  for k, scope in ipairs(scopes) do
    local list = table.concat(channels[k], ',')
    local channel = KEY_PREFIX .. 'wsgateway:events:{' .. tenant .. '}:' .. scope
    local number = 'r' .. st.n
    local signature = sign(channel .. '\n' .. number .. '\n' .. list .. '\n' .. frame)
    redis.call(is_sharded() and 'SPUBLISH' or 'PUBLISH', channel, number .. '\n' .. list .. '\n' .. signature .. '\n' .. frame)
  end
end

-- Publishes the escalation on the branch's admin channel, kept in history
-- like any event; its fields in the order of src/broker/acks.rs.
local function escalate(tenant, id, st, reason, now, size, ttl_ms, now_ms)
  local payload = '{"event_id":' .. cjson.encode(id) .. ',"type":"EVENT_UNACKNOWLEDGED","tenant_id":' .. tenant
    .. ',"branch_id":' .. st.branch .. ',"event_type":' .. cjson.encode(st.type)
    .. ',"channel":' .. cjson.encode(st.channel) .. ',"reason":"' .. reason .. '","audience":' .. st.aud
    .. ',"ts":' .. now_ms .. '}'
  local admin = 'channel:branch:' .. st.branch .. ':admin'
  keep_and_publish(tenant, '', {'branch:' .. st.branch}, {{admin}}, payload, size, ttl_ms, now, nil, true)
end

-- Takes the past deadlines of one tenant; appends {kind, tenant, id, ...}
-- to `out`.
local function sweep_tenant(tenant, now, now_ms, size, ttl_ms, out)
  local deadlines = key(tenant, 'acks')
  local due = redis.call('ZRANGEBYSCORE', deadlines, '-inf', now_ms, 'LIMIT', 0, ACK_SWEEP_MAX)
  for _, id in ipairs(due) do
    local state = key(tenant, 'ack:' .. id)
    local raw = redis.call('HGETALL', state)
    local st = {}
    for i = 1, #raw, 2 do
      st[raw[i]] = raw[i + 1]
    end
    if st.state ~= 'pending' then
      redis.call('ZREM', deadlines, id)
    elseif st.stage == '1' and tonumber(st.aud) > 0 then
      redis.call('HSET', state, 'stage', '2')
      redis.call('ZADD', deadlines, now_ms + tonumber(st.w), id)
      redeliver(tenant, st)
      out[#out + 1] = {'redelivered', tenant, id}
    else
      local reason = tonumber(st.aud) > 0 and 'no_ack' or 'no_audience'
      redis.call('HSET', state, 'state', 'escalated')
      redis.call('HDEL', state, 'frame', 's', 'c')
      redis.call('ZREM', deadlines, id)
      escalate(tenant, id, st, reason, now, size, ttl_ms, now_ms)
      out[#out + 1] = {'escalated', tenant, id, reason, st.aud, st.type, st.branch, st.channel}
    end
  end
end

-- KEYS[1] a tenant's deadlines key, ARGV[1] the tenant (a cluster: one
-- tenant per call); or no key and no tenant: every tenant with deadlines.
-- ARGV[2], ARGV[3] the history's size and age bounds. Returns the steps.
local function ack_sweep(keys, args)
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local size, ttl_ms = tonumber(args[2]), tonumber(args[3])
  local out = {}
  if keys[1] then
    sweep_tenant(args[1], now, now_ms, size, ttl_ms, out)
  else
    redis.call('ZREMRANGEBYSCORE', ack_tenants(), '-inf', now_ms - 1)
    for _, tenant in ipairs(redis.call('ZRANGE', ack_tenants(), 0, -1)) do
      sweep_tenant(tenant, now, now_ms, size, ttl_ms, out)
    end
  end
  return out
end

-- KEYS[1] the tenant's deadlines key; ARGV[1] the tenant, ARGV[2..] event
-- ids a connection that received them acknowledged. Returns, per id,
-- acknowledged, repeated or late.
local function ack(keys, args)
  local tenant = args[1]
  local out = {}
  for i = 2, #args do
    local state = key(tenant, 'ack:' .. args[i])
    local now = redis.call('HGET', state, 'state')
    if now == 'pending' then
      redis.call('HSET', state, 'state', 'acked')
      redis.call('HDEL', state, 'frame', 's', 'c')
      redis.call('ZREM', keys[1], args[i])
      out[#out + 1] = 'acknowledged'
    elseif now == 'acked' then
      out[#out + 1] = 'repeated'
    else
      out[#out + 1] = 'late'
    end
  end
  return out
end

-- KEYS[1] the tenant's deadlines key; ARGV[1] the tenant, then pairs of
-- an event id and how many more connections of a node got it.
local function ack_seen(keys, args)
  local tenant = args[1]
  for i = 2, #args - 1, 2 do
    local state = key(tenant, 'ack:' .. args[i])
    if redis.call('HGET', state, 'state') == 'pending' then
      redis.call('HINCRBY', state, 'aud', args[i + 1])
    end
  end
  return 'OK'
end

-- Validation: the rules of PROTOCOL.md §5 as the gateway applies them to a
-- publish API item and to a plain PUBLISH (src/event.rs), in the same
-- order, refused with the same codes and texts. Redis's JSON decoder would
-- not do: it reads 1.0 and 5e0 as 1 and 5, [] as {}, and takes NaN, hex
-- and leading zeros. So the event's text is read here as serde_json reads
-- it, keeping the raw text of each top-level field.

-- The gateway's own frame types, never an event's (src/event.rs
-- RESERVED_TYPES, which a unit test keeps equal to this list).
local RESERVED_TYPES = {'connected', 'pong', 'error', 'resync', 'token_refreshed', 'sectors_updated', 'presence'}
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
    return nil, fail('invalid_body', 'usage: FCALL ' .. FN_PREFIX .. 'wsgateway_publish 0 <channel> [<channel> ...] <event JSON>')
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
  if field('redelivered') then
    return invalid('`redelivered` is set by the gateway only')
  end
  local ack
  local ack_raw = field('ack')
  if ack_raw then
    local within = string.match(ack_raw, '^{%s*"within_s"%s*:%s*(%d+)%s*}$')
    within = within and #within <= 3 and tonumber(within)
    if not within or within < 1 or within > 300 then
      return invalid('`ack` must be {"within_s": N} with N an integer from 1 to 300')
    end
    ack = {ms = within * 1000, branch = ints.branch_id, type = t}
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
    if now_ms - ms > BOUNDS.stale_ms then
      return nil, fail('stale_event', "the event's `ts` is older than the stale limit (" .. BOUNDS.stale_ms / 1000 .. ' s)')
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
    ack = ack,
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
  local counter = key(event.tenant, 'seq')
  if keys[1] and keys[1] ~= counter then
    return fail('wrong_key', 'the key must be the tenant\'s counter, ' .. counter)
  end
  if not keys[1] and is_sharded() then
    return fail('key_required', 'a Redis Cluster needs the tenant\'s counter as the key, to route the call: FCALL '
      .. FN_PREFIX .. 'wsgateway_publish 1 ' .. counter .. ' <channels> <event>')
  end
  check_data(event.tenant, now)
  local id, duplicate = keep_and_publish(event.tenant, event.caller_id, event.scopes, event.channels,
    event.payload, size, ttl_ms, now, event.ack)
  return {id, duplicate and 'duplicate' or 'published'}
end

-- For the gateway's publish API, which has validated the batch already:
-- ARGV[1] is {"size": N, "ttl_ms": N, "items": [{"t": tenant, "e": caller
-- id or "", "s": [scope suffixes], "c": [[channels of each scope]], and
-- when it asks for an ack "a": {"ms": N, "branch": "<id>", "type": "<type>"}},
-- ...]},
-- ARGV[2..] the event texts, one per item. Returns {ids, duplicates}: the
-- ids, one per item, and 1 for each item whose caller id was used already.
local function publish_batch(keys, args)
  local spec = cjson.decode(args[1])
  local now = redis.call('TIME')
  local ids, duplicates = {}, {}
  for i, item in ipairs(spec.items) do
    check_data(item.t, now)
    local id, duplicate = keep_and_publish(item.t, item.e, item.s, item.c, args[i + 1], spec.size, spec.ttl_ms, now,
      item.a)
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
      kept = tonumber(string.match(at[1][2][2] or '', '^(%d+)\n')) or 0
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
-- Returns {time, run_id, {per stream: {trimmed, first, entries, counter,
-- epoch, data}}}: the server's TIME and run_id; how many entries the size
-- bound removed and the oldest number left ("0": none); the entries after
-- the given number; the tenant's counter and epoch ("0": none); and what
-- `check_data` found of the tenant's data ("ok", "reloaded", "new").
local function gap(keys, args)
  local now = redis.call('TIME')
  local max = tonumber(args[1])
  local streams, found = {}, {}
  for k = 1, #keys do
    local tenant, after = args[2 * k], args[2 * k + 1]
    found[tenant] = found[tenant] or check_data(tenant, now)
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
      found[tenant],
    }
  end
  return {now, server_run(), streams}
end

redis.register_function(FN_PREFIX .. 'wsgateway_publish', publish)
redis.register_function(FN_PREFIX .. 'wsgateway_publish_batch', publish_batch)
redis.register_function(FN_PREFIX .. 'wsgateway_resume', resume)
redis.register_function(FN_PREFIX .. 'wsgateway_gap', gap)
redis.register_function(FN_PREFIX .. 'wsgateway_ack', ack)
redis.register_function(FN_PREFIX .. 'wsgateway_ack_seen', ack_seen)
redis.register_function(FN_PREFIX .. 'wsgateway_ack_sweep', ack_sweep)
