"""The allocator's margin over live tensors as a step gets deeper: why ``memory`` carries its largest simulated
value to the full depth instead of extrapolating a line through two depths.

For each model and configuration, a step simulated at 2, 3, 4, 6 and 8 layers is replayed through the allocator
model: reserved memory on a card with memory to spare, and the least it runs in, each minus the live tensors.

    python benchmarks/margin_by_depth.py
    python benchmarks/margin_by_depth.py --models distilgpt2 --batch-sizes 2,4 --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys

from autofit import gpu, memory, model
from autofit.sim import simulate

DEPTHS = (2, 3, 4, 6, 8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="meta-llama/Llama-3.2-1B,Qwen/Qwen2.5-0.5B")
    parser.add_argument("--batch-sizes", default="3,4")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    card = gpu.resolve("a100-80gb")
    rows = []
    for name, method, ckpt, b in itertools.product(args.models.split(","), ("full", "lora"), (False, True),
                                                   [int(x) for x in args.batch_sizes.split(",")]):
        spec = model.resolve(name)
        cfg = memory.step_config(card, method=method, gradient_checkpointing=ckpt)
        ws = memory.workspace_bytes(cfg)
        row = dict(model=name, method=method, checkpointing=ckpt, batch_size=b, depths={})
        for d in (d for d in DEPTHS if d <= spec.num_layers):
            sim = simulate.run(spec, cfg, batch_size=b, seq_len=args.seq_len, num_layers=d)
            live = memory.device_peak(sim) + ws
            dynamic = live - int(sim.timeline.sizes[: sim.timeline.adopted].sum()) - memory._optimizer_bytes(sim)
            row["depths"][d] = dict(reserved_margin=memory._replay(sim, ws).peak_reserved - live,
                                    needed_margin=memory._min_reserved(sim, ws) - live, dynamic=dynamic)
        shallow = max(row["depths"][d]["needed_margin"] for d in (2, 3))
        deeper = {d: v for d, v in row["depths"].items() if d > 3}
        row["worst_excess_share"] = max((v["needed_margin"] - shallow) / v["dynamic"] for v in deeper.values()) \
            if deeper else None
        rows.append(row)
        margins = " ".join(f"d{d}:{v['needed_margin'] / 2**30:6.2f}" for d, v in row["depths"].items())
        excess = f"{row['worst_excess_share']:+.3f}" if row["worst_excess_share"] is not None else "-"
        print(f"{name:<28} {method:<4} ckpt {'on ' if ckpt else 'off'} b{b}  needed margin GiB {margins}   "
              f"deeper than max(d2,d3), share of dynamic: {excess}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command="python " + " ".join(sys.argv), python=platform.python_version(), rows=rows), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
