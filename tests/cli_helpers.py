"""The CLI helpers the command-level tests share: run a command in-process, read its --json, or
check that it was refused with exactly one error line."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from modelsqueeze.cli import app

runner = CliRunner()


def invoke(*args):
    """Run `modelsqueeze ARGS...` in-process (paths may be Path objects)."""
    return runner.invoke(app, [str(a) for a in args])


def ok(*args) -> dict:
    """The --json output of a command that must succeed."""
    result = invoke(*args, "--json", "--quiet")
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


def refused(*args, code: int = 2) -> str:
    """The one stderr line of a refusal with exit `code` (no traceback)."""
    result = invoke(*args)
    assert result.exit_code == code, result.output + result.stderr
    assert "Traceback" not in result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]
