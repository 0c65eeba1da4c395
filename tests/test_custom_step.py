"""Any nn.Module with the user's own step: simulated on fake tensors, checked to the byte against a real CPU run."""

import pytest
import torch
from torch import nn

import autofit
from autofit.errors import ConfigError, SimulationError
from autofit.sim import custom
from autofit.sim.simulate import StepConfig


class TwoTower(nn.Module):
    """A custom model: two encoders of different widths and a projection, no transformers config."""

    def __init__(self):
        super().__init__()
        self.query = nn.Sequential(nn.Embedding(512, 64), nn.Linear(64, 128), nn.GELU(), nn.LayerNorm(128))
        self.doc = nn.Sequential(nn.Linear(96, 256), nn.ReLU(), nn.Linear(256, 128))
        self.temperature = nn.Parameter(torch.tensor(0.07))

    def forward(self, ids, features):
        q = self.query(ids).mean(dim=1)  # (B, 128)
        d = self.doc(features)  # (B, 128)
        return nn.functional.normalize(q, dim=-1), nn.functional.normalize(d, dim=-1)


def contrastive_step(model, batch):
    # a custom loss: symmetric InfoNCE over the in-batch similarity matrix (B, B)
    q, d = model(batch["ids"], batch["features"])
    logits = q @ d.T / model.temperature
    target = torch.arange(logits.shape[0])
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


def make_batch(batch_size):
    return {"ids": torch.randint(0, 512, (batch_size, 40)), "features": torch.randn(batch_size, 96)}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("optimizer", ["adamw_torch_fused", "adamw_torch"])
def test_custom_step_real_and_fake_peak_at_the_same_byte(precision, optimizer):
    # CUDA's autocast policy imitated on real CPU tensors too (layer_norm runs in fp32 under CUDA autocast; the CPU's
    # own bf16 layer_norm keeps statistics whose size its fake kernel does not reproduce)
    cfg = StepConfig(precision=precision, optimizer=optimizer, device="cuda")
    module = TwoTower()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    real = custom.run(module, contrastive_step, make_batch, cfg, batch_size=8, fake=False)
    fake = custom.run(module, contrastive_step, make_batch, cfg, batch_size=8, fake=True)
    assert real.peak() == fake.peak()
    assert real.step_peaks == fake.step_peaks
    # the user's module is never trained or changed by the estimate
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_estimate_takes_any_module_and_its_step():
    small = autofit.estimate(TwoTower(), "rtx3060", step=contrastive_step, batch=make_batch, batch_size=8)
    large = autofit.estimate(TwoTower(), "rtx3060", step=contrastive_step, batch=make_batch, batch_size=64)
    assert small.source == "simulation" and small.peak_allocated < large.peak_allocated
    assert small.weights == sum(-(-4 * p.numel() // 512) * 512 for p in TwoTower().parameters())
    assert small.peak_allocated <= small.min_reserved <= small.peak_reserved


def test_a_data_dependent_op_is_named_in_one_line():
    def step(model, batch):
        q, d = model(batch["ids"], batch["features"])
        keep = (q.sum(-1) > 0).nonzero()  # how many rows: the data decides
        return q[keep].sum() + d.sum()

    with pytest.raises(SimulationError, match="aten.nonzero") as err:
        autofit.estimate(TwoTower(), "rtx3060", step=step, batch=make_batch, batch_size=4)
    assert "\n" not in str(err.value)


def test_a_step_must_return_the_loss():
    with pytest.raises(ConfigError, match="scalar loss"):
        autofit.estimate(TwoTower(), "rtx3060", step=lambda m, b: None, batch=make_batch, batch_size=4)
    with pytest.raises(ConfigError, match="needs both"):
        autofit.estimate(TwoTower(), "rtx3060", step=contrastive_step, batch_size=4)


def test_plan_step_picks_the_largest_micro_batch_that_fits_and_keeps_the_effective_batch():
    from autofit.custom import plan_step

    roomy = plan_step(TwoTower(), "rtx3060", step=contrastive_step, batch=make_batch, effective_batch=32)
    assert roomy.batch_size == 32 and roomy.grad_accum == 1
    # a budget between the needs of micro-batches 4 and 8: 4 x 8 accumulation
    needs = {b: autofit.estimate(TwoTower(), "rtx3060", step=contrastive_step, batch=make_batch, batch_size=b)
             for b in (4, 8)}
    from autofit import memory

    total = {b: e.required_bytes + memory.uncertainty_bytes(e) for b, e in needs.items()}
    card = f"{(total[4] + total[8]) // 2}B"
    tight = plan_step(TwoTower(), card, step=contrastive_step, batch=make_batch, effective_batch=32, margin=0.0)
    assert (tight.batch_size, tight.grad_accum, tight.effective_batch) == (4, 8, 32)
    assert tight.estimate.required_bytes == needs[4].required_bytes
