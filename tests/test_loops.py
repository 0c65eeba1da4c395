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


def test_trl_sft_example_runs_with_the_plans_arguments(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["trl_sft.py", "--smoke", "--out", str(out)])
    runpy.run_path(str(ROOT / "examples" / "trl_sft.py"), run_name="__main__")
    record = json.loads((out / "autofit-record.json").read_text())
    assert record["global_step"] == 3
    assert record["max_length"] == record["seq_len"] and record["packing"] is True
    assert record["batch_size"] * record["grad_accum"] == 4


def test_training_arguments_take_an_sft_config():
    trl = pytest.importorskip("trl")
    from autofit import planner

    p = planner.plan("distilgpt2", "rtx3060", seq_len=256, effective_batch=32, method="lora")
    args = p.training_arguments("out", cls=trl.SFTConfig, use_cpu=True, bf16=False, fp16=False)
    assert isinstance(args, trl.SFTConfig)
    assert args.max_length == 256 and args.packing and args.packing_strategy == "wrapped"
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 32
    assert not hasattr(p.training_arguments("out", use_cpu=True, bf16=False, fp16=False), "packing")
    from autofit.errors import ConfigError

    with pytest.raises(ConfigError, match="subclass"):
        p.training_arguments("out", cls=dict)


def test_lightning_callback_applies_the_plan_without_trials():
    L = pytest.importorskip("lightning")
    import dataclasses

    from autofit import planner
    from autofit.integrations.lightning import AutofitCallback, trainer_kwargs

    base = planner.plan("distilgpt2", "cpu", seq_len=64, effective_batch=8, method="lora")
    p = dataclasses.replace(base, batch_size=2, grad_accum=4)  # as a smaller card would plan it

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.batch_size, self.layer, self.sizes = 1, nn.Linear(4, 1), []

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=self.batch_size)

        def training_step(self, batch, batch_idx):
            self.sizes.append(batch.shape[0])
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    kwargs = trainer_kwargs(p)
    assert kwargs == dict(precision="32-true", accumulate_grad_batches=4, gradient_clip_val=1.0)
    trainer = L.Trainer(max_steps=2, callbacks=[AutofitCallback(p)], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **kwargs)
    trainer.fit(module)
    # two optimizer steps of 4 micro-batches of 2: the effective batch of 8, no trial batches before them
    assert trainer.global_step == 2 and module.sizes == [2] * 8


def test_lightning_example_runs_in_its_reduced_form(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    record = _run_example("lightning_callback.py", tmp_path, monkeypatch)
    assert record["global_step"] == 2 and record["batch_size"] == record["plan"]["batch_size"]
    assert record["accumulate_grad_batches"] == record["plan"]["grad_accum"]
    assert record["seen_batches"] == [record["plan"]["batch_size"]] * (2 * record["plan"]["grad_accum"])
