"""``autofit.estimate``: the built-in step of a transformers model (``autofit.memory.estimate``), or a user's own
training step on any ``nn.Module``: ``estimate(model, gpu, step=fn, batch=make_batch, batch_size=N)``.

``fn(model, batch)`` returns the loss (the user's forward and loss); ``make_batch(batch_size)`` returns a batch.
autofit runs that step on fake tensors (see ``autofit.sim.custom``), then accounts for it as for the built-in step:
the breakdown at the peak, the caching allocator's replay for reserved memory, the cuBLAS workspaces and the CUDA
context. No analytic fallback: a formula cannot know a user's step, so a step that cannot run on fake tensors is
an error that names the operation.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from autofit import gpu as gpus
from autofit import memory
from autofit.errors import ConfigError
from autofit.sim import custom
from autofit.sim.simulate import CATEGORY_NAMES, HOST


def estimate(model, gpu=None, *, step=None, batch=None, **kwargs) -> memory.MemoryEstimate:
    """``autofit.memory.estimate(model, gpu, **kwargs)``; with ``step`` (``step(model, batch) -> loss``) and
    ``batch`` (``batch(batch_size) -> batch``), the user's own step on ``model``, any ``nn.Module``
    (``estimate_step``; of the knobs, ``batch_size``, ``precision``, ``optimizer``, ``max_grad_norm`` and
    ``expandable_segments`` apply)."""
    if step is None and batch is None:
        return memory.estimate(model, gpu, **kwargs)
    if step is None or batch is None:
        raise ConfigError("a custom step needs both step=fn(model, batch) -> loss and batch=fn(batch_size)")
    allowed = {"batch_size", "precision", "optimizer", "max_grad_norm", "expandable_segments"}
    extra = sorted(set(kwargs) - allowed)
    if extra:
        raise ConfigError(f"{', '.join(extra)} do not apply to your own step (it decides its own shapes and method); "
                          f"pass only {', '.join(sorted(allowed))}")
    if "batch_size" not in kwargs:
        raise ConfigError("batch_size is required: the micro-batch your batch(batch_size) function makes")
    return estimate_step(model, gpu, step=step, batch=batch, **kwargs)


def estimate_step(model, gpu=None, *, step, batch, batch_size: int, precision: str | None = None,
                  optimizer: str = "adamw_torch_fused", max_grad_norm: float | None = 1.0,
                  expandable_segments: bool = False) -> memory.MemoryEstimate:
    """Peak memory of step 2 of ``step`` on ``model`` at ``batch_size`` on ``gpu``. Raises ``SimulationError``
    naming the operation a fake tensor cannot run, ``ConfigError`` for bad arguments."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"a custom step needs the nn.Module itself; got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a whole number >= 1; got {batch_size!r}")
    card = gpus.resolve(gpu)
    cfg = memory.step_config(card, method="full", precision=precision, optimizer=optimizer,
                             max_grad_norm=max_grad_norm)
    sim = custom.run(model, step, batch, cfg, batch_size=batch_size)
    live, by_category = _peak_breakdown(sim)
    workspaces = memory.workspace_bytes(cfg)
    margins = {"allocated": 0, "reserved": 0, "needed": 0}
    if cfg.device == "cuda":
        replay = memory._replay(sim, workspaces, expandable=expandable_segments)
        base = live + workspaces
        margins = {"allocated": max(0, replay.peak_allocated - base), "reserved": max(0, replay.peak_reserved - base),
                   "needed": max(0, memory._min_reserved(sim, workspaces, expandable=expandable_segments) - base)}
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    owner = SimpleNamespace(name=name, num_layers=1)
    result = memory._assemble(owner, cfg, batch_size, 1, live, by_category, "step 2 (your step)", workspaces,
                              rounding=margins["allocated"], reserved_margin=margins["reserved"],
                              needed_margin=margins["needed"], source="simulation",
                              kernel=memory._kernel_name(sim), depths=(), expandable=expandable_segments,
                              notes=("your own step(model, batch), simulated on fake tensors at full size",))
    from dataclasses import replace

    return replace(result, gpu_name=card.name)


def _peak_breakdown(sim) -> tuple[int, np.ndarray]:
    """Device bytes live at the peak of step 2 and their split by category."""
    tl = sim.timeline
    events = tl.events
    uids = np.where(events >= 0, events, -events - 1)
    delta = np.zeros((len(events), len(CATEGORY_NAMES)), dtype=np.int64)
    delta[np.arange(len(events)), sim.categories[uids]] = np.where(events >= 0, 1, -1) * tl.sizes[uids]
    base = np.zeros(len(CATEGORY_NAMES), dtype=np.int64)
    np.add.at(base, sim.categories[: tl.adopted], tl.sizes[: tl.adopted])
    live = base + np.cumsum(delta, axis=0)
    device = live.sum(axis=1) - live[:, HOST]
    in_step2 = sim.steps[uids] >= 2
    index = int(np.argmax(np.where(in_step2, device, -1)))
    by_category = live[index].copy()
    by_category[HOST] = 0
    return int(device[index]), by_category


@dataclass(frozen=True, kw_only=True, slots=True)
class StepPlan:
    """The micro-batch and accumulation for a user's own step on one card (what ``AccumulatingStep.from_plan``
    and ``batch_size_from`` take), with the estimate at that micro-batch and the budget it was checked against."""

    batch_size: int
    grad_accum: int
    effective_batch: int
    budget_bytes: int
    estimate: memory.MemoryEstimate
    tried: tuple[int, ...]  # micro-batches simulated, in order

    def __post_init__(self) -> None:
        if self.batch_size * self.grad_accum != self.effective_batch:
            raise ConfigError(f"batch_size x grad_accum must equal effective_batch ({self.batch_size} x "
                              f"{self.grad_accum} != {self.effective_batch})")


def plan_step(model, gpu=None, *, step, batch, effective_batch: int = 16, margin: float | None = None,
              precision: str | None = None, optimizer: str = "adamw_torch_fused",
              max_grad_norm: float | None = 1.0) -> StepPlan:
    """The largest micro-batch dividing ``effective_batch`` whose simulated step fits ``gpu``'s budget (the card
    less ``margin``, as ``autofit.plan`` budgets), and the accumulation that keeps ``effective_batch``. Raises
    ``DoesNotFitError`` when a micro-batch of one does not fit."""
    from autofit import planner
    from autofit.errors import DoesNotFitError
    from autofit.units import fmt_bytes

    if isinstance(effective_batch, bool) or not isinstance(effective_batch, int) or effective_batch < 1:
        raise ConfigError(f"effective_batch must be a whole number >= 1; got {effective_batch!r}")
    card = gpus.resolve(gpu)
    allowed = planner.budget(card, margin)
    sizes = [d for d in range(effective_batch, 0, -1) if effective_batch % d == 0]  # largest first
    tried: list[int] = []
    cache: dict[int, memory.MemoryEstimate] = {}

    def fits(size: int) -> bool:
        if size not in cache:
            tried.append(size)
            cache[size] = estimate_step(model, card, step=step, batch=batch, batch_size=size, precision=precision,
                                        optimizer=optimizer, max_grad_norm=max_grad_norm)
        return cache[size].required_bytes + memory.uncertainty_bytes(cache[size]) <= allowed

    # memory grows with the micro-batch: bisect over the divisors, smallest index = largest size
    lo, hi = 0, len(sizes) - 1
    if not fits(sizes[hi]):
        need = cache[sizes[hi]].required_bytes
        raise DoesNotFitError(f"your step at micro-batch 1 needs {fmt_bytes(need)} of a {fmt_bytes(allowed)} budget "
                              f"on {card.name}; shrink the model or its inputs, or use a larger card")
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(sizes[mid]):
            hi = mid
        else:
            lo = mid + 1
    size = sizes[lo]
    return StepPlan(batch_size=size, grad_accum=effective_batch // size, effective_batch=effective_batch,
                    budget_bytes=allowed, estimate=cache[size], tried=tuple(tried))
