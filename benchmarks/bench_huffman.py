"""Huffman coding of real index streams (k-means codes of the LeNet samples, pruned and not, plus a
synthetic 25M-symbol stream) against dahuffman, zlib -9, lzma and zstd -19: bits per symbol,
encode and decode speed (millions of symbols per second), and the Shannon limit."""

from __future__ import annotations

import lzma
import time
import zlib
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from modelsqueeze.codecs.huffman import decode_symbols, encode_symbols
from modelsqueeze.pack import load_pair
from modelsqueeze.passes import LayerRule
from modelsqueeze.passes.cluster import ClusterConfig, cluster
from modelsqueeze.passes.prune import PruneConfig, prune

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def streams() -> dict[str, np.ndarray]:
    """Concatenated 5-bit cluster indices of each sample's weights, dense and after 90% pruning."""
    out = {}
    for name in ("lenet300", "lenet5"):
        src = load_pair(SAMPLES / f"{name}.onnx")
        for tag, start in (("dense", src), ("pruned 90%", None)):
            model, records = src.model, src.records
            if start is None:
                result = prune(model, records, PruneConfig(sparsity=LayerRule(0.9), scope="global"))
                model, records = result.model, result.records
            shared = cluster(model, records, ClusterConfig(bits=LayerRule(5)))
            indices = [shared.records[k].indices for k in shared.changed]
            out[f"{name} {tag}"] = np.concatenate(indices).astype(np.int64)
    rng = np.random.default_rng(0)
    out["synthetic Laplace 25M"] = np.clip(np.round(rng.laplace(16, 3, 25_000_000)), 0, 31).astype(np.int64)
    return out


def timed(fn, repeats: int = 3):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    console = Console(width=140)
    try:
        import dahuffman
    except ImportError:
        dahuffman = None
    try:
        import zstandard
    except ImportError:
        zstandard = None
    for label, symbols in streams().items():
        n = symbols.size
        counts = np.bincount(symbols)
        p = counts[counts > 0] / n
        entropy = float(-(p * np.log2(p)).sum())
        table = Table(title=f"{label}: {n:,} symbols, entropy {entropy:.3f} bits/symbol")
        for col in ("coder", "bits/symbol", "vs entropy", "encode Msym/s", "decode Msym/s"):
            table.add_column(col, justify="left" if col == "coder" else "right")
        raw = symbols.astype(np.uint8).tobytes()
        repeats = 1 if n > 5_000_000 else 3
        enc_s, (data, chunk) = timed(lambda: encode_symbols(symbols), repeats)
        dec_s, back = timed(lambda: decode_symbols(data, n, chunk), repeats)
        assert np.array_equal(back, symbols)
        rows = [("modelsqueeze huffman", len(data), enc_s, dec_s)]
        coders = [("zlib -9", lambda: zlib.compress(raw, 9), zlib.decompress),
                  ("lzma", lambda: lzma.compress(raw, preset=9), lzma.decompress)]
        if zstandard is not None:
            coders.append(("zstd -19", lambda: zstandard.ZstdCompressor(level=19).compress(raw),
                           lambda b: zstandard.ZstdDecompressor().decompress(b)))
        for name, enc, dec in coders:
            if n > 5_000_000 and name == "lzma":
                continue  # minutes on 2 cores; the smaller streams show the picture
            e, blob = timed(enc, 1)
            d, _ = timed(lambda: dec(blob), 1)
            rows.append((name, len(blob), e, d))
        if dahuffman is not None and n <= 1_000_000:  # pure Python: too slow beyond this
            codec = dahuffman.HuffmanCodec.from_data(symbols.tolist())
            e, blob = timed(lambda: codec.encode(symbols.tolist()), 1)
            d, _ = timed(lambda: codec.decode(blob), 1)
            rows.append(("dahuffman", len(blob), e, d))
        for name, size, e, d in rows:
            bits = 8 * size / n
            table.add_row(name, f"{bits:.3f}", f"{bits / entropy:.3f}x" if entropy else "-",
                          f"{n / e / 1e6:.1f}", f"{n / d / 1e6:.1f}")
        console.print(table)
    console.print("Each coder gets one byte per symbol as input; modelsqueeze's size includes its code table and "
                  "chunk offsets. dahuffman is skipped above 1M symbols, lzma above 5M (too slow here).")


if __name__ == "__main__":
    main()
