"""Remakes the simulations shipped with autofit (``autofit/simtable/<key>/``, see ``autofit/sim/table.py``).

Plans every catalog model on each card with the planner's defaults, simulating every step (the table and the user's
cache off), and keeps the simulations those plans made, and the answers of the allocator replays they ran, under this
installation's key; tables of other keys (older versions, another engine) are removed. Run it after a change to ``autofit/sim/`` or a library upgrade:

    python benchmarks/build_sim_table.py
    python benchmarks/build_sim_table.py --cards rtx3060 --models distilgpt2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cards", default="rtx4060-laptop,rtx3060,a100-80gb")
    parser.add_argument("--models", default=None, help="comma-separated (default: the whole catalog)")
    parser.add_argument("--keep", action="store_true", help="add to this key's table rather than start it afresh")
    parser.add_argument("--pack-from", default=None, metavar="FOLDER",
                        help="plan nothing: pack the cache files in FOLDER (and its answers.json) as this key's table")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="autofit-table-"))
    os.environ["AUTOFIT_CACHE"] = str(scratch)  # every simulation the plans make lands here
    os.environ["AUTOFIT_TABLE"] = "off"  # and every one is simulated, not read from an older table

    from autofit import model, planner, runs
    from autofit.errors import AutofitError
    from autofit.sim import simulate, table

    table.RECORD = True  # keep every replay answer the plans compute, to ship them
    started = time.perf_counter()
    if args.pack_from:
        source = Path(args.pack_from)
        made = sorted(source.glob("*.npz"))
        answers = json.loads((source / "answers.json").read_text()) if (source / "answers.json").exists() else {}
    else:
        names = args.models.split(",") if args.models else model.catalog_names()
        for card in args.cards.split(","):
            for name in names:
                simulate._CACHE.clear()
                runs._MODELS.clear()
                t0 = time.perf_counter()
                try:
                    p = planner.plan(model.resolve(name), card, probe=False)
                    what = f"{p.method} {p.batch_size}x{p.grad_accum}"
                except AutofitError as err:
                    what = f"{type(err).__name__}"
                print(f"{name:<40} {card:<15} {what:<24} {time.perf_counter() - t0:7.1f} s", flush=True)
        made = sorted(simulate.cache_dir().glob("*.npz"))
        answers = dict(table._KEPT)
    target = table.folder()
    if args.keep and target.is_dir():  # what this key's table holds already stays
        unpacked = scratch / "shipped"
        unpacked.mkdir(exist_ok=True)
        for name, (archive, offset, length) in table._index().items():
            (unpacked / name).write_bytes(table._archive(archive)[offset:offset + length])
        made = sorted({p.name: p for p in [*unpacked.glob("*.npz"), *made]}.values())
        answers = {**table.shipped_answers(), **answers}
    for old in table.ROOT.glob("*"):
        if old.is_dir():
            shutil.rmtree(old)
    size = table.pack(made, target) + table.write_answers(target, answers)
    table.write_made_with(target)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"# {len(made)} simulations and {len(answers)} allocator replay answers, {size / 2**20:.2f} MiB in "
          f"{target} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
