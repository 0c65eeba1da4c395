"""A Lightning callback that applies an autofit plan: the micro-batch, the accumulation that keeps the effective
batch, gradient clipping and, on a transformers model inside the module, gradient checkpointing.

It does what Lightning's ``BatchSizeFinder`` callback does to the run (sets ``batch_size`` where the module or its
datamodule keeps it), without trial steps: the plan's estimate (and its probe, on a GPU) already chose the size.
Precision is fixed when a ``Trainer`` is built, so ``trainer_kwargs(plan)`` gives what to pass it.
"""

from __future__ import annotations

import logging

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr

from autofit.errors import ConfigError

log = logging.getLogger(__name__)

# Lightning's names for the plan's precisions (autofit names them as Lightning does)
_PRECISION = {"bf16-mixed": "bf16-mixed", "16-mixed": "16-mixed", "bf16-true": "bf16-true", "16-true": "16-true",
              "32-true": "32-true"}


def trainer_kwargs(plan) -> dict:
    """The ``lightning.Trainer`` arguments a plan decides: precision, accumulation and gradient clipping."""
    return dict(precision=_PRECISION[plan.precision], accumulate_grad_batches=plan.grad_accum,
                gradient_clip_val=1.0)


class AutofitCallback(Callback):
    """Applies ``plan`` when a fit starts; see the module docstring. ``attribute`` names where the batch size
    lives (``batch_size`` on the module, its ``hparams`` or its datamodule, as ``BatchSizeFinder`` looks)."""

    def __init__(self, plan, *, attribute: str = "batch_size") -> None:
        self.plan, self.attribute = plan, attribute

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if not lightning_hasattr(pl_module, self.attribute):
            raise ConfigError(f"{type(pl_module).__name__} keeps no '{self.attribute}' (on itself, its hparams or "
                              "its datamodule) for the plan's micro-batch; add one and build the train loader from it")
        lightning_setattr(pl_module, self.attribute, self.plan.batch_size)
        if trainer.accumulate_grad_batches not in (1, self.plan.grad_accum):
            log.warning("replacing accumulate_grad_batches=%d by the plan's %d", trainer.accumulate_grad_batches,
                        self.plan.grad_accum)
        trainer.accumulate_grad_batches = self.plan.grad_accum
        if self.plan.gradient_checkpointing:
            enabled = [m for m in pl_module.modules() if hasattr(m, "gradient_checkpointing_enable")][:1]
            for model in enabled:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if not enabled:
                log.warning("the plan turns gradient checkpointing on, but %s holds no transformers model to turn "
                            "it on in; turn it on in your module", type(pl_module).__name__)
        log.info("autofit plan applied: micro-batch %d x %d accumulation = effective batch %d",
                 self.plan.batch_size, self.plan.grad_accum, self.plan.effective_batch)
