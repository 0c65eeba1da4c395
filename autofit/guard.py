"""A run-time guard: a Trainer that runs out of memory mid-training continues with half the micro-batch.

``guard(trainer)`` wraps ``trainer.training_step``. When a micro-batch runs out of memory, the gradients the current
accumulation window has gathered so far may be partial, so they are dropped and every micro-batch of the window is
run again, each split in two; from then on every micro-batch is split the same way. Splitting a micro-batch in k
pieces is halving the micro-batch and doubling accumulation: the same samples reach the same optimizer step, so the
effective batch is unchanged and no optimizer step is lost or repeated. With ``num_items_in_batch`` (transformers'
causal LMs) the loss is normalized over the whole window and the gradients are those of the unsplit run; a model
without it is given k times the accumulation steps while its pieces run, exact for pieces of equal token counts.
Below a micro-batch of one sequence it stops with ``DoesNotFitError``. Each change is logged and kept in
``Guard.events``.
"""

from __future__ import annotations

import gc
import logging
import time
import traceback
from dataclasses import dataclass

import torch

from autofit import validate
from autofit.errors import DoesNotFitError
from autofit.probing import is_oom

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class GuardEvent:
    """One out-of-memory error the guard recovered from."""

    global_step: int
    micro_batch_before: int
    micro_batch_after: int
    pieces: int  # how many pieces each loader micro-batch is now split into
    seconds: float


class Guard:
    """Holds the guard's state; see the module docstring. Install with ``guard(trainer)``."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.pieces = 1
        self.window: list[tuple[dict, object]] = []  # the current accumulation window's micro-batches so far
        self.events: list[GuardEvent] = []
        self._step = trainer.training_step  # the original, bound

    def training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
        self.window.append((inputs, num_items_in_batch))
        try:
            return self._run(model, inputs, num_items_in_batch, args, kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised unless it is running out of memory
            if not is_oom(err):
                raise
            traceback.clear_frames(err.__traceback__)
            del err
        return self._recover(model, args, kwargs)

    def _recover(self, model, args, kwargs):
        while True:
            before = _batch_size(self.window[-1][0]) // self.pieces
            started = time.perf_counter()
            model.zero_grad(set_to_none=True)  # the window's gradients may hold part of the failed micro-batch
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if before <= 1:
                raise DoesNotFitError("out of memory at a micro-batch of 1 sequence; nothing smaller to try: plan a "
                                      "lighter configuration (method='qlora', or a shorter seq_len=N)")
            self.pieces *= 2
            after = _batch_size(self.window[-1][0]) // self.pieces
            step = self.trainer.state.global_step
            log.warning("out of memory at step %d with micro-batch %d: continuing with micro-batch %d and %dx the "
                        "accumulation (effective batch unchanged); re-running the %d micro-batch(es) of this step",
                        step, before, after, 2, len(self.window))
            try:
                loss = None
                for inputs, n in self.window:
                    loss = self._run(model, inputs, n, args, kwargs)
                self.events.append(GuardEvent(global_step=step, micro_batch_before=before, micro_batch_after=after,
                                              pieces=self.pieces, seconds=time.perf_counter() - started))
                return loss
            except BaseException as err:  # noqa: BLE001
                if not is_oom(err):
                    raise
                traceback.clear_frames(err.__traceback__)
                del err

    def _run(self, model, inputs, num_items_in_batch, args, kwargs):
        if self.pieces == 1:
            return self._step(model, inputs, num_items_in_batch, *args, **kwargs)
        parts = _split(inputs, self.pieces)
        scale_ga = num_items_in_batch is None
        saved = self.trainer.current_gradient_accumulation_steps if scale_ga else None
        if scale_ga:
            self.trainer.current_gradient_accumulation_steps = saved * len(parts)
        try:
            total = None
            for part in parts:
                loss = self._step(model, part, num_items_in_batch, *args, **kwargs)
                total = loss if total is None else total + loss
            return total / len(parts) if scale_ga else total
        finally:
            if scale_ga:
                self.trainer.current_gradient_accumulation_steps = saved

    def window_done(self) -> None:
        self.window.clear()


def _batch_size(inputs: dict) -> int:
    return next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


def _split(inputs: dict, pieces: int) -> list[dict]:
    size = _batch_size(inputs)
    pieces = min(pieces, size)
    chunks = {k: torch.tensor_split(v, pieces) for k, v in inputs.items()
              if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size}
    return [{k: (chunks[k][i] if k in chunks else v) for k, v in inputs.items()} for i in range(pieces)]


def guard(trainer) -> Guard:
    """Installs the guard on a ``transformers.Trainer`` (its ``training_step``, plus a callback that closes each
    accumulation window when the optimizer steps) and returns it. Raises ``ConfigError`` for anything but a Trainer."""
    from transformers import TrainerCallback

    validate.trainer(trainer)
    state = Guard(trainer)

    class _WindowCallback(TrainerCallback):
        def on_step_end(self, args, trainer_state, control, **kwargs):
            state.window_done()

    trainer.training_step = state.training_step
    trainer.add_callback(_WindowCallback())
    return state
