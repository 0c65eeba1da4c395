import pytest
import torch

from autofit import data
from autofit.errors import DoesNotFitError
from autofit.guard import guard
from autofit.sim.tracker import Tracker
from tests.conftest import tiny_llama

TEXTS = [f"sample {i} " + "the quick brown fox jumps over the lazy dog " * (1 + i % 3) for i in range(64)]


@pytest.fixture(scope="module")
def tok():
    return data.build_tokenizer(TEXTS, vocab_size=300)


def make_trainer(tok, tmp_path, batch_size, accumulation=1, steps=3):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama(vocab_size=len(tok)))
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, max_steps=steps, use_cpu=True, report_to=[],
                             seed=0, save_strategy="no", learning_rate=1e-3, dataloader_drop_last=True,
                             disable_tqdm=True)
    dataset = data.tokenize(TEXTS, tok, seq_len=64, packing=True)
    return Trainer(model=model, args=args, train_dataset=dataset,
                   data_collator=lambda b: data.collate(b, tok.pad_token_id))


def peak(trainer) -> int:
    tracker = Tracker()
    with tracker:
        trainer.train()
    return tracker.peak


def test_guard_halves_the_micro_batch_without_losing_a_step(tok, tmp_path):
    roomy = make_trainer(tok, tmp_path / "a", 8, accumulation=2)
    full_peak = peak(roomy)
    half_peak = peak(make_trainer(tok, tmp_path / "b", 4, accumulation=2))
    assert half_peak < full_peak
    guarded = make_trainer(tok, tmp_path / "c", 8, accumulation=2)
    state = guard(guarded)
    with Tracker(budget=(half_peak + full_peak) // 2):
        result = guarded.train()
    assert result.global_step == roomy.state.global_step == 3  # no optimizer step lost or repeated
    assert [(e.micro_batch_before, e.micro_batch_after, e.pieces) for e in state.events] == [(8, 4, 2)]
    # the same samples reached the same optimizer steps: the weights are the unguarded run's
    for a, b in zip(guarded.model.parameters(), roomy.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert guarded.args.per_device_train_batch_size * guarded.args.gradient_accumulation_steps == 16


def test_guard_stops_with_a_clear_error_below_batch_one(tok, tmp_path):
    trainer = make_trainer(tok, tmp_path, 2)
    guard(trainer)
    with Tracker(budget=512 * 1024), pytest.raises(DoesNotFitError, match="micro-batch of 1"):
        trainer.train()


def test_other_errors_pass_through_unchanged(tok, tmp_path):
    trainer = make_trainer(tok, tmp_path, 2)
    original = trainer.training_step

    def broken(model, inputs, num_items_in_batch=None):
        raise ValueError("a bug in the user's step")

    trainer.training_step = broken
    guard(trainer)
    with pytest.raises(ValueError, match="a bug in the user's step"):
        trainer.train()
    assert original is not broken
