"""Figures agree with the text: the stack at the marked batch is what the text says the step needs."""

import pytest

from autofit import gpu, memory, model, planner, plot

pytestmark = pytest.mark.disk_cache


@pytest.fixture(autouse=True)
def shared_simulations(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("AUTOFIT_CACHE", str(tmp_path_factory.getbasetemp() / "autofit-cache"))


def test_an_estimate_plot_marks_the_batch_and_the_budget_and_agrees_with_the_text(tmp_path):
    e = memory.estimate("distilgpt2", "rtx4060-laptop", batch_size=4, seq_len=256, method="lora",
                        gradient_checkpointing=True)
    sweep = plot.estimate_sweep(e, gpu="rtx4060-laptop")
    assert sweep.total(4) == e.required_bytes  # the "needs" line of the text, to the byte
    assert sweep.marked == 4 and sweep.marked_label == f"batch 4 (asked): needs {memory.fmt_bytes(e.required_bytes)}"
    assert sweep.budget == planner.budget(gpu.resolve("rtx4060-laptop"))
    assert sweep.budget_label == "budget on NVIDIA GeForce RTX 4060 Laptop GPU: 7.12 GiB"
    assert "NVIDIA GeForce RTX 4060 Laptop GPU" in sweep.title
    # parts that are zero at every batch (no temporaries in this step) are not in the legend
    assert all(any(values) for values in sweep.parts.values()) and "temporaries" not in sweep.parts
    assert sweep.batches[-1] >= 8 and all(a < b for a, b in zip(sweep.batches, sweep.batches[1:]))
    assert all(sweep.total(a) <= sweep.total(b) for a, b in zip(sweep.batches, sweep.batches[1:]))
    path = plot.draw(sweep, str(tmp_path / "e.png"))
    assert open(path, "rb").read(4) == b"\x89PNG"


def test_a_plan_plot_marks_the_plan_and_the_largest_micro_batch():
    p = planner.plan("distilgpt2", "rtx3060", seq_len=512, effective_batch=4)
    sweep = plot.plan_sweep(p)
    assert sweep.total(p.batch_size) == p.estimate.required_bytes
    assert sweep.largest == p.largest_batch > p.batch_size
    # the exact points on either side of the largest micro-batch straddle the budget, as the plan counts them: with
    # the estimate's uncertainty kept free beyond the budget's margin until a probe measures it
    def unknown(b):
        est = memory.simulate_point(model.resolve("distilgpt2"), p.step_config, batch_size=b, seq_len=p.seq_len,
                                    eval_batch_size=p.eval_batch_size)
        return max(0, memory.uncertainty_bytes(est) - (planner._available(p.gpu) - p.budget_bytes))

    assert sweep.total(p.largest_batch) + unknown(p.largest_batch) <= sweep.budget
    assert sweep.budget < sweep.total(p.largest_batch + 1) + unknown(p.largest_batch + 1)
    assert sweep.marked_label.startswith(f"micro-batch {p.batch_size} (planned, x 1 accumulation): needs ")
