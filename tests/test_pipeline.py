"""pipeline and run: recipes parse (or fail naming the line), per-layer overrides apply, and several
steps in one call write exactly the files that one command per step writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import invoke, ok, refused
from conftest import SAMPLES
from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.model import find_weights
from modelsqueeze.pack import load_pair, packed_size
from modelsqueeze.recipe import Recipe, dump_recipe, load_recipe, make_step, parse_recipe, parse_step_spec

LENET300 = SAMPLES / "lenet300.onnx"
LENET300_DATA = SAMPLES / "lenet300.npz"
LENET5 = SAMPLES / "lenet5.onnx"








def same_files(a: Path, b: Path) -> None:
    assert a.read_bytes() == b.read_bytes()
    assert a.with_suffix(".msq").read_bytes() == b.with_suffix(".msq").read_bytes()


# --- equivalence with one command per step -------------------------------------------------------

CHAINS = {
    "deep compression": (
        ["--prune", "0.6", "--prune-scope", "global", "--bits", "4", "--huffman"],
        [["prune", "--sparsity", "0.6", "--scope", "global"], ["cluster", "--bits", "4"], ["huffman"]],
    ),
    "per-layer rules": (
        ["--prune", "fc1*=0.9,0.5", "--bits", "fc3*=6,3", "--min-params", "2000"],
        [["prune", "--sparsity", "fc1*=0.9,0.5", "--min-params", "2000"], ["cluster", "--bits", "fc3*=6,3", "--min-params", "2000"]],
    ),
    "svd + int4 + huffman": (
        ["--svd-energy", "0.9", "--quantize", "4", "--huffman"],
        [["svd", "--energy", "0.9"], ["quantize", "--bits", "4"], ["huffman"]],
    ),
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_pipeline_writes_the_same_files_as_one_command_per_step(tmp_path, chain):
    flags, commands = CHAINS[chain]
    ok("pipeline", LENET300, "-o", tmp_path / "all.onnx", *flags)
    current = LENET300
    for i, command in enumerate(commands):
        nxt = tmp_path / f"step{i}.onnx"
        ok(command[0], current, "-o", nxt, *command[1:])
        current = nxt
    same_files(tmp_path / "all.onnx", current)


def test_recipe_run_equals_pipeline_and_its_saved_recipe(tmp_path):
    summary = ok("pipeline", LENET5, "-o", tmp_path / "p.onnx", "--prune", "0.7", "--bits", "4", "--huffman",
                 "--validate", SAMPLES / "lenet5.npz", "--save-recipe", tmp_path / "r.toml")
    recipe = load_recipe(tmp_path / "r.toml")
    assert [s.command for s in recipe.steps] == ["prune", "cluster", "huffman"]
    assert recipe.input.resolve() == LENET5.resolve() and recipe.validate.resolve() == (SAMPLES / "lenet5.npz").resolve()
    again = ok("run", tmp_path / "r.toml", "-o", tmp_path / "r.onnx")
    same_files(tmp_path / "p.onnx", tmp_path / "r.onnx")
    # The per-step table: sizes shrink step by step and the last one is the file's packed size.
    sizes = [s["packed_bytes"] for s in summary["steps"]]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[-1] == packed_size(load_pair(tmp_path / "p.onnx")) == summary["packed_bytes_after"]
    assert summary["steps"][-1]["accuracy"] == summary["accuracy_after"] == again["accuracy_after"]


def test_intermediate_sizes_are_what_the_single_commands_write(tmp_path):
    summary = ok("pipeline", LENET300, "-o", tmp_path / "all.onnx", "--prune", "0.8", "--bits", "5")
    ok("prune", LENET300, "-o", tmp_path / "p.onnx", "--sparsity", "0.8")
    assert summary["steps"][0]["packed_bytes"] == packed_size(load_pair(tmp_path / "p.onnx"))


# --- per-layer overrides ---------------------------------------------------------------------------

def test_recipe_per_layer_overrides_by_glob(tmp_path):
    (tmp_path / "r.toml").write_text(f'''
input = "{LENET300}"
output = "out.onnx"

[[step]]
command = "prune"
sparsity = {{ "fc1*" = 0.9, "fc3*" = 0.25, default = 0.5 }}

[[step]]
command = "cluster"
[step.bits]
"fc1*" = 3
default = 5
''')
    ok("run", tmp_path / "r.toml")
    pair = load_pair(tmp_path / "out.onnx")
    weights = {w.name: w.array() for w in find_weights(pair.model) if w.role == "weight"}
    expected = {"fc1.weight": 0.9, "fc2.weight": 0.5, "fc3.weight": 0.25}
    for name, sparsity in expected.items():
        n = weights[name].size
        assert np.count_nonzero(weights[name] == 0) == round(sparsity * n), name
    assert pair.records["fc1.weight"].codebook.size <= 2**3
    assert pair.records["fc2.weight"].codebook.size == 2**5


# --- recipe parsing --------------------------------------------------------------------------------

BAD_RECIPES = [
    ('[[step]]\ncommand = "prune"\nsparsty = 0.5\n', 3, "unknown option 'sparsty' (did you mean 'sparsity'?)"),
    ('[[step]]\ncommand = "prune"\nsparsity = 1.5\n', 3, "--sparsity values must lie in [0, 1]"),
    ('[[step]]\ncommand = "prun"\n', 2, "unknown command 'prun' (did you mean 'prune'?)"),
    ('outptu = "x.onnx"\n[[step]]\ncommand = "huffman"\n', 1, "unknown key 'outptu' (did you mean 'output'?)"),
    ('[[step]]\ncommand = "prune"\nsparsity = 0.5\n\n[[step]]\ncommand = "cluster"\n\nbits = 40\n', 8, "step 2 (cluster): --bits must be whole numbers"),
    ('[[step]]\ncommand = "cluster"\nbits = { "fc1*" = "four" }\n', 3, "is not a finite number"),
    ('[[step]]\ncommand = "prune"\nsparsity = 0.5\nscope = 3\n', 4, "--scope: expected a string, got 3"),
    ('[[step]]\ncommand = "prune"\nsparsity = 0.5\nshrink = "yes"\n', 4, "--shrink: expected true or false"),
    ('[[step]]\nsparsity = 0.5\n', 1, "step 1: no command"),
    ('version = 2\n[[step]]\ncommand = "huffman"\n', 1, "recipe version 2"),
    ('input = "a.onnx"\n', 1, "no steps"),
    ('step = 3\n', 1, "`step` must be an array of tables"),
    ('[[step]]\ncommand = "huffman"\n[[step]\n', 3, "not valid TOML"),
    ('max_drop = -1\n[[step]]\ncommand = "huffman"\n', 1, "max_drop = -1"),
    ('[[step]]\ncommand = "quantize"\nbits = 9\n', 3, "--bits 9: expected 2 to 8"),
    ('[[step]]\ncommand = "svd"\nenergy = 0.9\nrank = 4\n', 3, "svd"),
]


@pytest.mark.parametrize("text, line, message", BAD_RECIPES)
def test_bad_recipes_name_the_line(tmp_path, text, line, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    error = refused("run", path, "--input", LENET300, "-o", tmp_path / "out.onnx")
    assert error.startswith(f"error: {path}:{line}: "), error
    assert message in error
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "out.msq").exists()


@pytest.mark.parametrize("content, message", [
    (None, "not found"), (b"\xff\xfe\x00bad", "not UTF-8"),
])
def test_unreadable_recipes(tmp_path, content, message):
    path = tmp_path / "r.toml"
    if content is not None:
        path.write_bytes(content)
    assert message in refused("run", path, "--input", LENET300, "-o", tmp_path / "o.onnx")


def test_run_needs_input_and_output(tmp_path):
    (tmp_path / "r.toml").write_text('[[step]]\ncommand = "huffman"\n')
    assert "no `input`" in refused("run", tmp_path / "r.toml", "-o", tmp_path / "o.onnx")
    assert "no `output`" in refused("run", tmp_path / "r.toml", "--input", LENET300)


def test_recipe_paths_are_relative_to_the_recipe(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    shutil.copy(LENET300, tmp_path / "m.onnx")
    (folder / "r.toml").write_text('input = "../m.onnx"\noutput = "../small.onnx"\n[[step]]\ncommand = "cluster"\nbits = 4\n')
    ok("run", folder / "r.toml")
    assert (tmp_path / "small.onnx").exists() and (tmp_path / "small.msq").exists()


def test_dump_and_parse_round_trip(tmp_path):
    recipe = Recipe(
        (
            make_step("svd", {"rank": {"fc1*": 32, "default": 16}, "min_params": 1000}),
            make_step("prune", {"nm": "2:4", "layers": ["fc*", "conv[12]"], "exclude": "fc3*"}),
            make_step("cluster", {"clusters": 'a"b\\*=12,7', "init": "linear", "seed": 3}),
            make_step("quantize", {"bits": 4, "granularity": "block", "block_size": 64, "signed": False, "percentile": 99.5}),
            make_step("huffman", {"max_unique": 16}),
        ),
        tmp_path / "in.onnx", tmp_path / "sub" / "out.onnx", None, 0.5,
    )
    text = dump_recipe(recipe, tmp_path, "a comment\nover two lines")
    assert parse_recipe(text, base=tmp_path) == recipe


def test_step_specs():
    assert parse_step_spec("cluster bits=5 init=linear layers=fc*") == make_step(
        "cluster", {"bits": 5, "init": "linear", "layers": ["fc*"]})
    assert parse_step_spec("prune sparsity='fc1*=0.9,0.8'").config.sparsity.overrides == (("fc1*", 0.9),)
    for bad, message in [("", "empty step"), ("cluster 5", "not key=value"), ("cluster bits=5 bogus=1", "unknown option"),
                         ("zip level=9", "unknown command")]:
        with pytest.raises(ModelSqueezeError, match=message):
            parse_step_spec(bad)


# --- the pipeline command's own refusals ------------------------------------------------------------

def test_pipeline_refusals_write_nothing(tmp_path):
    out = tmp_path / "o.onnx"
    assert "no steps" in refused("pipeline", LENET300, "-o", out)
    assert "not both" in refused("pipeline", LENET300, "-o", out, "--bits", "4", "--quantize", "8")
    (tmp_path / "keep.toml").write_text("precious")
    assert "already exists" in refused("pipeline", LENET300, "-o", out, "--bits", "4", "--save-recipe", tmp_path / "keep.toml")
    assert (tmp_path / "keep.toml").read_text() == "precious"
    assert not out.exists() and not out.with_suffix(".msq").exists()


def test_a_failing_step_names_itself_and_the_steps_before(tmp_path):
    error = refused("pipeline", LENET300, "-o", tmp_path / "o.onnx", "--prune", "0.5", "--bits", "4", "--layers", "nothing*")
    assert "step 1 prune" in error and "no weight tensors match" in error
    (tmp_path / "r.toml").write_text(f'input = "{LENET300}"\noutput = "o.onnx"\n[[step]]\ncommand = "prune"\nsparsity = 0.5\n'
                                     '[[step]]\ncommand = "cluster"\nbits = 4\nlayers = "nothing*"\n')
    error = refused("run", tmp_path / "r.toml")
    assert "step 2 cluster (after prune)" in error
    assert not (tmp_path / "o.onnx").exists()


def test_pipeline_max_drop_fails_and_writes_nothing(tmp_path):
    error = refused("pipeline", LENET300, "-o", tmp_path / "o.onnx", "--prune", "0.97", "--bits", "2",
                    "--validate", LENET300_DATA, "--max-drop", "1", code=1)
    assert "more than --max-drop 1" in error and "nothing written" in error
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "o.msq").exists()


def test_dry_run_prints_a_recipe_and_touches_nothing(tmp_path):
    result = invoke("pipeline", LENET300, "-o", tmp_path / "o.onnx", "--prune", "fc1*=0.9,0.5", "--bits", "5", "--huffman", "--dry-run")
    assert result.exit_code == 0, result.output
    recipe = parse_recipe(result.stdout, base=Path.cwd())
    assert [s.command for s in recipe.steps] == ["prune", "cluster", "huffman"]
    assert recipe.steps[0].config.sparsity.overrides == (("fc1*", 0.9),)
    assert list(tmp_path.iterdir()) == []


def test_progress_view_shows_steps_and_tensors(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from modelsqueeze import cli

    screen = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=screen, force_terminal=True, width=120))
    result = invoke("pipeline", LENET300, "-o", tmp_path / "o.onnx", "--prune", "0.5", "--bits", "4", "--huffman")
    assert result.exit_code == 0, result.output
    shown = screen.getvalue()
    for text in ("step 1/3 prune", "step 3/3 huffman", "cluster: tensors", "3/3"):
        assert text in shown, text


def test_recipe_targets_never_land_on_the_command_s_own_files(tmp_path):
    out = tmp_path / "s.toml"
    assert "would overwrite" in refused("pipeline", LENET300, "-o", out, "--prune", "0.5", "--save-recipe", out, "--force")
    assert not out.exists() and not out.with_suffix(".msq").exists()
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'input = "{LENET300}"\n[[step]]\ncommand = "huffman"\n')
    before = recipe.read_bytes()
    assert "would overwrite the recipe" in refused("run", recipe, "-o", recipe, "--force")
    assert recipe.read_bytes() == before


def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    import os

    if os.access("/proc", os.W_OK) and os.geteuid() != 0:  # pragma: no cover - /proc is never writable
        raise AssertionError("expected /proc to refuse new files")
    assert "cannot write" in refused("pipeline", LENET300, "-o", "/proc/a.onnx", "--prune", "0.5")
    assert "cannot write" in refused("pipeline", LENET300, "-o", tmp_path / "a.onnx", "--prune", "0.5", "--save-recipe", "/proc/r.toml")
    assert list(tmp_path.iterdir()) == []


def test_pipeline_flags_without_their_step_are_refused(tmp_path):
    out = tmp_path / "o.onnx"
    assert "--prune-scope needs --prune" in refused("pipeline", LENET300, "-o", out, "--bits", "4", "--prune-scope", "global")
    assert "--granularity needs --quantize" in refused("pipeline", LENET300, "-o", out, "--bits", "4", "--granularity", "block")
    assert "--prune-scope 'foo'" in refused("pipeline", LENET300, "-o", out, "--prune", "0.5", "--prune-scope", "foo")


def test_report_plot_does_not_overwrite_without_force(tmp_path):
    plot = tmp_path / "w.png"
    plot.write_bytes(b"keep")
    assert "already exists" in refused("report", LENET300, "--plot", plot)
    assert plot.read_bytes() == b"keep"
    result = invoke("report", LENET300, "--plot", plot, "--force", "--quiet")
    assert result.exit_code == 0 and plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("model, flags", [
    (LENET300, ["--prune", "0.6", "--prune-scope", "global", "--bits", "4", "--huffman"]),
    (LENET5, ["--bits", "fc1*=3,5", "--huffman"]),
    (LENET300, ["--prune", "0.8", "--prune-scope", "global", "--bits", "3", "--huffman",
                "--calibration", SAMPLES / "lenet300_calib.npz"]),
])
def test_the_output_does_not_depend_on_jobs(tmp_path, model, flags):
    ok("pipeline", model, "-o", tmp_path / "one.onnx", *flags, "--jobs", "1")
    ok("pipeline", model, "-o", tmp_path / "four.onnx", *flags, "--jobs", "4")
    same_files(tmp_path / "one.onnx", tmp_path / "four.onnx")


def test_jobs_must_be_positive(tmp_path):
    assert "--jobs 0" in refused("cluster", LENET300, "-o", tmp_path / "o.onnx", "--bits", "4", "--jobs", "0")


def test_a_model_too_large_for_protobuf_is_one_error_line(tmp_path, monkeypatch):
    """Models over 2 GB cannot be serialized once their weights are in memory (protobuf's limit):
    one error line, exit 2, not a traceback (compressing them is open work, see README)."""
    from google.protobuf.message import EncodeError

    from modelsqueeze import cli

    def too_large(*args, **kwargs):
        raise EncodeError("Failed to serialize proto")

    monkeypatch.setattr(cli, "run_steps", too_large)
    assert "over protobuf's 2 GB limit" in refused("cluster", LENET300, "-o", tmp_path / "o.onnx", "--bits", "4")
    assert not (tmp_path / "o.onnx").exists()
