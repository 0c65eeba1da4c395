"""Figures of estimates: the components of a training step's memory against batch size, with the card's limit."""

from __future__ import annotations

from collections.abc import Callable

from autofit import memory as est
from autofit import gpu as gpus
from autofit.errors import ConfigError
from autofit.units import gib


def batch_sweep(estimate: est.MemoryEstimate, path: str, *, gpu=None,
                progress: Callable[[str], None] | None = None) -> str:
    """Writes a PNG of the stacked components against batch size (1 to twice the estimate's, or past the card's
    memory) at the estimate's sequence length; returns the path. Needs matplotlib (``pip install autofit[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'autofit[plot]'") from None
    from autofit import model as models

    spec = models.resolve(estimate.model_name)
    sm = est.StepModel(spec, estimate.config, seq_len=estimate.seq_len, progress=progress)
    card = gpus.resolve("cpu" if estimate.config.device == "cpu" else gpu)
    limit = card.free_bytes
    top = max(2 * estimate.batch_size, 8)
    if limit:
        while top < 4096 and est.from_step_model(sm, top, estimate.seq_len).required_bytes < limit:
            top *= 2
    batches = list(range(1, top + 1)) if top <= 64 else sorted({max(1, round(top * i / 64)) for i in range(1, 65)})
    rows = [est.from_step_model(sm, b, estimate.seq_len) for b in batches]
    names = list(rows[0].components())
    stacks = [[gib(r.components()[n]) for r in rows] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.stackplot(batches, stacks, labels=names, alpha=0.85)
    if limit:
        ax.axhline(gib(limit), color="black", linestyle="--", linewidth=1.2, label=f"{card.name} free memory")
    ax.set_xlabel("per-device batch size")
    ax.set_ylabel("GiB")
    cfg = estimate.config
    ax.set_title(f"{spec.name}: {cfg.method}{'' if cfg.quantization == 'none' else ' ' + cfg.quantization}, "
                 f"{cfg.precision}, seq {estimate.seq_len}, checkpointing {'on' if cfg.gradient_checkpointing else 'off'}",
                 fontsize=10)
    ax.legend(loc="upper left", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
