import time

import numpy as np
import pytest

from autofit import memory, model

from autofit.sim import simulate
from autofit.errors import ConfigError, GpuError, SimulationError
from autofit.sim.simulate import StepConfig
from autofit.sim.tracker import round_bytes
from tests.conftest import tiny_gemma2, tiny_llama


def _tensors(est):
    return est.weights + est.gradients + est.optimizer_state + est.activations + est.logits_and_loss + est.temporaries


@pytest.mark.parametrize("ref, cfg", [
    ("distilgpt2", StepConfig()),
    ("distilgpt2", StepConfig(method="lora", gradient_checkpointing=True)),
    ("distilgpt2", StepConfig(method="qlora", quantization="4bit")),
    (tiny_llama(layers=9), StepConfig(method="qlora", quantization="8bit", optimizer="adamw_8bit")),
    (tiny_llama(layers=9), StepConfig(precision="fp16", optimizer="adamw_torch", gradient_checkpointing=True)),
    (tiny_gemma2(layers=10), StepConfig()),  # alternating sliding and full attention layers
    (tiny_gemma2(layers=10), StepConfig(method="lora")),
    # LoRA on the MLP: the backward of layer 1 releases the rotary tables every layer shared
    (tiny_llama(layers=9), StepConfig(method="lora", lora_targets=("gate_proj", "up_proj", "down_proj"))),
    (tiny_llama(layers=9), StepConfig(method="lora", lora_targets=("all-linear",))),
    (tiny_llama(layers=9), StepConfig(precision="bf16-true", gradient_checkpointing=True)),
    (tiny_llama(layers=9), StepConfig(method="lora", precision="bf16-true")),
])
def test_depth_extrapolation_equals_a_full_depth_simulation(ref, cfg):
    spec = model.resolve(ref)
    est = memory.simulate_point(spec, cfg, batch_size=2, seq_len=64)
    assert max(est.simulated_layers) < spec.num_layers
    full = simulate.run(spec, cfg, batch_size=2, seq_len=64)
    # Exact but for tensors whose size follows the number of parameters (gradient clipping stacks one norm per
    # parameter): rounded to 512 bytes, those are not linear in depth, by less than 512 bytes each.
    assert abs(_tensors(est) - memory.device_peak(full)) <= 1024


def test_components_are_exact_where_they_can_be_counted():
    spec = model.resolve("distilgpt2")
    cfg = StepConfig(precision="fp32")
    est = memory.simulate_point(spec, cfg, batch_size=2, seq_len=128)
    params = model.unique_params(model.build(spec.config))
    assert est.weights == sum(round_bytes(4 * p.numel()) for p in params)
    # fused AdamW: two fp32 moments per parameter and a one-element fp32 step counter on the device
    assert est.optimizer_state == sum(2 * round_bytes(4 * p.numel()) + 512 for p in params)
    assert est.workspaces == 2 * 8_519_680  # two threads' cuBLAS workspaces on sm86
    assert est.cuda_context == memory.CUDA_CONTEXT_BYTES
    assert est.peak_allocated <= est.min_reserved <= est.peak_reserved
    assert est.device_total == est.peak_reserved + est.cuda_context
    assert est.required_bytes == est.min_reserved + est.cuda_context


def test_surrogate_matches_fresh_simulations_within_one_percent():
    spec = model.resolve("distilgpt2")
    cfg = StepConfig(method="lora")
    sm = memory.StepModel(spec, cfg)
    worst = 0.0
    for b, s in [(1, 64), (3, 200), (6, 512), (16, 1024), (2, 1000)]:
        exact = memory.simulate_point(spec, cfg, batch_size=b, seq_len=s)
        predicted, parts, _ = sm.query(b, s)
        target = _tensors(exact) + exact.workspaces
        worst = max(worst, abs(predicted - target) / target)
        assert int(parts[:6].sum()) + sm.workspaces == pytest.approx(predicted, abs=8)
    assert worst < 0.01
    started = time.perf_counter()
    for _ in range(200):
        sm.query(7, 333)
    assert (time.perf_counter() - started) / 200 < 1e-3


def test_fixed_length_model_is_exact_in_batch():
    spec = model.resolve("distilgpt2")
    cfg = StepConfig(method="full", gradient_checkpointing=True)
    sm = memory.StepModel(spec, cfg, seq_len=256)
    for b in (2, 5, 12):
        exact = memory.simulate_point(spec, cfg, batch_size=b, seq_len=256)
        assert sm.query(b)[0] == _tensors(exact) + exact.workspaces


def test_estimate_end_to_end_and_serialisation():
    est = memory.estimate("distilgpt2", "rtx3060", batch_size=4, seq_len=256)
    assert est.source == "simulation" and est.attention_kernel == "flash"
    assert est.config.precision == "bf16-mixed" and est.gpu_name == "NVIDIA GeForce RTX 3060"
    data = est.to_dict()
    assert data["peak_reserved"] == est.peak_reserved and data["config"]["method"] == "full"
    text = est.summary()
    for line in ("weights", "optimizer state", "logits and loss", "CUDA context", "nvidia-smi"):
        assert line in text
    # the breakdown sums to what nvidia-smi would show on a roomy card; the tight one to what the step needs free
    assert sum(est.components().values()) == est.device_total
    assert sum(est.components(tight=True).values()) == est.required_bytes
    assert 0 <= est.components(tight=True)["allocator margin"] <= est.allocator_margin
    turing = memory.estimate("distilgpt2", "t4", batch_size=4, seq_len=256)
    assert turing.config.precision == "16-mixed" and turing.attention_kernel == "efficient"


def test_host_memory_estimate_has_no_cuda_context():
    est = memory.estimate(tiny_llama(), "cpu", batch_size=2, seq_len=32)
    assert est.cuda_context == 0 and est.workspaces == 0 and est.config.device == "cpu"


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(gpu="rtx3060", batch_size=0, seq_len=64), ConfigError, "batch_size must be a whole number >= 1"),
    (dict(gpu="rtx3060", batch_size=1, seq_len=4096), ConfigError, "--seq-len 1024"),
    (dict(gpu="rtx3070x", batch_size=1, seq_len=64), GpuError, "closest"),
    (dict(gpu="rtx3060", batch_size=1, seq_len=64, method="dora"), ConfigError, "method must be one of"),
])
def test_bad_input_gets_one_line(kwargs, error, fragment):
    with pytest.raises(error) as err:
        memory.estimate("distilgpt2", **kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_analytic_fallback_when_a_step_cannot_be_simulated(monkeypatch):
    def fail(*args, **kwargs):
        raise SimulationError("could not simulate a training step of x: custom kernel")

    monkeypatch.setattr(simulate, "run", fail)
    est = memory.estimate("distilgpt2", "rtx3060", batch_size=4, seq_len=256)
    assert est.source == "analytic" and "analytic" in est.notes[0]
    counts = model.count_params(model.resolve("distilgpt2"))
    assert est.weights == 4 * counts.total and est.optimizer_state == 8 * counts.trainable


@pytest.mark.parametrize("cc, release, expected", [
    ((8, 6), (2, 8), 8_519_680),  # ":4096:2:16:8"
    ((9, 0), (2, 8), 32 * 2**20),  # Hopper: 32 MiB in every release from 2.4 on
    ((12, 0), (2, 11), 8_519_680 + 2**20),  # Blackwell got 32 MiB only after 2.11; cuBLASLt keeps 1 MiB in 2.9-2.11
    ((12, 0), (2, 13), 32 * 2**20),  # later: Blackwell 32 MiB, cuBLASLt shares cuBLAS's workspace
])
def test_cublas_workspaces_follow_the_pytorch_release(cc, release, expected):
    assert memory.cublas_workspace_bytes(cc, release) == expected


def test_eager_module_loading_assumes_the_larger_context(monkeypatch):
    monkeypatch.setenv("CUDA_MODULE_LOADING", "EAGER")
    assert memory.cuda_context_bytes() == memory.CUDA_CONTEXT_EAGER_BYTES
    monkeypatch.delenv("CUDA_MODULE_LOADING")
    assert memory.cuda_context_bytes() == memory.CUDA_CONTEXT_BYTES


def test_a_cpu_estimate_speaks_of_ram_not_of_a_card():
    from tests.conftest import tiny_llama

    est = memory.estimate(tiny_llama(), "cpu", batch_size=2, seq_len=32)
    text = est.summary()
    assert "peak live" in text and "the step's tensors in RAM" in text
    assert "torch.cuda" not in text and "nvidia-smi" not in text


def test_a_fit_that_cannot_extrapolate_is_remembered_as_such(monkeypatch):
    """An encoder simulated whole (DeBERTa) first fails to extrapolate from the shallow and deep depths; a warm plan
    re-raises those failures from memory instead of fitting the same simulations again."""
    from types import SimpleNamespace

    calls = []

    def failing_fit(sims, spec, target_layers):
        calls.append(target_layers)
        raise SimulationError("blocks of the step differ between layers")

    monkeypatch.setattr(memory, "_ENVELOPES", {})
    monkeypatch.setattr(memory, "fit_envelope", failing_fit)
    spec = SimpleNamespace(config=SimpleNamespace(), num_layers=12)
    sims, others = [object(), object()], [object()]
    for _ in range(3):
        with pytest.raises(SimulationError, match="differ between layers"):
            memory._envelope_of(sims, spec)
    assert calls == [12]
    with pytest.raises(SimulationError):
        memory._envelope_of(others, spec)
    assert calls == [12, 12]


def test_forget_leaves_nothing_of_earlier_plans(monkeypatch):
    """``planner.forget()`` empties every in-process store a plan fills, so the next plan is made from nothing (the
    speed benchmarks time cold plans with it)."""
    from autofit import model as models
    from autofit import offload, planner, runs

    monkeypatch.setenv("AUTOFIT_CACHE", "off")
    planner.plan(tiny_llama(), "rtx3060", seq_len=64, probe=False)
    stores = {"simulations": simulate._CACHE, "fits": memory._ENVELOPES, "runs": runs._MODELS,
              "counts": models._COUNTS}
    assert all(stores.values()), {name: len(store) for name, store in stores.items()}
    planner.forget()
    assert not any(stores.values()) and not offload._SIZES
