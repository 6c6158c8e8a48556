"""Triton's own Python client (tritonclient) against a real tickserve.

Starts the tickserve binary given as argv[1] on free loopback ports with the
bundled repository, then, over HTTP (JSON and binary tensors, gzip both
ways) and gRPC (unary, raw tensors, gzip and a bidirectional stream),
checks liveness, readiness, metadata, the model configuration and that the
outputs equal the golden fixture. Exits non-zero on the first failure.
"""

import os
import queue
import socket
import subprocess
import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = "cnn_lstm"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_outputs(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    assert np.allclose(got, want, atol=1e-5, rtol=0), f"{what}: outputs differ from golden"
    print(f"ok  {what}")


def main():
    binary = sys.argv[1]
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    server = subprocess.Popen(
        [binary, "serve", "--model-repository", os.path.join(ROOT, "models"),
         "--http-addr", f"127.0.0.1:{http_port}", "--grpc-addr", f"127.0.0.1:{grpc_port}",
         "--metrics-addr", f"127.0.0.1:{metrics_port}", "--log-level", "warn"],
    )
    try:
        run(http_port, grpc_port, server)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("all tritonclient checks passed")


def run(http_port, grpc_port, server):
    golden_in = np.load(os.path.join(ROOT, "fixtures/golden/cnn_lstm/input.npy")).astype(np.float32)
    golden_out = np.load(os.path.join(ROOT, "fixtures/golden/cnn_lstm/output.npy")).astype(np.float32)
    rows = min(4, golden_in.shape[0])
    x, want = golden_in[:rows], golden_out[:rows]

    http = httpclient.InferenceServerClient(url=f"127.0.0.1:{http_port}")
    deadline = time.time() + 60
    while True:
        assert server.poll() is None, "tickserve exited"
        try:
            if http.is_server_ready():
                break
        except Exception:  # not listening yet
            pass
        assert time.time() < deadline, "tickserve not ready in 60 s"
        time.sleep(0.1)

    # --- HTTP ---
    assert http.is_server_live()
    assert http.is_model_ready(MODEL)
    meta = http.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["inputs"][0]["shape"] == [-1, 50, 60], meta
    config = http.get_model_config(MODEL)
    assert config["max_batch_size"] == 32 and config["input"][0]["data_type"] == "TYPE_FP32", config
    print("ok  http health, metadata, config")

    for binary in (False, True):
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("output", binary_data=binary)
        result = http.infer(MODEL, [inp], outputs=[out], request_id="h")
        check_outputs(result.as_numpy("output"), want, f"http infer binary_data={binary}")

    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    result = http.infer(MODEL, [inp], request_compression_algorithm="gzip",
                        response_compression_algorithm="gzip")
    check_outputs(result.as_numpy("output"), want, "http infer gzip request and response")

    bad = httpclient.InferInput("input", list(x.shape), "FP64")
    bad.set_data_from_numpy(x.astype(np.float64), binary_data=True)
    try:
        http.infer(MODEL, [bad])
        raise AssertionError("FP64 input accepted")
    except httpclient.InferenceServerException as e:
        assert "the model takes FP32" in str(e), e
        print("ok  http FP64 refused:", e.message())

    # --- gRPC ---
    grpc = grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
    assert grpc.is_server_live() and grpc.is_server_ready() and grpc.is_model_ready(MODEL)
    meta = grpc.get_model_metadata(MODEL, as_json=True)
    assert meta["name"] == MODEL, meta
    config = grpc.get_model_config(MODEL, as_json=True)["config"]
    assert config["max_batch_size"] == 32, config
    print("ok  grpc health, metadata, config")

    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = grpc.infer(MODEL, [inp], outputs=[grpcclient.InferRequestedOutput("output")])
    check_outputs(result.as_numpy("output"), want, "grpc infer")
    result = grpc.infer(MODEL, [inp], compression_algorithm="gzip")
    check_outputs(result.as_numpy("output"), want, "grpc infer gzip")

    answers = queue.Queue()
    grpc.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(rows):
        one = grpcclient.InferInput("input", [1, 50, 60], "FP32")
        one.set_data_from_numpy(x[i:i + 1])
        grpc.async_stream_infer(MODEL, [one], request_id=str(i))
    got = {}
    for _ in range(rows):
        result, error = answers.get(timeout=30)
        assert error is None, error
        got[int(result.get_response().id)] = result.as_numpy("output")
    grpc.stop_stream()
    for i in range(rows):
        check_outputs(got[i], want[i:i + 1], f"grpc stream request {i}")

    try:
        grpc.get_model_metadata("nope")
        raise AssertionError("unknown model answered")
    except grpcclient.InferenceServerException as e:
        assert e.status() == "StatusCode.NOT_FOUND", e.status()
        print("ok  grpc unknown model is NOT_FOUND")


if __name__ == "__main__":
    main()
