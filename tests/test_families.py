"""Encoder-decoders (T5, BART) and encoders with task heads (BERT, RoBERTa, DeBERTa-v3): the same step simulation,
checked byte for byte against real CPU runs of tiny configs, and depth extrapolated where the layers repeat."""

import itertools

import pytest

from autofit import memory, model
from autofit.errors import ConfigError, ModelError
from autofit.sim import simulate
from autofit.sim.simulate import StepConfig
from tests.conftest import tiny_bart, tiny_bert, tiny_t5

FAMILIES = {
    "t5": (tiny_t5, None, "seq2seq-lm"),
    "bart": (tiny_bart, None, "seq2seq-lm"),
    "bert-classification": (tiny_bert, None, "sequence-classification"),
    "bert-token": (tiny_bert, "token-classification", "token-classification"),
    "roberta": (lambda: tiny_bert(model_type="roberta"), "classification", "sequence-classification"),
    "deberta-v2": (lambda: tiny_bert(model_type="deberta-v2"), None, "sequence-classification"),
}
CASES = list(itertools.product(["full", "lora"], [False, True], ["32-true", "bf16-mixed"]))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method, checkpointing, precision", CASES)
def test_real_and_fake_steps_peak_at_the_same_byte(family, method, checkpointing, precision):
    make, task, expected = FAMILIES[family]
    spec = model.resolve(make(), task=task, target_len=24 if expected == "seq2seq-lm" else None)
    assert spec.task == expected
    cfg = StepConfig(method=method, gradient_checkpointing=checkpointing, precision=precision, device="cpu")
    real = simulate.run(spec, cfg, batch_size=2, seq_len=32, fake=False)
    fake = simulate.run(spec, cfg, batch_size=2, seq_len=32, fake=True)
    assert real.peak() == fake.peak()
    assert real.step_peaks == fake.step_peaks


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_a_quantized_t5_keeps_its_fp32_feed_forward_output_and_steps_real_as_fake(quantization):
    spec = model.resolve(tiny_t5(), target_len=16)
    cfg = StepConfig(method="qlora", quantization=quantization, precision="bf16", device="cpu")
    real = simulate.run(spec, cfg, batch_size=2, seq_len=32, fake=False)
    fake = simulate.run(spec, cfg, batch_size=2, seq_len=32, fake=True)
    assert real.peak() == fake.peak()
    net = simulate.build_model(spec, cfg, 2)
    wo = [m for n, m in net.named_modules() if n.endswith("DenseReluDense.wo")]
    assert wo and all(type(m).__name__ == "Linear" for m in wo)  # transformers leaves _keep_in_fp32_modules out


def test_the_target_length_is_the_decoders():
    short, long = (simulate.run(model.resolve(tiny_t5(), target_len=n), StepConfig(device="cpu"), batch_size=2,
                                seq_len=32) for n in (8, 64))
    assert short.peak() < long.peak()
    # the source length alone sets the encoder: the same target, a longer source, a higher peak
    longer_source = simulate.run(model.resolve(tiny_t5(), target_len=8), StepConfig(device="cpu"), batch_size=2,
                                 seq_len=64)
    assert longer_source.peak() > short.peak()


def test_a_classifier_has_no_vocabulary_sized_logits():
    cls = simulate.run(model.resolve(tiny_bert()), StepConfig(device="cpu"), batch_size=2, seq_len=32)
    token = simulate.run(model.resolve(tiny_bert(), task="token"), StepConfig(device="cpu"), batch_size=2, seq_len=32)
    # 3 labels: the heads' logits are (2, 3) and (2, 32, 3) fp32 tensors, each rounded to 512 bytes
    assert 512 in cls.timeline.sizes.tolist()
    assert cls.peak() != token.peak()


@pytest.mark.parametrize("make", [tiny_bert, lambda layers: tiny_bert(layers, model_type="deberta-v2")])
@pytest.mark.parametrize("cfg", [StepConfig(), StepConfig(method="lora", gradient_checkpointing=True)])
def test_encoder_depth_extrapolates_to_a_full_depth_simulation(make, cfg):
    spec = model.resolve(make(layers=8))
    est = memory.simulate_point(spec, cfg, batch_size=2, seq_len=64)
    assert max(est.simulated_layers) < spec.num_layers
    full = simulate.run(spec, cfg, batch_size=2, seq_len=64)
    tensors = (est.weights + est.gradients + est.optimizer_state + est.activations + est.logits_and_loss
               + est.temporaries)
    assert abs(tensors - memory.device_peak(full)) <= 1024  # as for decoders: clipping's per-parameter norms


def test_encoder_decoders_are_simulated_at_full_depth():
    spec = model.resolve(tiny_t5(layers=4), target_len=32)
    est = memory.simulate_point(spec, StepConfig(), batch_size=2, seq_len=64)
    assert est.simulated_layers == (4,)
    assert est.source == "simulation"


def test_stack_depths_and_parameter_counts():
    t5 = model.resolve(tiny_t5(layers=3))
    built = model.build(model.with_layers(t5.config, 3), task="seq2seq-lm")
    assert t5.num_layers == 3
    assert t5.total_params == sum(p.numel() for p in model.unique_params(built))
    uneven = tiny_t5(layers=3)
    uneven.num_decoder_layers = 2
    with pytest.raises(ModelError, match="same depth"):
        model.resolve(uneven)
    with pytest.raises(ConfigError, match="not an encoder-decoder"):
        model.resolve(tiny_bert(), target_len=16)
    assert model.resolve(tiny_t5(), target_len=16).fingerprint != model.resolve(tiny_t5()).fingerprint


@pytest.mark.parametrize("ref, task, message", [
    (tiny_t5(), "classification", "is an encoder-decoder"),
    (tiny_bert(), "causal-lm", "is an encoder, not a causal"),
    (tiny_bert(), "summarize", "task must be one of"),
])
def test_tasks_that_do_not_apply_are_refused_in_one_line(ref, task, message):
    with pytest.raises(ConfigError, match=message) as err:
        model.resolve(ref, task=task)
    assert "\n" not in str(err.value)


def _probe_json(capsys, argv):
    import json

    from autofit.cli import main

    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_plans_an_encoder_for_classification(capsys):
    plan = _probe_json(capsys, ["probe", "bert-base-uncased", "--gpu", "rtx4060-laptop", "--task", "classification",
                                "--seq-len", "128", "--method", "full", "--gradient-checkpointing", "off"])
    assert plan["model_name"] == "google-bert/bert-base-uncased"
    assert plan["seq_len"] == 128 and plan["batch_size"] >= 1
    assert plan["batch_size"] * plan["grad_accum"] == plan["effective_batch"]


def test_seq2seq_pairs_give_a_source_and_a_target_length(tmp_path, capsys):
    import json

    from autofit import data, seq2seq

    pairs = [("translate: " + "word " * (20 + i % 50), "mot " * (5 + i % 20)) for i in range(200)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs))
    assert seq2seq.is_pairs_file(path) and seq2seq.load_pairs(path) == pairs
    folder = tmp_path / "tiny-t5"
    folder.mkdir()
    tiny_t5().save_pretrained(folder)
    data.build_tokenizer([s + " " + t for s, t in pairs]).save_pretrained(folder)
    tok = data.load_tokenizer(str(folder))
    lengths = seq2seq.choose_lengths(pairs, tok, max_positions=None)
    assert lengths.source.seq_len > lengths.target.seq_len >= 64  # rounded up to multiples of 64
    plan = _probe_json(capsys, ["probe", str(folder), "--gpu", "rtx3080-20gb", "--data", str(path),
                                "--method", "full", "--gradient-checkpointing", "off", "--effective-batch", "16"])
    assert plan["seq_len"] == lengths.source.seq_len
    with pytest.raises(Exception, match="record 2 is not a pair"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"source": "a", "target": "b"}\n{"source": "a"}\n')
        seq2seq.load_pairs(bad)


NEW_MODELS = ["t5-small", "t5-base", "google/flan-t5-base", "facebook/bart-base", "bert-base-uncased", "roberta-base",
              "microsoft/deberta-v3-base"]
THREE_CARDS = ["rtx4060-laptop", "rtx3060", "rtx3080-20gb"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW_MODELS)
def test_the_new_catalog_models_plan_on_three_cards(name):
    from autofit import planner

    spec = model.resolve(name, target_len=64 if name in NEW_MODELS[:4] else None)
    plans = [planner.plan(spec, card, seq_len=256, effective_batch=32, method="full", gradient_checkpointing=False,
                          probe=False) for card in THREE_CARDS]
    for p in plans:
        assert p.task == spec.task and p.target_len == spec.target_len and p.method == "full"
        assert p.batch_size * p.grad_accum == 32
        assert p.need_bytes <= p.budget_bytes and p.estimate.source == "simulation"
    # a bigger card never gets a smaller micro-batch
    assert [p.batch_size for p in plans] == sorted(p.batch_size for p in plans)


def test_an_encoder_whose_layers_share_relative_embeddings_is_simulated_whole():
    # DeBERTa-v3 shares its relative position embeddings across layers: layer backwards differ, no extrapolation
    spec = model.resolve(tiny_bert(layers=6, model_type="deberta-v2", relative_attention=True, position_buckets=32,
                                   norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
                                   position_biased_input=False, max_relative_positions=-1, type_vocab_size=0))
    cfg = StepConfig(device="cpu")
    est = memory.simulate_point(spec, cfg, batch_size=2, seq_len=64)
    assert est.simulated_layers == (6,)
    full = simulate.run(spec, cfg, batch_size=2, seq_len=64)
    real = simulate.run(spec, cfg, batch_size=2, seq_len=64, fake=False)
    assert est.peak_allocated == memory.device_peak(full) == real.peak()


def test_plan_reads_source_and_target_lengths_from_pairs(tmp_path):
    from autofit import data, planner

    pairs = [("question: " + "why " * (30 + i % 90), "because " * (3 + i % 40)) for i in range(100)]
    tok = data.build_tokenizer([s + " " + t for s, t in pairs])
    p = planner.plan(tiny_t5(), "rtx3060", dataset=pairs, tokenizer=tok, method="full", gradient_checkpointing=False,
                     effective_batch=8)
    from autofit import seq2seq

    lengths = seq2seq.choose_lengths(pairs, tok, max_positions=None)
    assert (p.seq_len, p.target_len) == (lengths.source.seq_len, lengths.target.seq_len)
    assert p.seq_len_source == "data" and any(r.startswith("source length") for r in p.reasons)
    assert p.estimate.source == "simulation" and p.task == "seq2seq-lm"
