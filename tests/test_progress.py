"""Counted progress: the count, the time elapsed and what is left, in every message of long work."""

import pytest

from autofit import planner, progress


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    return now


def test_counted_work_reports_count_elapsed_and_time_left(clock):
    heard = []
    work = progress.counted(heard.append, 4, "planning models")
    work.step("distilgpt2")
    clock[0] += 30
    work("simulating distilgpt2: 2/4 steps")
    work.step("gpt2")
    clock[0] += 30
    work.step("Qwen/Qwen2.5-0.5B")
    work.close()
    assert heard == [
        "planning models 1/4 distilgpt2 (0:00 elapsed)",
        "planning models 1/4 distilgpt2: simulating distilgpt2: 2/4 steps (0:30 elapsed)",
        "planning models 2/4 gpt2 (0:30 elapsed, about 1:30 left)",
        "planning models 3/4 Qwen/Qwen2.5-0.5B (1:00 elapsed, about 1:00 left)",
    ]


def test_work_inside_a_counted_unit_reports_labels_not_a_second_count(clock):
    heard = []
    outer = progress.counted(heard.append, 2, "planning models")
    outer.step("distilgpt2")
    inner = progress.counted(outer.inner, 5, "planning distilgpt2")
    progress.stage(inner, "full fine-tuning, checkpointing off")
    assert heard[-1] == "planning models 1/2 distilgpt2: full fine-tuning, checkpointing off (0:00 elapsed)"
    assert progress.counted(None, 3, "nothing") is None
    progress.stage(None, "ignored")  # no callback: nothing happens


def test_fit_table_counts_the_models(monkeypatch, clock):
    heard = []

    def fake_plan(spec, gpu, **kwargs):
        kwargs["progress"]("simulating")
        clock[0] += 10
        raise planner.DoesNotFitError("too big", binding="too big", ways_out=("a bigger card",))

    monkeypatch.setattr(planner, "plan", fake_plan)
    rows = planner.fit_table("rtx3060", names=["distilgpt2", "gpt2", "openai-community/gpt2-medium"],
                             progress=heard.append)
    assert [r["ways_out"] for r in rows] == [["a bigger card"]] * 3
    assert [line for line in heard if "elapsed" in line and "/3 " in line and ":" not in line.split("(")[0]] == [
        "planning models 1/3 distilgpt2 (0:00 elapsed)",
        "planning models 2/3 gpt2 (0:10 elapsed, about 0:20 left)",
        "planning models 3/3 openai-community/gpt2-medium (0:20 elapsed, about 0:10 left)",
    ]
