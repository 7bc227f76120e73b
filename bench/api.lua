-- wrk script for the injection scenario: every request is `GET /api/v2/users/me` on a keep-alive
-- connection, with the Authorization header read from the file named by the first argument after
-- `--` (a line such as `Bearer tok-1xxx...`), or with none when no file is given; done() prints
-- one machine-readable summary line (times in µs), the same as hit.lua's.

wrk.method = "GET"
wrk.path = "/api/v2/users/me"

function init(args)
  if args[1] and args[1] ~= "" then
    local file = assert(io.open(args[1], "r"))
    wrk.headers["Authorization"] = file:read("*l")
    file:close()
  end
end

dofile("bench/summary.lua") -- done(): the suite's one summary line
