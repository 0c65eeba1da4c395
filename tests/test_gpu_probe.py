"""Checks that need a CUDA card; skipped without one (their results live under benchmarks/results/)."""

import pytest
import torch

from autofit import planner, probing
from autofit.gpu import resolve

pytestmark = pytest.mark.gpu


def test_probe_on_a_capped_card_fits_the_plan():
    p = planner.plan("distilgpt2", "rtx3060", seq_len=512, probe=False)
    device = probing.CudaDevice(index=0, limit_bytes=p.budget_bytes - p.estimate.cuda_context)
    probed = probing.probe(p, device=device, use_cache=False)
    assert probed.source == "probed" and len(probed.trials) <= 3
    assert probed.measured_reserved <= device.limit_bytes
    assert all(t.memory_returned for t in probed.trials)
    assert torch.cuda.memory_allocated(0) == 0


def test_detected_card_resolves_with_its_memory():
    card = resolve("cuda:0")
    free, total = torch.cuda.mem_get_info(0)
    assert abs(card.total_bytes - total) < 64 * 2**20 and card.source in ("nvml", "torch")
