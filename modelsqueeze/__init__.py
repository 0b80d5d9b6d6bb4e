"""modelsqueeze: Deep Compression (prune, cluster, quantize, SVD, Huffman) for ONNX models."""

__version__ = "0.1.0"
