"""Benchmark the sidecar container: encode/decode throughput on a 25M-weight tensor in each record
kind, and the bytes of a packed index stream against zlib -9 and zstd -19 of the same indices."""

from __future__ import annotations

import argparse
import time
import zlib

import numpy as np
from rich.console import Console
from rich.table import Table

from modelsqueeze.sidecar import decode_sidecar, encode_sidecar
from modelsqueeze.tensor import CompressedTensor


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def cases(n: int, rng: np.random.Generator) -> dict[str, CompressedTensor]:
    weights = rng.laplace(0, 0.05, n).astype(np.float32)
    codebook = np.linspace(-0.2, 0.2, 32, dtype=np.float32)
    indices = np.clip(np.searchsorted(codebook, weights), 0, 31).astype(np.uint8)
    keep = np.flatnonzero(np.abs(weights) > np.quantile(np.abs(weights), 0.9))  # 90% pruned
    return {
        "raw float32": CompressedTensor.raw("w", weights.reshape(-1, 1000)),
        "5-bit codebook": CompressedTensor("w", (n // 1000, 1000), "float32", codebook=codebook,
                                           indices=indices, index_bits=5),
        "90% sparse + 5-bit": CompressedTensor("w", (n // 1000, 1000), "float32", codebook=codebook,
                                               indices=indices[keep], index_bits=5, positions=keep),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=int, default=25_000_000, help="weights per tensor")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    console = Console(width=120)
    table = Table(title=f"sidecar container, {args.params:,} weights, best of {args.repeats}")
    for col in ("record", "file bytes", "bits/weight", "encode s", "decode s", "decode MB/s of weights"):
        table.add_column(col, justify="right" if col != "record" else "left")
    records = cases(args.params, rng)
    for label, record in records.items():
        data = encode_sidecar([record], bytes(32))
        enc = best_seconds(lambda: encode_sidecar([record], bytes(32)), args.repeats)
        dec = best_seconds(lambda: decode_sidecar(data).records["w"].decode(), args.repeats)
        assert np.array_equal(decode_sidecar(data).records["w"].decode(), record.decode())
        table.add_row(label, f"{len(data):,}", f"{8 * len(data) / args.params:.3f}", f"{enc:.3f}", f"{dec:.3f}",
                      f"{4 * args.params / dec / 1e6:,.0f}")
    console.print(table)

    # The same 5-bit indices: packed at exactly 5 bits vs general-purpose compressors on one byte each.
    indices = records["5-bit codebook"].indices
    raw = indices.tobytes()
    peers = Table(title="5-bit index stream vs general-purpose compressors (one byte per index in)")
    for col in ("coder", "bytes", "bits/index", "seconds"):
        peers.add_column(col, justify="right" if col != "coder" else "left")
    packed = encode_sidecar([records["5-bit codebook"]], bytes(32))
    peers.add_row("bitpack (sidecar, incl. codebook)", f"{len(packed):,}", f"{8 * len(packed) / indices.size:.3f}", "-")
    start = time.perf_counter()
    z = zlib.compress(raw, 9)
    peers.add_row("zlib -9", f"{len(z):,}", f"{8 * len(z) / indices.size:.3f}", f"{time.perf_counter() - start:.2f}")
    try:
        import zstandard
    except ImportError:
        peers.add_row("zstd -19", "not installed (pip install modelsqueeze[bench])", "", "")
    else:
        start = time.perf_counter()
        zs = zstandard.ZstdCompressor(level=19).compress(raw)
        peers.add_row("zstd -19", f"{len(zs):,}", f"{8 * len(zs) / indices.size:.3f}", f"{time.perf_counter() - start:.2f}")
    console.print(peers)


if __name__ == "__main__":
    main()
