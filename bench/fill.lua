-- wrk script for the memory scenario and the fleet's cold misses: request i asks for client
-- "fill-i", so each request is a new cache key, until N (the first script argument, default
-- 100000) answers have arrived; the thread then stops and appends a line to the file named by the
-- second argument, if any (wrk's main thread sleeps out its whole -d: bench.py interrupts it once
-- the line is there). Requests still in flight past N wrap around to keys already cached.

local n, sent, answered, failed = 100000, 0, 0, 0
local done_file, finished = nil, false

function init(args)
  if args[1] then n = tonumber(args[1]) end
  done_file = args[2]
end

function request()
  sent = sent + 1
  local key = ((sent - 1) % n) + 1
  local body = "grant_type=client_credentials&client_id=fill-" .. key
    .. "&client_secret=fill-secret&scope=read"
  return wrk.format("POST", "/oauth/token",
    { ["Content-Type"] = "application/x-www-form-urlencoded" }, body)
end

function response(status, headers, body)
  answered = answered + 1
  if status ~= 200 then failed = failed + 1 end
  if answered >= n and not finished then
    finished = true
    if done_file then
      local f = assert(io.open(done_file, "a"))
      f:write("done\n")
      f:close()
    end
    wrk.thread:stop()
  end
end

dofile("bench/summary.lua") -- done(): the suite's one summary line
