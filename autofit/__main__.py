"""``python -m autofit``: the command line, as the ``autofit`` script runs it."""

from autofit.cli import entry

entry()
