"""The command line answers --help and argument errors without importing torch, transformers or numpy: each is
checked in a fresh interpreter, which reports the heavy modules it holds after ``autofit.cli.main`` returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "numpy", "accelerate")

SCRIPT = """
import json, sys
from autofit.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print(json.dumps({"code": code, "heavy": sorted(m for m in %r if m in sys.modules)}), file=sys.stderr)
""" % (HEAVY,)


def imports_after(*argv: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, *argv], capture_output=True, text=True, env=env,
                          timeout=120)
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0),
    (["probe", "--help"], 0),
    (["estimate", "--help"], 0),
    (["fit", "--help"], 0),
    ([], 2),  # no command: the help, exit 2
    (["probe"], 2),  # a missing model
    (["estimate", "distilgpt2", "--batch-size", "x"], 2),  # not a number
    (["probe", "distilgpt2", "--precision", "fp64"], 2),  # not a choice
    (["nonsense"], 2),  # no such command
])
def test_help_and_argument_errors_import_no_torch(argv, code):
    result = imports_after(*argv)
    assert result == {"code": code, "heavy": []}


def test_a_command_that_estimates_does_import_torch():
    """The check above can fail: a command that does work imports the engine."""
    result = imports_after("inspect", "distilgpt2", "--json")
    assert result["code"] == 0 and "torch" in result["heavy"]
