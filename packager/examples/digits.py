"""Small, fast example models on scikit-learn's digits (8x8 grey images, 10 classes).

Used by the tests, the end-to-end test and the demo. Both builders train in seconds on two
cores and write three files into ``out_dir``:

- ``digits-{arch}.onnx``: the fp32 model, input ``input`` (float32), output ``logits`` [N, 10];
- ``calibration.npz``: ``input`` (200 training images) and ``labels``;
- ``eval.npz``: ``input`` and ``labels`` for held-out images.

Pixels are scaled to [0, 1] (divided by 16). The MLP's input is [N, 64]; the CNN's [N, 1, 8, 8].
The MLP path trains with scikit-learn and builds the ONNX graph with ``onnx.helper``: it never
imports torch. The CNN path trains with torch and exports with ``torch.onnx.export``.

:func:`make_degraded_variant` turns a model into a deliberately bad one for demos of on-device
rollback (slow, wrong on a share of inputs, or NaN on a share of inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
CALIBRATION_SAMPLES = 200
OPSET = 17


@dataclass(frozen=True)
class DigitsExample:
    model_path: Path
    calibration_path: Path
    eval_path: Path
    input_name: str
    fp32_accuracy: float
    arch: str = "mlp"


def _split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_train = int(len(x) * 0.75)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def build_digits_example(
    out_dir: Path,
    *,
    arch: Literal["mlp", "cnn"] = "mlp",
    seed: int = 0,
    epochs: int | None = None,
) -> DigitsExample:
    """Train a digits classifier and write the model, calibration and evaluation data."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_eval, y_eval = _split(seed)
    model_path = out_dir / f"digits-{arch}.onnx"
    if arch == "mlp":
        logits_eval = _build_mlp(x_train, y_train, x_eval, model_path, seed, epochs or 300)
        shape: tuple[int, ...] = (64,)
    elif arch == "cnn":
        logits_eval = _build_cnn(x_train, y_train, x_eval, model_path, seed, epochs or 12)
        shape = (1, 8, 8)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    calib_idx = np.random.default_rng(seed + 1).choice(len(x_train), CALIBRATION_SAMPLES, replace=False)
    calib_idx.sort()
    calibration_path = out_dir / "calibration.npz"
    eval_path = out_dir / "eval.npz"
    calib_arrays: dict[str, Any] = {INPUT_NAME: x_train[calib_idx].reshape(-1, *shape), "labels": y_train[calib_idx]}
    eval_arrays: dict[str, Any] = {INPUT_NAME: x_eval.reshape(-1, *shape), "labels": y_eval}
    np.savez(calibration_path, **calib_arrays)
    np.savez(eval_path, **eval_arrays)
    accuracy = float((logits_eval.argmax(axis=1) == y_eval).mean())
    return DigitsExample(model_path, calibration_path, eval_path, INPUT_NAME, accuracy, arch)


def _build_mlp(
    x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, path: Path, seed: int, epochs: int
) -> np.ndarray:
    import warnings

    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=epochs, random_state=seed, alpha=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    nodes, inits = [], []
    current = INPUT_NAME
    n_layers = len(clf.coefs_)
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_, strict=True)):
        inits.append(numpy_helper.from_array(np.asarray(w, np.float32), f"fc{i}.weight"))
        inits.append(numpy_helper.from_array(np.asarray(b, np.float32), f"fc{i}.bias"))
        out = OUTPUT_NAME if i == n_layers - 1 else f"fc{i}.out"
        nodes.append(helper.make_node("Gemm", [current, f"fc{i}.weight", f"fc{i}.bias"], [out], name=f"fc{i}"))
        if i < n_layers - 1:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}.out"], name=f"relu{i}"))
            current = f"relu{i}.out"
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeota-examples")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    # Same numbers as the ONNX graph (float32 Gemm + ReLU), computed with numpy.
    h = x_eval
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_, strict=True)):
        h = h @ w.astype(np.float32) + b.astype(np.float32)
        if i < n_layers - 1:
            h = np.maximum(h, 0)
    return np.asarray(h)


def make_digits_cnn(seed: int = 0):  # type: ignore[no-untyped-def]
    """The untrained small CNN (torch, ~0.19M parameters, ~3.8 MFLOP per image): three 3x3 convs
    (32, 64, 64 channels) with a 2x2 max-pool, and two linear layers."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def train_digits_cnn(x_train: np.ndarray, y_train: np.ndarray, seed: int = 0, epochs: int = 12):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = make_digits_cnn(seed)
    xt = torch.from_numpy(x_train.reshape(-1, 1, 8, 8))
    yt = torch.from_numpy(y_train)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), 64):
            idx = perm[start : start + 64]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    model.eval()
    return model


def _build_cnn(
    x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, path: Path, seed: int, epochs: int
) -> np.ndarray:
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = train_digits_cnn(x_train, y_train, seed, epochs)
    with torch.no_grad():
        export_digits_cnn(model, path)
        return np.asarray(model(torch.from_numpy(x_eval.reshape(-1, 1, 8, 8))).numpy())


def export_digits_cnn(model, path: Path) -> None:  # type: ignore[no-untyped-def]
    import torch

    dummy = torch.zeros(1, 1, 8, 8)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
        opset_version=OPSET,
        dynamo=False,
    )


def make_degraded_variant(
    model_path: Path,
    out_path: Path,
    *,
    kind: Literal["slow", "wrong", "nan"],
    share: float = 0.3,
    slow_matmuls: int = 160,
    slow_dim: int = 1024,
) -> Path:
    """Write a deliberately bad copy of a single-input, single-output classifier.

    - ``slow``: adds a branch of ``slow_matmuls`` chained [N, slow_dim] x [slow_dim, slow_dim]
      MatMul+Tanh layers (one shared 4 MiB weight) fed from the input, whose result is multiplied
      by 0 and added to the output. Outputs are unchanged, each inference does about
      ``2 * slow_matmuls * slow_dim**2`` extra FLOPs per row (default 160 x 1024: ~336 MFLOP, roughly
      8 ms on one AVX-512 x86 core); the branch depends on the input, so constant folding cannot remove it.
    - ``wrong``: on the inputs whose selector ``frac(7.31 * sum(x))`` is below ``share`` (about
      that share of natural inputs), the logits are rotated by one class, so the top-1 class is
      wrong there.
    - ``nan``: on the same selected share, the output is NaN.

    The selector is a deterministic function of the input, so the same rows misbehave every time.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ValueError("make_degraded_variant handles single-input, single-output models")
    x = graph.input[0].name
    y_old = graph.output[0].name
    y_inner = f"{y_old}__pre_degraded"
    for node in graph.node:
        node.output[:] = [y_inner if o == y_old else o for o in node.output]
    new_nodes = []
    inits = []
    pfx = "degraded__"
    new_nodes.append(helper.make_node("Flatten", [x], [pfx + "flat"], axis=1))
    inits.append(numpy_helper.from_array(np.array([1], np.int64), pfx + "axes"))
    if kind == "slow":
        rng = np.random.default_rng(0)
        # Bring the flattened input to slow_dim features with one projection, then the chain.
        in_features = _flat_features(graph.input[0])
        inits.append(
            numpy_helper.from_array(
                (rng.standard_normal((in_features, slow_dim)) * 0.05).astype(np.float32), pfx + "proj"
            )
        )
        new_nodes.append(helper.make_node("MatMul", [pfx + "flat", pfx + "proj"], [pfx + "h0"]))
        cur = pfx + "h0"
        w = (rng.standard_normal((slow_dim, slow_dim)) / np.sqrt(slow_dim)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{pfx}w"))  # one weight, reused: small file, real work
        for i in range(slow_matmuls):
            new_nodes.append(helper.make_node("MatMul", [cur, f"{pfx}w"], [f"{pfx}m{i}"]))
            new_nodes.append(helper.make_node("Tanh", [f"{pfx}m{i}"], [f"{pfx}t{i}"]))
            cur = f"{pfx}t{i}"
        inits.append(numpy_helper.from_array(np.array(0.0, np.float32), pfx + "zero"))
        new_nodes.append(helper.make_node("ReduceSum", [cur, pfx + "axes"], [pfx + "s"], keepdims=1))  # [N, 1]
        new_nodes.append(helper.make_node("Mul", [pfx + "s", pfx + "zero"], [pfx + "z"]))
        new_nodes.append(helper.make_node("Add", [y_inner, pfx + "z"], [y_old]))
    elif kind in ("wrong", "nan"):
        inits.append(numpy_helper.from_array(np.array(7.31, np.float32), pfx + "k"))
        inits.append(numpy_helper.from_array(np.array(share, np.float32), pfx + "share"))
        new_nodes += [
            helper.make_node("ReduceSum", [pfx + "flat", pfx + "axes"], [pfx + "s"], keepdims=1),  # [N, 1]
            helper.make_node("Mul", [pfx + "s", pfx + "k"], [pfx + "sk"]),
            helper.make_node("Floor", [pfx + "sk"], [pfx + "fl"]),
            helper.make_node("Sub", [pfx + "sk", pfx + "fl"], [pfx + "frac"]),
            helper.make_node("Less", [pfx + "frac", pfx + "share"], [pfx + "mask"]),
        ]
        if kind == "wrong":
            n_classes = _last_dim(graph.output[0])
            perm = np.roll(np.arange(n_classes), 1).astype(np.int64)
            inits.append(numpy_helper.from_array(perm, pfx + "perm"))
            new_nodes.append(helper.make_node("Gather", [y_inner, pfx + "perm"], [pfx + "rot"], axis=1))
        else:
            inits.append(numpy_helper.from_array(np.array(np.nan, np.float32), pfx + "rot"))
        new_nodes.append(helper.make_node("Where", [pfx + "mask", pfx + "rot", y_inner], [y_old]))
    else:
        raise ValueError(f"unknown degradation {kind!r}")
    graph.node.extend(new_nodes)
    graph.initializer.extend(inits)
    onnx.checker.check_model(model)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))
    return out_path


def _flat_features(value_info) -> int:  # type: ignore[no-untyped-def]
    dims = [d.dim_value for d in value_info.type.tensor_type.shape.dim[1:]]
    if any(d <= 0 for d in dims):
        raise ValueError("make_degraded_variant(kind='slow') needs static non-batch input dims")
    return int(np.prod(dims)) if dims else 1


def _last_dim(value_info) -> int:  # type: ignore[no-untyped-def]
    dim = value_info.type.tensor_type.shape.dim[-1].dim_value
    if dim <= 0:
        raise ValueError("make_degraded_variant(kind='wrong') needs a static class dimension")
    return int(dim)
