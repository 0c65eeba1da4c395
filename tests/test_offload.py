"""Optimizer levers: 8-bit, paged 8-bit and CPU-offloaded AdamW state, simulated and accounted exactly, planned,
forbidden and handed over."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from autofit import host as hostmem
from autofit import model as models
from autofit import offload
from autofit.errors import ConfigError, DoesNotFitError
from autofit.planner import plan
from autofit.sim import simulate
from autofit.sim.simulate import OPTIMIZER, StepConfig
from tests.conftest import tiny_llama

# a shape that meets every rule: 2048-value k/v projections and 64-value norms (below 4096: fp32 moments), 4096-value
# q/o projections (8-bit, below the paged threshold of 1e5), 131072-value embeddings, head and MLP weights (paged)
SHAPES = dict(hidden_size=64, intermediate_size=2048, vocab_size=2048)


def _round(n: int) -> int:  # the caching allocator's 512-byte rounding, as the tracker applies it
    return -(-n // 512) * 512


def _sizes(spec) -> list[int]:
    net = simulate.build_model(spec, StepConfig(method="full", precision="32-true"), spec.num_layers)
    return [p.numel() for p in models.unique_params(net) if p.requires_grad]


def _simulated_state(spec, optimizer: str) -> int:
    cfg = StepConfig(method="full", precision="32-true", optimizer=optimizer, device="cpu")
    sim = simulate.run(spec, cfg, batch_size=1, seq_len=16)
    return int(sim.timeline.sizes[sim.categories == OPTIMIZER].sum())


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_eight_bit_state_is_simulated_byte_for_byte_from_the_bitsandbytes_layout(optimizer):
    spec = models.resolve(tiny_llama(**SHAPES))
    sizes = _sizes(spec)
    assert {n < 4096 for n in sizes} == {True, False} and any(n >= 100_000 for n in sizes)
    expected = 2 * _round(4 * 256)  # the signed and unsigned quantization maps, once
    for n in sizes:
        if n < 4096:
            expected += 2 * _round(4 * n)  # two fp32 moments
            continue
        expected += 2 * _round(4 * -(-n // 256))  # absmax1, absmax2: one fp32 per 256-value block
        if not (optimizer == "paged_adamw_8bit" and n >= 100_000):
            expected += 2 * _round(n)  # two uint8 moments on the card; paged ones live in managed memory
    assert _simulated_state(spec, optimizer) == expected
    # what the card's allocator does not see is accounted by name, exactly
    cfg = StepConfig(method="full", precision="32-true", optimizer=optimizer)
    managed = sum(2 * n for n in sizes if n >= 100_000) if optimizer == "paged_adamw_8bit" else 0
    assert offload.layout(spec, cfg).managed == managed
    assert offload.host_bytes(spec, cfg) == ({"paged optimizer state (managed)": managed} if managed else {})


def test_bitsandbytes_own_adamw8bit_holds_exactly_the_layout():
    # the library itself, stepped on the CPU (bitsandbytes 0.45+ runs its 8-bit optimizers there): its state tensors
    # are the engine's imitation's, storage for storage, and the planner's layout counts their bytes unrounded
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install 'autofit[quant]')")
    spec = models.resolve(tiny_llama(**SHAPES))
    cfg = StepConfig(method="full", precision="32-true", optimizer="adamw_8bit", device="cpu")

    def state(make):
        net = simulate.build_model(spec, cfg, spec.num_layers, device="cpu")
        params = [p for p in net.parameters() if p.requires_grad]
        opt = make(params)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        storages = {t.untyped_storage().data_ptr(): (t.dtype, t.untyped_storage().nbytes())
                    for s in opt.state.values() for t in s.values() if torch.is_tensor(t)}
        return sorted(storages.values(), key=str)

    real = state(lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4))
    assert real == state(lambda ps: simulate.Adam8bit(ps))
    assert sum(n for _, n in real) == offload.layout(spec, replace(cfg, device="cuda")).device


def test_cpu_offloaded_adamw_keeps_only_small_tensors_state_on_the_card():
    spec = models.resolve(tiny_llama(**SHAPES))
    sizes = _sizes(spec)
    # torchao keeps tensors under 4096 values on a fused AdamW on the card: two fp32 moments and a step counter each
    small = [n for n in sizes if n < 4096]
    assert _simulated_state(spec, "adamw_cpu_offload") == sum(2 * _round(4 * n) + _round(4) for n in small)
    cfg = StepConfig(method="full", precision="bf16-true", optimizer="adamw_cpu_offload")
    # pinned host copies of the parameter, its gradient and two moments, in the parameter's dtype (bf16)
    assert offload.host_bytes(spec, cfg) == {"offloaded optimizer (pinned)": 4 * 2 * sum(n for n in sizes if n >= 4096)}


def test_levers_are_named_and_forbidden_with_one_line_errors():
    assert offload.allowed(None) == ("8bit", "paged", "cpu-offload", "activations")
    assert offload.allowed("8bit, cpu-offload") == ("8bit", "cpu-offload")
    assert offload.allowed(None, no_offload=True) == ("8bit",)
    with pytest.raises(ConfigError, match="unknown lever 'fast'.*the levers are 8bit, paged, cpu-offload, activations"):
        offload.allowed("8bit,fast")
    with pytest.raises(ConfigError, match="unknown lever"):
        plan("distilgpt2", "rtx3060", seq_len=128, allow=["gpu-offload"], probe=False)


def test_pcie_links_come_from_the_catalog():
    from autofit import gpu

    assert offload.pcie_gbs(gpu.resolve("rtx3060")) == pytest.approx(16 * 1.969 * 0.8)  # gen4 x16
    assert offload.pcie_gbs(gpu.resolve("rtx4060")) == pytest.approx(8 * 1.969 * 0.8)  # gen4 x8
    assert offload.pcie_gbs(gpu.resolve("t4")) == pytest.approx(16 * 0.985 * 0.8)  # gen3 x16
    assert {key for key in offload._links()[0]} == {c.key for c in gpu.catalog()}


# Llama-3.2-1B, full fine-tuning, on an RTX 3060: neither fp32 nor bf16 weights leave plain AdamW a micro-batch
def test_full_fine_tuning_that_fits_only_with_a_lever_takes_the_fastest_one_and_says_what_it_costs():
    p = plan("meta-llama/Llama-3.2-1B", "rtx3060", method="full", probe=False)
    assert p.optimizer in offload.LEVER_OF and p.method == "full"
    assert p.required_bytes <= p.budget_bytes
    assert any(r.startswith("full fine-tuning in bf16-true ruled out") for r in p.reasons)
    cost = next(r for r in p.reasons if r.startswith(f"optimizer {p.optimizer}: "))
    assert "slower than with plain AdamW at the same micro-batch" in cost
    args = p.training_arguments("out", use_cpu=True, bf16=False, fp16=False)
    # TrainingArguments.optim names the bitsandbytes optimizers; torchao's comes through optimizer_cls_and_kwargs
    assert args.optim == {"adamw_8bit": "adamw_bnb_8bit", "adamw_cpu_offload": "adamw_torch"}.get(p.optimizer,
                                                                                                 p.optimizer)
    assert args.dataloader_num_workers == p.host.loader.num_workers  # (use_cpu turns pinning off here)
    assert (p.optimizer_cls_and_kwargs() is None) == (p.optimizer != "adamw_cpu_offload")


def test_only_eight_bit_state_when_offloading_is_forbidden():
    p = plan("meta-llama/Llama-3.2-1B", "rtx3060", method="full", no_offload=True, probe=False)
    assert p.optimizer == "adamw_8bit" and p.precision == "bf16-true"
    assert offload.host_bytes(models.resolve("meta-llama/Llama-3.2-1B"), p.step_config) == {}


def test_a_card_that_fits_only_with_offloading_chooses_it_and_a_tiny_host_refuses_it(monkeypatch):
    # SmolLM2-360M in 16-bit weights on a 3 GiB card: weights, gradients and AdamW state on the card do not fit;
    # with the state (and an fp16 copy of weights and gradients) in host RAM they do
    kwargs = dict(method="full", precision="16-true", seq_len=256, probe=False)
    p = plan("HuggingFaceTB/SmolLM2-360M", "3GiB", allow="cpu-offload", **kwargs)
    assert p.optimizer == "adamw_cpu_offload"
    assert dict(p.host.parts)["offloaded optimizer (pinned)"] > 0
    with pytest.raises(DoesNotFitError) as err:
        plan("HuggingFaceTB/SmolLM2-360M", "3GiB", allow="cpu-offload", no_offload=True, **kwargs)
    way = next(w for w in err.value.ways_out if w.startswith("allow='cpu-offload'"))
    assert way.startswith("allow='cpu-offload' (adamw_cpu_offload, 16-true): micro-batch 1 x 256 tokens with "
                          "checkpointing needs ") and ", fits, with " in way and way.endswith("(not tried: not allowed)")
    tiny = hostmem.Machine(process_bytes=0, available_bytes=2 * 1024 ** 3, swap_free_bytes=0, total_bytes=4 * 1024 ** 3)
    monkeypatch.setattr(hostmem.Machine, "now", classmethod(lambda cls: tiny))
    with pytest.raises(DoesNotFitError):
        plan("HuggingFaceTB/SmolLM2-360M", "3GiB", allow="cpu-offload", **kwargs)


def test_a_method_that_does_not_fit_names_each_lever_in_one_line():
    with pytest.raises(DoesNotFitError) as err:
        plan("meta-llama/Llama-3.2-3B", "rtx3060", method="full", probe=False)
    text = str(err.value)
    assert "\n" not in text
    for lever, optimizer in offload.LEVERS.items():
        assert f"allow='{lever}' ({optimizer}, bf16-true): its static part needs " in text
    assert "still over, with " in text and "in host RAM" in text


def test_auto_keeps_to_plain_adamw_unless_levers_are_named():
    p = plan("meta-llama/Llama-3.2-1B", "rtx3060", seq_len=512, probe=False)
    assert p.method != "full" and p.optimizer == "adamw_torch_fused"
