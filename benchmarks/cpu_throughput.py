"""The throughput model on the CPU against what ``autofit.train`` measures there.

For each configuration, plans for the host (``gpu="cpu"``: the CPU's matmul and copy rates are measured on first use,
``autofit.gpu.host_speed``), trains a few steps from random weights with a tokenizer built from the data, and
compares the plan's estimated tokens/s with the mean the run's memory log measured (the first step, which warms up,
excluded). The ratio measured / estimated is what ``planner.HOST_STEP_EFFICIENCY`` was set from. On a shared machine
the CPU's rates change with the load, so they are measured afresh just before each run (not read from the cache),
and the estimate uses those.

    python benchmarks/cpu_throughput.py
    python benchmarks/cpu_throughput.py --steps 8 --json benchmarks/results/cpu-2026-12-02/cpu_throughput.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autofit import gpu, training  # noqa: E402

CONFIGS = [  # (model, sequence length, effective batch)
    ("distilgpt2", 128, 4),
    ("distilgpt2", 256, 4),
    ("HuggingFaceTB/SmolLM2-135M", 128, 4),
    ("openai-community/gpt2", 128, 2),
]


def run(model: str, seq_len: int, effective_batch: int, steps: int, data: Path) -> dict:
    speed = gpu.measure_host_speed()  # measured now, under the load the run will see
    gpu.host_speed = lambda: speed
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = training.train(model, str(data), output_dir=out, gpu="cpu", steps=steps, random_init=True,
                                seq_len=seq_len, effective_batch=effective_batch, method="full", progress=False)
        seconds = time.perf_counter() - started
    p = result.plan
    return dict(model=model, seq_len=seq_len, effective_batch=effective_batch, micro_batch=p.batch_size,
                steps=steps, estimated_tokens_per_second=round(p.tokens_per_second, 1),
                measured_tokens_per_second=round(result.tokens_per_second, 1),
                ratio=round(result.tokens_per_second / p.tokens_per_second, 3), run_seconds=round(seconds, 1),
                host_gflops=round(speed.matmul_tflops * 1e3, 1), host_gbs=round(speed.bandwidth_gbs, 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--data", default=str(ROOT / "examples" / "notes.txt"))
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    speed = gpu.host_speed()
    print(f"host (first use): {speed.matmul_tflops * 1e3:.1f} GFLOPS fp32 matmul, {speed.bandwidth_gbs:.1f} GB/s copy, "
          f"{speed.threads} threads ({speed.source})")
    rows = []
    for model, seq_len, batch in CONFIGS:
        row = run(model, seq_len, batch, args.steps, Path(args.data))
        rows.append(row)
        print(f"  {model:<32} {seq_len:>4} x {batch:<2} (micro {row['micro_batch']}): estimated "
              f"{row['estimated_tokens_per_second']:>7.1f} tokens/s, measured {row['measured_tokens_per_second']:>7.1f}"
              f" ({row['ratio']:.2f}x), {row['run_seconds']:.0f} s; host {row['host_gflops']} GFLOPS at the time")
        sys.stdout.flush()
    ratios = sorted(r["ratio"] for r in rows)
    print(f"measured / estimated: median {ratios[len(ratios) // 2]:.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(
            command="python benchmarks/cpu_throughput.py " + " ".join(argv or sys.argv[1:]),
            host=dict(matmul_tflops=speed.matmul_tflops, bandwidth_gbs=speed.bandwidth_gbs, threads=speed.threads),
            rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
