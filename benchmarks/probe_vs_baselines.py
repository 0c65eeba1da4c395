"""autofit's probe against the batch-size searches people use today, on the same model, budget and trial.

Every method runs the same trial: a fresh model of the same architecture, two training steps of the real step and an
evaluation pass, on the same device, raising an out-of-memory error past the budget. The methods:

* autofit: the plan from the estimate, then ``probe`` (the estimate's micro-batch, bracketed by 5%);
* accelerate's ``find_executable_batch_size`` as it ships (start at 128, multiply by 0.9 after each error);
* Lightning-style doubling-then-bisect (``BatchSizeFinder(mode="binsearch")``'s documented search: start at 2,
  double until an error, then bisect between the last success and the failure).

autofit keeps the effective batch exact, so its micro-batch divides it; "usable" gives, for every method, the largest
micro-batch that divides the effective batch at or below what it found, the size a user who keeps the effective batch
can train with. Targets: autofit at most 3 trials, at least 3x less wall time than doubling-then-bisect, and a
usable batch at least as large.

    python benchmarks/probe_vs_baselines.py                       # the budgeted CPU device, anywhere
    python benchmarks/probe_vs_baselines.py --cuda --model distilgpt2 --budget 6GiB   # a real card, capped
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from autofit import memory, model, planner, probing
from autofit.gpu import GpuInfo
from autofit.units import fmt_bytes, parse_size


def tiny_config():
    from transformers import GPT2Config

    return GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=256, bos_token_id=0,
                      eos_token_id=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model name (default: a small GPT-2 shape built here)")
    parser.add_argument("--budget", default="160MiB", help="memory the trials may use")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--effective-batch", type=int, default=64)
    parser.add_argument("--cuda", action="store_true", help="run on CUDA device 0, capped at the budget")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    budget = parse_size(args.budget)
    spec = model.resolve(args.model or tiny_config())
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
          f"{'CUDA device 0' if args.cuda else 'the budgeted CPU device'}")

    # one untimed step first: the first trial in a process pays for lazy imports and kernel set-up, whoever runs it
    probing.run_trial(spec, memory.step_config(card, method="full"), device, batch_size=1,
                      seq_len=args.seq_len, number=0)
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
        r["usable_batch"] = max((d for d in range(1, r["batch"] + 1) if args.effective_batch % d == 0), default=0)
    print(f"{'method':<44} {'trials':>6} {'OOM':>4} {'seconds':>8} {'batch':>6} {'usable':>6}  sizes tried")
    for r in rows:
        print(f"{r['method']:<44} {r['trials']:>6} {r['ooms']:>4} {r['seconds']:>8.1f} {r['batch']:>6} "
              f"{r['usable_batch']:>6}  {r['sizes']}")
    print(f"# autofit's time: {autofit['plan_seconds']:.1f}s planning from the estimate, "
          f"{autofit['seconds'] - autofit['plan_seconds']:.1f}s probing")
    speedup = lightning["seconds"] / autofit["seconds"]
    met = dict(trials=autofit["trials"] <= 3, speedup=speedup >= 3,
               batch=autofit["usable_batch"] >= lightning["usable_batch"])
    print(f"# autofit: {autofit['trials']} trials (target <= 3: {'met' if met['trials'] else 'MISSED'}), "
          f"{speedup:.1f}x less wall time than doubling-then-bisect (target >= 3x: "
          f"{'met' if met['speedup'] else 'MISSED'}), usable batch {autofit['usable_batch']} vs "
          f"{lightning['usable_batch']} (target: at least as large: {'met' if met['batch'] else 'MISSED'}); "
          f"{accelerate['seconds'] / autofit['seconds']:.1f}x less than accelerate's")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": " ".join(sys.argv), "budget_bytes": budget, "rows": rows, "targets_met": met},
                      fh, indent=2)
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
