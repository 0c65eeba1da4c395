"""Figures of estimates and plans: what a step needs, by part, against the micro-batch, with the budget and the card.

The stack at each batch is what a step needs there (``MemoryEstimate.components(tight=True)``: the parts sum to
``required_bytes``, the figure the text prints as "needs"); the marked batch shows the exact estimate or plan itself,
so the plot and the text agree to the byte there, and the fast model fills in the batches around it, its allocator
margin scaled to the exact one at the marked batch. Parts that are zero at every batch are left out of the legend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from autofit import gpu as gpus
from autofit import memory as est
from autofit.errors import ConfigError
from autofit.units import fmt_bytes, gib


@dataclass(frozen=True, kw_only=True, slots=True)
class Sweep:
    """The numbers a figure draws: bytes per part at each batch, the marked batch and the budget line."""

    title: str
    batches: tuple[int, ...]
    parts: dict[str, tuple[int, ...]]  # part -> bytes at each batch; the parts at a batch sum to what it needs
    marked: int  # the batch asked for (an estimate) or chosen (a plan)
    marked_label: str
    budget: int | None  # bytes a step may need on the card, or None for a card of unknown size
    budget_label: str
    largest: int | None = None  # the largest micro-batch that fits, where known

    def total(self, batch: int) -> int:
        i = self.batches.index(batch)
        return sum(values[i] for values in self.parts.values())


def estimate_sweep(estimate: est.MemoryEstimate, *, gpu=None, progress: Callable[[str], None] | None = None) -> Sweep:
    """The sweep of an ``estimate``: its own parts at its batch, the fast model's around it, and the budget of the
    card it was made for (``gpu``; the CPU for a host estimate)."""
    from autofit import planner

    card = gpus.resolve("cpu" if estimate.config.device == "cpu" else gpu)
    anchors = {estimate.batch_size: estimate.components(tight=True)}
    return _sweep(estimate, anchors=anchors, budget=planner.budget(card), card=card,
                  title=_title(estimate.model_name, estimate, card),
                  label=f"batch {estimate.batch_size} (asked): needs {fmt_bytes(estimate.required_bytes)}",
                  largest=None, progress=progress)


def plan_sweep(plan, *, progress: Callable[[str], None] | None = None) -> Sweep:
    """The sweep of a ``Plan``: its parts at its micro-batch (``Plan.peak_parts``, evaluation pass included), the
    largest micro-batch that fits and the next one up simulated exactly too (from the simulation cache, where the
    plan was just made), the fast model between them, its budget and its card."""
    from dataclasses import replace

    from autofit import model as models
    from autofit.plans import Plan

    e = plan.estimate
    anchors = {plan.batch_size: plan.peak_parts()}
    if plan.largest_batch:
        spec = models.resolve(plan.model_name)
        for b in {plan.largest_batch, plan.largest_batch + 1} - set(anchors):
            exact = est.simulate_point(spec, e.config, batch_size=b, seq_len=e.seq_len,
                                       eval_batch_size=plan.eval_batch_size, progress=progress)
            other = replace(plan, batch_size=b, grad_accum=1, effective_batch=b, largest_batch=None, estimate=exact)
            anchors[b] = Plan.peak_parts(other)
    label = (f"micro-batch {plan.batch_size} (planned, x {plan.grad_accum} accumulation): needs "
             f"{fmt_bytes(e.required_bytes)}")
    return _sweep(e, anchors=anchors, budget=plan.budget_bytes, card=plan.gpu,
                  title=_title(plan.model_name, e, plan.gpu), label=label, largest=plan.largest_batch,
                  progress=progress, eval_batch=plan.eval_batch_size)


def _title(model: str, e: est.MemoryEstimate, card: gpus.GpuInfo) -> str:
    cfg = e.config
    return (f"{model} on {card.name}\n{cfg.method}{'' if cfg.quantization == 'none' else ' ' + cfg.quantization}, "
            f"{cfg.precision}, {e.seq_len} tokens, checkpointing {'on' if cfg.gradient_checkpointing else 'off'}")


_MARGIN = "allocator margin"
_OUTSIDE = ("cuBLAS workspaces", _MARGIN, "CUDA context")


def _sweep(e: est.MemoryEstimate, *, anchors: dict[int, dict[str, int]], budget: int, card, title: str, label: str,
           largest: int | None, progress, eval_batch: int | None = None) -> Sweep:
    """Rows of parts per batch: exact at the anchors; elsewhere the fast model's tensors and workspaces, the
    evaluation pass where it peaks above them, and an allocator margin carried over from the nearest anchors (as a
    share of the memory that grows with the batch), so the stack passes through every exact point."""
    from autofit import model as models

    spec = models.resolve(e.model_name)
    sm = est.StepModel(spec, e.config, seq_len=e.seq_len, progress=progress)
    top = max(2 * e.batch_size, 8, (largest or 0) + 2)
    while top < 4096 and est.from_step_model(sm, top, e.seq_len).required_bytes < budget:
        top *= 2
    batches = sorted({*(range(1, top + 1) if top <= 64 else (max(1, round(top * i / 64)) for i in range(1, 65))),
                      *anchors})
    evaluation = f"evaluation pass (batch {eval_batch})" if eval_batch else None
    eval_live = max(0, e.eval_peak or 0)

    def fast(b: int) -> tuple[dict[str, int], int]:
        """Parts without the allocator margin, and the bytes that grow with the batch (for the margin's share)."""
        parts = est.from_step_model(sm, b, e.seq_len).components(tight=True)
        tensors = sum(v for k, v in parts.items() if k not in _OUTSIDE)
        growing = tensors - parts["weights"] - parts["optimizer state"]
        parts[_MARGIN] = 0
        if evaluation:
            parts = {**{k: v for k, v in parts.items() if k not in (_MARGIN, "CUDA context")},
                     evaluation: max(0, eval_live - tensors), _MARGIN: 0, "CUDA context": parts["CUDA context"]}
        return parts, max(1, growing)

    points = sorted(anchors)
    shares = {}
    for a in points:
        parts, growing = fast(a)
        shares[a] = max(0, sum(anchors[a].values()) - sum(parts.values())) / growing

    def share(b: int) -> float:
        if b <= points[0]:
            return shares[points[0]]
        if b >= points[-1]:
            return shares[points[-1]]
        left = max(a for a in points if a <= b)
        right = min(a for a in points if a >= b)
        return shares[left] + (shares[right] - shares[left]) * (b - left) / (right - left)

    rows = []
    for b in batches:
        if b in anchors:
            rows.append(dict(anchors[b]))
            continue
        parts, growing = fast(b)
        parts[_MARGIN] = int(share(b) * growing)
        rows.append(parts)
    names = [n for n in dict.fromkeys(k for row in rows for k in row) if any(row.get(n, 0) for row in rows)]
    parts = {n: tuple(row.get(n, 0) for row in rows) for n in names}
    what = "RAM budget" if card.source == "host" else "budget"
    return Sweep(title=title, batches=tuple(batches), parts=parts, marked=e.batch_size, marked_label=label,
                 budget=budget, budget_label=f"{what} on {card.name}: {fmt_bytes(budget)}", largest=largest)


def draw(sweep: Sweep, path: str) -> str:
    """Writes the sweep as a PNG at ``path``; returns the path. Needs matplotlib (``pip install autofit[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'autofit[plot]'") from None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.stackplot(sweep.batches, [[gib(v) for v in values] for values in sweep.parts.values()],
                 labels=list(sweep.parts), alpha=0.85)
    if sweep.budget:
        ax.axhline(gib(sweep.budget), color="black", linestyle="--", linewidth=1.2, label=sweep.budget_label)
    ax.axvline(sweep.marked, color="crimson", linewidth=1.4, label=sweep.marked_label)
    ax.plot([sweep.marked], [gib(sweep.total(sweep.marked))], "o", color="crimson")
    if sweep.largest and sweep.largest != sweep.marked:
        ax.axvline(sweep.largest, color="crimson", linestyle=":", linewidth=1.2,
                   label=f"largest micro-batch that fits: {sweep.largest}")
    ax.set_xlabel("micro-batch (sequences per device)")
    ax.set_ylabel("GiB")
    ax.set_title(sweep.title, fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def batch_sweep(estimate: est.MemoryEstimate, path: str, *, gpu=None,
                progress: Callable[[str], None] | None = None) -> str:
    """Writes the PNG of ``estimate_sweep`` at ``path``; returns the path."""
    return draw(estimate_sweep(estimate, gpu=gpu, progress=progress), path)


def plan_figure(plan, path: str, *, progress: Callable[[str], None] | None = None) -> str:
    """Writes the PNG of ``plan_sweep`` at ``path``; returns the path."""
    return draw(plan_sweep(plan, progress=progress), path)
