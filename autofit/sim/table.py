"""Simulations shipped with autofit: the steps a default plan of each catalog model simulates, made ahead of time.

A cold ``plan()`` spends nearly all its time simulating steps (benchmarks/plan_speed.py prints the breakdown), and
for the catalog's models with the planner's defaults those steps are the same for everyone. They ship in
``autofit/simtable/<key>/``, one file per simulation in the format of the on-disk cache (``simulate._save``), named
by the same job key. ``key()`` covers everything a simulation depends on besides the job: the versions of autofit,
PyTorch, transformers and peft, and the source of the simulation engine itself (``autofit/sim/*.py``, which decides
the attention kernel for each card class, the precision's dtypes, the tracker's rounding). A table made under other
versions or another engine has another key and is not read: the plan simulates as before. So a shipped simulation
is the simulation, byte for byte (tests/test_batchline.py re-simulates table entries and compares).

``benchmarks/build_sim_table.py`` remakes the table (after any change to the engine or a library upgrade).
``AUTOFIT_TABLE=off`` turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "simtable"


def enabled() -> bool:
    return os.environ.get("AUTOFIT_TABLE", "on").lower() not in ("off", "0", "no", "false")


@functools.lru_cache(maxsize=1)
def key() -> str:
    """The table key of this installation: library versions and the engine's source."""
    import peft
    import torch
    import transformers

    from autofit import __version__

    digest = hashlib.sha1(f"{__version__} {torch.__version__} {transformers.__version__} {peft.__version__}".encode())
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def folder() -> Path:
    """Where this installation's table lives (it may not exist)."""
    return ROOT / key()


@functools.lru_cache(maxsize=1)
def _names() -> frozenset[str]:
    here = folder()
    return frozenset(p.name for p in here.iterdir()) if here.is_dir() else frozenset()


def path(file_name: str) -> Path | None:
    """The shipped file of this name for this installation's key, or None."""
    if not enabled() or file_name not in _names():
        return None
    return folder() / file_name


# -- allocator replays: answers by the content of the stream ------------------------------------------------------------
# Once the simulations are read, a plan's time goes to replaying their streams (and runs of 30 steps made from them)
# through the allocator model. A replay is a pure function of the stream and its options, so its answer is kept by a
# digest of exactly those: in this process (a warm plan asks again), and shipped beside the simulations in
# ``answers.json`` for the streams the catalog's default plans replay.
_ANSWERS: dict[str, object] = {}
_ANSWERS_SIZE = 8192
_KEPT: dict[str, object] = {}  # answers computed in this process (what build_sim_table.py ships)


def answer_key(kind: str, sizes, events, baseline_uids, **options) -> str:
    """A digest of a replay's whole input: ``kind`` (the function), the stream and every option."""
    import numpy as np

    digest = hashlib.sha1(kind.encode())
    digest.update(np.ascontiguousarray(sizes, dtype=np.int64).tobytes())
    digest.update(b"|")
    digest.update(np.ascontiguousarray(events, dtype=np.int64).tobytes())
    if isinstance(baseline_uids, range):
        base = ("range", baseline_uids.start, baseline_uids.stop, baseline_uids.step)
    else:
        base = tuple(int(u) for u in baseline_uids)
    digest.update(repr((base, sorted((k, v if not isinstance(v, (list, tuple)) else tuple(int(x) for x in v))
                                     for k, v in options.items()))).encode())
    return digest.hexdigest()


def answer(key_: str):
    """The answer kept for ``key_`` in this process or shipped with autofit, or None."""
    hit = _ANSWERS.get(key_)
    if hit is None and enabled():
        hit = _shipped_answers().get(key_)
    return hit


def keep(key_: str, value) -> None:
    if len(_ANSWERS) >= _ANSWERS_SIZE:
        _ANSWERS.pop(next(iter(_ANSWERS)))
    _ANSWERS[key_] = _KEPT[key_] = value


def forget() -> None:
    """Drops this process's answers (benchmarks that time a cold plan)."""
    _ANSWERS.clear()


@functools.lru_cache(maxsize=1)
def _shipped_answers() -> dict:
    import json

    here = folder() / "answers.json"
    if not here.is_file():
        return {}
    try:
        return json.loads(here.read_text())
    except (OSError, ValueError):
        return {}
