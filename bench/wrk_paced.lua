-- wrk script of bench.soak: POST the JSON body in $WRK_BODY at a constant rate, one
-- request every $WRK_INTERVAL_MS per connection, and print ONE JSON line when done:
-- every latency in ms, and the errors.
--
--   WRK_BODY='{"records": [...]}' WRK_INTERVAL_MS=64 wrk -t64 -c64 -d60s --timeout 2s \
--       -s bench/wrk_paced.lua http://127.0.0.1:8000/predict
--
-- Run it with one connection per thread (-tN -cN): wrk tells a script neither which
-- connection answered nor when a request was sent, so a thread's one connection is how a
-- response is matched with its request.
--
-- No coordinated omission (what wrk2 fixes): each connection follows a fixed schedule.
-- A request whose turn came while its connection was busy (the previous answer still
-- awaited, or the connection still being made) goes out as soon as it is free, and its
-- latency is counted from when it was due: the time it waited behind a slow answer is
-- counted too. A request that waited for its turn on a timer is counted from when it was
-- sent (wrk's timers have 1 ms steps: that lateness is the client's, not the server's). Errors: wrk's connect, read and write errors; non-2xx answers; timeouts:
-- answers slower than --timeout from their sending (wrk's count) and requests still
-- unanswered at the end that were sent more than WRK_TIMEOUT_MS before.

local ffi = require("ffi")
ffi.cdef([[
struct bench_timespec { long tv_sec; long tv_nsec; };
int clock_gettime(int clock, struct bench_timespec *now);
]])
local CLOCK_MONOTONIC = 1
local clock = ffi.new("struct bench_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, clock)
  return tonumber(clock.tv_sec) * 1000 + tonumber(clock.tv_nsec) / 1e6
end

wrk.method = "POST"
wrk.body = os.getenv("WRK_BODY") or wrk.body
wrk.headers["Content-Type"] = "application/json"

local interval = assert(tonumber(os.getenv("WRK_INTERVAL_MS") or ""), "set WRK_INTERVAL_MS")
local timeout_ms = tonumber(os.getenv("WRK_TIMEOUT_MS") or "") or 2000

-- The main state: every thread, for done().
local threads = {}

function setup(thread)
  -- Spread the connections' schedules over one interval (golden-ratio steps), so they
  -- do not all send at once.
  thread:set("phase", (#threads * 0.6180339887) % 1)
  threads[#threads + 1] = thread
end

-- Each thread's state (globals, so that done() can read them through thread:get).
latencies = {} -- ms, one per answer
non_2xx = 0
in_flight = nil -- when the request awaiting its answer is counted from
local due -- when the next request is due
local timed = false -- whether the next request waited for its turn on a timer
local request_text

function init(args)
  due = now_ms() + phase * interval
end

function delay()
  local wait = due - now_ms()
  timed = wait > 0
  return timed and math.ceil(wait) or 0
end

function request()
  local sent = now_ms()
  -- Not timed: the connection was busy when this request was due (or it was just
  -- remade after an error, and the request may go out early: then from when it is sent).
  in_flight = timed and sent or math.min(sent, due)
  timed = false
  due = due + interval
  request_text = request_text or wrk.format()
  return request_text
end

function response(status, headers, body)
  local now = now_ms()
  if in_flight ~= nil then
    latencies[#latencies + 1] = now - in_flight
    in_flight = nil
  end
  if status < 200 or status > 299 then
    non_2xx = non_2xx + 1
  end
end

function done(summary, latency, requests)
  local now = now_ms()
  local all, failed, unanswered = {}, 0, 0
  for _, thread in ipairs(threads) do
    for _, ms in ipairs(thread:get("latencies")) do
      all[#all + 1] = string.format("%.3f", ms)
    end
    failed = failed + thread:get("non_2xx")
    local pending = thread:get("in_flight")
    if pending ~= nil and now - pending > timeout_ms then
      unanswered = unanswered + 1
    end
  end
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_s": %.3f, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "non_2xx": %d, "timeout": %d}, '
      .. '"latencies_ms": [%s]}\n',
    summary.requests, summary.duration / 1e6,
    e.connect, e.read, e.write, failed, e.timeout + unanswered,
    table.concat(all, ",")
  ))
end
