"""The bad-input harness: a command as a real process under a 1 GiB address-space limit and a
timeout, with its exit code, stderr and peak RSS; and the check every refusal must pass (exit 2,
one line, no traceback, under 200 MB, nothing written, inputs unchanged)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CAP_BYTES = 1 << 30
MAX_PEAK_BYTES = 200 << 20

_SCRIPT = """
import os, resource, sys
cap, peak_file = int(sys.argv[1]), sys.argv[2]
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
sys.argv = ["modelsqueeze", *sys.argv[3:]]
try:
    from modelsqueeze.cli import main
    main()
finally:
    # VmHWM: this process image's peak RSS (ru_maxrss would include the forking parent's).
    peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    with open(peak_file, "w") as handle:
        handle.write(str(int(peak.split()[1]) * 1024))
"""


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    peak_bytes: int


def run_capped(args, cwd: Path | None = None, timeout: float = 60, cap: int = CAP_BYTES) -> Run:
    """`modelsqueeze ARGS...` in a child process capped at `cap` bytes of address space; a run
    over `timeout` seconds is killed and fails the test as a hang."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(cap), str(peak_file), *map(str, args)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=env, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError(f"modelsqueeze {' '.join(map(str, args))}: still running after {timeout} s (hangs)")
        peak = int(peak_file.read_text()) if peak_file.exists() else -1
    return Run(proc.returncode, out, err, peak)


def snapshot(folder: Path) -> dict[str, object]:
    """Every file below `folder` (hidden ones too) by relative path, with its content's hash;
    special files by their kind."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(folder))] = f"link to {os.readlink(path)}"
        elif path.is_file():
            st = path.stat()
            # A huge (sparse) file is identified by its metadata: hashing it would cost gigabytes.
            found[str(path.relative_to(folder))] = (hashlib.sha256(path.read_bytes()).hexdigest()
                                                    if st.st_size < 64 << 20 else (st.st_size, st.st_ino, st.st_mtime_ns))
        elif not path.is_dir():
            found[str(path.relative_to(folder))] = "special"
    return found


def assert_refused(args, folder: Path, cwd: Path | None = None, timeout: float = 60) -> str:
    """Run `args` capped; it must exit 2 with one line on stderr, no traceback, peak RSS under
    200 MB, and leave `folder` exactly as it was. Returns the line."""
    before = snapshot(folder)
    run = run_capped(args, cwd=cwd, timeout=timeout)
    label = " ".join(map(str, args))
    assert run.code == 2, (label, run.code, run.stderr[-2000:])
    assert "Traceback" not in run.stderr + run.stdout, (label, run.stderr[-2000:])
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, (label, run.stderr)
    assert 0 < run.peak_bytes < MAX_PEAK_BYTES, (label, run.peak_bytes)
    assert snapshot(folder) == before, label
    return lines[0]
