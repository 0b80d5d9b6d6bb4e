"""Determinism: the same input, options and seed give byte-identical OUT.onnx / OUT.msq

- across processes: two runs in separate subprocesses, in different working folders, with
  different PYTHONHASHSEED values, the second running the commands in the reverse order (so nothing
  a command leaves in the process can matter), plus one plain `python -m modelsqueeze pipeline` run;
- across --jobs values (1 vs 3) for the threaded passes (cluster's k-means, Huffman coding) and
  the whole pipeline (the real CLI run uses --jobs 3);
- and `report --json` twice gives the same JSON.

Each subprocess runs its commands in-process through the CLI (one interpreter start per run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelsqueeze.model import graph_hash, load_model
from modelsqueeze.sidecar import read_sidecar

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
LENET5, LENET300, TRANSFORMER = (str(SAMPLES / n) for n in ("lenet5.onnx", "lenet300.onnx", "tiny_transformer.onnx"))
CALIB = str(SAMPLES / "lenet300_calib.npz")

# name -> argv (the output is NAME.onnx in the run's folder). Stage 1 reads only the samples.
STAGE1 = {
    "prune_layer": ["prune", LENET5, "--sparsity", "0.8"],
    "prune_global": ["prune", LENET300, "--sparsity", "0.9", "--scope", "global"],
    "prune_nm": ["prune", LENET300, "--nm", "2:4"],
    "prune_structured_shrink": ["prune", LENET300, "--structured", "rows", "--sparsity", "0.5", "--shrink"],
    "prune_global_calibrated": ["prune", LENET300, "--sparsity", "0.9", "--scope", "global", "--calibration", CALIB, "--sequential"],
    "cluster_kmeanspp": ["cluster", LENET300, "--bits", "4", "--init", "kmeans++", "--seed", "7"],
    "cluster_kmeanspp_j3": ["cluster", LENET300, "--bits", "4", "--init", "kmeans++", "--seed", "7", "--jobs", "3"],
    "quantize_int4_block_mse": ["quantize", LENET300, "--bits", "4", "--granularity", "block", "--block-size", "32", "--range", "mse"],
    "svd_energy": ["svd", TRANSFORMER, "--energy", "0.9"],
    "svd_target_params": ["svd", TRANSFORMER, "--target-params", "20000"],
    "pipeline": ["pipeline", LENET5, "--prune", "0.8", "--bits", "4", "--huffman"],
}
# Stage 2 reads stage 1's outputs.
STAGE2 = {
    "cluster_auto": ["cluster", "prune_layer.onnx", "--bits", "3"],
    "cluster_auto_j3": ["cluster", "prune_layer.onnx", "--bits", "3", "--jobs", "3"],
    "huffman": ["huffman", "cluster_kmeanspp.onnx"],
    "huffman_j3": ["huffman", "cluster_kmeanspp.onnx", "--jobs", "3"],
}
REPORT = ["report", "pipeline.onnx", "--baseline", LENET5, "--json"]
JOBS_PAIRS = [("cluster_kmeanspp", "cluster_kmeanspp_j3"), ("cluster_auto", "cluster_auto_j3"), ("huffman", "huffman_j3")]

DRIVER = r"""
import json, sys
from typer.testing import CliRunner
from modelsqueeze.cli import app

stage1, stage2, report, second = json.loads(sys.argv[1])
runner = CliRunner()
manifest = {"codes": {}, "errors": {}, "reports": []}
for stage in (stage1, stage2):
    names = [n for n in stage if not (second and n.endswith("_j3"))]  # --jobs is compared within the first run
    for name in (reversed(names) if second else names):
        result = runner.invoke(app, stage[name] + ["-o", name + ".onnx", "--quiet"])
        manifest["codes"][name] = result.exit_code
        manifest["errors"][name] = result.stderr[-2000:] + repr(result.exception)[:500]
for _ in range(2):
    result = runner.invoke(app, report + ["--quiet"])
    manifest["reports"].append([result.exit_code, result.stdout])
with open("manifest.json", "w") as f:
    json.dump(manifest, f)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Folders a and b (the two driver runs; b in the reverse order, without the --jobs 3 variants)
    and cli (`python -m modelsqueeze pipeline ... --jobs 3`), all three processes started together."""
    base = tmp_path_factory.mktemp("determinism")
    folders = {name: base / name for name in ("a", "b", "cli")}
    procs = []
    for name, seed in (("a", "0"), ("b", "2718281"), ("cli", "random")):
        folders[name].mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed}
        if name == "cli":
            argv = ["-m", "modelsqueeze", *STAGE1["pipeline"], "-o", "pipeline.onnx", "--jobs", "3", "--quiet"]
        else:
            argv = ["-c", DRIVER, json.dumps([STAGE1, STAGE2, REPORT, name == "b"])]
        procs.append((name, subprocess.Popen([sys.executable, *argv], cwd=folders[name], env=env,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    for name, proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (name, err.decode()[-3000:])
    return folders


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def outputs(folder: Path, name: str) -> dict[str, bytes]:
    files = {p.name[len(name):]: p.read_bytes() for p in folder.iterdir() if p.name in (f"{name}.onnx", f"{name}.msq", f"{name}.onnx.data")}
    assert ".onnx" in files, (name, sorted(files))  # no records (svd factors): no sidecar
    return files


@pytest.mark.parametrize("name", [n for n in list(STAGE1) + list(STAGE2) if not n.endswith("_j3")])
def test_same_bytes_across_processes(runs, name):
    for run in ("a", "b"):
        assert manifest(runs[run])["codes"][name] == 0, manifest(runs[run])["errors"][name]
    a, b = outputs(runs["a"], name), outputs(runs["b"], name)
    assert a.keys() == b.keys()
    different = [suffix for suffix in a if a[suffix] != b[suffix]]
    assert not different, f"{name}: {different} differ between two runs"
    source = Path((STAGE1 | STAGE2)[name][1])
    source = source if source.is_absolute() else runs["a"] / source
    written = load_model(runs["a"] / f"{name}.onnx", check=False)
    side = runs["a"] / f"{name}.msq"
    assert (side.exists() and read_sidecar(side).records) or graph_hash(written) != graph_hash(load_model(source)), \
        f"{name} changed nothing: a vacuous comparison"


@pytest.mark.parametrize("one,three", JOBS_PAIRS, ids=[p[0] for p in JOBS_PAIRS])
def test_jobs_1_and_3_give_the_same_bytes(runs, one, three):
    assert manifest(runs["a"])["codes"][three] == 0, manifest(runs["a"])["errors"][three]
    assert outputs(runs["a"], one) == outputs(runs["a"], three), f"--jobs 1 and --jobs 3 differ for {one}"


def test_the_real_cli_with_jobs_3_writes_what_the_runs_wrote(runs):
    assert outputs(runs["cli"], "pipeline") == outputs(runs["a"], "pipeline")


def test_report_json_twice_is_identical(runs):
    reports = [r for run in ("a", "b") for r in manifest(runs[run])["reports"]]
    assert all(code == 0 for code, _ in reports), reports
    assert json.loads(reports[0][1])["tensors"]  # real JSON with content
    assert all(text == reports[0][1] for _, text in reports), "report --json differs between calls or runs"
