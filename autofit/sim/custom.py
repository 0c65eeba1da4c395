"""A user's own training step, on any ``nn.Module``, run on fake tensors with every allocation recorded.

The step is the user's function ``step(model, batch) -> loss`` (their forward and loss), followed by what a training
loop does with the loss: backward, gradient clipping, the optimizer step and ``zero_grad(set_to_none=True)``.
``make_batch(batch_size)`` makes the batch; it runs under the fake mode, so the tensors it creates cost nothing.
The module is copied with its parameters and buffers on ``meta`` (its weights are never copied or changed), then
materialized as fake CPU tensors. The same code runs on real CPU tensors, which is how tests check it to the byte.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode,
                                           UnsupportedOperatorException)

from autofit.errors import ConfigError, SimulationError
from autofit.sim import arch, simulate
from autofit.sim.simulate import BACKWARD, FORWARD, INPUTS, OPTIMIZE, Simulation, StepConfig
from autofit.sim.tracker import Tracker


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on ``meta`` (no weights copied, ties kept)."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        if id(b) not in memo:
            memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def _op_name(err: Exception) -> str | None:
    func = getattr(err, "func", None)
    return str(func) if func is not None else None


def run(module: nn.Module, step: Callable, make_batch: Callable, cfg: StepConfig, *, batch_size: int,
        steps: int = 2, fake: bool = True) -> Simulation:
    """Runs ``steps`` training steps of the user's ``step`` on a copy of ``module`` and records every allocation.

    Raises ``SimulationError`` naming the operation when the step cannot run on fake tensors (it reads tensor data,
    or calls an operator fake tensors do not know), and ``ConfigError`` when ``step`` returns no scalar loss."""
    if not callable(step) or not callable(make_batch):
        raise ConfigError("step and batch must be functions: step(model, batch) -> loss, batch(batch_size) -> batch")
    model = meta_copy(module) if fake else copy.deepcopy(module)
    kernels: list[str] = []
    with contextlib.ExitStack() as stack:
        autocast = stack.enter_context(simulate.imitate_cuda(cfg, kernels))
        if fake:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            model = model.to_empty(device="cpu")
        model.train()
        params = [p for p in arch.unique_params(model) if p.requires_grad]
        if not params:
            raise ConfigError(f"{type(module).__name__} has no parameter that requires a gradient; nothing to train")
        tracker = Tracker()
        tracker.adopt(list(model.parameters()) + list(model.buffers()))
        optimizer = simulate.make_optimizer(params, cfg.optimizer)
        grad_uids: set[int] = set()
        step_peaks = []
        try:
            with tracker, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for n in range(1, steps + 1):
                    tracker.reset_peak()
                    _one_step(model, step, make_batch, optimizer, params, cfg, autocast, tracker, n, batch_size,
                              grad_uids)
                    step_peaks.append(tracker.peak)
        except (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException) as err:
            op = _op_name(err) or type(err).__name__
            raise SimulationError(
                f"your step cannot run on fake tensors: {op} needs real data ({type(err).__name__}); keep data-"
                "dependent code (.item(), nonzero, boolean indexing, printing values) out of step(), or measure "
                "with autofit.probe on a GPU") from None
        categories = simulate._categorize(tracker, optimizer, cfg, grad_uids)
    timeline = tracker.timeline()
    return Simulation(timeline=timeline, categories=categories, phases=(timeline.tags % 10).astype(np.int8),
                      steps=(timeline.tags // 10).astype(np.int8), num_layers=1, batch_size=batch_size, seq_len=1,
                      attention_kernels=tuple(kernels), step_peaks=tuple(step_peaks), fake=fake)


def _one_step(model, step, make_batch, optimizer, params, cfg, autocast, tracker, n, batch_size, grad_uids):
    tracker.tag = 10 * n + INPUTS
    tracker.mark(f"{n}:inputs")
    batch = make_batch(batch_size)
    tracker.tag = 10 * n + FORWARD
    if cfg.autocast:
        with autocast.region(cfg.half):
            loss = step(model, batch)
    else:
        loss = step(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ConfigError(f"step(model, batch) must return the scalar loss tensor to backpropagate; got "
                          f"{type(loss).__name__}")
    del batch
    tracker.tag = 10 * n + BACKWARD
    if cfg.grad_scaler:
        (loss * torch.full((), 65536.0)).backward()
    else:
        loss.backward()
    del loss
    tracker.tag = 10 * n + OPTIMIZE
    grads = [p.grad for p in params if p.grad is not None]
    grad_uids.update(tracker.uid(g) for g in grads)
    if cfg.max_grad_norm:
        simulate._clip_grad_norm(grads, cfg.max_grad_norm)
    del grads
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tracker.mark(f"{n}:end")
