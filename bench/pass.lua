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

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_s":%.3f,"rps":%.1f,"mean_us":%.1f,"p50_us":%d,'
      .. '"p90_us":%d,"p99_us":%d,"max_us":%d,"errors_connect":%d,"errors_read":%d,'
      .. '"errors_write":%d,"errors_status":%d,"errors_timeout":%d}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
