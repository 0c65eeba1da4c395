"""Speed of ``autofit.plan`` for every catalog model on three cards, where its time goes, and a search without the
surrogate.

Cold: nothing from earlier plans in this process or the user's disk cache (the simulations and replay answers
shipped with autofit, ``autofit/sim/table.py``, are used where their key matches, as in any fresh install); warm: the
same plan again. Each row splits the cold plan's time into its parts: steps simulated (``simulate.run_many`` less
what it read), simulations read (the disk cache or the shipped table), steps made from batches 2 and 4
(``sim/batchline``), allocator replays, envelope fits, parameter counts, and the rest of the planner. The baseline is
the search a planner without the surrogate would run over the same configurations: doubling the micro-batch, then
bisecting, with an exact simulation (two depths, extrapolated) at every size tried, for every configuration the
planner weighs. Targets (2 cores): cold median at most 1 s and worst at most 3 s, warm at most 50 ms.

    python benchmarks/plan_speed.py --no-baseline
    python benchmarks/plan_speed.py --cards rtx3060 --models distilgpt2 --json out.json
    AUTOFIT_TABLE=off python benchmarks/plan_speed.py --no-baseline --models distilgpt2   # without the table
    python benchmarks/plan_speed.py --profile 3 --no-baseline  # and cProfile's top functions for 3 cold plans
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import cProfile
import functools
import io
import pstats
import statistics

from autofit import memory, model, planner
from autofit.errors import DoesNotFitError
from autofit.sim import allocator, batchline, simulate, table

PARTS = ("simulated", "read", "made", "replays", "fits", "counts")
_SPENT: dict[str, float] = {}
_ACTIVE: dict[str, bool] = {}


def _timed(module, name: str, part: str) -> None:
    """Wraps ``module.name`` so that its wall time adds to ``_SPENT[part]`` (outermost calls of a part only); reads
    and steps made inside ``run_many`` are taken out of what it simulated."""
    inner = getattr(module, name)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        if _ACTIVE.get(part):
            return inner(*args, **kwargs)
        _ACTIVE[part] = True
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            _ACTIVE[part] = False
            spent = time.perf_counter() - started
            _SPENT[part] = _SPENT.get(part, 0.0) + spent
            if part in ("read", "made") and _ACTIVE.get("simulated"):
                _SPENT["simulated"] = _SPENT.get("simulated", 0.0) - spent

    setattr(module, name, wrapper)


def instrument() -> None:
    """Times the parts of a plan (see the module's docstring)."""
    for module, name, part in ((simulate, "run_many", "simulated"), (simulate, "_load", "read"),
                               (batchline, "synthesize", "made"), (allocator, "replay", "replays"),
                               (allocator, "min_limit", "replays"), (memory, "fit_envelope", "fits"),
                               (model, "count_params", "counts")):
        _timed(module, name, part)


def cold() -> None:
    """Forgets what this process holds from earlier plans: simulations, run models, envelope fits, replay answers."""
    planner.forget()


def baseline(spec, card: str, p: planner.Plan) -> tuple[float, int, int]:
    """(seconds, exact estimates made, batch found for the plan's configuration) for the same search without the
    surrogate: every configuration the planner weighs (each method not ruled out by its static memory, checkpointing
    off and on), its micro-batch found by doubling then bisecting with an exact simulation at every size tried."""
    cold()
    started = time.perf_counter()
    calls = 0
    card_info = planner.gpus.resolve(card)
    bases = planner._feasible_methods(spec, card_info, p.budget_bytes, ("full", "lora", "qlora"), None,
                                      dict(precision=None, optimizer=p.optimizer, lora_r=16, lora_alpha=None,
                                           lora_dropout=0.05, lora_targets=None), [])
    found_for_plan = 0
    for base in bases:
        for ckpt in (False, True):
            cfg = planner.replace(base, gradient_checkpointing=ckpt)

            def fits(b: int) -> bool:
                nonlocal calls
                calls += 1
                return memory.simulate_point(spec, cfg, batch_size=b, seq_len=p.seq_len).required_bytes <= \
                    p.budget_bytes

            low, high = 0, 1
            while high <= p.effective_batch and fits(high):
                low, high = high, high * 2
            high = min(high, p.effective_batch + 1)
            while high - low > 1:
                mid = (low + high) // 2
                low, high = (mid, high) if fits(mid) else (low, mid)
            if cfg == p.step_config:
                found_for_plan = low
    return time.perf_counter() - started, calls, found_for_plan


def before(spec, card: str, seq, p) -> tuple[float, bool]:
    """(seconds, same plan) for a cold plan with the fast paths off: every step simulated, every replay run."""
    saved = {k: os.environ.get(k) for k in ("AUTOFIT_TABLE", "AUTOFIT_BATCHLINE")}
    os.environ.update(AUTOFIT_TABLE="off", AUTOFIT_BATCHLINE="off")
    try:
        cold()
        started = time.perf_counter()
        slow = planner.plan(spec, card, seq_len=seq, probe=False)
        seconds = time.perf_counter() - started
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        cold()
    return seconds, slow.to_dict() == p.to_dict()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cards", default="rtx4060-laptop,rtx3060,a100-80gb")
    parser.add_argument("--models", default=None, help="comma-separated (default: the whole catalog)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the planner's (1024)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", type=int, default=0, help="print cProfile's top functions for this many cold plans")
    parser.add_argument("--before", action="store_true",
                        help="also time each cold plan as it was before the fast paths (no shipped table, no steps "
                             "made from batches 2 and 4, no kept replay answers), side by side")
    args = parser.parse_args(argv)
    os.environ["AUTOFIT_CACHE"] = "off"  # cold means cold: no simulation from an earlier run on disk
    names = args.models.split(",") if args.models else model.catalog_names()
    instrument()
    print(f"# {os.cpu_count()} cores, {simulate.workers()} simulation workers; shipped table "
          f"{'on' if table.enabled() else 'off'} (key {table.key()}, "
          f"{'present' if table.folder().is_dir() else 'absent'})")
    print("# cold seconds split into: " + ", ".join(PARTS) + ", and the rest of the planner (other)")
    print(f"{'model':<40} {'card':<15} {'plan':<24} {'cold s':>7} "
          + " ".join(f"{p[:6]:>6}" for p in PARTS) + f" {'other':>6} {'warm s':>7} "
          + (f"{'before s':>8} {'ratio':>7} {'same':>5} " if args.before else "")
          + ("" if args.no_baseline else f"{'baseline s':>10} {'sims':>5} {'ratio':>6} {'same batch':>10}"))
    rows = []
    profiled = 0
    for card in args.cards.split(","):
        for name in names:
            cold()
            spec = model.resolve(name)
            seq = min(args.seq_len, spec.max_positions) if args.seq_len and spec.max_positions else args.seq_len
            _SPENT.clear()
            profiler = cProfile.Profile() if profiled < args.profile else None
            started = time.perf_counter()
            try:
                if profiler:
                    profiler.enable()
                try:
                    p = planner.plan(spec, card, seq_len=seq, probe=False)
                finally:
                    if profiler:
                        profiler.disable()
                        profiled += 1
            except DoesNotFitError as err:
                cold_s = time.perf_counter() - started
                rows.append(dict(model=name, card=card, fits=False, cold_seconds=round(cold_s, 3), reason=str(err),
                                 parts={k: round(_SPENT.get(k, 0.0), 3) for k in PARTS}))
                print(f"{name:<40} {card:<15} {'does not fit':<24} {cold_s:>7.2f} "
                      + " ".join(f"{_SPENT.get(k, 0.0):>6.2f}" for k in PARTS)
                      + f" {cold_s - sum(_SPENT.values()):>6.2f}", flush=True)
                continue
            cold_s = time.perf_counter() - started
            parts = {k: round(_SPENT.get(k, 0.0), 3) for k in PARTS}
            other = cold_s - sum(_SPENT.get(k, 0.0) for k in PARTS)
            if profiler:
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(12)
                print("\n".join("#   " + line for line in text.getvalue().splitlines()[6:] if line.strip()))
            started = time.perf_counter()
            planner.plan(spec, card, seq_len=seq, probe=False)
            warm = time.perf_counter() - started
            row = dict(model=name, card=card, fits=True, method=p.method, batch_size=p.batch_size,
                       grad_accum=p.grad_accum, seq_len=p.seq_len, checkpointing=p.gradient_checkpointing,
                       cold_seconds=round(cold_s, 3), warm_seconds=round(warm, 4), parts=parts,
                       other_seconds=round(other, 3))
            summary = f"{p.method} {p.batch_size}x{p.grad_accum} s{p.seq_len}{' ckpt' if p.gradient_checkpointing else ''}"
            line = (f"{name:<40} {card:<15} {summary:<24} {cold_s:>7.2f} "
                    + " ".join(f"{parts[k]:>6.2f}" for k in PARTS) + f" {other:>6.2f} {warm:>7.3f}")
            if args.before:
                slow_s, same = before(spec, card, seq, p)
                row.update(before_seconds=round(slow_s, 3), before_same_plan=same)
                line += f" {slow_s:>8.2f} {slow_s / cold_s:>6.1f}x {str(same):>5}"
            if args.no_baseline:
                print(line, flush=True)
            else:
                seconds, calls, found = baseline(spec, card, p)
                largest_divisor = max(d for d in range(1, found + 1) if p.effective_batch % d == 0) if found else 0
                row.update(baseline_seconds=round(seconds, 2), baseline_estimates=calls, baseline_batch=found,
                           same_batch=largest_divisor == p.batch_size)
                print(f"{line} {seconds:>10.2f} {calls:>5} {seconds / cold_s:>6.2f} {str(row['same_batch']):>10}",
                      flush=True)
            rows.append(row)
    planned = [r for r in rows if r["fits"]]
    colds = [r["cold_seconds"] for r in rows]
    median_cold, worst_cold = statistics.median(colds), max(colds)
    worst_warm = max((r["warm_seconds"] for r in planned), default=0.0)
    spent = {k: sum(r["parts"][k] for r in rows) for k in PARTS}
    total = sum(colds)
    print("# where cold plans spent their time, all rows: " + ", ".join(
        f"{k} {v:.1f}s ({100 * v / total:.0f}%)" for k, v in spent.items()) +
        f", other {total - sum(spent.values()):.1f}s ({100 * (total - sum(spent.values())) / total:.0f}%)")
    met = dict(median=median_cold <= 1.0, worst=worst_cold <= 3.0, warm=worst_warm <= 0.05)
    print(f"# cold plans: median {median_cold:.2f}s (target <= 1s: {'met' if met['median'] else 'MISSED'}), worst "
          f"{worst_cold:.2f}s (target <= 3s: {'met' if met['worst'] else 'MISSED'}); worst warm plan "
          f"{worst_warm:.3f}s (target <= 0.05s: {'met' if met['warm'] else 'MISSED'})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": " ".join(sys.argv), "rows": rows, "median_cold": median_cold,
                       "worst_cold": worst_cold, "worst_warm": worst_warm, "targets_met": met}, fh, indent=2)
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
