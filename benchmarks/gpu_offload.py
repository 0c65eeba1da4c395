"""The offloading levers on a real card: one model trained with plain, 8-bit and CPU-offloaded AdamW state, and with
its activations offloaded (torch's ``save_on_cpu`` with pinned buffers, plain AdamW); the card's peaks, the host
memory the lever adds and tokens per second, each beside the plan's figure.

Run as part ``offload`` of ``gpu_validation.py`` (``--parts ...,offload``). On CUDA the real libraries run
(bitsandbytes ``AdamW8bit``, torchao ``CPUOffloadOptimizer``; a lever whose library does not import is skipped with a
note). The dry run proves the harness on the CPU with the engine's imitations of those optimizers, so its host and
speed columns mean nothing there.
"""

from __future__ import annotations

import threading
import time

import psutil
import torch

from autofit import memory, offload, planner
from autofit.sim import simulate
from autofit.sim.simulate import StepConfig

MODEL = "Qwen/Qwen2.5-0.5B"
OPTIMIZERS = ["adamw_torch_fused", "adamw_8bit", "adamw_cpu_offload", "activations"]  # the last: plain AdamW,
# activations offloaded
PRECISION = "bf16-true"  # 16-bit weights: the precision a lever-bound plan takes on a small card
BATCH, SEQ, STEPS = 4, 512, 6
DRY_BATCH, DRY_SEQ, DRY_STEPS = 1, 64, 3


def library_optimizer(params, name: str, dry: bool):
    """The optimizer a Trainer runs for ``name``: the real library on CUDA, the engine's imitation in a dry run.
    Returns None where the library does not import."""
    if dry or name in ("adamw_torch_fused", "adamw_torch"):
        return simulate.make_optimizer(params, name) if not (dry and name == "adamw_cpu_offload") else \
            simulate.CpuOffloadAdam(params)
    try:
        if name == "adamw_8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=1e-4)
        if name == "paged_adamw_8bit":
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(params, lr=1e-4)
        cls, kwargs = offload.training_optimizer(name)
        return cls(params, lr=1e-4, **{k: v for k, v in kwargs.items() if k != "fused"})
    except Exception:  # noqa: BLE001 - a missing library skips the row, with its reason
        return None


class _HostWatch:
    """The process's resident set, sampled every 10 ms: its peak over a region."""

    def __init__(self) -> None:
        self.peak, self._on = 0, True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        proc = psutil.Process()
        while self._on:
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.01)

    def stop(self) -> int:
        self._on = False
        self._thread.join()
        return self.peak


def measure(spec, card, dev, optimizer: str, *, dry: bool) -> dict:
    """One optimizer: the estimate (simulated card peaks, host bytes by layout, the planner's tokens/s) against
    ``STEPS`` real steps on ``dev``."""
    batch, seq, steps = (DRY_BATCH, DRY_SEQ, DRY_STEPS) if dry else (BATCH, SEQ, STEPS)
    activations = optimizer == "activations"
    if activations and dry:
        return dict(section="offload", model=spec.name, optimizer=optimizer, batch_size=batch, seq_len=seq,
                    skipped="the dry run's CPU has no card to offload activations from")
    cfg = StepConfig(method="full", precision="32-true" if dry else PRECISION,
                     optimizer="adamw_torch_fused" if activations else optimizer, offload_activations=activations,
                     device="cpu" if dry else "cuda", compute_capability=card.compute_capability or (8, 6))
    est = memory.simulate_point(spec, cfg, batch_size=batch, seq_len=seq)
    trainable = spec.total_params
    speed = planner.throughput(spec, cfg, card, batch_size=batch, seq_len=seq, grad_accum=1, trainable=trainable,
                               offloaded=est.offloaded_copied)
    row = dict(section="offload", model=spec.name, optimizer=optimizer, precision=cfg.precision, batch_size=batch,
               seq_len=seq, predicted_allocated=est.peak_allocated, predicted_min_reserved=est.min_reserved,
               predicted_host=sum(offload.host_bytes(spec, cfg).values()) + est.offloaded_pinned,
               predicted_tokens_per_second=speed.tokens_per_second)
    with dev.session():
        return _steps(spec, cfg, dev, optimizer, row, batch, seq, steps, dry, est)


def _steps(spec, cfg, dev, optimizer, row, batch, seq, steps, dry, est) -> dict:
    rss_before = psutil.Process().memory_info().rss
    watch = _HostWatch()
    model = dev.build(spec, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = library_optimizer(params, cfg.optimizer, dry)
    if opt is None:
        watch.stop()
        row.update(skipped=f"{cfg.optimizer}: its library does not import here")
        return row
    dev.reset()
    seconds = None
    for _ in range(steps):
        data = simulate.make_batch(batch, seq, spec.vocab_size, device=dev.torch_device)
        dev.sync()
        started = time.perf_counter()
        simulate.train_step(model, opt, params, cfg, data, dev.autocast())  # save_on_cpu(pin_memory=True) if asked
        dev.sync()
        seconds = time.perf_counter() - started
    allocated, reserved = dev.peaks()
    host_peak = watch.stop()
    weights = sum(p.numel() * p.element_size() for p in params)
    row.update(measured_allocated=allocated, measured_reserved=reserved,
               measured_host_added=host_peak - rss_before, weights_bytes=weights,
               measured_tokens_per_second=batch * seq / seconds if seconds else None)
    for what, m, p in (("allocated", allocated, est.peak_allocated), ("reserved", reserved, est.min_reserved)):
        row[f"error_{what}"] = (p - m) / m if m else None
    del opt, model, params
    dev.cleanup()
    return row


def line(row: dict) -> str:
    if row.get("skipped"):
        return f"offload {row['optimizer']:<18} skipped: {row['skipped']}"
    mib = 1024 ** 2
    return (f"offload {row['optimizer']:<18} allocated {row['measured_allocated'] / mib:,.0f} MiB (estimate "
            f"{row['predicted_allocated'] / mib:,.0f}), reserved {row['measured_reserved'] / mib:,.0f} MiB (least "
            f"estimated {row['predicted_min_reserved'] / mib:,.0f}), host +{row['measured_host_added'] / mib:,.0f} "
            f"MiB (the lever's host state {row['predicted_host'] / mib:,.0f}), "
            f"{row['measured_tokens_per_second'] or 0:,.0f} tokens/s (estimate {row['predicted_tokens_per_second']:,.0f})")
