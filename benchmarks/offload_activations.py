"""What offloading activations (torch's ``save_on_cpu`` with pinned buffers) buys on the card and costs on the host
and the link, for catalog models at long sequences: the least a step needs (micro-batch 1, checkpointing on and off)
with the saved tensors on the card and offloaded, side by side, with the pinned host RAM and the bytes moved each way.

    python benchmarks/offload_activations.py
    python benchmarks/offload_activations.py --json benchmarks/results/cpu-2026-12-05/offload_activations.json

Every figure is the simulation's (``memory.estimate``), nothing is allocated; "ratio" is the need offloaded over the
need kept on the card. The link time is the planner's: the bytes each way over the card's PCIe link at the assumed
efficiency, twice (to the host in the forward, back in the backward).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

CASES = [  # model, method, sequence length: long enough that activations and logits, not weights, dominate
    ("distilgpt2", "full", 1024),
    ("HuggingFaceTB/SmolLM2-360M", "lora", 4096),
    ("Qwen/Qwen2.5-0.5B", "full", 2048),
    ("meta-llama/Llama-3.2-1B", "lora", 4096),
    ("google/flan-t5-base", "full", 512),
    ("bert-base-uncased", "full", 512),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", default="rtx3060")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)

    from autofit import gpu as gpus
    from autofit import memory, offload

    card = gpus.resolve(args.gpu)
    gib = 2**30
    rows = []
    print(f"# {card.name}, micro-batch 1; need = what the card must offer (min reserved + CUDA context)")
    print(f"{'model':<28} {'method':<6} {'seq':>5} {'ckpt':<4} {'need kept':>10} {'offloaded':>10} {'ratio':>6} "
          f"{'pinned host':>12} {'each way':>9} {'link s':>7} {'est s':>6}")
    for name, method, seq in CASES:
        for ckpt in (False, True):
            started = time.perf_counter()
            kept = memory.estimate(name, card, batch_size=1, seq_len=seq, method=method,
                                   gradient_checkpointing=ckpt)
            moved = memory.estimate(name, card, batch_size=1, seq_len=seq, method=method,
                                    gradient_checkpointing=ckpt, offload_activations=True)
            link = offload.activation_seconds(moved.offloaded_copied, card)
            row = dict(model=name, method=method, seq_len=seq, checkpointing=ckpt, need_kept=kept.required_bytes,
                       need_offloaded=moved.required_bytes, ratio=moved.required_bytes / kept.required_bytes,
                       pinned_host=moved.offloaded_pinned, copied_each_way=moved.offloaded_copied,
                       link_seconds=link, seconds=time.perf_counter() - started)
            rows.append(row)
            print(f"{name:<28} {method:<6} {seq:>5} {'on' if ckpt else 'off':<4} {kept.required_bytes / gib:>8.2f}Gi "
                  f"{moved.required_bytes / gib:>8.2f}Gi {row['ratio']:>6.3f} {moved.offloaded_pinned / gib:>10.2f}Gi "
                  f"{moved.offloaded_copied / gib:>7.2f}Gi {link:>7.3f} {row['seconds']:>6.1f}", flush=True)
    best = min(rows, key=lambda r: r["ratio"])
    worst = max(rows, key=lambda r: r["ratio"])
    print(f"# offloading needs {best['ratio']:.3f}x (best: {best['model']}, checkpointing "
          f"{'on' if best['checkpointing'] else 'off'}) to {worst['ratio']:.3f}x (worst: {worst['model']}, "
          f"checkpointing {'on' if worst['checkpointing'] else 'off'}) of the need kept on the card")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(dict(command=" ".join(["python", "benchmarks/offload_activations.py", *(argv or sys.argv[1:])]),
                           card=card.name, rows=rows), fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
