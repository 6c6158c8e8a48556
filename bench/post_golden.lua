-- wrk script: POST the golden Open Inference Protocol request (one row).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open("fixtures/golden/cnn_lstm/request.json", "rb"))
wrk.body = f:read("*a")
f:close()
