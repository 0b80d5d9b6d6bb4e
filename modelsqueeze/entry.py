"""The `modelsqueeze` console script.

Importing the CLI loads numpy, onnx and onnxruntime (about a second). Typer turns Ctrl-C during a
command into exit 130 without a traceback; this guard does the same for Ctrl-C while those modules
load, before Typer has started."""

from __future__ import annotations


def main() -> None:
    try:
        from modelsqueeze.cli import main as run

        run()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
