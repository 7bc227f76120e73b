-- wrk script for the pass-through scenario: every request is `GET /api/v2/users/me`, or with
-- `post` as the first argument after `--` a `POST` of the same path with a 4 KiB body, on a
-- keep-alive connection; done() prints one machine-readable summary line (times in µs), the same
-- as hit.lua's. Used unchanged against the upstream alone, the sidecar and nginx.

wrk.method = "GET"
wrk.path = "/api/v2/users/me"

function init(args)
  if args[1] == "post" then
    wrk.method = "POST"
    wrk.body = string.rep("x", 4096)
    wrk.headers["Content-Type"] = "application/octet-stream"
  end
end

dofile("bench/summary.lua") -- done(): the suite's one summary line
