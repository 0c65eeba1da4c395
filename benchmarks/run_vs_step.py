"""The memory of a run against the memory of two steps, for the catalog.

For each model: a run of ``--steps`` steps whose batches are padded to different lengths (each sample's length
drawn evenly from 1 to ``--seq-len``, seeded) with an evaluation pass every 10 steps, replayed through the allocator
model, against the two-step estimate at the full length: peak reserved on a card with memory to spare, and the least
memory each runs in, with PyTorch's default allocator and with expandable segments. Ratios above 1 are what a plan
made from two steps would miss.

    python benchmarks/run_vs_step.py                                   # every catalog model, LoRA, batch 4 x 512
    python benchmarks/run_vs_step.py --method full --models distilgpt2,Qwen/Qwen2.5-0.5B --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

from autofit import model, runs  # noqa: E402
from autofit.errors import AutofitError  # noqa: E402
from autofit.units import fmt_bytes  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", default="a100-80gb", help="a card every model fits (the ratios are what matters)")
    parser.add_argument("--method", default="lora", choices=("full", "lora", "qlora"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=runs.DEFAULT_STEPS)
    parser.add_argument("--models", default=None, help="comma-separated (default: the whole catalog)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else model.catalog_names()
    rows = []
    print(f"{'model':<40} {'run/step reserved':>17} {'run/step need':>13} {'expandable need':>15} {'seconds':>8} "
          f"{'quick/exact':>11} {'quick us':>8}")
    for name in names:
        started = time.perf_counter()
        row = dict(model=name)
        try:
            kw = dict(batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps, eval_every=10,
                      eval_batch_size=args.batch_size, method=args.method)
            plain = runs.estimate_run(name, args.gpu, **kw)
            flex = runs.estimate_run(name, args.gpu, expandable_segments=True, **kw)
        except AutofitError as err:
            print(f"{name:<40} not modelled: {err}")
            rows.append(dict(row, error=str(err)))
            continue
        step = plain.step
        fast = runs.run_model(model.resolve(name), plain.config, args.seq_len)
        fast.quick_need(args.batch_size)  # fits its margin on first use
        t0 = time.perf_counter()
        quick = fast.quick_need(args.batch_size)
        row["quick_query_us"] = round((time.perf_counter() - t0) * 1e6, 1)
        row["quick_need_over_exact"] = round((quick + plain.cuda_context) / plain.required_bytes, 4)
        row.update(step_peak_reserved=step.peak_reserved, step_required=step.required_bytes,
                   run_peak_reserved=plain.peak_reserved, run_required=plain.required_bytes,
                   run_required_expandable=flex.required_bytes, lengths=list(plain.lengths),
                   reserved_after={str(k): v for k, v in plain.reserved_after.items()},
                   seconds=round(time.perf_counter() - started, 2))
        row["reserved_ratio"] = round(plain.peak_reserved / step.peak_reserved, 4)
        row["need_ratio"] = round(plain.required_bytes / step.required_bytes, 4)
        row["need_ratio_expandable"] = round(flex.required_bytes / step.required_bytes, 4)
        rows.append(row)
        print(f"{name:<40} {row['reserved_ratio']:>17.3f} {row['need_ratio']:>13.3f} "
              f"{row['need_ratio_expandable']:>15.3f} {row['seconds']:>8.1f} {row['quick_need_over_exact']:>11.3f} "
              f"{row['quick_query_us']:>8.1f}   (two steps: "
              f"{fmt_bytes(step.peak_reserved)} reserved, needs {fmt_bytes(step.required_bytes)})", flush=True)
    done = [r for r in rows if "error" not in r]
    if done:
        print(f"\nworst run/step: reserved {max(r['reserved_ratio'] for r in done):.3f}, "
              f"need {max(r['need_ratio'] for r in done):.3f}, need with expandable segments "
              f"{max(r['need_ratio_expandable'] for r in done):.3f} over {len(done)} models")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command="python " + " ".join(sys.argv), python=platform.python_version(),
                           args=vars(args), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
