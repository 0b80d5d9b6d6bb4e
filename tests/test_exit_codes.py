"""Every command's documented exit codes: 0 ok; 1 a check the user asked for failed (--max-drop
with --validate, report's thresholds, sensitivity's unreachable target); 2 bad usage (unknown
option, bad value, missing required option or argument: click's own usage errors exit 2 too) or bad
input (missing, empty, corrupt or truncated model, corrupt sidecar, bad data or recipe).

Our own errors (1 and 2) are exactly one line on stderr, no traceback, and nothing is written.
eval, unpack and pack have no check to fail, and huffman is lossless (its --max-drop cannot fail),
so those four never exit 1.
The CLI runs in-process (CliRunner) for speed; one real subprocess per code checks the process's
exit status and that a long message stays one line when stderr is a pipe.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from modelsqueeze.cli import app

from conftest import MLP_IN, make_mlp
from modelsqueeze import store

runner = CliRunner()

COMMANDS = ["eval", "report", "prune", "cluster", "quantize", "svd", "huffman", "unpack", "pack", "pipeline", "run",
            "sensitivity"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """mlp.onnx (the conftest MLP), d.npz (its labelled data, accuracy 0.8), c.onnx/.msq (clustered,
    a pair), bad inputs, recipes."""
    d = tmp_path_factory.mktemp("exit_codes")
    onnx.save_model(make_mlp(), str(d / "mlp.onnx"))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, MLP_IN)).astype(np.float32)
    w = {t.name: store.to_array(t) for t in make_mlp().graph.initializer}
    y = (np.maximum(x @ w["fc1_w"].T + w["fc1_b"], 0) @ w["fc2_w"] + w["fc2_b"]).argmax(1)
    y[40:] = (y[40:] + 1) % 3
    np.savez(d / "d.npz", x=x, y=y)
    cwd = os.getcwd()
    os.chdir(d)
    try:
        result = runner.invoke(app, ["cluster", "mlp.onnx", "-o", "c.onnx", "--bits", "2", "-q"])
        assert result.exit_code == 0, result.stderr
    finally:
        os.chdir(cwd)
    (d / "garbage.onnx").write_bytes(b"\x08\x07garbage" * 50)
    (d / "trunc.onnx").write_bytes((d / "mlp.onnx").read_bytes()[:300])
    (d / "empty.onnx").write_bytes(b"")
    (d / "adir.onnx").mkdir()
    # a pair whose sidecar has one byte flipped (caught by the record checksums)
    (d / "flip.onnx").write_bytes((d / "c.onnx").read_bytes())
    side = bytearray((d / "c.msq").read_bytes())
    side[len(side) // 2] ^= 0xFF
    (d / "flip.msq").write_bytes(bytes(side))
    # a pair whose sidecar is cut short
    (d / "cut.onnx").write_bytes((d / "c.onnx").read_bytes())
    (d / "cut.msq").write_bytes((d / "c.msq").read_bytes()[:100])
    (d / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (d / "ok.toml").write_text('version = 1\ninput = "mlp.onnx"\noutput = "r.onnx"\n\n[[step]]\ncommand = "prune"\nsparsity = 0.5\n')
    (d / "fail.toml").write_text('version = 1\ninput = "mlp.onnx"\noutput = "r1.onnx"\nvalidate = "d.npz"\nmax_drop = 0\n\n'
                                 '[[step]]\ncommand = "prune"\nsparsity = 0.99\n')
    (d / "bad.toml").write_text("version = 1\n[[step\n")
    (d / "nosteps.toml").write_text('version = 1\ninput = "mlp.onnx"\noutput = "r2.onnx"\n')
    (d / "badstep.toml").write_text('version = 1\ninput = "mlp.onnx"\noutput = "r3.onnx"\n\n[[step]]\ncommand = "shrink"\n')
    return d


@pytest.fixture
def at(folder, monkeypatch) -> Path:
    monkeypatch.chdir(folder)
    return folder


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(result, code: int, prefix: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout[-500:], result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    return lines[0]


# --- 0 ---------------------------------------------------------------------------------------------

OK = {
    "eval": ["eval", "mlp.onnx", "--data", "d.npz"],
    "report": ["report", "c.onnx", "--baseline", "mlp.onnx", "--data", "d.npz", "--max-drop", "100", "--min-ratio", "0.01"],
    "prune": ["prune", "mlp.onnx", "-o", "ok_prune.onnx", "--sparsity", "0.5", "--validate", "d.npz", "--max-drop", "100"],
    "cluster": ["cluster", "mlp.onnx", "-o", "ok_cluster.onnx", "--bits", "2"],
    "quantize": ["quantize", "mlp.onnx", "-o", "ok_quantize.onnx", "--bits", "8"],
    "svd": ["svd", "mlp.onnx", "-o", "ok_svd.onnx", "--rank", "2"],
    # Huffman coding is lossless: its --max-drop check cannot fail (drop 0 <= 0), so it has no exit 1
    "huffman": ["huffman", "c.onnx", "-o", "ok_huffman.onnx", "--validate", "d.npz", "--max-drop", "0"],
    "unpack": ["unpack", "c.onnx", "-o", "ok_unpack.onnx"],
    "pack": ["pack", "c.onnx", "-o", "ok_pack.onnx"],
    "pipeline": ["pipeline", "mlp.onnx", "-o", "ok_pipeline.onnx", "--prune", "0.5", "--bits", "2", "--huffman"],
    "run": ["run", "ok.toml"],
    "sensitivity": ["sensitivity", "mlp.onnx", "--data", "d.npz", "--method", "prune", "--values", "0.5"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_0_ok(at, command):
    result = invoke(*OK[command], "--quiet", *(["--force"] if command != "eval" else []))
    assert result.exit_code == 0, (result.stdout[-500:], result.stderr)
    assert result.stderr == ""


# --- 1 ---------------------------------------------------------------------------------------------

FAIL = {
    "report --max-bytes": ["report", "c.onnx", "--max-bytes", "10"],
    "report --min-ratio": ["report", "c.onnx", "--baseline", "mlp.onnx", "--min-ratio", "1000"],
    "report --max-drop": ["report", "ok_fail_pruned.onnx", "--baseline", "mlp.onnx", "--data", "d.npz", "--max-drop", "0"],
    "report --max-growth": ["report", "c.onnx", "--baseline-json", "mlp_report.json", "--max-growth", "0"],
    "prune": ["prune", "mlp.onnx", "-o", "f.onnx", "--sparsity", "0.99", "--validate", "d.npz", "--max-drop", "0"],
    "cluster": ["cluster", "mlp.onnx", "-o", "f.onnx", "--bits", "1", "--validate", "d.npz", "--max-drop", "0"],
    "quantize": ["quantize", "mlp.onnx", "-o", "f.onnx", "--bits", "2", "--granularity", "tensor", "--validate", "d.npz", "--max-drop", "0"],
    "svd": ["svd", "mlp.onnx", "-o", "f.onnx", "--rank", "1", "--validate", "d.npz", "--max-drop", "0"],
    "pipeline": ["pipeline", "mlp.onnx", "-o", "f.onnx", "--prune", "0.99", "--bits", "2", "--validate", "d.npz", "--max-drop", "0"],
    "run": ["run", "fail.toml"],
    "run --max-drop": ["run", "ok.toml", "-o", "f.onnx", "--validate", "d.npz", "--max-drop", "0"],
    "sensitivity --target-bytes": ["sensitivity", "mlp.onnx", "--data", "d.npz", "--method", "prune", "--target-bytes", "10",
                                   "--recipe", "f.toml"],
    "sensitivity --target-ratio": ["sensitivity", "mlp.onnx", "--data", "d.npz", "--method", "cluster", "--target-ratio", "1000"],
}


@pytest.fixture(scope="module")
def fail_inputs(folder):
    """A heavily pruned model (report --max-drop) and a saved report JSON of a smaller model than
    c.onnx (report --max-growth)."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert invoke("prune", "mlp.onnx", "-o", "ok_fail_pruned.onnx", "--sparsity", "0.99", "-q", "--force").exit_code == 0
        result = invoke("report", "ok_fail_pruned.onnx", "--json")
        assert result.exit_code == 0
        Path("mlp_report.json").write_text(result.stdout)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("case", list(FAIL))
def test_1_check_failed(at, fail_inputs, case):
    before = listing(at)
    result = invoke(*FAIL[case], "--quiet")
    one_line(result, 1, "check failed: ")
    assert listing(at) == before, f"written: {sorted(listing(at) - before)}"


# --- 2: click's own usage errors -------------------------------------------------------------------

REQUIRED = {"eval": [], "report": [], "prune": ["-o", "x.onnx"], "cluster": ["-o", "x.onnx"], "quantize": ["-o", "x.onnx"],
            "svd": ["-o", "x.onnx"], "huffman": ["-o", "x.onnx"], "unpack": ["-o", "x.onnx"], "pack": ["-o", "x.onnx"],
            "pipeline": ["-o", "x.onnx"],
            "run": [], "sensitivity": ["--data", "d.npz", "--method", "prune"]}
SOURCE = {"run": "ok.toml", "huffman": "c.onnx", "unpack": "c.onnx", "pack": "c.onnx"}
INT_OPTION = {"eval": "--random", "report": "--min-ratio", "sensitivity": "--target-ratio", "unpack": None, "pack": None}
VALUE_OPTION = {"unpack": "--output", "pack": "--output"}


def usage_cases():
    for command in COMMANDS:
        src = SOURCE.get(command, "mlp.onnx")
        yield f"{command}-unknown-option", [command, src, *REQUIRED[command], "--bogus"]
        yield f"{command}-missing-argument", [command, *REQUIRED[command]]
        option = INT_OPTION.get(command, "--jobs")
        if option:
            yield f"{command}-{option[2:]}-not-a-number", [command, src, *REQUIRED[command], option, "abc"]
        else:
            yield f"{command}-option-without-its-value", [command, src, *REQUIRED[command], VALUE_OPTION[command]]
        if command in ("prune", "cluster", "quantize", "svd", "huffman", "unpack", "pack", "pipeline"):
            yield f"{command}-missing-output", [command, src]
    yield "sensitivity-missing-data", ["sensitivity", "mlp.onnx", "--method", "prune"]
    yield "sensitivity-missing-method", ["sensitivity", "mlp.onnx", "--data", "d.npz"]


USAGE = dict(usage_cases())


@pytest.mark.parametrize("case", list(USAGE))
def test_2_click_usage_errors(at, case):
    before = listing(at)
    result = invoke(*USAGE[case])
    assert result.exit_code == 2, (case, result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.output
    assert "Error" in result.stderr, result.stderr  # click's box (with a Usage: line when it has the context)
    assert listing(at) == before


# --- 2: our own bad usage (one line) ---------------------------------------------------------------

BAD_USAGE = {
    "eval-no-data-nor-reference": ["eval", "mlp.onnx"],
    "eval-random-without-reference": ["eval", "mlp.onnx", "--random", "5"],
    "eval-random-0": ["eval", "mlp.onnx", "--random", "0", "--reference", "mlp.onnx"],
    "eval-bad-dim": ["eval", "mlp.onnx", "--random", "5", "--reference", "mlp.onnx", "--dim", "batch=-1"],
    "report-json-and-markdown": ["report", "mlp.onnx", "--json", "--markdown"],
    "report-max-bytes-not-a-size": ["report", "mlp.onnx", "--max-bytes", "lots"],
    "report-min-ratio-nan": ["report", "mlp.onnx", "--baseline", "mlp.onnx", "--min-ratio", "nan"],
    "report-min-ratio-without-baseline": ["report", "mlp.onnx", "--min-ratio", "2"],
    "report-max-growth-without-json": ["report", "mlp.onnx", "--max-growth", "1%"],
    "report-plot-bad-suffix": ["report", "mlp.onnx", "--plot", "x.txt"],
    "prune-sparsity-not-a-number": ["prune", "mlp.onnx", "-o", "x.onnx", "--sparsity", "abc"],
    "prune-sparsity-out-of-range": ["prune", "mlp.onnx", "-o", "x.onnx", "--sparsity", "1.5"],
    "prune-no-amount": ["prune", "mlp.onnx", "-o", "x.onnx"],
    "prune-bad-nm": ["prune", "mlp.onnx", "-o", "x.onnx", "--nm", "4:2"],
    "prune-shrink-without-structured": ["prune", "mlp.onnx", "-o", "x.onnx", "--sparsity", "0.5", "--shrink"],
    "prune-max-drop-without-validate": ["prune", "mlp.onnx", "-o", "x.onnx", "--sparsity", "0.5", "--max-drop", "1"],
    "prune-jobs-0": ["prune", "mlp.onnx", "-o", "x.onnx", "--sparsity", "0.5", "--jobs", "0"],
    "cluster-bits-99": ["cluster", "mlp.onnx", "-o", "x.onnx", "--bits", "99"],
    "cluster-bad-init": ["cluster", "mlp.onnx", "-o", "x.onnx", "--bits", "2", "--init", "nope"],
    "cluster-max-drop-inf": ["cluster", "mlp.onnx", "-o", "x.onnx", "--bits", "2", "--validate", "d.npz", "--max-drop", "inf"],
    "cluster-negative-min-params": ["cluster", "mlp.onnx", "-o", "x.onnx", "--bits", "2", "--min-params", "-5"],
    "quantize-bits-12": ["quantize", "mlp.onnx", "-o", "x.onnx", "--bits", "12"],
    "quantize-block-size-0": ["quantize", "mlp.onnx", "-o", "x.onnx", "--granularity", "block", "--block-size", "0"],
    "quantize-percentile-nan": ["quantize", "mlp.onnx", "-o", "x.onnx", "--range", "percentile", "--percentile", "nan"],
    "svd-no-amount": ["svd", "mlp.onnx", "-o", "x.onnx"],
    "svd-energy-2": ["svd", "mlp.onnx", "-o", "x.onnx", "--energy", "2"],
    "svd-target-params-0": ["svd", "mlp.onnx", "-o", "x.onnx", "--target-params", "0"],
    "huffman-max-unique-negative": ["huffman", "c.onnx", "-o", "x.onnx", "--max-unique", "-3"],
    "huffman-negative-max-drop": ["huffman", "c.onnx", "-o", "x.onnx", "--validate", "d.npz", "--max-drop", "-1"],
    "unpack-onto-its-input": ["unpack", "c.onnx", "-o", "c.onnx", "--force"],
    "unpack-onto-its-sidecar": ["unpack", "c.onnx", "-o", "c.msq", "--force"],
    "pack-onto-its-input": ["pack", "c.onnx", "-o", "c.onnx", "--force"],
    "pack-onto-its-sidecar": ["pack", "c.onnx", "-o", "c.msq", "--force"],
    "pack-output-exists": ["pack", "c.onnx", "-o", "mlp.onnx"],
    "pipeline-no-steps": ["pipeline", "mlp.onnx", "-o", "x.onnx"],
    "pipeline-bits-and-quantize": ["pipeline", "mlp.onnx", "-o", "x.onnx", "--bits", "2", "--quantize", "8"],
    "pipeline-output-msq": ["pipeline", "mlp.onnx", "-o", "x.msq", "--bits", "2"],
    "pipeline-output-exists": ["pipeline", "mlp.onnx", "-o", "c.onnx", "--bits", "2"],
    "pipeline-output-folder-missing": ["pipeline", "mlp.onnx", "-o", "nofolder/x.onnx", "--bits", "2"],
    "pipeline-output-is-a-folder": ["pipeline", "mlp.onnx", "-o", "adir.onnx", "--bits", "2"],
    "run-max-drop-without-validate": ["run", "ok.toml", "--max-drop", "1"],
    "sensitivity-bad-method": ["sensitivity", "mlp.onnx", "--data", "d.npz", "--method", "nope"],
    "sensitivity-bad-values": ["sensitivity", "mlp.onnx", "--data", "d.npz", "--method", "prune", "--values", "abc"],
    "sensitivity-both-targets": ["sensitivity", "mlp.onnx", "--data", "d.npz", "--method", "prune", "--target-ratio", "2",
                                 "--target-bytes", "100"],
    "sensitivity-bad-option": ["sensitivity", "mlp.onnx", "--data", "d.npz", "--method", "prune", "--option", "bogus=1"],
    "sensitivity-recipe-not-toml": ["sensitivity", "mlp.onnx", "--data", "d.npz", "--method", "prune", "--recipe", "x.txt"],
}


@pytest.mark.parametrize("case", list(BAD_USAGE))
def test_2_bad_usage_is_one_line(at, case):
    assert case.split("-")[0] in COMMANDS
    before = listing(at)
    one_line(invoke(*BAD_USAGE[case], "--quiet"), 2, "error: ")
    assert listing(at) == before


def test_every_command_has_a_bad_usage_case():
    assert {case.split("-")[0] for case in BAD_USAGE} == set(COMMANDS)


# --- 2: bad input (one line) -----------------------------------------------------------------------

MODEL_INPUTS = {
    "missing": ("nothere.onnx", "no such file"),
    "directory": ("adir.onnx", "is a directory"),
    "empty": ("empty.onnx", "empty"),
    "garbage": ("garbage.onnx", "not an ONNX model"),
    "truncated": ("trunc.onnx", "not an ONNX model"),
    "flipped-sidecar-byte": ("flip.onnx", "checksum"),
    "truncated-sidecar": ("cut.onnx", "truncated"),
}


def command_on(command: str, model: str) -> list[str]:
    return {
        "eval": ["eval", model, "--data", "d.npz"],
        "report": ["report", model],
        "prune": ["prune", model, "-o", "x.onnx", "--sparsity", "0.5"],
        "cluster": ["cluster", model, "-o", "x.onnx", "--bits", "2"],
        "quantize": ["quantize", model, "-o", "x.onnx"],
        "svd": ["svd", model, "-o", "x.onnx", "--rank", "2"],
        "huffman": ["huffman", model, "-o", "x.onnx"],
        "unpack": ["unpack", model, "-o", "x.onnx"],
        "pack": ["pack", model, "-o", "x.onnx"],
        "pipeline": ["pipeline", model, "-o", "x.onnx", "--bits", "2"],
        "run": ["run", "ok.toml", "--input", model, "-o", "x.onnx"],
        "sensitivity": ["sensitivity", model, "--data", "d.npz", "--method", "prune", "--values", "0.5"],
    }[command]


BAD_MODEL_CASES = [(c, k) for c in COMMANDS for k in ("missing", "garbage")] + \
    [(c, k) for c in ("report", "cluster", "unpack", "pack") for k in MODEL_INPUTS if k not in ("missing", "garbage")]


@pytest.mark.parametrize("command,kind", BAD_MODEL_CASES, ids=[f"{c}-{k}" for c, k in BAD_MODEL_CASES])
def test_2_bad_model_is_one_line(at, command, kind):
    """Every command on a missing and a garbage model; every kind of bad model through report,
    cluster and unpack (all commands read models through the same load_pair)."""
    path, words = MODEL_INPUTS[kind]
    before = listing(at)
    line = one_line(invoke(*command_on(command, path), "--quiet"), 2, "error: ")
    assert words in line, line
    assert listing(at) == before


BAD_OTHER_INPUTS = {
    "eval-data-missing": ["eval", "mlp.onnx", "--data", "nothere.npz"],
    "eval-data-garbage": ["eval", "mlp.onnx", "--data", "garbage.npz"],
    "eval-data-is-a-model": ["eval", "mlp.onnx", "--data", "mlp.onnx"],
    "eval-reference-garbage": ["eval", "mlp.onnx", "--data", "d.npz", "--reference", "garbage.onnx"],
    "report-baseline-missing": ["report", "mlp.onnx", "--baseline", "nothere.onnx"],
    "report-baseline-json-not-json": ["report", "mlp.onnx", "--baseline-json", "d.npz", "--max-growth", "1%"],
    "prune-validate-garbage": ["prune", "mlp.onnx", "-o", "x.onnx", "--sparsity", "0.5", "--validate", "garbage.npz"],
    "cluster-calibration-missing": ["cluster", "mlp.onnx", "-o", "x.onnx", "--bits", "2", "--calibration", "nothere.npz"],
    "run-recipe-missing": ["run", "nothere.toml"],
    "run-recipe-not-toml": ["run", "bad.toml"],
    "run-recipe-binary": ["run", "d.npz"],
    "run-recipe-no-steps": ["run", "nosteps.toml"],
    "run-recipe-unknown-command": ["run", "badstep.toml"],
    "run-recipe-is-a-folder": ["run", "adir.onnx"],
    "sensitivity-data-garbage": ["sensitivity", "mlp.onnx", "--data", "garbage.npz", "--method", "prune"],
}


@pytest.mark.parametrize("case", list(BAD_OTHER_INPUTS))
def test_2_bad_data_or_recipe_is_one_line(at, case):
    before = listing(at)
    one_line(invoke(*BAD_OTHER_INPUTS[case], "--quiet"), 2, "error: ")
    assert listing(at) == before


def test_errors_print_nothing_on_stdout_with_json(at):
    """A CI job parsing --json output gets nothing rather than half a document."""
    for args in (["report", "garbage.onnx", "--json"], ["prune", "mlp.onnx", "-o", "x.onnx", "--sparsity", "2", "--json"],
                 ["eval", "nothere.onnx", "--data", "d.npz", "--json"]):
        result = invoke(*args)
        assert result.exit_code == 2 and result.stdout == "", (args, result.stdout)


# --- the real process ------------------------------------------------------------------------------

LONG_MISSING = "x" * 150 + "/" + "y" * 150 + ".onnx"
PROCESSES = {
    "0": ["report", "c.onnx", "--json"],
    "1": ["report", "c.onnx", "--max-bytes", "10"],
    "2": ["eval", LONG_MISSING, "--data", "d.npz"],  # longer than any terminal: still one line on a pipe
    "2-usage": ["prune", "mlp.onnx", "-o", "x.onnx", "--bogus"],
    "closed-stdout": ["report", "c.onnx"],  # the reader of stdout is gone before the first write
}


@pytest.fixture(scope="module")
def processes(folder) -> dict[str, tuple[int, str, str]]:
    """Each PROCESSES entry as a real `python -m modelsqueeze` (all started together):
    name -> (exit status, stdout, stderr)."""
    procs = {}
    for name, argv in PROCESSES.items():
        procs[name] = subprocess.Popen([sys.executable, "-m", "modelsqueeze", *argv], cwd=folder, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
        if name == "closed-stdout":
            procs[name].stdout.close()  # long before the first write: the interpreter is still starting
    done = {}
    for name, proc in procs.items():
        if name == "closed-stdout":
            err = proc.stderr.read()
            done[name] = (proc.wait(timeout=120), "", err)
        else:
            out, err = proc.communicate(timeout=120)
            done[name] = (proc.returncode, out, err)
    return done


def test_real_process_exit_statuses(processes):
    status, out, err = processes["0"]
    assert status == 0 and err == "" and out.lstrip().startswith("{"), (status, err)
    status, out, err = processes["1"]
    assert status == 1 and err.count("\n") == 1 and err.startswith("check failed: "), (status, err)
    status, out, err = processes["2"]
    assert status == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and LONG_MISSING in err, (status, err)
    status, out, err = processes["2-usage"]
    assert status == 2 and "Usage:" in err and "No such option" in err and "Traceback" not in err, (status, err)


def test_top_level(at):
    assert invoke("--version").exit_code == 0
    assert invoke("--help").exit_code == 0
    assert invoke("prune", "--help").exit_code == 0
    unknown = invoke("frobnicate", "mlp.onnx")
    assert unknown.exit_code == 2 and "No such command" in unknown.stderr
    bare = invoke()  # no_args_is_help: the help, exit 2 (click >= 8.2)
    assert bare.exit_code == 2 and "Usage:" in bare.output and "Traceback" not in bare.output


# --- bugs ------------------------------------------------------------------------------------------

def test_a_newline_in_a_path_keeps_the_error_one_line(at):
    """handles_errors (cli.py) prints str(exc) as is: a file name holding a newline (a hostile path)
    splits the one error line in two, so a CI log line no longer carries the whole error."""
    result = invoke("eval", "a\nb.onnx", "--data", "d.npz")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1, repr(result.stderr)


def test_a_closed_stdout_does_not_exit_1_like_a_failed_check(processes):
    """When the reader of stdout goes away (`modelsqueeze report m.onnx | head -1`), output printed
    with rich (the tables of report, eval, the transforming commands) ends in rich's
    Console.on_broken_pipe, which raises SystemExit(1) silently: the exit code of a failed check,
    so a CI gate piping the table reads 'check failed'. (The same with plain print, report --json /
    --markdown, is caught by handles_errors as an OSError: 'error: Broken pipe', exit 2.)"""
    status, _, err = processes["closed-stdout"]
    assert "Traceback" not in err, err
    assert status != 1, (status, err)
