"""The offline model catalog in ``autofit/configs``: every entry parses, builds and has the right size.

Each ``autofit/configs/*.json`` file holds one Hugging Face model: its published ``config.json`` content under
``config``, short ``aliases``, and ``params``, the model's total parameter count (tied embeddings counted once)
taken from a public source named in ``params_source``. These tests build the config with transformers, build
the model on the meta device (no memory, no download) and check that its parameter count equals ``params``,
so a catalog entry whose architecture fields are wrong fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers

CONFIG_DIR = Path(__file__).resolve().parents[1] / "autofit" / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.json"))

REQUIRED_KEYS = {"name", "aliases", "source", "params", "params_source", "config"}
OPTIONAL_KEYS = {"unconfirmed_fields", "params_of", "head_tied_by_transformers"}
# Which transformers class ``params`` counts, for entries that are not causal LMs (encoders are counted as their base
# model, the figure sources publish; encoder-decoders as the class their sources counted).
PARAMS_OF = {"AutoModel": transformers.AutoModel, "AutoModelForSeq2SeqLM": transformers.AutoModelForSeq2SeqLM}

# Architecture fields that must survive the trip through transformers unchanged when a config sets them.
ARCH_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
    "n_embd", "n_layer", "n_head", "n_positions",
    "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
)


def load_entry(path: Path) -> dict:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def build_config(config: dict) -> transformers.PretrainedConfig:
    """A transformers config from a Hub ``config.json`` dict, offline.

    In transformers 5.x ``AutoConfig.for_model`` takes the Hub keys as they are: ``rope_scaling`` and
    ``rope_theta`` are folded into ``config.rope_parameters`` and ``torch_dtype`` becomes ``config.dtype``.
    """
    kwargs = dict(config)
    model_type = kwargs.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **kwargs)


def build_meta_model(config: dict, params_of: str | None = None) -> torch.nn.Module:
    """The causal-LM (or the ``params_of`` class) for ``config`` with every weight on the meta device: shapes only,
    no memory."""
    cls = PARAMS_OF[params_of] if params_of else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        return cls.from_config(build_config(config))


def count_params(model: torch.nn.Module) -> int:
    # parameters() yields each Parameter once, so tied input/output embeddings count once.
    return sum(p.numel() for p in model.parameters())


def test_catalog_is_not_empty():
    assert len(CONFIG_FILES) >= 18, f"expected the catalog in {CONFIG_DIR}, found {len(CONFIG_FILES)} files"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_entry_is_well_formed(path: Path):
    entry = load_entry(path)
    assert REQUIRED_KEYS <= entry.keys(), f"missing keys: {REQUIRED_KEYS - entry.keys()}"
    assert entry.keys() <= REQUIRED_KEYS | OPTIONAL_KEYS, f"unknown keys: {entry.keys() - REQUIRED_KEYS - OPTIONAL_KEYS}"

    name = entry["name"]
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", name), name
    assert path.name == name.replace("/", "--") + ".json"
    assert entry["source"] == f"https://huggingface.co/{name}/blob/main/config.json"

    aliases = entry["aliases"]
    assert isinstance(aliases, list) and aliases, "at least one alias"
    assert all(isinstance(a, str) and a.strip() == a and a for a in aliases)
    assert len({a.lower() for a in aliases}) <= len(aliases)

    assert isinstance(entry["params"], int) and not isinstance(entry["params"], bool) and entry["params"] > 0
    assert isinstance(entry["params_source"], str) and len(entry["params_source"]) > 20

    config = entry["config"]
    assert isinstance(config, dict)
    assert isinstance(config.get("model_type"), str)
    if "params_of" in entry:
        assert entry["params_of"] in PARAMS_OF
    else:  # a causal LM's published config names its class (an encoder's need not: deberta-v3's does not)
        assert isinstance(config.get("architectures"), list) and config["architectures"]
    if "unconfirmed_fields" in entry:
        assert isinstance(entry["unconfirmed_fields"], list) and entry["unconfirmed_fields"]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_builds_and_param_count_matches(path: Path):
    entry = load_entry(path)
    config = entry["config"]

    cfg = build_config(config)
    assert cfg.model_type == config["model_type"]
    for field in ARCH_FIELDS:
        if field == "tie_word_embeddings" and "head_tied_by_transformers" in entry:
            assert cfg.tie_word_embeddings, "transformers was expected to tie this head whatever the config says"
            continue
        if field in config:
            assert getattr(cfg, field) == config[field], f"{field} did not survive: {getattr(cfg, field)!r}"
    if "sliding_window" in config and config.get("use_sliding_window", True):
        # Qwen2Config sets sliding_window to None when use_sliding_window is false: the window is off.
        assert cfg.sliding_window == config["sliding_window"]
    if config.get("rope_scaling"):
        # transformers 5.x keeps rope scaling in rope_parameters; it must not be dropped.
        for key, value in config["rope_scaling"].items():
            assert cfg.rope_parameters[key] == value, key

    model = build_meta_model(config, entry.get("params_of"))
    if "params_of" not in entry:
        assert type(model).__name__ == config["architectures"][0]
    assert all(p.device.type == "meta" for p in model.parameters())
    # the published figure counts a head that this transformers ties to the embedding (see the entry's source)
    assert count_params(model) == entry["params"] - entry.get("head_tied_by_transformers", 0), (
        f"{entry['name']}: built {count_params(model):,} parameters, catalog says {entry['params']:,}"
    )


def test_aliases_are_unique_across_the_catalog():
    owner: dict[str, str] = {}
    for path in CONFIG_FILES:
        entry = load_entry(path)
        for key in {entry["name"].lower(), *(a.lower() for a in entry["aliases"])}:
            assert key not in owner, f"{key!r} is claimed by both {owner[key]} and {entry['name']}"
            owner[key] = entry["name"]


def test_known_anchor_counts():
    by_name = {load_entry(p)["name"]: load_entry(p)["params"] for p in CONFIG_FILES}
    assert by_name["openai-community/gpt2"] == 124_439_808
    assert by_name["distilbert/distilgpt2"] == 81_912_576
    assert by_name["meta-llama/Llama-3.2-1B"] == 1_235_814_400
