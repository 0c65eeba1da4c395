import json

import pytest

from autofit import data, gpu, planner
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
    assert again.to_dict() == p.to_dict()
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
    assert "needs" in text and "cards that would do:" in text and "\n" not in text
    assert any(key in text for key in ("a100", "h100", "h200", "l40s", "rtxa6000", "rtx6000ada"))


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
    # full fine-tuning's weights, gradients and AdamW state (1.2 GiB) take over half of a 2 GiB card's budget
    p = plan("distilgpt2", "2GiB", seq_len=1024)
    assert [r for r in requested if r[0] == "full"] == [("full", True, 1, 2), ("full", True, 1, 3)]
    assert "full fine-tuning ruled out at 1024 tokens: a micro-batch of 1 does not fit" in p.reasons
    assert p.method == "lora"


def test_a_method_that_fits_a_useful_batch_with_checkpointing_ends_the_search(monkeypatch):
    requested = _record_simulations(monkeypatch)
    p = plan("HuggingFaceTB/SmolLM2-135M", "3GiB", seq_len=512)
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


def test_training_arguments_drive_a_trainer(tmp_path):
    from transformers import AutoModelForCausalLM, Trainer

    texts = ["the quick brown fox jumps over the lazy dog"] * 16
    tok = data.build_tokenizer(texts, vocab_size=300)
    p = plan(tiny_llama(vocab_size=len(tok)), "cpu", seq_len=32, effective_batch=4)
    assert p.gpu.source == "host" and p.precision == "fp32"
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
    assert not by_name["meta-llama/Llama-3.1-70B"]["fits"] and "needs" in by_name["meta-llama/Llama-3.1-70B"]["reason"]


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
