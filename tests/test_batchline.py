"""The fast paths of a cold plan give exactly what the full simulation gives.

- ``sim/batchline``: a step at any batch (and evaluation batch) made from batches 2 and 4 is the timeline
  ``simulate.run`` records, byte for byte, on a grid of architectures, methods, checkpointing and precisions; the
  estimate built on it is the estimate built on a fresh simulation, field for field.
- ``sim/table``: replays answered by digest equal fresh replays; shipped simulations equal fresh ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from autofit import memory, model, planner, runs
from autofit.sim import allocator, batchline, simulate, table
from tests.conftest import tiny_gemma2, tiny_gpt2, tiny_llama

ARCHS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "gemma2": tiny_gemma2}


def job(spec, cfg, b, e, seq=64, depth=2):
    return simulate.Job(spec=spec, cfg=cfg, batch_size=b, seq_len=seq, num_layers=depth, eval_batch_size=e)


def same_timeline(a, b) -> list[str]:
    """Names of the fields in which two simulations differ (release bursts compared in canonical order)."""
    ta, tb = a.timeline, b.timeline
    checks = {
        "sizes": np.array_equal(ta.sizes, tb.sizes), "raw_sizes": np.array_equal(ta.raw_sizes, tb.raw_sizes),
        "events": np.array_equal(batchline._canonical(ta.events), batchline._canonical(tb.events)),
        "marks": ta.marks == tb.marks, "tags": np.array_equal(ta.tags, tb.tags), "ops": ta.ops == tb.ops,
        "baseline": ta.baseline == tb.baseline, "adopted": ta.adopted == tb.adopted,
        "categories": np.array_equal(a.categories, b.categories), "phases": np.array_equal(a.phases, b.phases),
        "steps": np.array_equal(a.steps, b.steps), "step_peaks": a.step_peaks == b.step_peaks,
        "eval_peak": a.eval_peak == b.eval_peak, "kernels": a.attention_kernels == b.attention_kernels,
        "shape": (a.batch_size, a.seq_len, a.eval_batch_size, a.num_layers) ==
                 (b.batch_size, b.seq_len, b.eval_batch_size, b.num_layers),
    }
    return [name for name, ok in checks.items() if not ok]


GRID = [  # (architecture, knobs, depth)
    ("gpt2", dict(), 2),
    ("gpt2", dict(gradient_checkpointing=True), 3),
    ("llama", dict(method="lora"), 2),
    ("llama", dict(precision="16-mixed"), 2),
    ("gemma2", dict(method="full", gradient_checkpointing=True), 3),
]
BATCHES = [(3, 3), (6, 2), (16, 5), (2, 7), (4, 2)]


@pytest.mark.parametrize("arch, knobs, depth", GRID)
def test_a_step_at_another_batch_is_the_simulated_step(arch, knobs, depth):
    spec = model.resolve(ARCHS[arch]())
    cfg = memory.step_config(planner.gpus.resolve("rtx3060"), **knobs)
    made = {simulate._key(j): simulate._run_job(j) for j in batchline.sources(job(spec, cfg, 3, 3, depth=depth))}
    for b, e in BATCHES:
        fast = batchline.synthesize(job(spec, cfg, b, e, depth=depth), lambda j: made.get(simulate._key(j)))
        slow = simulate._run_job(job(spec, cfg, b, e, depth=depth))
        assert fast is not None and same_timeline(fast, slow) == [], (b, e)


def test_no_step_is_made_where_the_line_does_not_hold(gpt2_spec):
    cfg = memory.step_config(planner.gpus.resolve("rtx3060"))
    made = {simulate._key(j): simulate._run_job(j) for j in batchline.sources(job(gpt2_spec, cfg, 3, 3))}
    lookup = lambda j: made.get(simulate._key(j))  # noqa: E731
    assert batchline.synthesize(job(gpt2_spec, cfg, 1, 3), lookup) is None  # batch 1: another stream
    assert batchline.synthesize(job(gpt2_spec, cfg, 3, 1), lookup) is None
    assert batchline.synthesize(job(gpt2_spec, cfg, 3, None), lookup) is None  # no evaluation pass
    assert batchline.synthesize(job(gpt2_spec, cfg, 2, 2), lookup) is None  # a source is simulated
    assert batchline.synthesize(job(gpt2_spec, cfg, 3, 3, seq=32), lookup) is None  # no sources at this length
    low, high = (made[simulate._key(j)] for j in batchline.sources(job(gpt2_spec, cfg, 3, 3)))
    old = simulate.replace(low, timeline=simulate.replace(low.timeline, raw_sizes=None))
    assert batchline._combine(old, high, 3, 3) is None  # a cached simulation from before raw sizes
    other = simulate.replace(high, timeline=simulate.replace(high.timeline, marks=high.timeline.marks[1:]))
    assert batchline._combine(low, other, 3, 3) is None  # the two differ in more than sizes


@pytest.mark.parametrize("knobs", [dict(), dict(method="lora", gradient_checkpointing=True)])
def test_estimates_on_made_steps_equal_estimates_on_simulated_ones(monkeypatch, knobs):
    spec = model.resolve(tiny_llama(layers=4))
    cfg = memory.step_config(planner.gpus.resolve("rtx3060"), **knobs)

    ran = []
    run_job = simulate._run_job
    monkeypatch.setattr(simulate, "_run_job", lambda j: ran.append(j.batch_size) or run_job(j))
    monkeypatch.setenv("AUTOFIT_WORKERS", "1")  # simulations in this process, where they are counted
    monkeypatch.setenv("AUTOFIT_CACHE", "off")

    def estimates(fast: bool) -> list[dict]:
        monkeypatch.setenv("AUTOFIT_BATCHLINE", "on" if fast else "off")
        simulate._CACHE.clear()
        table.forget()
        ran.clear()
        memory.StepModel(spec, cfg, seq_len=64, evaluate=True)  # batches 2 and 4, as the planner fits first
        return [memory.simulate_point(spec, cfg, batch_size=b, seq_len=64, eval_batch_size=e,
                                      expandable_segments=x).to_dict()
                for b, e, x in [(3, 3, False), (7, 2, False), (5, 9, True)]]

    fast = estimates(True)
    assert sorted(ran) == [2, 2, 4, 4]  # only the sources were simulated
    slow = estimates(False)
    assert sorted(ran) == [2, 2, 3, 3, 4, 4, 5, 5, 7, 7]
    assert fast == slow


def test_replay_answers_are_the_replays():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 64 << 20, size=400)
    events = []
    live = []
    for uid in range(400):
        events.append(uid)
        live.append(uid)
        if len(live) > 5 and rng.random() < 0.6:
            events.append(-live.pop(int(rng.integers(len(live)))) - 1)
    events = np.array(events)
    table.forget()
    first = allocator.replay(sizes, events, extra=(8 << 20,), marks=(100, 300))
    need = allocator.min_limit(sizes, events, extra=(8 << 20,))
    again = allocator.replay(sizes, events, extra=(8 << 20,), marks=(100, 300))
    assert again == first == allocator._replay(sizes, events, extra=(8 << 20,), marks=(100, 300))
    assert allocator.min_limit(sizes, events, extra=(8 << 20,)) == need
    assert need == allocator._min_limit(sizes, events, baseline_uids=(), expandable=False, extra=(8 << 20,),
                                        step=allocator.ROUND_LARGE)
    # every option is part of the question: a different one is another answer
    assert allocator.replay(sizes, events, extra=(8 << 20,), expandable=True) == \
        allocator._replay(sizes, events, extra=(8 << 20,), expandable=True)
    assert table.answer_key("replay", sizes, events, (), extra=(1,)) != table.answer_key("replay", sizes, events,
                                                                                         (), extra=(2,))


def test_shipped_simulations_are_the_simulations(monkeypatch):
    """Every few shipped simulations re-simulated: the table holds what the engine records today."""
    names = set(table._index())
    shipped = [made for made in map(table.made_with, table.ROOT.glob("*")) if made]
    if not names and any(m["engine"] == table.engine() and m["versions"] != table.versions() for m in shipped):
        made = next(m for m in shipped if m["engine"] == table.engine())
        pytest.skip(f"the shipped table was made with autofit, torch, transformers, peft {made['versions']}; this "
                    f"installation has {table.versions()} (same engine: plans simulate instead of reading it)")
    if not names:
        pytest.fail(f"no simulations shipped for this installation's key {table.key()}: run "
                    "benchmarks/build_sim_table.py after changing autofit/sim/ or upgrading a library")
    monkeypatch.setenv("AUTOFIT_CACHE", "off")
    spec = model.resolve("distilgpt2")
    checked = 0
    for card in ("rtx3060",):
        cfg = memory.step_config(planner.gpus.resolve(card))
        for depth in memory.simulated_depths(spec):
            for b in batchline.SOURCE_BATCHES:
                j = simulate.Job(spec=spec, cfg=cfg, batch_size=b, seq_len=1024, num_layers=depth,
                                 eval_batch_size=b)
                if simulate._file_name(j) not in names:
                    continue
                shipped = simulate._load(j)
                assert shipped is not None and same_timeline(shipped, simulate._run_job(j)) == []
                checked += 1
    assert checked == 4
