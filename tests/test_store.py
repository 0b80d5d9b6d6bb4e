"""Weights outside the protobuf: loading keeps big tensors on disk, passes read them one at a time,
writers resolve them, models over the protobuf limit are written tensor by tensor."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from modelsqueeze import model as model_module
from modelsqueeze import store
from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.model import check_model, load_model, model_to_bytes, save_model
from modelsqueeze.pack import load_pair, packed_bytes, packed_size, round_trip, skeleton, skeleton_size, write_pair
from modelsqueeze.passes.cluster import ClusterConfig, cluster
from modelsqueeze.passes import LayerRule

from cli_helpers import invoke, ok, refused
from conftest import SAMPLES

LENET300 = SAMPLES / "lenet300.onnx"


def _plain(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_loading_keeps_big_initializers_out_of_the_protobuf_and_reads_them_exactly():
    loaded = load_model(LENET300)
    reference = onnx.load_model(str(LENET300))
    big = [t for t in loaded.graph.initializer if store.is_stub(t)]
    assert big, "the MLP's weight matrices are stubs"
    assert all(store.stored_bytes(t) >= store.MIN_BYTES for t in big)
    assert loaded.ByteSize() < 20_000 < reference.ByteSize()  # the graph without its weights
    expected = _plain(reference)
    for tensor in loaded.graph.initializer:
        got = store.to_array(tensor)
        assert got.dtype == expected[tensor.name].dtype and np.array_equal(got, expected[tensor.name])
    assert model_to_bytes(loaded) == reference.SerializeToString(deterministic=True)


def test_external_data_stays_on_disk_until_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # onnx resolves a new data file against the working folder
    reference = onnx.load_model(str(LENET300))
    path = tmp_path / "ext.onnx"
    onnx.save_model(reference, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    loaded = load_model(path)
    assert store.files(loaded) == {(tmp_path / "w.bin").resolve()}
    expected = _plain(reference)
    assert all(np.array_equal(store.to_array(t), expected[t.name]) for t in loaded.graph.initializer)


def test_a_stub_whose_file_shrank_is_one_clear_error(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(LENET300.read_bytes())
    loaded = load_model(path)
    path.write_bytes(b"")
    with pytest.raises(ModelSqueezeError, match="changed or shrank"):
        store.to_array(next(store.stubs(loaded)))


def test_checker_sees_stubs_as_external_data_and_still_catches_errors():
    loaded = load_model(LENET300)
    check_model(loaded, "lenet300", full=True)
    broken = onnx.ModelProto()
    broken.CopyFrom(loaded)
    broken.graph.node[0].input[1] = "no_such_tensor"
    with pytest.raises(ModelSqueezeError, match="invalid ONNX model"):
        check_model(broken, "broken", full=True)


def test_sizes_count_stubs_as_their_data():
    loaded = load_model(LENET300)
    for tensor in store.stubs(loaded):
        resolved = onnx.TensorProto()
        resolved.CopyFrom(tensor)
        store.materialize(resolved)
        assert store.inline_size(tensor) == resolved.ByteSize()
    assert skeleton_size(loaded, []) == len(model_to_bytes(loaded))
    result = cluster(loaded, {}, ClusterConfig(bits=LayerRule(4)))
    records = list(result.records.values())
    assert skeleton_size(result.model, records) == len(model_to_bytes(skeleton(result.model, records)))


def test_round_trip_and_write_give_the_same_pair(tmp_path):
    loaded = load_model(LENET300)
    result = cluster(loaded, {}, ClusterConfig(bits=LayerRule(4)))
    logical, records = round_trip(result.model, result.records)
    out = tmp_path / "c.onnx"
    write_pair(result.model, list(result.records.values()), out)
    pair = load_pair(out)
    assert model_to_bytes(logical) == model_to_bytes(pair.model)
    assert packed_bytes(logical, list(records.values())) == packed_size(pair)


def test_retain_forgets_only_values_no_live_model_uses():
    loaded = load_model(LENET300)
    result = cluster(loaded, {}, ClusterConfig(bits=LayerRule(4)))
    other = cluster(loaded, {}, ClusterConfig(bits=LayerRule(3)))
    store.retain(result.model)
    for tensor in store.stubs(result.model):
        store.to_array(tensor)  # still there
    for tensor in store.stubs(loaded):
        store.to_array(tensor)  # file ranges are always kept
    fc1 = next(t for t in other.model.graph.initializer if t.name == "fc1.weight")
    assert store.is_stub(fc1)
    with pytest.raises(ModelSqueezeError, match="released"):
        store.to_array(fc1)


def test_models_over_the_protobuf_limit_are_written_tensor_by_tensor(tmp_path, monkeypatch):
    """With the limit lowered to 100 kB, the pipeline writes external data and its output runs."""
    monkeypatch.setattr(model_module, "PROTOBUF_LIMIT_BYTES", 100_000)
    out = tmp_path / "p.onnx"
    summary = ok("pipeline", LENET300, "-o", out, "--prune", "0.5", "--bits", "5", "--validate",
                 SAMPLES / "lenet300.npz")
    assert (tmp_path / "p.onnx.data").is_file()
    assert summary["accuracy_after"] > 0.9
    data = np.load(SAMPLES / "lenet300.npz")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: data["x"][:50]})[0]
    assert np.array_equal(logits.argmax(1), _run_logical(out, data["x"][:50]).argmax(1))
    unpacked = tmp_path / "u.onnx"
    assert invoke("unpack", out, "-o", unpacked).exit_code == 0
    assert (tmp_path / "u.onnx.data").is_file()
    assert np.allclose(ort.InferenceSession(str(unpacked), providers=["CPUExecutionProvider"])
                       .run(None, {name: data["x"][:50]})[0], logits, atol=1e-5)


def _run_logical(path, x) -> np.ndarray:
    pair = load_pair(path)
    session = ort.InferenceSession(model_to_bytes(pair.runnable()), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_an_output_whose_data_file_is_the_inputs_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(model_module, "PROTOBUF_LIMIT_BYTES", 100_000)
    reference = onnx.load_model(str(LENET300))
    source = tmp_path / "in.onnx"
    onnx.save_model(reference, str(source), save_as_external_data=True, location="out.onnx.data", size_threshold=0)
    before = (tmp_path / "out.onnx.data").read_bytes()
    message = refused("prune", source, "-o", tmp_path / "out.onnx", "--sparsity", "0.5")
    assert "input's external data" in message
    assert (tmp_path / "out.onnx.data").read_bytes() == before and not (tmp_path / "out.onnx").exists()


def test_save_streams_every_big_tensor_into_one_data_file(tmp_path):
    loaded = load_model(LENET300)
    path = tmp_path / "big.onnx"
    save_model(loaded, path, limit_bytes=1000)
    raw = onnx.load_model(str(path), load_external_data=False)
    external = [t for t in raw.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"big.onnx.data"}
    assert _plain(onnx.load_model(str(path))).keys() == _plain(onnx.load_model(str(LENET300))).keys()
    for name, value in _plain(onnx.load_model(str(path))).items():
        assert np.array_equal(value, _plain(onnx.load_model(str(LENET300)))[name])


@pytest.mark.parametrize("sample", ["lenet300", "lenet5", "lstm_digits", "tiny_transformer"])
def test_streamed_serialization_is_byte_identical(sample, tmp_path):
    """serialize_to writes what SerializeToString of the resolved model gives, for loaded models
    and for rendered pairs (lazy native forms)."""
    loaded = load_model(SAMPLES / f"{sample}.onnx")
    result = cluster(loaded, {}, ClusterConfig(bits=LayerRule(4)))
    from modelsqueeze.pack import rendered

    for model in (loaded, result.model, rendered(result.model, result.records.values())):
        chunks: list[bytes] = []
        store.serialize_to(model, lambda b: chunks.append(bytes(b)))
        assert b"".join(chunks) == model_to_bytes(model)


def test_sidecar_written_a_record_at_a_time_is_byte_identical():
    import io

    from modelsqueeze.passes.huffman import HuffmanConfig, huffman
    from modelsqueeze.sidecar import encode_sidecar, write_sidecar

    loaded = load_model(LENET300)
    coded = huffman(*round_trip(*_clustered(loaded)), HuffmanConfig())
    records = list(coded.records.values())
    handle = io.BytesIO()
    write_sidecar(handle, records, bytes(range(32)))
    assert handle.getvalue() == encode_sidecar(records, bytes(range(32)))


def _clustered(model):
    result = cluster(model, {}, ClusterConfig(bits=LayerRule(3)))
    return result.model, result.records


def test_an_output_onto_the_inputs_external_data_file_is_refused_even_with_force(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reference = onnx.load_model(str(LENET300))
    source = tmp_path / "in.onnx"
    onnx.save_model(reference, str(source), save_as_external_data=True, location="weights.bin", size_threshold=0)
    before = (tmp_path / "weights.bin").read_bytes()
    message = refused("cluster", source, "-o", tmp_path / "weights.bin", "--bits", "4", "--force")
    assert "input's external data" in message
    assert (tmp_path / "weights.bin").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "weights.bin"]
