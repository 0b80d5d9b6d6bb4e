"""Run the whole benchmark suite (`make bench`) and write benchmarks/results/bench.json (machine-
readable) and benchmarks/results/bench.md (Markdown tables):

1. scale (bench_scale.py): every command on the synthetic 25M-parameter Conv and MatMul nets (and
   the sample models; with --huge the > 2 GiB external-data model), each as a CLI child process:
   wall time, CPU time, peak RSS, parameters/s, input/packed bytes, ratio, peak RSS as a multiple of
   the model's size, and an onnxruntime load + inference of every output against the original.
2. where the memory goes (memory_phases.py): the pipeline on the Conv net (and with --huge a command
   on the huge model) with RSS around each phase.
3. the peer comparisons of the other benchmark scripts, run as they are and their tables captured:
   bench_kmeans (scikit-learn KMeans), bench_huffman (dahuffman, zlib, lzma, zstd), bench_quantize
   (onnxruntime quantize_dynamic), bench_sidecar (zlib, zstd), bench_svd_speed (randomized SVD).
4. the issue-10 targets, checked against the figures of this run.

    python benchmarks/run_all.py            # everything but the > 2 GiB model (~30 min on 2 cores)
    python benchmarks/run_all.py --huge     # and the > 2 GiB model (2.3 GB of disk, more time)
    python benchmarks/run_all.py --quick    # 25M models, five commands, quick peers (~5 min)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench_scale  # noqa: E402
import memory_phases  # noqa: E402
import synthetic  # noqa: E402

PEERS = [
    ("bench_kmeans.py", [], ["--quick"], "1-D k-means: kmeans1d against scikit-learn KMeans (and the exact optimum)"),
    ("bench_huffman.py", [], None, "Huffman coding against dahuffman, zlib -9, lzma, zstd -19"),
    ("bench_quantize.py", [], [], "linear quantization against onnxruntime quantize_dynamic"),
    ("bench_sidecar.py", [], ["--params", "2500000"], "sidecar container against zlib -9 and zstd -19"),
    ("bench_svd_speed.py", [], None, "factored-model latency and exact against randomized SVD"),
]
TARGET_SECONDS, TARGET_RSS_X = 60.0, 3.0


# ----------------------------------------------------------------------------------------------
# Machine


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine() -> dict:
    import numpy
    import onnx
    import onnxruntime
    import sklearn

    import modelsqueeze

    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    except OSError:
        pass
    mem = 0
    try:
        mem = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                       if ln.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    changed = [ln[3:] for ln in _git("status", "--porcelain", "--", "modelsqueeze").splitlines()]
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(), "cpu": cpu or platform.processor() or platform.machine(),
        "memory_bytes": mem, "platform": platform.platform(),
        "python": platform.python_version(), "numpy": numpy.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__, "scikit_learn": sklearn.__version__,
        "modelsqueeze": getattr(modelsqueeze, "__version__", "?"),
        "git_commit": _git("rev-parse", "HEAD"), "modelsqueeze_uncommitted_changes": changed,
        "loadavg_start": os.getloadavg()[0],
    }


# ----------------------------------------------------------------------------------------------
# Peers: run the scripts as they are, keep their output, parse their tables


def parse_output(text: str) -> list[dict]:
    """A script's stdout as items in order: rich box tables and Markdown tables as
    {"title", "columns", "rows"}, everything else as {"text"} paragraphs (repeats dropped)."""
    items: list[dict] = []
    seen: set[str] = set()
    lines = text.splitlines()
    para: list[str] = []
    title = ""

    def flush() -> None:
        if para:
            block = "  \n".join(para)
            if block not in seen:
                seen.add(block)
                items.append({"text": block})
            para.clear()

    i = 0
    while i < len(lines):
        s = lines[i].strip()
        nxt = next((ln.strip() for ln in lines[i + 1:i + 3] if ln.strip()), "")
        if s.startswith("┏"):  # rich: ┏ border, ┃ header ┃, ┡ rule, │ rows │, └ border
            flush()
            header = [c.strip() for c in lines[i + 1].strip().strip("┃").split("┃")]
            rows, i = [], i + 3
            while i < len(lines) and lines[i].strip().startswith("│"):
                rows.append([c.strip() for c in lines[i].strip().strip("│").split("│")])
                i += 1
            items.append({"title": title, "columns": header, "rows": rows})
            title, i = "", i + 1
            continue
        if s.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-:| ]+\|$", lines[i + 1].strip()):
            flush()
            header = [c.strip() for c in s.strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            items.append({"title": title, "columns": header, "rows": rows})
            title = ""
            continue
        if s and (nxt.startswith("┏") or (nxt.startswith("|") and s.startswith("**"))):
            flush()
            title = s.strip("*")
        elif s:
            para.append(s)
        else:
            flush()
        i += 1
    flush()
    return items


def run_peers(args, log) -> list[dict]:
    results = []
    for script, full, quick, what in PEERS:
        extra = quick if args.quick else full
        if extra is None:
            log(f"peer {script}: skipped (--quick)")
            results.append({"script": script, "what": what, "status": "skipped (--quick)"})
            continue
        argv = [sys.executable, str(HERE / script), *extra]
        log(f"peer {script} {' '.join(extra)} ...")
        run = bench_scale.measure(argv, args.peer_timeout, args.max_rss, cwd=ROOT)
        status = "ok" if run["returncode"] == 0 and not run["killed"] else "failed"
        items = parse_output(run["stdout"])
        results.append({
            "script": script, "args": extra, "what": what, "status": status,
            "error": "" if status == "ok" else (run["killed"] or bench_scale.error_text(run["stderr"])),
            "seconds": round(run["seconds"], 1), "peak_rss_bytes": run["peak_rss_bytes"], "items": items,
        })
        log(f"peer {script}: {status} in {run['seconds']:.0f} s")
    return results


# ----------------------------------------------------------------------------------------------
# Targets of issue 10


def targets(rows: list[dict], phases: list[dict], huge: bool) -> list[dict]:
    out = []
    for name in ("convnet", "transformer"):
        r = next((r for r in rows if r["model"] == name and r.get("tag") == "pipeline"), None)
        if r is None:
            continue
        ok_time = r["status"] == "ok" and r["seconds"] <= TARGET_SECONDS
        ok_rss = r["status"] == "ok" and r["rss_x_model"] <= TARGET_RSS_X
        out.append({
            "target": f"pipeline prune 0.9 global -> cluster 5 bits -> huffman on {name} "
                      f"({r['params'] / 1e6:.1f}M params) in <= {TARGET_SECONDS:.0f} s",
            "measured": f"{r['seconds']:.1f} s ({r['status']})", "met": ok_time})
        out.append({
            "target": f"... with peak RSS <= {TARGET_RSS_X:.0f} x the model's size ({r['model_bytes'] / 2**20:,.0f} MiB)",
            "measured": f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB = {r['rss_x_model']:.2f} x", "met": ok_rss})
    if huge:
        hrows = [r for r in rows if r["model"] == "huge" and r.get("tag") in dict(bench_scale.COMMANDS)]
        for r in hrows:
            ort = r.get("ort") or {}
            met = r["status"] == "ok" and ort.get("ok", False) and r["rss_x_model"] < 1.0
            measured = (f"{r['status']}, {r['seconds']:.0f} s, peak {r['peak_rss_bytes'] / 2**30:.2f} GiB = "
                        f"{r['rss_x_model']:.2f} x the model" + (f"; {r['error']}" if r["error"] else "")
                        + (f"; output in onnxruntime: {'runs' if ort.get('ok') else 'FAILS: ' + ort.get('error', '')}"
                           if r["status"] == "ok" else ""))
            out.append({"target": f"> 2 GiB model: `{r['command']}` compresses, its output runs in onnxruntime, "
                                  "peak RSS well under the model's size", "measured": measured, "met": met})
    return out


# ----------------------------------------------------------------------------------------------
# Markdown


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def scale_tables(result: dict) -> list[str]:
    lines = []
    for model in result["models"]:
        rows = [r for r in result["rows"] if r["model"] == model["name"]]
        lines += [f"### {model['name']}: {model['params']:,} parameters, {model['bytes']:,} bytes "
                  f"({model['bytes'] / 2**20:,.1f} MiB)", "",
                  "| command | status | time s | CPU s | peak RSS MiB | × model size | × net of interpreter | params/s | "
                  "input bytes | packed bytes | ratio | output in onnxruntime: s, peak MiB, cosine / top-1 agreement |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            ort = r.get("ort")
            if ort is None:
                ort_text = ""
            elif ort["ok"]:
                fidelity = []
                if "cosine" in ort:
                    fidelity.append(f"cos {ort['cosine']:.4f}")
                if "top1_agreement" in ort:
                    fidelity.append(f"top-1 {100 * ort['top1_agreement']:.0f}%")
                ort_text = f"runs: {ort['seconds']:.1f} s, {mib(ort['peak_rss_bytes'])} MiB, {', '.join(fidelity)}"
                if ort.get("note"):
                    ort_text += f" ({ort['note']})"
            else:
                ort_text = f"**fails**: {ort.get('error', '')}"
            status = r["status"] if r["status"] == "ok" else f"**{r['status']}**: {r['error']}"
            lines.append(
                f"| `{r['command']}` | {status} | {r['seconds']:.1f} | "
                f"{'-' if r['cpu_seconds'] is None else format(r['cpu_seconds'], '.1f')} | {mib(r['peak_rss_bytes'])} | "
                f"{r['rss_x_model']:.2f} | {r['net_rss_x_model']:.2f} | {r['params_per_s'] / 1e6:.2f}M | {r['input_bytes']:,} | "
                f"{'-' if r['packed_bytes'] is None else format(r['packed_bytes'], ',')} | "
                f"{'-' if r['ratio'] is None else format(r['ratio'], '.2f') + 'x'} | {ort_text} |")
        lines.append("")
    return lines


def peer_markdown(peer: dict) -> list[str]:
    lines = [f"### {peer['script']}: {peer['what']}", ""]
    if peer["status"] != "ok":
        return lines + [peer["status"] + (f": {peer['error']}" if peer.get("error") else ""), ""]
    command = " ".join(["python", f"benchmarks/{peer['script']}", *peer["args"]])
    lines += [f"`{command}`: {peer['seconds']:.0f} s, peak RSS {mib(peer['peak_rss_bytes'])} MiB", ""]
    for item in peer["items"]:
        if "text" in item:  # lines were joined with hard breaks; a lowercase start continues a wrapped line
            lines += [re.sub(r"  \n(?=[a-z])", " ", item["text"]), ""]
            continue
        if item["title"]:
            lines += [f"**{item['title']}**", ""]
        lines.append("| " + " | ".join(item["columns"]) + " |")
        lines.append("|" + "---|" * len(item["columns"]))
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in item["rows"]]
        lines.append("")
    return lines


def markdown(report: dict) -> str:
    m = report["machine"]
    flags = " ".join(report["flags"])
    lines = [
        "# modelsqueeze benchmarks",
        "",
        f"Measured {m['date']} by `python benchmarks/run_all.py{(' ' + flags) if flags else ''}` "
        f"(`make bench{(chr(32) + 'BENCH_ARGS=' + repr(flags)) if flags else ''}`) "
        f"on {m['cpu_count']} cores ({m['cpu']}), {m['memory_bytes'] / 2**30:.0f} GiB RAM, shared with other "
        f"work (load average {m['loadavg_start']:.1f} at the start, {report['loadavg_end']:.1f} at the end); "
        f"Python {m['python']}, numpy {m['numpy']}, onnx {m['onnx']}, onnxruntime {m['onnxruntime']}, "
        f"scikit-learn {m['scikit_learn']}; modelsqueeze {m['modelsqueeze']} at {m['git_commit'][:10]}"
        + (f" with uncommitted changes in {len(m['modelsqueeze_uncommitted_changes'])} file(s) of the package"
           if m["modelsqueeze_uncommitted_changes"] else "")
        + (f" (the repository moved to {report['git_commit_end'][:10]} during the run: other work was being "
           "committed, so later rows may have run newer code)" if report["git_commit_end"] != m["git_commit"] else "")
        + ".",
        "",
        "## Issue 10 targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *[f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in report["targets"]],
        "",
        *(["## Notes", "", *[f"- {n}" for n in report["notes"]], ""] if report.get("notes") else []),
        "## Every command at scale",
        "",
        "Each command is the real CLI in its own process (`python -m modelsqueeze CMD IN -o OUT ... --force --json "
        "--quiet`). Time is wall-clock including interpreter start and imports "
        f"({report['startup']['seconds']:.1f} s, {mib(report['startup']['peak_rss_bytes'])} MiB RSS for "
        "`modelsqueeze --version`); peak RSS is the kernel's maximum resident set of that process alone; "
        "× model size = peak RSS / the original model's bytes on disk (× net of interpreter: the same after "
        "subtracting the `--version` peak); params/s = the model's parameters / wall time; "
        "input bytes = what the command read (for huffman: cluster's output pair); packed = skeleton + sidecar "
        "(from the command's --json); ratio = original model bytes / packed bytes. Each output is then loaded and "
        "run on a few random inputs by onnxruntime in a separate process and compared with the original's outputs "
        "(cosine similarity over all outputs; top-1 agreement of the logits). Accuracy is not measured here: "
        "the synthetic models are untrained, so the cosine figures only show that the outputs are the "
        "compressed model's and not garbage; see the README for accuracy on the trained samples.",
        "",
        *scale_tables(report["scale"]),
    ]
    failures = [r for r in report["scale"]["rows"] if r["status"] != "ok"]
    if failures:
        lines += ["### Failures", "", "| model | command | after s | peak RSS MiB | error |", "|---|---|---:|---:|---|"]
        lines += [f"| {r['model']} | `{r.get('argv', r['command'])}` | {r['seconds']:.0f} | {mib(r['peak_rss_bytes'])} | "
                  f"{r['error']} |" for r in failures]
        lines.append("")
    if report["phases"]:
        lines += ["## Where the memory goes", "",
                  "`python benchmarks/memory_phases.py -- CMD ...`: the command runs in a child whose main calls are "
                  "wrapped to log their start and end; RSS is sampled every 5 ms from outside. Nested calls are "
                  "indented; calls under 50 ms are left out.", ""]
        for p in report["phases"]:
            if "error" in p:
                lines += [f"**{p['title']}**: could not profile: {p['error']}", ""]
            else:
                lines += [memory_phases.markdown(p["summary"], p["title"]), ""]
    if report["peers"]:
        lines += ["## Peer comparisons", "",
                  "The other benchmark scripts, run unchanged in this same run; their tables as they print them.", ""]
        for peer in report["peers"]:
            lines += peer_markdown(peer)
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------


def run_phases(args, work: Path, log) -> list[dict]:
    jobs = [("convnet", ["pipeline", "--prune", "0.9", "--prune-scope", "global", "--bits", "5", "--huffman"])]
    if args.huge:
        jobs.append(("huge", ["prune", "--sparsity", "0.9", "--scope", "global"]))
    out = []
    for name, cmd in jobs:
        model = synthetic.build(name, work / "models")
        target = work / "out" / f"{name}-phases.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        cli = [cmd[0], model["path"], "-o", str(target), *cmd[1:], "--force", "--quiet"]
        title = "modelsqueeze " + " ".join(cli).replace(str(work), "$WORK")
        log(f"phases: {title}")
        try:
            data = memory_phases.profile(cli)
            summary = memory_phases.summarise(data)
            out.append({"model": name, "title": title, "summary": summary})
        except SystemExit as exc:
            out.append({"model": name, "title": title, "error": str(exc)})
        bench_scale.remove_outputs(target)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_scale.add_arguments(parser)
    parser.add_argument("--no-peers", action="store_true", help="skip the peer comparison scripts")
    parser.add_argument("--no-phases", action="store_true", help="skip the memory-phase profile")
    parser.add_argument("--peer-timeout", type=float, default=1800.0)
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for bench.json and bench.md")
    parser.add_argument("--render", type=Path, metavar="BENCH.json",
                        help="only rewrite bench.md (in --out) from an earlier run's bench.json")
    parser.add_argument("--note", action="append", default=[],
                        help="with --render: add this note (e.g. a re-measurement) to the JSON and the Markdown")
    args = parser.parse_args()
    if args.render:
        report = json.loads(args.render.read_text())
        if args.note:
            report["notes"] = report.get("notes", []) + args.note
            args.render.write_text(json.dumps(report, indent=1) + "\n")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.md").write_text(markdown(report))
        print(f"wrote {args.out / 'bench.md'}")
        return
    flags = [f for f, on in (("--quick", args.quick), ("--huge", args.huge), ("--no-peers", args.no_peers),
                             ("--no-phases", args.no_phases)) if on]
    if not args.quick:
        args.samples = True
    args.max_rss = int(args.max_rss * 2**30)
    own_work = args.workdir is None
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="msq-bench-"))
    args.workdir = str(work)

    def log(text: str) -> None:
        print(text, flush=True)

    report = {"flags": flags, "machine": machine()}
    log(f"{report['machine']['cpu_count']} cores, load {report['machine']['loadavg_start']:.1f}; work in {work}")
    try:
        scale = bench_scale.run_scale(args, log)
        report["startup"] = next(r for r in scale["rows"] if r.get("tag") == "startup")
        scale["rows"] = [r for r in scale["rows"] if r.get("tag") != "startup"]
        report["scale"] = scale
        report["phases"] = [] if args.no_phases else run_phases(args, work, log)
    finally:
        if own_work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report["peers"] = [] if args.no_peers else run_peers(args, log)
    report["targets"] = targets(scale["rows"], report["phases"], args.huge)
    report["loadavg_end"] = os.getloadavg()[0]
    report["git_commit_end"] = _git("rev-parse", "HEAD")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "bench.md").write_text(markdown(report))
    log(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.md'}")
    for t in report["targets"]:
        log(f"{'MET    ' if t['met'] else 'NOT MET'} {t['target']}: {t['measured']}")


if __name__ == "__main__":
    main()
