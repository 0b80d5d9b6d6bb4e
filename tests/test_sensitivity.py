"""Per-layer sensitivity and size-targeted search: tables measured one layer at a time, chosen
settings, recipes that reproduce exactly what the search reported, and the CLI's refusals."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import modelsqueeze.cli_sensitivity  # noqa: F401  (registers the command even before cli.py imports it)
from modelsqueeze import sensitivity as S
from modelsqueeze.cli import app
from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.pack import load_pair, packed_size, write_pair
from modelsqueeze.passes import Selection
from modelsqueeze.pipeline import run_steps
from modelsqueeze.recipe import dump_recipe, load_recipe, parse_step_spec
from modelsqueeze.validate import load_npz, top1_accuracy

from conftest import SAMPLES

runner = CliRunner()

# Three weight layers big enough for pruning and clustering to pay in bytes, small enough to be fast.
WIDE_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
wide (float[batch, 16] x) => (float[batch, 5] logits) {
  h1 = Gemm<transB = 1>(x, fc1_w, fc1_b)
  r1 = Relu(h1)
  h2 = MatMul(r1, fc2_w)
  r2 = Relu(h2)
  logits = MatMul(r2, fc3_w)
}
"""
PRUNE_VALUES = [0.0, 0.5, 0.8, 0.95]


def make_wide(names: dict[str, str] | None = None) -> onnx.ModelProto:
    """The model above with seeded weights; `names` renames initializers (old -> new)."""
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model(WIDE_TEXT)
    for name, shape in [("fc1_w", (64, 16)), ("fc1_b", (64,)), ("fc2_w", (64, 32)), ("fc3_w", (32, 5))]:
        fan_in = shape[1] if name == "fc1_w" else shape[0]
        array = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        model.graph.initializer.append(onnx.numpy_helper.from_array(array, (names or {}).get(name, name)))
    for node in model.graph.node:
        node.input[:] = [(names or {}).get(n, n) for n in node.input]
    onnx.checker.check_model(model, full_check=True)
    return model


def wide_data(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """300 samples labelled by the model itself: the baseline accuracy is exactly 1."""
    x = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    from modelsqueeze.validate import Runner

    y = Runner(model).run({"x": x})[0].argmax(1)
    return {"x": x, "y": y}


@pytest.fixture
def wide(tmp_path: Path) -> tuple[Path, Path]:
    model = make_wide()
    path, data = tmp_path / "wide.onnx", tmp_path / "wide.npz"
    onnx.save_model(model, str(path))
    np.savez(data, **wide_data(model))
    return path, data


def invoke(*args):
    return runner.invoke(app, ["sensitivity", *[str(a) for a in args]])


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --- the engine ----------------------------------------------------------------------------------

def test_table_has_a_row_per_layer_and_a_column_per_value(wide):
    path, data = wide
    pair, arrays = load_pair(path), load_npz(data)
    calls = []
    result = S.sensitivity(pair.model, pair.records, arrays, "prune", [0.95, 0.0, 0.5], progress=calls.append)
    assert result.setting == "sparsity" and result.values == [0, 0.5, 0.95]  # sorted gentle -> aggressive
    assert [key for key, _ in result.layers] == ["fc1_w", "fc2_w", "fc3_w"]
    assert [n for _, n in result.layers] == [1024, 2048, 160]
    assert all(set(result.accuracy[k]) == set(result.values) == set(result.bytes[k]) for k, _ in result.layers)
    assert sum(calls) == 3 * 3
    assert result.baseline_accuracy == 1.0
    for key, _ in result.layers:
        assert result.accuracy[key][0] == result.baseline_accuracy  # sparsity 0 changes no weight
    # certain on average: the most aggressive value costs accuracy and saves bytes on the big layers
    assert np.mean([result.accuracy[k][0.95] for k, _ in result.layers]) < result.baseline_accuracy
    assert result.bytes["fc2_w"][0.95] < result.bytes["fc2_w"][0.5] < result.bytes["fc2_w"][0]


def test_cluster_at_8_bits_is_within_a_point_and_lenet300_degrades_with_fewer_bits():
    pair, arrays = load_pair(SAMPLES / "lenet300.onnx"), load_npz(SAMPLES / "lenet300.npz")
    result = S.sensitivity(pair.model, pair.records, arrays, "cluster", [8, 2], selection=Selection(layers=("fc1.w*",)))
    assert result.layers == [("fc1.weight", 235200)]
    assert result.drop_pp("fc1.weight", 8) <= 1.0
    assert result.bytes["fc1.weight"][2] < result.bytes["fc1.weight"][8] < result.baseline_bytes


def test_only_the_named_layer_changes_even_with_glob_characters_in_names():
    names = {"fc1_w": "w*", "fc2_w": "w[1]", "fc3_w": "default"}
    model = make_wide(names)
    step = S.single_layer_step(S.METHODS["prune"], "w*", 0.5)
    assert step.apply(model, {}).changed == ["w*"]  # an unescaped 'w*' would take every layer
    assert S.single_layer_step(S.METHODS["prune"], "w[1]", 0.5).apply(model, {}).changed == ["w[1]"]
    recipe_step = S.method_step("cluster", {"w*": 3, "w[1]": 5, "default": 2})
    result = recipe_step.apply(model, {})
    assert result.changed == ["w*", "w[1]", "default"]
    assert {k: r.codebook.size for k, r in result.records.items()} == {"w*": 8, "w[1]": 32, "default": 4}
    for key in names.values():
        assert fnmatch.fnmatchcase(key, S.exact_glob(key))
    assert not fnmatch.fnmatchcase("w1", S.exact_glob("w*"))


def test_best_settings_takes_the_most_aggressive_value_within_the_budget():
    values = [8, 6, 4, 2]
    result = S.SensitivityResult(
        method="cluster", setting="bits", values=values, layers=[("a", 10), ("b", 10), ("c", 10)],
        baseline_accuracy=0.90, baseline_bytes=100,
        accuracy={"a": dict(zip(values, [0.90, 0.895, 0.89, 0.80])),   # 4 bits: exactly 1 pp
                  "b": dict(zip(values, [0.85, 0.80, 0.70, 0.60])),    # nothing passes: left alone
                  "c": dict(zip(values, [0.90, 0.70, 0.91, 0.905]))},  # 2 bits passes again
        bytes={k: dict(zip(values, [90, 80, 70, 60])) for k in "abc"},
    )
    assert S.best_settings(result, 1.0) == {"a": 4, "c": 2}
    assert S.best_settings(result, 0.0) == {"a": 8, "c": 2}
    assert S.best_settings(result, 50.0) == {"a": 2, "b": 2, "c": 2}


def test_values_are_validated_and_ordered():
    prune, cluster, svd = S.METHODS["prune"], S.METHODS["cluster"], S.METHODS["svd"]
    assert S.grid_values(prune, [0.9, 0.5, 0.5]) == [0.5, 0.9]
    assert S.grid_values(cluster, [4, 8, 6.0]) == [8, 6, 4]
    assert S.grid_values(svd, [0.5, 0.99]) == [0.99, 0.5]
    assert S.grid_values(prune, None) == [0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95]
    for method, bad in ((prune, [1.5]), (cluster, [0]), (cluster, [4.5]), (svd, [0.0]), (S.METHODS["quantize"], [9])):
        with pytest.raises(ModelSqueezeError, match="--values"):
            S.grid_values(method, bad)
    with pytest.raises(ModelSqueezeError, match="scope"):
        S.check_options(prune, {"scope": "global"})
    with pytest.raises(ModelSqueezeError, match="--values"):
        S.check_options(cluster, {"bits": 4})
    with pytest.raises(ModelSqueezeError, match="unknown option"):
        S.check_options(cluster, {"colour": "red"})
    assert S.check_options(cluster, {"init": "density"}) == {"init": "density"}


def test_search_result_reproduces_exactly_from_its_recipe_and_written_pair(wide, tmp_path):
    path, data = wide
    pair, arrays = load_pair(path), load_npz(data)
    then = [parse_step_spec("cluster bits=4"), parse_step_spec("huffman")]
    walk = S.search(pair.model, pair.records, arrays, "prune", 1, PRUNE_VALUES, then=then)
    assert not walk.reached and walk.chosen is None
    sizes = [p.packed_bytes for p in walk.frontier]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert walk.frontier[-1].settings == {"fc1_w": 0.95, "fc2_w": 0.95, "fc3_w": 0.95}
    target = (sizes[2] + sizes[3]) // 2  # between two frontier points: the later one is the answer
    found = S.search(pair.model, pair.records, arrays, "prune", target, PRUNE_VALUES, then=then)
    assert found.reached and found.chosen == walk.frontier[3] and found.frontier == walk.frontier[:4]
    assert found.chosen.packed_bytes <= target

    recipe = S.recipe_for("prune", found.chosen.settings, {}, then, input=path, validate=data, max_drop=1.0)
    text_path = tmp_path / "r.toml"
    text_path.write_text(dump_recipe(recipe, tmp_path))
    loaded = load_recipe(text_path)
    assert [s.command for s in loaded.steps] == ["prune", "cluster", "huffman"]
    assert loaded.input == tmp_path / "wide.onnx" and loaded.validate == tmp_path / "wide.npz"
    final, records, _ = run_steps(pair.model, pair.records, list(loaded.steps), size_last=False)
    write_pair(final, list(records.values()), tmp_path / "small.onnx")
    written = load_pair(tmp_path / "small.onnx")
    assert packed_size(written) == found.chosen.packed_bytes
    assert top1_accuracy(written.runnable(), arrays) == found.chosen.accuracy


def test_search_is_deterministic_and_the_ranked_path_reaches_the_target(wide):
    path, data = wide
    pair, arrays = load_pair(path), load_npz(data)
    then = [parse_step_spec("huffman")]
    first = S.search(pair.model, pair.records, arrays, "cluster", 7000, [8, 5, 3], then=then)
    again = S.search(pair.model, pair.records, arrays, "cluster", 7000, [8, 5, 3], then=then)
    assert first.to_dict() == again.to_dict() and first.reached
    # more layers than candidates: the single-layer table ranks the moves, one is measured per step
    ranked = S.search(pair.model, pair.records, arrays, "cluster", 7000, [8, 5, 3], then=then, candidates=1)
    assert ranked.reached and ranked.chosen.packed_bytes <= 7000
    assert ranked.frontier[0] == first.frontier[0]


# --- the command ---------------------------------------------------------------------------------

def test_cli_table_json_recipe_and_plot(wide, tmp_path):
    path, data = wide
    recipe, plot = tmp_path / "r.toml", tmp_path / "curves.png"
    result = invoke(path, "-d", data, "-m", "prune", "--values", "0,0.5,0.9", "--max-drop", "5",
                    "--then", "huffman", "--recipe", recipe, "--plot", plot, "--json")
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert report["values"] == [0, 0.5, 0.9] and [layer["name"] for layer in report["layers"]] == ["fc1_w", "fc2_w", "fc3_w"]
    assert report["baseline_accuracy"] == 1.0
    chosen = report["chosen"]
    assert all(layer["points"][0]["drop_pp"] == 0 for layer in report["layers"])
    loaded = load_recipe(recipe)
    assert loaded.max_drop == 5.0 and loaded.input == path and [s.command for s in loaded.steps][-1] == "huffman"
    if chosen:
        assert loaded.steps[0].command == "prune"
        assert {glob: v for glob, v in loaded.steps[0].config.sparsity.overrides} == chosen
        assert loaded.steps[0].config.sparsity.default is None  # other layers are left alone
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the rich table: one row per layer, the accuracy in %
    text = invoke(path, "-d", data, "-m", "prune", "--values", "0,0.9")
    assert text.exit_code == 0 and "fc2_w" in text.stdout and "100.0" in text.stdout


def test_cli_search_writes_the_chosen_recipe_and_frontier_plot(wide, tmp_path):
    path, data = wide
    recipe, frontier = tmp_path / "r.toml", tmp_path / "frontier.svg"
    result = invoke(path, "-d", data, "-m", "cluster", "--values", "8,5,3", "--then", "huffman",
                    "--target-bytes", "7000", "--max-drop", "100", "--recipe", recipe, "--frontier-plot", frontier, "--json")
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert report["reached"] and report["ok"] and report["chosen"]["packed_bytes"] <= 7000
    loaded = load_recipe(recipe)
    pair = load_pair(path)
    final, records, _ = run_steps(pair.model, pair.records, list(loaded.steps), size_last=False)
    write_pair(final, list(records.values()), tmp_path / "small.onnx")
    assert packed_size(load_pair(tmp_path / "small.onnx")) == report["chosen"]["packed_bytes"]
    assert frontier.read_text().lstrip().startswith("<?xml")
    text = invoke(path, "-d", data, "-m", "cluster", "--values", "8,5,3", "--then", "huffman", "--target-ratio", "2",
                  "--max-drop", "100")
    assert text.exit_code == 0 and "frontier" in text.stdout and "chosen" in text.stdout


def test_a_recipe_searched_on_unlabelled_data_runs_and_validates_on_labelled_data(wide, tmp_path):
    path, data = wide
    unlabelled, recipe = tmp_path / "calib.npz", tmp_path / "r.toml"
    np.savez(unlabelled, x=np.load(data)["x"])
    result = invoke(path, "-d", unlabelled, "-m", "cluster", "--values", "8,5,3", "--then", "huffman",
                    "--target-bytes", "7000", "--max-drop", "100", "--recipe", recipe, "--quiet")
    assert result.exit_code == 0, result.output + result.stderr
    loaded = load_recipe(recipe)
    assert loaded.validate is None and loaded.max_drop is None  # unlabelled data cannot validate a run
    assert "agreement" in recipe.read_text()
    done = runner.invoke(app, ["run", str(recipe), "-o", str(tmp_path / "s.onnx"), "--validate", str(data), "--quiet"])
    assert done.exit_code == 0, done.output + done.stderr


def test_cli_unreachable_target_exits_1_and_writes_no_recipe(wide, tmp_path):
    path, data = wide
    recipe = tmp_path / "r.toml"
    result = invoke(path, "-d", data, "-m", "prune", "--values", "0,0.9", "--target-bytes", "10", "--recipe", recipe)
    assert result.exit_code == 1
    assert "cannot be reached" in result.stderr and "most aggressive point" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "frontier" in result.stdout  # the frontier is still shown
    assert not recipe.exists()


def test_cli_reached_but_too_lossy_exits_1(wide, tmp_path):
    path, data = wide
    result = invoke(path, "-d", data, "-m", "prune", "--values", "0,0.95", "--target-ratio", "1.5", "--max-drop", "0",
                    "--recipe", tmp_path / "r.toml")
    assert result.exit_code == 1 and "more than --max-drop 0" in result.stderr
    assert not (tmp_path / "r.toml").exists()


@pytest.mark.parametrize("args, message", [
    (["-m", "squash"], "--method 'squash'"),
    (["-m", "prune", "--values", "0.5,1.5"], "--values 1.5"),
    (["-m", "cluster", "--values", "0,4"], "--values 0"),
    (["-m", "prune", "--values", "0.5,abc"], "is not a number"),
    (["-m", "prune", "--option", "scope=global"], "scope must stay 'layer'"),
    (["-m", "prune", "--option", "sparsity=0.5"], "give --values instead"),
    (["-m", "prune", "--option", "layers=fc1*"], "use --layers"),
    (["-m", "prune", "--option", "nonsense"], "KEY=VALUE"),
    (["-m", "prune", "--target-ratio", "10", "--target-bytes", "1000"], "not both"),
    (["-m", "prune", "--target-ratio", "0"], "must be a positive number"),
    (["-m", "prune", "--target-ratio", "-3"], "must be a positive number"),
    (["-m", "prune", "--target-bytes", "0"], "must be a positive number of bytes"),
    (["-m", "prune", "--target-bytes", "lots"], "--target-bytes 'lots'"),
    (["-m", "prune", "--frontier-plot", "f.png"], "needs --target-ratio or --target-bytes"),
    (["-m", "prune", "--plot", "curves.gif"], "a plot must end in"),
    (["-m", "prune", "--recipe", "r.txt"], "should end in .toml"),
    (["-m", "prune", "--max-drop", "-1"], "must be 0 or more"),
    (["-m", "prune", "--then", "squeeze hard=1"], "unknown command"),
    (["-m", "prune", "--layers", "nothing*"], "no weight tensors match"),
])
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(wide, tmp_path, monkeypatch, args, message):
    path, data = wide
    monkeypatch.chdir(tmp_path)
    before = files(tmp_path)
    result = invoke(path, "-d", data, *args)
    assert result.exit_code == 2, result.output + result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert files(tmp_path) == before


def test_cli_refuses_an_existing_recipe_without_force(wide, tmp_path):
    path, data = wide
    recipe = tmp_path / "r.toml"
    recipe.write_text("# mine\n")
    result = invoke(path, "-d", data, "-m", "prune", "--values", "0,0.5", "--recipe", recipe)
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert recipe.read_text() == "# mine\n"
    forced = invoke(path, "-d", data, "-m", "prune", "--values", "0,0.5", "--recipe", recipe, "--force", "--max-drop", "100")
    assert forced.exit_code == 0, forced.stderr
    assert load_recipe(recipe).steps[0].command == "prune"


def test_unlabelled_data_scores_agreement_with_the_original(wide, tmp_path):
    """Without `y`, the metric is top-1 agreement with the model's own predictions: the baseline is
    exactly 100%, and a layer pruned away entirely agrees less."""
    path, data = wide
    unlabelled = tmp_path / "x.npz"
    np.savez(unlabelled, x=np.load(data)["x"])
    result = invoke(path, "-d", unlabelled, "-m", "prune", "--values", "0,0.99", "--json", "--quiet")
    assert result.exit_code == 0, result.output + result.stderr
    table = json.loads(result.stdout)
    assert table["baseline_accuracy"] == 1.0
    points = [{p["value"]: p["accuracy"] for p in layer["points"]} for layer in table["layers"]]
    assert all(p[0] == 1.0 for p in points)
    assert min(p[0.99] for p in points) < 1.0


def test_help_shows_examples():
    result = runner.invoke(app, ["sensitivity", "--help"])
    assert result.exit_code == 0
    assert "--target-ratio" in result.stdout and "Examples" in result.stdout and "Exit 1" in result.stdout


def test_the_installed_command_line_has_the_command():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "modelsqueeze", "sensitivity", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--target-bytes" in result.stdout
