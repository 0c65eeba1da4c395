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

Under a process group of several ranks every forward and backward is followed by a collective on an out-of-memory
flag: when one rank runs out, all of them drop the window and halve together, so none loses or repeats a step. DDP's
gradient averaging is then done once the window's last micro-batch ran on every rank (``no_sync`` until then); FSDP,
which gathers inside the step, is refused with ``ConfigError``.
"""

from __future__ import annotations

import gc
import logging
import time
import traceback
from dataclasses import dataclass

import torch

from autofit import validate
from autofit.errors import AutofitError, ConfigError, DoesNotFitError
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
        if _world_size() > 1:
            return self._training_step_ranks(model, inputs, num_items_in_batch, *args, **kwargs)
        return self._training_step(model, inputs, num_items_in_batch, *args, **kwargs)

    def _training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
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

    # -- several ranks ----------------------------------------------------------------------------------------------
    def _training_step_ranks(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
        """One micro-batch on every rank of a process group. Each forward and backward (each piece) is followed by a
        collective on an out-of-memory flag (``collectives.agree_level``), so a rank that runs out of memory is
        known to all of them at the same point, and every rank drops the window and halves together; the halving
        itself is the single-process guard's. Under DDP the gradients are kept local (``no_sync``) while pieces may
        still fail, and averaged over the ranks once the window's last micro-batch ran on all of them: a bucket
        all-reduce inside one rank's backward would otherwise wait for a rank that has stopped."""
        if not getattr(self, "_agreeing", False):
            self._step = _agreed(self._step)
            self._agreeing = True
        _check_wrapper(model)
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        if not ddp:
            return self._training_step(model, inputs, num_items_in_batch, *args, **kwargs)
        sync = model.require_backward_grad_sync  # False inside the Trainer's no_sync: not the window's last
        if model.will_sync_module_buffers():
            # DDP broadcasts the buffers in the window's first forward; done here, before anything can fail, so that
            # a rank that stops early never leaves the others in that broadcast
            _broadcast_buffers(model)
            model.require_forward_param_sync = False
        with model.no_sync():
            loss = self._training_step(model, inputs, num_items_in_batch, *args, **kwargs)
        if sync:
            _average_gradients(model)
            model.require_forward_param_sync = True  # the next window's first forward syncs buffers again
        return loss


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _agreed(step):
    """``step`` followed by a collective on whether it ran out of memory on any rank: it raises
    ``torch.OutOfMemoryError`` on every rank when it did on one; another error stops every rank."""
    from autofit import collectives

    def run(*args, **kwargs):
        state, loss = collectives.RAN, None
        try:
            loss = step(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised unless it is running out of memory
            if not is_oom(err):
                collectives.agree_level(collectives.FAILED)
                raise
            traceback.clear_frames(err.__traceback__)
            del err
            state = collectives.OUT_OF_MEMORY
        agreed = collectives.agree_level(state)
        if agreed == collectives.FAILED:
            raise AutofitError("another rank stopped with an error in its training step; its output says which")
        if agreed == collectives.OUT_OF_MEMORY:
            raise torch.OutOfMemoryError("out of memory on " + ("this rank" if state else "another rank"))
        return loss

    return run


def _check_wrapper(model) -> None:
    """FSDP gathers parameters inside forward and backward, collectives a rank that ran out of memory never joins:
    the guard cannot bring the ranks back together there."""
    if any(type(m).__name__ in ("FullyShardedDataParallel",) or hasattr(m, "set_requires_gradient_sync")
           for m in (model, getattr(model, "module", None)) if m is not None):
        raise ConfigError("the guard across ranks runs DDP (or an unwrapped model), not FSDP, whose gathers inside "
                          "the step would wait for a rank that ran out of memory; train with DDP or without guard()")


def _broadcast_buffers(model) -> None:
    """What DDP does before a window's first forward: the module's buffers broadcast from rank 0."""
    import torch.distributed as dist

    for buffer in model.modules_buffers:
        dist.broadcast(buffer, src=0)


def _average_gradients(model) -> None:
    """What DDP's reducer does at the end of a window: every gradient averaged over the ranks."""
    import torch.distributed as dist

    size = dist.get_world_size()
    for p in model.parameters():
        if p.requires_grad and p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(size)


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
