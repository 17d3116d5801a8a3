-- wrk script of bench.online: POST the JSON body in $WRK_BODY (else wrk.body) to the
-- URL given on the command line, and print ONE JSON line of results when done.
--
--   WRK_BODY='{"records": [...]}' wrk -t1 -c8 -d10s --latency --timeout 2s \
--       -s bench/wrk_predict.lua http://127.0.0.1:8000/predict
--
-- Latencies are in ms (wrk counts microseconds); requests that timed out have none.

wrk.method = "POST"
wrk.body = os.getenv("WRK_BODY") or wrk.body
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, '
      .. '"requests": %d, "duration_s": %.3f, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000,
    summary.requests, summary.duration / 1e6,
    e.connect, e.read, e.write, e.status, e.timeout
  ))
end
