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
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="autofit-table-"))
    os.environ["AUTOFIT_CACHE"] = str(scratch)  # every simulation the plans make lands here
    os.environ["AUTOFIT_TABLE"] = "off"  # and every one is simulated, not read from an older table

    from autofit import model, planner, runs
    from autofit.errors import AutofitError
    from autofit.sim import simulate, table

    names = args.models.split(",") if args.models else model.catalog_names()
    started = time.perf_counter()
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
    target = table.folder()
    for old in table.ROOT.glob("*"):
        if old.is_dir() and (old != target or not args.keep):
            shutil.rmtree(old)
    target.mkdir(parents=True, exist_ok=True)
    for path in made:
        shutil.copyfile(path, target / path.name)
    shutil.rmtree(scratch, ignore_errors=True)
    answers = target / "answers.json"
    kept = json.loads(answers.read_text()) if args.keep and answers.exists() else {}
    kept.update(table._KEPT)
    answers.write_text(json.dumps(kept, sort_keys=True, separators=(",", ":")))
    size = sum(p.stat().st_size for p in target.iterdir())
    print(f"# {len(list(target.glob('*.npz')))} simulations and {len(kept)} allocator replays, "
          f"{size / 2**20:.1f} MiB in {target} "
          f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
