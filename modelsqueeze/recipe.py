"""Steps and recipes: one vocabulary for CLI flags, TOML recipes and the Python API.

A step is a command name and that command's frozen config; a recipe is an ordered list of steps
plus where to read, write and validate. Recipe keys are the command-line option names (`min_params`
or `min-params`), values are the same too, and a per-layer value is a table of globs:

    input = "../sample_models/lenet300.onnx"   # paths are relative to the recipe file
    output = "../out/lenet300_small.onnx"
    validate = "../sample_models/lenet300.npz"
    max_drop = 1.0

    [[step]]
    command = "prune"
    sparsity = { "fc1*" = 0.95, default = 0.8 }   # first matching glob wins; default: the rest
    scope = "layer"

    [[step]]
    command = "cluster"
    bits = 5

    [[step]]
    command = "huffman"
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import onnx

from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.files import read_input
from modelsqueeze.passes import LayerRule, PassResult, Selection
from modelsqueeze.tensor import CompressedTensor

RECIPE_VERSION = 1

# command -> (module, config class, pass function); imported on first use.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prune": ("modelsqueeze.passes.prune", "PruneConfig", "prune"),
    "cluster": ("modelsqueeze.passes.cluster", "ClusterConfig", "cluster"),
    "quantize": ("modelsqueeze.passes.quantize", "QuantizeConfig", "quantize"),
    "svd": ("modelsqueeze.passes.svd", "SvdConfig", "svd"),
    "huffman": ("modelsqueeze.passes.huffman", "HuffmanConfig", "huffman"),
}
SELECTION_KEYS = ("layers", "exclude", "min_params")
PATH_OPTIONS = ("calibration",)  # step options naming files: relative to the recipe's folder
TOP_KEYS = ("version", "input", "output", "validate", "max_drop", "metric", "min_snr", "step")


class RecipeError(ModelSqueezeError):
    """A recipe that cannot be used; the message names the file and line."""


def config_class(command: str) -> type:
    module, cls, _ = COMMANDS[command]
    return getattr(importlib.import_module(module), cls)


@dataclass(frozen=True)
class Step:
    """One compression command and its options."""

    command: str
    config: Any

    def apply(self, model: onnx.ModelProto, records: dict[str, CompressedTensor]) -> PassResult:
        module, _, function = COMMANDS[self.command]
        return getattr(importlib.import_module(module), function)(model, records, self.config)


@dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...]
    input: Path | None = None
    output: Path | None = None
    validate: Path | None = None
    max_drop: float | None = None
    version: int = RECIPE_VERSION
    metric: str | None = None  # what validate measures (top1 | agreement | snr[:OUTPUT]); None: top1
    min_snr: float | None = None  # with metric snr: the floor, in dB

    def __post_init__(self) -> None:
        if self.metric is not None:
            from modelsqueeze.validate import Metric

            Metric.parse(self.metric)
        if self.min_snr is not None and (isinstance(self.min_snr, bool) or not isinstance(self.min_snr, (int, float))
                                         or not math.isfinite(self.min_snr)):
            raise ModelSqueezeError(f"--min-snr {self.min_snr}: expected a finite number of dB")
        # A recipe that could not be read back is refused before anything is written (pipeline
        # --dry-run and --save-recipe build one from flags).
        if self.max_drop is not None and (isinstance(self.max_drop, bool) or not isinstance(self.max_drop, (int, float))
                                          or not math.isfinite(self.max_drop) or self.max_drop < 0):
            raise ModelSqueezeError(f"--max-drop {self.max_drop}: expected a finite number of percentage points, 0 or more")
        for key in ("input", "output", "validate"):
            value = getattr(self, key)
            if value is not None:
                check_path_text(str(value), key)


def check_path_text(text: str, key: str) -> None:
    """Refuse a path no TOML recipe can hold (and no file system opens): a NUL character, or bytes
    that are not UTF-8 (Python carries them as lone surrogates)."""
    if "\0" in text:
        raise ModelSqueezeError(f"{key}: {text!r} contains a NUL character")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise ModelSqueezeError(f"{key}: {text!r} is not valid UTF-8, so a TOML recipe cannot name it; rename the file")


# --- options -> config ------------------------------------------------------------------------

def _fields(cls: type) -> dict[str, Any]:
    """Option name -> type for a config class (the selection's three keys stand for `selection`)."""
    hints = typing.get_type_hints(cls)
    out = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in ("selection", "version")}
    out.update(layers=list[str], exclude=list[str], min_params=int)
    return out


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(type, optional) from `X | None`."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), True
    return hint, False


def _rule(value: Any, option: str) -> LayerRule:
    if isinstance(value, bool):
        raise ModelSqueezeError(f"{option}: expected a number, a 'glob=value,...' string or a table of globs, got {value}")
    if isinstance(value, (int, float)):
        return LayerRule.parse(repr(value), option)
    if isinstance(value, str):
        return LayerRule.parse(value, option)
    if isinstance(value, dict):
        default, overrides = None, []
        for glob, number in value.items():
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
                raise ModelSqueezeError(f"{option}: {glob!r} = {number!r} is not a finite number")
            if glob == "default":
                default = float(number)
            else:
                overrides.append((glob, float(number)))
        if default is None and not overrides:
            raise ModelSqueezeError(f"{option}: an empty table gives no value")
        return LayerRule(default, tuple(overrides))
    raise ModelSqueezeError(f"{option}: expected a number, a 'glob=value,...' string or a table of globs")


def _convert(value: Any, hint: Any, option: str) -> Any:
    base, optional = _base_type(hint)
    if base is LayerRule:
        return _rule(value, option)
    if base is bool:
        if not isinstance(value, bool):
            raise ModelSqueezeError(f"{option}: expected true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelSqueezeError(f"{option}: expected a whole number, got {value!r}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ModelSqueezeError(f"{option}: expected a finite number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ModelSqueezeError(f"{option}: expected a string, got {value!r}")
        return value
    if typing.get_origin(base) is list:  # --layers / --exclude: one glob or a list of them
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ModelSqueezeError(f"{option}: expected a glob or a list of globs")
        return tuple(items)
    if typing.get_origin(base) is tuple:  # prune's nm = "2:4"
        from modelsqueeze.passes.prune import parse_nm

        if not isinstance(value, str):
            raise ModelSqueezeError(f"{option}: expected a string such as \"2:4\"")
        return parse_nm(value)
    raise ModelSqueezeError(f"{option}: unsupported option type {hint}")  # pragma: no cover - a new config field


def _key(name: str) -> str:
    return name.replace("-", "_")


def make_step(command: str, options: dict[str, Any]) -> Step:
    """The step `command` with `options` (recipe/CLI names, either spelling); unknown names,
    wrong types and invalid values are ModelSqueezeErrors naming the option."""
    if command not in COMMANDS:
        raise ModelSqueezeError(f"unknown command {command!r}: expected one of {', '.join(COMMANDS)}")
    cls = config_class(command)
    known = _fields(cls)
    values: dict[str, Any] = {}
    selection: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for name, value in options.items():
        key = _key(name)
        if key in spelled:
            raise ModelSqueezeError(f"option {name!r} is given twice (also as {spelled[key]!r})")
        spelled[key] = name
        if key == "version":
            if isinstance(value, bool) or value != cls.version:
                raise ModelSqueezeError(f"version = {value!r}: this modelsqueeze reads {command} options version {cls.version}")
            continue
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; {command} takes {', '.join(sorted(known))}"
            raise ModelSqueezeError(f"unknown option {name!r}{hint}")
        converted = _convert(value, known[key], "--" + key.replace("_", "-"))
        (selection if key in SELECTION_KEYS else values)[key] = converted
    return Step(command, cls(**values, selection=Selection(**selection)))


# --- config -> options ------------------------------------------------------------------------

def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else value


def step_options(step: Step) -> dict[str, Any]:
    """The options of `step` that differ from the defaults, in recipe vocabulary (a LayerRule
    becomes a number or a table of globs)."""
    cls = type(step.config)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "version":
            continue
        value = getattr(step.config, f.name)
        if f.name == "selection":
            for key in SELECTION_KEYS:
                sel = getattr(value, key)
                if sel != getattr(Selection(), key):
                    out[key] = list(sel) if isinstance(sel, tuple) else sel
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if value == default:
            continue
        if isinstance(value, LayerRule):
            if not value.overrides:
                value = _number(value.default)
            else:
                table = {}
                for glob, v in value.overrides:  # the first matching glob wins: a repeated one never applies
                    # a glob spelled `default` matches a tensor named so; the key `default` means the rest
                    table.setdefault("[d]efault" if glob == "default" else glob, _number(v))
                if value.default is not None:
                    table["default"] = _number(value.default)
                value = table
        elif f.name == "nm" and value is not None:
            value = f"{value[0]}:{value[1]}"
        out[f.name] = value
    return out


# --- TOML ---------------------------------------------------------------------------------------

def _line_of(text: str, step_index: int | None, key: str | None) -> int:
    """The 1-based line of `key` in step `step_index` (0-based; None: the top level), best effort."""
    lines = text.splitlines()
    start, end = 0, len(lines)
    headers = [i for i, line in enumerate(lines) if re.match(r"\s*\[\[\s*step\s*\]\]", line)]
    if step_index is not None and step_index < len(headers):
        start = headers[step_index]
        end = headers[step_index + 1] if step_index + 1 < len(headers) else len(lines)
    elif step_index is None and headers:
        end = headers[0]
    if key is not None:
        pattern = re.compile(rf"""\s*(\[\[?\s*step\.)?["']?{re.escape(key)}["']?\s*(=|\])""")
        for i in range(start, end):
            if pattern.match(lines[i]):
                return i + 1
        if "_" in key:
            return _line_of(text, step_index, key.replace("_", "-"))
    return start + 1


def _path(value: Any, key: str, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ModelSqueezeError(f"{key}: expected a file path string")
    check_path_text(value, key)
    return base / value


def parse_recipe(text: str, source: str = "<recipe>", base: Path = Path(".")) -> Recipe:
    """A Recipe from TOML text; every problem is a RecipeError `source:line: message`."""
    try:
        data = tomllib.loads(text)
    except RecursionError:  # tomllib recurses per nested array or inline table
        raise RecipeError(f"{source}: arrays or tables nested too deeply to be a recipe") from None
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = match.group(1) if match else "?"
        raise RecipeError(f"{source}:{line}: not valid TOML: {str(exc).split(' (at line')[0]}") from None

    def fail(message: str, step_index: int | None = None, key: str | None = None) -> RecipeError:
        return RecipeError(f"{source}:{_line_of(text, step_index, key)}: {message}")

    for key in data:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(key, TOP_KEYS, n=1)
            raise fail(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else
                                                 f"; a recipe has {', '.join(TOP_KEYS)}"), None, key)
    version = data.get("version", RECIPE_VERSION)
    if isinstance(version, bool) or version != RECIPE_VERSION:
        raise fail(f"recipe version {version!r}: this modelsqueeze reads version {RECIPE_VERSION}", None, "version")
    paths = {}
    for key in ("input", "output", "validate"):
        if key in data:
            try:
                paths[key] = _path(data[key], key, base)
            except ModelSqueezeError as exc:
                raise fail(str(exc), None, key) from None
    max_drop = data.get("max_drop")
    if max_drop is not None and (isinstance(max_drop, bool) or not isinstance(max_drop, (int, float))
                                 or not math.isfinite(max_drop) or max_drop < 0):
        raise fail(f"max_drop = {max_drop!r}: expected a number of percentage points, 0 or more", None, "max_drop")
    metric, min_snr = data.get("metric"), data.get("min_snr")
    if metric is not None:
        if not isinstance(metric, str):
            raise fail(f"metric = {metric!r}: expected a string such as \"agreement\" or \"snr:probabilities\"", None, "metric")
        from modelsqueeze.validate import Metric

        try:
            Metric.parse(metric)
        except ModelSqueezeError as exc:
            raise fail(str(exc).replace("--metric", "metric ="), None, "metric") from None
    if min_snr is not None and (isinstance(min_snr, bool) or not isinstance(min_snr, (int, float)) or not math.isfinite(min_snr)):
        raise fail(f"min_snr = {min_snr!r}: expected a number of dB", None, "min_snr")
    raw_steps = data.get("step")
    if not raw_steps:
        raise fail("no steps: add at least one [[step]] table with command = \"prune\" (or cluster, quantize, svd, huffman)")
    if not isinstance(raw_steps, list) or not all(isinstance(s, dict) for s in raw_steps):
        raise fail("`step` must be an array of tables: write each step as [[step]]", None, "step")
    steps = []
    for index, raw in enumerate(raw_steps):
        options = dict(raw)
        command = options.pop("command", None)
        label = f"step {index + 1}"
        if command is None:
            raise fail(f"{label}: no command = \"...\" (one of {', '.join(COMMANDS)})", index)
        if not isinstance(command, str):
            raise fail(f"{label}: command = {command!r}: expected a string, one of {', '.join(COMMANDS)}", index, "command")
        if command not in COMMANDS:
            close = difflib.get_close_matches(str(command), COMMANDS, n=1)
            raise fail(f"{label}: unknown command {command!r}" + (f" (did you mean {close[0]!r}?)" if close else
                       f"; expected one of {', '.join(COMMANDS)}"), index, "command")
        for key in [k for k in options if _key(k) in PATH_OPTIONS and isinstance(options[k], str) and options[k]]:
            options[key] = str(base / options[key])  # like input/output: relative to the recipe's folder
        try:
            steps.append(make_step(command, options))
        except ModelSqueezeError as exc:
            message = str(exc)
            key = next((k for k in options if re.search(rf"\b{re.escape(_key(k))}\b|'{re.escape(k)}'|--{re.escape(k.replace('_', '-'))}\b", message)), None)
            raise fail(f"{label} ({command}): {message}", index, key) from None
    return Recipe(tuple(steps), paths.get("input"), paths.get("output"), paths.get("validate"),
                  float(max_drop) if max_drop is not None else None, RECIPE_VERSION, metric,
                  float(min_snr) if min_snr is not None else None)


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of TOML; more is not one


def load_recipe(path: Path) -> Recipe:
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{path} is a directory, not a recipe file")
    try:
        if not path.exists() and not path.is_symlink():
            raise FileNotFoundError(path)
        text = read_input(path, "a TOML recipe", max_bytes=MAX_RECIPE_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} not found") from None
    except ModelSqueezeError as exc:
        raise RecipeError(str(exc)) from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a TOML recipe (not UTF-8 text)") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    recipe = parse_recipe(text, str(path), path.parent)
    if recipe.output is not None and path.resolve() in (recipe.output.resolve(), recipe.output.with_suffix(".msq").resolve()):
        raise RecipeError(f"{path}:{_line_of(text, None, 'output')}: output {recipe.output} is this recipe file "
                          f"(or its sidecar): writing it would destroy the recipe")
    return recipe


def _toml_char(c: str) -> str:
    if c.isprintable():
        return c
    code = ord(c)
    if 0xD800 <= code <= 0xDFFF:  # a byte that was not UTF-8 (surrogateescape): TOML has no escape for it
        raise ModelSqueezeError("a recipe value holds bytes that are not UTF-8 text, which TOML cannot store")
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _toml_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(_toml_char(c) for c in escaped) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")  # pragma: no cover


def _relative(path: Path, base: Path) -> str:
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def dump_recipe(recipe: Recipe, base: Path = Path("."), comment: str = "") -> str:
    """TOML text that `parse_recipe(text, base=base)` reads back as `recipe` (paths relative to base)."""
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    lines.append(f"version = {recipe.version}")
    for key in ("input", "output", "validate"):
        value = getattr(recipe, key)
        if value is not None:
            lines.append(f"{key} = {_toml_string(_relative(value, base))}")
    if recipe.max_drop is not None:
        lines.append(f"max_drop = {_toml_value(_number(recipe.max_drop))}")
    if recipe.metric is not None:
        lines.append(f"metric = {_toml_string(recipe.metric)}")
    if recipe.min_snr is not None:
        lines.append(f"min_snr = {_toml_value(_number(recipe.min_snr))}")
    for step in recipe.steps:
        lines += ["", "[[step]]", f"command = {_toml_string(step.command)}"]
        lines += [f"{key} = {_toml_value(_relative(value, base) if key in PATH_OPTIONS else value)}"
                  for key, value in step_options(step).items()]
    return "\n".join(lines) + "\n"


def _split_spec(text: str) -> list[str]:
    """`text` split at whitespace outside quotes, brackets and braces, so `bits="fc1*=4, 3"` and
    `layers=["fc1*", "fc2*"]` stay one word each (the quotes are kept: the value is TOML)."""
    parts, word, quote, depth, escaped = [], "", None, 0, False
    for c in text:
        if quote is not None:
            word += c
            if escaped:
                escaped = False
            elif c == "\\" and quote == '"':
                escaped = True
            elif c == quote:
                quote = None
        elif c in "\"'":
            word, quote = word + c, c
        elif c.isspace() and depth == 0:
            if word:
                parts.append(word)
            word = ""
        else:
            depth += (c in "[{") - (c in "]}")
            depth = max(depth, 0)
            word += c
    if quote is not None:
        raise ModelSqueezeError(f"step {text!r}: unclosed {quote} quote")
    return parts + ([word] if word else [])


def parse_step_spec(text: str) -> Step:
    """A step from one line of text, `COMMAND key=value ...` (values in TOML syntax; a bare word that
    is not TOML is taken as a string), e.g. `cluster bits=5 init=linear` or `prune sparsity='fc1*=0.9,0.8'`."""
    parts = _split_spec(text)
    if not parts:
        raise ModelSqueezeError("empty step: expected COMMAND key=value ..., e.g. 'cluster bits=5'")
    command, options = parts[0], {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ModelSqueezeError(f"step {text!r}: {part!r} is not key=value")
        if key in options:
            raise ModelSqueezeError(f"step {text!r}: {key!r} is given twice")
        try:
            options[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            options[key] = value
    try:
        return make_step(command, options)
    except ModelSqueezeError as exc:
        raise ModelSqueezeError(f"step {text!r}: {exc}") from None
