"""The plain-loop helpers: the same samples reach the same optimizer step whatever the micro-batch, an out-of-memory
error costs no step, and the example scripts of each loop run in their reduced form."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from autofit.errors import DoesNotFitError
from autofit.loops import AccumulatingStep, batch_size_from

ROOT = Path(__file__).resolve().parents[1]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def _samples(n=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, generator=g), torch.randn(1, generator=g)) for _ in range(n)]


def _collate(rows):
    return torch.stack([x for x, _ in rows]), torch.stack([y for _, y in rows])


def _mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _oom_above(limit, seen):
    def loss_fn(model, batch):
        seen.append(len(batch[0]))
        if len(batch[0]) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return _mse(model, batch)
    return loss_fn


def test_an_out_of_memory_step_is_run_again_smaller_and_lands_where_the_unsplit_step_does():
    reference, recovered = _model(), _model()
    plain = AccumulatingStep(micro_batch=8, effective_batch=8, collate=_collate)
    plain(reference, torch.optim.SGD(reference.parameters(), lr=0.1), _samples(), _mse)
    seen = []
    step = AccumulatingStep(micro_batch=8, effective_batch=8, collate=_collate)
    loss = step(recovered, torch.optim.SGD(recovered.parameters(), lr=0.1), _samples(), _oom_above(2, seen))
    assert seen == [8, 4, 2, 2, 2, 2]  # the whole window again at 4, then again at 2: no partial gradient kept
    assert step.tried == [8, 4, 2] and step.micro_batch == 2 and step.grad_accum == 4 and step.steps == 1
    assert [(s.micro_batch_before, s.micro_batch_after) for s in step.shrinks] == [(8, 4), (4, 2)]
    for a, b in zip(reference.parameters(), recovered.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert loss == pytest.approx(_mse(_model(), _collate(_samples())).item(), rel=1e-6)


def test_a_micro_batch_of_one_that_does_not_fit_stops_in_one_line_and_other_errors_pass_through():
    step = AccumulatingStep(micro_batch=2, effective_batch=4, collate=_collate)
    model = _model()
    with pytest.raises(DoesNotFitError, match="one sample") as err:
        step(model, torch.optim.SGD(model.parameters(), lr=0.1), _samples(4), _oom_above(0, []))
    assert "\n" not in str(err.value)

    def broken(model, batch):
        raise ValueError("a bug in the loss")

    with pytest.raises(ValueError, match="a bug in the loss"):
        AccumulatingStep(micro_batch=2, effective_batch=4, collate=_collate)(
            model, torch.optim.SGD(model.parameters(), lr=0.1), _samples(4), broken)


def test_the_decorator_starts_at_the_plan_and_keeps_the_effective_batch():
    calls = []

    @batch_size_from(micro_batch=16, effective_batch=48)
    def train(batch_size, grad_accum, tag):
        calls.append((batch_size, grad_accum, tag))
        if batch_size > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return "done"

    assert train("x") == "done"
    assert calls == [(16, 3, "x"), (8, 6, "x"), (4, 12, "x")]


def _run_example(script, tmp_path, monkeypatch, *extra):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "record.json"
    monkeypatch.setattr(sys, "argv", [script, "--smoke", "--out", str(out), *extra])
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    return json.loads(out.read_text())


def test_plain_loop_example_runs_in_its_reduced_form(tmp_path, monkeypatch):
    record = _run_example("plain_loop.py", tmp_path, monkeypatch)
    assert record["steps"] == 3 and record["effective_batch"] == 8
    assert record["shrinks"] == [[8, 4]] and record["micro_batches"] == [8, 4, 4, 4]
    assert len(record["losses"]) == 3
