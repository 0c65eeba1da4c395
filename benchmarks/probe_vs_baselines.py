"""autofit's probe against the batch-size searches people use today, on the same model, budget and trial.

Every method runs the same trial: a fresh model of the same architecture, two training steps of the real step and an
evaluation pass, on the same device, raising an out-of-memory error past the budget. The methods:

* autofit: the plan from the estimate, then ``probe`` (the estimate's micro-batch, bracketed by 5%);
* accelerate's ``find_executable_batch_size`` as it ships (start at 128, multiply by 0.9 after each error);
* Lightning-style doubling-then-bisect (``BatchSizeFinder(mode="binsearch")``'s documented search: start at 2,
  double until an error, then bisect between the last success and the failure).

autofit keeps the effective batch exact, so its micro-batch divides it; "usable" gives, for every method, the largest
micro-batch that divides the effective batch at or below what it found, the size a user who keeps the effective batch
can train with. autofit's time includes planning, cold (no simulation kept from an earlier row or run). By default
it sweeps budgets of 160 MiB, 512 MiB and 1.5 GiB for a small GPT-2 shape and a small Llama shape, and prints each
baseline's time over autofit's per row. Targets, in every row: autofit at most 3 trials, at least 3x less wall time
than doubling-then-bisect, and a usable batch at least as large.

    python benchmarks/probe_vs_baselines.py                       # the sweep on the budgeted CPU device, anywhere
    python benchmarks/probe_vs_baselines.py --model gpt2 --budget 160MiB          # one row
    python benchmarks/probe_vs_baselines.py --cuda --model distilgpt2 --budget 6GiB   # a real card, capped
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from autofit import memory, model, planner, probing
from autofit.gpu import GpuInfo
from autofit.units import fmt_bytes, parse_size


def gpt2_shape():
    from transformers import GPT2Config

    return GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=256, bos_token_id=0,
                      eos_token_id=0)


def llama_shape():
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=688, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=8192, max_position_embeddings=256, bos_token_id=0,
                       eos_token_id=0)


tiny_config = gpt2_shape  # the name benchmarks/gpu_validation.py uses
SHAPES = {"gpt2": gpt2_shape, "llama": llama_shape}  # small shapes built here, so trials take seconds on a CPU


def cold() -> None:
    """Forgets every simulation, run model and replay answer this process holds: each row plans from nothing."""
    planner.forget()


def one_row(spec, budget: int, args) -> list[dict]:
    """autofit and both baselines on one model and budget: a row per method."""
    if args.cuda:
        device = probing.CudaDevice(index=0, limit_bytes=budget)
        props = torch.cuda.get_device_properties(0)
        card = GpuInfo(name=props.name, key=None, total_bytes=budget + 512 * 2**20, free_bytes=budget + 512 * 2**20,
                       used_by_others_bytes=0, compute_capability=(props.major, props.minor),
                       bf16=torch.cuda.is_bf16_supported(), peak_tflops_16=None, bandwidth_gbs=None, source="size")
    else:
        device = probing.BudgetedCpuDevice(budget_bytes=budget)
        card = GpuInfo(name="budgeted CPU device", key=None, total_bytes=budget, free_bytes=budget,
                       used_by_others_bytes=0, compute_capability=None, bf16=False, peak_tflops_16=None,
                       bandwidth_gbs=None, source="host")
    print(f"# {spec.name}, seq {args.seq_len}, effective batch {args.effective_batch}, budget {fmt_bytes(budget)} on "
          f"{'CUDA device 0' if args.cuda else 'the budgeted CPU device'}", flush=True)

    # one untimed step first: the first trial in a process pays for lazy imports and kernel set-up, whoever runs it
    probing.run_trial(spec, memory.step_config(card, method="full"), device, batch_size=1,
                      seq_len=args.seq_len, number=0)
    cold()
    started = time.perf_counter()
    p = planner.plan(spec, card, seq_len=args.seq_len, effective_batch=args.effective_batch, margin=0.0, probe=False,
                     gradient_checkpointing=False)
    cfg = p.step_config
    planned = time.perf_counter() - started
    probed = probing.probe(p, spec=spec, device=device, use_cache=False, rank=False)
    autofit = dict(method="autofit", trials=len(probed.trials), ooms=sum(not t.fits for t in probed.trials),
                   seconds=time.perf_counter() - started, plan_seconds=planned, batch=probed.batch_size,
                   sizes=[t.batch_size for t in probed.trials])

    def attempt_factory(log):
        def attempt(batch_size: int) -> int:
            t = probing.run_trial(spec, cfg, device, batch_size=batch_size, seq_len=args.seq_len,
                                  eval_batch_size=p.eval_batch_size, number=len(log) + 1)
            log.append(t)
            if not t.fits:
                raise torch.OutOfMemoryError(t.note)  # what the trial caught, raised again for the search to see
            return batch_size
        return attempt

    from accelerate.utils import find_executable_batch_size

    log: list = []
    started = time.perf_counter()
    found = find_executable_batch_size(attempt_factory(log), starting_batch_size=128)()
    accelerate = dict(method="accelerate find_executable_batch_size", trials=len(log),
                      ooms=sum(not t.fits for t in log), seconds=time.perf_counter() - started, batch=found,
                      sizes=[t.batch_size for t in log])

    log = []
    attempt = attempt_factory(log)
    started = time.perf_counter()
    low, high = 0, 2
    while True:  # double until the first failure
        try:
            attempt(high)
            low, high = high, high * 2
        except torch.OutOfMemoryError:
            break
    while high - low > 1:  # then bisect between the last success and the failure
        mid = (low + high) // 2
        try:
            attempt(mid)
            low = mid
        except torch.OutOfMemoryError:
            high = mid
    lightning = dict(method="doubling then bisect (Lightning binsearch)", trials=len(log),
                     ooms=sum(not t.fits for t in log), seconds=time.perf_counter() - started, batch=low,
                     sizes=[t.batch_size for t in log])

    rows = [autofit, accelerate, lightning]
    for r in rows:
        r.update(model=spec.name, budget_bytes=budget)
        r["usable_batch"] = max((d for d in range(1, r["batch"] + 1) if args.effective_batch % d == 0), default=0)
        r["autofit_speedup"] = r["seconds"] / autofit["seconds"]  # this method's time over autofit's
    print(f"{'method':<44} {'trials':>6} {'OOM':>4} {'seconds':>8} {'vs autofit':>10} {'batch':>6} {'usable':>6}  "
          "sizes tried")
    for r in rows:
        print(f"{r['method']:<44} {r['trials']:>6} {r['ooms']:>4} {r['seconds']:>8.1f} {r['autofit_speedup']:>9.1f}x "
              f"{r['batch']:>6} {r['usable_batch']:>6}  {r['sizes']}")
    print(f"# autofit's time: {autofit['plan_seconds']:.1f}s planning from the estimate, "
          f"{autofit['seconds'] - autofit['plan_seconds']:.1f}s probing", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2,llama",
                        help="comma-separated: gpt2 and llama are small shapes built here; any other name is "
                             "resolved as autofit resolves models")
    parser.add_argument("--budget", default="160MiB,512MiB,1.5GiB", help="comma-separated budgets the trials may use")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--effective-batch", type=int, default=64)
    parser.add_argument("--cuda", action="store_true", help="run on CUDA device 0, capped at the budget")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    os.environ["AUTOFIT_CACHE"] = "off"  # autofit plans cold: no simulation from an earlier run on disk
    rows, summary = [], []
    started = time.perf_counter()
    for name in args.model.split(","):
        spec = model.resolve(SHAPES[name]() if name in SHAPES else name)
        for text in args.budget.split(","):
            budget = parse_size(text)
            auto, acc, lit = one_row(spec, budget, args)
            rows += [auto, acc, lit]
            met = dict(trials=auto["trials"] <= 3, speedup=lit["autofit_speedup"] >= 3,
                       batch=auto["usable_batch"] >= lit["usable_batch"])
            summary.append((name, text, auto, acc, lit, met))
    print(f"\n# the sweep ({time.perf_counter() - started:.0f} s): autofit's wall time (planning included) against each "
          "baseline's")
    print(f"{'model':<8} {'budget':>8} {'trials':>6} {'autofit s':>9} {'plan s':>7} {'vs bisect':>9} {'vs accel':>8} "
          f"{'usable':>6} {'bisect':>6}  targets (<=3 trials, >=3x vs bisect, batch >=)")
    for name, text, auto, acc, lit, met in summary:
        print(f"{name:<8} {text:>8} {auto['trials']:>6} {auto['seconds']:>9.1f} {auto['plan_seconds']:>7.1f} "
              f"{lit['autofit_speedup']:>8.1f}x {acc['autofit_speedup']:>7.1f}x {auto['usable_batch']:>6} "
              f"{lit['usable_batch']:>6}  {' '.join(k if v else k.upper() + ' MISSED' for k, v in met.items())}")
    every = all(all(m.values()) for *_, m in summary)
    print(f"# targets {'met in every row' if every else 'MISSED in some row'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": " ".join(sys.argv), "rows": rows,
                       "targets_met": [dict(model=n, budget=t, **m) for n, t, *_, m in summary]}, fh, indent=2)
    return 0 if every else 1


if __name__ == "__main__":
    sys.exit(main())
