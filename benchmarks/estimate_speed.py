"""Speed of ``autofit.estimate`` for every catalog model, against simulating the full depth.

For each model: the cold estimate (first call in the process: resolving the config, simulating 3 and 4 layers,
replaying the allocator), the baseline a naive simulator would run (one simulation of every layer at the same
shape), their ratio and whether both give the same peak; then a ``StepModel`` built at the same sequence length and
the time of one warm query. Targets: a cold estimate at most 10 s on a 2-core machine, 70B-class included; a warm
query under 1 ms.

    python benchmarks/estimate_speed.py                      # every catalog model, LoRA, batch 4 x 512
    python benchmarks/estimate_speed.py --method qlora --models distilgpt2,meta-llama/Llama-3.1-70B --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import_started = time.perf_counter()
from autofit import memory, model  # noqa: E402
from autofit.sim import simulate
from autofit import gpu as gpus  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - import_started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", default="rtx3060")
    parser.add_argument("--method", default="lora", choices=simulate.METHODS)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--models", default=None, help="comma-separated (default: the whole catalog)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the full-depth simulations")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else model.catalog_names()
    card = gpus.resolve(args.gpu)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; import {IMPORT_SECONDS:.1f}s; "
          f"{args.method}, batch {args.batch_size} x {args.seq_len}, {card.name}")
    header = (f"{'model':<40} {'layers':>6} {'cold s':>7} {'full-depth s':>12} {'ratio':>6} {'same peak':>9} "
              f"{'model s':>8} {'query us':>9}")
    print(header)
    rows = []
    for name in names:
        started = time.perf_counter()
        spec = model.resolve(name)
        seq = min(args.seq_len, spec.max_positions or args.seq_len)
        est = memory.estimate(spec, card, batch_size=args.batch_size, seq_len=seq, method=args.method)
        cold = time.perf_counter() - started
        full_seconds = same = None
        if not args.no_baseline:
            started = time.perf_counter()
            full = simulate.run(spec, est.config, batch_size=args.batch_size, seq_len=seq)
            full_seconds = time.perf_counter() - started
            tensors = sum((est.weights, est.gradients, est.optimizer_state, est.activations, est.logits_and_loss,
                           est.temporaries))
            same = abs(tensors - memory.device_peak(full)) <= 1024  # see test_depth_extrapolation_*
        started = time.perf_counter()
        sm = memory.StepModel(spec, est.config, seq_len=seq)
        built = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(1000):
            sm.query(args.batch_size)
        query_us = (time.perf_counter() - started) / 1000 * 1e6
        row = dict(model=name, layers=spec.num_layers, cold_seconds=round(cold, 2),
                   full_depth_seconds=None if full_seconds is None else round(full_seconds, 2),
                   same_peak=same, step_model_seconds=round(built, 2), query_microseconds=round(query_us, 1),
                   peak_reserved=est.peak_reserved)
        rows.append(row)
        ratio = f"{full_seconds / cold:6.2f}" if full_seconds else "     -"
        print(f"{name:<40} {spec.num_layers:>6} {cold:>7.2f} {full_seconds or 0:>12.2f} {ratio} {str(same):>9} "
              f"{built:>8.2f} {query_us:>9.1f}", flush=True)
    worst_cold = max(r["cold_seconds"] for r in rows)
    worst_query = max(r["query_microseconds"] for r in rows)
    print(f"# worst cold estimate {worst_cold:.2f}s (target <= 10s): {'met' if worst_cold <= 10 else 'MISSED'}; "
          f"worst warm query {worst_query:.1f}us (target < 1000us): {'met' if worst_query < 1000 else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": " ".join(sys.argv), "import_seconds": IMPORT_SECONDS, "rows": rows}, fh, indent=2)
    return 0 if worst_cold <= 10 and worst_query < 1000 else 1


if __name__ == "__main__":
    sys.exit(main())
