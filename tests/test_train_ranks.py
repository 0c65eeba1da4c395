"""``autofit train --gpus N``: the world planned in the launching process, every rank started through ``accelerate
launch`` and trained by the Trainer under DDP. On a machine without a GPU the ranks run on the CPU (gloo), which is
what CI runs: two ranks of a tiny Llama, a few steps, a checkpoint both ranks write into and a resume from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autofit import distributed as d
from autofit import training
from autofit.cli import main as cli
from autofit.errors import ConfigError
from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    return folder


def _autofit(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, AUTOFIT_CACHE="off")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "autofit", *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_on_two_cpu_ranks_checkpoints_and_resumes(tiny, notes, tmp_path):
    out = tmp_path / "run"
    first = _autofit("train", str(tiny), "--data", str(notes), "--random-init", "--steps", "2", "--save-steps", "2",
                     "--seq-len", "32", "--effective-batch", "4", "--gpus", "2", "--out", str(out), "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads(first.stdout)  # rank 0 alone writes to stdout, and only the JSON
    assert result["global_step"] == 2
    plan = d.read_plan((out / "plan.json").read_text())
    assert isinstance(plan, d.WorldPlan) and plan.world.on_cpu and plan.world_size == 2 and plan.strategy == "ddp"
    assert (plan.batch_size * plan.grad_accum, plan.effective_batch) == (2, 4)  # the effective batch over two ranks
    # both ranks wrote their part of the checkpoint (their RNG states); rank 0 moved it into place whole
    assert sorted(p.name for p in (out / "checkpoint-2").glob("rng_state_*.pth")) == ["rng_state_0.pth",
                                                                                       "rng_state_1.pth"]
    assert not [p for p in out.iterdir() if p.name.startswith((training.STAGING, training.DISCARDED))]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert [r["step"] for r in _rows(out / "memory_log.jsonl")] == [1, 2]
    assert [r["step"] for r in _rows(out / "memory_log.rank1.jsonl")] == [1, 2]
    # a longer run resumed on the same ranks, with the plan it started with
    again = _autofit("train", str(tiny), "--data", str(notes), "--random-init", "--steps", "4", "--save-steps", "2",
                     "--gpus", "2", "--out", str(out), "--resume", "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["global_step"] == 4
    assert d.read_plan((out / "plan.json").read_text()).effective_batch == 4
    assert [r["step"] for r in _rows(out / "memory_log.jsonl")] == [1, 2, 3, 4]
    assert [r["step"] for r in _rows(out / "memory_log.rank1.jsonl")] == [1, 2, 3, 4]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "2", "--effective-batch", "3"], "effective_batch 3 does not divide over 2 CPU ranks"),
    (["--gpus", "3", "--gpu", "rtx3060"], "3 ranks need 3 CUDA cards here and 0 are visible"),
    (["--gpus", "2", "--strategy", "fsdp"], "FSDP2 is planned for GPUs; ranks on the CPU run DDP"),
    (["--strategy", "ddp"], "--strategy chooses how several ranks share the work; add --gpus N"),
    (["--gpu", "cpu,rtx3060"], "the CPU and GPUs cannot be ranks of one world"),
])
def test_bad_requests_fail_before_any_rank_starts(tiny, notes, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a rank was started"))
    out = tmp_path / "run"
    code = cli(["train", str(tiny), "--data", str(notes), "--random-init", "--steps", "1", "--seq-len", "32",
                "--out", str(out), "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_plan_for_one_device_is_refused_on_ranks_and_a_world_plan_in_one_process(tiny, notes, tmp_path, capsys):
    single = tmp_path / "single.json"
    from autofit import planner

    single.write_text(planner.plan(tiny_llama(), "cpu", seq_len=32, effective_batch=4, method="full").to_json())
    code = cli(["train", str(tiny), "--data", str(notes), "--random-init", "--steps", "1", "--gpus", "2",
                "--plan", str(single), "--out", str(tmp_path / "a")])
    assert code == 2 and "is a plan for one device; train it without --gpus" in capsys.readouterr().err
    world = d.plan(tiny_llama(), "cpu", gpus_count=2, seq_len=32, effective_batch=4)
    (tmp_path / "world.json").write_text(world.to_json())
    code = cli(["train", str(tiny), "--data", str(notes), "--random-init", "--steps", "1", "--gpus", "3",
                "--plan", str(tmp_path / "world.json"), "--out", str(tmp_path / "a")])
    assert code == 2 and "is a plan for 2 ranks, not 3; pass --gpus 2 or plan again" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"the plan is for 2 rank\(s\) but this run has 1; autofit train --gpus 2"):
        training.train(tiny_llama(), str(notes), output_dir=str(tmp_path / "b"), plan=world, steps=1,
                       random_init=True, progress=False)


def test_cpu_world_plan_reads_back_and_launches_through_accelerate(tmp_path):
    p = d.plan(tiny_llama(), "2x cpu", seq_len=32, effective_batch=8)
    assert p.world.on_cpu and p.strategy == "ddp" and "NCCL buffers" not in p.rank_parts
    host = d.gpus.host_memory()
    assert all(c.total_bytes == host.total_bytes // 2 for c in p.world.cards)  # each rank holds a replica
    assert p.world.link.kind == "loopback"
    assert p.world.link.gbs * d.LINK_EFFICIENCY == pytest.approx(d.LOOPBACK_BUS_GBS)
    # the ranks share the machine's cores: each step takes as long as the whole machine needs for both ranks' work
    from autofit import planner

    one = planner.plan(tiny_llama(), p.rank.gpu, seq_len=32, effective_batch=4, probe=False)
    assert one.batch_size == p.batch_size and p.tokens_per_second <= one.tokens_per_second * 1.001
    back = d.read_plan(p.to_json())
    assert back == p
    config = yaml.safe_load(p.accelerate_config())
    # MULTI_GPU is how accelerate starts local processes (torchrun); "no" stays a string, not YAML's false
    assert (config["distributed_type"], config["mixed_precision"], config["use_cpu"]) == ("MULTI_GPU", "no", False)
    args = p.training_arguments(str(tmp_path))
    assert args.use_cpu and args.per_device_train_batch_size * args.gradient_accumulation_steps * 2 == 8
