"""Interrupted writes: real `python -m modelsqueeze` processes killed (SIGKILL) at random points,
and at chosen points of the write (a driver that sends itself SIGKILL or SIGINT just before a given
rename), then the folder is checked:

- the destination is the previous complete pair or the new complete pair, byte for byte (or absent
  when there was none); a mixed pair (one file old, the other new) must be refused by `load_pair`;
- the inputs are byte-identical to before;
- leftovers are only hidden temporaries named `.OUT.onnx.*` / `.OUT.msq.*`, never a visible file
  that could be taken for an output.

Default run: 8 random kills (MSQ_FUZZ_EXAMPLES=N for more; MSQ_FUZZ_SEED to change the seed).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

import modelsqueeze.model
from modelsqueeze import store
from modelsqueeze.cli import app
from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.model import graph_hash, load_model, save_model
from modelsqueeze.pack import load_pair
from modelsqueeze.sidecar import read_sidecar

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
KILLS = int(os.environ.get("MSQ_FUZZ_EXAMPLES", "8"))
SEED = int(os.environ.get("MSQ_FUZZ_SEED", "20261130"))

# Runs the CLI, sending itself SIGKILL (MSQ_KILL_WHEN=before) or SIGINT (=sigint, Ctrl-C) just
# before the os.replace whose destination is MSQ_KILL_TARGET (an absolute path). MSQ_LIMIT lowers
# save_model's protobuf limit so a small model is written the way a > 2 GiB one is (+ OUT.onnx.data).
KILL_DRIVER = r"""
import os, signal, sys
target, when = os.environ.get("MSQ_KILL_TARGET", ""), os.environ.get("MSQ_KILL_WHEN", "before")
if os.environ.get("MSQ_LIMIT"):
    import modelsqueeze.model
    modelsqueeze.model.save_model.__defaults__ = (int(os.environ["MSQ_LIMIT"]), 1024)
_replace = os.replace
def replace(src, dst, *args, **kwargs):
    hit = os.path.abspath(os.fspath(dst)) == target
    if hit and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    if hit and when == "sigint":
        os.kill(os.getpid(), signal.SIGINT)
    return _replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv[0] = "modelsqueeze"
from modelsqueeze.cli import main
main()
"""

runner = CliRunner()


def invoke(*args) -> None:
    result = runner.invoke(app, [str(a) for a in args] + ["--quiet"])
    assert result.exit_code == 0, (args, result.stdout, result.stderr)


def start(argv: list[str], cwd: Path, driver: bool = False, env: dict | None = None, sigint: bool = False) -> subprocess.Popen:
    head = [sys.executable, "-c", KILL_DRIVER] if driver else [sys.executable, "-m", "modelsqueeze"]
    return subprocess.Popen(
        head + argv, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        # a background shell may have SIGINT ignored; Python only turns SIGINT into KeyboardInterrupt
        # when it starts with the default disposition
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if sigint else None,
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path, names) -> dict[str, bytes | None]:
    return {n: (folder / n).read_bytes() if (folder / n).exists() else None for n in names}


def restore(folder: Path, files: dict[str, bytes | None]) -> None:
    for name, data in files.items():
        if data is None:
            (folder / name).unlink(missing_ok=True)
        else:
            (folder / name).write_bytes(data)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def logical_weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: store.to_array(t) for t in load_pair(path).model.graph.initializer}


@dataclass
class Job:
    """One command whose output is killed and checked: its argv (relative to its folder), its
    output files, and their bytes before (old) and after a complete run (new)."""

    name: str
    argv: list[str]
    outputs: list[str]
    runtime: float = 0.0
    old: dict = field(default_factory=dict)
    new: dict = field(default_factory=dict)


@dataclass
class Work:
    folder: Path
    jobs: dict[str, Job]
    inputs: dict[str, str]  # input file -> sha256 before any kill
    outcomes: list = field(default_factory=list)

    @property
    def visible(self) -> set[str]:
        return set(self.inputs) | {n for job in self.jobs.values() for n in job.outputs}


INPUTS = ("IN.onnx", "P.onnx", "P.msq", "R.onnx", "R.msq")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Work:
    """IN.onnx (LeNet-5), P.onnx/.msq (pruned: cluster's input), R.onnx/.msq (a compressed pair:
    unpack's input); each job's new output from one real, timed run; its old output from a run with
    other options (or input), written over it."""
    d = tmp_path_factory.mktemp("interrupt")
    shutil.copy(SAMPLES / "lenet5.onnx", d / "IN.onnx")
    invoke("prune", d / "IN.onnx", "-o", d / "P.onnx", "--sparsity", "0.8")
    jobs = {
        "pipeline": Job("pipeline", ["pipeline", "IN.onnx", "-o", "OUT.onnx", "--prune", "0.8", "--bits", "4", "--huffman", "--force"],
                        ["OUT.onnx", "OUT.msq"]),
        "cluster": Job("cluster", ["cluster", "P.onnx", "-o", "C.onnx", "--bits", "4", "--force"], ["C.onnx", "C.msq"]),
        "unpack": Job("unpack", ["unpack", "R.onnx", "-o", "U.onnx", "--force"], ["U.onnx"]),
    }
    for job in jobs.values():
        if job.name == "unpack":  # its input is the pipeline's output
            shutil.copy(d / "OUT.onnx", d / "R.onnx")
            shutil.copy(d / "OUT.msq", d / "R.msq")
        t0 = time.monotonic()
        proc = start(job.argv, d)
        _, stderr = proc.communicate(timeout=120)
        job.runtime = time.monotonic() - t0
        assert proc.returncode == 0, stderr.decode()
        job.new = snapshot(d, job.outputs)
    # the previous outputs: other options / another input, so old and new differ
    invoke("pipeline", d / "IN.onnx", "-o", d / "OUT.onnx", "--prune", "0.5", "--bits", "5", "--huffman", "--force")
    invoke("cluster", d / "P.onnx", "-o", d / "C.onnx", "--bits", "3", "--force")
    invoke("unpack", d / "P.onnx", "-o", d / "U.onnx", "--force")
    for job in jobs.values():
        job.old = snapshot(d, job.outputs)
        assert all(job.old[n] != job.new[n] for n in job.outputs), job.name
    assert not hidden(d)
    return Work(d, jobs, {n: sha(d / n) for n in INPUTS})


def check_state(folder: Path, job: Job, inputs: dict[str, str], visible: set[str], had_old: bool = True) -> str:
    """The state a kill left: 'old', 'new', 'absent' or 'orphan-sidecar' (the last two only when
    there was no previous output), or 'mixed' if refused by load_pair. Fails on a truncated,
    unknown or accepted mixed output, a modified input, a new visible file, or a leftover that is
    not a hidden temporary of an output."""
    for name, digest in inputs.items():
        assert sha(folder / name) == digest, f"input {name} was modified"
    got = snapshot(folder, job.outputs)
    if got == job.new:
        state = "new"
    elif had_old and got == job.old:
        state = "old"
    elif not had_old and all(v is None for v in got.values()):
        state = "absent"
    elif len(job.outputs) == 2 and got[job.outputs[1]] is None and got[job.outputs[0]] is not None \
            and got[job.outputs[0]] in (job.old.get(job.outputs[0]), job.new[job.outputs[0]]):
        # The old sidecar deleted, the new one not yet renamed: a complete model alone, which
        # computes its own weights (native forms) and loads as a plain model.
        state = "model-only"
        assert load_pair(folder / job.outputs[0]).sidecar is None
    else:
        for name, data in got.items():
            assert data is None or data in (job.old.get(name), job.new[name]), \
                f"{name}: neither the previous nor the new complete file ({None if data is None else len(data)} bytes)"
        assert len(job.outputs) == 2, got
        state = "mixed"  # each file complete, one old and one new: must be refused
        try:
            load_pair(folder / job.outputs[0])
        except ModelSqueezeError as exc:
            assert "binding hash" in str(exc), exc
        else:
            which = {n: ("old" if got[n] == job.old.get(n) else "new") for n in job.outputs}
            pytest.fail(f"mixed pair {which} accepted by load_pair (the binding hash matched)")
    if state in ("old", "new"):
        model_path = folder / job.outputs[0]
        pair = load_pair(model_path)
        if len(job.outputs) == 2:
            assert read_sidecar(folder / job.outputs[1]).graph_hash == graph_hash(load_model(model_path, check=False))
        else:
            assert pair.sidecar is None
    shown = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    assert shown <= visible, f"new visible files: {sorted(shown - visible)}"
    prefixes = tuple(f".{n}." for n in visible - set(inputs))
    assert all(n.startswith(prefixes) for n in hidden(folder)), hidden(folder)
    return state


CASES = [(("cluster", "pipeline", "unpack")[i % 3], i) for i in range(KILLS)]


@pytest.mark.parametrize("job_name,index", CASES, ids=[f"{j}-{i}" for j, i in CASES])
def test_sigkill_at_a_random_point(work, job_name, index):
    """kill -9 after a random delay: anywhere in [0, runtime], or (half the runs) in its last 40%,
    where the write happens; about a third of the runs start without a previous output."""
    job = work.jobs[job_name]
    rng = random.Random(f"{SEED}-{index}")
    had_old = rng.random() > 0.3
    delay = job.runtime * (rng.uniform(0, 1) if rng.random() < 0.5 else rng.uniform(0.6, 1))
    restore(work.folder, job.old if had_old else {n: None for n in job.outputs})
    proc = start(job.argv, work.folder)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    state = check_state(work.folder, job, work.inputs, work.visible, had_old)
    work.outcomes.append((job_name, round(delay, 2), proc.returncode, state))


def test_leftovers_are_hidden_and_never_taken_for_outputs(work, monkeypatch):
    """After all the kills: a complete run of every job still gives exactly the new output with the
    leftovers in the folder, and load_pair reads the real pair. Leftovers are never cleaned up:
    each SIGKILL during a write can leave a temporary folder `.OUT.onnx.*` (a full staged copy of
    the model) and a `.OUT.msq.*.tmp`; they accumulate (reported as a warning)."""
    d = work.folder
    monkeypatch.chdir(d)
    for job in (work.jobs["cluster"], work.jobs["unpack"]):  # (pipeline writes through the same write_pair)
        invoke(*job.argv)
        assert snapshot(d, job.outputs) == job.new, job.name
        load_pair(d / job.outputs[0])
    leftovers = hidden(d)
    files = [f for n in leftovers for f in ([d / n] if (d / n).is_file() else (d / n).rglob("*")) if f.is_file()]
    states: dict[str, int] = {}
    for *_, state in work.outcomes:
        states[state] = states.get(state, 0) + 1
    if leftovers:
        warnings.warn(f"{len(work.outcomes)} random kills ({states}) left {len(leftovers)} hidden temporaries "
                      f"({sum(f.stat().st_size for f in files):,} bytes) that no later run removes: "
                      f"{leftovers[:6]}{' ...' if len(leftovers) > 6 else ''}")


# --- kills at chosen points of the write -------------------------------------------------------------

def _retrained(path: Path) -> None:
    """LeNet-5 with other weights and biases: the same graph, as after retraining."""
    model = onnx.load_model(str(SAMPLES / "lenet5.onnx"))
    for t in model.graph.initializer:
        a = store.to_array(t)
        t.CopyFrom(numpy_helper.from_array((a + 0.5 if a.ndim == 1 else a * 1.1).astype(a.dtype), t.name))
    onnx.save_model(model, str(path))


@dataclass
class Point:
    folder: Path
    job: Job
    inputs: dict[str, str]
    proc: subprocess.Popen | None = None
    stderr: bytes = b""
    extra: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def points(work, tmp_path_factory) -> dict[str, Point]:
    """Every kill-at-a-rename run, started together (they are independent) and awaited."""
    found: dict[str, Point] = {}

    def prepare(key: str, job: Job, files: dict[str, bytes]) -> Point:
        d = tmp_path_factory.mktemp(key)
        restore(d, files)
        restore(d, job.old)
        point = found[key] = Point(d, job, {n: sha(d / n) for n in files})
        return point

    def launch(point: Point, target: str, when: str, cwd: Path | None = None, **env) -> None:
        env = {"MSQ_KILL_TARGET": str(point.folder / target), "MSQ_KILL_WHEN": when, **env}
        point.proc = start(point.job.argv, cwd or point.folder, driver=True, env=env, sigint=True)

    inputs = {n: (work.folder / n).read_bytes() for n in INPUTS}
    pipeline, cluster, unpack = work.jobs["pipeline"], work.jobs["cluster"], work.jobs["unpack"]
    launch(prepare("cluster-before-C.msq", cluster, inputs), "C.msq", "before")
    launch(prepare("cluster-sigint-C.msq", cluster, inputs), "C.msq", "sigint")
    launch(prepare("pipeline-before-OUT.onnx", pipeline, inputs), "OUT.onnx", "before")
    launch(prepare("unpack-before-U.onnx", unpack, inputs), "U.onnx", "before")

    # cluster of a retrained LeNet-5 (same graph, other weights and biases), pruned the same way,
    # over the pair made from the original one
    d = tmp_path_factory.mktemp("retrained")
    _retrained(d / "IN.onnx")
    invoke("prune", d / "IN.onnx", "-o", d / "P.onnx", "--sparsity", "0.8")
    invoke("cluster", d / "P.onnx", "-o", d / "NEW.onnx", "--bits", "4")
    job = Job("cluster-retrained", cluster.argv, cluster.outputs, old=cluster.new,
              new={"C.onnx": (d / "NEW.onnx").read_bytes(), "C.msq": (d / "NEW.msq").read_bytes()})
    point = prepare("retrained-before-C.onnx", job, {"P.onnx": (d / "P.onnx").read_bytes(), "P.msq": (d / "P.msq").read_bytes()})
    point.extra = {"old_weights": logical_weights(point.folder / "C.onnx"), "new_weights": logical_weights(d / "NEW.onnx")}
    launch(point, "C.onnx", "before")

    # unpack with external data (as for a > 2 GiB model): U.onnx + U.onnx.data from the original
    # model's cluster pair, then the retrained one's unpacked over it; run from another folder
    # (see the --force test below)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    files = {"A.onnx": cluster.new["C.onnx"], "A.msq": cluster.new["C.msq"], "B.onnx": job.new["C.onnx"], "B.msq": job.new["C.msq"]}
    ext = Job("unpack-external", [], ["U.onnx", "U.onnx.data"])
    point = prepare("external-before-U.onnx", ext, files)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(elsewhere)
        mp.setattr(modelsqueeze.model.save_model, "__defaults__", (1000, 1024))
        invoke("unpack", point.folder / "A.onnx", "-o", point.folder / "U.onnx")
    assert (point.folder / "U.onnx.data").exists()
    ext.old = snapshot(point.folder, ext.outputs)
    ext.argv = ["unpack", str(point.folder / "B.onnx"), "-o", str(point.folder / "U.onnx"), "--force"]
    point.extra = {"old_weights": logical_weights(point.folder / "U.onnx"), "new_weights": logical_weights(point.folder / "B.onnx")}
    launch(point, "U.onnx", "before", cwd=elsewhere, MSQ_LIMIT="1000")

    for point in found.values():
        _, point.stderr = point.proc.communicate(timeout=180)
    return found


def killed(point: Point) -> None:
    assert point.proc.returncode == -signal.SIGKILL, point.stderr.decode()


@pytest.mark.parametrize("key,expected", [
    ("cluster-before-C.msq", "model-only"),  # old sidecar deleted, new model renamed, new sidecar not yet
    ("unpack-before-U.onnx", "old"),  # dense model staged, not renamed
])
def test_sigkill_at_a_rename(points, key, expected):
    point = points[key]
    killed(point)
    assert check_state(point.folder, point.job, point.inputs, set(point.inputs) | set(point.job.outputs)) == expected


def test_ctrl_c_during_the_write_cleans_up(points):
    """SIGINT just before the sidecar's rename: KeyboardInterrupt unwinds through atomic_write and
    the temporary folder: exit 130, no traceback, no temporaries left, and (the sidecar being
    renamed last) the new model alone at the destination, complete and consistent."""
    point = points["cluster-sigint-C.msq"]
    assert point.proc.returncode == 130, point.stderr.decode()
    assert b"Traceback" not in point.stderr, point.stderr.decode()
    assert check_state(point.folder, point.job, point.inputs, set(point.inputs) | set(point.job.outputs)) == "model-only"
    assert not hidden(point.folder), hidden(point.folder)


def test_sigkill_before_the_model_rename_leaves_the_old_model_alone(points):
    """write_pair deletes the old OUT.msq, renames OUT.onnx, then OUT.msq: a kill before the model's
    rename leaves the old OUT.onnx alone (complete, consistent), never beside the new sidecar."""
    point = points["pipeline-before-OUT.onnx"]
    killed(point)
    got = snapshot(point.folder, point.job.outputs)
    assert got == {"OUT.onnx": point.job.old["OUT.onnx"], "OUT.msq": None}
    assert check_state(point.folder, point.job, point.inputs, set(point.inputs) | set(point.job.outputs)) == "model-only"


def _mix_report(weights, old, new) -> str:
    as_old = [k for k in weights if k in old and np.array_equal(weights[k], old[k])]
    as_new = [k for k in weights if k in new and np.array_equal(weights[k], new[k])]
    return f"tensors equal to the old output's: {as_old}; to the new output's: {as_new}"


def test_after_retraining_a_kill_never_mixes_two_writes(points):
    """As above, for `cluster` after retraining (same graph, other weights): the old C.onnx is left
    alone, so every weight comes from one write."""
    point = points["retrained-before-C.onnx"]
    killed(point)
    got = snapshot(point.folder, point.job.outputs)
    assert got == {"C.onnx": point.job.old["C.onnx"], "C.msq": None}
    pair = load_pair(point.folder / "C.onnx")
    assert pair.sidecar is None


def test_sigkill_between_external_data_and_model_renames_never_mixes(points):
    """save_model (model.py), for a model written with external data (> 2 GiB), deletes the old
    OUT.onnx before the new OUT.onnx.data arrives, then renames the new OUT.onnx: a kill between
    leaves no model at the destination, never the old model reading the new data file."""
    point = points["external-before-U.onnx"]
    killed(point)
    got = snapshot(point.folder, point.job.outputs)
    assert got["U.onnx"] is None and got["U.onnx.data"] != point.job.old["U.onnx.data"]


# --- writing with external data ------------------------------------------------------------------

def test_force_overwrite_of_an_external_data_model_from_its_folder(work, tmp_path, monkeypatch):
    """save_model passes location=NAME.data to onnx.save_model, whose FileExistsError check looks for
    NAME.data relative to the current directory, not the temporary folder it writes in: overwriting
    a > 2 GiB output with --force from the output's folder (the usual case) fails with "External
    data file exists" (exit 2), and a stray NAME.data in the current directory blocks any such write."""
    for n in ("R.onnx", "R.msq"):
        shutil.copy(work.folder / n, tmp_path / n)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(modelsqueeze.model.save_model, "__defaults__", (1000, 1024))
    invoke("unpack", "R.onnx", "-o", "U.onnx")
    assert (tmp_path / "U.onnx.data").exists()
    result = runner.invoke(app, ["unpack", "R.onnx", "-o", "U.onnx", "--force", "--quiet"])
    assert result.exit_code == 0, result.stderr


def test_external_data_file_gets_the_usual_permissions(tmp_path):
    """Outputs get the usual permissions (atomic_write chmods its temporary to 0666 & ~umask), but
    the OUT.onnx.data of a model written with external data keeps the 0600 it was created with."""
    save_model(onnx.load_model(str(SAMPLES / "lenet5.onnx")), tmp_path / "m.onnx", limit_bytes=1000)
    mask = os.umask(0)
    os.umask(mask)
    modes = {n: oct((tmp_path / n).stat().st_mode & 0o777) for n in ("m.onnx", "m.onnx.data")}
    assert modes["m.onnx.data"] == modes["m.onnx"] == oct(0o666 & ~mask), modes
