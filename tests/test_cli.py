import json

import pytest

from autofit.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_estimate_table_and_json(capsys):
    code, out, _ = run(capsys, "estimate", "distilgpt2", "--gpu", "rtx3060", "--batch-size", "4", "--seq-len", "256",
                       "--quiet")
    assert code == 0 and "peak reserved" in out and "NVIDIA GeForce RTX 3060" in out
    code, out, _ = run(capsys, "estimate", "distilgpt2", "--gpu", "rtx3060", "--batch-size", "4", "--seq-len", "256",
                       "--json")
    data = json.loads(out)
    assert code == 0 and data["peak_allocated"] <= data["min_reserved"] <= data["peak_reserved"]
    assert data["config"]["precision"] == "bf16-mixed" and data["source"] == "simulation"


def test_estimate_plot(capsys, tmp_path):
    path = tmp_path / "mem.png"
    code, out, _ = run(capsys, "estimate", "distilgpt2", "--gpu", "8GiB", "--batch-size", "2", "--seq-len", "128",
                       "--plot", str(path), "--quiet")
    assert code == 0 and path.read_bytes()[:4] == b"\x89PNG" and "wrote" in out


def test_inspect(capsys):
    code, out, _ = run(capsys, "inspect", "gpt2", "--json")
    data = json.loads(out)
    assert code == 0 and data["total_params"] == 124_439_808 and data["trainable_params"] == 124_439_808
    code, out, _ = run(capsys, "inspect", "distilgpt2", "--lora-r", "8", "--json")
    data = json.loads(out)
    assert data["method"] == "lora" and data["trainable_params"] == 147_456
    code, out, _ = run(capsys, "inspect", "distilgpt2", "--lora-r", "8", "--lora-targets", "c_attn,c_fc")
    assert code == 0 and "c_attn,c_fc" in out


def test_gpus_and_models(capsys):
    code, out, _ = run(capsys, "gpus", "--json")
    data = json.loads(out)
    assert code == 0 and data["detected"] == [] and len(data["catalog"]) >= 25
    code, out, _ = run(capsys, "gpus")
    assert "rtx4060laptop" in out.replace("-", "")
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0 and {"distilgpt2", "meta-llama/Llama-3.1-70B"} <= {r["name"].split("/")[-1] if "gpt2" in r["name"]
                                                                        else r["name"] for r in json.loads(out)}


@pytest.mark.parametrize("argv, fragment", [
    (["estimate", "nosuchmodel", "--gpu", "rtx3060", "--batch-size", "1", "--seq-len", "8"], "unknown model"),
    (["estimate", "gpt2", "--gpu", "rtx9999", "--batch-size", "1", "--seq-len", "8"], "unknown GPU"),
    (["estimate", "gpt2", "--gpu", "rtx3060", "--batch-size", "1", "--seq-len", "99999"], "beyond"),
    (["estimate", "gpt2", "--batch-size", "1", "--seq-len", "8"], "no CUDA GPU detected"),
    (["estimate", "gpt2", "--gpu", "cuda:x", "--batch-size", "1", "--seq-len", "8"], ""),
    (["inspect", "gpt2", "--lora-r", "4", "--lora-targets", "q_proj"], "do not match"),
])
def test_bad_input_prints_one_line_and_exits_2(capsys, argv, fragment):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("autofit: error:")]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err


def test_no_command_prints_help(capsys):
    code, out, _ = run(capsys)
    assert code == 2 and "estimate" in out


def test_probe_plans_for_a_named_card_and_writes_the_plan(capsys, tmp_path):
    from autofit.planner import Plan

    out = tmp_path / "plan.json"
    code, text, _ = run(capsys, "probe", "distilgpt2", "--gpu", "rtx3060", "--seq-len", "256", "--out", str(out),
                        "--quiet")
    assert code == 0 and "micro-batch" in text and "why:" in text and "planned from the estimate" in text
    plan = Plan.from_json(out.read_text())
    assert plan.seq_len == 256 and plan.batch_size * plan.grad_accum == plan.effective_batch >= 16
    code, text, _ = run(capsys, "probe", "distilgpt2", "--gpu", "rtx3060", "--seq-len", "256", "--json",
                        "--effective-batch", "32")
    data = json.loads(text)
    assert data["effective_batch"] == 32 and data["source"] == "estimated"


def test_probe_without_a_gpu_says_how_to_name_one(capsys):
    code, out, err = run(capsys, "probe", "distilgpt2")
    assert code == 2 and "--gpu" in err and "no CUDA GPU detected" in err


def _text(out: str) -> str:
    return " ".join(out.split())  # help lines are indented and wrapped


@pytest.mark.parametrize("command", ["probe", "train"])
def test_help_states_the_defaults_that_depend_on_the_card(capsys, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping inside words such as micro-batch
    assert main([command, "--help"]) == 0  # main returns argparse's exit status
    text = _text(capsys.readouterr().out)
    assert ("--effective-batch N|max sequences per optimizer step, kept exactly as micro-batch x accumulation; 'max' "
            "takes the largest micro-batch that fits, with no accumulation. Default: set by the card: the largest "
            "micro-batch that fits, up to 64, with no accumulation; 16 by accumulation where fewer than 16 fit; 16 on "
            "the CPU") in text
    assert ("--seq-len N tokens per sequence. Default: from --data (95th percentile), else 1024 or the model's "
            "positions; a default length is halved while nothing fits the card") in text
    assert ("--eval-batch N evaluation micro-batch. Default: set by the card: the largest, up to 64, that fits after "
            "the training step") in text
    assert ("--reserved-by-others SIZE memory other programs hold on the card, such as a display (e.g. 800MiB, 0). "
            "Default: what a detected card reports; 512MiB for a desktop GeForce card named from the catalog, 0 for "
            "others") in text
    if command == "probe":
        assert ("--precision PRECISION bf16-mixed or 16-mixed (fp32 weights, 16-bit autocast), bf16-true or 16-true "
                "(16-bit weights, gradients and optimizer states, no autocast: a model loaded in bf16), 32-true; bf16, "
                "fp16 and fp32 are short for bf16-mixed, 16-mixed and 32-true. Default: set by the card: bf16-mixed "
                "where it supports bf16 (Ampere and newer), 16-mixed on older cards and on a card given only by its "
                "size, 32-true on the CPU") in text
        assert "(default: 16)" not in text


@pytest.mark.parametrize("message, flags", [
    ("name the card you plan for, e.g. gpu='rtx3060' or gpu='12GiB'",
     "name the card you plan for, e.g. --gpu rtx3060 or --gpu 12GiB"),
    ("or random_init=True to train the architecture", "or --random-init to train the architecture"),
    ("Ways out: method='lora' or method='qlora' (fits); seq_len=512 (fits QLoRA)",
     "Ways out: --method lora or --method qlora (fits); --seq-len 512 (fits QLoRA)"),
    ("eval_batch_size=8 fits; reserved_by_others=0 for a headless card", "--eval-batch 8 fits; --reserved-by-others 0 "
     "for a headless card"),
    ("gradient_checkpointing=True (keeps one layer)", "--gradient-checkpointing on (keeps one layer)"),
    ("optimizer='adamw_8bit' (AdamW state", "--optimizer adamw_8bit (AdamW state"),
    ("tokenizer=... stays as it is", "tokenizer=... stays as it is"),
])
def test_errors_name_flags_on_the_command_line(message, flags):
    from autofit.cli import as_flags

    assert as_flags(message) == flags


def test_probe_effective_batch_max_and_plot(capsys, tmp_path):
    path = tmp_path / "plan.png"
    code, out, _ = run(capsys, "probe", "distilgpt2", "--gpu", "rtx3060", "--seq-len", "256", "--effective-batch",
                       "max", "--plot", str(path), "--quiet")
    assert code == 0 and path.read_bytes()[:4] == b"\x89PNG" and f"wrote {path}" in out
    assert "as --effective-batch max asked" in out and "accumulation         1 (effective batch" in out
    assert main(["probe", "distilgpt2", "--gpu", "rtx3060", "--effective-batch", "most"]) == 2
    assert "a whole number of sequences or 'max', not 'most'" in capsys.readouterr().err


def test_a_model_that_cannot_fit_says_what_binds_with_flags(capsys):
    code, out, err = run(capsys, "probe", "meta-llama/Llama-3.2-1B", "--gpu", "rtx3060", "--method", "full",
                         "--precision", "bf16-mixed", "--no-offload", "--quiet")
    assert code == 2 and out == ""
    line = err.strip()
    assert "\n" not in line and line.startswith("autofit: error: meta-llama/Llama-3.2-1B does not fit")
    assert "its weights, gradients and AdamW state alone need 18.92 GiB. Ways out: --method lora or --method qlora" in line
    assert "--optimizer adamw_8bit" in line and "method='" not in line


def test_full_fine_tuning_that_does_not_fit_plain_adamw_finds_an_optimizer_lever(capsys):
    code, out, _ = run(capsys, "probe", "meta-llama/Llama-3.2-1B", "--gpu", "rtx3060", "--method", "full", "--quiet")
    assert code == 0
    optimizer = next(line.split()[-1] for line in out.splitlines() if line.startswith("  optimizer "))
    assert optimizer in ("adamw_8bit", "paged_adamw_8bit", "adamw_cpu_offload")
    assert f"- optimizer {optimizer}: " in out and "slower than with plain AdamW at the same micro-batch" in out
    assert "  host RAM             needs " in out and " available (" in out


def test_fit_table(capsys):
    code, out, _ = run(capsys, "fit", "--gpu", "rtx4060-laptop", "--models", "distilgpt2,meta-llama/Llama-3.1-70B",
                       "--seq-len", "256", "--quiet")
    assert code == 0 and "distilgpt2" in out
    assert ("meta-llama/Llama-3.1-70B                 does not fit: full fine-tuning: its weights, gradients and AdamW "
            "state alone need 1051.83 GiB") in out
    code, out, _ = run(capsys, "fit", "--gpu", "rtx4060-laptop", "--models", "distilgpt2", "--seq-len", "256", "--json")
    rows = json.loads(out)
    assert rows[0]["fits"] and rows[0]["method"] == "full"


def test_precision_choices_match_the_engine():
    from autofit.cli import PRECISION_CHOICES
    from autofit.sim import simulate

    assert {simulate.precision_name(p) for p in PRECISION_CHOICES} == set(simulate.PRECISIONS)
