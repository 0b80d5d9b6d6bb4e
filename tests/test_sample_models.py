"""The committed sample models load, pass the full ONNX checker, and score what accuracy.json says.

No torch here: sample_models/train.py produced these files; this only re-runs them in onnxruntime.
"""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from modelsqueeze.model import model_to_bytes

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_models"
# model name -> (input name, accuracy floor that shows it learned)
MODELS = {
    "lenet300": ("x", 0.9),
    "lenet5": ("x", 0.9),
    "lstm_digits": ("x", 0.85),
    "tiny_transformer": ("tokens", 0.85),
}


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads((SAMPLE_DIR / "accuracy.json").read_text())


def test_accuracy_json_lists_exactly_the_models(recorded):
    assert set(recorded) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sample_model_accuracy(name, recorded):
    input_name, floor = MODELS[name]
    model = onnx.load(SAMPLE_DIR / f"{name}.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == [input_name]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    data = np.load(SAMPLE_DIR / f"{name}.npz")
    assert set(data.files) == {input_name, "y"}
    calib = np.load(SAMPLE_DIR / f"{name}_calib.npz")
    assert calib.files == [input_name]
    assert calib[input_name].shape[1:] == data[input_name].shape[1:]

    session = ort.InferenceSession(model_to_bytes(model), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {input_name: data[input_name]})
    assert logits.shape == (len(data["y"]), 10)
    accuracy = float(np.mean(logits.argmax(axis=1) == data["y"]))

    # The same computation as the training script's, but another onnxruntime build may round a
    # borderline logit differently: allow one sample, no more.
    assert accuracy == pytest.approx(recorded[name]["accuracy"], abs=1.01 / len(data["y"]))
    assert recorded[name]["n_test"] == len(data["y"])
    assert accuracy > floor
