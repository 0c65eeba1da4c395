"""Depth extrapolation over the catalog and the allocator's need over batch sizes: properties over grids."""

import pytest

from autofit import memory, model
from autofit.sim.arch import ALL_LINEAR
from autofit.sim.simulate import StepConfig

CONFIGS = {
    "full": dict(method="full"),
    "lora-attention": dict(method="lora"),  # peft's default targets: the attention projections
    "lora-all-linear": dict(method="lora", lora_targets=(ALL_LINEAR,)),
    "qlora": dict(method="qlora"),
}


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", model.catalog_names())
def test_every_catalog_model_extrapolates_in_depth(name, config):
    # a model whose layers are alike is simulated at two small depths, never replaced by the analytic formula;
    # an encoder-decoder's two stacks are simulated whole
    est = memory.estimate(name, "a100-80gb", batch_size=2, seq_len=128, **CONFIGS[config])
    assert est.source == "simulation", est.notes
    spec = model.resolve(name)
    if spec.task == "seq2seq-lm":
        assert est.simulated_layers == (spec.num_layers,)
    elif spec.model_type == "deberta-v2" and config == "full":
        # its layers share trainable relative embeddings (whose gradient the last layer's backward creates and the
        # others add to): simulated whole (test_families); with LoRA they are frozen and depth extrapolates
        assert est.simulated_layers == (spec.num_layers,)
    else:
        assert len(est.simulated_layers) == 2 and max(est.simulated_layers) < spec.num_layers


@pytest.mark.slow
@pytest.mark.parametrize("name", ["distilgpt2", "HuggingFaceTB/SmolLM2-135M"])
@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_memory_a_step_needs_never_falls_as_the_batch_grows(name, method, checkpointing):
    # the least reserved memory the step runs in (what a plan checks) grows with the batch; the roomy card's
    # peak_reserved depends on the order blocks were cached in and may not. Batch 1 is a step of its own (PyTorch
    # makes views where larger batches copy, another allocation stream), so the grid starts at 2.
    spec = model.resolve(name)
    cfg = StepConfig(method=method, gradient_checkpointing=checkpointing)
    needs = [memory.simulate_point(spec, cfg, batch_size=b, seq_len=128) for b in (2, 3, 4, 6)]
    assert all(a.min_reserved <= b.min_reserved for a, b in zip(needs, needs[1:])), [e.min_reserved for e in needs]
    assert all(e.peak_allocated <= e.min_reserved <= e.peak_reserved for e in needs)
