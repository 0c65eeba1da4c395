"""What a probe trial spends besides its steps, side by side with how trials ran before.

Two costs that every trial of every search pays, measured on the budgeted CPU device with the small GPT-2 shape of
``probe_vs_baselines.py`` (LoRA, micro-batch 2 x 256, evaluation batch 2, 160 MiB):

* garbage collection: a trial now collects only the objects it made (the rest frozen, ``gc.freeze``); before, it ran
  two full collections, which walk every object torch and transformers made. The baseline is the same trial with
  those two full collections added back;
* the simulation workers: a plan forks them, and while they live each page this process writes is copied first. A
  trial now ends them; the baseline keeps them alive, as before. Each pair of rows plans cold, then times one trial.

    python benchmarks/trial_overhead.py
    python benchmarks/trial_overhead.py --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from unittest import mock

from autofit import memory, model, planner, probing
from autofit.gpu import GpuInfo
from autofit.sim import simulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_vs_baselines import gpt2_shape  # noqa: E402  (the same shape as the sweep)

BUDGET = 160 * 2**20
SEQ = 256


def card() -> GpuInfo:
    return GpuInfo(name="budgeted CPU device", key=None, total_bytes=BUDGET, free_bytes=BUDGET,
                   used_by_others_bytes=0, compute_capability=None, bf16=False, peak_tflops_16=None,
                   bandwidth_gbs=None, source="host")


def trial(spec, cfg, device, *, full_collections: bool) -> float:
    started = time.perf_counter()
    if full_collections:
        gc.collect()
    t = probing.run_trial(spec, cfg, device, batch_size=2, seq_len=SEQ, eval_batch_size=2)
    if full_collections:
        gc.collect()
    assert t.fits, t.note
    return time.perf_counter() - started


def after_a_plan(spec, cfg, device, *, workers_alive: bool) -> tuple[float, float]:
    """(plan seconds, seconds of the first trial after it)."""
    planner.forget()
    started = time.perf_counter()
    planner.plan(spec, card(), seq_len=SEQ, effective_batch=64, margin=0.0, probe=False, gradient_checkpointing=False)
    planned = time.perf_counter() - started
    kept = mock.patch.object(simulate, "_shutdown_pool", lambda: None) if workers_alive else contextlib.nullcontext()
    with kept:
        return planned, trial(spec, cfg, device, full_collections=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ["AUTOFIT_CACHE"] = "off"
    spec = model.resolve(gpt2_shape())
    cfg = memory.step_config(card(), method="lora")
    device = probing.BudgetedCpuDevice(budget_bytes=BUDGET)
    trial(spec, cfg, device, full_collections=False)  # imports and kernel set-up, untimed
    print(f"# {os.cpu_count()} cores; LoRA trial of the small GPT-2 shape, micro-batch 2 x {SEQ}, on the budgeted CPU "
          f"device ({BUDGET >> 20} MiB); median of {args.repeats}")
    collections = {mode: [trial(spec, cfg, device, full_collections=mode) for _ in range(args.repeats)]
                   for mode in (True, False)}
    then, now = statistics.median(collections[True]), statistics.median(collections[False])
    print(f"trial with two full collections (before) {then:6.3f} s")
    print(f"trial collecting only its own garbage     {now:6.3f} s   {then / now:.2f}x faster")
    alive, ended = [], []
    for _ in range(args.repeats):  # alternated, so both see the same machine
        alive.append(after_a_plan(spec, cfg, device, workers_alive=True))
        simulate._shutdown_pool()
        ended.append(after_a_plan(spec, cfg, device, workers_alive=False))
    a, e = statistics.median(t for _, t in alive), statistics.median(t for _, t in ended)
    print(f"first trial after a plan, workers alive (before) {a:6.3f} s   plans {[round(p, 2) for p, _ in alive]}")
    print(f"first trial after a plan, workers ended          {e:6.3f} s   {a / e:.2f}x faster; "
          f"plans {[round(p, 2) for p, _ in ended]}")
    print("# every plan above forked a fresh pair of workers (the one before it ended them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
