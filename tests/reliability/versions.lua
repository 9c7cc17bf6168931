-- wrk script for the hot-swap test: POST one body (first line of the file after `--`),
-- count statuses and, per model version, whether the returned item ids equal that version's
-- expected list (the other lines: "<version> <id>,<id>,...").
-- Counters are globals so that done() can read them from each thread's Lua state.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  counts = { ok = 0, bad_status = 0, consistent = 0, inconsistent = 0 }
  versions = {}
  expected = {}
  local n = 0
  for line in io.lines(args[1]) do
    n = n + 1
    if n == 1 then
      body = line
    else
      local version, ids = line:match("^(%S+) (%S+)$")
      expected[version] = ids
    end
  end
end

function request()
  return wrk.format("POST", nil, { ["Content-Type"] = "application/json" }, body)
end

function response(status, headers, resp)
  if status ~= 200 then
    counts.bad_status = counts.bad_status + 1
    return
  end
  counts.ok = counts.ok + 1
  local version = resp:match('"model_version":"([^"]+)"') or "none"
  versions[version] = (versions[version] or 0) + 1
  local ids = {}
  for id in resp:gmatch('"item_id":"([^"]*)"') do  -- ids are JSON strings
    ids[#ids + 1] = id
  end
  if expected[version] == table.concat(ids, ",") then
    counts.consistent = counts.consistent + 1
  else
    counts.inconsistent = counts.inconsistent + 1
  end
end

function done(summary, latency, requests)
  local total = { ok = 0, bad_status = 0, consistent = 0, inconsistent = 0 }
  local per_version = {}
  for _, t in ipairs(threads) do
    local c = t:get("counts")
    for k, v in pairs(c) do total[k] = total[k] + v end
    for k, v in pairs(t:get("versions")) do per_version[k] = (per_version[k] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(per_version) do parts[#parts + 1] = string.format('"%s": %d', k, v) end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, '
      .. '"ok": %d, "bad_status": %d, "consistent": %d, "inconsistent": %d, '
      .. '"p50_us": %d, "p99_us": %d, "versions": {%s}}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    total.ok, total.bad_status, total.consistent, total.inconsistent,
    latency:percentile(50), latency:percentile(99), table.concat(parts, ", ")))
end
