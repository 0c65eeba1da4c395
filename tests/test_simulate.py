import itertools
from collections import Counter

import pytest
import torch

from autofit import model

from autofit.sim import simulate
from autofit.sim.simulate import StepConfig
from autofit.sim.tracker import Tracker, round_bytes
from tests.conftest import tiny_gpt2, tiny_llama

CASES = list(itertools.product(["full", "lora"], [False, True], ["32-true", "bf16-mixed", "bf16-true"]))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method, checkpointing, precision", CASES)
def test_tracker_peak_real_equals_fake_to_the_byte(arch, method, checkpointing, precision):
    spec = model.resolve(tiny_gpt2() if arch == "gpt2" else tiny_llama())
    cfg = StepConfig(method=method, gradient_checkpointing=checkpointing, precision=precision, device="cpu",
                     lora_targets=("c_attn",) if arch == "gpt2" else None)
    real = simulate.run(spec, cfg, batch_size=2, seq_len=32, fake=False)
    fake = simulate.run(spec, cfg, batch_size=2, seq_len=32, fake=True)
    assert real.peak() == fake.peak()
    assert real.step_peaks == fake.step_peaks
    # the same allocations, op by op; only the order of a bulk release (the autocast cache) may differ
    assert Counter(zip(real.timeline.ops, real.timeline.sizes.tolist())) == \
        Counter(zip(fake.timeline.ops, fake.timeline.sizes.tolist()))


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_steps_real_equal_fake(quantization):
    spec = model.resolve(tiny_llama())
    cfg = StepConfig(method="qlora", quantization=quantization, precision="bf16", device="cpu")
    real = simulate.run(spec, cfg, batch_size=2, seq_len=32, fake=False)
    fake = simulate.run(spec, cfg, batch_size=2, seq_len=32, fake=True)
    assert real.peak() == fake.peak()


def test_cuda_imitation_runs_for_real_on_cpu_with_eager_attention():
    # CUDA's autocast policy is applied to real CPU tensors too; eager attention avoids CUDA-only kernels
    cfg_model = tiny_llama()
    cfg_model._attn_implementation = "eager"
    spec = model.resolve(cfg_model)
    cfg = StepConfig(precision="bf16", device="cuda")
    real = simulate.run(spec, cfg, batch_size=2, seq_len=32, fake=False)
    fake = simulate.run(spec, cfg, batch_size=2, seq_len=32, fake=True)
    assert real.peak() == fake.peak()


def test_step_two_peaks_at_least_as_high_as_step_one():
    for name in ("distilgpt2", "HuggingFaceTB/SmolLM2-135M"):
        for cfg in (StepConfig(), StepConfig(method="lora"), StepConfig(method="qlora", quantization="4bit")):
            sim = simulate.run(model.resolve(name), cfg, batch_size=2, seq_len=128, num_layers=3)
            assert sim.step_peaks[1] >= sim.step_peaks[0]


def test_checkpointing_lowers_the_peak_of_a_deep_model():
    spec = model.resolve(tiny_llama(layers=12))
    plain = simulate.run(spec, StepConfig(device="cpu"), batch_size=4, seq_len=128)
    checkpointed = simulate.run(spec, StepConfig(device="cpu", gradient_checkpointing=True), batch_size=4, seq_len=128)
    assert checkpointed.peak() < plain.peak()


def test_cuda_kernel_choice_follows_the_card():
    spec = model.resolve("distilgpt2")
    ampere = simulate.run(spec, StepConfig(compute_capability=(8, 6)), batch_size=2, seq_len=64, num_layers=1)
    turing = simulate.run(spec, StepConfig(compute_capability=(7, 5), precision="fp16"), batch_size=2, seq_len=64,
                          num_layers=1)
    hopper = simulate.run(spec, StepConfig(compute_capability=(9, 0)), batch_size=2, seq_len=64, num_layers=1)
    assert set(ampere.attention_kernels) == {"flash"}
    assert set(turing.attention_kernels) == {"efficient"}
    # cuDNN comes first on Hopper, but takes dropout only in multiples of 1/16: GPT-2's 0.1 falls to flash
    assert set(hopper.attention_kernels) == {"flash"}
    smol = model.resolve("HuggingFaceTB/SmolLM2-135M")  # no attention dropout
    hopper = simulate.run(smol, StepConfig(compute_capability=(9, 0)), batch_size=2, seq_len=64, num_layers=1)
    assert set(hopper.attention_kernels) == {"cudnn"}


def test_step_config_rejects_bad_knobs():
    from autofit.errors import ConfigError

    for kwargs in (dict(method="dora"), dict(method="full", quantization="4bit"), dict(method="qlora"),
                   dict(precision="bf16", compute_capability=(7, 5)), dict(lora_r=0), dict(optimizer="sgd9")):
        with pytest.raises(ConfigError) as err:
            StepConfig(**kwargs)
        assert "\n" not in str(err.value)


def test_tracker_rounds_like_the_caching_allocator():
    assert [round_bytes(n) for n in (1, 511, 512, 513, 4096)] == [512, 512, 512, 1024, 4096]


def test_tracker_budget_raises_out_of_memory_and_frees_what_it_held():
    tracker = Tracker(budget=64 * 1024)
    with tracker:
        kept = torch.empty(8 * 1024)  # 32 KiB
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(16 * 1024)  # 64 KiB more: past the budget
        assert tracker.live == 32 * 1024
        del kept
    assert tracker.live == 0


def test_simulation_workers_stay_for_the_next_plan_and_end_before_a_trial(monkeypatch):
    """Idle workers make this process copy each page it writes next: they stay between plans (a fresh pair costs the
    next plan its start) and end when a trial starts."""
    from autofit import probing

    monkeypatch.setenv("AUTOFIT_WORKERS", "2")
    spec = model.resolve(tiny_gpt2())
    cfg = StepConfig(device="cpu", precision="32-true")
    jobs = [simulate.Job(spec=spec, cfg=cfg, batch_size=b, seq_len=32, num_layers=2) for b in (2, 3)]
    simulate.run_many(jobs)
    pool = simulate._POOL
    assert pool is not None
    simulate.run_many([simulate.Job(spec=spec, cfg=cfg, batch_size=b, seq_len=48, num_layers=2) for b in (2, 3)])
    assert simulate._POOL is pool
    trial = probing.run_trial(spec, cfg, probing.BudgetedCpuDevice(budget_bytes=2**30), batch_size=1, seq_len=16)
    assert trial.fits and simulate._POOL is None
