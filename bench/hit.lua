-- wrk script for the hit-path scenario: every request POSTs the same client-credentials form on a
-- keep-alive connection, and done() prints one machine-readable summary line (times in µs).
-- Used unchanged against the ceiling, the sidecar and the provider, so all three see the same bytes.

wrk.method = "POST"
wrk.path = "/oauth/token"
wrk.body = "grant_type=client_credentials&client_id=bench-client&client_secret=bench-secret&scope=read"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"

dofile("bench/summary.lua") -- done(): the suite's one summary line
