import sqlite3

import pytest
import torch

from autofit import calibration, memory, planner, probing
from autofit import model as models
from autofit.errors import ProbeError
from autofit.gpu import GpuInfo
from autofit.probing import BudgetedCpuDevice, is_oom
from autofit.sim.simulate import StepConfig
from tests.conftest import tiny_gpt2

SEQ = 128
EVAL = 2
CFG = StepConfig(device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def spec():
    return models.resolve(tiny_gpt2(vocab_size=512))


@pytest.fixture(scope="module")
def need(spec):
    return {b: memory.simulate_point(spec, CFG, batch_size=b, seq_len=SEQ, eval_batch_size=EVAL).min_reserved
            for b in (1, 2, 4, 8, 16)}


def host(budget: int) -> GpuInfo:
    return GpuInfo(name="budgeted CPU device", key=None, total_bytes=budget, free_bytes=budget,
                   used_by_others_bytes=0, compute_capability=None, bf16=False, peak_tflops_16=None,
                   bandwidth_gbs=None, source="host")


def probe_on(spec, plan_budget, device_budget, *, error=1.0, monkeypatch=None, **kwargs):
    p = planner.plan(spec, host(plan_budget), seq_len=SEQ, margin=0.0, probe=False, effective_batch=16,
                     gradient_checkpointing=False)
    p = planner.replace(p, eval_batch_size=EVAL)
    if error != 1.0:
        real = probing._Prober.predicted
        monkeypatch.setattr(probing._Prober, "predicted", lambda self, cfg, b: int(real(self, cfg, b) * error))
    return probing.probe(p, spec=spec, device=BudgetedCpuDevice(budget_bytes=device_budget), use_cache=False,
                         rank=False, **kwargs)


def sequence(result):
    return [(t.batch_size, t.outcome) for t in result.trials]


def test_estimate_right_one_trial(spec, need):
    budget = (need[4] + need[8]) // 2
    result = probe_on(spec, budget, budget)
    assert sequence(result) == [(4, "fits")]
    assert result.batch_size == 4 and result.grad_accum == 4 and result.source == "probed"
    trial = result.trials[0]
    assert trial.peak_reserved == need[4] == trial.predicted_reserved  # exact on this device
    assert result.measured_reserved == need[4] and any("measured headroom" in r for r in result.reasons)


def test_bracket_tries_a_size_the_estimate_puts_within_five_percent(spec, need, monkeypatch):
    budget = need[8] - 16 * 1024  # 8 misses by a hair
    result = probe_on(spec, budget, budget, error=0.99, monkeypatch=monkeypatch)
    # the estimate (1% low) puts 8 within the 5% bracket: tried, out of memory, and 4 stands
    assert sequence(result) == [(4, "fits"), (8, "oom")]
    assert result.batch_size == 4


def test_optimistic_estimate_steps_down_after_out_of_memory(spec, need, monkeypatch):
    device_budget = (need[4] + need[8]) // 2
    result = probe_on(spec, need[8] + 1024, device_budget, error=0.7, monkeypatch=monkeypatch)
    assert sequence(result) == [(8, "oom"), (4, "fits")]
    assert result.batch_size == 4
    oom, ok = result.trials
    assert oom.memory_returned and oom.peak_reserved is None and "out of memory" in oom.note
    assert ok.memory_returned and ok.peak_reserved == need[4]


def test_result_is_the_largest_size_that_fits(spec, need, monkeypatch):
    device_budget = (need[2] + need[4]) // 2
    result = probe_on(spec, need[16] + 1024, device_budget, error=0.3, monkeypatch=monkeypatch)
    # the estimate is 70% low: 8 is the largest it puts under the limit; the bracket below (4) fails too, so the
    # probe keeps stepping down
    assert sequence(result) == [(8, "oom"), (4, "oom"), (2, "fits")]
    assert result.batch_size == 2
    device = BudgetedCpuDevice(budget_bytes=device_budget)
    assert probing.run_trial(spec, CFG, device, batch_size=4, seq_len=SEQ, eval_batch_size=EVAL).outcome == "oom"
    assert probing.run_trial(spec, CFG, device, batch_size=2, seq_len=SEQ, eval_batch_size=EVAL).outcome == "fits"


def test_nothing_fits_is_a_clear_error(spec, need, monkeypatch):
    with pytest.raises(ProbeError, match="every trial ran out of memory"):
        probe_on(spec, need[4], need[1] // 2, error=0.1, monkeypatch=monkeypatch)


def test_probe_never_changes_the_users_model(need):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_gpt2(vocab_size=512))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = models.resolve(model)
    budget = (need[4] + need[8]) // 2
    result = probe_on(spec, budget, budget)
    assert result.batch_size == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_other_errors_propagate_unchanged(spec, need, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug, not a memory problem")

    monkeypatch.setattr(probing, "_trial_steps", broken)
    with pytest.raises(ValueError, match="a bug, not a memory problem"):
        probe_on(spec, need[4], need[4])


@pytest.mark.parametrize("err, expected", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1.00 GB)"), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("out of memory"), False),  # not a runtime error: a user's own exception
    (KeyboardInterrupt(), False),
])
def test_is_oom(err, expected):
    assert is_oom(err) is expected


def test_isolated_trial_runs_in_a_fresh_process(spec, need):
    device = BudgetedCpuDevice(budget_bytes=need[2] + 1024)
    trial = probing.run_trial_isolated(spec, CFG, device, batch_size=2, seq_len=SEQ, eval_batch_size=EVAL)
    assert trial.isolated and trial.fits and trial.peak_reserved == need[2]


def test_calibration_is_recorded_and_used(spec, need, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOFIT_CACHE", str(tmp_path))
    budget = (need[4] + need[8]) // 2
    p = planner.plan(spec, host(budget), seq_len=SEQ, margin=0.0, probe=False, effective_batch=16,
                     gradient_checkpointing=False)
    p = planner.replace(p, eval_batch_size=EVAL)
    probing.probe(p, spec=spec, device=BudgetedCpuDevice(budget_bytes=budget), use_cache=True, rank=False)
    entries = calibration.Store().entries()
    assert len(entries) == 1 and entries[0]["ratio"] == pytest.approx(1.0) and entries[0]["samples"] == 1


def test_close_alternatives_are_ranked_and_an_interrupted_study_resumes(spec, need, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOFIT_CACHE", str(tmp_path))
    budget = need[16] + 1024
    p = planner.plan(spec, host(budget), seq_len=SEQ, margin=0.0, probe=False, effective_batch=16)
    p = planner.replace(p, eval_batch_size=EVAL)
    alternative = dict(config={**{k: getattr(p.step_config, k) for k in p.step_config.__slots__},
                               "gradient_checkpointing": not p.gradient_checkpointing},
                       batch_size=p.batch_size, grad_accum=p.grad_accum, tokens_per_second=1.0)
    p = planner.replace(p, alternatives=(alternative,))
    device = BudgetedCpuDevice(budget_bytes=budget)
    runs = []
    real = probing.run_trial

    def counted(*args, **kwargs):
        runs.append(args[1].gradient_checkpointing)
        if len(runs) == 2:
            raise KeyboardInterrupt  # the user stops the probe during the second candidate
        return real(*args, **kwargs)

    monkeypatch.setattr(probing, "run_trial", counted)
    with pytest.raises(KeyboardInterrupt):
        probing.probe(p, spec=spec, device=device)
    monkeypatch.setattr(probing, "run_trial", lambda *a, **k: (runs.append(a[1].gradient_checkpointing), real(*a, **k))[1])
    result = probing.probe(p, spec=spec, device=device)
    # the first candidate's search is read back from the study; only the interrupted one runs again
    assert len(runs) == 3 and runs[2] == runs[1]
    assert {t.gradient_checkpointing for t in result.trials} == {True, False}
    assert result.tokens_per_second == max(t.tokens_per_second for t in result.trials if t.fits)


def test_corrupt_or_foreign_database_is_moved_aside(tmp_path, caplog):
    path = tmp_path / "autofit.db"
    path.write_bytes(b"this is not sqlite")
    store = calibration.Store(path)
    assert store.entries() == [] and any(p.name.startswith("autofit.db.aside-") for p in tmp_path.iterdir())
    store.close()
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    calibration.Store(other).close()
    assert any(p.name.startswith("other.db.aside-") for p in tmp_path.iterdir())
    assert "moving" in caplog.text


class _Cycle:
    pass


def test_a_trial_collects_its_own_cycles_and_leaves_nothing_frozen(spec):
    import gc
    import weakref

    with probing._collecting_only_new():
        node = _Cycle()
        node.me, node.tensor = node, torch.zeros(4)
        alive = weakref.ref(node)
        del node
        assert alive() is not None  # a cycle: reference counting alone keeps it
        gc.collect()
        assert alive() is None
    assert gc.get_freeze_count() == 0
    t = probing.run_trial(spec, CFG, BudgetedCpuDevice(budget_bytes=2**20), batch_size=2, seq_len=SEQ)
    assert t.outcome == "oom" and t.memory_returned and gc.get_freeze_count() == 0


def test_objects_the_process_froze_itself_stay_frozen(spec):
    import gc

    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with probing._collecting_only_new():
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
