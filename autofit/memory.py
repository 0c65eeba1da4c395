"""The memory of a training step, estimated without a GPU: a named breakdown and its totals.

``estimate()`` simulates the step (``autofit.simulate``) at two small depths and extrapolates to the model's full
depth, and replays the simulated allocations through a model of the CUDA caching allocator (``autofit.allocator``)
for the reserved total. ``StepModel`` fits the same simulations over batch size and sequence length so that a
planner can ask thousands of questions in microseconds.

How depth is extrapolated. Decoder layers are identical, so the event stream of a step is: a prologue, one block of
events per layer in forward, the head (logits and loss), one block per layer in backward, and a tail (the first
layer's backward and the optimizer step). Live memory can only peak where an allocation is followed by a release,
so each block is reduced to those candidate points, in order. At a given candidate of a given block, live memory is
linear in the depth and in the block's index (each layer adds the same saved activations and the same weights), so
it peaks at the first or the last block: evaluating those two at the full depth, with coefficients fitted from
simulations of p+1 and 2p+1 layers (p: the period of the layer types, 1 but for models that alternate attention
kinds; 2p+1 and 3p+1 when the steps between layers hold allocations too), gives the full-depth peak of every
candidate. The first layer forms its own block kind, since its input needs
no gradient when the embeddings are frozen. Over batch size ``b`` and sequence length ``s`` every allocation is a
polynomial in ``(1, s, s^2, b*s, b*s^2)``, which five simulated points fit exactly.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from autofit import gpu as gpus
from autofit import model as models
from autofit import validate
from autofit.errors import ConfigError, SimulationError
from autofit.sim import allocator, simulate
from autofit.sim.simulate import (BACKWARD, CATEGORY_NAMES, FORWARD, HEAD, HOST, OPTIMIZE, OPTIMIZER, Simulation,
                                  StepConfig)
from autofit.units import MiB, fmt_bytes

log = logging.getLogger(__name__)

# -- constants from outside the simulation ---------------------------------------------------------------------------
# The CUDA context lives outside PyTorch's allocator (nvidia-smi sees it, torch.cuda.memory_reserved does not).
# Measured bare contexts: with lazy module loading (PyTorch's default since 1.13, pytorch/pytorch#86509; CUDA's own
# default on Linux since 12.2) 287,047,680 bytes after one tensor op (that PR), about 300-400 MB (ptrblck,
# pytorch/pytorch#107667, #109888), 426 MiB on an RTX 6000 Ada with PyTorch 2.10 + CUDA 13.0 (unsloth-zoo#1053);
# with eager loading 666,632,192 bytes (#86509). No source measures how much a training step's kernels (cuBLAS,
# attention, the optimizer) add under lazy loading, so autofit assumes 512 MiB for it; eager loading loads every
# module at start, so its measured figure stands, rounded up to 640 MiB. Measurements on each GPU family replace
# both (benchmarks/gpu_validation.py).
CUDA_CONTEXT_BYTES = 512 * MiB
CUDA_CONTEXT_EAGER_BYTES = 640 * MiB
CONTEXT_SOURCE = "assumed 512 MiB (measured 274-426 MiB for a bare context, see autofit/memory.py)"


def cuda_context_bytes() -> int:
    """The CUDA context assumed for this process's module loading (``CUDA_MODULE_LOADING``, lazy by default)."""
    eager = os.environ.get("CUDA_MODULE_LOADING", "LAZY").upper() == "EAGER"
    return CUDA_CONTEXT_EAGER_BYTES if eager else CUDA_CONTEXT_BYTES


# cuBLAS keeps one workspace per (handle, stream), taken from the caching allocator on first use and kept (counted in
# allocated and reserved memory; issue pytorch/pytorch#95668 shows 8,519,680 bytes allocated after one nn.Linear).
# Its default (aten/src/ATen/cuda/CublasHandlePool.cpp, parseChosenWorkspaceSize) is ":4096:2:16:8", 8,519,680
# bytes, and 32 MiB on compute capability 9.0 only in the released wheels 2.4.0-2.11.0 (read from each wheel's
# libtorch_cuda.so); later sources give Blackwell (10.x, 12.x) 32 MiB too (pytorch/pytorch#175344). cuBLASLt keeps a
# workspace of its own per (handle, stream) from 2.9 to 2.11 (CUBLASLT_WORKSPACE_SIZE, 1 MiB; #156495), shares
# cuBLAS's after that (#168175), and before 2.9 takes one per call that the simulation does not see. Handles are per
# thread, and a training step runs matmuls on two: the Python thread (forward) and the autograd engine's device
# thread (backward).
WORKSPACE_THREADS = 2


def torch_release() -> tuple[int, int]:
    """(major, minor) of the PyTorch that runs the training (this process's)."""
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def cublas_workspace_bytes(compute_capability: tuple[int, int], release: tuple[int, int] | None = None) -> int:
    """Bytes of one cuBLAS workspace (and of cuBLASLt's, where it keeps its own) on a card of this capability."""
    release = release or torch_release()
    big = tuple(compute_capability) == (9, 0) if release <= (2, 11) else compute_capability[0] in (9, 10, 12)
    cublas = 32 * MiB if big else 4096 * 1024 * 2 + 16 * 1024 * 8
    cublaslt = 1 * MiB if (2, 9) <= release <= (2, 11) else 0
    return cublas + cublaslt


# What the estimate does not know until a probe measures it on a card (benchmarks/gpu_validation.py): the CUDA
# context, assumed 512 MiB, measured between 274 and 426 MiB bare (above) and unmeasured with a training step's
# kernels loaded, so +-CONTEXT_UNCERTAINTY is an assumption; and the allocator's fragmentation margin, carried to
# the full depth as its largest value over the simulated depths. Replays at 2 to 8 layers of Llama-3.2-1B (batch 3
# x 1024, benchmarks/results/cpu-2026-12-02/margin_by_depth.txt) put deeper margins between 20% of the dynamic
# memory below that value and 14% above it (full fine-tuning with checkpointing, where the margin creeps up with
# depth); ALLOCATOR_UNCERTAINTY of 15% covers that spread, until GPU measurements size it.
CONTEXT_UNCERTAINTY = 256 * MiB
ALLOCATOR_UNCERTAINTY = 0.15
ALLOCATOR_NOTE = f"allocator margin +-{ALLOCATOR_UNCERTAINTY:.0%} of activations, logits and temporaries"
UNCERTAINTY_NOTE = f"CUDA context +-256 MiB assumed, {ALLOCATOR_NOTE}"


def uncertainty_bytes(est: "MemoryEstimate", *, context_measured: bool = False) -> int:
    """Bytes a plan keeps free for what ``est`` cannot know without a measurement on the card; 0 on the CPU. A
    context measured on the card by an earlier probe drops its share."""
    if est.config.device == "cpu":
        return 0
    context = 0 if context_measured else CONTEXT_UNCERTAINTY
    return context + int(ALLOCATOR_UNCERTAINTY * (est.activations + est.logits_and_loss + est.temporaries))


# Categories summed into the device totals (HOST lives in host memory on a real run).
_DEVICE_CATEGORIES = [c for c in range(len(CATEGORY_NAMES)) if c != HOST]


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryEstimate:
    """Peak memory of training step 2 (optimizer state already exists), in bytes.

    The components at the peak sum to the live bytes of PyTorch tensors plus cuBLAS workspaces; ``allocator_margin``
    is what the caching allocator reserves beyond them (fragmentation, block rounding), and ``cuda_context`` lies
    outside the allocator. Totals on a card with memory to spare: ``peak_allocated`` compares with
    ``torch.cuda.max_memory_allocated``, ``peak_reserved`` with ``torch.cuda.max_memory_reserved``, ``device_total``
    with the process's memory in ``nvidia-smi``. On a tight card the allocator releases cached segments before it
    fails, so the step runs as long as it may reserve ``min_reserved`` bytes: ``required_bytes`` (that plus the
    context) is the free memory a card must offer.
    """

    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    logits_and_loss: int
    temporaries: int
    workspaces: int
    allocator_margin: int
    cuda_context: int
    peak_allocated: int
    min_reserved: int
    peak_reserved: int
    device_total: int
    where: str  # when in the step the peak happens
    source: str  # "simulation", "surrogate" or "analytic"
    attention_kernel: str
    simulated_layers: tuple[int, ...]  # depths actually simulated
    config: StepConfig
    batch_size: int
    seq_len: int
    model_name: str
    num_layers: int
    gpu_name: str | None = None
    expandable_segments: bool = False
    notes: tuple[str, ...] = ()
    eval_batch_size: int | None = None  # an evaluation pass of this batch after the steps is counted in the totals
    eval_peak: int | None = None  # live bytes at the evaluation pass's peak
    # activation offloading (config.offload_activations): pinned host RAM the forward's copies hold, and the bytes
    # copied to the host in each micro-batch's forward (and back to the card in its backward)
    offloaded_pinned: int = 0
    offloaded_copied: int = 0

    def __post_init__(self) -> None:
        for name in ("weights", "gradients", "optimizer_state", "activations", "logits_and_loss", "temporaries",
                     "workspaces", "cuda_context", "peak_allocated", "min_reserved", "peak_reserved", "device_total"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative; got {getattr(self, name)}")
        if not self.peak_allocated <= self.min_reserved <= self.peak_reserved:
            raise ValueError("need peak_allocated <= min_reserved <= peak_reserved")

    @property
    def required_bytes(self) -> int:
        """Free device memory the step needs: the least the allocator can run in, plus the CUDA context."""
        return self.min_reserved + self.cuda_context

    def components(self, *, tight: bool = False) -> dict[str, int]:
        """The named parts of ``device_total``, in print order; with ``tight``, of ``required_bytes`` (the allocator
        margin the step needs on a card with no memory to spare, rather than what it reserves on a roomy one)."""
        parts = {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer state": self.optimizer_state,
            "activations": self.activations,
            "logits and loss": self.logits_and_loss,
            "temporaries": self.temporaries,
            "cuBLAS workspaces": self.workspaces,
        }
        parts["allocator margin"] = (self.min_reserved if tight else self.peak_reserved) - sum(parts.values())
        parts["CUDA context"] = self.cuda_context
        return parts

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in self.__slots__ if name != "config"}
        out["config"] = {k: getattr(self.config, k) for k in self.config.__slots__}
        out["simulated_layers"] = list(self.simulated_layers)
        out["notes"] = list(self.notes)
        out["required_bytes"] = self.required_bytes
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "MemoryEstimate":
        """The inverse of ``to_dict``."""
        data = dict(data)
        data.pop("required_bytes", None)
        data["config"] = simulate.StepConfig.from_dict(data["config"])
        data["simulated_layers"] = tuple(data["simulated_layers"])
        data["notes"] = tuple(data["notes"])
        return cls(**data)

    def summary(self) -> str:
        """A human table of the breakdown and totals."""
        cfg = self.config
        lines = [
            f"{self.model_name}: batch {self.batch_size} x {self.seq_len} tokens, {cfg.method}"
            f"{'' if cfg.quantization == 'none' else ' ' + cfg.quantization}, {cfg.precision}, "
            f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, {cfg.optimizer}"
            + (", activations offloaded" if cfg.offload_activations else "")
            + (f" on {self.gpu_name}" if self.gpu_name else ""),
            f"  peak: {self.where} ({self.source}; attention kernel: {self.attention_kernel})",
        ]
        width = max(len(k) for k in self.components())
        for name, value in self.components().items():
            lines.append(f"  {name:<{width}}  {fmt_bytes(value):>12}")
        if cfg.device == "cpu":  # no caching allocator and no card: the live tensors are what RAM holds
            lines.append(f"  {'peak live':<{width}}  {fmt_bytes(self.peak_allocated):>12}   the step's tensors in RAM")
        else:
            lines.append(f"  {'peak allocated':<{width}}  {fmt_bytes(self.peak_allocated):>12}   "
                         "torch.cuda.max_memory_allocated")
            lines.append(f"  {'peak reserved':<{width}}  {fmt_bytes(self.peak_reserved):>12}   "
                         "torch.cuda.max_memory_reserved")
            lines.append(f"  {'device total':<{width}}  {fmt_bytes(self.device_total):>12}   nvidia-smi")
            lines.append(f"  {'needs free':<{width}}  {fmt_bytes(self.required_bytes):>12}   "
                         "least free memory it runs in (the allocator releases cached blocks under pressure)")
        if self.eval_peak is not None:
            lines.append(f"  evaluation at batch {self.eval_batch_size}: peak {fmt_bytes(self.eval_peak)} of live "
                         "tensors (counted in the totals)")
        if cfg.offload_activations:
            lines.append(f"  activations offloaded: {fmt_bytes(self.offloaded_pinned)} of pinned host RAM, "
                         f"{fmt_bytes(self.offloaded_copied)} copied to the host and back each micro-batch")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


# -- candidate points of a simulation ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Point:
    slot: tuple  # (step, kind, layer type, ordinal within the block)
    index: int  # block index for indexed kinds (F/G: layer; K: backward order), else 0
    live: np.ndarray  # bytes per category right after the candidate allocation
    phase: int


_INDEXED = ("F", "G", "K")


def _layer_types(spec: models.ModelSpec, num_layers: int) -> list[str]:
    types = getattr(spec.config, "layer_types", None)
    if not types or len(set(types)) == 1:
        return ["layer"] * num_layers
    period = _type_period(types)
    return [types[i % period] for i in range(num_layers)]


def _type_period(types) -> int:
    for p in range(1, len(types) + 1):
        if all(types[i] == types[i % p] for i in range(len(types))):
            return p
    return len(types)


def _points(sim: Simulation, types: list[str], split_last_backward: bool = False) -> list[_Point]:
    """Candidate peaks of ``sim``, each placed in its block. With ``split_last_backward`` the backward of layer 1
    is a block kind of its own ("K1"): it is where tensors every layer shared (rotary tables cast once in the
    forward) are released when layer 0's input needs no gradient, so it can differ from the other layers'."""
    tl = sim.timeline
    events = tl.events
    if len(events) == 0:
        return []
    uids = np.where(events >= 0, events, -events - 1)
    signs = np.where(events >= 0, 1, -1)
    delta = np.zeros((len(events), len(CATEGORY_NAMES)), dtype=np.int64)
    delta[np.arange(len(events)), sim.categories[uids]] = signs * tl.sizes[uids]
    base = np.zeros(len(CATEGORY_NAMES), dtype=np.int64)
    np.add.at(base, sim.categories[: tl.adopted], tl.sizes[: tl.adopted])
    live = base + np.cumsum(delta, axis=0)
    candidate = (events >= 0) & np.append(events[1:] < 0, True)
    out = []
    for (step, kind, i), (start, end) in _blocks(sim).items():
        # a block's last allocation is a candidate whatever the next block starts with: whether a release follows
        # it belongs to the neighbour (layer 0's backward starts otherwise than the others'), not to this block
        here = candidate[start:end].copy()
        if end > start and events[end - 1] >= 0:
            here[-1] = True
        idx = np.nonzero(here)[0] + start
        if kind in ("F", "G"):
            type_, index = types[i], i
        elif kind == "K":
            type_, index = types[sim.num_layers - 1 - i], i
        else:
            type_, index = "", 0
        if split_last_backward and kind == "K" and i == sim.num_layers - 2:
            kind, index = "K1", 0
        if kind in ("F", "G") and i == 0:
            kind = kind + "0"
        for ordinal, j in enumerate(idx):
            out.append(_Point((step, kind, type_, ordinal), index, live[j], int(sim.phases[uids[j]])))
    return out


def _blocks(sim: Simulation) -> dict[tuple[int, str, int], tuple[int, int]]:
    """Event ranges per step: P (prologue), F i (layer i forward), G i (after layer i), M (head), K u (backward of
    layer L-1-u), T (first layer's backward and the optimizer)."""
    by_step: dict[int, dict[str, int]] = {}
    for index, label in sim.timeline.marks:
        step, _, what = label.partition(":")
        by_step.setdefault(int(step), {})[what] = index
    depth = sim.num_layers
    out = {}
    for step, m in by_step.items():
        if "inputs" not in m:
            continue  # the evaluation pass after the steps is not a training step
        needed = ["inputs", "end", "F0", f"E{depth - 1}", f"B{depth - 1}", "B0"]
        if any(k not in m for k in needed):
            raise SimulationError("the step's layer marks are incomplete; cannot extrapolate depth")
        out[(step, "P", 0)] = (m["inputs"], m["F0"])
        for i in range(depth):
            out[(step, "F", i)] = (m[f"F{i}"], m[f"E{i}"])
            if i < depth - 1:
                out[(step, "G", i)] = (m[f"E{i}"], m[f"F{i + 1}"])
        out[(step, "M", 0)] = (m[f"E{depth - 1}"], m[f"B{depth - 1}"])
        for i in range(depth - 1, 0, -1):
            out[(step, "K", depth - 1 - i)] = (m[f"B{i}"], m[f"B{i - 1}"])
        out[(step, "T", 0)] = (m["B0"], m["end"])
    return out


# -- fitting candidates over depth and shape ---------------------------------------------------------------------------
def shape_features(batch_size, seq_len, features: str) -> np.ndarray:
    """Shape features, scaled to keep fits well conditioned (sequence lengths in units of 1024 tokens).

    ``"bs"``: (1, s, s^2, b*s, b*s^2), every allocation's size over batch and sequence; ``"b"``: (1, b) at a fixed
    sequence length; ``"one"``: (1,) at a single shape.
    """
    b = np.asarray(batch_size, dtype=np.float64)
    s = np.asarray(seq_len, dtype=np.float64) / 1024.0
    if features == "one":
        return np.ones(np.broadcast(b, s).shape + (1,))
    if features == "b":
        return np.stack(np.broadcast_arrays(np.ones_like(b * s), b), axis=-1)
    return np.stack(np.broadcast_arrays(np.ones_like(b * s), s, s * s, b * s, b * s * s), axis=-1)


def _feature_set(shapes) -> str:
    shapes = sorted(set(shapes))
    if len(shapes) == 1:
        return "one"
    if len({s for _, s in shapes}) == 1 and len(shapes) == 2:
        return "b"
    if len(shapes) == 5:
        return "bs"
    raise ValueError(f"cannot fit features to shapes {shapes}")


_N_FEATURES = {"one": 1, "b": 2, "bs": 5}


@dataclass(frozen=True, slots=True)
class _Envelope:
    """Candidate peaks of the full-depth step as linear functions of the shape features."""

    weights: np.ndarray  # (points, features, categories)
    totals: np.ndarray  # (points, features): weights summed over device categories
    labels: tuple[str, ...]
    features: str

    def at(self, batch_size: int, seq_len: int) -> tuple[int, np.ndarray, str]:
        phi = shape_features(batch_size, seq_len, self.features)
        totals = self.totals @ phi
        best = int(np.argmax(totals))
        by_category = np.rint(phi @ self.weights[best]).astype(np.int64)
        return int(round(totals[best])), by_category, self.labels[best]


def fit_envelope(sims: list[Simulation], spec: models.ModelSpec, target_layers: int) -> _Envelope:
    """Fits candidate peaks over (depth, block index, shape) and evaluates depth at ``target_layers``. Where only
    the backward of layer 1 differs from the other layers' backward, it is fitted as a block kind of its own."""
    try:
        return _fit_envelope(sims, spec, target_layers, split_last_backward=False)
    except _UnevenBlocks as err:
        if err.kind != "K":
            raise
        return _fit_envelope(sims, spec, target_layers, split_last_backward=True)


class _UnevenBlocks(SimulationError):
    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def _fit_envelope(sims: list[Simulation], spec: models.ModelSpec, target_layers: int, *,
                  split_last_backward: bool) -> _Envelope:
    depths = sorted({s.num_layers for s in sims})
    features = _feature_set((s.batch_size, s.seq_len) for s in sims)
    n_features = _N_FEATURES[features]
    single_depth = len(depths) == 1
    if single_depth and depths[0] != target_layers:
        raise ValueError("a single simulated depth must be the target depth")
    observed: dict[tuple, list[tuple[np.ndarray, np.ndarray]]] = {}
    phases: dict[tuple, int] = {}
    block_sizes: dict[tuple, set[int]] = {}
    for n, sim in enumerate(sims):
        phi = shape_features(sim.batch_size, sim.seq_len, features)
        counts: dict[tuple, int] = {}
        rows: dict[int | None, np.ndarray] = {}
        for point in _points(sim, _layer_types(spec, sim.num_layers), split_last_backward):
            slot, kind = point.slot, point.slot[1]
            counts[(slot[:3], point.index)] = counts.get((slot[:3], point.index), 0) + 1
            if single_depth:
                if kind in _INDEXED:
                    slot = slot + (point.index,)  # every block observed: no index model needed
                row = phi
            else:
                key = point.index if kind in _INDEXED else None
                row = rows.get(key)
                if row is None:
                    depth_terms = [1.0, sim.num_layers] + ([] if key is None else [key])
                    row = rows[key] = np.outer(phi, depth_terms).ravel()
            observed.setdefault(slot, []).append((row, point.live))
            phases[slot] = point.phase
        for (block, _), count in counts.items():
            block_sizes.setdefault(block, set()).add(count)
    # a single depth observes every block as itself (no index model), so blocks may differ between layers there
    uneven = [block for block, sizes in block_sizes.items() if len(sizes) > 1 and not single_depth]
    if uneven:
        raise _UnevenBlocks(f"blocks of the step differ between layers or simulations ({uneven[0]}); "
                            "cannot extrapolate depth", uneven[0][1])
    target_types = _layer_types(spec, target_layers)
    # slots of one kind and layer type were observed in the same simulations and blocks, so they share a design
    # matrix: solve each group with one least-squares call over all its slots and categories
    groups: dict[tuple, list[tuple]] = {}
    for slot, rows in observed.items():
        kind = slot[1]
        if kind not in _INDEXED and len(rows) != len(sims):
            raise SimulationError(f"simulations disagree on the step's structure at {slot}; cannot extrapolate")
        design = np.array([r for r, _ in rows])
        groups.setdefault((slot[1], slot[2], len(rows), design.tobytes()), []).append(slot)
    weights, labels = [], []
    for (kind, type_, n_rows, _), slots in groups.items():
        X = np.array([r for r, _ in observed[slots[0]]])
        if n_rows < X.shape[1]:
            raise SimulationError(f"too few observations of {slots[0]} to extrapolate depth")
        Y = np.stack([np.array([v for _, v in observed[slot]], dtype=np.float64) for slot in slots], axis=1)
        coef, *_ = np.linalg.lstsq(X, Y.reshape(n_rows, -1), rcond=None)
        coef = coef.reshape(X.shape[1], len(slots), -1)  # (columns, slots, categories)
        for j, slot in enumerate(slots):
            c = coef[:, j, :]
            if single_depth:
                evaluations = [(slot[4] if kind in _INDEXED else None, c)]
            elif kind not in _INDEXED:
                c = c.reshape(n_features, 2, -1)
                evaluations = [(None, c[:, 0] + target_layers * c[:, 1])]
            else:
                c = c.reshape(n_features, 3, -1)
                evaluations = [(i, c[:, 0] + target_layers * c[:, 1] + i * c[:, 2])
                               for i in _extremes(kind, type_, target_types)]
            for index, w in evaluations:
                weights.append(w)
                labels.append(_describe(slot, index, phases[slot], target_layers))
    weights_arr = np.array(weights)  # (points, features, categories)
    totals = weights_arr[:, :, _DEVICE_CATEGORIES].sum(axis=2)
    return _Envelope(weights_arr, totals, tuple(labels), features)


def _extremes(kind: str, type_: str, types: list[str]) -> list[int]:
    depth = len(types)
    if kind == "F":
        idx = [i for i in range(1, depth) if types[i] == type_]
    elif kind == "G":
        idx = [i for i in range(1, depth - 1) if types[i] == type_]
    else:  # K: u = depth - 1 - layer, layers depth-1 .. 1
        idx = [u for u in range(0, depth - 1) if types[depth - 1 - u] == type_]
    return sorted({idx[0], idx[-1]}) if idx else []


def _describe(slot, index, phase, depth) -> str:
    step, kind = slot[0], slot[1]
    where = {
        "P": "start of the forward pass",
        "F0": "forward of layer 0",
        "F": f"forward of layer {index}" if index is not None else "forward",
        "G0": "forward, after layer 0",
        "G": f"forward, after layer {index}" if index is not None else "forward",
        "M": "logits and loss" if phase in (FORWARD, HEAD) else "backward of the logits and loss",
        "K": f"backward of layer {depth - 1 - index}" if index is not None else "backward",
        "K1": "backward of layer 1",
        "T": "optimizer step" if phase == OPTIMIZE else "backward of layer 0 and the embeddings",
    }.get(kind, kind)
    return f"step {step}, {where}"


# -- shapes to simulate ---------------------------------------------------------------------------------------------
def mask_regime(spec: models.ModelSpec, seq_len: int) -> str:
    """Transformers builds an explicit sliding-window mask once a sequence reaches the window: another code path."""
    window = spec.sliding_window
    return "windowed" if window and seq_len >= window else "plain"


def _fit_shapes(spec: models.ModelSpec, regime: str) -> list[tuple[int, int]]:
    top = spec.max_positions or 4096
    if regime == "windowed":
        start = -(-spec.sliding_window // 64) * 64
        seqs = [start, start + 128, start + 256]
    else:
        seqs = [128, 256, 384]
    if seqs[-1] > top:
        seqs = sorted({max(8, top // 3 // 8 * 8), max(16, 2 * top // 3 // 8 * 8), top // 8 * 8})
    (s1, s2, s3) = seqs
    # batch 1 turns some copies into views (reshapes over a size-1 dim), a different event stream; 2 and 4 do not
    return [(2, s1), (4, s1), (2, s2), (4, s2), (2, s3)]


def simulated_depths(spec: models.ModelSpec, *, deep: bool = False) -> tuple[int, ...]:
    """The depths simulated for ``spec``: (p+1, 2p+1) for a layer-type period p, or the full depth if smaller.

    With ``deep``, (2p+1, 3p+1): two blocks of every kind past the first, for steps whose gaps between layers hold
    allocations (the shallow pair cannot fit those)."""
    if spec.task == "seq2seq-lm":
        # two stacks: the encoder runs inside the prologue of the decoder's layer marks, so its depth does not
        # extrapolate with theirs; encoder-decoders people fine-tune on one card (T5, BART up to base size) have
        # at most 12 layers a stack, simulated whole
        return (spec.num_layers,)
    types = getattr(spec.config, "layer_types", None)
    period = _type_period(types) if types and len(set(types)) > 1 else 1
    depths = (2 * period + 1, 3 * period + 1) if deep else (period + 1, 2 * period + 1)
    return (spec.num_layers,) if spec.num_layers <= depths[1] else depths


def simulate_depths(spec, cfg, shapes, progress, eval_batch_size=None, eval_with_batch=False
                     ) -> tuple[tuple[int, ...], list[Simulation], "_Envelope"]:
    """Simulations of ``shapes`` at the shallow depths, or the deep ones when the shallow fit cannot be made; an
    evaluation pass of ``eval_batch_size`` (or, with ``eval_with_batch``, of each shape's batch) follows the steps."""
    # An encoder whose layers share a tensor (DeBERTa's relative position embeddings, whose gradient the last layer's
    # backward creates and the others add to) does not extrapolate; encoders people fine-tune on one card are base
    # size (12 layers), simulated whole then.
    whole = spec.task != "causal-lm" and spec.num_layers <= 24
    for attempt in ("shallow", "deep", "whole") if whole else ("shallow", "deep"):
        depths = (spec.num_layers,) if attempt == "whole" else simulated_depths(spec, deep=attempt == "deep")
        jobs = [simulate.Job(spec=spec, cfg=cfg, batch_size=b, seq_len=s, num_layers=d,
                             eval_batch_size=b if eval_with_batch else eval_batch_size)
                for d in depths for b, s in shapes]
        sims = simulate.run_many(jobs, progress)
        try:
            return depths, sims, _envelope_of(sims, spec)
        except SimulationError:
            if attempt == "whole" or len(depths) == 1 or (attempt == "deep" and not whole):
                raise
            log.debug("depths %s do not fit %s; simulating %s", depths, spec.name,
                      "deeper" if attempt == "shallow" else "the whole depth")
    raise AssertionError("unreachable")


_ENVELOPES: dict[tuple, tuple[list[Simulation], "_Envelope"]] = {}  # by the simulations' identities (held, so an
_ENVELOPES_SIZE = 64  # identity is not reused while its entry lives) and what of the spec the fit reads


def _envelope_of(sims: list[Simulation], spec: models.ModelSpec) -> "_Envelope":
    """``fit_envelope`` at the model's depth, fitted once per set of simulations: a plan asks for the same fit for
    its fast model, its exact estimates and its run model, and a warm plan asks again."""
    types = getattr(spec.config, "layer_types", None)
    key = (tuple(id(s) for s in sims), spec.num_layers, tuple(types) if types else None)
    hit = _ENVELOPES.get(key)
    if hit is None:
        if len(_ENVELOPES) >= _ENVELOPES_SIZE:
            _ENVELOPES.pop(next(iter(_ENVELOPES)))
        try:
            fitted: _Envelope | SimulationError = fit_envelope(sims, spec, spec.num_layers)
        except SimulationError as err:
            fitted = err  # a depth that cannot be extrapolated stays so: the next plan goes straight to the next
        hit = _ENVELOPES[key] = (list(sims), fitted)
    if isinstance(hit[1], SimulationError):
        raise hit[1].with_traceback(None)
    return hit[1]


# -- activation offloading: the host side ----------------------------------------------------------------------------
def pinned_bytes(sizes) -> int:
    """Pinned host memory that copies of these sizes take: PyTorch's caching host allocator rounds each request up
    to a power of two (aten/src/ATen/core/CachingHostAllocator.h, ``allocate``: ``PowerOf2Ceil(size)``)."""
    return sum(1 << (int(n) - 1).bit_length() for n in sizes if n > 0)


class OffloadFit:
    """What activation offloading keeps in host memory at any shape: each offloaded tensor's bytes fitted over the
    shape features at every simulated depth (exact where every allocation's is), rounded as the host allocator
    rounds, then extrapolated in depth like the step's peak. The copies of one forward all live until its backward,
    so their sum is the host's peak for the step."""

    def __init__(self, sims: list[Simulation], depths: tuple[int, ...], num_layers: int) -> None:
        self.depths, self.num_layers = depths, num_layers
        self._fits: dict[int, tuple[str, np.ndarray]] = {}
        for depth in depths:
            group = [s for s in sims if s.num_layers == depth]
            if len({len(s.offloaded) for s in group}) != 1:
                raise SimulationError("activation offloading copied different tensors at different shapes; "
                                      "cannot fit its host memory")
            features = _feature_set([(s.batch_size, s.seq_len) for s in group])
            phi = shape_features(np.array([s.batch_size for s in group]), np.array([s.seq_len for s in group]),
                                 features)
            sizes = np.array([s.offloaded for s in group], dtype=np.float64).reshape(len(group), -1)
            self._fits[depth] = (features, np.linalg.lstsq(phi, sizes, rcond=None)[0])

    def at(self, batch_size: int, seq_len: int) -> tuple[int, int]:
        """(pinned host bytes, bytes copied each way) of a micro-batch of this shape at the model's depth."""
        pinned, copied = {}, {}
        for depth, (features, coef) in self._fits.items():
            sizes = np.maximum(0, np.rint(shape_features(batch_size, seq_len, features) @ coef)).astype(np.int64)
            pinned[depth], copied[depth] = pinned_bytes(sizes.tolist()), int(sizes.sum())
        return (int(round(by_depth(pinned, self.depths, self.num_layers))),
                int(round(by_depth(copied, self.depths, self.num_layers))))


# -- the fast model over shapes ---------------------------------------------------------------------------------------
class StepModel:
    """Peak memory of one model and step configuration as a function of batch size (and sequence length).

    With ``seq_len`` it is fitted over batch size at that length from four simulations (batch 2 and 4 at two
    depths); without, over batch size and sequence length from ten (five shapes at two depths). A query takes
    microseconds. ``query`` gives the allocated peak (live tensors plus workspaces) with its breakdown;
    ``min_reserved`` adds an allocator margin taken from capped replays of the same simulations (the worst share
    seen), an estimate that ``estimate()`` confirms at an exact shape.
    """

    def __init__(self, spec: models.ModelSpec, cfg: StepConfig, *, seq_len: int | None = None,
                 evaluate: bool = False, progress: Callable[[str], None] | None = None) -> None:
        self.spec, self.cfg, self.seq_len = spec, cfg, seq_len
        started = time.perf_counter()
        if seq_len is not None:
            spec.check_seq_len(seq_len)
            shapes = [(2, seq_len), (4, seq_len)]
        else:
            shapes = _fit_shapes(spec, "plain")
        self.depths, sims, self.envelope = simulate_depths(spec, cfg, shapes, progress, eval_with_batch=evaluate)
        self._eval_line = _fit_eval(sims, self.depths, spec) if evaluate and seq_len is not None else None
        self.workspaces = workspace_bytes(cfg)
        self._margin_share = 0.0 if cfg.device == "cpu" else _fit_margin(sims, spec, self.workspaces)
        self.kernel = _kernel_name(sims[-1])
        self.offload = OffloadFit(sims, self.depths, spec.num_layers) if cfg.offload_activations else None
        self.build_seconds = time.perf_counter() - started

    def query(self, batch_size: int, seq_len: int | None = None) -> tuple[int, np.ndarray, str]:
        """(allocated peak bytes, bytes per category, where) at this shape."""
        seq_len = self._seq(seq_len)
        total, by_category, where = self.envelope.at(batch_size, seq_len)
        return total + self.workspaces, by_category, where

    def min_reserved(self, batch_size: int, seq_len: int | None = None) -> int:
        """Estimated bytes the allocator must be allowed to reserve at this shape."""
        seq_len = self._seq(seq_len)
        allocated, parts, _ = self.query(batch_size, seq_len)
        dynamic = allocated - self.workspaces - int(parts[simulate.WEIGHTS]) - int(parts[simulate.OPTIMIZER])
        return allocated + int(self._margin_share * max(0, dynamic))

    def offloaded(self, batch_size: int, seq_len: int | None = None) -> tuple[int, int]:
        """(pinned host bytes, bytes copied each way per micro-batch) of activation offloading; zeros without it."""
        return (0, 0) if self.offload is None else self.offload.at(batch_size, self._seq(seq_len))

    def eval_need(self, eval_batch_size: int) -> int:
        """Live bytes plus workspaces at the peak of an evaluation pass of ``eval_batch_size`` (fitted with
        ``evaluate=True`` at a fixed sequence length), with the same cautious allocator margin as training."""
        if self._eval_line is None:
            raise ValueError("this StepModel was built without evaluate=True")
        a, b = self._eval_line
        live = a + b * eval_batch_size
        return int(live * (1 + self._margin_share)) + self.workspaces

    def _seq(self, seq_len: int | None) -> int:
        if seq_len is None:
            if self.seq_len is None:
                raise ValueError("this StepModel covers several sequence lengths: pass seq_len")
            return self.seq_len
        if self.seq_len is not None and seq_len != self.seq_len:
            raise ValueError(f"this StepModel was fitted at seq_len={self.seq_len}")
        return seq_len


def workspace_bytes(cfg: StepConfig) -> int:
    return WORKSPACE_THREADS * cublas_workspace_bytes(cfg.compute_capability) if cfg.device == "cuda" else 0


def device_events(sim: Simulation) -> np.ndarray:
    """The events of ``sim`` that touch device memory (host-side step counters left out)."""
    tl = sim.timeline
    on_device = sim.categories != HOST
    return tl.events[on_device[np.where(tl.events >= 0, tl.events, -tl.events - 1)]]


def _replay(sim: Simulation, workspaces: int, *, expandable: bool = False) -> allocator.AllocatorStats:
    key = ("replay", workspaces, expandable)
    if key not in sim.memo:
        extra = (workspaces // WORKSPACE_THREADS,) * WORKSPACE_THREADS if workspaces else ()
        sim.memo[key] = allocator.replay(sim.timeline.sizes, device_events(sim),
                                         baseline_uids=range(sim.timeline.adopted), extra=extra, expandable=expandable)
    return sim.memo[key]


def _min_reserved(sim: Simulation, workspaces: int, *, expandable: bool = False) -> int:
    key = ("min_reserved", workspaces, expandable)
    if key not in sim.memo:
        extra = (workspaces // WORKSPACE_THREADS,) * WORKSPACE_THREADS if workspaces else ()
        sim.memo[key] = allocator.min_limit(sim.timeline.sizes, device_events(sim),
                                            baseline_uids=range(sim.timeline.adopted), extra=extra,
                                            expandable=expandable)
    return sim.memo[key]


def device_peak(sim: Simulation) -> int:
    """Peak live bytes of ``sim`` on the device (host-side allocations left out)."""
    tl = sim.timeline
    uids = np.where(tl.events >= 0, tl.events, -tl.events - 1)
    on_device = sim.categories[uids] != HOST
    signed = np.where(tl.events >= 0, tl.sizes[uids], -tl.sizes[uids]) * on_device
    base = int(tl.sizes[: tl.adopted][sim.categories[: tl.adopted] != HOST].sum())
    return int(max(base, (base + np.cumsum(signed)).max()))


def margin_at_depth(kind: str, values: dict[int, int], depths: tuple[int, ...], target: int) -> int:
    """The allocator's bytes over live tensors at the full depth, from its values at the simulated depths.

    Block rounding (``"allocated"``) adds the same bytes for every layer's tensors, so it is extrapolated linearly.
    Fragmentation (reserved and needed) is not linear in depth: it comes from the holes the largest transient
    blocks leave, which every layer reuses, and replays at 2 to 8 layers of the same step show it bounded and
    jumping by up to a GiB from one depth to the next (Llama-3.2-1B, Mistral-7B; benchmarks/margin_by_depth.py). A line
    through two such values, stretched to 32 layers, swings by tens of GiB and broke monotonicity in the batch; the
    largest value seen is the estimate, and its spread is part of the plan's uncertainty margin."""
    if kind == "allocated":
        return int(round(by_depth(values, depths, target)))
    return int(max(values.values()))


def _eval_peak(sim: Simulation) -> int | None:
    """Peak live device bytes during the evaluation pass after the steps, or None when there was none."""
    if not sim.eval_batch_size:
        return None
    tl = sim.timeline
    start = next(i for i, label in tl.marks if label.endswith(":eval"))
    uids = np.where(tl.events >= 0, tl.events, -tl.events - 1)
    on_device = sim.categories[uids] != HOST
    signed = np.where(tl.events >= 0, tl.sizes[uids], -tl.sizes[uids]) * on_device
    base = int(tl.sizes[: tl.adopted][sim.categories[: tl.adopted] != HOST].sum())
    live = base + np.cumsum(signed)
    before = live[start - 1] if start else base
    return int(max(before, live[start:].max())) if start < len(live) else int(before)


def by_depth(values: dict[int, float], depths: tuple[int, ...], target: int) -> float:
    """Linear extrapolation in depth from the simulated depths."""
    if len(depths) == 1:
        return values[depths[0]]
    (d0, d1) = depths
    return values[d0] + (values[d1] - values[d0]) * (target - d0) / (d1 - d0)


def _fit_eval(sims, depths, spec) -> tuple[float, float]:
    """The evaluation peak as a line in the eval batch, per depth, extrapolated to the model's depth."""
    lines = {}
    for depth in depths:
        points = sorted((s.eval_batch_size, _eval_peak(s)) for s in sims if s.num_layers == depth)
        (b0, p0), (b1, p1) = points[0], points[-1]
        slope = (p1 - p0) / (b1 - b0)
        lines[depth] = (p0 - slope * b0, slope)
    return (by_depth({d: lines[d][0] for d in depths}, depths, spec.num_layers),
            by_depth({d: lines[d][1] for d in depths}, depths, spec.num_layers))


def _fit_margin(sims, spec, workspaces) -> float:
    """The allocator margin as a share of the step's dynamic memory (all but weights, optimizer state and
    workspaces): the largest share any fitted simulation needed. Fragmentation is not smooth in the shape, so the
    fast model takes the worst case it has seen; ``estimate()`` replays the exact shape."""
    worst = 0.0
    for sim in sims:
        live = device_peak(sim)
        static = int(sim.timeline.sizes[: sim.timeline.adopted].sum())  # weights and buffers
        static += _optimizer_bytes(sim)
        margin = _min_reserved(sim, workspaces) - (live + workspaces)
        worst = max(worst, margin / max(1, live - static))
    return worst


def _optimizer_bytes(sim: Simulation) -> int:
    return int(sim.timeline.sizes[sim.categories == OPTIMIZER].sum())


def _kernel_name(sim: Simulation) -> str:
    kernels = sorted(set(sim.attention_kernels))
    return "/".join(kernels) if kernels else "eager (matmul and softmax)"


@functools.lru_cache(maxsize=128)
def step_model(spec: models.ModelSpec, cfg: StepConfig, seq_len: int | None = None) -> StepModel:
    """The (cached) ``StepModel`` of a model and configuration."""
    return StepModel(spec, cfg, seq_len=seq_len)


# -- the public estimate ----------------------------------------------------------------------------------------------
def step_config(
    gpu: gpus.GpuInfo,
    *,
    method: str = "full",
    precision: str | None = None,
    quantization: str | None = None,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw_torch_fused",
    lora_r: int = 16,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.05,
    lora_targets: tuple[str, ...] | None = None,
    max_grad_norm: float | None = 1.0,
    offload_activations: bool = False,
) -> StepConfig:
    """The ``StepConfig`` for these knobs on ``gpu`` (``gpu.source == "host"``: a run in host memory on the CPU).

    ``precision`` None picks bf16-mixed where the card supports bf16, else 16-mixed (32-true on the CPU); any name
    ``simulate.precision_name`` takes is accepted (``bf16-true`` for 16-bit weights); ``quantization`` None
    means 4bit for qlora and none otherwise; ``lora`` with a quantization is qlora.
    """
    if method not in simulate.METHODS:
        raise ConfigError(f"method must be one of {', '.join(simulate.METHODS)}; got {method!r}")
    if quantization is None:
        quantization = "4bit" if method == "qlora" else "none"
    if method == "lora" and quantization != "none":
        method = "qlora"
    host = gpu.source == "host"
    # a card known only by its size is planned as an Ampere consumer card, the commonest 8-24 GB class
    cc = gpu.compute_capability or (8, 6)
    if precision is None:
        precision = "32-true" if host else ("bf16-mixed" if gpu.bf16 else "16-mixed")
    return StepConfig(
        method=method, quantization=quantization, precision=precision,
        gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, lora_targets=tuple(lora_targets) if lora_targets else None,
        max_grad_norm=max_grad_norm, compute_capability=cc, device="cpu" if host else "cuda",
        offload_activations=offload_activations,
    )


def estimate(
    model,
    gpu=None,
    *,
    batch_size: int,
    seq_len: int,
    method: str = "full",
    precision: str | None = None,
    quantization: str | None = None,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw_torch_fused",
    lora_r: int = 16,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.05,
    lora_targets: tuple[str, ...] | None = None,
    max_grad_norm: float | None = 1.0,
    expandable_segments: bool = False,
    offload_activations: bool = False,
    progress: Callable[[str], None] | None = None,
) -> MemoryEstimate:
    """Peak memory of a training step of ``model`` on ``gpu`` with these knobs, without allocating anything.

    ``model`` is anything ``autofit.model.resolve`` takes; ``gpu`` anything ``autofit.gpu.resolve`` takes, or
    ``"cpu"`` for a run in host memory. The step is simulated at two small depths at exactly this shape and
    extrapolated to the full depth; if the architecture cannot be simulated, an analytic estimate built from the
    same components is returned and says so. Raises ``ConfigError``, ``ModelError`` or ``GpuError`` for bad input.
    """
    spec = models.resolve(model)
    card = gpus.resolve(gpu)
    validate.estimate_inputs(spec, card, batch_size=batch_size, seq_len=seq_len, method=method, precision=precision,
                             quantization=quantization, gradient_checkpointing=gradient_checkpointing,
                             optimizer=optimizer, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                             lora_targets=lora_targets, max_grad_norm=max_grad_norm,
                             expandable_segments=expandable_segments, offload_activations=offload_activations)
    cfg = step_config(card, method=method, precision=precision, quantization=quantization,
                      gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, lora_r=lora_r,
                      lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets,
                      max_grad_norm=max_grad_norm, offload_activations=offload_activations)
    try:
        result = simulate_point(spec, cfg, batch_size=batch_size, seq_len=seq_len,
                                expandable_segments=expandable_segments, progress=progress)
    except SimulationError as err:
        log.warning("%s; falling back to the analytic estimate", err)
        result = analytic(spec, cfg, batch_size=batch_size, seq_len=seq_len, reason=str(err))
    return replace(result, gpu_name=card.name)


def simulate_point(spec: models.ModelSpec, cfg: StepConfig, *, batch_size: int, seq_len: int,
                   eval_batch_size: int | None = None, expandable_segments: bool = False,
                   progress: Callable[[str], None] | None = None) -> MemoryEstimate:
    """The estimate at one shape from simulations at that exact shape (two depths, extrapolated); with
    ``eval_batch_size``, an evaluation pass of that batch after the steps is simulated and counted too."""
    depths, sims, envelope = simulate_depths(spec, cfg, [(batch_size, seq_len)], progress, eval_batch_size)
    live, by_category, where = envelope.at(batch_size, seq_len)
    workspaces = workspace_bytes(cfg)
    over_live = {"allocated": 0, "reserved": 0, "needed": 0}  # host memory has no caching allocator: live is all
    for name, measure in () if cfg.device == "cpu" else (("allocated", lambda sim: _replay(sim, workspaces, expandable=expandable_segments).peak_allocated),
                          ("reserved", lambda sim: _replay(sim, workspaces, expandable=expandable_segments).peak_reserved),
                          ("needed", lambda sim: _min_reserved(sim, workspaces, expandable=expandable_segments))):
        values = {sim.num_layers: measure(sim) - (device_peak(sim) + workspaces) for sim in sims}
        over_live[name] = max(0, margin_at_depth(name, values, depths, spec.num_layers))
    eval_peak = None
    if eval_batch_size:
        eval_peak = int(round(by_depth({sim.num_layers: _eval_peak(sim) for sim in sims}, depths, spec.num_layers)))
    offloaded = OffloadFit(sims, depths, spec.num_layers).at(batch_size, seq_len) if cfg.offload_activations \
        else (0, 0)
    return _assemble(spec, cfg, batch_size, seq_len, live, by_category, where, workspaces,
                     rounding=over_live["allocated"], reserved_margin=over_live["reserved"],
                     needed_margin=over_live["needed"], source="simulation", kernel=_kernel_name(sims[-1]),
                     depths=depths, expandable=expandable_segments, eval_batch_size=eval_batch_size,
                     eval_peak=eval_peak, offloaded=offloaded)


def _assemble(spec, cfg, batch_size, seq_len, live, by_category, where, workspaces, *, rounding, reserved_margin,
              needed_margin, source, kernel, depths, expandable=False, notes=(), eval_batch_size=None,
              eval_peak=None, offloaded=(0, 0)) -> MemoryEstimate:
    parts = {name: int(by_category[i]) for i, name in enumerate(CATEGORY_NAMES) if i != HOST}
    tensors = sum(parts.values())
    allocated = max(tensors, eval_peak or 0) + workspaces + rounding
    reserved = max(allocated, tensors + workspaces + reserved_margin)
    needed = min(reserved, max(allocated, tensors + workspaces + needed_margin))
    context = cuda_context_bytes() if cfg.device == "cuda" else 0
    notes = tuple(notes)
    if cfg.device == "cuda":
        notes += (f"CUDA context {CONTEXT_SOURCE}",)
    return MemoryEstimate(
        weights=parts["weights"], gradients=parts["gradients"], optimizer_state=parts["optimizer_state"],
        activations=parts["activations"], logits_and_loss=parts["logits_and_loss"],
        temporaries=parts["temporaries"], workspaces=workspaces, allocator_margin=reserved - tensors - workspaces,
        cuda_context=context, peak_allocated=allocated, min_reserved=needed, peak_reserved=reserved,
        device_total=reserved + context, where=where, source=source, attention_kernel=kernel,
        simulated_layers=tuple(depths), config=cfg, batch_size=batch_size, seq_len=seq_len, model_name=spec.name,
        num_layers=spec.num_layers, expandable_segments=expandable, notes=notes, eval_batch_size=eval_batch_size,
        eval_peak=eval_peak, offloaded_pinned=offloaded[0], offloaded_copied=offloaded[1],
    )


def from_step_model(sm: StepModel, batch_size: int, seq_len: int | None = None) -> MemoryEstimate:
    """A ``MemoryEstimate`` from the fast model (for planners; ``estimate`` simulates the exact shape)."""
    seq_len = sm._seq(seq_len)
    allocated, by_category, where = sm.query(batch_size, seq_len)
    margin = sm.min_reserved(batch_size, seq_len) - allocated
    return _assemble(sm.spec, sm.cfg, batch_size, seq_len, allocated - sm.workspaces, by_category, where,
                     sm.workspaces, rounding=0, reserved_margin=margin, needed_margin=margin, source="surrogate",
                     kernel=sm.kernel, depths=sm.depths, offloaded=sm.offloaded(batch_size, seq_len))


# -- the analytic fallback -------------------------------------------------------------------------------------------
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1}
_NF4_BYTES = 0.5 + 1 / 64 + 1 / (64 * 256)  # packed weights, uint8 absmax per 64, fp32 absmax per 256 blocks


def analytic(spec: models.ModelSpec, cfg: StepConfig, *, batch_size: int, seq_len: int, reason: str = "") -> MemoryEstimate:
    """The estimate from formulas over the same components, for architectures a simulation cannot step.

    Activations per layer and token follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
    Transformer Models", eq. 1: 34h + 5as bytes in 16-bit without recomputation); with checkpointing, each layer
    keeps its 16-bit input and one layer is recomputed at a time.
    """
    counts = models.count_params(spec, method=cfg.method, quantization=cfg.quantization, half=cfg.half,
                                 lora_r=cfg.lora_r, lora_targets=cfg.lora_targets)
    weights = sum(int(n * (_NF4_BYTES if k == "nf4" else _BYTES.get(k, 4))) for k, n in counts.by_dtype.items())
    trainable = counts.trainable
    state = 2 if cfg.method == "full" and cfg.weights_dtype != torch.float32 else 4  # 16-bit weights: 16-bit states
    gradients = state * trainable
    optimizer_bytes = (2 + 8 / 256) * trainable if cfg.optimizer == "adamw_8bit" else 2 * state * trainable
    h, a, L, V = spec.hidden_size, spec.num_heads, spec.num_layers, spec.vocab_size
    tokens = batch_size * seq_len
    per_layer = tokens * (34 * h + 5 * a * seq_len)
    activations = (2 * h * tokens * L + per_layer) if cfg.gradient_checkpointing else per_layer * L
    logits = tokens * V * (10 if cfg.autocast else 8)
    by_category = np.zeros(len(CATEGORY_NAMES), dtype=np.int64)
    by_category[:6] = [weights, gradients, int(optimizer_bytes), activations, logits, 0]
    workspaces = workspace_bytes(cfg)
    live = int(by_category.sum())
    margin = int(0.10 * live)  # no replay to measure fragmentation: 10% of live memory, near the high end seen
    return _assemble(spec, cfg, batch_size, seq_len, live, by_category, "end of the forward pass (analytic)",
                     workspaces, rounding=0, reserved_margin=margin, needed_margin=margin, source="analytic",
                     kernel="unknown", depths=(), notes=(f"simulation failed ({reason}); analytic estimate, "
                                                         "allocator margin assumed 10% of live memory",))
