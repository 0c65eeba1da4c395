import json

import pytest
import torch

from autofit import model
from autofit.errors import ConfigError, ModelError
from tests.conftest import tiny_gpt2, tiny_llama


def test_exact_counts_from_catalog_configs():
    assert model.resolve("gpt2").total_params == 124_439_808
    assert model.resolve("distilgpt2").total_params == 81_912_576
    spec = model.resolve("distilgpt2")
    assert model.count_params(spec).trainable == 81_912_576
    assert dict(model.count_params(spec).by_dtype) == {"float32": 81_912_576}


def _lora_expected(spec, r):
    """r x (d_in + d_out) for every adapted layer, from the config's shapes."""
    h, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_layer = {"q_proj": (h, q), "v_proj": (h, kv), "c_attn": (h, 3 * h)}
    return spec.num_layers * sum(r * sum(per_layer[t]) for t in spec.lora_targets)


@pytest.mark.parametrize("name, r", [("distilgpt2", 8), ("gpt2", 16), ("meta-llama/Llama-3.2-1B", 16),
                                     ("Qwen/Qwen2.5-0.5B", 32), ("meta-llama/Llama-3.1-70B", 16)])
def test_lora_counts_follow_rank_times_in_plus_out(name, r):
    spec = model.resolve(name)
    counts = model.count_params(spec, method="lora", lora_r=r)
    assert counts.trainable == _lora_expected(spec, r)
    assert counts.total == spec.total_params + counts.trainable
    assert counts.by_dtype["float32"] == counts.trainable  # peft keeps adapters in fp32
    assert counts.by_dtype["bfloat16"] == spec.total_params  # the frozen base in 16-bit


def test_explicit_lora_counts():
    # distilgpt2 adapts c_attn (768 -> 2304) in 6 layers: 6 * 8 * (768 + 2304)
    assert model.count_params(model.resolve("distilgpt2"), method="lora", lora_r=8).trainable == 147_456
    # Llama-3.2-1B: q_proj 2048 -> 2048 and v_proj 2048 -> 512 in 16 layers
    assert model.count_params(model.resolve("meta-llama/Llama-3.2-1B"), method="lora").trainable == 1_703_936


def test_counts_are_built_once_per_model_and_method(monkeypatch):
    spec = model.resolve("distilgpt2")
    first = model.count_params(spec, method="lora", lora_r=12)

    def no_build(*args, **kwargs):
        raise AssertionError("counted again")

    monkeypatch.setattr(model, "build", no_build)
    assert model.count_params(spec, method="lora", lora_r=12) is first


def test_user_lora_targets_and_unknown_target():
    spec = model.resolve("distilgpt2")
    counts = model.count_params(spec, method="lora", lora_r=4, lora_targets=("c_attn", "c_fc"))
    assert counts.trainable == 6 * 4 * ((768 + 2304) + (768 + 3072))
    with pytest.raises(ModelError) as err:
        model.count_params(spec, method="lora", lora_targets=("q_proj",))
    assert "\n" not in str(err.value) and "c_attn" in str(err.value)


def test_qlora_counts_by_storage():
    spec = model.resolve("distilgpt2")
    counts = model.count_params(spec, method="qlora", quantization="4bit", lora_r=8)
    per_layer = 768 * 2304 + 768 * 768 + 768 * 3072 + 3072 * 768  # every linear layer but the tied head
    assert counts.by_dtype["nf4"] == 6 * per_layer
    assert counts.total == spec.total_params + 147_456
    assert counts.trainable == 147_456
    norms = 6 * 2 * 2 * 768 + 2 * 768  # ln_1, ln_2 per layer and ln_f, weight and bias: fp32 (QLoRA's recipe)
    embeddings = 50257 * 768 + 1024 * 768  # stay 16-bit, as do the quantized layers' biases
    biases = 6 * (2304 + 768 + 3072 + 768)
    assert dict(counts.by_dtype) == {"nf4": 6 * per_layer, "float32": 147_456 + norms,
                                     "bfloat16": embeddings + biases}


def test_resolve_every_kind_of_reference(tmp_path, monkeypatch):
    cfg = tiny_llama(layers=3)
    from_config = model.resolve(cfg)
    assert from_config.num_layers == 3 and from_config.source == "config"
    directory = tmp_path / "my-model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(cfg.to_dict()))
    from_dir = model.resolve(str(directory))
    assert from_dir.source == "directory" and from_dir.total_params == from_config.total_params
    from transformers import AutoModelForCausalLM

    module = AutoModelForCausalLM.from_config(cfg)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    from_module = model.resolve(module)
    assert from_module.source == "module" and from_module.total_params == sum(p.numel() for p in module.parameters())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # never changed
    # the local Hugging Face cache, when a repo's config is there
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, filename: str(directory / "config.json") if repo == "me/my-model" else None)
    assert model.resolve("me/my-model").source == "hf-cache"
    assert model.resolve("distilgpt2").source == "catalog"


@pytest.mark.parametrize("ref, fragment", [
    ("gpt-5-ultra", "unknown model"), ("distilgpt", "closest: distilgpt2"), ("", "empty model name"),
])
def test_unknown_models_get_one_line(ref, fragment):
    with pytest.raises(ModelError) as err:
        model.resolve(ref)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        model.resolve(str(tmp_path))


def test_sequence_beyond_positions():
    spec = model.resolve(tiny_gpt2())
    spec.check_seq_len(128)
    with pytest.raises(ConfigError) as err:
        spec.check_seq_len(129)
    assert "use a sequence length of 128 or less (seq_len, --seq-len)" in str(err.value)


def test_depth_formula_is_exact_for_every_catalog_model():
    for name in model.catalog_names():
        spec = model.resolve(name)
        assert spec.non_layer_params + spec.num_layers * spec.layer_params == spec.total_params
