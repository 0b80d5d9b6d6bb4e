"""The huffman pass: entropy-code the sidecar's index, quantized-code, zero-point and position
streams with canonical Huffman codes, stream by stream, only where that is smaller. Plain weights
with few distinct values (clustered or quantized elsewhere) first become exact codebook records."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx

from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.passes import PassResult, Selection, parallel_map
from modelsqueeze.passes.cluster import index_bits
from modelsqueeze.sidecar import record_size
from modelsqueeze.tensor import CompressedTensor

# Streams worth entropy coding, and the Huffman codec for each.
CODED_ROLES = {"indices": "huffman", "zero_point": "huffman", "positions": "huffman-gaps"}


@dataclass(frozen=True)
class HuffmanConfig:
    """Options of `modelsqueeze huffman`."""

    max_unique: int = 256  # plain weights with at most this many distinct values are coded losslessly
    selection: Selection = field(default_factory=Selection)
    version: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.max_unique <= 2**16:
            raise ModelSqueezeError(f"--max-unique {self.max_unique}: expected 1 to 65536")


def exact_codebook(name: str, array: np.ndarray) -> CompressedTensor:
    """A lossless codebook record of an array with few distinct values: zeros by position when
    that is smaller, else zero is a code of its own."""
    flat = array.reshape(-1)
    positions = np.flatnonzero(flat)
    candidates = []
    for sparse in ((True, False) if positions.size < flat.size else (False,)):
        values = flat[positions] if sparse else flat
        codebook, inverse = np.unique(values, return_inverse=True)
        if codebook.size == 0:
            codebook, inverse = np.zeros(1, array.dtype), inverse
        dtype = np.uint8 if codebook.size <= 256 else np.uint16
        candidates.append(CompressedTensor(
            name, array.shape, array.dtype.name, codebook=codebook, indices=inverse.reshape(-1).astype(dtype),
            index_bits=index_bits(codebook.size), positions=positions if sparse else None,
        ))
    return min(candidates, key=record_size)


def code_streams(record: CompressedTensor) -> CompressedTensor:
    """The record with each codable stream Huffman coded where that makes the record smaller."""
    best = dataclasses.replace(record, stream_codecs={})
    for role, codec in CODED_ROLES.items():
        present = {"indices": record.indices, "zero_point": record.zero_point, "positions": record.positions}[role]
        if present is None or present.size == 0:
            continue
        trial = dataclasses.replace(best, stream_codecs={**best.stream_codecs, role: codec})
        if record_size(trial) < record_size(best):
            best = trial
    return best


def huffman(model: onnx.ModelProto, records: dict[str, CompressedTensor], config: HuffmanConfig) -> PassResult:
    """Code the selected tensors' streams; the model's values do not change."""
    notes: list[str] = []
    out, selected = config.selection.start(model, notes)
    new_records = dict(records)
    changed = []
    def code(info) -> tuple[CompressedTensor | None, str]:
        record = had = records.get(info.key)
        if record is None:
            array = info.array()
            n_unique = np.unique(array).size
            if n_unique > config.max_unique:
                return None, f"{info.key}: {n_unique:,} distinct values, nothing to code (cluster or quantize it first)"
            record = exact_codebook(info.key, array)
        if record.indices is None:
            return None, f"{info.key}: raw values, nothing to code (cluster or quantize it first)"
        coded = code_streams(record)
        if had is None and record_size(coded) >= array.nbytes:  # no tensor is written bigger than it was
            return None, f"{info.key}: stays dense ({array.nbytes:,} B; as a coded record {record_size(coded):,} B)"
        if coded.stream_codecs and coded.stream_codecs != record.stream_codecs:
            return coded, (f"{info.key}: {record_size(record):,} -> {record_size(coded):,} bytes "
                           f"({', '.join(f'{r}: {c}' for r, c in sorted(coded.stream_codecs.items()))})")
        if had is None:
            return coded, f"{info.key}: {array.nbytes:,} -> {record_size(coded):,} bytes (its {n_unique} distinct values as codes)"
        return None, f"{info.key}: Huffman coding does not pay here, streams stay as they are"

    for info, (coded, note) in zip(selected, parallel_map(code, selected)):
        notes.append(note)
        if coded is not None:
            new_records[info.key] = coded
            changed.append(info.key)
    return PassResult(model=out, records=new_records, changed=changed, notes=notes)
