"""Architectures on the ``meta`` device: what the simulation engine needs to know about a model and how it builds one.

``ModelSpec`` describes an architecture (its config, task head, shape and exact parameter counts); ``build`` makes the
model of a config and task on ``meta`` (no memory, no weights), ``with_layers`` cuts its depth (both stacks of an
encoder-decoder), ``apply_lora`` adds peft adapters.
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

# What a model is trained to do, which decides its head, its batch and its loss:
# - "causal-lm": a decoder-only language model (logits over the vocabulary at every position);
# - "seq2seq-lm": an encoder-decoder (T5, BART) with a source length and a target length;
# - "sequence-classification": an encoder with a head over the pooled sequence (one label per sequence);
# - "token-classification": an encoder with a head over every token (one label per token).
TASKS = ("causal-lm", "seq2seq-lm", "sequence-classification", "token-classification")
TASK_ALIASES = {"lm": "causal-lm", "causal": "causal-lm", "seq2seq": "seq2seq-lm", "classification":
                "sequence-classification", "cls": "sequence-classification", "sequence": "sequence-classification",
                "token": "token-classification", "ner": "token-classification", "tagging": "token-classification"}
# Encoder-only families: transformers has no causal-LM use for them that anyone fine-tunes, so a config of one of
# these is planned as an encoder with a sequence-classification head unless another task is asked.
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "distilbert", "electra",
                           "albert", "camembert", "mpnet", "modernbert"})
# peft's task types: they decide what get_peft_model wraps (a classification head stays trainable in full).
_PEFT_TASK = {"causal-lm": "CAUSAL_LM", "seq2seq-lm": "SEQ_2_SEQ_LM", "sequence-classification": "SEQ_CLS",
              "token-classification": "TOKEN_CLS"}


def task_name(task: str | None, config) -> str:
    """The canonical task for ``config``: ``task`` (or an alias such as ``"classification"``) when given, else the
    config's own (encoder-decoder: seq2seq-lm; an encoder family: sequence-classification; else causal-lm).
    Raises ``ConfigError`` for an unknown task or one the architecture cannot do."""
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if task is None:
        if encoder_decoder:
            return "seq2seq-lm"
        return "sequence-classification" if config.model_type in ENCODER_TYPES else "causal-lm"
    canonical = TASK_ALIASES.get(task, task) if isinstance(task, str) else task
    if canonical not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)} (or classification, token); got {task!r}")
    if encoder_decoder != (canonical == "seq2seq-lm"):
        kind = "an encoder-decoder" if encoder_decoder else "not an encoder-decoder"
        raise ConfigError(f"{config.model_type} is {kind}; task {canonical} does not apply to it "
                          f"(use --task {'seq2seq-lm' if encoder_decoder else 'causal-lm or classification'})")
    if canonical == "causal-lm" and config.model_type in ENCODER_TYPES and not getattr(config, "is_decoder", False):
        raise ConfigError(f"{config.model_type} is an encoder, not a causal language model; use --task "
                          "classification or --task token-classification")
    return canonical


def _auto_class(task: str):
    import transformers

    return {"causal-lm": transformers.AutoModelForCausalLM, "seq2seq-lm": transformers.AutoModelForSeq2SeqLM,
            "sequence-classification": transformers.AutoModelForSequenceClassification,
            "token-classification": transformers.AutoModelForTokenClassification}[task]


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    """An architecture autofit can plan for: its config, shape and exact parameter counts.

    ``total_params`` is ``non_layer_params + num_layers * layer_params`` exactly (decoder layers are identical).
    For an encoder-decoder, ``num_layers`` is the depth of each stack (autofit takes stacks of equal depth, as T5 and
    BART have them) and a "layer" is one encoder layer and one decoder layer together.
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
    task: str = "causal-lm"  # one of TASKS: decides the head, the batch and the loss
    # Target (decoder) length of an encoder-decoder's batches; None: the source length. A plan varies the batch and
    # the source length and keeps the target length fixed, so it belongs to the model as it is trained.
    target_len: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        if self.target_len is not None and (self.task != "seq2seq-lm" or self.target_len <= 0):
            raise ConfigError(f"a target length applies to encoder-decoders only, and must be positive; got "
                              f"{self.target_len} for a {self.task} model")
        for name in ("num_layers", "hidden_size", "num_heads", "head_dim", "vocab_size", "total_params"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.non_layer_params + self.num_layers * self.layer_params != self.total_params:
            raise ValueError("total_params must equal non_layer_params + num_layers * layer_params")

    @property
    def fingerprint(self) -> str:
        """A stable digest of the architecture (name and config), for caching simulations."""
        text = self.name + self.config.to_json_string(use_diff=False) + ("" if self.task == "causal-lm" else self.task)
        text += "" if self.target_len is None else f" target {self.target_len}"
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


def stack_depths(config) -> tuple[int, int]:
    """(encoder layers, decoder layers) of an encoder-decoder config (T5's and BART's names)."""
    if config.model_type in ("t5", "mt5", "umt5", "longt5"):
        return config.num_layers, config.num_decoder_layers
    return config.encoder_layers, config.decoder_layers


def with_layers(config, num_layers: int):
    """A copy of ``config`` with ``num_layers`` decoder layers (per-layer lists such as ``layer_types`` cut to fit);
    for an encoder-decoder, ``num_layers`` in each stack."""
    config = copy.deepcopy(config)
    if getattr(config, "is_encoder_decoder", False):
        if config.model_type in ("t5", "mt5", "umt5", "longt5"):
            config.num_layers = config.num_decoder_layers = num_layers
        else:
            config.encoder_layers = config.decoder_layers = num_layers
        config.num_hidden_layers = num_layers
        return config
    config.num_hidden_layers = num_layers
    for key in ("layer_types",):
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) > num_layers:
            setattr(config, key, list(values[:num_layers]))
    return config


def build(config, *, dtype: torch.dtype = torch.float32, task: str = "causal-lm", device: str = "meta") -> nn.Module:
    """The ``task`` model of ``config`` (a causal LM by default) on ``device`` (``meta``: no memory, no weights)."""
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _auto_class(task).from_config(config, dtype=dtype)
        except ValueError as err:
            raise ModelError(f"transformers cannot build a {task} model from this config: "
                             f"{str(err).splitlines()[0]}") from None


def layer_stack(model: nn.Module, task: str = "causal-lm") -> nn.ModuleList:
    """The ModuleList of repeated layers whose marks drive depth extrapolation: the decoder's for an
    encoder-decoder (the encoder runs before it, inside the step's prologue), else the longest list of modules of
    one class."""
    best = None
    for name, module in model.named_modules():
        if not (isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1):
            continue
        if task == "seq2seq-lm" and "decoder" not in name.split("."):
            continue
        if best is None or len(module) > len(best):
            best = module
    if best is None:
        raise ModelError(f"cannot find the repeated layers of {type(model).__name__}")
    return best


def lora_targets(model_type: str) -> tuple[str, ...]:
    """peft's default LoRA target modules for ``model_type``."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    targets = defaults.get(model_type) or _EXTRA_LORA_TARGETS.get(model_type)
    return tuple(targets) if targets else ()


def apply_lora(
    model: nn.Module, *, r: int, alpha: int, dropout: float, targets: tuple[str, ...], device: str = "meta",
    task: str = "causal-lm",
) -> nn.Module:
    """``model`` with peft LoRA adapters created on ``device`` (fp32, as peft makes them)."""
    from peft import LoraConfig, get_peft_model

    if r <= 0:
        raise ConfigError(f"LoRA rank must be positive; got {r}")
    if not targets:
        raise ModelError("no LoRA target modules known for this architecture; pass them (lora_targets, --lora-targets a,b)")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=peft_targets(targets),
                        task_type=_PEFT_TASK[task])
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
