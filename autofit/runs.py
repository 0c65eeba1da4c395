"""The memory of a run, not of one step: batches padded to different lengths, evaluation between steps, replayed
through the allocator model over many steps.

A step's memory is simulated at one shape; a real run pads each batch to its longest sample, so the shapes change
from step to step and the caching allocator's cached blocks stop fitting the requests: reserved memory (and what
nvidia-smi shows) grows over the run while allocated memory stays put. ``RunModel`` makes the allocation stream of
a whole run without simulating each step: the simulated step's event stream does not depend on the shape (only
the sizes do, once the order of a burst of releases is made canonical), and every allocation's size is a polynomial
in ``(1, s, s^2, b*s, b*s^2)``, fitted exactly from five simulated shapes. A run is then a sequence of such steps
at the lengths each batch would have, with an evaluation pass where the plan has one, replayed through
``autofit.sim.allocator`` at each simulated depth; the allocator's margin over live tensors is carried to the full
depth as ``memory`` does for one step (its largest value; see ``memory.margin_at_depth``).

Two things are assumptions: sizes between the fitted shapes come from the polynomial, which reproduces the
simulated sizes exactly at the fitted shapes and is within a block (512 bytes) of them elsewhere where the step
allocates polynomially sized tensors; and a checkpoint save adds no device allocations (the Trainer writes the
state dicts from the tensors as they are; the host side of a save belongs to host-memory planning).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np

from autofit import memory
from autofit import model as models
from autofit.errors import ConfigError, SimulationError
from autofit.memory import MemoryEstimate
from autofit.sim import allocator, simulate
from autofit.sim.simulate import Simulation, StepConfig
from autofit.units import fmt_bytes

log = logging.getLogger(__name__)

DEFAULT_STEPS = 30  # long enough for reserved memory to settle in the replays of the catalog (run_vs_step.py)
DEFAULT_LENGTHS = "each sample's length drawn evenly from 1 to the sequence length"
_BLOCK = 512  # the allocator's rounding (autofit.sim.tracker.round_bytes)


def step_lengths(batch_size: int, seq_len: int, *, steps: int = DEFAULT_STEPS, sample_lengths=None,
                 seed: int = 0) -> tuple[int, ...]:
    """The padded length of each step's batch: the longest of ``batch_size`` samples drawn (seeded) from
    ``sample_lengths`` (token counts, cut at ``seq_len``), or from every length 1..``seq_len`` when none are given."""
    if batch_size < 1 or seq_len < 1 or steps < 1:
        raise ConfigError(f"batch size, sequence length and steps must be at least 1; got {batch_size}, {seq_len}, "
                          f"{steps}")
    if sample_lengths is None:
        pool = np.arange(1, seq_len + 1)
    else:
        pool = np.clip(np.asarray(sample_lengths, dtype=np.int64).reshape(-1), 1, seq_len)
        if pool.size == 0:
            raise ConfigError("no sample lengths to draw batches from")
    draws = np.random.default_rng(seed).choice(pool, size=(steps, batch_size), replace=True)
    return tuple(int(n) for n in draws.max(axis=1))


@dataclass(frozen=True, kw_only=True, slots=True)
class RunEstimate:
    """Peak memory of a run of ``len(lengths)`` steps, in bytes, and how reserved memory grows with the steps.

    ``peak_allocated`` / ``peak_reserved`` / ``device_total`` compare with ``torch.cuda.max_memory_allocated``,
    ``max_memory_reserved`` and nvidia-smi after the run on a card with memory to spare; ``min_reserved`` is the
    least the allocator can run the whole run in (a tight card), and ``required_bytes`` adds the CUDA context.
    ``reserved_after[k]`` is the peak reserved over steps 1..k. ``step`` is the two-step estimate at the longest
    length, for comparison.
    """

    model_name: str
    config: StepConfig
    batch_size: int
    lengths: tuple[int, ...]
    length_source: str
    eval_every: int | None
    eval_batch_size: int | None
    peak_allocated: int
    min_reserved: int
    peak_reserved: int
    cuda_context: int
    reserved_after: Mapping[int, int] = field(default_factory=dict)
    expandable_segments: bool = False
    step: MemoryEstimate | None = None
    simulated_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.peak_allocated <= self.min_reserved <= self.peak_reserved:
            raise ValueError("need peak_allocated <= min_reserved <= peak_reserved")
        object.__setattr__(self, "reserved_after", MappingProxyType(dict(self.reserved_after)))

    @property
    def steps(self) -> int:
        return len(self.lengths)

    @property
    def device_total(self) -> int:
        return self.peak_reserved + self.cuda_context

    @property
    def required_bytes(self) -> int:
        return self.min_reserved + self.cuda_context

    def growth(self) -> str:
        """How reserved memory grows over the run, in words, on a card with memory to spare."""
        after_two = self.reserved_after[min(2, self.steps)]
        final = max(self.reserved_after.values())
        if after_two >= final:
            return f"reserved memory stays at {fmt_bytes(after_two)} after step 2"
        last = min(k for k, v in self.reserved_after.items() if v >= final)
        return (f"reserved memory grows from {fmt_bytes(after_two)} after step 2 to {fmt_bytes(final)} by step {last} "
                "on a card with memory to spare")

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in self.__slots__ if name not in ("config", "step")}
        out["config"] = {k: getattr(self.config, k) for k in self.config.__slots__}
        out["lengths"] = list(self.lengths)
        out["reserved_after"] = {str(k): v for k, v in self.reserved_after.items()}
        out["simulated_layers"] = list(self.simulated_layers)
        out["step"] = self.step.to_dict() if self.step is not None else None
        out["device_total"], out["required_bytes"] = self.device_total, self.required_bytes
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RunEstimate":
        """The inverse of ``to_dict``."""
        data = {k: v for k, v in data.items() if k not in ("device_total", "required_bytes")}
        data["config"] = StepConfig.from_dict(data["config"])
        data["lengths"] = tuple(data["lengths"])
        data["reserved_after"] = {int(k): v for k, v in data["reserved_after"].items()}
        data["simulated_layers"] = tuple(data["simulated_layers"])
        data["step"] = MemoryEstimate.from_dict(data["step"]) if data.get("step") else None
        return cls(**data)

    def summary(self) -> str:
        lines = [f"{self.model_name}: a run of {self.steps} steps at micro-batch {self.batch_size}, padded lengths "
                 f"{min(self.lengths)}-{max(self.lengths)} ({self.length_source})"
                 + (f", evaluation every {self.eval_every} steps at batch {self.eval_batch_size}"
                    if self.eval_every else "")
                 + (", expandable segments" if self.expandable_segments else "")]
        rows = [("peak allocated", self.peak_allocated, "torch.cuda.max_memory_allocated"),
                ("peak reserved", self.peak_reserved, "torch.cuda.max_memory_reserved after the run"),
                ("device total", self.device_total, "nvidia-smi after the run"),
                ("needs free", self.required_bytes, "least free memory the whole run runs in")]
        for name, value, what in rows:
            lines.append(f"  {name:<16} {fmt_bytes(value):>11}   {what}")
        if self.step is not None:
            lines.append(f"  two steps at {self.step.seq_len} tokens: {fmt_bytes(self.step.peak_reserved)} reserved, "
                         f"needs {fmt_bytes(self.step.required_bytes)}; the run needs "
                         f"{self.required_bytes / self.step.required_bytes:.3f}x")
        marks = [k for k in (1, 2, 5, 10, 20, 30, 50, 100, 200) if k in self.reserved_after]
        if marks:
            lines.append("  reserved after step " + ", ".join(f"{k}: {fmt_bytes(self.reserved_after[k])}"
                                                            for k in marks))
        return "\n".join(lines)


# -- a step's allocations as functions of the shape ---------------------------------------------------------------
def _canonical(events: np.ndarray) -> np.ndarray:
    """``events`` with each burst of consecutive releases in ascending order: the release order within a burst
    (garbage collection of a group) differs between otherwise identical runs and changes no allocator decision."""
    out = events.copy()
    frees = out < 0
    if not frees.any():
        return out
    edges = np.flatnonzero(np.diff(np.concatenate(([0], frees.view(np.int8), [0]))))
    for start, stop in zip(edges[::2], edges[1::2]):
        out[start:stop] = np.sort(out[start:stop])[::-1]  # -u-1 descending = uid ascending
    return out


@dataclass(frozen=True, slots=True)
class _Template:
    """One depth's step: its event stream split into blocks, and each allocation's size as a polynomial."""

    num_layers: int
    coef: np.ndarray  # (5 features, uids): size polynomial of every allocation
    adopted: int  # uids 0..adopted-1 exist before the first step (weights, buffers)
    first: np.ndarray  # events up to the end of step 1 (optimizer state is created here)
    steady: np.ndarray  # step 2's events: self-contained, the same for every later step
    steady_uids: np.ndarray
    evaluation: np.ndarray  # the evaluation pass's events (empty when none was simulated)
    eval_uids: np.ndarray

    def sizes(self, batch_size: int, seq_len: int, uids=None) -> np.ndarray:
        phi = memory.shape_features(batch_size, seq_len, "bs")
        raw = np.rint(phi @ (self.coef if uids is None else self.coef[:, uids]))
        return np.maximum(_BLOCK, np.ceil(raw / _BLOCK) * _BLOCK).astype(np.int64)


def _device_only(sim: Simulation) -> np.ndarray:
    return memory.device_events(sim)


def _template(sims: list[Simulation]) -> _Template:
    """The shape-free step of simulations at one depth and five shapes. Raises ``SimulationError`` when their event
    streams differ beyond the order of released bursts."""
    streams = [_canonical(_device_only(s)) for s in sims]
    if any(len(s) != len(streams[0]) or not np.array_equal(s, streams[0]) for s in streams[1:]) or \
            any(not np.array_equal(s.categories, sims[0].categories) for s in sims[1:]):
        raise SimulationError("the step's allocations differ between shapes; cannot model a run of varying lengths")
    sim = sims[0]
    phi = np.array([memory.shape_features(s.batch_size, s.seq_len, "bs") for s in sims])
    sizes = np.array([s.timeline.sizes for s in sims], dtype=np.float64)
    coef = np.linalg.solve(phi, sizes) if phi.shape[0] == phi.shape[1] else np.linalg.lstsq(phi, sizes, rcond=None)[0]
    events = streams[0]
    uids = np.where(events >= 0, events, -events - 1)
    steps = sim.steps[uids]
    eval_step = int(steps.max()) if sim.eval_batch_size else None
    first = events[steps <= 1]
    steady = events[steps == 2]
    evaluation = events[steps == eval_step] if eval_step is not None else events[:0]
    for block, name in ((steady, "step 2"), (evaluation, "the evaluation pass")):
        made = block[block >= 0]
        released = -block[block < 0] - 1
        if set(made.tolist()) != set(released.tolist()):
            raise SimulationError(f"{name} keeps or releases tensors of other steps; cannot repeat it")
    return _Template(num_layers=sim.num_layers, coef=coef, adopted=sim.timeline.adopted, first=first,
                     steady=steady, steady_uids=np.sort(steady[steady >= 0]), evaluation=evaluation,
                     eval_uids=np.sort(evaluation[evaluation >= 0]))


def _renumber(block: np.ndarray, uids: np.ndarray, offset: int) -> np.ndarray:
    """``block``'s events with its allocations ``uids`` (sorted) numbered ``offset``, ``offset + 1``, ..."""
    made = block >= 0
    ids = np.where(made, block, -block - 1)
    new = offset + np.searchsorted(uids, ids)
    return np.where(made, new, -new - 1)


@dataclass(frozen=True, slots=True)
class _Stream:
    sizes: np.ndarray
    events: np.ndarray
    adopted: int
    step_ends: tuple[int, ...]  # event count at the end of each training step (evaluation after it included)


def _run_stream(t: _Template, batch_size: int, lengths: Sequence[int], eval_every: int | None,
                eval_batch_size: int | None, eval_len: int) -> _Stream:
    """The allocation stream of a whole run at the template's depth."""
    n_base = int(t.coef.shape[1])
    sizes = [t.sizes(batch_size, lengths[0])]
    events, ends, offset = [t.first], [len(t.first)], n_base
    count = len(t.first)

    def add_eval(count, offset):
        sizes.append(t.sizes(eval_batch_size, eval_len, t.eval_uids))
        events.append(_renumber(t.evaluation, t.eval_uids, offset))
        return count + len(t.evaluation), offset + len(t.eval_uids)

    evaluate = bool(eval_every) and len(t.evaluation) > 0 and eval_batch_size
    if evaluate and eval_every == 1:
        count, offset = add_eval(count, offset)
        ends[-1] = count
    for step, length in enumerate(lengths[1:], start=2):
        sizes.append(t.sizes(batch_size, length, t.steady_uids))
        events.append(_renumber(t.steady, t.steady_uids, offset))
        count, offset = count + len(t.steady), offset + len(t.steady_uids)
        if evaluate and step % eval_every == 0:
            count, offset = add_eval(count, offset)
        ends.append(count)
    return _Stream(sizes=np.concatenate(sizes), events=np.concatenate(events), adopted=t.adopted,
                   step_ends=tuple(ends))


def _live_prefix_peaks(stream: _Stream) -> np.ndarray:
    """Peak live bytes over steps 1..k, for each k."""
    ev = stream.events
    signed = np.where(ev >= 0, stream.sizes[np.maximum(ev, 0)], -stream.sizes[np.maximum(-ev - 1, 0)])
    base = int(stream.sizes[: stream.adopted].sum())
    live = np.maximum.accumulate(base + np.cumsum(signed))
    return live[np.array(stream.step_ends) - 1]


# -- the model ----------------------------------------------------------------------------------------------------
def _shapes(spec: models.ModelSpec, seq_len: int) -> list[tuple[int, int]]:
    """Five shapes that determine the size polynomials: batches 2 and 4 at the full length and at half of it, and
    batch 2 at a quarter (multiples of 8, so no kernel takes another path for an odd length)."""
    half = max(8, seq_len // 2 // 8 * 8)
    quarter = max(8, seq_len // 4 // 8 * 8)
    if len({seq_len, half, quarter}) < 3:
        raise ConfigError(f"a run needs a sequence length of at least 32 tokens to vary; got {seq_len}")
    return [(2, seq_len), (4, seq_len), (2, half), (4, half), (2, quarter)]


class RunModel:
    """A model and step configuration's runs: any micro-batch, any padded lengths up to ``seq_len``.

    Built from simulations at five shapes and two depths, each followed by an evaluation pass (the simulation
    cache shares the full-length ones with the planner's ``StepModel``). ``estimate`` replays a run at each
    simulated depth; a run of 30 steps takes tens of milliseconds a replay.
    """

    def __init__(self, spec: models.ModelSpec, cfg: StepConfig, seq_len: int, *,
                 progress: Callable[[str], None] | None = None) -> None:
        spec.check_seq_len(seq_len)
        self.spec, self.cfg, self.seq_len = spec, cfg, seq_len
        shapes = _shapes(spec, seq_len)
        if memory.mask_regime(spec, seq_len) != memory.mask_regime(spec, min(s for _, s in shapes)):
            raise SimulationError(f"{spec.name} switches to a sliding-window mask within 1-{seq_len} tokens; a run "
                                  "of varying lengths crosses two code paths")
        self.depths, sims, self.envelope = memory.simulate_depths(spec, cfg, shapes, progress, eval_with_batch=True)
        self.templates = [_template([s for s in sims if s.num_layers == d]) for d in self.depths]
        self.workspaces = memory.workspace_bytes(cfg)
        self._share: float | None = None  # quick_need's allocator margin, fitted on first use
        self._answers: dict[tuple, RunEstimate] = {}  # estimate's results by their arguments

    def estimate(self, batch_size: int, lengths: Sequence[int], *, eval_every: int | None = None,
                 eval_batch_size: int | None = None, length_source: str = DEFAULT_LENGTHS,
                 expandable_segments: bool = False, step: MemoryEstimate | None = None) -> RunEstimate:
        """The run's peaks at the model's full depth. ``lengths``: each step's padded length, at most ``seq_len``."""
        lengths = tuple(int(n) for n in lengths)
        if not lengths or min(lengths) < 1 or max(lengths) > self.seq_len:
            raise ConfigError(f"step lengths must lie in 1..{self.seq_len}; got {min(lengths, default=None)}.."
                              f"{max(lengths, default=None)}")
        if eval_every is not None and (eval_every < 1 or not eval_batch_size):
            raise ConfigError("evaluation needs eval_every >= 1 and an eval batch size")
        # a run's replays take a good part of a second; planning asks the same run again (a warm plan, the plain
        # and expandable checks of each batch), so each answer is kept; ``step`` is carried along, not modelled
        key = (batch_size, lengths, eval_every, eval_batch_size, length_source, expandable_segments)
        if key in self._answers:
            return replace(self._answers[key], step=step)
        ws = self.workspaces
        extra = (ws // memory.WORKSPACE_THREADS,) * memory.WORKSPACE_THREADS if ws else ()
        host = self.cfg.device == "cpu"
        live, prefix, margins = {}, {}, {"allocated": {}, "reserved": {}, "needed": {}}
        reserved_curves = {}
        for t in self.templates:
            stream = _run_stream(t, batch_size, lengths, eval_every, eval_batch_size, self.seq_len)
            prefix[t.num_layers] = _live_prefix_peaks(stream)
            live[t.num_layers] = int(prefix[t.num_layers][-1]) + ws
            if host:
                continue
            stats = allocator.replay(stream.sizes, stream.events, baseline_uids=range(stream.adopted), extra=extra,
                                     expandable=expandable_segments, marks=stream.step_ends)
            needed = allocator.min_limit(stream.sizes, stream.events, baseline_uids=range(stream.adopted),
                                         extra=extra, expandable=expandable_segments)
            margins["allocated"][t.num_layers] = stats.peak_allocated - live[t.num_layers]
            margins["reserved"][t.num_layers] = stats.peak_reserved - live[t.num_layers]
            margins["needed"][t.num_layers] = needed - live[t.num_layers]
            reserved_curves[t.num_layers] = np.array(stats.reserved_at) - (prefix[t.num_layers] + ws)
        target = self.spec.num_layers
        live_full = memory.by_depth(live, self.depths, target)
        train_peak = self.envelope.at(batch_size, max(lengths))[0] + ws  # the longest training step, exactly
        live_full = int(max(live_full, train_peak))
        over = {k: max(0, memory.margin_at_depth(k, v, self.depths, target)) if v else 0 for k, v in margins.items()}
        allocated = live_full + over["allocated"]
        reserved = max(allocated, live_full + over["reserved"])
        needed = min(reserved, max(allocated, live_full + over["needed"]))
        prefix_full = np.array([memory.by_depth({d: prefix[d][k] for d in self.depths}, self.depths, target)
                                for k in range(len(lengths))]) + ws
        prefix_full += max(0, live_full - int(prefix_full[-1]))  # the exact longest step, where it is higher
        if host:
            curve = prefix_full
        else:
            curve_margin = np.max([reserved_curves[d] for d in self.depths], axis=0)
            curve = np.minimum(np.maximum.accumulate(prefix_full + np.maximum(curve_margin, 0)), reserved)
        self._answers[key] = answer = RunEstimate(
            model_name=self.spec.name, config=self.cfg, batch_size=batch_size, lengths=lengths,
            length_source=length_source, eval_every=eval_every, eval_batch_size=eval_batch_size if eval_every else None,
            peak_allocated=allocated, min_reserved=needed, peak_reserved=reserved,
            cuda_context=0 if host else memory.cuda_context_bytes(),
            reserved_after={k + 1: int(v) for k, v in enumerate(curve)}, expandable_segments=expandable_segments,
            step=step, simulated_layers=tuple(self.depths))
        return answer


    def quick_need(self, batch_size: int, longest: int | None = None) -> int:
        """Microseconds: the least reserved memory a default run at ``batch_size`` (longest batch ``longest``,
        default ``seq_len``) runs in, from the exact step envelope plus an allocator margin taken as the worst share
        of the step's dynamic memory that default runs at the fitted batches (2 and 4) needed. Another run's lengths
        fragment differently, so it is an approximation (within 1% of the exact replay for distilgpt2 and gpt2 in
        benchmarks/run_vs_step.py); ``estimate`` replays the exact run."""
        if self._share is None:
            self._share = self._fit_share()
        live, parts, _ = self.envelope.at(batch_size, longest or self.seq_len)
        return live + self.workspaces + int(self._share * max(0, live - _static(parts)))

    def _fit_share(self) -> float:
        worst = 0.0
        for b in (2, 4):
            run = self.estimate(b, step_lengths(b, self.seq_len))
            live, parts, _ = self.envelope.at(b, max(run.lengths))
            dynamic = max(1, live - _static(parts))
            worst = max(worst, (run.min_reserved - live - self.workspaces) / dynamic)
        return worst


def _static(parts: np.ndarray) -> int:
    """Weights and optimizer state of a breakdown: what does not change with the batch."""
    return int(parts[simulate.WEIGHTS]) + int(parts[simulate.OPTIMIZER])


_MODELS: dict[tuple, RunModel] = {}


def run_model(spec: models.ModelSpec, cfg: StepConfig, seq_len: int, *, progress=None) -> RunModel:
    """The (cached) ``RunModel`` of a model, configuration and longest length."""
    key = (spec.fingerprint, cfg, seq_len)
    if key not in _MODELS:
        _MODELS[key] = RunModel(spec, cfg, seq_len, progress=progress)
    return _MODELS[key]


def estimate_run(model, gpu=None, *, batch_size: int, lengths: Sequence[int] | None = None, seq_len: int | None = None,
                 steps: int = DEFAULT_STEPS, sample_lengths=None, eval_every: int | None = None,
                 eval_batch_size: int | None = None, expandable_segments: bool = False,
                 progress: Callable[[str], None] | None = None, **knobs) -> RunEstimate:
    """Peak memory of a run of ``model`` on ``gpu``: ``lengths`` gives each step's padded length; without it,
    ``steps`` batches of ``batch_size`` samples drawn from ``sample_lengths`` (token counts of the data) or from
    every length up to ``seq_len``. ``knobs`` are ``memory.estimate``'s (method, precision, checkpointing, LoRA).
    The two-step estimate at the longest length comes with it. Raises ``ConfigError``, ``ModelError``,
    ``GpuError``, or ``SimulationError`` when the step cannot be modelled over lengths."""
    from autofit import gpu as gpus

    spec = models.resolve(model)
    card = gpus.resolve(gpu)
    cfg = memory.step_config(card, **knobs)
    if lengths is None:
        if seq_len is None:
            raise ConfigError("pass lengths (each step's padded length) or seq_len")
        lengths = step_lengths(batch_size, seq_len, steps=steps, sample_lengths=sample_lengths)
        source = "the data's sample lengths" if sample_lengths is not None else DEFAULT_LENGTHS
    else:
        lengths = tuple(int(n) for n in lengths)
        source = "as given"
    longest = seq_len or max(lengths)
    model_ = run_model(spec, cfg, longest, progress=progress)
    step = memory.simulate_point(spec, cfg, batch_size=batch_size, seq_len=max(lengths),
                                 eval_batch_size=eval_batch_size if eval_every else None,
                                 expandable_segments=expandable_segments, progress=progress)
    return model_.estimate(batch_size, lengths, eval_every=eval_every, eval_batch_size=eval_batch_size,
                           length_source=source, expandable_segments=expandable_segments, step=step)
