# The README's two commands: `make demo` (compress and report a sample model) and `make test`.
# Everything runs in a local virtualenv (.venv) that these targets create on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
OUT := out

.PHONY: install test demo sample-models bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest

demo: install
	@mkdir -p $(OUT)
	$(BIN)/modelsqueeze prune sample_models/lenet5.onnx -o $(OUT)/lenet5_pruned.onnx --force \
	  --sparsity 0.8 --scope global --validate sample_models/lenet5.npz --max-drop 2
	$(BIN)/modelsqueeze cluster $(OUT)/lenet5_pruned.onnx -o $(OUT)/lenet5_shared.onnx --force \
	  --bits 4 --validate sample_models/lenet5.npz --max-drop 1
	$(BIN)/modelsqueeze report $(OUT)/lenet5_shared.onnx --baseline sample_models/lenet5.onnx \
	  --data sample_models/lenet5.npz --max-drop 1 --min-ratio 15
	@for m in lenet300 lenet5 lstm_digits tiny_transformer; do \
	  $(BIN)/modelsqueeze eval sample_models/$$m.onnx --data sample_models/$$m.npz --quiet || exit $$?; done

# Retrain the sample models (needs torch, installed from the local wheel by the `train` extra).
sample-models: install
	$(BIN)/pip install --quiet -e '.[dev,train]'
	$(PY) sample_models/train.py

bench: install
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(PY) benchmarks/bench_sidecar.py
	$(PY) benchmarks/bench_kmeans.py
	$(PY) benchmarks/bench_quantize.py
	$(PY) benchmarks/bench_huffman.py
	$(PY) benchmarks/bench_svd_speed.py

clean:
	rm -rf $(OUT) .pytest_cache .hypothesis .benchmarks $(VENV)
