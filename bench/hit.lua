-- wrk script for the hit-path scenario: every request POSTs the same client-credentials form on a
-- keep-alive connection, and done() prints one machine-readable summary line (times in µs).
-- Used unchanged against the ceiling, the sidecar and the provider, so all three see the same bytes.

wrk.method = "POST"
wrk.path = "/oauth/token"
wrk.body = "grant_type=client_credentials&client_id=bench-client&client_secret=bench-secret&scope=read"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"

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
