-- The one summary line every wrk script of the suite prints: done() writes a `WRK_JSON {...}`
-- line (times in µs) that bench.py, compare.py and loads.py read. Loaded by each script with
-- dofile("bench/summary.lua"): wrk runs from the repository's root (bench.py, compare.py and
-- instructions.sh start it there).

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
