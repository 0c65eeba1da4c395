"""A script started on several ranks (torchrun, accelerate launch): one plan for every rank, decided on rank 0; probes
whose trials every rank runs and agrees on. Two gloo processes on the CPU."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from autofit import distributed as d
from autofit import gpu as gpus
from autofit.errors import ConfigError
from autofit.probing import BudgetedCpuDevice
from autofit.sim.tracker import Tracker, round_bytes
from tests.conftest import end_rank, tiny_gpt2, tiny_llama

PLAN_ARGS = dict(seq_len=32, effective_batch=4, method="full", strategy="ddp")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _count_calls(module, name: str, counts: dict) -> None:
    original = getattr(module, name)

    def counted(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return original(*args, **kwargs)

    setattr(module, name, counted)


def _rank_main(rank: int, port: int, out: str, job: dict) -> None:
    from autofit import planner
    from autofit.sim import simulate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), AUTOFIT_CACHE="off", AUTOFIT_WORKERS="1")
    counts: dict = {}
    _count_calls(planner, "plan", counts)
    _count_calls(simulate, "run_many", counts)
    result: dict = {}
    if job["kind"] == "launcher":  # as torchrun starts a script: the variables only, no process group yet
        os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        p = d.plan(tiny_llama(), job["gpu"], **PLAN_ARGS)
        result.update(plan=d.plan_to_text(p), world=[c.name for c in p.world.cards], size=p.world_size,
                      initialised=dist.is_initialized())
    elif job["kind"] == "error":  # the script initialised the group; a bad request fails on rank 0, raised on both
        dist.init_process_group("gloo", rank=rank, world_size=2)
        try:
            d.plan(tiny_llama(), job["gpu"], **dict(PLAN_ARGS, effective_batch=3))
        except ConfigError as err:
            result.update(error=str(err))
    elif job["kind"] == "guard":
        os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        dist.init_process_group("gloo", rank=rank, world_size=2)
        result.update(_guard_on_rank(rank, job["tmp"]))
    elif job["kind"] == "probe":
        dist.init_process_group("gloo", rank=rank, world_size=2)
        result.update(_probe_on_rank(rank))
    result["counts"] = counts
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.barrier()  # neither rank tears the group down while the other still talks to it
    dist.destroy_process_group()
    end_rank()


def _guard_on_rank(rank: int, tmp: str) -> dict:
    """The single-process guard test's runs on each of two DDP ranks; only rank 1's budget is too small for a
    micro-batch of 8."""
    import torch

    from autofit import data
    from autofit.guard import guard
    from tests.test_guard import TEXTS, make_trainer, peak

    tok = data.build_tokenizer(TEXTS, vocab_size=300)
    roomy = make_trainer(tok, f"{tmp}/a{rank}", 8, accumulation=2)
    full_peak = peak(roomy)
    half_peak = peak(make_trainer(tok, f"{tmp}/b{rank}", 4, accumulation=2))
    guarded = make_trainer(tok, f"{tmp}/c{rank}", 8, accumulation=2)
    state = guard(guarded)
    with Tracker(budget=(half_peak + full_peak) // 2 if rank == 1 else None) as tracker:
        steps = guarded.train().global_step
    weights = [p.detach() for p in guarded.model.parameters()]
    mine = torch.cat([w.flatten() for w in weights])
    theirs = mine.clone()
    dist.broadcast(theirs, src=0)
    # an error other than running out of memory on rank 1: it is raised there unchanged, and rank 0 stops too
    broken = make_trainer(tok, f"{tmp}/d{rank}", 2, steps=1)
    if rank == 1:
        def bug(model, inputs, num_items_in_batch=None):
            raise ValueError("a bug in the user's step")

        broken.training_step = bug
    guard(broken)
    try:
        broken.train()
        stopped = None
    except Exception as err:  # noqa: BLE001 - what each rank stopped with is the result
        stopped = f"{type(err).__name__}: {err}"
    return dict(stopped=stopped, full_peak=full_peak, half_peak=half_peak, guarded_peak=tracker.peak, steps=steps,
                roomy_steps=roomy.state.global_step, ddp=type(guarded.model_wrapped).__name__,
                events=[(e.micro_batch_before, e.micro_batch_after, e.pieces, e.global_step) for e in state.events],
                same_as_unguarded=all(torch.allclose(a, b, atol=1e-6)
                                      for a, b in zip(weights, roomy.model.parameters())),
                same_as_rank0=bool(torch.equal(mine, theirs)),
                batch=guarded.args.per_device_train_batch_size * guarded.args.gradient_accumulation_steps)


@dataclass(frozen=True, kw_only=True, slots=True)
class _SharedDevice(BudgetedCpuDevice):
    """A budgeted CPU device of which ``ballast`` bytes are held by something else for the whole session (a card
    another process uses too); ``broken`` makes building the model fail with an error that is not out-of-memory."""

    ballast: int = 0
    broken: bool = False

    @contextlib.contextmanager
    def session(self):
        import torch

        with BudgetedCpuDevice.session(self):
            held = torch.empty(self.ballast, dtype=torch.uint8)
            yield
            del held

    def build(self, spec, cfg):
        if self.broken:
            raise ValueError("a broken model")
        return BudgetedCpuDevice.build(self, spec, cfg)


def _probe_on_rank(rank: int) -> dict:
    """Both ranks probe the same plan on devices of the same budget, but on rank 1 other memory is held: a
    micro-batch of 8 fits rank 0 and not rank 1."""
    from autofit import memory, planner, probing
    from autofit import model as models
    from tests.test_probing import CFG, EVAL, SEQ, host

    spec = models.resolve(tiny_gpt2(vocab_size=512))
    need = {b: memory.simulate_point(spec, CFG, batch_size=b, seq_len=SEQ, eval_batch_size=EVAL).min_reserved
            for b in (4, 8)}
    budget = need[8] + 1024
    p = planner.replace(planner.plan(spec, host(budget), seq_len=SEQ, margin=0.0, probe=False, effective_batch=16,
                                     gradient_checkpointing=False), eval_batch_size=EVAL)
    device = _SharedDevice(budget_bytes=budget, ballast=need[8] - need[4] if rank == 1 else 0)
    probed = probing.probe(p, spec=spec, device=device, use_cache=False, rank=False)
    try:
        probing.probe(p, spec=spec, device=_SharedDevice(budget_bytes=budget, broken=rank == 1), use_cache=False,
                      rank=False)
        stopped = None
    except Exception as err:  # noqa: BLE001 - what each rank stopped with is the result
        stopped = f"{type(err).__name__}: {err}"
    return dict(planned=p.batch_size, need=need, batch=probed.batch_size, grad_accum=probed.grad_accum,
                trials=[(t.batch_size, t.outcome, t.note, t.peak_reserved, t.memory_returned) for t in probed.trials],
                stopped=stopped)


def _two_ranks(tmp_path, **job) -> list[dict]:
    out = str(tmp_path / "rank")
    mp.spawn(_rank_main, args=(_port(), out, job), nprocs=2, join=True)
    return [json.load(open(f"{out}.{r}")) for r in range(2)]


def test_a_launched_script_gets_rank_zeros_plan_on_every_rank(tmp_path):
    ranks = _two_ranks(tmp_path, kind="launcher", gpu="rtx3080-20gb")
    assert ranks[0]["plan"] == ranks[1]["plan"]
    assert [r["size"] for r in ranks] == [2, 2]  # the launcher's world: one card of the kind named per rank
    assert ranks[0]["world"] == ranks[1]["world"] == [gpus.resolve("rtx3080-20gb").name] * 2
    assert [r["initialised"] for r in ranks] == [True, True]
    assert ranks[0]["counts"]["plan"] >= 1 and ranks[0]["counts"]["run_many"] >= 1  # rank 0 planned and simulated
    assert ranks[1]["counts"] == {}  # rank 1 neither planned nor simulated
    p = d.plan_from_text(ranks[1]["plan"])
    assert isinstance(p, d.WorldPlan) and p.strategy == "ddp"
    assert p.batch_size * p.grad_accum * 2 == p.effective_batch == 4
    # the same request in one process plans the same world
    alone = d.plan(tiny_llama(), "2x rtx3080-20gb", **PLAN_ARGS)
    assert (alone.batch_size, alone.grad_accum, alone.rank_need) == (p.batch_size, p.grad_accum, p.rank_need)


def test_an_error_planning_on_rank_zero_is_raised_on_every_rank(tmp_path):
    ranks = _two_ranks(tmp_path, kind="error", gpu="rtx3080-20gb")
    assert ranks[0]["error"] == ranks[1]["error"]
    assert "does not divide over 2 GPUs" in ranks[1]["error"]
    assert ranks[1]["counts"] == {}


def test_plan_text_round_trips():
    p = d.plan(tiny_llama(), "2x rtx3080-20gb", **PLAN_ARGS)
    assert d.plan_from_text(d.plan_to_text(p)) == p
    single = d.plan(tiny_llama(), "rtx3080-20gb", seq_len=32, effective_batch=4, method="full")
    assert d.plan_from_text(d.plan_to_text(single)) == single


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "not below WORLD_SIZE"),
    ({"WORLD_SIZE": "4", "RANK": "0", "LOCAL_WORLD_SIZE": "3"}, "does not divide"),
])
def test_bad_launcher_variables_say_what_to_do(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=message):
        d.launched()


def test_one_process_is_not_a_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert d.launched() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert d.launched() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert d.launched() == d.Launch(world_size=4, rank=3, local_rank=1, local_world_size=2)
    assert d.launched().nodes == 2


def test_a_launched_script_without_a_rendezvous_says_what_to_do(monkeypatch):
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT not set"):
        d.plan(tiny_llama(), "rtx3080-20gb", **PLAN_ARGS)


def test_the_guard_halves_every_rank_when_one_runs_out_of_memory(tmp_path):
    ranks = _two_ranks(tmp_path, kind="guard", tmp=str(tmp_path))
    for r in ranks:
        assert r["ddp"] == "DistributedDataParallel"
        assert r["half_peak"] < r["full_peak"]
        assert r["steps"] == r["roomy_steps"] == 3  # no optimizer step lost or repeated
        assert r["events"] == [[8, 4, 2, 0]]  # both halved at the first step, rank 0 with memory to spare
        assert r["same_as_unguarded"] and r["same_as_rank0"]  # the same samples reached the same steps
        assert r["batch"] == 16
    assert ranks[1]["guarded_peak"] <= (ranks[1]["half_peak"] + ranks[1]["full_peak"]) // 2
    assert ranks[1]["stopped"] == "ValueError: a bug in the user's step"
    assert ranks[0]["stopped"].startswith("AutofitError: another rank stopped with an error")


def test_a_probe_on_every_rank_agrees_when_only_one_rank_runs_out(tmp_path):
    ranks = _two_ranks(tmp_path, kind="probe")
    need = {int(k): v for k, v in ranks[0]["need"].items()}
    assert ranks[0]["planned"] == 8  # the estimate puts 8 under the budget both devices have
    for r in ranks:
        # 8: out of memory on rank 1 only, so on both; everything released; then 4 fits both, exactly as estimated
        assert [[b, outcome, returned] for b, outcome, _, _, returned in r["trials"]] == \
            [[8, "oom", True], [4, "fits", True]]
        # the largest of the ranks' peaks, the same on every rank: rank 1's, with what else it holds
        assert r["trials"][1][3] == need[4] + round_bytes(need[8] - need[4])
        assert (r["batch"], r["grad_accum"]) == (4, 4)
    assert ranks[0]["trials"][0][2] == "out of memory on another rank"
    assert "out of memory" in ranks[1]["trials"][0][2] and "another rank" not in ranks[1]["trials"][0][2]
    assert ranks[1]["stopped"] == "ValueError: a broken model"
    assert ranks[0]["stopped"] == "ProbeError: another rank stopped with an error in trial 1; its output says which"


def test_the_guard_refuses_fsdp_across_ranks(monkeypatch):
    import torch
    from torch.distributed.fsdp import fully_shard

    from autofit.guard import _check_wrapper

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        _check_wrapper(torch.nn.Linear(4, 4))  # an unwrapped model passes
        with pytest.raises(ConfigError, match="not FSDP"):
            _check_wrapper(fully_shard(torch.nn.Linear(4, 4)))
    finally:
        dist.destroy_process_group()


def test_ranks_on_the_cpu_join_over_gloo_even_where_a_card_is_here(monkeypatch):
    import torch

    joined, devices = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.append((backend, kw["rank"])))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    launch = d.Launch(world_size=2, rank=1, local_rank=1, local_world_size=2)
    d.join_group(launch, cpu=True)
    d.join_group(launch)
    assert joined == [("gloo", 1), ("nccl", 1)] and devices == [1]
