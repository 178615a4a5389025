-- wrk script: POST the file in BENCH_FILE as multipart field "file"; print a JSON summary.
local f = assert(io.open(os.getenv("BENCH_FILE"), "rb"))
local data = f:read("*all")
f:close()
local boundary = "cnnservebenchboundary"
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
wrk.body = "--" .. boundary .. "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"image\"\r\n"
  .. "Content-Type: " .. os.getenv("BENCH_TYPE") .. "\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"

done = function(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "status_errors": %d, "connect_errors": %d, "read_errors": %d, '
      .. '"write_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
