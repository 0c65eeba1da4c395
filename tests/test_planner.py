import dataclasses
import json

import pytest

from autofit import data, gpu, planner, runs
from autofit.errors import ConfigError, DoesNotFitError, GpuError
from autofit.planner import Plan, plan
from tests.conftest import tiny_llama

pytestmark = pytest.mark.disk_cache

GRID_MODELS = ["distilgpt2", "HuggingFaceTB/SmolLM2-135M", "Qwen/Qwen2.5-0.5B"]
GRID_CARDS = ["rtx4060-laptop", "rtx3060", "rtx3080-20gb", "a100-80gb"]


@pytest.fixture(autouse=True)
def shared_simulations(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("AUTOFIT_CACHE", str(tmp_path_factory.getbasetemp() / "autofit-cache"))


@pytest.fixture(scope="module")
def grid():
    return {(m, c): plan(m, c, seq_len=512) for m in GRID_MODELS for c in GRID_CARDS}


def test_every_plan_fits_its_budget_and_keeps_the_effective_batch(grid):
    for (model, card), p in grid.items():
        assert p.estimate.required_bytes <= p.budget_bytes, (model, card)
        assert p.batch_size * p.grad_accum == p.effective_batch
        # none asked: the largest micro-batch that fits up to 64, or micro-batches accumulating to 16
        assert 16 <= p.effective_batch <= 64 and (p.grad_accum == 1 or p.effective_batch == 16)
        assert p.budget_bytes == planner.budget(gpu.resolve(card))
        assert p.source == "estimated" and p.seq_len == 512 and p.reasons


def test_a_bigger_card_never_gets_a_smaller_batch(grid):
    for model in GRID_MODELS:
        cards = sorted(GRID_CARDS, key=lambda c: gpu.resolve(c).total_bytes)
        strength = {"qlora": 0, "lora": 1, "full": 2}
        for small, big in zip(cards, cards[1:]):
            a, b = grid[(model, small)], grid[(model, big)]
            assert strength[b.method] >= strength[a.method], (model, small, big)
            if a.method == b.method and a.gradient_checkpointing == b.gradient_checkpointing:
                assert b.batch_size >= a.batch_size, (model, small, big)


def test_plans_are_deterministic_and_round_trip_through_json(grid):
    p = grid[("distilgpt2", "rtx3060")]
    again = plan("distilgpt2", "rtx3060", seq_len=512)
    machine = ("available_bytes", "swap_free_bytes", "total_bytes")  # this machine's RAM at each planning
    assert {**again.to_dict(), "host": None} == {**p.to_dict(), "host": None}
    assert {k: v for k, v in again.to_dict()["host"].items() if k not in machine} == \
        {k: v for k, v in p.to_dict()["host"].items() if k not in machine}
    text = p.to_json()
    assert Plan.from_json(text) == p
    assert json.loads(text)["estimate"]["min_reserved"] == p.estimate.min_reserved
    with pytest.raises(ConfigError):
        Plan.from_json('{"model_name": "x"}')


def test_small_model_trains_fully_and_large_one_in_four_bits(grid):
    assert grid[("distilgpt2", "a100-80gb")].method == "full"
    assert grid[("distilgpt2", "a100-80gb")].batch_size == 64  # memory to spare: the largest default batch
    p = plan("meta-llama/Llama-3.1-8B", "rtx3060", seq_len=512)
    assert p.method == "qlora" and p.quantization == "4bit" and p.gradient_checkpointing
    assert any("ruled out" in r for r in p.reasons)
    assert p.quantization_config().bnb_4bit_quant_type == "nf4" and p.lora_config().r == 16


def test_nothing_fits_names_the_memory_needed_and_the_cards_that_would_do():
    with pytest.raises(DoesNotFitError) as err:
        plan("meta-llama/Llama-3.1-70B", "rtx3060", seq_len=256)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("meta-llama/Llama-3.1-70B does not fit NVIDIA GeForce RTX 3060 (budget 10.42 GiB) with any "
                           "method: full fine-tuning: its weights, gradients and AdamW state alone need 1051.83 GiB; "
                           "LoRA: its 16-bit weights and the adapters' training state alone need 132.40 GiB; QLoRA: its "
                           "quantized weights and the adapters' training state alone need 37.80 GiB. Ways out: ")
    assert ("for full fine-tuning, LoRA and QLoRA a shorter sequence or smaller batch does not help" in text
            and "cards that would do: l40s (44.52 GiB), rtxa6000 (47.50 GiB)" in text)
    assert err.value.ways_out[-1].startswith("cards that would do: l40s")


def test_a_method_that_cannot_fit_names_what_binds_and_every_way_out():
    """Full fine-tuning of a 1.2B model on a 12 GB card: the static part binds, not the batch or the length."""
    with pytest.raises(DoesNotFitError) as err:
        # fp32 weights, and no optimizer state in host RAM (8-bit states alone do not bring it under the budget)
        plan("meta-llama/Llama-3.2-1B", "rtx3060", method="full", precision="bf16-mixed", no_offload=True)
    text = str(err.value)
    assert "\n" not in text
    assert err.value.binding == "its weights, gradients and AdamW state alone need 18.92 GiB"
    assert text.startswith("meta-llama/Llama-3.2-1B does not fit NVIDIA GeForce RTX 3060 (budget 10.42 GiB) with full "
                           "fine-tuning: its weights, gradients and AdamW state alone need 18.92 GiB. Ways out: "
                           "method='lora' or method='qlora' (fits micro-batch 1 x 1024 tokens with checkpointing); "
                           "for full fine-tuning a shorter sequence or smaller batch does not help")
    assert ("optimizer='adamw_8bit' (AdamW state in 2 bytes per parameter instead of 8) brings full fine-tuning's "
            "static part to 12.01 GiB, still over it") in text
    assert "cards that would do: l4 (21.95 GiB), a10 (21.99 GiB)" in text


def test_sequence_is_shortened_only_when_nothing_else_fits():
    p = plan("meta-llama/Llama-3.1-8B", "rtx4060-laptop")  # default length 1024 does not fit 8 GB
    assert p.seq_len < 1024 and p.seq_len_source == "default"
    assert any("shortened" in r for r in p.reasons)
    with pytest.raises(DoesNotFitError):  # an explicit length is never shortened behind the user's back
        plan("meta-llama/Llama-3.1-8B", "rtx4060-laptop", seq_len=4096)


def _record_simulations(monkeypatch) -> list:
    from autofit.sim import simulate

    requested = []
    run_many = simulate.run_many

    def recording(jobs, *args, **kwargs):
        requested.extend((j.cfg.method, j.cfg.gradient_checkpointing, j.batch_size, j.num_layers) for j in jobs)
        return run_many(jobs, *args, **kwargs)

    monkeypatch.setattr(simulate, "run_many", recording)
    return requested


def test_a_method_in_doubt_is_ruled_out_by_one_lean_simulation(monkeypatch):
    requested = _record_simulations(monkeypatch)
    # full fine-tuning's weights, gradients and AdamW state (1.2 GiB) take over half of a 2.25 GiB card's budget
    p = plan("distilgpt2", "2.25GiB", seq_len=1024, precision="bf16-mixed")  # fp32 weights only
    assert [r for r in requested if r[0] == "full"] == [("full", True, 1, 2), ("full", True, 1, 3)]
    assert "full fine-tuning ruled out at 1024 tokens: a micro-batch of 1 does not fit" in p.reasons
    assert p.method == "lora"


def test_a_method_that_fits_a_useful_batch_with_checkpointing_ends_the_search(monkeypatch):
    requested = _record_simulations(monkeypatch)
    p = plan("HuggingFaceTB/SmolLM2-135M", "3GiB", seq_len=512, precision="bf16-mixed")
    # LoRA fits micro-batch 4 only with checkpointing, but 2 without it is faster: LoRA, the faster setting, and QLoRA
    # is never simulated
    assert (p.method, p.batch_size, p.gradient_checkpointing) == ("lora", 2, False)
    assert ("LoRA chosen: the strongest method that fits a micro-batch of 4 or more (with checkpointing; the faster "
            "setting without it is used)") in p.reasons
    assert not [r for r in requested if r[0] == "qlora"]


def test_dataset_sets_the_sequence_length_from_real_token_lengths(tmp_path):
    texts = [("word " * n).strip() for n in (10, 20, 30, 40, 50, 60, 70, 80, 90, 200)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    tok = data.build_tokenizer(texts, vocab_size=300)
    lengths = data.token_lengths(data.load_samples(path), tok)
    expected = data.choose_seq_len(lengths, max_positions=128)
    p = plan(tiny_llama(), "rtx3060", dataset=str(path), tokenizer=tok)
    assert p.seq_len == expected.seq_len and p.seq_len_source == "data"
    assert p.truncated_share == expected.truncated_share
    assert any("percentile" in r for r in p.reasons)
    # the plan is checked against a run whose batches are drawn from the data's lengths, padded per batch
    assert p.run.length_source == "the data's sample lengths" and p.run.batch_size == p.batch_size
    assert p.run.lengths == runs.step_lengths(p.batch_size, p.seq_len, sample_lengths=lengths)
    assert any(r.startswith("over a run of 30 steps padded to") for r in p.reasons)


def test_training_arguments_drive_a_trainer(tmp_path):
    from transformers import AutoModelForCausalLM, Trainer

    texts = ["the quick brown fox jumps over the lazy dog"] * 16
    tok = data.build_tokenizer(texts, vocab_size=300)
    p = plan(tiny_llama(vocab_size=len(tok)), "cpu", seq_len=32, effective_batch=4)
    assert p.gpu.source == "host" and p.precision == "32-true"
    args = p.training_arguments(str(tmp_path), max_steps=2, report_to=[], logging_steps=1)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 4
    dataset = data.tokenize(texts, tok, seq_len=32, packing=False)
    model = AutoModelForCausalLM.from_config(tiny_llama(vocab_size=len(tok)))
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=lambda batch: data.collate(batch, tok.pad_token_id))
    assert trainer.train().global_step == 2
    gpu_plan = plan("distilgpt2", "rtx3060", seq_len=128)
    cpu_args = gpu_plan.training_arguments(str(tmp_path), use_cpu=True, bf16=False)
    assert cpu_args.per_device_train_batch_size == gpu_plan.batch_size


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(effective_batch=0), ConfigError, "effective_batch must be"),
    (dict(method="dora"), ConfigError, "method must be"),
    (dict(margin=0.7), ConfigError, "margin"),
    (dict(seq_len=4096), ConfigError, "beyond"),
])
def test_bad_input_gets_one_line(kwargs, error, fragment):
    with pytest.raises(error) as err:
        plan("distilgpt2", "rtx3060", **kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(GpuError):
        plan("distilgpt2", "rtx9090")


def test_fit_table_lists_every_model_or_why_not():
    rows = planner.fit_table("rtx4060-laptop", seq_len=512,
                             names=["distilgpt2", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.1-70B"])
    by_name = {r["model"]: r for r in rows}
    assert by_name["distilgpt2"]["fits"] and by_name["distilgpt2"]["method"] == "full"
    assert by_name["meta-llama/Llama-3.2-1B"]["fits"]
    big = by_name["meta-llama/Llama-3.1-70B"]
    assert not big["fits"] and big["binding"].startswith("full fine-tuning: its weights, gradients and AdamW state")
    assert big["ways_out"][-1].startswith("cards that would do:") and big["reason"].endswith(big["ways_out"][-1])


def test_throughput_model_orders_what_it_should():
    from autofit import model
    from autofit.sim.simulate import StepConfig

    spec, card = model.resolve("TinyLlama/TinyLlama-1.1B-Chat-v1.0"), gpu.resolve("rtx3060")
    speed = lambda **kw: planner.throughput(spec, StepConfig(**kw), card, batch_size=4, seq_len=512, grad_accum=4,
                                            trainable=10**6).tokens_per_second
    assert speed(method="lora") > speed(method="lora", gradient_checkpointing=True)  # recomputation costs
    assert speed(method="lora") > speed(method="qlora", quantization="4bit")  # dequantization costs
    assert speed(method="lora") > speed(method="full")  # no weight gradients
    big = planner.throughput(spec, StepConfig(method="lora"), card, batch_size=8, seq_len=512, grad_accum=2,
                             trainable=10**6).tokens_per_second
    assert big > speed(method="lora")  # fuller micro-batches use the card better


@pytest.mark.parametrize("key, share", [
    ("rtx3060", 1.0), ("rtx4060-laptop", 1.0), ("rtx2080ti", 1.0), ("gtx1080", 0.9), ("gtx1660ti", 0.9),
    ("p100", 0.9), ("t4", 0.37), ("v100-16gb", 0.68), ("a100-80gb", 0.8), ("h100-sxm", 0.8), ("l40s", 0.8),
])
def test_cards_are_ranked_by_what_they_sustain(key, share):
    assert planner.sustained_share(gpu.resolve(key)) == share


def test_a_t4_does_not_outrun_an_rtx3060():
    """Peak figures put a T4 (65 TFLOPS) at 2.5x an RTX 3060 (25.5); sustained, the 70 W T4 is the slower."""
    from autofit import model
    from autofit.sim.simulate import StepConfig

    spec = model.resolve("gpt2")
    speed = {key: planner.throughput(spec, StepConfig(method="full"), gpu.resolve(key), batch_size=8, seq_len=1024,
                                     grad_accum=2, trainable=spec.total_params).tokens_per_second
             for key in ("t4", "rtx3060")}
    assert 0.8 < speed["t4"] / speed["rtx3060"] < 1.0


def test_the_cpu_is_timed_by_its_own_measured_rates(monkeypatch):
    from autofit import model
    from autofit.sim.simulate import StepConfig

    spec, host = model.resolve("distilgpt2"), gpu.host_memory()
    cfg = StepConfig(method="full", precision="fp32", device="cpu")

    def tokens_per_second(tflops, bandwidth):
        monkeypatch.setattr(gpu, "host_speed", lambda: gpu.HostSpeed(matmul_tflops=tflops, bandwidth_gbs=bandwidth,
                                                                      threads=2, source="measured"))
        return planner.throughput(spec, cfg, host, batch_size=4, seq_len=128, grad_accum=1,
                                  trainable=spec.total_params).tokens_per_second

    slow, fast = tokens_per_second(0.05, 20.0), tokens_per_second(0.10, 40.0)
    assert fast == pytest.approx(2 * slow, rel=1e-3)  # every term but the per-layer dispatch scales with the rates
    # 6 FLOP per weight and token (forward and backward) plus attention, at HOST_STEP_EFFICIENCY of the matmul rate
    assert 50 < slow < 150


def test_lora_config_reads_the_weight_layout_from_the_model_it_wraps():
    import warnings

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_gpt2

    gpt2_plan = plan(tiny_gpt2(), "4GiB", method="lora", seq_len=64)
    net = AutoModelForCausalLM.from_config(tiny_gpt2())
    assert gpt2_plan.lora_config().fan_in_fan_out is False  # without the model, peft's default
    assert gpt2_plan.lora_config(net).fan_in_fan_out is True  # GPT-2's Conv1D stores weights transposed
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # peft warns when it has to correct the layout itself
        get_peft_model(net, gpt2_plan.lora_config(net))
    llama_plan = plan(tiny_llama(), "4GiB", method="lora", seq_len=64)
    assert llama_plan.lora_config(AutoModelForCausalLM.from_config(tiny_llama())).fan_in_fan_out is False


def test_full_fine_tuning_with_16_bit_weights_comes_before_lora_and_says_what_it_costs():
    # with fp32 weights SmolLM2-135M does not fit a micro-batch of 4 on 3.25 GiB; with bf16 weights, gradients and
    # AdamW states it does: full fine-tuning in bf16-true is the strongest that fits a useful micro-batch
    card = dataclasses.replace(gpu.resolve("3.25GiB"), bf16=True, compute_capability=(8, 6))  # an Ampere card
    p = plan("HuggingFaceTB/SmolLM2-135M", card, seq_len=512)
    assert (p.method, p.precision, p.batch_size) == ("full", "bf16-true", 4)
    assert "full fine-tuning in bf16-true chosen: the strongest method that fits a micro-batch of 4 or more" in p.reasons
    assert planner._SIXTEEN_BIT_TRADE in p.reasons
    args = p.training_arguments("out", use_cpu=True)
    assert (args.bf16, args.fp16) == (False, False)  # no autocast: the model is loaded in bf16 instead


def test_a_model_loaded_in_bf16_is_planned_as_loaded():
    import torch
    from transformers import AutoModelForCausalLM

    module = AutoModelForCausalLM.from_config(tiny_llama(), dtype=torch.bfloat16)
    p = plan(module, "rtx3060", seq_len=64, method="full")
    assert p.precision == "bf16-true" and p.estimate.config.precision == "bf16-true"
    assert any("the model was loaded with 16-bit weights" in r for r in p.reasons)
    assert all(q.dtype == torch.bfloat16 for q in module.parameters())  # planning never touches the model
    fp32 = plan(AutoModelForCausalLM.from_config(tiny_llama()), "rtx3060", seq_len=64, method="full")
    assert fp32.precision == "bf16-mixed"


def test_a_plan_turns_on_expandable_segments_where_the_run_fits_only_with_them():
    p = plan("distilgpt2", "rtx3060", reserved_by_others=0)  # a headless card
    assert p.expandable_segments and (p.batch_size, p.grad_accum) == (4, 4)
    assert any(r.startswith("expandable segments on (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True): the run "
                            "fits only with them") for r in p.reasons)
    assert "export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in p.summary()
    assert p.run.expandable_segments and p.required_bytes <= p.budget_bytes
    again = Plan.from_json(p.to_json())
    assert again.run == p.run and again.required_bytes == p.required_bytes
# -- the first run: the CPU, the largest micro-batch, the evaluation batch -----------------------------------------------
def test_without_a_gpu_plan_uses_the_cpu_and_says_so(monkeypatch):
    monkeypatch.setattr(gpu, "detect", lambda: [])
    p = plan(tiny_llama(), None, seq_len=64)
    host = gpu.host_memory()
    assert p.gpu.source == "host" and p.precision == "32-true"
    assert any(r.startswith("no CUDA GPU detected: planned for this machine's CPU and RAM") for r in p.reasons)
    # half the RAM available, not all of it; the default effective batch does not grow to fill it
    assert abs(p.budget_bytes - host.free_bytes // 2) < 256 * 2**20
    assert p.effective_batch == 16
    assert p.reasons[0].startswith("effective batch 16: the default; on a CPU a larger micro-batch runs no faster")
    text = str(p)
    assert "RAM budget" in text and "nvidia-smi" not in text and "CUDA context" not in text
    assert planner._SIXTEEN_BIT_TRADE not in p.reasons  # fp32 weights: nothing rounds away


def test_largest_batch_is_exact(grid):
    """The largest micro-batch that fits, whatever the effective batch: it fits when simulated exactly, one more does
    not. On a 20 GB RTX 3080, 8 x 2 accumulation is planned and 16 does not fit, yet 14 does."""
    from autofit import memory, model

    spec = model.resolve("distilgpt2")
    at_1024 = plan("distilgpt2", "rtx3080-20gb")
    for p in (at_1024, grid[("distilgpt2", "rtx3060")], grid[("distilgpt2", "rtx3080-20gb")]):

        kept = planner._available(p.gpu) - p.budget_bytes  # the budget's own margin

        def need(b):  # as the planner counts it: with the estimate's uncertainty beyond the budget's margin
            est = memory.simulate_point(spec, p.step_config, batch_size=b, seq_len=p.seq_len,
                                        eval_batch_size=p.eval_batch_size)
            return est.required_bytes + max(0, memory.uncertainty_bytes(est) - kept)

        assert need(p.largest_batch) <= p.budget_bytes < need(p.largest_batch + 1), p.gpu.name
        assert p.largest_batch >= p.batch_size
    assert (at_1024.batch_size, at_1024.grad_accum, at_1024.largest_batch) == (8, 2, 14)
    assert ("micro-batch 8 x 2 accumulation = effective batch 16; bound by memory (micro-batch 16 would not fit); the "
            "largest micro-batch that fits is 14 (effective_batch='max' takes it)") in at_1024.reasons
    assert "micro-batch          8 x 1024 tokens (the largest that fits: 14)" in str(at_1024)


def test_effective_batch_max_takes_the_largest_micro_batch(grid):
    planned = grid[("distilgpt2", "rtx3080-20gb")]
    p = plan("distilgpt2", "rtx3080-20gb", seq_len=512, effective_batch="max")
    assert (p.batch_size, p.grad_accum, p.effective_batch) == (planned.largest_batch, 1, planned.largest_batch)
    assert p.estimate.batch_size == p.batch_size and p.estimate.required_bytes <= p.budget_bytes
    assert p.reasons[0] == (f"effective batch {p.batch_size}: the largest micro-batch that fits, one step each, as "
                            "effective_batch='max' asked")
    with pytest.raises(ConfigError, match="'max'"):
        plan("distilgpt2", "rtx3080-20gb", effective_batch="most")


def test_eval_batch_can_be_set(grid):
    p = plan("distilgpt2", "rtx3060", seq_len=512, eval_batch_size=3)
    assert p.eval_batch_size == 3 and p.estimate.eval_batch_size == 3
    assert p.training_arguments("out", use_cpu=True, bf16=False).per_device_eval_batch_size == 3
    with pytest.raises(ConfigError, match="eval_batch_size"):
        plan("distilgpt2", "rtx3060", eval_batch_size=0)


def test_reasons_quote_the_chosen_micro_batch(grid):
    import re

    for (model_name, card), p in grid.items():
        for reason in p.reasons:
            if reason.startswith("gradient checkpointing"):
                quoted = re.findall(r"at micro-batch (\d+),|than micro-batch (\d+) gains", reason)
                assert all(int(a or b) == p.batch_size for a, b in quoted), (model_name, card, reason)


def test_a_display_allowance_is_stated_and_can_be_overridden(grid):
    p = grid[("distilgpt2", "rtx3060")]
    assert ("512.0 MiB of the card assumed held by the display and desktop programs (a desktop GeForce card usually "
            "drives the screen); pass reserved_by_others=0 for a headless card, or what nvidia-smi shows in use"
            in p.reasons)
    assert planner.budget(gpu.with_reserved_by_others(gpu.resolve("rtx3060"), 0)) == p.budget_bytes + 512 * 2**20
    assert not any("display" in r for r in grid[("distilgpt2", "rtx4060-laptop")].reasons)


def test_a_card_given_by_size_plans_fp16_unless_told(grid):
    p = plan("distilgpt2", "8GiB", seq_len=256, effective_batch=4)
    assert p.precision == "16-mixed"
    assert ("precision 16-mixed (a card given only by its size is assumed to lack bf16; pass precision='bf16-mixed' "
            "if it has it, as Ampere and newer cards do)") in p.reasons
    assert plan("distilgpt2", "8GiB", seq_len=256, effective_batch=4, precision="bf16").precision == "bf16-mixed"


def test_the_summary_is_the_plan_and_explains_the_peak(grid):
    p = grid[("distilgpt2", "rtx3060")]
    assert str(p) == p.summary() and len(repr(p)) < 250
    assert repr(p).startswith("Plan(distilbert/distilgpt2 on NVIDIA GeForce RTX 3060: full, micro-batch")
    text = str(p)
    assert f"    at the peak ({p.estimate.where}):" in text
    # full fine-tuning's gradients are freed by zero_grad and not yet back at the peak: say so, with their size
    assert p.estimate.gradients == 0 and p.gradient_bytes == 4 * 81_912_576
    assert ("none yet: last step's were freed by zero_grad and backward has not reached this step's "
            "(312.5 MiB once all exist)") in text
    assert sum(p.peak_parts().values()) == p.estimate.required_bytes
    # what the allocator would cache with memory to spare is shown only where this card has that memory
    e = p.estimate
    spare = p.gpu.total_bytes - p.gpu.used_by_others_bytes
    roomy = planner.replace(p, estimate=planner.replace(e, peak_reserved=spare - e.cuda_context, device_total=spare))
    assert f"up to {planner.fmt_bytes(spare - e.cuda_context)} reserved, {planner.fmt_bytes(spare)} in nvidia-smi" in \
        str(roomy)
    tight = planner.replace(p, estimate=planner.replace(e, peak_reserved=spare, device_total=spare + e.cuda_context))
    assert "in nvidia-smi" not in str(tight)
    assert ("(the allocator caches what the card has room for and releases cached blocks before it would fail)"
            in str(tight))


def test_checkpointing_is_chosen_on_the_settled_micro_batch_not_the_fast_models():
    # on 2 GB the fast model puts LoRA without checkpointing at micro-batch 2; simulated exactly it fits only 1, and
    # with checkpointing micro-batch 2 fits the run: the plan must end on the faster of the two settled setups
    p = plan("distilgpt2", "2GB", seq_len=512, reserved_by_others=0)
    without = plan("distilgpt2", "2GB", seq_len=512, reserved_by_others=0, gradient_checkpointing=False, method="lora")
    assert (p.method, p.gradient_checkpointing, p.batch_size, p.grad_accum) == ("lora", True, 2, 8)
    assert (without.batch_size, without.grad_accum) == (1, 16)
    assert p.tokens_per_second > without.tokens_per_second
    assert any(r.startswith("gradient checkpointing on: ") and r.endswith(
        "without it once simulated exactly and checked against the run (micro-batch 1)") for r in p.reasons)
    assert not any(r.startswith("gradient checkpointing off") for r in p.reasons)
    assert p.required_bytes <= p.budget_bytes


@pytest.mark.parametrize("size", ["1.75GB", "2.25GB", "2.5GB"])
def test_the_chosen_checkpointing_setting_is_never_slower_than_the_other_once_settled(size):
    p = plan("distilgpt2", size, seq_len=512, reserved_by_others=0, method="lora")
    other = plan("distilgpt2", size, seq_len=512, reserved_by_others=0, method="lora",
                 gradient_checkpointing=not p.gradient_checkpointing)
    assert p.tokens_per_second >= other.tokens_per_second


def test_a_method_chosen_for_a_useful_micro_batch_says_so_when_settling_takes_it_below():
    # on an Ampere 3 GiB card the fast model fits SmolLM2-135M's full bf16-true fine-tuning at micro-batch 4; the
    # run fits 2. LoRA does not reach 4 either, so full fine-tuning stays, and the reason says what happened
    card = dataclasses.replace(gpu.resolve("3GiB"), bf16=True, compute_capability=(8, 6))
    p = plan("HuggingFaceTB/SmolLM2-135M", card, seq_len=512)
    assert (p.method, p.precision, p.batch_size) == ("full", "bf16-true", 2)
    assert ("full fine-tuning in bf16-true chosen: the strongest method that fits; it settles at micro-batch 2 "
            "(simulated exactly and checked against the run), and no lighter method reaches 4 either") in p.reasons
    assert not any("fits a micro-batch of 4 or more" in r for r in p.reasons)
    lora = plan("HuggingFaceTB/SmolLM2-135M", card, seq_len=512, method="lora")
    assert lora.batch_size < 4
