"""A plain PyTorch loop that keeps its effective batch when memory runs out: accumulation seeded by a plan.

``AccumulatingStep`` runs one optimizer step over the samples of one effective batch, in micro-batches of the
planned size, each micro-batch's loss weighted by its share of the samples, so the gradient is that of the mean loss
over the effective batch whatever the split. When a micro-batch runs out of memory, the gradients gathered so far
are dropped and the same samples are run again in micro-batches half as large: the effective batch is unchanged and
no optimizer step is lost or repeated; later steps keep the smaller micro-batch. ``batch_size_from`` is the
decorator form for a whole training function, as accelerate's ``find_executable_batch_size`` works, but starting at
the plan's micro-batch rather than at a guess, and handing the function the accumulation that keeps the effective
batch.
"""

from __future__ import annotations

import functools
import gc
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from autofit.errors import ConfigError, DoesNotFitError
from autofit.probing import is_oom

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class Shrink:
    """One out-of-memory error recovered from: the micro-batch before and after, at which optimizer step."""

    step: int
    micro_batch_before: int
    micro_batch_after: int


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _whole(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a whole number >= 1; got {value!r}")
    return value


class AccumulatingStep:
    """One optimizer step per call over an effective batch of samples; see the module docstring.

    ``collate(samples) -> batch`` makes a micro-batch from a list of samples (default: the list itself);
    ``loss_fn(model, batch) -> loss`` is the mean loss of a micro-batch."""

    def __init__(self, *, micro_batch: int, effective_batch: int, collate: Callable | None = None,
                 max_grad_norm: float | None = 1.0) -> None:
        self.micro_batch = _whole("micro_batch", micro_batch)
        self.effective_batch = _whole("effective_batch", effective_batch)
        if self.micro_batch > self.effective_batch:
            raise ConfigError(f"micro_batch {micro_batch} is larger than effective_batch {effective_batch}")
        self.collate = collate or (lambda samples: samples)
        self.max_grad_norm = max_grad_norm
        self.steps = 0
        self.shrinks: list[Shrink] = []
        self.tried: list[int] = []  # every micro-batch size a step started with, in order

    @classmethod
    def from_plan(cls, plan, *, collate: Callable | None = None, max_grad_norm: float | None = 1.0):
        """Seeded by an ``autofit.Plan``: its micro-batch and effective batch."""
        return cls(micro_batch=plan.batch_size, effective_batch=plan.effective_batch, collate=collate,
                   max_grad_norm=max_grad_norm)

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step at the current micro-batch (the last one may be smaller)."""
        return math.ceil(self.effective_batch / self.micro_batch)

    def __call__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, samples: Sequence,
                 loss_fn: Callable) -> float:
        """Runs one optimizer step over ``samples`` (at most ``effective_batch`` of them); returns the mean loss.
        Raises ``DoesNotFitError`` when a micro-batch of one sample does not fit."""
        samples = list(samples)
        if not samples or len(samples) > self.effective_batch:
            raise ConfigError(f"a step takes 1 to {self.effective_batch} samples (the effective batch); "
                              f"got {len(samples)}")
        while True:
            self.tried.append(self.micro_batch)
            try:
                loss = self._accumulate(model, samples, loss_fn)
                break
            except BaseException as err:  # noqa: BLE001 - re-raised unless it is running out of memory
                if not is_oom(err):
                    raise
                del err
                optimizer.zero_grad(set_to_none=True)  # partial gradients of this window: dropped, redone
                _release_memory()
                if self.micro_batch == 1:
                    raise DoesNotFitError("a micro-batch of one sample runs out of memory; shorten the sequences, "
                                          "use LoRA or QLoRA, or turn on gradient checkpointing") from None
                smaller = self.micro_batch // 2
                self.shrinks.append(Shrink(step=self.steps, micro_batch_before=self.micro_batch,
                                           micro_batch_after=smaller))
                log.warning("out of memory at micro-batch %d; running step %d again at micro-batch %d x %d "
                            "accumulation (effective batch %d kept)", self.micro_batch, self.steps, smaller,
                            math.ceil(self.effective_batch / smaller), self.effective_batch)
                self.micro_batch = smaller
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                           self.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return loss

    def _accumulate(self, model, samples, loss_fn) -> float:
        total = 0.0
        for start in range(0, len(samples), self.micro_batch):
            piece = samples[start:start + self.micro_batch]
            loss = loss_fn(model, self.collate(piece))
            weighted = loss * (len(piece) / len(samples))  # the mean over the window, whatever the split
            weighted.backward()
            total += float(weighted.detach())
            del loss, weighted
        return total


def batch_size_from(plan=None, *, micro_batch: int | None = None, effective_batch: int | None = None):
    """Decorator: calls ``fn(batch_size, grad_accum, *args, **kwargs)`` with the plan's micro-batch and the
    accumulation that keeps its effective batch; when ``fn`` runs out of memory, calls it again with half the
    micro-batch and twice the accumulation (the effective batch kept, rounded up to whole micro-batches).

    Restarting the function is what a decorator can do; ``AccumulatingStep`` loses no step at all."""
    micro = _whole("micro_batch", micro_batch if micro_batch is not None else getattr(plan, "batch_size", None))
    effective = _whole("effective_batch", effective_batch if effective_batch is not None
                       else getattr(plan, "effective_batch", micro))

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            size = micro
            while True:
                try:
                    return fn(size, math.ceil(effective / size), *args, **kwargs)
                except BaseException as err:  # noqa: BLE001 - re-raised unless it is running out of memory
                    if not is_oom(err):
                        raise
                    del err
                    _release_memory()
                    if size == 1:
                        raise DoesNotFitError("a micro-batch of one sample runs out of memory") from None
                    log.warning("out of memory at micro-batch %d; starting again at %d", size, size // 2)
                    size //= 2
        return wrapper

    return decorate
