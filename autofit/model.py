"""Model references resolved to architectures on the ``meta`` device, with exact parameter counts.

A model reference is an ``nn.Module`` (a transformers model, never modified), a ``PretrainedConfig``, a local
directory holding a ``config.json``, a repo id found in the local Hugging Face cache, or a name from autofit's built-in
catalog of well-known configs (``autofit/configs``). Nothing is downloaded and no weights are read: the architecture is
enough to plan.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import logging
import os
from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from autofit import validate
from autofit.errors import ConfigError, ModelError
from autofit.sim import kbit
from autofit.sim.arch import (ModelSpec, apply_lora, build, lora_targets, stack_depths, task_name, unique_params,
                               with_layers)

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True, kw_only=True, slots=True)
class ParamCounts:
    """Parameter counts of a model as one fine-tuning method loads it; tied weights count once."""

    total: int
    trainable: int
    by_dtype: Mapping[str, int]  # dtype name -> parameters stored in it ("nf4"/"int8" for quantized weights)

    def __post_init__(self) -> None:
        if not 0 <= self.trainable <= self.total:
            raise ValueError(f"trainable must lie in [0, total]; got trainable={self.trainable} total={self.total}")
        if sum(self.by_dtype.values()) != self.total:
            raise ValueError(f"by_dtype must sum to total={self.total}; got {dict(self.by_dtype)}")


# -- the built-in catalog ----------------------------------------------------------------------------------------------
@functools.cache
def _catalog() -> dict[str, dict]:
    entries = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        entry = json.loads(path.read_text())
        entries[entry["name"]] = entry
    return entries


def _catalog_index() -> dict[str, str]:
    index = {}
    for name, entry in _catalog().items():
        for key in (name, name.split("/")[-1], *entry.get("aliases", ())):
            index.setdefault(key.lower(), name)
    return index


def catalog_names() -> list[str]:
    """Repo ids of every model in the built-in catalog, smallest first."""
    return sorted(_catalog(), key=lambda n: _catalog()[n]["params"])


def _config_from_dict(data: dict):
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


# -- resolving references ----------------------------------------------------------------------------------------------
def resolve(ref, task: str | None = None, target_len: int | None = None) -> ModelSpec:
    """The ``ModelSpec`` of a model reference (see the module docstring), with the head ``task`` names (see
    ``autofit.sim.arch.TASKS``; None: the architecture's own) and, for an encoder-decoder, the ``target_len`` of its
    batches (None: the source length). Raises ``ModelError`` or ``ConfigError``."""
    if target_len is not None:
        validate.integer("target_len", target_len, low=1, high=validate.MAX_SEQ_LEN)
        spec = resolve(ref, task)
        if spec.task != "seq2seq-lm":
            raise ConfigError(f"{spec.name} is not an encoder-decoder; --target-len applies to seq2seq models "
                              "(T5, BART) only")
        spec.check_seq_len(target_len)
        return dataclasses.replace(spec, target_len=target_len)
    if task is not None:
        spec = resolve(ref)
        if spec.source == "module":
            task = _module_task(spec.module, task)
        canonical = task_name(task, spec.config)
        return spec if canonical == spec.task else _spec(spec.name, spec.config, source=spec.source,
                                                         module=spec.module, task=canonical)
    from transformers import PretrainedConfig

    if isinstance(ref, ModelSpec):
        return ref
    if isinstance(ref, nn.Module):
        config = getattr(ref, "config", None)
        if not isinstance(config, PretrainedConfig):
            raise ModelError(
                f"cannot plan for a {type(ref).__name__} without a transformers config; "
                "pass a transformers model, its config, or a model name"
            )
        name = getattr(config, "_name_or_path", "") or type(ref).__name__
        return _spec(name, copy.deepcopy(config), source="module", module=ref, task=_module_task(ref))
    if isinstance(ref, PretrainedConfig):
        return _spec(getattr(ref, "_name_or_path", "") or ref.model_type, copy.deepcopy(ref), source="config")
    if not isinstance(ref, (str, os.PathLike)):
        raise ModelError(f"cannot read a model reference of type {type(ref).__name__}; pass a name, path or model")
    validate.model_ref(ref)
    text = os.fspath(ref).strip()
    if not text:
        raise ModelError("empty model name; pass a model name such as distilgpt2, or a directory with config.json")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json; point at the model's directory")
        return _spec(text, _load_config(path / "config.json"), source="directory")
    if path.suffix == ".json" and path.is_file():
        return _spec(path.stem, _load_config(path), source="directory")
    cached = _from_hf_cache(text)
    if cached is not None:
        return _spec(text, cached, source="hf-cache")
    canonical = _catalog_index().get(text.lower())
    if canonical is not None:
        entry = _catalog()[canonical]
        return _spec(canonical, _config_from_dict(entry["config"]), source="catalog")
    close = difflib.get_close_matches(text.lower(), list(_catalog_index()), n=3, cutoff=0.5)
    hint = f"closest: {', '.join(close)}; " if close else ""
    raise ModelError(
        f"unknown model {text!r} (not a local directory, not in the Hugging Face cache, not in autofit's catalog); "
        f"{hint}run 'autofit models' for the catalog or pass a directory with config.json"
    )


_MODULE_TASKS = (("ForConditionalGeneration", "seq2seq-lm"), ("ForSeq2SeqLM", "seq2seq-lm"),
                 ("ForSequenceClassification", "sequence-classification"),
                 ("ForTokenClassification", "token-classification"), ("ForCausalLM", "causal-lm"),
                 ("LMHeadModel", "causal-lm"))


def _module_task(module: nn.Module, task: str | None = None) -> str | None:
    """The task a transformers model's class is built for (``BertForTokenClassification``: token-classification);
    ``task`` when the class does not say."""
    name = type(module.get_base_model() if hasattr(module, "get_base_model") else module).__name__
    for suffix, found in _MODULE_TASKS:
        if name.endswith(suffix):
            return found
    return task


def _load_config(path: Path):
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ModelError(f"cannot read {path}: {err.strerror}; check its permissions") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelError(f"{path} is not valid JSON ({str(err).splitlines()[0][:120]}); fix or replace it") from None
    validate.config_data(data, str(path))
    try:
        return _config_from_dict(data)
    except KeyError as err:
        raise ModelError(f"{path}: transformers does not know model_type {data['model_type']!r} ({err})") from None
    except Exception as err:  # noqa: BLE001 - transformers' own checks of a config raise many types; one line each
        lines = str(err).strip().splitlines() or [type(err).__name__]
        why = " ".join(line.strip() for line in lines[:2])
        raise ModelError(f"{path}: transformers rejects this config ({why[:160]}); fix it, or pass a catalog name "
                         "(autofit models)") from None


def _from_hf_cache(repo_id: str):
    """The config of ``repo_id`` from the local Hugging Face cache, or None; never touches the network."""
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # a malformed id, or no cache at all
        return None
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    return _load_config(Path(path))


# -- building on meta and counting ---------------------------------------------------------------------------------
def _shape(config) -> dict:
    get = functools.partial(getattr, config)
    hidden = get("hidden_size")
    heads = get("num_attention_heads")
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
             or getattr(config, "d_ff", None) or getattr(config, "encoder_ffn_dim", None) or 4 * hidden)
    # T5 has relative positions and no limit of its own; BART learns max_position_embeddings of them
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return dict(
        hidden_size=hidden, num_heads=heads, num_kv_heads=kv, head_dim=head_dim, intermediate_size=inter,
        vocab_size=get("vocab_size"), max_positions=positions,
    )


def _spec(name: str, config, *, source: str, module: nn.Module | None = None, task: str | None = None) -> ModelSpec:
    from transformers import AutoModelForCausalLM  # noqa: F401  (import errors surface here, not mid-plan)

    validate.model_config(config, name)
    task = task_name(task, config)
    try:
        shape = _shape(config)
        num_layers = config.num_hidden_layers
        if task == "seq2seq-lm":
            encoder, decoder = stack_depths(config)
            if encoder != decoder:
                raise ModelError(f"{name} has {encoder} encoder and {decoder} decoder layers; autofit plans "
                                 "encoder-decoder models whose stacks have the same depth (T5, BART)")
            num_layers = decoder
    except AttributeError as err:
        raise ModelError(f"{name}: config lacks {err.name}; autofit plans decoder-only language models, "
                         "encoder-decoders and encoders with task heads") from None
    counts = [_count_full(config, n, task) for n in (1, 2)]
    layer_params = counts[1] - counts[0]
    non_layer = counts[0] - layer_params
    window = getattr(config, "sliding_window", None)
    if not getattr(config, "use_sliding_window", True):
        window = None
    return ModelSpec(
        name=name,
        config=config,
        model_type=config.model_type,
        num_layers=num_layers,
        sliding_window=window,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        total_params=non_layer + num_layers * layer_params,
        layer_params=layer_params,
        non_layer_params=non_layer,
        lora_targets=lora_targets(config.model_type),
        source=source,
        module=module,
        task=task,
        **shape,
    )


def _count_full(config, num_layers: int, task: str = "causal-lm") -> int:
    model = build(with_layers(config, num_layers), task=task)
    return sum(p.numel() for p in unique_params(model))


def count_params(
    spec: ModelSpec,
    *,
    method: str = "full",
    quantization: str = "none",
    half: torch.dtype = torch.bfloat16,
    lora_r: int = 16,
    lora_targets: tuple[str, ...] | None = None,
) -> ParamCounts:
    """Exact parameter counts of ``spec`` as ``method`` loads it (full: fp32; lora: 16-bit base, fp32 adapters;
    quantized: linear layers in 4 or 8 bits, the rest fp32 as ``prepare_model_for_kbit_training`` leaves them)."""
    targets = tuple(lora_targets) if lora_targets else spec.lora_targets
    key = (spec.fingerprint, method, quantization, half, lora_r, targets)
    if key in _COUNTS:
        return _COUNTS[key]
    per_depth = [_count_method(spec, n, method, quantization, half, lora_r, targets) for n in (1, 2)]
    depth = spec.num_layers
    merged: dict[str, int] = {}
    for dtype in set(per_depth[0][2]) | set(per_depth[1][2]):
        a, b = per_depth[0][2].get(dtype, 0), per_depth[1][2].get(dtype, 0)
        merged[dtype] = a + (b - a) * (depth - 1)
    total = per_depth[0][0] + (per_depth[1][0] - per_depth[0][0]) * (depth - 1)
    trainable = per_depth[0][1] + (per_depth[1][1] - per_depth[0][1]) * (depth - 1)
    counts = ParamCounts(total=total, trainable=trainable, by_dtype=MappingProxyType({k: v for k, v in merged.items() if v}))
    _COUNTS[key] = counts
    return counts


_COUNTS: dict[tuple, ParamCounts] = {}


def _count_method(spec, num_layers, method, quantization, half, lora_r, targets) -> tuple[int, int, dict[str, int]]:
    config = with_layers(spec.config, num_layers)
    if method == "full":
        model = build(config, dtype=torch.float32, task=spec.task)
    else:
        model = build(config, dtype=half, task=spec.task)
        if quantization != "none":
            kbit.quantize_linears(model, quantization, compute_dtype=half)
            kbit.upcast_non_quantized(model)
        for p in model.parameters():
            p.requires_grad_(False)
        model = apply_lora(model, r=lora_r, alpha=2 * lora_r, dropout=0.0, targets=targets, task=spec.task)
    total = trainable = 0
    by_dtype: dict[str, int] = {}
    for p in unique_params(model):
        n = kbit.logical_numel(p)
        key = kbit.storage_name(p)
        total += n
        by_dtype[key] = by_dtype.get(key, 0) + n
        if p.requires_grad:
            trainable += n
    return total, trainable, by_dtype
