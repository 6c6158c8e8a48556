"""Triton's own Python client (tritonclient) against a real tickserve.

Starts the tickserve binary given as argv[1] on free loopback ports with the
bundled repository, then, over HTTP (JSON and binary tensors, gzip both
ways) and gRPC (unary, raw tensors, gzip and a bidirectional stream),
checks liveness, readiness, metadata, the model configuration and that the
outputs equal the golden fixture. Then starts a second tickserve in explicit
model control mode on a Triton-style repository (config.pbtxt and an
ONNX-only folder) and checks load_model, unload_model and
get_model_repository_index over HTTP and gRPC. Exits non-zero on the first
failure.
"""

import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
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


TRITON_PBTXT = """
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "input", data_type: TYPE_FP32, dims: [ 50, 60 ] } ]
output [ { name: "output", data_type: TYPE_FP32, dims: [ 3 ] } ]
dynamic_batching { max_queue_delay_microseconds: 200 }
"""


def start_server(binary, repository, extra=()):
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    server = subprocess.Popen(
        [binary, "serve", "--model-repository", repository,
         "--http-addr", f"127.0.0.1:{http_port}", "--grpc-addr", f"127.0.0.1:{grpc_port}",
         "--metrics-addr", f"127.0.0.1:{metrics_port}", "--log-level", "warn", *extra],
    )
    return server, http_port, grpc_port


def main():
    binary = sys.argv[1]
    server, http_port, grpc_port = start_server(binary, os.path.join(ROOT, "models"))
    try:
        run(http_port, grpc_port, server)
    finally:
        server.terminate()
        server.wait(timeout=30)

    repository = tempfile.mkdtemp(prefix="tickserve-triton-repo-")
    try:
        for name in ("triton_cnn", "bare"):
            os.makedirs(os.path.join(repository, name, "1"))
            shutil.copy(os.path.join(ROOT, "models/cnn_lstm/1/model.onnx"),
                        os.path.join(repository, name, "1", "model.onnx"))
        with open(os.path.join(repository, "triton_cnn", "config.pbtxt"), "w") as f:
            f.write(TRITON_PBTXT)
        server, http_port, grpc_port = start_server(
            binary, repository, ("--model-control-mode", "explicit", "--load-model", "triton_cnn"))
        try:
            run_repository(http_port, grpc_port, server)
        finally:
            server.terminate()
            server.wait(timeout=30)
    finally:
        shutil.rmtree(repository, ignore_errors=True)
    print("all tritonclient checks passed")


def wait_ready(http, server):
    deadline = time.time() + 60
    while True:
        assert server.poll() is None, "tickserve exited"
        try:
            if http.is_server_ready():
                return
        except Exception:  # not listening yet
            pass
        assert time.time() < deadline, "tickserve not ready in 60 s"
        time.sleep(0.1)


def states(index):
    """{(name, version): (state, reason)} of a repository index."""
    return {(m["name"], m.get("version", "")): (m.get("state", ""), m.get("reason", ""))
            for m in index}


def run_repository(http_port, grpc_port, server):
    golden_in = np.load(os.path.join(ROOT, "fixtures/golden/cnn_lstm/input.npy")).astype(np.float32)
    golden_out = np.load(os.path.join(ROOT, "fixtures/golden/cnn_lstm/output.npy")).astype(np.float32)
    x, want = golden_in[:2], golden_out[:2]
    http = httpclient.InferenceServerClient(url=f"127.0.0.1:{http_port}")
    wait_ready(http, server)

    # --- HTTP ---
    index = states(http.get_model_repository_index())
    assert index[("triton_cnn", "1")] == ("READY", ""), index
    assert index[("bare", "")] == ("UNAVAILABLE", "not loaded"), index
    assert not http.is_model_ready("bare")
    http.load_model("bare")
    assert http.is_model_ready("bare")
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    for model in ("bare", "triton_cnn"):
        check_outputs(http.infer(model, [inp]).as_numpy("output"), want, f"http infer {model}")
    assert http.get_model_config("triton_cnn")["max_batch_size"] == 8
    http.unload_model("triton_cnn")
    assert not http.is_model_ready("triton_cnn")
    index = states(http.get_model_repository_index())
    assert index[("triton_cnn", "")] == ("UNAVAILABLE", "unloaded"), index
    print("ok  http load_model, unload_model, get_model_repository_index")

    # --- gRPC ---
    grpc = grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
    grpc.load_model("triton_cnn")
    assert grpc.is_model_ready("triton_cnn")
    index = states(grpc.get_model_repository_index(as_json=True)["models"])
    assert index[("triton_cnn", "1")][0] == "READY" and index[("bare", "1")][0] == "READY", index
    grpc.load_model("bare", config=json.dumps({"max_batch_size": 4}))
    assert grpc.get_model_config("bare", as_json=True)["config"]["max_batch_size"] == 4
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    check_outputs(grpc.infer("bare", [inp]).as_numpy("output"), want, "grpc infer bare (config override)")
    grpc.unload_model("bare")
    index = states(grpc.get_model_repository_index(as_json=True)["models"])
    assert index[("bare", "")] == ("UNAVAILABLE", "unloaded"), index
    try:
        grpc.load_model("nope")
        raise AssertionError("loading a missing model succeeded")
    except grpcclient.InferenceServerException as e:
        assert "no such model folder" in e.message(), e
    print("ok  grpc load_model (with a config override), unload_model, get_model_repository_index")


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
