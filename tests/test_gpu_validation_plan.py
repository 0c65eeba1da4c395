"""The GPU validation's time planner and results log (benchmarks/gpu_budget.py, gpu_results.py), on the CPU: which
units run and which are skipped for given costs and a budget, and that rows written are read back and summarized."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_budget as budgeting  # noqa: E402
import gpu_results as results  # noqa: E402

# Priors that make a unit's cost its kind's fixed seconds plus one second per build, nothing per token
COSTS = budgeting.Costs(startup=10.0, fixed={"trial": 4.0, "train": 20.0, "probe": 9.0}, build=1.0,
                        build_per_param=0.0, per_param_token=0.0, source="test")


def unit(part, label, kind="trial", builds=1, **kw):
    return budgeting.Unit(part=part, label=label, kind=kind, builds=builds, **kw)


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(seconds, *, reserve=5.0, start=10.0):
    """A scheduler on a fake clock that starts ``start`` seconds after the budget did."""
    clock = Clock(start)
    lines, rows = [], []
    scheduler = budgeting.Scheduler(budget=budgeting.Budget(seconds=seconds, reserve=reserve, started=0.0, clock=clock),
                                    costs=budgeting.CostModel(COSTS), say=lines.append,
                                    on_outcome=lambda o: rows.append(o.to_row()))
    return scheduler, clock, lines, rows


PARTS = [
    ("a", [unit("a", "a1"), unit("a", "a2"), unit("a", "a3")]),  # 5 s each
    ("b", [unit("b", "b1", "train"), unit("b", "b2", "train")]),  # 21 s each
    ("d", [unit("d", "d1", "probe")]),  # 10 s
]


def test_units_run_in_priority_order_and_the_rest_of_a_part_is_skipped_when_time_runs_short():
    # 60 s budget, 5 s kept, 10 s of start-up: 45 s for units
    scheduler, clock, lines, rows = make(60.0)
    ran = []

    def runner(u):
        ran.append(u.label)
        clock.now += COSTS.prior(u)  # every unit takes exactly its prior

    outcomes = scheduler.run(PARTS, runner)
    # a: 10 -> 25 s; b1 needs 21 s with 30 s left -> 46 s; b2 needs 21 s with 9 s left: skipped; d1 needs 10 s: skipped
    assert ran == ["a1", "a2", "a3", "b1"]
    assert [(o.unit.label, o.status) for o in outcomes] == [
        ("a1", "ran"), ("a2", "ran"), ("a3", "ran"), ("b1", "ran"), ("b2", "skipped"), ("d1", "skipped")]
    assert lines == ["# skipped b: 1 unit (b2), 21 s estimated, the first 21 s, with 9 s left",
                     "# skipped d: 1 unit (d1), 10 s estimated, the first 10 s, with 9 s left"]
    assert [r["status"] for r in rows] == ["ran", "ran", "ran", "ran", "skipped", "skipped"]
    assert rows[3] == dict(section="schedule", part="b", unit="b1", kind="train", status="ran", predicted_s=21.0,
                           started_s=25.0, seconds=21.0, error="")


def test_a_later_part_runs_when_its_units_are_cheaper_than_the_skipped_one():
    scheduler, clock, lines, _ = make(50.0)  # 35 s for units
    ran = []

    def runner(u):
        ran.append(u.label)
        clock.now += COSTS.prior(u)

    scheduler.run(PARTS, runner)
    # a ends at 25 s, 20 s left: b1 (21 s) and so b2 are skipped, d1 (10 s) still fits
    assert ran == ["a1", "a2", "a3", "d1"]
    assert lines == ["# skipped b: 2 units (b1; b2), 42 s estimated, the first 21 s, with 20 s left"]


def test_measured_seconds_correct_the_predictions_of_the_same_kind_then_of_every_kind():
    scheduler, clock, lines, _ = make(60.0)
    taken = {"a1": 10.0, "a2": 10.0, "a3": 10.0, "b1": 1.0, "b2": 1.0, "d1": 1.0}  # trials take twice their prior

    def runner(u):
        clock.now += taken[u.label]

    outcomes = scheduler.run(PARTS, runner)
    assert [round(o.predicted, 3) for o in outcomes[:3]] == [5.0, 10.0, 10.0]  # a2 on: 5 s x (10 / 5)
    # b1 has no train unit to learn from: every kind so far ran 2x slow, so 21 s x 2 = 42 s > 45 - 30 = 15 s left
    assert outcomes[3].unit.label == "b1" and outcomes[3].status == "skipped" and outcomes[3].predicted == 42.0
    assert lines[0] == "# skipped b: 2 units (b1; b2), 84 s estimated, the first 42 s, with 15 s left"
    assert (outcomes[-1].unit.label, outcomes[-1].status, outcomes[-1].predicted) == ("d1", "skipped", 20.0)


def test_a_runner_that_refines_its_unit_over_budget_skips_it_and_the_rest_of_its_part():
    scheduler, clock, lines, _ = make(100.0)

    def runner(u):
        if u.part == "b":
            clock.now += 2.0  # planning, then the refined run does not fit
            scheduler.check(budgeting.Unit(part="b", label=u.label, kind="train", builds=60))
        clock.now += COSTS.prior(u)

    outcomes = scheduler.run(PARTS, runner)
    assert [(o.unit.label, o.status) for o in outcomes] == [
        ("a1", "ran"), ("a2", "ran"), ("a3", "ran"), ("b1", "skipped"), ("b2", "skipped"), ("d1", "ran")]
    assert outcomes[3].unit.builds == 60 and outcomes[3].predicted == 80.0
    assert lines == ["# skipped b: 2 units (b1; b2), 101 s estimated, the first 80 s, with 68 s left"]


def test_a_refined_unit_is_what_the_cost_model_learns_from():
    scheduler, clock, _, _ = make(None)

    def runner(u):
        ran = budgeting.Unit(part=u.part, label=u.label, kind=u.kind, builds=11) if u.label == "b1" else u
        clock.now += COSTS.prior(ran)
        return ran if ran is not u else None

    outcomes = scheduler.run(PARTS, runner)
    assert outcomes[3].unit.builds == 11 and outcomes[3].predicted == 31.0 and outcomes[3].seconds == 31.0
    assert scheduler.costs.correction("train") == 1.0  # 31 s measured against the refined unit's 31 s


def test_a_failing_unit_is_recorded_and_the_run_goes_on_but_running_out_of_time_propagates():
    scheduler, clock, lines, rows = make(None)

    def runner(u):
        clock.now += 1.0
        if u.label == "a2":
            raise ValueError("no such kernel\nsecond line")

    outcomes = scheduler.run(PARTS, runner)
    assert [o.status for o in outcomes] == ["ran", "failed", "ran", "ran", "ran", "ran"]
    assert outcomes[1].error == "ValueError: no such kernel" and outcomes[1].seconds == 1.0
    assert lines == ["# a a2: failed after 1.0 s (ValueError: no such kernel); going on"]

    class OutOfTime(BaseException):
        pass

    def late(u):
        raise OutOfTime()

    with pytest.raises(OutOfTime):
        scheduler.run(PARTS, late)


def test_a_long_skip_line_names_six_units_and_counts_the_rest():
    scheduler, _, lines, rows = make(20.0)  # 5 s for units, and each needs 10
    many = [("a", [unit("a", f"u{i}", builds=6) for i in range(9)])]
    scheduler.run(many, lambda u: None)
    assert lines == ["# skipped a: 9 units (u0; u1; u2; u3; u4; u5; and 3 more), 90 s estimated, the first 10 s, "
                     "with 5 s left"]
    assert len(rows) == 9 and all(r["status"] == "skipped" for r in rows)


def test_the_schedule_follows_the_same_rule_on_a_simulated_clock():
    outcomes, lines = budgeting.schedule(PARTS, COSTS, seconds=60.0, reserve=5.0)
    assert [(o.unit.label, o.status, o.started) for o in outcomes] == [
        ("a1", "ran", 10.0), ("a2", "ran", 15.0), ("a3", "ran", 20.0), ("b1", "ran", 25.0), ("b2", "skipped", None),
        ("d1", "skipped", None)]
    text = budgeting.format_schedule(outcomes, lines, seconds=60.0, reserve=5.0, startup=10.0, source="test")
    assert text.splitlines()[-2:] == [
        "# planned: 4 units ending at 46 s, then the summary; skipped: 2 units (31 s estimated)",
        "# by part (planned/skipped): a 3/0, b 1/1, d 0/1"]
    assert "  4  b         b1" in text and "# would skip d: 1 unit (d1)" in text


def test_priors_add_fixed_build_and_compute_seconds():
    costs = budgeting.Costs(startup=0.0, fixed={"run": 3.0}, build=0.5, build_per_param=1e-9, per_param_token=2e-12,
                            source="test")
    u = budgeting.Unit(part="runs", label="r", kind="run", params=1_000_000_000, builds=2, tokens=1000)
    assert costs.prior(u) == pytest.approx(3.0 + 2 * (0.5 + 1.0) + 2.0)
    with pytest.raises(KeyError, match="no cost prior for units of kind 'grid'"):
        costs.prior(budgeting.Unit(part="c", label="g", kind="grid"))
    with pytest.raises(ValueError, match="tokens must not be negative"):
        budgeting.Unit(part="a", label="x", kind="trial", tokens=-1)


# -- results written row by row and read back --------------------------------------------------------------------------
A_ROW = dict(section="a", model="distilgpt2", method="full", checkpointing=False, batch_size=2, seq_len=512,
             outcome="fits", predicted_allocated=1000, predicted_reserved=2100, predicted_device=2600,
             measured_allocated=1000, measured_reserved=2000, measured_device=2500, error_allocated=0.0,
             error_reserved=0.05, error_device=0.04)


def test_rows_are_appended_to_every_folder_and_read_back_by_the_summarizer(tmp_path):
    repo, out = tmp_path / "repo", tmp_path / "out"
    log = results.ResultsLog([repo, out], run="r1")
    log.append({"section": "environment", "date": "2026-12-02", "argv": "gpu_validation.py --minutes 8",
                "versions": "v", "budget_seconds": 480.0, "startup_seconds": 30.0})
    log.append(A_ROW)
    log.append(budgeting.Outcome(unit=unit("a", "distilgpt2 full"), status="ran", predicted=4.0, started=30.0,
                                 seconds=5.0).to_row())
    for folder in (repo, out):
        rows, runs = results.read_rows(folder)
        assert runs == ["r1"] and [r["section"] for r in rows] == ["environment", "a", "schedule"]
        assert rows[1] == {"run": "r1", **A_ROW}
    text = results.summary_markdown(results.read_rows(out)[0])
    assert "| reserved | 1 | 5.00% | 5.00% | mean <= 3%, worst <= 7% |" in text
    assert "| device | 1 | 4.00% | 4.00% | NVML mean <= 5% |" in text
    assert "Targets: reserved MISSED; NVML met; at least 24 configurations over at least 5 shapes MISSED." in text
    assert "| a | 1 | 0 | 0 | 5 | 4 |" in text
    assert "Command: `gpu_validation.py --minutes 8`" in text


def test_a_line_cut_off_mid_write_is_left_out_and_the_last_run_is_summarized(tmp_path):
    results.ResultsLog([tmp_path], run="r1").append(A_ROW)
    results.ResultsLog([tmp_path], run="r2").append({**A_ROW, "model": "gpt2"})
    with open(tmp_path / results.RESULTS_FILE, "a") as fh:
        fh.write(json.dumps({"run": "r2", **A_ROW})[:40])  # the process was killed inside a write
    rows, runs = results.read_rows(tmp_path)
    assert runs == ["r1", "r2"] and [r["model"] for r in rows] == ["gpt2"]
    assert [r["model"] for r in results.read_rows(tmp_path, run="r1")[0]] == ["distilgpt2"]
    assert "(results.jsonl holds 2 runs; this is the last.)" in results.summary_markdown(rows, runs_in_file=2)


def test_the_summary_says_what_was_skipped_and_counts_an_oom_the_guard_caught(tmp_path):
    log = results.ResultsLog([tmp_path], run="r")
    log.append(budgeting.Outcome(unit=unit("c", "grid"), status="cut", predicted=30.0).to_row())
    log.append(budgeting.Outcome(unit=unit("d", "probe"), status="skipped", predicted=50.0).to_row())
    log.append(dict(section="b", model="m", card="rtx3060", planned=True, method="lora", batch_size=4, grad_accum=4,
                    seq_len=1024, checkpointing=True, steps=30, oom=False, guard_events=1, reserved_share=0.9,
                    budget=11 * 2**30, seconds=20.0))
    text = results.summary_markdown(results.read_rows(tmp_path)[0])
    assert "Skipped: c grid; d probe." in text
    assert "Cut: c grid was still running when the budget ran out." in text
    assert "| c | 0 | 0 | 1 | 0 | 0 |" in text
    assert "| m | rtx3060 | lora 4x4 s1024 ckpt | 30 | caught by the guard (1) | 90.0% | 11.00 GiB | 20 |" in text
    assert "Targets: 0 OOM MISSED (1 of 1); reserved peak in 85%-95% of the budget met (1 of 1)." in text


# -- the order of the units --------------------------------------------------------------------------------------------
def test_part_a_order_gives_every_prefix_of_a_round_block_every_setting_per_model():
    import gpu_validation as gv

    models = [f"m{i}" for i in range(6)]
    points = [(2, 512), (8, 1024)]
    order = gv.spread(models, ["full", "lora", "qlora"], points)
    assert len(order) == len(set(order)) == 6 * 3 * 2 * 2  # the whole product, once
    assert order[:6] == [("m0", "full", False, (2, 512)), ("m1", "lora", False, (8, 1024)),
                         ("m2", "qlora", False, (2, 512)), ("m3", "full", False, (8, 1024)),
                         ("m4", "lora", False, (2, 512)), ("m5", "qlora", False, (8, 1024))]
    for m in models:  # the first 24 (the minimum): each model with every method, setting and point
        mine = [o for o in order[:24] if o[0] == m]
        assert {o[1] for o in mine} == {"full", "lora", "qlora"}
        assert {o[2] for o in mine} == {False, True} and {o[3] for o in mine} == set(points)


def test_the_runs_balanced_six_come_first_and_alternate_the_models():
    import gpu_validation as gv

    d, t = gv.RUN_MODELS
    assert gv.run_configs() == [
        (d, "bf16-mixed", False), (t, "bf16-mixed", True), (d, "bf16-true", True), (t, "bf16-true", False),
        (d, "lora", False), (t, "lora", True),
        (d, "bf16-mixed", True), (t, "bf16-mixed", False), (d, "bf16-true", False), (t, "bf16-true", True),
        (d, "lora", True), (t, "lora", False)]


def test_run_lengths_are_fixed_by_the_seed_and_padded_to_each_batch_longest():
    import numpy as np

    import gpu_validation as gv

    lengths = gv.run_lengths(15, 30, 8, 1024, 256)
    assert lengths == gv.run_lengths(15, 30, 8, 1024, 256) and len(lengths) == 30
    assert all(16 <= n <= 1024 for n in lengths) and len(set(lengths)) > 10  # the shape changes from step to step
    rng = np.random.default_rng(15)
    drawn = np.clip(np.round(rng.lognormal(np.log(256), gv.RUN_SIGMA, size=(30, 8))), 16, 1024)
    assert lengths == [int(x) for x in drawn.max(axis=1)]
