"""autofit: VRAM-aware auto-tuning for fine-tuning Hugging Face models.

``estimate(model, gpu, batch_size=..., seq_len=...)`` predicts the memory of a training step without allocating
anything; ``plan(model, gpu)`` chooses every knob for a card. Names are imported on first use, so ``import autofit``
and ``autofit --help`` stay fast. (Modules are named for their concern: ``memory``, ``planner``, ``probing``,
``training``; a submodule named like the function it defines would shadow that function on the package.)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "estimate": "autofit.custom",  # autofit.memory.estimate, or the user's own step
    "MemoryEstimate": "autofit.memory",
    "StepModel": "autofit.memory",
    "GpuInfo": "autofit.gpu",
    "ModelSpec": "autofit.model",
    "plan": "autofit.distributed",  # one card: planner.plan; several: each rank planned by it (DDP or FSDP2)
    "Plan": "autofit.planner",
    "probe": "autofit.probing",
    "train": "autofit.training",
    "AutofitError": "autofit.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'autofit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
