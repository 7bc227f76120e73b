-- wrk script for the loads made of many clients, run with one client per wrk thread (-tN -cN): the
-- story and the burst (clients asking every second), the fleet, the steady state (a closed loop)
-- and the soak (paced clients whose every token is checked). Each thread is one keep-alive
-- client with its own Lua state; wrk parses the answers, this script only counts them. done()
-- prints one `WRK_JSON {...}` line that bench/bench.py and bench/soak.py read.
--
-- The schedule starts 0.1 s after wrk set up its first thread, so that every thread has started
-- and connected by then (100 threads take about 50 ms on 2 cores). Arguments after `--`, each
-- NAME=VALUE (times in seconds; the log's are on CLOCK_MONOTONIC, the clock of Python's
-- time.monotonic()):
--   requests=FILE  one request per line, `AUTHORIZATION<TAB>FORM BODY` (AUTHORIZATION may be
--                  empty); client i (1-based) sends line i, wrapping around the file
--   rotate=1       client i's j-th request uses line i + j instead (a closed loop over the keys)
--   clients=N      the number of threads, for the start spread
--   every=S        seconds between a client's requests (default 0: a closed loop)
--   spread=S       client i's first request is S * (i - 1) / clients after the start
--   jitter=S       a uniform random delay in [0, S) added to every scheduled request
--   ticks=N        requests per client; then the thread stops and appends a line to `done`
--   done=FILE      see ticks (bench.py interrupts wrk once every thread has written its line)
--   log=PREFIX     each answer as `SENT LATENCY_US STATUS HELD_US` in PREFIX<i>.txt: HELD_US is
--                  how late the request left against its schedule (a slow answer before it, or a
--                  connection wrk had to make again first: a refused one is retried at once)
--   lifetime=S     check every 200: a JSON token whose expires_in is in 1..S; each distinct token
--                  is reported with its last sighting and the latest expiry it was served with
-- done() also reports `counts.sent`, the requests sent; `counts.retried`, those of them whose
-- connection failed before the answer (refused, reset, closed under it) so that wrk sent them
-- again; and `counts.resent`, every extra attempt (wrk reconnects at once, so a refused
-- connection is retried in a tight loop: attempts, not requests).
-- A client that falls more than one interval behind (a slow answer) sends its next request at
-- once and then keeps its interval, as a real client would; it never bursts to catch up.

local ffi = require("ffi")
ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]])
local timespec = ffi.new("bench_timespec")
local CLOCK_MONOTONIC = 1

local function now()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
  return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) * 1e-9
end

-- The main state: the threads, numbered as wrk creates them, and the schedule's start.
local threads, schedule_start = {}, nil
local START_DELAY = 0.1

function setup(thread)
  schedule_start = schedule_start or now() + START_DELAY
  table.insert(threads, thread)
  thread:set("id", #threads)
  thread:set("start", schedule_start)
end

-- A thread's state. What done() reads is one flat table, `tally`, read once per thread: wrk
-- 4.1's thread:get() pops one value too many after copying a table (it cannot copy a nested table
-- at all), so a thread's state must not be read again after one table has been.
--   ["status 200"] = answers with that status, ["cache VALUE"] = answers with that Cache-Status
--   (its ttl dropped), ["anomaly KIND"] = token checks failed, ["seen TOKEN"] = its last sighting,
--   ["expiry TOKEN"] = the latest expiry it was served with (sighting + expires_in).
tally = {}
local opt, lines = {}, {}
local live, finished = false, false
local sent, sent_at, next_at, due_at = 0, 0, 0, nil
-- The request in flight: its line, whether it is still unanswered, and how often it was sent.
local line, awaiting, attempts = 1, false, 0
local logfile

function init(args)
  for _, arg in ipairs(args) do
    local name, value = arg:match("^([%w_]+)=(.*)$")
    assert(name, "clients.lua: argument not NAME=VALUE: " .. arg)
    opt[name] = value
  end
  for line in io.lines(opt.requests) do
    local auth, body = line:match("^([^\t]*)\t(.*)$")
    local headers = { ["Content-Type"] = "application/x-www-form-urlencoded" }
    if auth ~= "" then headers["Authorization"] = auth end
    table.insert(lines, wrk.format("POST", "/oauth/token", headers, body))
  end
  assert(#lines > 0, "clients.lua: no requests in " .. opt.requests)
  opt.every = tonumber(opt.every or 0)
  opt.jitter = tonumber(opt.jitter or 0)
  opt.ticks = tonumber(opt.ticks or 0)
  opt.lifetime = opt.lifetime and tonumber(opt.lifetime)
  next_at = start + tonumber(opt.spread or 0) * (id - 1) / tonumber(opt.clients or 1)
  math.randomseed(id)
  if opt.log then
    logfile = assert(io.open(opt.log .. id .. ".txt", "w"))
    logfile:setvbuf("full")
  end
end

local function finish()
  if finished then return end
  finished = true
  if logfile then logfile:flush() end
  if opt.done then
    local f = assert(io.open(opt.done, "a"))
    f:write(id, "\n")
    f:close()
  end
  wrk.thread:stop()
end

local function count(key)
  tally[key] = (tally[key] or 0) + 1
end

function delay()
  live = true
  if awaiting then return 0 end  -- the request in flight lost its connection: send it again
  if opt.ticks > 0 and sent >= opt.ticks then
    finish()
    return 3600 * 1000
  end
  due_at = next_at + math.random() * opt.jitter
  return math.max(0, math.floor((due_at - now()) * 1000 + 0.5))
end

function request()
  -- wrk calls request() once before the run to check the script: that call sends nothing.
  if not live then return lines[1] end
  sent_at = now()
  if awaiting then
    -- The request in flight got no answer: its connection was refused, reset or closed under
    -- it, and wrk asks again on a new one (at once, without delay()). The same request, due
    -- when it was: it neither counts as sent again nor moves the schedule.
    if attempts == 1 then count("count retried") end
    attempts = attempts + 1
    count("count resent")
    return lines[line]
  end
  awaiting, attempts = true, 1
  line = (id - 1 + (opt.rotate == "1" and sent or 0)) % #lines + 1
  sent = sent + 1
  tally["count sent"] = sent
  next_at = math.max(next_at + opt.every, sent_at - opt.every)
  return lines[line]
end

local function check(body, seen)
  local token = body:match('"access_token"%s*:%s*"([^"]*)"')
  local expires_in = tonumber(body:match('"expires_in"%s*:%s*(%-?%d+)'))
  if not token or not expires_in then
    count("anomaly not_a_token")
    return
  end
  if expires_in < 1 or expires_in > opt.lifetime then
    count("anomaly expires_in_out_of_range")
  end
  tally["seen " .. token] = seen
  tally["expiry " .. token] = math.max(tally["expiry " .. token] or 0, seen + expires_in)
end

function response(status, headers, body)
  local answered = now()
  awaiting = false
  count("status " .. status)
  local cache_status = headers["cache-status"] or headers["Cache-Status"]
  count("cache " .. (cache_status and (cache_status:gsub("; ttl=%d+", "")) or "none"))
  if logfile then
    logfile:write(string.format("%.6f %d %d %d\n", sent_at, (answered - sent_at) * 1e6, status,
                                math.max(0, sent_at - (due_at or sent_at)) * 1e6))
  end
  if opt.lifetime and status == 200 then check(body, answered) end
end

local function encode(value)
  if type(value) == "table" and value[1] ~= nil then
    local parts = {}
    for _, v in ipairs(value) do table.insert(parts, encode(v)) end
    return "[" .. table.concat(parts, ",") .. "]"
  elseif type(value) == "table" then
    local parts = {}
    for k, v in pairs(value) do
      table.insert(parts, encode(tostring(k)) .. ":" .. encode(v))
    end
    return "{" .. table.concat(parts, ",") .. "}"
  elseif type(value) == "string" then
    return '"' .. value:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end) .. '"'
  else
    return string.format("%.17g", value)
  end
end


function done(summary, latency, requests)
  local result = {
    requests = summary.requests,
    duration_s = summary.duration / 1e6,
    latency_us = { p50 = latency:percentile(50), p99 = latency:percentile(99),
                   p999 = latency:percentile(99.9), max = latency.max, mean = latency.mean },
    errors = { connect = summary.errors.connect, read = summary.errors.read,
               write = summary.errors.write, status = summary.errors.status,
               timeout = summary.errors.timeout },
    statuses = {}, cache_status = {}, anomalies = {}, tokens = {}, counts = {},
  }
  local sums = { status = result.statuses, cache = result.cache_status,
                  anomaly = result.anomalies, count = result.counts }
  for i, thread in ipairs(threads) do
    local tally, tokens = thread:get("tally"), {}
    for key, value in pairs(tally) do
      local kind, name = key:match("^(%a+) (.*)$")
      if sums[kind] then
        sums[kind][name] = (sums[kind][name] or 0) + value
      elseif kind == "seen" then
        tokens[name] = { value, tally["expiry " .. name] }
      end
    end
    if next(tokens) then result.tokens[tostring(i)] = tokens end
  end
  io.write("WRK_JSON ", encode(result), "\n")
end
