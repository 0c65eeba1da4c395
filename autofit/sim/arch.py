"""Architectures on the ``meta`` device: what the simulation engine needs to know about a model and how it builds one.

``ModelSpec`` describes an architecture (its config, shape and exact parameter counts); ``build`` makes a causal-LM of a
config on ``meta`` (no memory, no weights), ``with_layers`` cuts its depth, ``apply_lora`` adds peft adapters.
Resolving a user's model reference to a ``ModelSpec`` is the public layer's job (``autofit.model``).
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from autofit.errors import ConfigError, ModelError

# peft has no default LoRA targets for these architectures; these are the attention projections peft's own
# examples adapt for them (Phi-3 fuses q, k and v into one projection).
_EXTRA_LORA_TARGETS = {"phi3": ("qkv_proj",)}


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    """An architecture autofit can plan for: its config, shape and exact parameter counts.

    ``total_params`` is ``non_layer_params + num_layers * layer_params`` exactly (decoder layers are identical).
    """

    name: str
    config: object  # transformers.PretrainedConfig; read-only by convention
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None
    sliding_window: int | None
    tied_embeddings: bool
    total_params: int
    layer_params: int
    non_layer_params: int
    lora_targets: tuple[str, ...]
    source: str  # "catalog", "config", "directory", "hf-cache" or "module"
    module: nn.Module | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "head_dim", "vocab_size", "total_params"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.non_layer_params + self.num_layers * self.layer_params != self.total_params:
            raise ValueError("total_params must equal non_layer_params + num_layers * layer_params")

    @property
    def fingerprint(self) -> str:
        """A stable digest of the architecture (name and config), for caching simulations."""
        text = self.name + self.config.to_json_string(use_diff=False)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def check_seq_len(self, seq_len: int) -> None:
        """Raises ConfigError when ``seq_len`` exceeds the model's positions."""
        if seq_len <= 0:
            raise ConfigError(f"sequence length must be positive; got {seq_len}")
        if self.max_positions is not None and seq_len > self.max_positions:
            raise ConfigError(
                f"sequence length {seq_len} is beyond {self.name}'s {self.max_positions} positions; "
                f"use a sequence length of {self.max_positions} or less (seq_len, --seq-len)"
            )


def with_layers(config, num_layers: int):
    """A copy of ``config`` with ``num_layers`` decoder layers (per-layer lists such as ``layer_types`` cut to fit)."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = num_layers
    for key in ("layer_types",):
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) > num_layers:
            setattr(config, key, list(values[:num_layers]))
    return config


def build(config, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal-LM model of ``config`` on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as err:
            raise ModelError(f"transformers cannot build a causal LM from this config: {err}") from None


def lora_targets(model_type: str) -> tuple[str, ...]:
    """peft's default LoRA target modules for ``model_type``."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    targets = defaults.get(model_type) or _EXTRA_LORA_TARGETS.get(model_type)
    return tuple(targets) if targets else ()


def apply_lora(
    model: nn.Module, *, r: int, alpha: int, dropout: float, targets: tuple[str, ...], device: str = "meta"
) -> nn.Module:
    """``model`` with peft LoRA adapters created on ``device`` (fp32, as peft makes them)."""
    from peft import LoraConfig, get_peft_model

    if r <= 0:
        raise ConfigError(f"LoRA rank must be positive; got {r}")
    if not targets:
        raise ModelError("no LoRA target modules known for this architecture; pass them (lora_targets, --lora-targets a,b)")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=peft_targets(targets),
                        task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device(device):
                return get_peft_model(model, config)
        except ValueError as err:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                            if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"})
            raise ModelError(
                f"LoRA targets {','.join(targets)} do not match this model ({str(err).splitlines()[0]}); "
                f"its linear layers are: {','.join(names)}"
            ) from None


ALL_LINEAR = "all-linear"  # peft's name for every linear layer but the output head


def peft_targets(targets: tuple[str, ...]):
    """``targets`` as peft's ``LoraConfig`` takes them: a list of module names, or peft's ``"all-linear"``."""
    return ALL_LINEAR if tuple(targets) == (ALL_LINEAR,) else list(targets)


def unique_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of ``model``, each once even when tied."""
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
