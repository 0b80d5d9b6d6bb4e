"""The bounded-memory forms of the kernels compute exactly what the whole-array formulas do:
quantization a block of rows at a time, group extremes without a float64 copy, quantized records
decoded by broadcasting, k-means labels a chunk at a time, Huffman coding a batch at a time."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from modelsqueeze.codecs import huffman as huffman_codec
from modelsqueeze.kernels import quant
from modelsqueeze.kernels.kmeans1d import kmeans1d
from modelsqueeze.passes import cluster as cluster_pass
from modelsqueeze.passes.cluster import ClusterConfig, encode
from modelsqueeze.passes import LayerRule
from modelsqueeze.tensor import CompressedTensor

LAYOUTS = [((7, 5), None, 0), ((7, 5), 0, 0), ((7, 5), 1, 0), ((7, 5), 1, 2), ((6, 4, 3), 0, 4), ((9,), 0, 4), ((), None, 0)]


def _whole_quantize(w, layout, scale, zero_point, bits, signed):
    qmin, qmax = quant.qrange(bits, signed)
    s = layout.expand(scale).astype(np.float64)
    z = layout.expand(zero_point).astype(np.int64)
    return np.clip(np.round(np.asarray(w, np.float64) / s) + z, qmin, qmax).astype(np.int64)


@pytest.mark.parametrize("shape, axis, block", LAYOUTS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_chunked_quantization_and_extremes_match_the_whole_array_formulas(shape, axis, block, symmetric, monkeypatch):
    monkeypatch.setattr(quant, "ROWS_ELEMENTS", 3)  # several row blocks even for these tiny tensors
    rng = np.random.default_rng(len(shape) + (axis or 0) + block)
    w = rng.standard_normal(shape).astype(np.float32)
    layout = quant.Layout(shape, axis, block)
    scale, zp = quant.choose_params(w, layout, 4, True, symmetric)
    group = layout.groups().reshape(-1)
    n_groups = int(np.prod(layout.param_shape, dtype=np.int64))
    hi = np.maximum(quant._group_reduce(w.reshape(-1).astype(np.float64), group, n_groups, np.maximum), 0.0)
    lo = np.minimum(quant._group_reduce(w.reshape(-1).astype(np.float64), group, n_groups, np.minimum), 0.0)
    want_scale, want_zp = quant._params(hi, lo, *quant.qrange(4, True), symmetric, True, 4)
    assert np.array_equal(scale.reshape(-1), want_scale.astype(np.float32)) and np.array_equal(zp.reshape(-1), want_zp)
    got = quant.quantize(w, layout, scale, zp, 4, True)
    assert got.dtype == np.int32
    assert np.array_equal(got, _whole_quantize(w, layout, scale, zp, 4, True))


@pytest.mark.parametrize("shape, axis, block", [layout for layout in LAYOUTS if layout[0]])
def test_quantized_records_decode_the_same_dense_or_through_positions(shape, axis, block):
    rng = np.random.default_rng(3)
    layout = quant.Layout(shape, axis, block)
    codes = rng.integers(0, 16, int(np.prod(shape))).astype(np.uint8)
    scale = rng.uniform(0.01, 0.1, layout.param_shape).astype(np.float32)
    zp = rng.integers(-8, 8, layout.param_shape).astype(np.int64)
    common = dict(indices=codes, scale=scale, zero_point=zp, quant_axis=axis, block_size=block, index_bits=4)
    dense = CompressedTensor("w", shape, "float32", **common)
    every = CompressedTensor("w", shape, "float32", positions=np.arange(codes.size), **common)
    assert np.array_equal(dense.decode().view(np.uint32), every.decode().view(np.uint32))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 3000), st.integers(1, 6), st.floats(0.0, 0.9), st.integers(0, 2**31 - 1))
def test_cluster_codes_chunked_equal_kmeans1d_labels(n, bits, zero_share, seed):
    rng = np.random.default_rng(seed)
    array = rng.standard_normal(n).astype(np.float32)
    array[rng.random(n) < zero_share] = 0.0
    config = ClusterConfig(bits=LayerRule(bits))
    old_chunk = cluster_pass.ASSIGN_CHUNK
    try:
        cluster_pass.ASSIGN_CHUNK = 7
        record = encode("w", array, 2**bits, config)
    finally:
        cluster_pass.ASSIGN_CHUNK = old_chunk
    nonzero = array[array != 0]
    values = array if record.positions is None else nonzero
    k = record.codebook.size
    # kmeans1d on the values the record codes gives the same codebook and the same labels
    if record.positions is None and (array == 0).any():
        centroids, labels = kmeans1d(nonzero.astype(np.float64), max(2**bits - 1, 1))
        expected = np.zeros(n, np.int64)
        expected[array != 0] = labels + 1
        assert np.array_equal(record.codebook[1:], centroids.astype(np.float32))
    else:
        centroids, expected = kmeans1d(values.astype(np.float64), 2**bits)
        assert np.array_equal(record.codebook, centroids.astype(np.float32)) or k == 1
    if values.size and k > 1:
        assert np.array_equal(record.indices.astype(np.int64), expected)
    assert np.array_equal(record.decode(), np.where(array != 0, record.decode(), 0))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 40), min_size=0, max_size=600), st.integers(1, 50))
def test_huffman_batches_give_the_same_stream(symbols, batch):
    symbols = np.array(symbols, np.int64)
    whole = huffman_codec.encode_symbols(symbols)
    old = huffman_codec._ENCODE_BATCH
    try:
        huffman_codec._ENCODE_BATCH = batch
        assert huffman_codec.encode_symbols(symbols) == whole
    finally:
        huffman_codec._ENCODE_BATCH = old
    data, chunk = whole
    assert np.array_equal(huffman_codec.decode_symbols(data, symbols.size, chunk), symbols)
