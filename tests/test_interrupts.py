"""Interruptions: Ctrl-C (SIGINT) and SIGTERM stop train, probe and fit within seconds, leave no partial file (a
checkpoint appears whole or not at all), end worker processes and exit 130 / 143; an interrupted train resumes from
its last complete checkpoint without losing or repeating a step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import Trainer

from autofit import training
from autofit.cli import main
from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
NOTES = "\n\n".join(f"note {i}: the model learns this sentence about small cards and big models." for i in range(48))
CHECKPOINT_FILES = ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth")

# The CLI with every training micro-step slowed down, so that a signal lands mid-run rather than after it.
SLOW_CLI = """
import os, sys, time
from autofit import training
real = training._Trainer.training_step
def slow(self, *args, **kwargs):
    time.sleep(float(os.environ["STEP_SECONDS"]))
    return real(self, *args, **kwargs)
training._Trainer.training_step = slow
from autofit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def autofit(*argv, env=None, slow: float | None = None, **kwargs) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "AUTOFIT_WORKERS": "1", **(env or {})}
    code = ["-c", SLOW_CLI] if slow is not None else ["-m", "autofit"]
    if slow is not None:
        environ["STEP_SECONDS"] = str(slow)
    return subprocess.Popen([sys.executable, *code, *argv], env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the parent's pid, after the state letter
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def complete(checkpoint: Path) -> bool:
    return all((checkpoint / name).is_file() for name in CHECKPOINT_FILES)


def memory_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "memory_log.jsonl").read_text().splitlines()]


@pytest.fixture
def tiny(tmp_path):
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    tiny_llama().to_json_file(folder / "config.json")
    notes = tmp_path / "notes.txt"
    notes.write_text(NOTES)
    return str(folder), str(notes)


def test_sigint_during_train_then_resume_loses_and_repeats_no_step(tiny, tmp_path, capsys):
    from autofit import planner

    model, notes = tiny
    out, plan = tmp_path / "run", tmp_path / "plan.json"
    plan.write_text(planner.plan(model, "cpu", seq_len=32, effective_batch=4, method="full").to_json())
    argv = ["train", model, "--data", notes, "--random-init", "--steps", "12", "--save-steps", "6", "--plan", str(plan),
            "--out", str(out), "--quiet"]
    run = autofit(*argv, slow=0.25)
    try:
        wait_for(lambda: (out / "checkpoint-6" / "trainer_state.json").is_file(), 180, "checkpoint-6")
        sent = time.monotonic()
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert time.monotonic() - sent < 10
    assert run.returncode == 130 and "autofit: interrupted" in err and "--resume" in err and "Traceback" not in err
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints and all(complete(c) for c in checkpoints)  # whole, or not there at all
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    assert not (out / "model.safetensors").exists()  # not a finished run
    before = (out / "memory_log.jsonl").read_text().splitlines()
    kept = int(max(checkpoints, key=lambda c: int(c.name.split("-")[1])).name.split("-")[1])
    assert len(before) >= kept

    assert main(argv) == 2  # without --resume the unfinished run is not overwritten
    assert "holds an unfinished run" in capsys.readouterr().err

    assert main(argv + ["--resume", "--json"]) == 0  # in this process: the CLI as the user runs it
    assert json.loads(capsys.readouterr().out)["global_step"] == 12
    assert memory_steps(out) == list(range(1, 13))  # every step once
    after = (out / "memory_log.jsonl").read_text().splitlines()
    assert after[:kept] == before[:kept]  # the steps before the checkpoint were not run again
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12 and (out / "model.safetensors").is_file()


def test_an_interrupted_checkpoint_save_leaves_no_checkpoint(tiny, tmp_path, monkeypatch):
    model, notes = tiny
    out = tmp_path / "run"
    real = Trainer._save_rng_state

    def interrupted(self, output_dir):  # Ctrl-C arrives while the checkpoint's last files are written
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_rng_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        training.train(model, notes, output_dir=str(out), steps=4, save_steps=2, seq_len=32, effective_batch=4,
                       random_init=True, progress=False)
    assert list(out.glob("checkpoint-*")) == [] and not [p for p in out.iterdir() if p.name.startswith(".")]
    assert memory_steps(out) == [1, 2]
    (out / "checkpoint-9").mkdir()  # an incomplete checkpoint left by an older version is passed over
    (out / "checkpoint-9" / "config.json").write_text("{}")
    monkeypatch.setattr(Trainer, "_save_rng_state", real)
    result = training.train(model, notes, output_dir=str(out), steps=4, save_steps=2, seq_len=32, effective_batch=4,
                            random_init=True, resume=True, progress=False)
    assert result.global_step == 4 and memory_steps(out) == [1, 2, 3, 4]
    assert complete(out / "checkpoint-2") and complete(out / "checkpoint-4")


def test_overwrite_replaces_a_finished_run(tiny, tmp_path):
    model, notes = tiny
    out = tmp_path / "run"
    training.train(model, notes, output_dir=str(out), steps=2, seq_len=32, effective_batch=4, random_init=True,
                   progress=False)
    with pytest.raises(Exception, match="holds a finished run"):
        training.train(model, notes, output_dir=str(out), steps=2, seq_len=32, random_init=True, progress=False)
    result = training.train(model, notes, output_dir=str(out), steps=3, seq_len=32, effective_batch=4,
                            random_init=True, overwrite=True, progress=False)
    assert result.global_step == 3 and memory_steps(out) == [1, 2, 3]


@pytest.mark.parametrize("command, sig, code", [
    (["fit", "--gpu", "rtx3060", "--models", "Qwen/Qwen2.5-0.5B,HuggingFaceTB/SmolLM2-360M", "--seq-len", "512"],
     signal.SIGTERM, 143),
    (["probe", "Qwen/Qwen2.5-0.5B", "--gpu", "rtx3060", "--seq-len", "512", "--out", "{tmp}/plan.json"],
     signal.SIGINT, 130),
])
def test_planning_stops_within_seconds_and_ends_its_workers(command, sig, code, tmp_path):
    cache = tmp_path / "cache"
    run = autofit(*[a.replace("{tmp}", str(tmp_path)) for a in command],
                  env={"AUTOFIT_WORKERS": "2", "AUTOFIT_CACHE": str(cache)})
    try:
        wait_for(lambda: len(children(run.pid)) >= 2, 240, "the simulation workers")
        workers = children(run.pid)
        sent = time.monotonic()
        if sig == signal.SIGINT:
            os.killpg(run.pid, sig)  # Ctrl-C: the whole process group
        else:
            os.kill(run.pid, sig)  # SIGTERM: the parent only, as a process manager sends it
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == code and time.monotonic() - sent < 15
    assert "Traceback" not in err and ("terminated" if sig == signal.SIGTERM else "interrupted") in err
    wait_for(lambda: not any(alive(pid) for pid in workers), 10, "the workers to end")
    assert not (tmp_path / "plan.json").exists()
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]  # no half-written cache file
