"""Estimate accuracy on a real GPU: the estimate against measured peak allocated, peak reserved and NVML memory.

For distilgpt2, gpt2, SmolLM2-135M and TinyLlama-1.1B shapes (random weights), full fine-tuning in bf16, LoRA and
QLoRA (when bitsandbytes is installed), checkpointing off and on, at two (batch, length) points each: the estimate
(simulated, nothing allocated), then three real training steps after ``reset_peak_memory_stats`` on the card, then
``max_memory_allocated``, ``max_memory_reserved`` and this process's memory per NVML. Target: every configuration
within 5% on allocated. The constants the estimator assumes for this GPU family (CUDA context, fragmentation) are
fitted from the rows and printed with the results file as their source.

    python benchmarks/gpu_accuracy.py             # on the card found; writes benchmarks/results/<card>-<date>/
    python benchmarks/gpu_accuracy.py --dry-run   # the same harness on the budgeted CPU device, 2-layer shapes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_common as common  # noqa: E402
from autofit import model  # noqa: E402

MODELS = ["distilgpt2", "openai-community/gpt2", "HuggingFaceTB/SmolLM2-135M", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"]
POINTS = [(2, 512), (8, 1024)]
DRY_POINTS = [(2, 64), (4, 128)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="run on the budgeted CPU device with 2-layer shapes")
    parser.add_argument("--models", default=None, help="comma-separated (default: the four above)")
    parser.add_argument("--out", default=None, help="results folder name under benchmarks/results")
    args = parser.parse_args(argv)
    dry = common.cuda_or_dry(args)
    common.silence()
    env = common.environment(dry)
    card = common.detected_card(dry)
    dev = common.device(dry)
    rows = []
    for name in (args.models.split(",") if args.models else MODELS):
        spec = model.resolve(name)
        if dry:
            spec = common.shrink(spec)
        for method in common.methods(dry):
            for checkpointing in (False, True):
                cfg = common.step_config(card, method, checkpointing, dry)
                for b, s in DRY_POINTS if dry else POINTS:
                    row = common.measure(spec, cfg, dev, b, s)
                    rows.append(row)
                    err = row["error_allocated"]
                    print(f"{name:<36} {method:<5} ckpt {'on ' if checkpointing else 'off'} b{b:<2} s{s:<5} "
                          f"{row['outcome']:<4} allocated {err:+.2%}" if err is not None else
                          f"{name:<36} {method:<5} b{b} s{s}: {row['outcome']}", flush=True)
    ran = [r for r in rows if r["outcome"] == "fits"]
    summary = {what: common.errors(ran, what) for what in ("allocated", "reserved", "device")}
    summary["within_5pct_allocated"] = all(abs(r["error_allocated"]) <= 0.05 for r in ran)
    fitted = {}
    if not dry and ran:
        context = [r["measured_device"] - r["measured_reserved"] for r in ran if r["measured_device"]]
        fitted = {"cuda_context_bytes": int(statistics.median(context)) if context else None,
                  "reserved_over_allocated": statistics.median(r["measured_reserved"] / r["measured_allocated"]
                                                               for r in ran)}
    folder = common.out_dir(env, args.out)
    common.write(folder / "gpu_accuracy.json", {"environment": env, "rows": rows, "summary": summary,
                                                "fitted_constants": fitted})
    for what in ("allocated", "reserved", "device"):
        s = summary[what]
        if s.get("n"):
            print(f"# {what}: mean absolute error {s['mean_abs']:.2%}, worst {s['worst']:.2%} over {s['n']} configs")
    print(f"# every config within 5% on allocated: {'met' if summary['within_5pct_allocated'] else 'MISSED'}")
    if fitted:
        print(f"# fitted for {card.family}: CUDA context {fitted['cuda_context_bytes']} bytes, reserved/allocated "
              f"{fitted['reserved_over_allocated']:.3f} (source: {folder / 'gpu_accuracy.json'})")
    print(f"# wrote {folder / 'gpu_accuracy.json'}")
    return 0 if summary["within_5pct_allocated"] else 1


if __name__ == "__main__":
    sys.exit(main())
