"""The memory a process holds outside PyTorch's allocator: measured by probes, kept per card, used by later plans."""
from dataclasses import dataclass

import pytest

from autofit import calibration, memory, planner, probing
from autofit import model as models
from autofit.probing import BudgetedCpuDevice
from autofit.units import MiB
from tests.conftest import tiny_gpt2

CARD = "NVIDIA GeForce RTX 3060"


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOFIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_store_keeps_the_largest_measurement_per_card_and_release(tmp_path):
    store = calibration.Store(tmp_path / "db.sqlite")
    assert store.context(CARD, "torch 2.11, cuda 12.8, lazy loading") is None
    assert store.record_context(CARD, "torch 2.11, cuda 12.8, lazy loading", 400 * MiB) == (400 * MiB, 1)
    assert store.record_context(CARD, "torch 2.11, cuda 12.8, lazy loading", 450 * MiB) == (450 * MiB, 2)
    assert store.record_context(CARD, "torch 2.11, cuda 12.8, lazy loading", 420 * MiB) == (450 * MiB, 3)
    assert store.context(CARD, "torch 2.11, cuda 12.8, eager loading") is None  # another release or mode: its own
    store.close()
    again = calibration.Store(tmp_path / "db.sqlite")
    assert again.context(CARD, "torch 2.11, cuda 12.8, lazy loading") == (450 * MiB, 3)
    again.clear()
    assert again.context(CARD, "torch 2.11, cuda 12.8, lazy loading") is None


def test_the_versions_name_the_module_loading_mode(monkeypatch):
    monkeypatch.setenv("CUDA_MODULE_LOADING", "EAGER")
    assert calibration.context_versions().endswith(", eager loading")
    monkeypatch.delenv("CUDA_MODULE_LOADING")
    assert calibration.context_versions().endswith(", lazy loading")


def test_a_plan_uses_the_context_a_probe_measured_on_its_card():
    # margin 0: the budget keeps nothing free of its own, so the estimate's uncertainty is kept in full
    kw = dict(seq_len=256, effective_batch=8, probe=False, margin=0.0)
    assumed = planner.plan("distilgpt2", "rtx3060", **kw)
    assert assumed.estimate.cuda_context == memory.cuda_context_bytes() == 512 * MiB
    assert any("(CUDA context +-256 MiB assumed, allocator margin" in r for r in assumed.reasons)
    store = calibration.open_store()
    store.record_context(CARD, calibration.context_versions(), 300 * MiB)
    store.close()
    measured = planner.plan("distilgpt2", "rtx3060", **kw)
    assert measured.estimate.cuda_context == 300 * MiB and measured.run.cuda_context == 300 * MiB
    assert any(r.startswith("CUDA context and workspaces outside PyTorch's allocator: 300.0 MiB, the largest of 1 "
                            "earlier probe measurement on NVIDIA GeForce RTX 3060") for r in measured.reasons)
    assert not any("CUDA context +-256 MiB assumed" in r for r in measured.reasons)
    assert any("(allocator margin +-15% of activations" in r for r in measured.reasons)
    # the same step and run: 212 MiB less context and no context uncertainty, to the byte
    assert (measured.batch_size, measured.expandable_segments) == (assumed.batch_size, assumed.expandable_segments)
    assert measured.need_bytes == assumed.need_bytes - (512 - 300) * MiB - memory.CONTEXT_UNCERTAINTY


@dataclass(frozen=True, kw_only=True)
class _DeviceWithContext(BudgetedCpuDevice):
    """The budgeted CPU device, reporting a process total as NVML would: what the tracker holds plus a context."""

    context_bytes: int

    def used_now(self):
        return self.allocated() + self.context_bytes

    def outside_allocator(self, used):
        return None if used is None else used - self.allocated()


def test_every_passing_probe_trial_records_the_memory_outside_the_allocator():
    spec = models.resolve(tiny_gpt2(vocab_size=512))
    budget = 512 * MiB
    card = planner.gpus.GpuInfo(name="budgeted CPU device", key=None, total_bytes=budget, free_bytes=budget,
                                used_by_others_bytes=0, compute_capability=None, bf16=False, peak_tflops_16=None,
                                bandwidth_gbs=None, source="host")
    p = planner.plan(spec, card, seq_len=64, margin=0.0, probe=False, effective_batch=4, gradient_checkpointing=False)
    result = probing.probe(p, spec=spec, device=_DeviceWithContext(budget_bytes=budget, context_bytes=77 * MiB),
                           rank=False)
    passing = [t for t in result.trials if t.fits]
    assert passing and all(t.outside_allocator == 77 * MiB for t in passing)
    store = calibration.open_store()
    assert store.context("budgeted CPU device", calibration.context_versions()) == (77 * MiB, len(passing))
    store.close()
