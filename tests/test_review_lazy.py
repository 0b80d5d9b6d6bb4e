"""Review of the lazy-weights redesign (store.py stubs): each test pins a bug found in review, now fixed
(0-byte external tensors, Constant-node external data, sensitivity and in-process release of held
values, no working-folder change while checking, replaced input files, outputs onto the input's
external data, raw + typed data)."""

from __future__ import annotations

import gc
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from modelsqueeze import store
from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.model import check_model, load_model, model_to_bytes, save_model

from cli_helpers import invoke, ok
from conftest import SAMPLES

LENET300 = SAMPLES / "lenet300.onnx"

ADD_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 300] x) => (float[2, 300] y, float[0] z) {
  y = MatMul(x, w)
  z = Identity(e)
}
"""


def _external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _model_with_empty_external_tensor(folder: Path) -> Path:
    """A valid model whose weights (and an empty tensor) are external data, as
    onnx.save_model(save_as_external_data=True, size_threshold=0) writes them."""
    model = onnx.parser.parse_model(ADD_TEXT)
    weight = np.random.default_rng(0).standard_normal((300, 300)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(weight, "w"))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.float32), "e"))
    (folder / "ext.bin").write_bytes(weight.tobytes())
    _external(model.graph.initializer[0], "ext.bin", 0, weight.nbytes)
    _external(model.graph.initializer[1], "ext.bin", weight.nbytes, 0)
    path = folder / "ext.onnx"
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path), full_check=True)  # a valid model
    return path


# ---------------------------------------------------------------------------------------------
# 1. A zero-length stub is serialized with a wrong length prefix: the written file is corrupt.


def test_an_empty_external_tensor_does_not_corrupt_the_written_model(tmp_path):
    path = _model_with_empty_external_tensor(tmp_path)
    loaded = load_model(path)
    out = tmp_path / "copy.onnx"
    save_model(loaded, out)
    assert out.read_bytes() == model_to_bytes(loaded)
    onnx.load_model(str(out))  # DecodeError: wire format was corrupt


def test_prune_of_a_model_with_an_empty_external_tensor_writes_a_loadable_pair(tmp_path):
    path = _model_with_empty_external_tensor(tmp_path)
    ok("prune", path, "-o", tmp_path / "p.onnx", "--sparsity", "0.5")
    onnx.load_model(str(tmp_path / "p.onnx"))
    ok("report", tmp_path / "p.onnx")


# ---------------------------------------------------------------------------------------------
# 2. A Constant node whose tensor is external data: made a stub, but stubs are only looked for in
#    initializers, so the checker is shown "modelsqueeze-lazy:N" and writers leave it in the file.


def _constant_external_model(folder: Path) -> tuple[Path, np.ndarray]:
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 300] x) => (float[2, 300] y) {
      c = Constant<value = float[300] {0.0}>()
      y = Add(x, c)
    }
    """)
    values = np.arange(300, dtype=np.float32)
    tensor = model.graph.node[0].attribute[0].t
    tensor.CopyFrom(numpy_helper.from_array(values, "c"))
    (folder / "c.bin").write_bytes(values.tobytes())
    _external(tensor, "c.bin", 0, values.nbytes)
    path = folder / "cext.onnx"
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path), full_check=True)  # valid, and onnx.load reads it
    return path, values


def test_a_constant_node_with_external_data_loads_and_runs(tmp_path):
    path, _ = _constant_external_model(tmp_path)
    result = ok("eval", path, "--reference", path, "--random", "4")
    assert result["fidelity"]["max_abs_error"] == 0


def test_a_constant_node_stub_never_escapes_into_written_bytes(tmp_path):
    path, values = _constant_external_model(tmp_path)
    loaded = load_model(path, check=False)
    written = onnx.load_model_from_string(model_to_bytes(loaded))
    tensor = written.graph.node[0].attribute[0].t
    assert not store.is_stub(tensor) and store.PREFIX.encode() not in model_to_bytes(loaded)
    assert np.array_equal(numpy_helper.to_array(tensor), values)


# ---------------------------------------------------------------------------------------------
# 3. Held values are only ever forgotten by store.retain, which only `_transform` calls: every
#    evaluation of `sensitivity` keeps its decoded tensors in the process-wide registry.


def test_sensitivity_does_not_keep_every_candidates_weights_alive(tmp_path):
    before = set(store._sources)
    result = invoke("sensitivity", LENET300, "--data", SAMPLES / "lenet300_calib.npz", "--method", "prune",
                    "--values", "0.5,0.7,0.9", "--quiet")
    assert result.exit_code == 0, result.output + result.stderr
    gc.collect()
    kept = sum(s.nbytes for k, s in list(store._sources.items()) if k not in before and isinstance(s, store.Held))
    assert kept <= LENET300.stat().st_size, f"{kept:,} bytes of values held after the command ended"


# ---------------------------------------------------------------------------------------------
# 4. store.retain is process-wide: a command run in-process releases other live models' weights.


def test_a_command_run_in_process_leaves_other_models_weights_alone(tmp_path):
    mine = onnx.parser.parse_model(ADD_TEXT.replace("float[0] z", "float[2, 300] z").replace("Identity(e)", "Identity(y)"))
    values = np.random.default_rng(3).standard_normal((300, 300)).astype(np.float32)
    mine.graph.initializer.append(store.stub_array("w", values))
    assert isinstance(store.source_of(mine.graph.initializer[0]), store.Held)
    ok("prune", LENET300, "-o", tmp_path / "p.onnx", "--sparsity", "0.5")
    assert np.array_equal(store.to_array(mine.graph.initializer[0]), values)  # "its weights were released"


# ---------------------------------------------------------------------------------------------
# 5. check_model chdirs the whole process while onnx.checker runs (the lock only orders checks).


def test_checking_a_model_with_stubs_does_not_move_other_threads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(LENET300, tmp_path / "rel.onnx")
    loaded = load_model("rel.onnx", check=False)
    real = onnx.checker.check_model
    inside, leave = threading.Event(), threading.Event()

    def slow_checker(*args, **kwargs):
        inside.set()
        leave.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", slow_checker)
    worker = threading.Thread(target=check_model, args=(loaded, "rel.onnx"))
    worker.start()
    try:
        assert inside.wait(10)
        again = load_model("rel.onnx", check=False)  # another thread, a relative path
        assert len(again.graph.initializer) == len(loaded.graph.initializer)
    finally:
        leave.set()
        worker.join()


# ---------------------------------------------------------------------------------------------
# 6. A stub reads its file range on every access with no check that the file is still the one
#    parsed: a file replaced by one of the same size gives other weights, silently.


def test_a_stub_never_silently_reads_a_replaced_file(tmp_path):
    path = tmp_path / "m.onnx"
    shutil.copy(LENET300, path)
    loaded = load_model(path)
    tensor = next(t for t in loaded.graph.initializer if store.is_stub(t))
    expected = store.to_array(tensor).copy()
    source = store.source_of(tensor)
    data = bytearray(path.read_bytes())
    data[source.offset:source.offset + source.nbytes] = bytes(source.nbytes)  # other weights, same size
    replacement = tmp_path / "new.onnx"
    replacement.write_bytes(bytes(data))
    os.replace(replacement, path)
    try:
        got = store.to_array(tensor)
    except ModelSqueezeError:
        return  # a clear error is fine
    assert np.array_equal(got, expected), "the stub read the new file's bytes as the loaded model's weights"


# ---------------------------------------------------------------------------------------------
# 7. The output may be the input's external data file: --force overwrites the input's weights.


def test_an_output_onto_the_inputs_external_data_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    onnx.save_model(onnx.load_model(str(LENET300)), "ext.onnx", save_as_external_data=True,
                    location="weights.bin", size_threshold=0)
    before = (tmp_path / "weights.bin").read_bytes()
    result = invoke("prune", "ext.onnx", "-o", "weights.bin", "--sparsity", "0.5", "--force", "--quiet")
    assert (tmp_path / "weights.bin").read_bytes() == before, "the input's weights were overwritten"
    assert result.exit_code == 2


# ---------------------------------------------------------------------------------------------
# 8. raw_data AND float_data in one big initializer: refused both ways, but a file-loaded model is
#    told its (inline) tensor "is stored externally".


def test_raw_and_typed_data_is_refused_alike_from_a_file_and_in_memory(tmp_path):
    model = onnx.parser.parse_model(ADD_TEXT.replace(", float[0] z", "").replace("  z = Identity(e)\n", ""))
    tensor = numpy_helper.from_array(np.ones((300, 300), np.float32), "w")
    tensor.float_data.extend(np.ones(300 * 300, np.float32))
    model.graph.initializer.append(tensor)
    path = tmp_path / "both.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelSqueezeError) as in_memory:
        check_model(model, "m")
    with pytest.raises(ModelSqueezeError) as from_file:
        load_model(path)
    assert "externally" not in str(from_file.value)
    assert str(from_file.value).split(": ", 1)[1] == str(in_memory.value).split(": ", 1)[1]
