"""Scale benchmark (issue 10): every compression command on the synthetic 25M-parameter models (and,
with --huge, the > 2 GiB external-data model), run as the real CLI in a child process
(`python -m modelsqueeze ... --json --quiet`). Per run: wall time, CPU time, peak RSS of the command
(exact: a small launcher reports the command's own rusage from `os.wait4`; see LAUNCHER),
throughput in parameters per second, input bytes, packed bytes (skeleton + sidecar, from the
command's --json), ratio and peak RSS as a multiple of the model's size on disk.

Every output is then loaded and run once in onnxruntime in another child (its own time and peak
RSS), and compared with the original model's outputs on the same inputs (cosine similarity, max
absolute error); a wrong output is reported, not hidden. Reference rows: the interpreter alone
(`modelsqueeze --version`: imports), `load_pair` alone (the tool's floor for this model), and
onnxruntime on the original model.

A child is killed past --timeout seconds or --max-rss bytes (sampled every 50 ms from /proc), and
the row says so. Models live in --workdir (a temporary folder by default, removed at the end).

    python benchmarks/bench_scale.py [--huge] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import synthetic  # noqa: E402

# (tag, CLI arguments after the input; "huffman" reads cluster's output instead of the model)
COMMANDS = [
    ("prune", ["prune", "--sparsity", "0.9", "--scope", "global"]),
    ("cluster", ["cluster", "--bits", "5"]),
    ("quantize8", ["quantize", "--bits", "8"]),
    ("quantize4b", ["quantize", "--bits", "4", "--granularity", "block"]),
    ("svd", ["svd", "--energy", "0.9"]),
    ("huffman", ["huffman"]),
    ("pipeline", ["pipeline", "--prune", "0.9", "--prune-scope", "global", "--bits", "5", "--huffman"]),
]
QUICK_COMMANDS = ["prune", "cluster", "quantize8", "huffman", "pipeline"]
SAMPLES = ["lenet300", "lenet5", "lstm_digits", "tiny_transformer"]
HUFFMAN_INPUT = "cluster"

PAGE = os.sysconf("SC_PAGE_SIZE")


def command_text(tag: str) -> str:
    args = dict(COMMANDS)[tag]
    return " ".join(args) + (" (of cluster's output)" if tag == "huffman" else "")


# ----------------------------------------------------------------------------------------------
# Measuring a child process


# The measured command runs under this tiny launcher, which reports the command's own rusage.
# Measuring a direct child of the benchmark would be wrong: Linux carries the parent's resident set
# into the child's ru_maxrss when it forks/vforks and execs (a 330 MiB parent makes `python -c pass`
# "peak" at 330 MiB), whereas the launcher is ~13 MiB and then execs nothing.
LAUNCHER = (
    "import json, os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, u = os.wait4(p.pid, 0)\n"
    "with open(sys.argv[1], 'w') as f: json.dump([u.ru_maxrss, u.ru_utime + u.ru_stime], f)\n"
    "sys.exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))\n"
)


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _tree_rss(pid: int) -> int:
    """RSS of pid's children (the launcher's command) and their children."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except (OSError, ValueError):
            kids = []
        for k in kids:
            total += _rss_bytes(k)
        todo += kids
    return total


def measure(argv: list[str], timeout: float, max_rss: int | None, env: dict | None = None,
            cwd: Path | None = None) -> dict:
    """Run argv; return {seconds, cpu_seconds, peak_rss_bytes, returncode, stdout, stderr, killed}.
    peak_rss_bytes is the kernel's ru_maxrss of the command alone (see LAUNCHER); if the command is
    killed (--timeout, --max-rss) it is the highest RSS sampled every 50 ms instead."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        usage_file = Path(tmp) / "usage.json"
        out, err = open(Path(tmp) / "stdout", "w+b"), open(Path(tmp) / "stderr", "w+b")
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(usage_file), *argv],
                                stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True)
        lock, reaped, stop = threading.Lock(), [False], threading.Event()
        killed: list[str] = []
        sampled = [0]

        def watch() -> None:
            while not stop.wait(0.05):
                rss = _tree_rss(proc.pid)
                sampled[0] = max(sampled[0], rss)
                reason = None
                if max_rss and rss > max_rss:
                    reason = f"killed: RSS {rss / 2**30:.2f} GiB above the --max-rss cap {max_rss / 2**30:.1f} GiB"
                elif time.perf_counter() - start > timeout:
                    reason = f"killed: still running after the --timeout of {timeout:.0f} s"
                if reason:
                    with lock:
                        if not reaped[0]:  # a reaped pid may be reused: never signal it
                            killed.append(reason)
                            os.killpg(proc.pid, signal.SIGKILL)
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, _ = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        with lock:
            reaped[0] = True
        stop.set()
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        peak, cpu = sampled[0], None
        if usage_file.exists():
            maxrss_kib, cpu = json.loads(usage_file.read_text())
            peak = maxrss_kib * 1024
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        out.close()
        err.close()
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_bytes": peak,
        "returncode": proc.returncode,
        "killed": killed[0] if killed else None,
        "loadavg_before": load,
        "stdout": stdout,
        "stderr": stderr,
    }


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def error_text(stderr: str) -> str:
    """The last line of stderr and, for a traceback, where in modelsqueeze it was raised."""
    where = re.findall(r'File "[^"]*/(modelsqueeze/[^"]+)", line (\d+), in (\S+)', stderr)
    text = last_line(stderr)
    if where:
        path, line, func = where[-1]
        text += f" (traceback, raised in {func} at {path}:{line})"
    return text


def msq(*args: str) -> list[str]:
    return [sys.executable, "-m", "modelsqueeze", *args]


# ----------------------------------------------------------------------------------------------
# onnxruntime check (runs in a child: `bench_scale.py --ort-run MODEL --inputs NPZ ...`)


def _feeds(session, npz: Path, rows: int) -> dict:
    data = dict(np.load(npz))
    names = [i.name for i in session.get_inputs()]
    if all(n in data for n in names):
        feeds = {n: data[n] for n in names}
    elif len(names) == 1 and "x" in data:
        feeds = {names[0]: data["x"]}
    else:
        raise SystemExit(f"{npz}: no arrays for inputs {names}")
    return {n: np.ascontiguousarray(v[:rows]) for n, v in feeds.items()}


def ort_child(model: Path, npz: Path, rows: int, save: Path | None, reference: Path | None) -> None:
    import onnxruntime as ort

    start = time.perf_counter()
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    loaded = time.perf_counter()
    outputs = session.run(None, _feeds(session, npz, rows))
    done = time.perf_counter()
    report = {"load_seconds": loaded - start, "run_seconds": done - loaded}
    if save is not None:
        np.savez(save, *outputs)
    if reference is not None:
        ref = np.load(reference)
        ref = [ref[f"arr_{i}"] for i in range(len(ref.files))]
        a = np.concatenate([o.astype(np.float64).ravel() for o in outputs])
        b = np.concatenate([r.astype(np.float64).ravel() for r in ref])
        report["cosine"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))
        report["max_abs_err"] = float(np.max(np.abs(a - b)))
        report["ref_max_abs"] = float(np.max(np.abs(b)))
        if outputs[0].ndim == 2 and outputs[0].shape[1] > 1:
            report["top1_agreement"] = float(np.mean(outputs[0].argmax(1) == ref[0].argmax(1)))
    print(json.dumps(report))


def ort_check(model: Path, npz: Path, rows: int, args, save: Path | None = None,
              reference: Path | None = None) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--ort-run", str(model), "--inputs", str(npz),
            "--rows", str(rows)]
    if save is not None:
        argv += ["--save-outputs", str(save)]
    if reference is not None:
        argv += ["--reference-outputs", str(reference)]
    run = measure(argv, args.timeout, args.max_rss)
    result = {"seconds": run["seconds"], "cpu_seconds": run["cpu_seconds"], "peak_rss_bytes": run["peak_rss_bytes"],
              "ok": False}
    if run["returncode"] == 0 and not run["killed"]:
        try:
            result.update(json.loads(last_line(run["stdout"])), ok=True)
        except json.JSONDecodeError:
            result["error"] = "unreadable output: " + last_line(run["stdout"])
    else:
        result["error"] = run["killed"] or error_text(run["stderr"]) or f"exit {run['returncode']}"
    return result


# ----------------------------------------------------------------------------------------------
# The benchmark


def remove_outputs(path: Path) -> None:
    for extra in (path, path.with_suffix(".msq"), path.parent / f"{path.name}.data"):
        extra.unlink(missing_ok=True)


def row(model: dict, command: str, run: dict, input_bytes: int, packed: int | None, status: str,
        error: str = "", tag: str = "") -> dict:
    seconds, peak = run["seconds"], run["peak_rss_bytes"]
    return {
        "model": model["name"], "command": command, "tag": tag, "status": status, "error": error,
        "seconds": round(seconds, 3),
        "cpu_seconds": None if run["cpu_seconds"] is None else round(run["cpu_seconds"], 3),
        "peak_rss_bytes": peak, "params": model["params"],
        "params_per_s": round(model["params"] / seconds) if seconds > 0 else None,
        "model_bytes": model["bytes"], "input_bytes": input_bytes, "packed_bytes": packed,
        "ratio": round(model["bytes"] / packed, 3) if packed else None,
        "rss_x_model": round(peak / model["bytes"], 3),
        "loadavg_before": round(run["loadavg_before"], 2),
    }


def bench_model(model: dict, tags: list[str], args, work: Path, log) -> list[dict]:
    """All rows for one model: references, then each command (+ its onnxruntime check)."""
    rows = []
    src, npz = Path(model["path"]), Path(model["inputs"])
    out_dir = work / "out"
    out_dir.mkdir(parents=True, exist_ok=True)

    # The floor: load_pair alone (the logical model every command starts from).
    code = ("import sys; from modelsqueeze.pack import load_pair; p = load_pair(sys.argv[1]); "
            "print(sum(t.ByteSize() for t in p.model.graph.initializer))")
    run = measure([sys.executable, "-c", code, str(src)], args.timeout, args.max_rss)
    ok = run["returncode"] == 0 and not run["killed"]
    rows.append(row(model, "load_pair only (reference)", run, model["bytes"], None, "ok" if ok else "failed",
                    "" if ok else (run["killed"] or error_text(run["stderr"])), tag="load"))
    log(rows[-1])

    reference = out_dir / f"{model['name']}-reference.npz"
    check = ort_check(src, npz, args.rows, args, save=reference)
    rows.append(row(model, "onnxruntime: load + 1 inference of the original (reference)",
                    {**check, "loadavg_before": os.getloadavg()[0]}, model["bytes"], None,
                    "ok" if check["ok"] else "failed", check.get("error", ""), tag="ort-original"))
    log(rows[-1])
    if not check["ok"]:
        reference = None

    outputs: dict[str, Path] = {}
    for tag in tags:
        args_cli = dict(COMMANDS)[tag]
        source = src
        if tag == "huffman":
            if HUFFMAN_INPUT not in outputs:
                continue
            source = outputs[HUFFMAN_INPUT]
        out = out_dir / f"{model['name']}-{tag}.onnx"
        argv = msq(args_cli[0], str(source), "-o", str(out), *args_cli[1:], "--force", "--json", "--quiet")
        input_bytes = (synthetic.model_bytes(source) + (source.with_suffix(".msq").stat().st_size
                                                         if source.with_suffix(".msq").exists() else 0))
        run = measure(argv, args.timeout, args.max_rss)
        packed, status, error = None, "ok", ""
        if run["killed"]:
            status, error = "killed", run["killed"]
        elif run["returncode"] != 0:
            status, error = "failed", f"exit {run['returncode']}: {error_text(run['stderr'])}"
        else:
            try:
                packed = json.loads(run["stdout"])["packed_bytes_after"]
            except (json.JSONDecodeError, KeyError) as exc:
                status, error = "failed", f"no JSON summary ({exc})"
        r = row(model, command_text(tag), run, input_bytes, packed, status, error, tag=tag)
        r["argv"] = shlex.join(["python", "-m", "modelsqueeze", *argv[3:]]).replace(str(work), "$WORK")
        if out.exists() and not run["killed"]:  # a failed command may still have written its output
            check = ort_check(out, npz, args.rows, args, reference=reference)
            r["ort"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in check.items()}
            if status != "ok":
                r["ort"]["note"] = "output left on disk by the failing command"
            outputs[tag] = out
        rows.append(r)
        log(r)
        if tag != HUFFMAN_INPUT:
            remove_outputs(out)
    for path in outputs.values():
        remove_outputs(path)
    reference and reference.unlink(missing_ok=True)
    return rows


def sample_models(tags: list[str]) -> list[dict]:
    found = []
    for name in SAMPLES:
        path = ROOT / "sample_models" / f"{name}.onnx"
        if path.exists():
            import onnx

            m = onnx.load(str(path))
            params = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
            found.append({"name": name, "path": str(path), "inputs": str(path.with_suffix(".npz")),
                          "params": params, "bytes": synthetic.model_bytes(path), "seconds": 0.0})
    return found


def startup_row(args) -> dict:
    run = measure(msq("--version"), args.timeout, args.max_rss)
    return {"model": "-", "command": "modelsqueeze --version (interpreter + imports)", "tag": "startup",
            "status": "ok" if run["returncode"] == 0 else "failed", "seconds": round(run["seconds"], 3),
            "cpu_seconds": run["cpu_seconds"], "peak_rss_bytes": run["peak_rss_bytes"]}


def fmt_row(r: dict) -> str:
    gib = r["peak_rss_bytes"] / 2**30
    extra = f" x{r['rss_x_model']:.2f} of model" if "rss_x_model" in r else ""
    ratio = f" ratio {r['ratio']:.2f}x" if r.get("ratio") else ""
    ort = r.get("ort")
    ort_text = ""
    if ort:
        ort_text = (f" | ort {'ok' if ort['ok'] else 'FAILED'} {ort['seconds']:.1f} s {ort['peak_rss_bytes'] / 2**30:.2f} GiB"
                    + (f" cos {ort['cosine']:.4f}" if "cosine" in ort else "") + (f" {ort.get('error', '')}" if not ort['ok'] else ""))
    return (f"{r['model']:<12} {r['command'][:60]:<60} {r['status']:<7} {r['seconds']:8.1f} s "
            f"{gib:6.2f} GiB{extra}{ratio}{ort_text} {r.get('error', '')}")


def run_scale(args, log=print) -> dict:
    """Build the models and run everything; returns {models, rows}."""
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="msq-bench-"))
    tags = [t for t, _ in COMMANDS if not args.quick or t in QUICK_COMMANDS]
    if args.commands:
        tags = [t for t in tags if t in args.commands]
    names = ["convnet", "transformer"] + (["huge"] if args.huge else [])
    if args.models:
        names = [n for n in ["convnet", "transformer", "huge"] + SAMPLES if n in args.models]
    rows, models = [startup_row(args)], []
    log(fmt_row(rows[0]))
    try:
        for name in names:
            if name in SAMPLES:
                model = next(m for m in sample_models(tags) if m["name"] == name)
            else:
                model = synthetic.build(name, work / "models")
                log(f"built {name}: {model['params']:,} params, {model['bytes']:,} bytes in {model['seconds']:.1f} s")
            models.append({k: v for k, v in model.items() if k not in ("path", "inputs")})
            rows += bench_model(model, tags, args, work, lambda r: log(fmt_row(r)))
        if args.samples and not args.models:
            for model in sample_models(tags):
                models.append({k: v for k, v in model.items() if k not in ("path", "inputs")})
                rows += bench_model(model, tags, args, work, lambda r: log(fmt_row(r)))
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    floor = rows[0]["peak_rss_bytes"]
    for r in rows[1:]:  # the multiple without the interpreter and its imports
        r["net_rss_x_model"] = round(max(r["peak_rss_bytes"] - floor, 0) / r["model_bytes"], 3)
    return {"models": models, "rows": rows}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--huge", action="store_true", help="also the > 2 GiB external-data model")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_COMMANDS)}")
    parser.add_argument("--samples", action="store_true", help="also the sample models (LeNet etc.)")
    parser.add_argument("--models", nargs="+", help="only these models (convnet, transformer, huge, or a sample)")
    parser.add_argument("--commands", nargs="+", choices=[t for t, _ in COMMANDS], help="only these commands")
    parser.add_argument("--workdir", help="keep models and outputs here (reused between runs)")
    parser.add_argument("--keep", action="store_true", help="do not delete the temporary workdir")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a child is killed")
    parser.add_argument("--max-rss", type=float, default=14.0, help="GiB of RSS before a child is killed")
    parser.add_argument("--rows", type=int, default=4, help="inputs per onnxruntime check")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--json", type=Path, help="write the rows here")
    # Internal: the onnxruntime child.
    parser.add_argument("--ort-run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--save-outputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reference-outputs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ort_run:
        ort_child(args.ort_run, args.inputs, args.rows, args.save_outputs, args.reference_outputs)
        return
    args.max_rss = int(args.max_rss * 2**30)
    result = run_scale(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
