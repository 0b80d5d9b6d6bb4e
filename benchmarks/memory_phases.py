"""Where a command's memory goes: run one modelsqueeze command in a child process whose main
phases (load, the pass, render, check, hash, sidecar encoding, save, reload, size) are wrapped to log
when they start and end, while this process samples the child's RSS from /proc every few
milliseconds (outside the child, so no GIL hides a peak). Prints, for each phase call, its time,
RSS at entry, the highest RSS sampled during it and RSS at exit, and the calls open at the peak.

    python benchmarks/memory_phases.py [--markdown] -- prune MODEL.onnx -o OUT.onnx --sparsity 0.9

Only functions that exist are wrapped (the list below is by name; a renamed one is skipped and
listed), so the command's behaviour is unchanged apart from the logging.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")

# module:function (or module:Class.method) to time; the calls of interest in a transforming command.
PHASES = [
    "modelsqueeze.pack:load_pair",
    "modelsqueeze.model:load_model",
    "modelsqueeze.model:read_model_bytes",
    "modelsqueeze.model:parse_model",
    "onnx.external_data_helper:load_external_data_for_model",
    "modelsqueeze.model:check_model",
    "modelsqueeze.sidecar:read_sidecar",
    "modelsqueeze.pack:render",
    "modelsqueeze.pipeline:run_steps",
    "modelsqueeze.recipe:Step.apply",
    "modelsqueeze.pack:round_trip",
    "modelsqueeze.pack:packed_bytes",
    "modelsqueeze.pack:write_pair",
    "modelsqueeze.pack:rendered",
    "modelsqueeze.pack:skeleton",
    "modelsqueeze.sidecar:encode_sidecar",
    "modelsqueeze.sidecar:decode_sidecar",
    "modelsqueeze.model:graph_hash",
    "modelsqueeze.model:save_model",
    "modelsqueeze.model:model_to_bytes",
    "modelsqueeze.pack:packed_size",
    "modelsqueeze.model:model_file_bytes",
    "modelsqueeze.model:find_weights",
]


def _rss(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _hwm() -> int:
    """This process's peak RSS (VmHWM: of its own address space since exec, so unlike the parent's
    ru_maxrss of the child it does not include the parent's resident set at fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------------------------
# The child: wrap the phases, run the CLI in-process, dump the events.


def child(events_path: Path, cli_args: list[str]) -> None:
    import modelsqueeze.cli as cli  # noqa: F401  (imports every module the command uses)

    events: list[tuple] = []
    depth = [0]
    skipped = []

    def wrap(label: str, fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            events.append((time.monotonic(), "enter", label, depth[0], _rss()))
            depth[0] += 1
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
                events.append((time.monotonic(), "exit", label, depth[0], _rss()))
        inner.__wrapped_phase__ = True
        return inner

    for spec in PHASES:
        module_name, attr = spec.split(":")
        try:
            module = importlib.import_module(module_name)
            if "." in attr:
                cls_name, meth = attr.split(".")
                cls = getattr(module, cls_name)
                setattr(cls, meth, wrap(attr, getattr(cls, meth)))
                continue
            original = getattr(module, attr)
        except (ImportError, AttributeError):
            skipped.append(spec)
            continue
        wrapped = wrap(attr, original)
        # Replace every module-level reference to it (`from x import f` copies the name).
        for name, mod in list(sys.modules.items()):
            if mod is None or not (name.startswith("modelsqueeze") or name == module_name):
                continue
            for key, value in list(vars(mod).items()):
                if value is original:
                    setattr(mod, key, wrapped)
    events.append((time.monotonic(), "start", "", 0, _rss()))
    sys.argv = ["modelsqueeze", *cli_args]
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        events.append((time.monotonic(), "end", "", 0, _rss()))
        events_path.write_text(json.dumps({"events": events, "skipped": skipped, "code": code, "hwm": _hwm()}))
    sys.exit(code)


# ----------------------------------------------------------------------------------------------
# The parent: sample, join, summarise.


def profile(cli_args: list[str], interval: float = 0.005) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        events_path = Path(tmp) / "events.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(events_path), "--", *cli_args]
        samples: list[tuple[float, int]] = []
        with open(Path(tmp) / "stdout", "wb") as out, open(Path(tmp) / "stderr", "wb") as err:
            proc = subprocess.Popen(argv, stdout=out, stderr=err)
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    samples.append((time.monotonic(), _rss(proc.pid)))
                    time.sleep(interval)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            _, status, _ = os.wait4(proc.pid, 0)
            stop.set()
            sampler.join()
        stderr = (Path(tmp) / "stderr").read_text(errors="replace")
        if not events_path.exists():
            raise SystemExit(f"the command died before it finished: {stderr.strip()[-500:]}")
        data = json.loads(events_path.read_text())
    data.update(samples=samples, peak_rss_bytes=data["hwm"],
                returncode=os.waitstatus_to_exitcode(status), stderr=stderr)
    return data


def summarise(data: dict, min_seconds: float = 0.05) -> dict:
    events, samples = data["events"], [s for s in data["samples"] if s[1] > 0]
    start = next(e[0] for e in events if e[1] == "start")
    end = next(e[0] for e in events if e[1] == "end")
    calls, stack = [], []
    for t, kind, label, depth, rss in events:
        if kind == "enter":
            stack.append((t, label, depth, rss))
        elif kind == "exit" and stack:
            t0, label0, depth0, rss0 = stack.pop()
            inside = [r for ts, r in samples if t0 <= ts <= t]
            calls.append({"label": label0, "depth": depth0, "start": t0 - start, "seconds": t - t0,
                          "rss_enter": rss0, "rss_peak": max(inside + [rss0, rss]), "rss_exit": rss})
    calls.sort(key=lambda c: (c["start"], c["depth"]))
    peak_t, peak_rss = max(samples, key=lambda s: s[1]) if samples else (start, 0)
    open_at_peak = [c["label"] for c in calls if c["start"] <= peak_t - start <= c["start"] + c["seconds"]]
    startup = next((r for ts, r in samples if ts >= start), 0)
    return {
        "calls": [c for c in calls if c["seconds"] >= min_seconds],
        "total_seconds": end - start,
        "rss_after_imports": startup,
        "peak_rss_sampled": peak_rss,
        "peak_rss_bytes": data["peak_rss_bytes"],
        "peak_at_seconds": peak_t - start,
        "open_at_peak": open_at_peak,
        "skipped": data["skipped"],
        "returncode": data["returncode"],
    }


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def markdown(summary: dict, title: str) -> str:
    lines = [f"**{title}**", "",
             f"total {summary['total_seconds']:.1f} s after imports; RSS after imports {mib(summary['rss_after_imports'])} MiB; "
             f"peak RSS {mib(summary['peak_rss_bytes'])} MiB (VmHWM), sampled peak {mib(summary['peak_rss_sampled'])} MiB "
             f"at {summary['peak_at_seconds']:.1f} s inside: {' > '.join(summary['open_at_peak']) or '-'}", "",
             "| phase (nested) | starts at s | seconds | RSS in MiB | peak during MiB | RSS out MiB | Δ MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for c in summary["calls"]:
        name = "&nbsp;&nbsp;" * c["depth"] + f"`{c['label']}`"
        lines.append(f"| {name} | {c['start']:.1f} | {c['seconds']:.2f} | {mib(c['rss_enter'])} | {mib(c['rss_peak'])} | "
                     f"{mib(c['rss_exit'])} | {(c['rss_exit'] - c['rss_enter']) / 2**20:+,.0f} |")
    if summary["skipped"]:
        lines += ["", f"not found (not timed): {', '.join(summary['skipped'])}"]
    return "\n".join(lines)


def main() -> None:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        rest = sys.argv[i + 2:]
        child(Path(sys.argv[i + 1]), rest[1:] if rest[:1] == ["--"] else rest)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-seconds", type=float, default=0.05, help="hide calls shorter than this")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the modelsqueeze arguments")
    args = parser.parse_args()
    cli_args = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    summary = summarise(profile(cli_args), args.min_seconds)
    print(markdown(summary, "modelsqueeze " + " ".join(cli_args)))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
