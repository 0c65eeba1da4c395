"""What DDP and FSDP2 add to one rank's memory, measured against autofit.distributed's named components.

A world of one still builds DDP's gradient buckets and FSDP2's flat shards and all-gather buffers, so one card (or the
CPU with gloo) shows each strategy's overhead: the same two AdamW steps of a model with random weights, plain, under
DDP (``gradient_as_bucket_view=False``, the Trainer's setting) and under FSDP2 ``fully_shard`` per decoder layer and
at the root; the peak over each (CUDA: ``torch.cuda.max_memory_allocated``; CPU: autofit's tracker over the real
run) minus the plain run's, against ``distributed.bucket_bytes`` and ``distributed.fsdp_extra``.

    python benchmarks/ranks_overhead.py --cuda --model distilgpt2 --batch 4 --seq-len 512
    python benchmarks/ranks_overhead.py --model distilgpt2 --layers 2 --batch 2 --seq-len 64   # CPU, gloo
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from autofit import distributed  # noqa: E402
from autofit import model as models  # noqa: E402
from autofit.sim import simulate  # noqa: E402
from autofit.sim.tracker import Tracker  # noqa: E402


def _build(spec, layers: int, device: str):
    torch.manual_seed(0)
    cfg = simulate.StepConfig(device="cpu", precision="32-true")
    model = simulate.build_model(spec, cfg, layers, device="meta")
    model.to_empty(device=device)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _steps(model, strategy: str, batch: int, seq: int, vocab: int, device: str) -> None:
    if strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=distributed.BUCKET_CAP_MB,
                                                          gradient_as_bucket_view=False)
    elif strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in simulate.decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    for _ in range(2):
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def measure(spec, layers: int, strategy: str, batch: int, seq: int, device: str) -> int:
    """Peak bytes of building ``spec`` at ``layers`` layers and two steps under ``strategy`` ("plain", "ddp",
    "fsdp"), above what was allocated before."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model = _build(spec, layers, device)
        _steps(model, strategy, batch, seq, spec.vocab_size, device)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del model
        return peak
    tracker = Tracker()
    with tracker:
        model = _build(spec, layers, device)
        _steps(model, strategy, batch, seq, spec.vocab_size, device)
    del model
    return tracker.peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="on cuda:0 with NCCL (default: the CPU with gloo)")
    parser.add_argument("--model", default="distilgpt2")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the row as JSON")
    args = parser.parse_args(argv)
    device = "cuda" if args.cuda else "cpu"
    spec = models.resolve(args.model)
    layers = args.layers or spec.num_layers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if args.cuda else "gloo", rank=0, world_size=1)
    started = time.monotonic()
    try:
        peaks = {s: measure(spec, layers, s, args.batch, args.seq_len, device) for s in ("plain", "ddp", "fsdp")}
    finally:
        dist.destroy_process_group()
    probe = _build(spec, layers, "meta")
    layer = simulate.decoder_layers(probe)[0]
    layer_bytes = 4 * sum(p.numel() for p in layer.parameters())
    total = 4 * sum(p.numel() for p in probe.parameters())
    shape = distributed.FsdpShape(layer_gathered=layer_bytes, layer_grad=layer_bytes,
                                  root_gathered=total - layers * layer_bytes)
    estimate = {"ddp": distributed.bucket_bytes([4 * p.numel() for p in probe.parameters() if p.requires_grad]),
                "fsdp": distributed.fsdp_extra(shape)}
    row = dict(section="ranks", model=spec.name, layers=layers, batch_size=args.batch, seq_len=args.seq_len,
               device=torch.cuda.get_device_name(0) if args.cuda else "cpu (gloo)",
               measure="max_memory_allocated" if args.cuda else "tracker (real CPU run)",
               plain_peak=peaks["plain"], seconds=round(time.monotonic() - started, 1))
    print(f"# {' '.join(['python'] + sys.argv)}")
    print(f"{spec.name} ({layers} layers), batch {args.batch} x {args.seq_len}, world of 1 on {row['device']}; "
          f"plain peak {peaks['plain']:,} B ({row['measure']})")
    for s in ("ddp", "fsdp"):
        measured = peaks[s] - peaks["plain"]
        row[f"{s}_measured"], row[f"{s}_estimated"] = measured, estimate[s]
        ratio = f"{estimate[s] / measured:.3f}" if measured else "n/a"
        print(f"  {s:<5} overhead measured {measured:>14,} B   estimated {estimate[s]:>14,} B   estimated/measured "
              f"{ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
