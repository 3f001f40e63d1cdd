-- wrk script for `python -m loadtest.bench`.
--   wrk ... -s loadtest/wrk_walletd.lua URL -- MODE IDS_FILE AMOUNT [DEPOSIT_SECONDS]
-- MODE: "hot"  POST a deposit to the first id of IDS_FILE
--       "many" POST a deposit to a random id of IDS_FILE
--       "get"  GET a random id of IDS_FILE
--       "transfer" POST a transfer of AMOUNT between two different random ids of IDS_FILE
--       "pairs" POST a transfer of AMOUNT between the two ids of a random line "ID ID" of
--               IDS_FILE, in a random direction (the cluster bench picks the pairs)
-- done() prints one line "WRKJSON {...}" with latency percentiles (microseconds), the status
-- counts and the number of requests written, which bench.py parses. `sent` minus the
-- responses counts the requests cut off when wrk stopped: their outcome is unknown (wrk
-- calls request() about once per run more than it writes, so this is an upper bound).
-- With DEPOSIT_SECONDS, deposits stop after that many seconds and the rest of the run sends
-- GET /api/v1/wallets/quiesce, which walletd refuses with 400 and no side effect: wrk then
-- cuts off only those, every deposit gets its answer, and the money check can be exact.

local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

local mode, ids, body, amount, headers, static_request, deposit_until
local QUIESCE = "/api/v1/wallets/quiesce"
statuses = {}
sent = 0
quiesce_sent = 0

function init(args)
  mode = args[1]
  ids = {}
  for line in io.lines(args[2]) do
    if #line > 0 then ids[#ids + 1] = line end
  end
  assert(#ids > 0, "no wallet ids in " .. args[2])
  math.randomseed(os.time() * 1000 + (tid or 0))
  amount = args[3] or "1.00"
  body = '{"operation_type":"DEPOSIT","amount":"' .. amount .. '"}'
  headers = { ["Content-Type"] = "application/json" }
  if args[4] then deposit_until = os.time() + tonumber(args[4]) end
  if mode == "hot" then
    static_request = wrk.format("POST", "/api/v1/wallets/" .. ids[1] .. "/operation", headers, body)
  end
end

function request()
  if deposit_until and os.time() >= deposit_until then
    quiesce_sent = quiesce_sent + 1
    return wrk.format("GET", QUIESCE)
  end
  sent = sent + 1
  if mode == "hot" then return static_request end
  local id = ids[math.random(#ids)]
  if mode == "get" then return wrk.format("GET", "/api/v1/wallets/" .. id) end
  if mode == "pairs" then
    local first, second = id:match("(%S+) (%S+)")
    if math.random(2) == 1 then first, second = second, first end
    return wrk.format("POST", "/api/v1/transfers", headers,
      '{"from_wallet_id":"' .. first .. '","to_wallet_id":"' .. second ..
      '","amount":"' .. amount .. '"}')
  end
  if mode == "transfer" then
    local other = ids[math.random(#ids)]
    while other == id and #ids > 1 do other = ids[math.random(#ids)] end
    return wrk.format("POST", "/api/v1/transfers", headers,
      '{"from_wallet_id":"' .. id .. '","to_wallet_id":"' .. other ..
      '","amount":"' .. amount .. '"}')
  end
  return wrk.format("POST", "/api/v1/wallets/" .. id .. "/operation", headers, body)
end

function response(status, response_headers, response_body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local merged, total_sent, total_quiesce = {}, 0, 0
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      local key = tostring(status)
      merged[key] = (merged[key] or 0) + count
    end
    total_sent = total_sent + thread:get("sent")
    total_quiesce = total_quiesce + thread:get("quiesce_sent")
  end
  local parts = {}
  for key, count in pairs(merged) do parts[#parts + 1] = string.format('"%s":%d', key, count) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"duration_us":%d,"requests":%d,"bytes":%d,"sent":%d,"quiesce_sent":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f},"statuses":{%s}}\n',
    summary.duration, summary.requests, summary.bytes, total_sent, total_quiesce,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, table.concat(parts, ",")))
end
