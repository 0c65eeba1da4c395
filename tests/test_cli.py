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


def test_fit_table(capsys):
    code, out, _ = run(capsys, "fit", "--gpu", "rtx4060-laptop", "--models", "distilgpt2,meta-llama/Llama-3.1-70B",
                       "--seq-len", "256", "--quiet")
    assert code == 0 and "distilgpt2" in out and "does not fit" in out
    code, out, _ = run(capsys, "fit", "--gpu", "rtx4060-laptop", "--models", "distilgpt2", "--seq-len", "256", "--json")
    rows = json.loads(out)
    assert rows[0]["fits"] and rows[0]["method"] == "full"


def test_precision_choices_match_the_engine():
    from autofit.cli import PRECISION_CHOICES
    from autofit.sim import simulate

    assert {simulate.precision_name(p) for p in PRECISION_CHOICES} == set(simulate.PRECISIONS)
