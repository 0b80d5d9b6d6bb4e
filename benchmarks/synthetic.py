"""Synthetic models for the scale benchmarks (issue 10), generated on the fly from fixed seeds and
written to a scratch folder (never committed):

- `convnet`: a ResNet-50-sized Conv net, 24.4M float parameters (ResNet-50: 25.6M): 15 3x3 and
  1x1 Convs with ReLU, four of them strided, global average pool, Gemm classifier over 1000
  classes; input [n, 3, 64, 64].
- `transformer`: a transformer-sized MatMul net, 25.7M parameters: 8 blocks of single-head
  attention (MatMul q/k/v/o) and an MLP (MatMul 512 -> 2048 -> 512, Add bias, Relu), residual Adds
  and LayerNormalization, mean-pooled MatMul head; input [n, 64, 512].
- `huge`: over 2 GiB of float32 weights: 34 MatMul layers of 4096 x 4096 (570M parameters,
  2.28 GB) with Relu, input [n, 4096], saved with external data in one file. It is written tensor
  by tensor (a 4 MB chunk at a time straight into the data file), so generating it never holds
  even one full tensor in memory.

The 25M models' weight matrices have a power-law spectrum (singular values ~ i^-0.4, like trained
layers, cf. bench_svd_speed.py) so that `svd --energy` has something to find; their entries are
close to Gaussian with He scaling. The huge model's weights are i.i.d. Gaussian (a product per
layer would cost minutes). Every model gets `NAME_inputs.npz`: a few N(0, 1) inputs by input name,
no labels (for fidelity checks against the original's outputs).

    python benchmarks/synthetic.py --out /tmp/msq-models [--huge]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # what torch.onnx exports by default, and what the sample models use
IR_VERSION = 8

# (out channels, kernel, stride) after a 3-channel input; a 2048 -> 1000 Gemm follows the pool.
CONV_SPEC = [
    (64, 3, 2),                                      # 32 x 32
    (128, 3, 1), (128, 3, 1),
    (256, 3, 2),                                     # 16 x 16
    (256, 3, 1), (256, 1, 1), (256, 3, 1),
    (512, 3, 2),                                     # 8 x 8
    (512, 3, 1), (256, 1, 1), (512, 3, 1),
    (1024, 3, 2),                                    # 4 x 4
    (1024, 3, 1), (512, 1, 1), (2048, 1, 1),
]
CONV_CLASSES = 1000
CONV_INPUT = (3, 64, 64)

TF_BLOCKS, TF_SEQ, TF_DIM, TF_FF, TF_CLASSES = 8, 64, 512, 2048, 1000

HUGE_LAYERS, HUGE_DIM = 34, 4096  # 34 x 4096^2 x 4 B = 2,281,701,376 B > 2^31
HUGE_CHUNK_ROWS = 256  # 256 x 4096 x 4 B = 4 MiB per write

SPECTRUM_POWER = 0.4


def spectral_matrix(rng: np.random.Generator, rows: int, cols: int, std: float) -> np.ndarray:
    """A rows x cols float32 matrix with singular values roughly ~ i^-0.4 and entry std `std`:
    (G1 * s) @ G2 with Gaussian G1 [rows, k], G2 [k, cols], k = min(rows, cols)."""
    k = min(rows, cols)
    s = (np.arange(1, k + 1, dtype=np.float32)) ** -SPECTRUM_POWER
    left = rng.standard_normal((rows, k), dtype=np.float32) * s
    right = rng.standard_normal((k, cols), dtype=np.float32)
    w = left @ right
    w *= std / float(w.std())
    return w


def _save(model: onnx.ModelProto, path: Path) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="modelsqueeze-benchmarks")
    model.ir_version = IR_VERSION
    return model


def conv_net(path: Path, seed: int = 0) -> dict:
    """The ResNet-50-sized Conv net; returns {params, bytes, inputs}."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    x, cin = "input", CONV_INPUT[0]
    for i, (cout, k, stride) in enumerate(CONV_SPEC):
        fan_in = cin * k * k
        w = spectral_matrix(rng, cout, fan_in, np.sqrt(2.0 / fan_in)).reshape(cout, cin, k, k)
        b = (0.01 * rng.standard_normal(cout)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"conv{i}.weight"), numpy_helper.from_array(b, f"conv{i}.bias")]
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}"],
                                      name=f"conv{i}", kernel_shape=[k, k], strides=[stride, stride],
                                      pads=[k // 2] * 4))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        x, cin = f"relu{i}", cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1))
    w = spectral_matrix(rng, CONV_CLASSES, cin, np.sqrt(1.0 / cin))  # torch layout [out, in], transB
    b = (0.01 * rng.standard_normal(CONV_CLASSES)).astype(np.float32)
    inits += [numpy_helper.from_array(w, "fc.weight"), numpy_helper.from_array(b, "fc.bias")]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "convnet25m",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", *CONV_INPUT])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", CONV_CLASSES])],
        initializer=inits,
    )
    _save(_model(graph), path)
    params = sum(int(np.prod(t.dims)) for t in inits)
    inputs = {"input": rng.standard_normal((8, *CONV_INPUT), dtype=np.float32)}
    return {"params": params, "inputs": inputs}


def transformer_net(path: Path, seed: int = 1) -> dict:
    """The transformer-sized MatMul net; returns {params, inputs}."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def weight(name: str, rows: int, cols: int) -> str:
        inits.append(numpy_helper.from_array(spectral_matrix(rng, rows, cols, np.sqrt(1.0 / rows)), name))
        return name

    def vector(name: str, n: int, value: float | None = None) -> str:
        data = np.full(n, value, np.float32) if value is not None else (0.01 * rng.standard_normal(n)).astype(np.float32)
        inits.append(numpy_helper.from_array(data, name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    inits.append(numpy_helper.from_array(np.array(1.0 / np.sqrt(TF_DIM), np.float32), "attn_scale"))
    x = "x"
    for i in range(TF_BLOCKS):
        p = f"blocks.{i}"
        q = node("MatMul", [x, weight(f"{p}.attn.q.weight", TF_DIM, TF_DIM)], f"{p}.attn.q")
        k = node("MatMul", [x, weight(f"{p}.attn.k.weight", TF_DIM, TF_DIM)], f"{p}.attn.k")
        v = node("MatMul", [x, weight(f"{p}.attn.v.weight", TF_DIM, TF_DIM)], f"{p}.attn.v")
        kt = node("Transpose", [k], f"{p}.attn.kt", perm=[0, 2, 1])
        s = node("MatMul", [q, kt], f"{p}.attn.scores")
        s = node("Mul", [s, "attn_scale"], f"{p}.attn.scaled")
        a = node("Softmax", [s], f"{p}.attn.softmax", axis=-1)
        o = node("MatMul", [a, v], f"{p}.attn.mix")
        o = node("MatMul", [o, weight(f"{p}.attn.o.weight", TF_DIM, TF_DIM)], f"{p}.attn.o")
        x = node("Add", [x, o], f"{p}.attn.residual")
        x = node("LayerNormalization", [x, vector(f"{p}.ln1.weight", TF_DIM, 1.0), vector(f"{p}.ln1.bias", TF_DIM, 0.0)],
                 f"{p}.ln1", axis=-1)
        h = node("MatMul", [x, weight(f"{p}.mlp.fc1.weight", TF_DIM, TF_FF)], f"{p}.mlp.fc1")
        h = node("Add", [h, vector(f"{p}.mlp.fc1.bias", TF_FF)], f"{p}.mlp.fc1.add")
        h = node("Relu", [h], f"{p}.mlp.relu")
        h = node("MatMul", [h, weight(f"{p}.mlp.fc2.weight", TF_FF, TF_DIM)], f"{p}.mlp.fc2")
        h = node("Add", [h, vector(f"{p}.mlp.fc2.bias", TF_DIM)], f"{p}.mlp.fc2.add")
        x = node("Add", [x, h], f"{p}.mlp.residual")
        x = node("LayerNormalization", [x, vector(f"{p}.ln2.weight", TF_DIM, 1.0), vector(f"{p}.ln2.bias", TF_DIM, 0.0)],
                 f"{p}.ln2", axis=-1)
    pooled = node("ReduceMean", [x], "pool", axes=[1], keepdims=0)
    logits = node("MatMul", [pooled, weight("head.weight", TF_DIM, TF_CLASSES)], "head")
    nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        nodes, "transformer25m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", TF_SEQ, TF_DIM])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", TF_CLASSES])],
        initializer=inits,
    )
    del logits
    _save(_model(graph), path)
    params = sum(int(np.prod(t.dims)) for t in inits)
    inputs = {"x": rng.standard_normal((4, TF_SEQ, TF_DIM), dtype=np.float32)}
    return {"params": params, "inputs": inputs}


def huge_net(path: Path, seed: int = 2, layers: int = HUGE_LAYERS, dim: int = HUGE_DIM) -> dict:
    """The > 2 GiB MatMul chain with external data (`NAME.onnx.data`), written chunk by chunk."""
    rng = np.random.default_rng(seed)
    data_name = f"{path.name}.data"
    inits, nodes = [], []
    offset = 0
    std = np.float32(np.sqrt(2.0 / dim))
    with open(path.parent / data_name, "wb") as data:
        for i in range(layers):
            name = f"layers.{i}.weight"
            for start in range(0, dim, HUGE_CHUNK_ROWS):
                rows = min(HUGE_CHUNK_ROWS, dim - start)
                chunk = rng.standard_normal((rows, dim), dtype=np.float32)
                chunk *= std
                data.write(chunk.tobytes())
            length = dim * dim * 4
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[dim, dim])
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            inits.append(t)
            offset += length
            x = "x" if i == 0 else f"relu{i - 1}"
            out = "y" if i == layers - 1 else f"mm{i}"
            nodes.append(helper.make_node("MatMul", [x, name], [out], name=f"layers.{i}"))
            if i < layers - 1:
                nodes.append(helper.make_node("Relu", [out], [f"relu{i}"], name=f"relu{i}"))
    graph = helper.make_graph(
        nodes, "huge2g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", dim])],
        initializer=inits,
    )
    model = _model(graph)
    onnx.save_model(model, str(path))  # tensors already point at the data file: only the graph is written
    onnx.checker.check_model(str(path), full_check=False)  # the path form handles > 2 GiB
    inputs = {"x": rng.standard_normal((4, dim), dtype=np.float32)}
    return {"params": layers * dim * dim, "inputs": inputs}


BUILDERS = {"convnet": conv_net, "transformer": transformer_net, "huge": huge_net}


def model_bytes(path: Path) -> int:
    """The model file plus the external data files beside it that it names."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def build(name: str, folder: Path) -> dict:
    """Write NAME.onnx (+ data) and NAME_inputs.npz in `folder`; reuse them when already there
    (a finished build leaves NAME.json). Returns {name, path, inputs, params, bytes, seconds}."""
    folder.mkdir(parents=True, exist_ok=True)
    path, npz, meta = folder / f"{name}.onnx", folder / f"{name}_inputs.npz", folder / f"{name}.json"
    if meta.exists() and path.exists() and npz.exists():
        return json.loads(meta.read_text())
    start = time.perf_counter()
    made = BUILDERS[name](path)
    np.savez(npz, **made["inputs"])
    info = {"name": name, "path": str(path), "inputs": str(npz), "params": made["params"],
            "bytes": model_bytes(path), "seconds": time.perf_counter() - start}
    meta.write_text(json.dumps(info))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the models (not committed)")
    parser.add_argument("--huge", action="store_true", help="also the > 2 GiB model (2.3 GB of disk)")
    parser.add_argument("--only", nargs="+", choices=list(BUILDERS), help="just these models")
    args = parser.parse_args()
    names = args.only or ["convnet", "transformer"] + (["huge"] if args.huge else [])
    for name in names:
        info = build(name, args.out)
        print(f"{name}: {info['params']:,} params, {info['bytes']:,} bytes, {info['seconds']:.1f} s -> {info['path']}")


if __name__ == "__main__":
    main()
