import json
import runpy
import sys
from pathlib import Path

import pytest

from autofit import planner, training
from autofit.cli import main as cli
from autofit.errors import ConfigError, ModelError
from autofit.sim.tracker import Tracker
from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def test_wrapper_trains_and_leaves_a_usable_folder(notes, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    result = training.train(tiny_llama(), str(notes), output_dir=str(out), steps=20, random_init=True,
                            progress=False)
    assert result.global_step == 20 and result.plan.gpu.source == "host"
    # a run of N steps keeps no checkpoints (they would be mostly AdamW state); the final model is saved
    assert not list(out.glob("checkpoint-*")) and (out / "model.safetensors").exists()
    history = losses(out)
    assert all(v == v for v in history) and history[-1] < history[0]  # finite, and falling on a repeated sample
    assert planner.Plan.from_json((out / "plan.json").read_text()) == result.plan
    rows = [json.loads(line) for line in (out / "memory_log.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(r["peak_host_rss"] > 0 for r in rows)
    model = AutoModelForCausalLM.from_pretrained(str(out))  # the folder is usable
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.config.vocab_size == len(tok)


def test_resume_continues_from_the_last_checkpoint(notes, tmp_path):
    out = tmp_path / "run"
    training.train(tiny_llama(), str(notes), output_dir=str(out), steps=10, save_steps=5, random_init=True,
                   progress=False)
    result = training.train(tiny_llama(), str(notes), output_dir=str(out), steps=20, save_steps=5, random_init=True,
                            resume=True, progress=False)
    rows = (out / "memory_log.jsonl").read_text().splitlines()
    assert result.global_step == 20 and len(rows) == 20  # 10 steps, then 10 more from checkpoint-10
    assert (out / "checkpoint-20" / "optimizer.pt").exists()  # asked for (save_steps): checkpoints as before


def test_lora_saves_an_adapter(notes, tmp_path):
    out = tmp_path / "lora"
    result = training.train(tiny_llama(), str(notes), output_dir=str(out), steps=4, random_init=True,
                            method="lora", progress=False)
    assert result.plan.method == "lora" and (out / "adapter_config.json").exists()


def test_guard_keeps_the_run_going_under_a_budget(tmp_path):
    notes = tmp_path / "many.txt"  # enough text for full micro-batches of 16 packed sequences
    notes.write_text("\n\n".join(f"note {i}: the model learns this sentence about small cards." for i in range(600)))
    base = planner.plan(tiny_llama(), "cpu", seq_len=64, effective_batch=16, method="full")
    peaks = {}
    for b in (16, 8):
        tracker = Tracker()
        with tracker:
            training.train(tiny_llama(), str(notes), output_dir=str(tmp_path / f"b{b}"), steps=2, random_init=True,
                           plan=planner.replace(base, batch_size=b, grad_accum=16 // b), progress=False)
        peaks[b] = tracker.peak
    assert peaks[8] < peaks[16]
    out = tmp_path / "guarded"
    with Tracker(budget=(peaks[8] + peaks[16]) // 2):  # micro-batch 16 does not fit; 8 does
        result = training.train(tiny_llama(), str(notes), output_dir=str(out), steps=3, random_init=True,
                                plan=planner.replace(base, batch_size=16, grad_accum=1), progress=False)
    assert result.global_step == 3
    assert [(e.micro_batch_before, e.micro_batch_after) for e in result.guard_events] == [(16, 8)]


def test_bad_inputs(notes, tmp_path):
    with pytest.raises(ModelError, match="random_init=True"):
        training.train("distilgpt2", str(notes), output_dir=str(tmp_path), steps=1, progress=False)
    with pytest.raises(ConfigError, match="not both"):
        training.train(tiny_llama(), str(notes), output_dir=str(tmp_path), steps=1, epochs=1, progress=False)
    with pytest.raises(ConfigError, match="bitsandbytes"):
        training.train(tiny_llama(), str(notes), output_dir=str(tmp_path), steps=1, random_init=True,
                       method="qlora", progress=False)


def test_cli_train(notes, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli(["train", "distilgpt2", "--data", str(notes), "--random-init", "--steps", "3", "--seq-len", "32",
                "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert data["global_step"] == 3 and data["plan"]["method"] == "full" and (out / "plan.json").exists()
    code = cli(["train", "distilgpt2", "--data", str(notes), "--steps", "1", "--out", str(tmp_path / "other")])
    assert code == 2 and "--random-init" in capsys.readouterr().err
    code = cli(["train", "distilgpt2", "--data", str(notes), "--random-init", "--steps", "1", "--out", str(out)])
    assert code == 2 and "holds a finished run" in capsys.readouterr().err  # never overwritten unless asked


@pytest.mark.parametrize("script", ["embed_in_trainer.py", "lora_distilgpt2.py", "qlora_tinyllama.py"])
def test_examples_run_in_their_reduced_form(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, "--smoke", "--out", str(tmp_path / "out")])
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
