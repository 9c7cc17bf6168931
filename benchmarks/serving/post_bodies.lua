-- wrk script: POST real request bodies (one JSON document per line of the file given after
-- `--`), cycling from a per-thread random offset; prints a JSON summary line at the end.
-- Usage: wrk -t1 -c64 -d15s -s post_bodies.lua http://127.0.0.1:8000/v1/recommend -- bodies.jsonl
local bodies = {}
local i = 0

function init(args)
  for line in io.lines(args[1]) do
    bodies[#bodies + 1] = line
  end
  math.randomseed(os.time() + #bodies)
  i = math.random(#bodies)
end

function request()
  i = i % #bodies + 1
  return wrk.format("POST", nil, { ["Content-Type"] = "application/json" }, bodies[i])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "non_2xx": %d, "errors_connect": %d, '
      .. '"errors_read": %d, "errors_write": %d, "errors_timeout": %d, "p50_us": %d, '
      .. '"p90_us": %d, "p95_us": %d, "p99_us": %d, "p999_us": %d, "max_us": %d, '
      .. '"mean_us": %.1f}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
