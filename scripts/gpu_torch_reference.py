#!/usr/bin/env python3
"""PyTorch on the same GPU, for scripts/gpu-check.sh.

Rebuilds each fixture model in PyTorch from the weights `gpu_check weights`
wrote (the layers tickserve recognised, in its layouts), checks it against
the fixture outputs, then times the reference model at batches 1/32/256/1024
in fp32 (TF32 off), tf32 and bf16, eager (cuDNN LSTM) and replayed from a
CUDA graph. A call is timed as tickserve's is: pinned host input copied in,
the forward pass, the output copied back to the host.

Prints one `RESULT {json}` line per measurement.

usage: gpu_torch_reference.py <weights dir> <repo root> [seconds per point]
"""

import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

# ONNX gate order (i, o, f, c) -> PyTorch's (i, f, g, o).
ONNX_TO_TORCH = [0, 2, 3, 1]


def reorder_gates(m, hidden):
    """Rows of a [4H, ...] matrix (or a [4H] vector) from ONNX to PyTorch order."""
    blocks = [m[g * hidden:(g + 1) * hidden] for g in range(4)]
    return np.concatenate([blocks[g] for g in ONNX_TO_TORCH], axis=0)


class Rebuilt(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.convs = nn.ModuleList()
        self.conv_relu = []
        self.conv_pads = []
        lstm_layers = []
        for layer in spec["seq"]:
            if layer["kind"] == "conv":
                assert not lstm_layers, "conv after an LSTM"
                k, cin, cout = layer["kernel"], layer["in"], layer["out"]
                conv = nn.Conv1d(cin, cout, k, padding=0)
                taps = np.asarray(layer["taps"], np.float32).reshape(k, cin, cout)
                conv.weight.data = torch.from_numpy(taps.transpose(2, 1, 0).copy())
                conv.bias.data = torch.tensor(layer["bias"], dtype=torch.float32)
                self.convs.append(conv)
                self.conv_relu.append(layer["relu"])
                self.conv_pads.append((layer["pad_begin"], layer["pad_end"]))
            else:
                lstm_layers.append(layer)
        self.lstm = None
        if lstm_layers:
            h = lstm_layers[0]["hidden"]
            self.lstm = nn.LSTM(lstm_layers[0]["in"], h, num_layers=len(lstm_layers), batch_first=True)
            for i, layer in enumerate(lstm_layers):
                w = np.asarray(layer["w_t"], np.float32).reshape(layer["in"], 4 * h).T
                r = np.asarray(layer["r_t"], np.float32).reshape(h, 4 * h).T
                b = np.asarray(layer["bias"], np.float32)
                getattr(self.lstm, f"weight_ih_l{i}").data = torch.from_numpy(reorder_gates(w, h).copy())
                getattr(self.lstm, f"weight_hh_l{i}").data = torch.from_numpy(reorder_gates(r, h).copy())
                getattr(self.lstm, f"bias_ih_l{i}").data = torch.from_numpy(reorder_gates(b, h).copy())
                getattr(self.lstm, f"bias_hh_l{i}").data = torch.zeros(4 * h)
        self.head = nn.ModuleList()
        self.head_relu = []
        for layer in spec["head"]:
            lin = nn.Linear(layer["in"], layer["out"])
            w = np.asarray(layer["w_t"], np.float32).reshape(layer["in"], layer["out"]).T
            lin.weight.data = torch.from_numpy(w.copy())
            lin.bias.data = torch.tensor(layer["bias"], dtype=torch.float32)
            self.head.append(lin)
            self.head_relu.append(layer["relu"])

    def forward(self, x):
        x = x.transpose(1, 2)
        for conv, relu, (pb, pe) in zip(self.convs, self.conv_relu, self.conv_pads):
            x = conv(nn.functional.pad(x, (pb, pe)) if (pb or pe) else x)
            if relu:
                x = torch.relu(x)
        x = x.transpose(1, 2)
        if self.lstm is not None:
            x, _ = self.lstm(x)
        x = x[:, -1, :]
        for lin, relu in zip(self.head, self.head_relu):
            x = lin(x)
            if relu:
                x = torch.relu(x)
        return x


def set_precision(name):
    tf32 = name == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def result(**kw):
    print("RESULT " + json.dumps(kw), flush=True)


def time_calls(call, seconds):
    for _ in range(10):
        call()
    times = []
    start = time.perf_counter()
    while (time.perf_counter() - start < seconds or len(times) < 20) and len(times) < 20000:
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times


def main():
    weights_dir, root = sys.argv[1], sys.argv[2]
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name(0)}", flush=True)
    golden = {"cnn_lstm": "fixtures/golden/cnn_lstm", "variant_a": "fixtures/golden/variant_a",
              "variant_b": "fixtures/golden/variant_b"}
    models = {}
    for name, folder in golden.items():
        with open(os.path.join(weights_dir, f"{name}.json")) as f:
            spec = json.load(f)
        model = Rebuilt(spec).to(dev).eval()
        models[name] = model
        x = np.load(os.path.join(root, folder, "input.npy"))
        expected = np.load(os.path.join(root, folder, "output.npy"))
        for precision in ["fp32", "tf32", "bf16"]:
            set_precision(precision)
            with torch.no_grad():
                xt = torch.from_numpy(x).to(dev)
                if precision == "bf16":
                    out = model.to(torch.bfloat16)(xt.to(torch.bfloat16)).float()
                    model.float()
                else:
                    out = model(xt)
            err = float(np.abs(out.cpu().numpy() - expected).max())
            result(check="golden", engine="pytorch", model=name, precision=precision, max_abs=err)

    model = models["cnn_lstm"]
    x_all = np.load(os.path.join(root, golden["cnn_lstm"], "input.npy"))
    for precision in ["fp32", "tf32", "bf16"]:
        set_precision(precision)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        m = model.to(dtype)
        for batch in [1, 32, 256, 1024]:
            host = torch.from_numpy(np.resize(x_all, (batch, 50, 60)).astype(np.float32)).to(dtype).pin_memory()
            static_in = torch.empty_like(host, device=dev)
            with torch.no_grad():
                def eager():
                    static_in.copy_(host, non_blocking=True)
                    return m(static_in).cpu()
                times = time_calls(eager, seconds)
                p50 = times[len(times) // 2]
                result(check="bench", engine="pytorch-eager", precision=precision, batch=batch, calls=len(times),
                       p50_ms=round(p50, 4), p99_ms=round(times[int((len(times) - 1) * 0.99)], 4),
                       samples_per_s=round(batch / p50 * 1e3))
                try:
                    s = torch.cuda.Stream()
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s):
                        for _ in range(3):
                            m(static_in)
                    torch.cuda.current_stream().wait_stream(s)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        static_out = m(static_in)

                    def graphed():
                        static_in.copy_(host, non_blocking=True)
                        g.replay()
                        return static_out.cpu()
                    times = time_calls(graphed, seconds)
                    p50 = times[len(times) // 2]
                    result(check="bench", engine="pytorch-graph", precision=precision, batch=batch, calls=len(times),
                           p50_ms=round(p50, 4), p99_ms=round(times[int((len(times) - 1) * 0.99)], 4),
                           samples_per_s=round(batch / p50 * 1e3))
                except Exception as e:  # keep measuring the rest
                    result(check="bench", engine="pytorch-graph", precision=precision, batch=batch, error=repr(e))
        model = m.float()


if __name__ == "__main__":
    main()
