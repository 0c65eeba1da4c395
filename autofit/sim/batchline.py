"""A simulated step at any batch size from the same step simulated at batch sizes 2 and 4, without running it.

At a fixed sequence length and depth, the step's event stream does not depend on the batch size past 1 (batch 1
turns some copies into views, another stream), and every tensor's shape holds the batch dimension at most once, so
each allocation's bytes before the allocator's rounding are ``a + c * b``: two simulated batch sizes give ``a`` and
``c`` exactly (integers), and the rounding is applied afterwards. An evaluation pass after the steps is a line in
its own batch size. So the planner, which fits its fast model from batches 2 and 4 at the length it plans for, gets
every exact simulation it confirms a batch with (another batch, or evaluation batch) for the cost of the
arithmetic: the same timeline, byte for byte, that ``simulate.run`` records (tests/test_batchline.py checks it over a
grid of models, configurations, batches and evaluation batches).

Nothing here guesses: where the two simulations differ in anything but their sizes, where a line is not integral or
shrinks with the batch, or where the simulations predate recorded raw sizes, ``synthesize`` returns None and the
caller simulates. ``AUTOFIT_BATCHLINE=off`` turns it off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from autofit.sim.tracker import ROUND_BYTES, Timeline

SOURCE_BATCHES = (2, 4)  # the batch sizes the planner's fast model simulates (memory.StepModel with a seq_len)


def enabled() -> bool:
    return os.environ.get("AUTOFIT_BATCHLINE", "on").lower() not in ("off", "0", "no", "false")


def sources(job):
    """The two simulations ``job`` is made from: batch (and evaluation batch) 2 and 4 at its length and depth."""
    return [replace(job, batch_size=b, eval_batch_size=b) for b in SOURCE_BATCHES]


def synthesize(job, lookup: Callable):
    """The ``Simulation`` that ``simulate.run`` would record for ``job``, from the two source simulations that
    ``lookup(job)`` finds already made; None where they are missing or the line does not hold exactly."""
    # batch 1 is another event stream; a step without the evaluation pass calls attention fewer times, in an order
    # the sources do not record apart, so it is simulated
    if not enabled() or job.batch_size < 2 or job.eval_batch_size is None or job.eval_batch_size < 2:
        return None
    if (job.batch_size, job.eval_batch_size) in ((b, b) for b in SOURCE_BATCHES):
        return None  # a source itself: simulate it
    low, high = (lookup(j) for j in sources(job))
    if low is None or high is None:
        return None
    return _combine(low, high, job.batch_size, job.eval_batch_size)


def _canonical(events: np.ndarray) -> np.ndarray:
    """``events`` with each burst of consecutive releases in ascending order (garbage collection releases a group in
    an order that differs between otherwise identical runs)."""
    out = events.copy()
    frees = out < 0
    edges = np.flatnonzero(np.diff(np.concatenate(([0], frees.view(np.int8), [0]))))
    for start, stop in zip(edges[::2], edges[1::2]):
        out[start:stop] = np.sort(out[start:stop])[::-1]
    return out


def _same_structure(a, b) -> bool:
    ta, tb = a.timeline, b.timeline
    if ta.raw_sizes is None or tb.raw_sizes is None or len(ta.sizes) != len(tb.sizes):
        return False
    if ta.marks != tb.marks or ta.adopted != tb.adopted or ta.ops != tb.ops or len(ta.events) != len(tb.events):
        return False
    if a.attention_kernels != b.attention_kernels or a.num_layers != b.num_layers or a.seq_len != b.seq_len:
        return False
    for x, y in ((ta.tags, tb.tags), (a.categories, b.categories), (a.phases, b.phases), (a.steps, b.steps)):
        if not np.array_equal(x, y):
            return False
    return np.array_equal(_canonical_of(a), _canonical_of(b))


def _canonical_of(sim) -> np.ndarray:
    if "canonical" not in sim.memo:
        sim.memo["canonical"] = _canonical(sim.timeline.events)
    return sim.memo["canonical"]


def _combine(low, high, batch_size: int, eval_batch_size: int):
    if not _same_structure(low, high) or low.eval_batch_size != SOURCE_BATCHES[0]:
        return None
    tl = low.timeline
    events, marks = tl.events, tl.marks
    eval_at = next((i for i, label in marks if label.endswith(":eval")), None)
    if eval_at is None:
        return None
    uids = np.where(events >= 0, events, -events - 1)
    first_eval = int(events[eval_at:][events[eval_at:] >= 0].min()) if (events[eval_at:] >= 0).any() else len(tl.sizes)
    # the evaluation pass must touch only its own allocations, and they must all come after it starts
    if (uids[eval_at:] < first_eval).any() or (uids[:eval_at] >= first_eval).any():
        return None
    r_low, r_high = tl.raw_sizes.astype(np.int64), high.timeline.raw_sizes.astype(np.int64)
    b_low, b_high = SOURCE_BATCHES
    step = r_high - r_low
    if (step % (b_high - b_low)).any():
        return None  # not a line with integral bytes per sample: simulate
    slope = step // (b_high - b_low)
    if (slope < 0).any():
        return None
    at = np.full(len(r_low), batch_size, dtype=np.int64)
    at[first_eval:] = eval_batch_size
    raw = r_low + slope * (at - b_low)
    sizes = np.maximum(ROUND_BYTES, -(-raw // ROUND_BYTES) * ROUND_BYTES)
    if not (np.array_equal(np.maximum(ROUND_BYTES, -(-r_low // ROUND_BYTES) * ROUND_BYTES), tl.sizes)):
        return None  # the recorded sizes are not the rounded raw ones: a timeline this module does not know
    baseline = int(sizes[: tl.adopted].sum())
    offloaded = _offloaded_line(low.offloaded, high.offloaded, batch_size)
    if offloaded is None:
        return None
    timeline = Timeline(sizes=sizes, tags=tl.tags, events=events, marks=marks, baseline=baseline,
                        adopted=tl.adopted, ops=tl.ops, raw_sizes=raw)
    step_peaks, eval_peak = _peaks(timeline, len(events), eval_at)
    return type(low)(timeline=timeline, categories=low.categories, phases=low.phases,
                      steps=low.steps, num_layers=low.num_layers, batch_size=batch_size,
                      seq_len=low.seq_len, attention_kernels=low.attention_kernels, step_peaks=tuple(step_peaks),
                      fake=low.fake, eval_batch_size=eval_batch_size, eval_peak=eval_peak, offloaded=offloaded)


def _offloaded_line(low: tuple[int, ...], high: tuple[int, ...], batch_size: int) -> tuple[int, ...] | None:
    """The bytes each offloaded tensor has at ``batch_size``, a line through the two sources like every allocation;
    None where the sources offloaded different tensors."""
    if len(low) != len(high):
        return None
    b_low, b_high = SOURCE_BATCHES
    out = []
    for a, c in zip(low, high):
        if (c - a) % (b_high - b_low) or c < a:
            return None
        out.append(a + (c - a) // (b_high - b_low) * (batch_size - b_low))
    return tuple(out)


def _peaks(tl: Timeline, n_events: int, eval_at: int) -> tuple[list[int], int]:
    """The tracker's peaks: live bytes (host allocations included) at the highest allocation of each step, counted
    from where the step starts (``k:inputs``), and of the evaluation pass from its mark."""
    events = tl.events
    signed = np.where(events >= 0, tl.sizes[np.maximum(events, 0)], -tl.sizes[np.maximum(-events - 1, 0)])
    live = tl.baseline + np.cumsum(signed)
    starts = [i for i, label in tl.marks if label.endswith(":inputs")]
    bounds = starts[1:] + [eval_at]

    def peak(start: int, stop: int) -> int:
        before = int(live[start - 1]) if start else tl.baseline
        made = live[start:stop][events[start:stop] >= 0]
        return max(before, int(made.max())) if len(made) else before

    step_peaks = [peak(a, b) for a, b in zip(starts, bounds)]
    return step_peaks, peak(eval_at, n_events)
