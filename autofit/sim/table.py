"""Simulations shipped with autofit: the steps a default plan of each catalog model simulates, made ahead of time.

A cold ``plan()`` spends nearly all its time simulating steps and replaying them through the allocator model
(benchmarks/plan_speed.py prints the breakdown), and for the catalog's models with the planner's defaults those are
the same for everyone. They ship in ``autofit/simtable/<key>/``: each simulation as the on-disk cache stores it
(``simulate._save``), named by the same job key, packed with the simulations of the same model, method and depth
into one xz archive (they differ in little but their sizes, so a group packs well), an index of where
each lies, and the answers of the allocator replays those plans ran (``answers.json.xz``). ``key()`` covers what a
simulation depends on besides the job: the versions of autofit, PyTorch, transformers and peft, and the source of the
simulation engine itself (``autofit/sim/*.py`` but this reader), which decides the attention kernel for each card
class, the precision's dtypes, the tracker's rounding. A table made under other versions or another engine has
another key and is not read: the plan simulates as before. So a shipped simulation is the simulation, byte for byte
(tests/test_batchline.py re-simulates table entries and compares).

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


def versions() -> str:
    """The library versions a simulation depends on."""
    import peft
    import torch
    import transformers

    from autofit import __version__

    return f"{__version__} {torch.__version__} {transformers.__version__} {peft.__version__}"


@functools.lru_cache(maxsize=1)
def engine() -> str:
    """A digest of the simulation engine's source (``autofit/sim/*.py``, this reader left out)."""
    digest = hashlib.sha1()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def key() -> str:
    """The table key of this installation: library versions and the engine's source (this reader left out)."""
    return hashlib.sha1(f"{versions()} {engine()}".encode()).hexdigest()[:16]


def made_with(target: Path) -> dict | None:
    """What the table in ``target`` was made with ({"versions", "engine"}), or None where it does not say."""
    import json

    here = target / "made_with.json"
    return json.loads(here.read_text()) if here.is_file() else None


def write_made_with(target: Path) -> None:
    import json

    target.mkdir(parents=True, exist_ok=True)
    (target / "made_with.json").write_text(json.dumps({"versions": versions(), "engine": engine()}) + "\n")


def folder() -> Path:
    """Where this installation's table lives (it may not exist)."""
    return ROOT / key()


@functools.lru_cache(maxsize=1)
def _index() -> dict[str, list]:
    """File name -> [archive, offset, length] of each shipped simulation."""
    import json

    here = folder() / "index.json"
    if not here.is_file():
        return {}
    try:
        return json.loads(here.read_text())
    except (OSError, ValueError):
        return {}


@functools.lru_cache(maxsize=8)
def _archive(name: str) -> bytes:
    import lzma

    return lzma.decompress((folder() / name).read_bytes())


def path(file_name: str):
    """The shipped simulation of this file name for this installation's key, as a file ``numpy.load`` reads, or
    None."""
    if not enabled():
        return None
    where = _index().get(file_name)
    if where is None:
        return None
    import io

    archive, offset, length = where
    try:
        return io.BytesIO(_archive(archive)[offset:offset + length])
    except (OSError, ValueError):  # a damaged archive: simulate instead
        return None


def pack(files, target: Path) -> int:
    """Writes the simulations ``files`` (cache files) into the table folder ``target``: grouped by model, method and
    depth (the sizes of the weights and buffers, and the depth), each group an xz archive, and the index. Returns the
    bytes written."""
    import io
    import json
    import lzma

    import numpy as np

    groups: dict[str, list] = {}
    for file in files:
        with np.load(file, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays["meta"]))
        weights = arrays["sizes"][: meta["adopted"]]
        group = hashlib.sha1(weights.tobytes() + str(meta["num_layers"]).encode()).hexdigest()[:12]
        plain = io.BytesIO()
        np.savez(plain, **arrays)  # uncompressed: the archive compresses the group as a whole
        groups.setdefault(group, []).append((Path(file).name, plain.getvalue()))
    target.mkdir(parents=True, exist_ok=True)
    index, written = {}, 0
    for group, members in sorted(groups.items()):
        blob, offset = io.BytesIO(), 0
        for name, data in sorted(members):
            index[name] = [f"{group}.xz", offset, len(data)]
            blob.write(data)
            offset += len(data)
        packed = lzma.compress(blob.getvalue(), preset=6)
        (target / f"{group}.xz").write_bytes(packed)
        written += len(packed)
    text = json.dumps(index, sort_keys=True, separators=(",", ":"))
    (target / "index.json").write_text(text)
    return written + len(text)


# -- allocator replays: answers by the content of the stream ------------------------------------------------------------
# Once the simulations are read, a plan's time goes to replaying their streams (and runs of 30 steps made from them)
# through the allocator model. A replay is a pure function of the stream and its options, so its answer is kept by a
# digest of exactly those: in this process (a warm plan asks again), and shipped beside the simulations in
# ``answers.json.xz`` for the streams the catalog's default plans replay.
_ANSWERS: dict[str, object] = {}
_ANSWERS_SIZE = 8192
_KEPT: dict[str, object] = {}  # with RECORD, every answer computed in this process (what build_sim_table.py ships)
RECORD = False


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
    _ANSWERS[key_] = value
    if RECORD:
        _KEPT[key_] = value


def forget() -> None:
    """Drops this process's answers and unpacked archives (benchmarks that time a cold plan)."""
    _ANSWERS.clear()
    _archive.cache_clear()


@functools.lru_cache(maxsize=1)
def _shipped_answers() -> dict:
    import json
    import lzma

    here = folder() / "answers.json.xz"
    if not here.is_file():
        return {}
    try:
        return json.loads(lzma.decompress(here.read_bytes()))
    except (OSError, ValueError, lzma.LZMAError):
        return {}


def write_answers(target: Path, answers: dict) -> int:
    """Writes ``answers`` (digest -> answer) as the table's ``answers.json.xz``; returns the bytes written."""
    import json
    import lzma

    packed = lzma.compress(json.dumps(answers, sort_keys=True, separators=(",", ":")).encode(), preset=9)
    (target / "answers.json.xz").write_bytes(packed)
    return len(packed)


def shipped_answers() -> dict:
    """The answers shipped for this installation's key (empty when none)."""
    return dict(_shipped_answers())
