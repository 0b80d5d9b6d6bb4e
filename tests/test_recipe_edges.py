"""Edge cases of recipes, pipeline/run, sensitivity, the report gate and plots that a demanding
user hits: odd TOML, recipes that would not read back, duplicate options, outputs that would
destroy the recipe, folders that take no files, settings that make a model bigger."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

import modelsqueeze.cli_sensitivity  # noqa: F401  (registers the sensitivity command)
from modelsqueeze import plots
from modelsqueeze import sensitivity as S
from cli_helpers import invoke, refused
from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.recipe import Recipe, RecipeError, dump_recipe, load_recipe, make_step, parse_recipe, parse_step_spec







def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


RECIPE = 'input = "mlp.onnx"\noutput = "out.onnx"\n'


# --- recipe parsing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ('version = true\n[[step]]\ncommand = "huffman"\n', "recipe version True"),
    ('[[step]]\ncommand = "prune"\nsparsity = 0.5\nversion = true\n', "version = True"),
    ('[[step]]\ncommand = ["prune"]\nsparsity = 0.5\n', "expected a string"),
    ('[[step]]\ncommand = { a = 1 }\n', "expected a string"),
    ('[[step]]\ncommand = "prune"\nsparsity = 0.5\nmin-params = 1\nmin_params = 2\n', "given twice"),
    ('output = "\\u0000x.onnx"\n[[step]]\ncommand = "huffman"\n', "NUL"),
])
def test_bad_recipes_are_one_recipe_error(text, message):
    with pytest.raises(RecipeError, match=message) as info:
        parse_recipe(text, "r.toml")
    assert str(info.value).startswith("r.toml:")


def test_a_command_that_is_not_a_string_is_exit_2_in_run(tmp_path, mlp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE + '[[step]]\ncommand = ["prune"]\nsparsity = 0.5\n')
    before = files(tmp_path)
    assert "r.toml:4: step 1: command" in refused("run", recipe)
    assert files(tmp_path) == before


def test_an_output_that_is_the_recipe_itself_is_refused_even_with_force(tmp_path, mlp_path):
    recipe = tmp_path / "r.toml"
    text = 'input = "mlp.onnx"\noutput = "r.toml"\n[[step]]\ncommand = "prune"\nsparsity = 0.5\n'
    recipe.write_text(text)
    with pytest.raises(RecipeError, match="r.toml:2: output .* is this recipe file"):
        load_recipe(recipe)
    assert "is this recipe file" in refused("run", recipe, "--force")
    assert recipe.read_text() == text and not (tmp_path / "r.msq").exists()
    # a recipe named like the output's sidecar would be overwritten by it
    sidecar = tmp_path / "out.msq"
    sidecar.write_text(RECIPE + '[[step]]\ncommand = "huffman"\n')
    with pytest.raises(RecipeError, match="is this recipe file"):
        load_recipe(sidecar)


# --- steps from text ------------------------------------------------------------------------------

def test_step_spec_keeps_quoted_spaces_and_arrays_together():
    step = parse_step_spec('cluster bits="fc1*=4, 3" layers=["fc1*", "fc2*"]')
    assert step.config.bits.overrides == (("fc1*", 4.0),) and step.config.bits.default == 3.0
    assert step.config.selection.layers == ("fc1*", "fc2*")
    assert parse_step_spec("prune sparsity='fc1*=0.9,0.8'").config.sparsity.default == 0.8
    with pytest.raises(ModelSqueezeError, match="unclosed"):
        parse_step_spec('cluster bits="4')


@pytest.mark.parametrize("spec", ["cluster bits=4 bits=5", "cluster bits=4 min-params=1 min_params=5"])
def test_step_spec_refuses_an_option_given_twice(spec):
    with pytest.raises(ModelSqueezeError, match="given twice"):
        parse_step_spec(spec)


# --- recipes written read back as what ran --------------------------------------------------------

def test_a_repeated_glob_is_written_with_the_value_that_applies():
    step = make_step("prune", {"sparsity": "fc1*=0.5,fc1*=0.9,0.1"})
    back = parse_recipe(dump_recipe(Recipe((step,))))
    rule = back.steps[0].config.sparsity
    assert rule.overrides == (("fc1*", 0.5),) and rule.default == 0.1  # the first match wins, as it ran


def test_a_glob_spelled_default_stays_a_glob(mlp):
    step = make_step("cluster", {"bits": "default=3"})  # a tensor named `default`, not the rest
    back = parse_recipe(dump_recipe(Recipe((step,)))).steps[0]
    assert back.config.bits.default is None and back.config.bits.overrides == (("[d]efault", 3.0),)
    # and it changes the same tensors as the step that was dumped (here: none of the MLP's)
    assert step.apply(mlp, {}).changed == back.apply(mlp, {}).changed == []


def test_non_bmp_control_characters_read_back():
    glob = "\U000e0001fc*"  # not printable, beyond U+FFFF: needs \U, not \u
    step = make_step("prune", {"sparsity": 0.5, "layers": [glob]})
    assert parse_recipe(dump_recipe(Recipe((step,)))).steps[0].config.selection.layers == (glob,)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_drop": float("nan")}, "--max-drop nan"),
    ({"max_drop": -1.0}, "--max-drop -1"),
    ({"input": Path("bad\udcff.onnx")}, "not valid UTF-8"),
])
def test_a_recipe_that_could_not_be_read_back_is_refused(kwargs, message):
    with pytest.raises(ModelSqueezeError, match=message):
        Recipe((make_step("huffman", {}),), **kwargs)


def test_dry_run_refuses_a_max_drop_the_recipe_could_not_hold(mlp_path):
    assert "--max-drop nan" in refused("pipeline", mlp_path, "-o", "x.onnx", "--prune", "0.5", "--max-drop", "nan", "--dry-run")


def test_save_recipe_refuses_a_model_path_toml_cannot_name_before_writing(tmp_path, mlp_path):
    model = tmp_path / "bad\udcff.onnx"
    model.write_bytes(mlp_path.read_bytes())
    before = files(tmp_path)
    assert "not valid UTF-8" in refused("pipeline", model, "-o", tmp_path / "out.onnx", "--prune", "0.5",
                                        "--save-recipe", tmp_path / "r.toml")
    assert files(tmp_path) == before


# --- sensitivity ----------------------------------------------------------------------------------

def test_best_settings_leave_alone_a_layer_no_setting_makes_smaller():
    values = [0.9, 0.5]
    result = S.SensitivityResult(
        method="svd", setting="energy", values=values, layers=[("lstm", 10), ("fc", 10), ("bias", 10)],
        baseline_accuracy=0.9, baseline_bytes=1000,
        accuracy={k: {0.9: 0.9, 0.5: 0.9} for k in ("lstm", "fc", "bias")},
        bytes={"lstm": {0.9: 1064, 0.5: 1064},  # cannot be factored: only a sidecar is added
               "fc": {0.9: 900, 0.5: 800},
               "bias": {0.9: 1000, 0.5: 990}},  # the gentle value saves nothing, the aggressive one does
    )
    assert S.best_settings(result, 1.0) == {"fc": 0.5, "bias": 0.5}


# --- sensitivity command: options, folders that take no files, messages ----------------------------

def test_sensitivity_option_given_twice(mlp_path, mlp_data):
    assert "given twice" in refused("sensitivity", mlp_path, "-d", mlp_data, "-m", "cluster",
                                    "--option", "seed=1", "--option", "seed=2")



@pytest.fixture
def unwritable(tmp_path, monkeypatch):
    """A folder where creating a file fails (as a read-only folder does for a non-root user)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return folder


def test_plot_into_a_folder_that_takes_no_files(unwritable, mlp_path):
    with pytest.raises(ModelSqueezeError, match="cannot write in"):
        plots.check_plot_path(unwritable / "p.png")
    assert "cannot write in" in refused("report", mlp_path, "--plot", unwritable / "p.png")
    assert files(unwritable) == set()


def test_sensitivity_recipe_into_a_folder_that_takes_no_files(unwritable, mlp_path, mlp_data):
    assert "cannot write in" in refused("sensitivity", mlp_path, "-d", mlp_data, "-m", "prune",
                                        "--values", "0.5", "--recipe", unwritable / "r.toml")
    assert files(unwritable) == set()


def test_a_failing_plot_write_is_one_error(tmp_path, mlp_path, mlp_data, monkeypatch):
    from matplotlib.figure import Figure

    def broken(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken)
    plot = tmp_path / "curves.png"
    line = refused("sensitivity", mlp_path, "-d", mlp_data, "-m", "prune", "--values", "0.5", "--plot", plot)
    assert line == f"error: {plot}: cannot write it: No space left on device (nothing was replaced)" and not plot.exists()


def test_an_unreachable_target_does_not_claim_the_plot_was_not_written(tmp_path, mlp_path, mlp_data):
    plot = tmp_path / "f.png"
    line = refused("sensitivity", mlp_path, "-d", mlp_data, "-m", "prune", "--values", "0.5",
                   "--target-bytes", "1", "--frontier-plot", plot, "--quiet", code=1)
    assert "no recipe written" in line and "nothing written" not in line
    assert plot.exists()


# --- report gate ----------------------------------------------------------------------------------

def test_baseline_json_of_zero_bytes_is_bad_input(tmp_path, mlp_path):
    size = tmp_path / "size.json"
    size.write_text(json.dumps({"packed_bytes": 0}))
    assert "packed_bytes is 0" in refused("report", mlp_path, "--baseline-json", size, "--max-growth", "1")


def test_baseline_json_with_a_byte_order_mark_is_read(tmp_path, mlp_path):
    size = tmp_path / "size.json"
    size.write_bytes(b"\xef\xbb\xbf" + json.dumps({"packed_bytes": 10**9}).encode())
    result = invoke("report", mlp_path, "--baseline-json", size, "--max-growth", "0", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["previous_bytes"] == 10**9
