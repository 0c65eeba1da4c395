import numpy as np
import pytest
import torch

from autofit import memory, model, runs
from autofit.sim import simulate
from autofit.sim.simulate import StepConfig
from autofit.sim.tracker import Tracker
from tests.conftest import tiny_gpt2, tiny_llama


def test_step_lengths_pad_each_batch_to_its_longest_sample():
    lengths = runs.step_lengths(4, 64, steps=5, sample_lengths=[3, 10, 70, 20], seed=1)
    rng = np.random.default_rng(1)
    expected = rng.choice(np.array([3, 10, 64, 20]), size=(5, 4), replace=True).max(axis=1)
    assert lengths == tuple(int(n) for n in expected)
    assert runs.step_lengths(1, 8, steps=3, seed=0) == tuple(
        int(n) for n in np.random.default_rng(0).choice(np.arange(1, 9), size=(3, 1)).max(axis=1))


def test_canonical_order_sorts_bursts_of_releases_only():
    events = np.array([0, 1, 2, -3, -1, 3, -2, -4, -1 - 3], dtype=np.int64)
    assert runs._canonical(events).tolist() == [0, 1, 2, -1, -3, 3, -2, -4, -4]


@pytest.mark.parametrize("ref, cfg", [
    (tiny_llama(layers=3), StepConfig(method="full")),
    (tiny_gpt2(layers=3), StepConfig(method="lora", lora_targets=("c_attn",), gradient_checkpointing=True)),
])
def test_size_polynomials_give_the_simulated_sizes_at_an_unfitted_shape(ref, cfg):
    spec = model.resolve(ref)
    rm = runs.RunModel(spec, cfg, 64)
    template = rm.templates[-1]
    sim = simulate.run(spec, cfg, batch_size=3, seq_len=40, num_layers=template.num_layers, eval_batch_size=3)
    # the same allocations, each within one 512-byte block of its simulated size (the fit is on rounded sizes)
    assert np.array_equal(runs._canonical(memory.device_events(sim)),
                          np.concatenate([template.first, template.steady, template.evaluation]))
    assert np.abs(template.sizes(3, 40) - sim.timeline.sizes).max() <= 512


def test_a_run_on_the_cpu_peaks_where_a_real_run_of_varying_lengths_peaks():
    # host memory has no caching allocator: the run's peak is its live tensors, checked against a real CPU run
    spec = model.resolve(tiny_llama(layers=3))
    cfg = StepConfig(method="full", precision="32-true", device="cpu")
    lengths = (48, 64, 17, 33, 64, 8)
    est = runs.RunModel(spec, cfg, 64).estimate(2, lengths)

    torch.manual_seed(0)
    net = simulate.build_model(spec, cfg, spec.num_layers, device="cpu")
    params = [p for p in model.unique_params(net) if p.requires_grad]
    optimizer = simulate.make_optimizer(params, cfg.optimizer)
    tracker = Tracker()
    tracker.adopt(list(net.parameters()) + list(net.buffers()))
    with simulate.imitate_cuda(cfg, []) as autocast, tracker:
        for length in lengths:
            batch = simulate.make_batch(2, length, spec.vocab_size)
            simulate.train_step(net, optimizer, params, cfg, batch, autocast)
            del batch
    assert abs(est.peak_allocated - tracker.timeline().peak()) <= 512 * 8
    assert est.peak_allocated == est.min_reserved == est.peak_reserved  # no allocator on the host


def test_a_run_of_varying_lengths_reserves_more_than_its_steps_on_a_roomy_card():
    spec = model.resolve(tiny_llama(layers=3))
    rm = runs.RunModel(spec, StepConfig(method="full"), 128)
    steady = rm.estimate(4, (128,) * 10)
    varying = rm.estimate(4, runs.step_lengths(4, 128, steps=10))
    assert varying.peak_allocated <= steady.peak_allocated  # no batch is longer
    assert list(varying.reserved_after.values()) == sorted(varying.reserved_after.values())
    assert varying.reserved_after[10] == varying.peak_reserved
    # a fast answer, in microseconds after its first use, from the exact envelope and a fitted margin
    assert steady.peak_allocated - 4096 <= rm.quick_need(4) <= steady.peak_reserved * 1.25


def test_run_estimates_round_trip_through_a_plan_file():
    est = runs.estimate_run(tiny_llama(layers=3), "rtx3060", batch_size=2, seq_len=64, steps=4, eval_every=2,
                            eval_batch_size=2)
    again = runs.RunEstimate.from_dict(est.to_dict())
    assert again == est and again.reserved_after == est.reserved_after
    assert est.steps == 4 and est.step.seq_len == max(est.lengths)
