"""Shared fixtures: tiny models written in ONNX text syntax, and paths to the committed samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from modelsqueeze import store

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"

# A two-layer MLP with a dynamic batch: Gemm (transB=1, like PyTorch Linear) then MatMul + Add.
# Its weights are big enough for a compressed record to pay (1,024 and 192 weights): no tensor is
# ever written bigger than it was, so a smaller one would simply be left alone.
MLP_IN, MLP_HIDDEN = 16, 64
MLP_TEXT = f"""
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[batch, {MLP_IN}] x) => (float[batch, 3] logits) {{
  h = Gemm<transB = 1>(x, fc1_w, fc1_b)
  r = Relu(h)
  m = MatMul(r, fc2_w)
  logits = Add(m, fc2_b)
}}
"""


def make_mlp(seed: int = 0) -> onnx.ModelProto:
    """The MLP above with random weights as initializers."""
    rng = np.random.default_rng(seed)
    graph = onnx.parser.parse_model(MLP_TEXT)
    for name, shape in [("fc1_w", (MLP_HIDDEN, MLP_IN)), ("fc1_b", (MLP_HIDDEN,)), ("fc2_w", (MLP_HIDDEN, 3)),
                        ("fc2_b", (3,))]:
        graph.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        )
    onnx.checker.check_model(graph, full_check=True)
    return graph


@pytest.fixture
def mlp() -> onnx.ModelProto:
    return make_mlp()


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save_model(make_mlp(), str(path))
    return path


@pytest.fixture
def mlp_data(tmp_path: Path) -> Path:
    """Labelled data for the MLP whose labels are the MLP's own predictions on the first 40 of 50
    samples and deliberately wrong on the last 10 (so accuracy is exactly 0.8)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, MLP_IN)).astype(np.float32)
    model = make_mlp()
    w = {t.name: store.to_array(t) for t in model.graph.initializer}
    logits = np.maximum(x @ w["fc1_w"].T + w["fc1_b"], 0) @ w["fc2_w"] + w["fc2_b"]
    y = logits.argmax(1)
    y[40:] = (y[40:] + 1) % 3
    path = tmp_path / "mlp_data.npz"
    np.savez(path, x=x, y=y)
    return path
