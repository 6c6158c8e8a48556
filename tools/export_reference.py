#!/usr/bin/env python3
"""Build tickserve's reference CNN-LSTM ONNX models and golden fixtures.

How to run
----------
From the repository root::

    bash tools/export_reference.sh          # creates tools/.venv, pip installs, runs this
    SKIP_INSTALL=1 bash tools/export_reference.sh   # reuse the existing venv

or, with an environment that already has torch, onnx and numpy (onnxruntime
optional)::

    python3 tools/export_reference.py [--root REPO_ROOT]

``--quantized-only`` rebuilds just the calibration set and the QDQ models
(see ``quantized_artifacts``) from the committed fp32 models.

It takes about a minute on 2 CPU cores (single-threaded torch; deterministic:
fixed seeds, ``torch.set_num_threads(1)``, ``torch.use_deterministic_algorithms``).

What it does
------------
For each model of the "CNN-LSTM" family (batch-first input (B, T, F) ->
transpose -> Conv1d+ReLU stack -> transpose -> LSTM (no initial state) ->
last time step -> Linear+ReLU -> Linear):

1. builds the PyTorch module with a fixed seed;
2. trains it briefly (Adam, batch 64) on a synthetic, standardised signal so
   that outputs clearly depend on the input (asserts the std over a test batch
   of every output column is > 0.1);
3. exports it with the legacy TorchScript exporter
   (``torch.onnx.export(..., opset_version=17, dynamo=False,
   input_names=["input"], output_names=["output"], dynamic batch axis,
   do_constant_folding=True)``), runs ``onnx.checker.check_model`` and, if
   onnxruntime is importable, compares ORT against torch;
4. writes golden inputs/outputs (float32 ``.npy``) computed by torch in fp32,
   ``model.eval()``, ``torch.no_grad()``, on the full batch.

Outputs (paths relative to the repository root)
-----------------------------------------------
- ``models/cnn_lstm/1/model.onnx``             reference model, T=50, F=60, out 3
- ``fixtures/golden/cnn_lstm/input.npy``       float32 (64, 50, 60)
- ``fixtures/golden/cnn_lstm/output.npy``      float32 (64, 3)
- ``fixtures/golden/cnn_lstm/request.json``    Open Inference Protocol request
                                               body for golden sample 0
- ``fixtures/golden/cnn_lstm/expected_output.json``  ``{"output": [a, b, c]}``
- ``fixtures/models/variant_a/model.onnx``     T=20, F=8, out 5
- ``fixtures/golden/variant_a/{input,output}.npy``   (16, 20, 8) / (16, 5)
- ``fixtures/models/variant_b/model.onnx``     T=30, F=12, out 1 (regression)
- ``fixtures/golden/variant_b/{input,output}.npy``   (16, 30, 12) / (16, 1)
- ``fixtures/models/unsupported/model.onnx``   variant_a with a GRU (untrained;
                                               outside the family)
- ``fixtures/README.md``                       description + ONNX node listings

Floats in the JSON files are written as ``repr(float(np.float32(x)))``: the
shortest decimal of the exact float32 value, so parsing as f32 directly, or as
f64 then casting to f32, gives back exactly the fixture's bits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from torch import nn

try:  # optional cross-check
    import onnxruntime as ort  # type: ignore
except Exception:  # pragma: no cover - depends on environment
    ort = None


# --------------------------------------------------------------------------
# Model family
# --------------------------------------------------------------------------


class CnnLstm(nn.Module):
    """(B, T, F) -> Conv1d+ReLU stack -> LSTM -> last step -> MLP head."""

    def __init__(self, features, convs, hidden, layers, head, out, rnn="lstm"):
        super().__init__()
        mods = []
        c_in = features
        for c_out, k, p in convs:
            mods += [nn.Conv1d(c_in, c_out, kernel_size=k, padding=p), nn.ReLU()]
            c_in = c_out
        self.conv = nn.Sequential(*mods)
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}[rnn]
        self.rnn = rnn_cls(c_in, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Sequential(nn.Linear(hidden, head), nn.ReLU(), nn.Linear(head, out))

    def forward(self, x):
        x = x.transpose(1, 2)  # (B, F, T)
        x = self.conv(x)  # (B, C, T')
        x = x.transpose(1, 2)  # (B, T', C)
        out, _ = self.rnn(x)  # no initial state
        return self.head(out[:, -1, :])


@dataclass
class Spec:
    name: str
    T: int
    F: int
    convs: list  # [(c_out, kernel, padding)]
    hidden: int
    layers: int
    head: int
    out: int
    onnx_path: str
    golden_dir: str | None
    n_golden: int
    rnn: str = "lstm"
    train: bool = True
    steps: int = 300
    lr: float = 3e-3
    seed: int = 0
    extra: dict = field(default_factory=dict)


SPECS = [
    Spec("cnn_lstm", T=50, F=60, convs=[(64, 3, 1), (64, 3, 1)], hidden=128, layers=2,
         head=64, out=3, onnx_path="models/cnn_lstm/1/model.onnx",
         golden_dir="fixtures/golden/cnn_lstm", n_golden=64, steps=300, lr=2e-3, seed=1),
    Spec("variant_a", T=20, F=8, convs=[(16, 5, 2)], hidden=32, layers=1, head=16, out=5,
         onnx_path="fixtures/models/variant_a/model.onnx",
         golden_dir="fixtures/golden/variant_a", n_golden=16, steps=400, lr=5e-3, seed=2),
    Spec("variant_b", T=30, F=12, convs=[(24, 3, 0), (16, 1, 0)], hidden=24, layers=3,
         head=8, out=1, onnx_path="fixtures/models/variant_b/model.onnx",
         golden_dir="fixtures/golden/variant_b", n_golden=16, steps=400, lr=5e-3, seed=3),
    Spec("unsupported", T=20, F=8, convs=[(16, 5, 2)], hidden=32, layers=1, head=16, out=5,
         onnx_path="fixtures/models/unsupported/model.onnx", golden_dir=None, n_golden=0,
         rnn="gru", train=False, seed=4),
]

# --------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------

TREND_K = 5  # trend window (steps) of feature 0 used for the targets


def make_windows(rng: np.random.Generator, n: int, T: int, F: int) -> np.ndarray:
    """n windows (n, T, F) float32, every feature O(1).

    feature 0: a random walk whose drift changes at a random point, z-scored
               per window (the "price");
    feature 1: its first difference, z-scored per window;
    others:    sinusoids of random frequency/phase mixed with lagged copies of
               feature 0 and Gaussian noise.
    """
    t = np.arange(T, dtype=np.float64)
    steps = rng.normal(0.0, 1.0, size=(n, T))
    drift = rng.normal(0.0, 1.0, size=(n, 1))
    switch = rng.integers(T // 2, T, size=(n, 1))
    steps = steps + drift * (t[None, :] >= switch)
    walk = np.cumsum(steps, axis=1)
    z = (walk - walk.mean(axis=1, keepdims=True)) / (walk.std(axis=1, keepdims=True) + 1e-6)

    x = np.empty((n, T, F), dtype=np.float64)
    x[:, :, 0] = z
    if F > 1:
        dz = np.diff(z, axis=1, prepend=z[:, :1])
        x[:, :, 1] = (dz - dz.mean(axis=1, keepdims=True)) / (dz.std(axis=1, keepdims=True) + 1e-6)
    for j in range(2, F):
        freq = rng.uniform(0.02, 0.25, size=(n, 1))
        phase = rng.uniform(0, 2 * np.pi, size=(n, 1))
        amp = rng.uniform(0.2, 1.0, size=(n, 1))
        lag = int(rng.integers(0, 4))
        mix = rng.uniform(-0.8, 0.8)
        lagged = np.concatenate([np.repeat(z[:, :1], lag, axis=1), z[:, : T - lag]], axis=1)
        x[:, :, j] = (amp * np.sin(2 * np.pi * freq * t[None, :] + phase)
                      + mix * lagged + 0.3 * rng.normal(size=(n, T)))
    return np.clip(x, -6.0, 6.0).astype(np.float32)


def trend(x: np.ndarray) -> np.ndarray:
    """Mean per-step change of feature 0 over the last TREND_K steps."""
    return (x[:, -1, 0] - x[:, -1 - TREND_K, 0]) / TREND_K


def regression_target(x: np.ndarray) -> np.ndarray:
    """Smooth function of the input (variant_b)."""
    return (np.tanh(4.0 * trend(x)) + 0.5 * np.tanh(x[:, -10:, 2].mean(axis=1))).astype(np.float32)


def class_edges(T: int, F: int, n_classes: int) -> np.ndarray:
    """Quantile edges of trend() so the classes are balanced (fixed seed)."""
    x = make_windows(np.random.default_rng(12345), 20000, T, F)
    return np.quantile(trend(x), np.linspace(0, 1, n_classes + 1)[1:-1])


# --------------------------------------------------------------------------
# Training / export
# --------------------------------------------------------------------------


def build(spec: Spec) -> CnnLstm:
    torch.manual_seed(spec.seed)
    return CnnLstm(spec.F, spec.convs, spec.hidden, spec.layers, spec.head, spec.out, spec.rnn)


def train(spec: Spec, model: CnnLstm) -> dict:
    rng = np.random.default_rng(1000 + spec.seed)
    torch.manual_seed(1000 + spec.seed)
    regression = spec.out == 1
    edges = None if regression else class_edges(spec.T, spec.F, spec.out)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    model.train()
    losses = []
    for step in range(spec.steps):
        xb = make_windows(rng, 64, spec.T, spec.F)
        pred = model(torch.from_numpy(xb))
        if regression:
            y = torch.from_numpy(regression_target(xb))[:, None]
            loss = nn.functional.mse_loss(pred, y)
        else:
            y = torch.from_numpy(np.digitize(trend(xb), edges).astype(np.int64))
            loss = nn.functional.cross_entropy(pred, y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == spec.steps - 1:
            print(f"  [{spec.name}] step {step:4d} loss {loss.item():.4f}", flush=True)
    model.eval()
    # Held-out evaluation.
    xt = make_windows(np.random.default_rng(5000 + spec.seed), 1024, spec.T, spec.F)
    with torch.no_grad():
        pt = model(torch.from_numpy(xt)).numpy()
    stats = {"final_loss_last20_mean": float(np.mean(losses[-20:])), "final_loss": losses[-1]}
    if regression:
        yt = regression_target(xt)
        stats["test_mse"] = float(np.mean((pt[:, 0] - yt) ** 2))
        stats["target_var"] = float(np.var(yt))
    else:
        yt = np.digitize(trend(xt), edges)
        stats["test_acc"] = float(np.mean(pt.argmax(1) == yt))
        stats["chance"] = 1.0 / spec.out
    stats["test_output_std"] = [float(s) for s in pt.std(axis=0)]
    return stats


def export(spec: Spec, model: CnnLstm, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    dummy = torch.from_numpy(make_windows(np.random.default_rng(7), 2, spec.T, spec.F))
    model.eval()
    torch.onnx.export(
        model, (dummy,), path,
        opset_version=17,
        dynamo=False,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        do_constant_folding=True,
    )
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)


# --------------------------------------------------------------------------
# ONNX description
# --------------------------------------------------------------------------


def _attr(a):
    v = onnx.helper.get_attribute_value(a)
    if isinstance(v, onnx.TensorProto):
        arr = onnx.numpy_helper.to_array(v)
        s = f"tensor(dtype={arr.dtype}, shape={list(arr.shape)}"
        if arr.size <= 8:
            s += f", value={arr.tolist()}"
        return s + ")"
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, list):
        return [x.decode() if isinstance(x, bytes) else x for x in v]
    return v


def _vi(v):
    tt = v.type.tensor_type
    dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in tt.shape.dim]
    return f"{v.name}: {onnx.TensorProto.DataType.Name(tt.elem_type)}{dims}"


def describe(path: str) -> str:
    m = onnx.load(path)
    g = m.graph
    lines = [
        f"ir_version={m.ir_version} opset="
        + ", ".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in m.opset_import)
        + f" producer={m.producer_name} {m.producer_version}",
        "graph inputs:  " + "; ".join(_vi(v) for v in g.input),
        "graph outputs: " + "; ".join(_vi(v) for v in g.output),
        "op_type sequence: " + " ".join(n.op_type for n in g.node),
        "nodes:",
    ]
    for i, n in enumerate(g.node):
        attrs = {a.name: _attr(a) for a in n.attribute}
        lines.append(f"  {i:2d} {n.op_type} name={n.name} in={list(n.input)} "
                     f"out={list(n.output)} attrs={attrs}")
    lines.append("initializers:")
    for t in g.initializer:
        arr = onnx.numpy_helper.to_array(t)
        s = f"  {t.name}: {arr.dtype} {list(arr.shape)}"
        if arr.size <= 8:
            s += f" value={arr.tolist()}"
        lines.append(s)
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def fmt32(x) -> float:
    return float(np.float32(x))


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")


def ort_check(path: str, x: np.ndarray, ref: np.ndarray) -> dict:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    full = sess.run(["output"], {"input": x})[0]
    single = np.concatenate([sess.run(["output"], {"input": x[i:i + 1]})[0] for i in range(len(x))])
    return {"ort_full_batch_max_abs_diff": float(np.max(np.abs(full - ref))),
            "ort_batch1_max_abs_diff": float(np.max(np.abs(single - ref)))}


# Calibration windows for int8 static and the QDQ model: the export's
# generator with its own seed, distinct from training (1000+seed), held-out
# evaluation (5000+seed) and the golden windows (9000+seed), so accuracy is
# never measured on rows the scales were calibrated on.
CALIBRATION_SEED = 7001
CALIBRATION_WINDOWS = 128
CALIBRATION_PATH = "models/cnn_lstm/calibration.npy"
QDQ_PATH = "fixtures/models/cnn_lstm_qdq/model.onnx"
QDQ_GOLDEN = "fixtures/golden/cnn_lstm_qdq/ort_output.npy"
QDQ_FULL_PATH = "fixtures/models/variant_a_qdq/model.onnx"
QDQ_FULL_GOLDEN = "fixtures/golden/variant_a_qdq/ort_output.npy"


class _Windows:
    """onnxruntime CalibrationDataReader over the calibration windows."""

    def __init__(self, x: np.ndarray, batch: int = 16):
        self._batches = iter([{"input": x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._batches, None)


def quantized_artifacts() -> dict:
    """Calibration set and QDQ model of the reference model (no retraining).

    - ``models/cnn_lstm/calibration.npy``: float32 (128, 50, 60) windows
      for ``[quantization] activations = "static"`` in config.toml;
    - ``fixtures/models/cnn_lstm_qdq/model.onnx``: the reference model
      through ``onnxruntime.quantization.quantize_static`` (QDQ format,
      uint8 asymmetric activations, int8 symmetric per-channel weights,
      MinMax calibration on the windows above). The first Conv (raw
      features) is excluded and Gemm outputs are not quantised, as the
      native engine's own int8 does; the LSTMs stay fp32 (ORT's QDQ
      quantiser has no LSTM support);
    - ``fixtures/golden/cnn_lstm_qdq/ort_output.npy``: ONNX Runtime's
      output for the golden cnn_lstm inputs on that QDQ model, 1 thread;
    - ``fixtures/models/variant_a_qdq/model.onnx`` and
      ``fixtures/golden/variant_a_qdq/ort_output.npy``: variant_a through
      ``quant_pre_process`` then ``quantize_static`` with every default
      (first Conv quantised too, its input per tensor; ReLUs folded into
      the quantisation; the output quantised), 128 windows of seed 7002:
      the other shapes a QDQ graph takes, on a small model.
    """
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    x = make_windows(np.random.default_rng(CALIBRATION_SEED), CALIBRATION_WINDOWS, 50, 60)
    np.save(CALIBRATION_PATH, x)
    os.makedirs(os.path.dirname(QDQ_PATH), exist_ok=True)
    quantize_static(
        "models/cnn_lstm/1/model.onnx", QDQ_PATH, _Windows(x),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=["/conv/conv.0/Conv"],
        extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm"]},
    )
    onnx.checker.check_model(onnx.load(QDQ_PATH), full_check=True)
    golden_x = np.load("fixtures/golden/cnn_lstm/input.npy")
    golden_y = np.load("fixtures/golden/cnn_lstm/output.npy")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(QDQ_PATH, so, providers=["CPUExecutionProvider"])
    y = sess.run(["output"], {"input": golden_x})[0].astype(np.float32)
    os.makedirs(os.path.dirname(QDQ_GOLDEN), exist_ok=True)
    np.save(QDQ_GOLDEN, y)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    xa = make_windows(np.random.default_rng(CALIBRATION_SEED + 1), CALIBRATION_WINDOWS, 20, 8)
    os.makedirs(os.path.dirname(QDQ_FULL_PATH), exist_ok=True)
    pre = QDQ_FULL_PATH + ".pre.onnx"
    quant_pre_process("fixtures/models/variant_a/model.onnx", pre)
    quantize_static(pre, QDQ_FULL_PATH, _Windows(xa), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True, calibrate_method=CalibrationMethod.MinMax)
    os.remove(pre)
    onnx.checker.check_model(onnx.load(QDQ_FULL_PATH), full_check=True)
    sess = ort.InferenceSession(QDQ_FULL_PATH, so, providers=["CPUExecutionProvider"])
    ya = sess.run(["output"], {"input": np.load("fixtures/golden/variant_a/input.npy")})[0]
    os.makedirs(os.path.dirname(QDQ_FULL_GOLDEN), exist_ok=True)
    np.save(QDQ_FULL_GOLDEN, ya.astype(np.float32))
    return {
        "variant_a_qdq_ort_vs_fp32_golden_max_abs": float(
            np.max(np.abs(ya - np.load("fixtures/golden/variant_a/output.npy")))),
        "calibration_shape": list(x.shape),
        "qdq_onnx_bytes": os.path.getsize(QDQ_PATH),
        "qdq_ort_vs_fp32_golden_max_abs": float(np.max(np.abs(y - golden_y))),
        "qdq_ort_argmax_agreement": float(np.mean(y.argmax(1) == golden_y.argmax(1))),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    ap.add_argument("--quantized-only", action="store_true",
                    help="only rebuild the calibration set and the QDQ model from the "
                         "existing reference model (needs onnxruntime)")
    args = ap.parse_args()
    root = os.path.abspath(args.root)
    os.chdir(root)
    if args.quantized_only:
        print(json.dumps(quantized_artifacts(), indent=1))
        return 0

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    np.random.seed(0)
    t_start = time.time()
    print(f"torch {torch.__version__}, onnx {onnx.__version__}, numpy {np.__version__}, "
          f"onnxruntime {ort.__version__ if ort else 'not installed'}")

    report = {}
    descriptions = {}
    for spec in SPECS:
        t0 = time.time()
        print(f"== {spec.name}", flush=True)
        model = build(spec)
        info = {}
        if spec.train:
            info.update(train(spec, model))
            stds = info["test_output_std"]
            assert min(stds) > 0.1, f"{spec.name}: output std too small: {stds}"
        model.eval()
        export(spec, model, spec.onnx_path)
        descriptions[spec.name] = describe(spec.onnx_path)

        if spec.golden_dir:
            os.makedirs(spec.golden_dir, exist_ok=True)
            x = make_windows(np.random.default_rng(9000 + spec.seed), spec.n_golden, spec.T, spec.F)
            with torch.no_grad():
                y = model(torch.from_numpy(x)).numpy().astype(np.float32)
                y1 = np.concatenate([model(torch.from_numpy(x[i:i + 1])).numpy()
                                     for i in range(len(x))])
            gstd = y.std(axis=0)
            assert gstd.min() > 0.1, f"{spec.name}: golden output std too small: {gstd}"
            assert len(np.unique(x.reshape(len(x), -1), axis=0)) == len(x)
            np.save(os.path.join(spec.golden_dir, "input.npy"), x)
            np.save(os.path.join(spec.golden_dir, "output.npy"), y)
            info["golden_output_std"] = [float(s) for s in gstd]
            info["golden_input_absmax"] = float(np.abs(x).max())
            info["golden_input_std"] = float(x.std())
            info["torch_batch1_vs_full_max_abs_diff"] = float(np.max(np.abs(y1 - y)))
            if ort is not None:
                info.update(ort_check(spec.onnx_path, x, y))
            if spec.name == "cnn_lstm":
                x0 = x[0:1]
                req = {"id": "golden-0",
                       "inputs": [{"name": "input", "shape": list(x0.shape), "datatype": "FP32",
                                   "data": [fmt32(v) for v in x0.reshape(-1)]}]}
                write_json(os.path.join(spec.golden_dir, "request.json"), req)
                write_json(os.path.join(spec.golden_dir, "expected_output.json"),
                           {"output": [fmt32(v) for v in y[0]]})
                # Round-trip check: JSON text -> f32 (direct and via f64) == fixture bits.
                with open(os.path.join(spec.golden_dir, "request.json")) as f:
                    back = json.load(f)["inputs"][0]["data"]
                assert np.array_equal(np.array(back, dtype=np.float64).astype(np.float32),
                                      x0.reshape(-1))
                with open(os.path.join(spec.golden_dir, "request.json")) as f:
                    txt = f.read()
                toks = txt.split('"data":[')[1].split("]")[0].split(",")
                assert np.array_equal(np.array([np.float32(s) for s in toks]), x0.reshape(-1))
        elif ort is not None:
            x = make_windows(np.random.default_rng(9000 + spec.seed), 4, spec.T, spec.F)
            with torch.no_grad():
                y = model(torch.from_numpy(x)).numpy()
            info.update(ort_check(spec.onnx_path, x, y))
        info["seconds"] = round(time.time() - t0, 1)
        info["onnx_bytes"] = os.path.getsize(spec.onnx_path)
        report[spec.name] = info
        print(f"  {spec.name}: {json.dumps(info)}", flush=True)

    if ort is not None:
        report["cnn_lstm_quantized"] = quantized_artifacts()
        descriptions["cnn_lstm_qdq"] = describe(QDQ_PATH)
        descriptions["variant_a_qdq"] = describe(QDQ_FULL_PATH)
    else:
        print("onnxruntime not installed: calibration set and QDQ model not rebuilt")
    write_readme(descriptions, report)
    for name, d in descriptions.items():
        print(f"\n==== {name}\n{d}")
    print(f"\nreport: {json.dumps(report, indent=1)}")
    print(f"total seconds: {time.time() - t_start:.1f}")
    return 0


def write_readme(descriptions: dict, report: dict) -> None:
    env = (f"torch {torch.__version__}, onnx {onnx.__version__}, numpy {np.__version__}, "
           f"onnxruntime {ort.__version__ if ort else 'not installed'}")
    parts = [
        "# Fixtures",
        "",
        "Generated by `bash tools/export_reference.sh` (venv in `tools/.venv`, then",
        "`tools/export_reference.py`; see its docstring). Do not edit by hand: rerun the",
        "script. It is deterministic (fixed seeds, one torch thread) on a given",
        f"machine/library set; these files were made with {env}.",
        "",
        "## Model family (PyTorch)",
        "",
        "```",
        "input (B, T, F) float32, batch first",
        "x = x.transpose(1, 2)                  # (B, F, T)",
        "for each conv: Conv1d(c_in->c_out, k, padding=p) + ReLU",
        "x = x.transpose(1, 2)                  # (B, T', C)",
        "LSTM(C -> H, num_layers=L, batch_first=True), no initial state",
        "out[:, -1, :]                          # (B, H)",
        "Linear(H->head) + ReLU -> Linear(head->out)",
        "```",
        "",
        "Exported with the legacy TorchScript exporter: `torch.onnx.export(model, dummy, path,",
        "opset_version=17, dynamo=False, input_names=[\"input\"], output_names=[\"output\"],",
        "dynamic_axes={\"input\": {0: \"batch\"}, \"output\": {0: \"batch\"}}, do_constant_folding=True)`,",
        "then `onnx.checker.check_model(full_check=True)`.",
        "",
        "## Files",
        "",
        "| path | what |",
        "| --- | --- |",
        "| `models/cnn_lstm/1/model.onnx` | reference model: T=50, F=60, Conv1d(60->64,k3,p1)+ReLU, Conv1d(64->64,k3,p1)+ReLU, LSTM(64->128, 2 layers), Linear(128->64)+ReLU, Linear(64->3). Input `input` [batch,50,60], output `output` [batch,3] |",
        "| `fixtures/golden/cnn_lstm/input.npy` | float32 (64, 50, 60): 64 distinct test windows |",
        "| `fixtures/golden/cnn_lstm/output.npy` | float32 (64, 3): torch fp32 outputs (eval, no_grad, full batch) |",
        "| `fixtures/golden/cnn_lstm/request.json` | Open Inference Protocol request for golden sample 0: `{\"id\":\"golden-0\",\"inputs\":[{\"name\":\"input\",\"shape\":[1,50,60],\"datatype\":\"FP32\",\"data\":[3000 floats]}]}` |",
        "| `fixtures/golden/cnn_lstm/expected_output.json` | `{\"output\":[a,b,c]}` = `output.npy[0]` |",
        "| `fixtures/models/variant_a/model.onnx` | T=20, F=8, Conv1d(8->16,k5,p2)+ReLU, LSTM(16->32, 1 layer), Linear(32->16)+ReLU, Linear(16->5). Output [batch,5] |",
        "| `fixtures/golden/variant_a/{input,output}.npy` | float32 (16, 20, 8) / (16, 5) |",
        "| `fixtures/models/variant_b/model.onnx` | T=30, F=12, Conv1d(12->24,k3,p0)+ReLU, Conv1d(24->16,k1,p0)+ReLU (T'=28), LSTM(16->24, 3 layers), Linear(24->8)+ReLU, Linear(8->1). Output [batch,1] |",
        "| `fixtures/golden/variant_b/{input,output}.npy` | float32 (16, 30, 12) / (16, 1) |",
        "| `fixtures/models/unsupported/model.onnx` | variant_a with a GRU instead of the LSTM (random weights, untrained): outside the family, must be refused |",
        "",
        "JSON floats are `repr(float(np.float32(x)))`: parsing them as f32 (directly, or as f64",
        "then cast) gives exactly the bits in `input.npy` / `output.npy`.",
        "",
        "## Data and training",
        "",
        "Inputs come from a synthetic generator (`make_windows`): feature 0 is a per-window",
        "z-scored random walk whose drift switches on at a random step, feature 1 its",
        "per-window z-scored first difference, the rest sinusoids mixed with lagged feature 0 and noise; all",
        "features are O(1) (clipped to [-6, 6]). Each trained model had ~300-400 Adam steps",
        "(batch 64): classifiers (cnn_lstm: 3 classes, variant_a: 5 classes) predict the",
        "quantile bin of the mean change of feature 0 over the last 5 steps (cross-entropy);",
        "variant_b regresses `tanh(4*trend) + 0.5*tanh(mean of feature 2 over the last 10",
        "steps)` (MSE). Golden windows use a different seed from training.",
        "",
        "## Build figures",
        "",
        "```json",
        json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "seconds"}
                    for k, v in report.items()}, indent=1),
        "```",
        "",
        "## ONNX graphs",
        "",
        "Tensor-valued attributes are shown as dtype/shape (value too when <= 8 elements).",
        "",
    ]
    for name, d in descriptions.items():
        parts += [f"### {name}", "", "```", d, "```", ""]
    with open("fixtures/README.md", "w") as f:
        f.write("\n".join(parts))


if __name__ == "__main__":
    sys.exit(main())
