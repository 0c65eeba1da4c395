"""The boundary: every value a user hands autofit is checked here, once, before any work starts.

The public entry points (the CLI, ``plan``, ``estimate``, ``probe``, ``train``, ``guard``, ``Plan.from_json``) and the
files and environment they read (model configs, data files, plan files, ``AUTOFIT_WORKERS``) call the checks below;
past this layer values have the types and ranges the engine assumes. Every check raises one of autofit's own errors
with one line that names the value, says what was expected, and what to do. Values that are physically impossible (a
card larger than any made, a micro-batch whose hidden states alone exceed any card, a LoRA rank above the layer's
width) are refused, not computed. Contradictory knobs are refused, or warned about with what was done instead.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from autofit.errors import ConfigError, DataError, GpuError, ModelError
from autofit.sim import arch, simulate
from autofit.units import GiB, fmt_bytes

log = logging.getLogger(__name__)

# -- physical and practical limits ---------------------------------------------------------------------------------------
# The largest accelerators made hold 288 GB (AMD Instinct MI355X and NVIDIA B300, vendor datasheets, 2025); autofit
# accepts up to 512 GiB so that the next generation plans without a change, and refuses anything larger as a typo.
MAX_DEVICE_BYTES = 512 * GiB
# Llama 3 405B pretrained with 16M-token batches, 2,048 sequences of 8,192 tokens (Llama 3 paper, section 3.4.1); a
# fine-tuning batch 32 times that is a typo, and the planner enumerates the divisors of the effective batch.
MAX_EFFECTIVE_BATCH = 65_536
# The longest context of a released model is 10M tokens (Llama 4 Scout, Meta, 2025); 2^24 leaves room above it.
MAX_SEQ_LEN = 1 << 24
# Config figures far beyond any published model (Llama 3.1 405B: 126 layers, hidden 16,384, 128 heads; Gemma 3:
# 262,144 tokens of vocabulary): values above these are typos, and building them would exhaust the host.
MAX_LAYERS = 1_024
MAX_HIDDEN = 1 << 17
MAX_HEADS = 1 << 12
MAX_VOCAB = 1 << 22
# Worker processes for simulations: more than the cores of any one host is a typo.
MAX_WORKERS = 256
# A fine-tuning run of more optimizer steps or epochs than these is a typo (the longest published fine-tuning runs
# take tens of thousands of steps).
MAX_STEPS = 1_000_000_000
MAX_EPOCHS = 10_000
# AdamW fine-tuning uses rates from 1e-6 to 1e-3; above 1 every model autofit plans diverges.
MAX_LEARNING_RATE = 1.0
# Linux's NAME_MAX and PATH_MAX (limits.h): longer names cannot be paths, so they are not models or files.
NAME_MAX, PATH_MAX = 255, 4096

ENV_WORKERS = "AUTOFIT_WORKERS"


# -- small typed checkers ----------------------------------------------------------------------------------------------
def _shown(value, *, typed: bool = False) -> str:
    text = repr(value).replace("\n", " ")
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} (a {type(value).__name__})" if typed else text


def _then(hint: str) -> str:
    return f"; {hint}" if hint else ""


def _num(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _bounds(low, high, *, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {_num(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {_num(high)}"
    return ""


def integer(name: str, value, *, low: int | None = 1, high: int | None = None, hint: str = "",
            error: type[Exception] = ConfigError) -> int:
    """``value`` as an int in [low, high]; a bool, a float (even 128.0), a string or anything else is refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fix = ""
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            fix = f"pass {int(value)}"
        elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
            fix = f"pass the number {value.strip()}, not a string"
        raise error(f"{name} must be a whole number{_bounds(low, high)}; got {_shown(value, typed=True)}"
                    f"{_then(fix or hint)}")
    number = int(value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise error(f"{name} must be a whole number{_bounds(low, high)}; got {number:,}{_then(hint)}")
    return number


def positive_int(name: str, value, *, high: int | None = None, hint: str = "",
                 error: type[Exception] = ConfigError) -> int:
    """``value`` as an int >= 1 (and <= ``high``)."""
    return integer(name, value, low=1, high=high, hint=hint, error=error)


def finite_float(name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False, hint: str = "", error: type[Exception] = ConfigError) -> float:
    """``value`` as a finite float within the bounds (open or closed); NaN, infinities, bools and strings refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{name} must be a number{_bounds(low, high, low_open=low_open, high_open=high_open)}; got "
                    f"{_shown(value, typed=True)}{_then(hint)}")
    number = float(value)
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if not math.isfinite(number) or below or above:
        raise error(f"{name} must be a finite number{_bounds(low, high, low_open=low_open, high_open=high_open)}; "
                    f"got {number!r}{_then(hint)}")
    return number


def choice(name: str, value, allowed: Iterable[str], *, hint: str = "", error: type[Exception] = ConfigError) -> str:
    """``value`` when it is one of the strings ``allowed``."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        shown = _shown(value, typed=not isinstance(value, str))
        raise error(f"{name} must be one of {', '.join(allowed)}; got {shown}{_then(hint)}")
    return value


def flag(name: str, value, *, optional: bool = False) -> bool | None:
    """``value`` when it is True or False (or None, when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False{' or None' if optional else ''}; got "
                          f"{_shown(value, typed=True)}")
    return value


def text(name: str, value, *, hint: str = "", error: type[Exception] = ConfigError) -> str:
    """``value`` when it is a non-empty, printable string."""
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise error(f"{name} must be a non-empty string; got {_shown(value, typed=True)}{_then(hint)}")
    return value


# -- the environment -------------------------------------------------------------------------------------------------
def environment() -> None:
    """Checks autofit's environment variables: ``AUTOFIT_WORKERS`` is a whole number of processes. (A cache path
    that cannot be used is not an error: autofit runs without the cache and says so once.)"""
    raw = os.environ.get(ENV_WORKERS)
    if raw is None or not raw.strip():
        return
    try:
        workers = int(raw.strip())
    except ValueError:
        workers = None
    if workers is None or not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"{ENV_WORKERS} must be a whole number of processes from 1 to {MAX_WORKERS}; got {raw!r}; "
                          f"set it to 1 to simulate in this process, or unset it for one per core (up to 4)")


# -- cards -----------------------------------------------------------------------------------------------------------
def card(info):
    """``info`` (a resolved ``GpuInfo``) when a card of its size can exist; the host's measured memory always can."""
    if info.source != "host" and info.total_bytes > MAX_DEVICE_BYTES:
        raise GpuError(f"a card of {fmt_bytes(info.total_bytes)} is larger than any made (the largest hold 288 GB; "
                       f"autofit accepts up to {fmt_bytes(MAX_DEVICE_BYTES)}); give the card's real size, e.g. --gpu "
                       "24GiB, or its name (autofit gpus lists them)")
    return info


# -- model references and configs --------------------------------------------------------------------------------------
def model_ref(ref) -> None:
    """A model name or path that a file system could hold: no NUL byte, no part longer than NAME_MAX, no path longer
    than PATH_MAX. Raises ``ModelError``."""
    if not isinstance(ref, (str, os.PathLike)):
        return
    value = os.fspath(ref)
    if isinstance(value, bytes):
        raise ModelError(f"model path must be text, not bytes; got {_shown(value)}")
    if "\x00" in value:
        raise ModelError("model name holds a NUL character; pass a model name such as distilgpt2 or a directory")
    longest = max((len(part) for part in value.split(os.sep)), default=0)
    if len(value) > PATH_MAX or longest > NAME_MAX:
        raise ModelError(f"model name of {len(value):,} characters is longer than a file system allows ({NAME_MAX} "
                         f"per part, {PATH_MAX} in all); pass a catalog name (autofit models) or a directory with "
                         "config.json")


# config.json fields autofit reads, by every name transformers gives them: whole numbers in these ranges.
_CONFIG_INTS = {
    ("num_hidden_layers", "n_layer", "num_layers"): (1, MAX_LAYERS),
    ("hidden_size", "n_embd", "d_model"): (1, MAX_HIDDEN),
    ("num_attention_heads", "n_head"): (1, MAX_HEADS),
    ("num_key_value_heads",): (1, MAX_HEADS),
    ("intermediate_size", "n_inner"): (1, 64 * MAX_HIDDEN),
    ("head_dim",): (1, MAX_HIDDEN),
    ("vocab_size",): (1, MAX_VOCAB),
    ("max_position_embeddings", "n_positions", "n_ctx"): (1, MAX_SEQ_LEN),
}
_REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")


def config_data(data, where: str) -> dict:
    """The parsed ``config.json`` at ``where`` when it is a JSON object with a ``model_type`` and sane shape figures
    (whole numbers in range, where present). Raises ``ModelError``."""
    if not isinstance(data, dict):
        raise ModelError(f"{where} holds a JSON {type(data).__name__}, not an object; a transformers config.json is "
                         "an object with model_type, hidden_size, ...")
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type.strip():
        raise ModelError(f"{where} has no model_type (got {_shown(model_type)}); it is not a transformers config")
    for names, (low, high) in _CONFIG_INTS.items():
        for key in names:
            if data.get(key) is not None:
                integer(f"{where}: {key}", data[key], low=low, high=high, error=ModelError,
                        hint="fix the config, or pass a catalog name (autofit models)")
    return data


@functools.cache
def _causal_types() -> tuple[frozenset[str], frozenset[str]]:
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), frozenset(MODEL_FOR_MASKED_LM_MAPPING_NAMES)


@functools.cache
def _head_types() -> tuple[frozenset[str], frozenset[str]]:
    from transformers.models.auto.modeling_auto import (MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

    return (frozenset(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
            frozenset(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES))


def model_config(config, name: str) -> None:
    """A transformers config autofit can plan, with sane shape figures: a decoder-only causal language model, an
    encoder-decoder transformers builds as a seq2seq LM (T5, BART), or an encoder with task heads (BERT, RoBERTa,
    DeBERTa). Raises ``ModelError``."""
    model_type = getattr(config, "model_type", None) or "?"
    causal, masked = _causal_types()
    seq2seq, classify = _head_types()
    what = ("autofit plans decoder-only causal language models (GPT-2, Llama, Qwen, ...), encoder-decoders (T5, "
            "BART) and encoders with task heads (BERT, RoBERTa, DeBERTa); pass one of those (autofit models lists them)")
    if getattr(config, "is_encoder_decoder", False):
        if model_type not in seq2seq:
            raise ModelError(f"{name} is an encoder-decoder model ({model_type}) transformers has no seq2seq LM for; "
                             f"{what}")
    elif model_type in masked and not getattr(config, "is_decoder", False):
        if model_type not in classify:
            raise ModelError(f"{name} is an encoder ({model_type}) transformers has no classification head for; "
                             f"{what}")
    elif model_type not in causal:
        raise ModelError(f"{name}: transformers has no causal language model for model_type {model_type!r}; {what}")
    for names, (low, high) in _CONFIG_INTS.items():
        key = names[0]
        value = getattr(config, key, None)
        if value is None:
            if key in _REQUIRED:
                raise ModelError(f"{name}: config lacks {key}; {what}")
            continue
        integer(f"{name}: config {key}", value, low=low, high=high, error=ModelError,
                hint="fix the config, or pass a catalog name (autofit models)")


# -- training knobs ----------------------------------------------------------------------------------------------------
_MODULE_NAMES: dict[str, frozenset[str]] = {}


def module_names(spec) -> frozenset[str]:
    """The last name part of every module of ``spec``'s model (one decoder layer deep is enough: layers repeat)."""
    if spec.module is not None:
        return frozenset(name.rsplit(".", 1)[-1] for name, _ in spec.module.named_modules() if name)
    if spec.fingerprint not in _MODULE_NAMES:
        model = arch.build(arch.with_layers(spec.config, 1), task=spec.task)
        _MODULE_NAMES[spec.fingerprint] = frozenset(name.rsplit(".", 1)[-1] for name, _ in model.named_modules()
                                                    if name)
    return _MODULE_NAMES[spec.fingerprint]


def targets(spec, targets, *, what: str = "lora_targets") -> tuple[str, ...] | None:
    """``targets`` as a tuple of module names of ``spec``'s model, or None for peft's defaults. Raises
    ``ConfigError`` for anything but a list of names, and ``ModelError`` for names the model does not have."""
    if targets is None:
        return None
    if isinstance(targets, str) or not isinstance(targets, Iterable):
        raise ConfigError(f"{what} must be a list of module names, e.g. ('q_proj', 'v_proj'); got "
                          f"{_shown(targets, typed=True)}")
    targets = tuple(targets)
    if targets == (arch.ALL_LINEAR,):  # peft's name for every linear layer but the head
        return targets
    if not targets:
        raise ConfigError(f"{what} names no module; leave it out for peft's defaults or name modules, e.g. "
                          "q_proj,v_proj")
    for target in targets:
        if not isinstance(target, str) or not target.strip() or not target.replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"{what} must hold module names such as q_proj; got {_shown(target, typed=True)}")
    missing = [t for t in targets if t.rsplit(".", 1)[-1] not in module_names(spec)]  # peft matches name suffixes
    if missing:
        layers = sorted(n for n in module_names(spec) if n.endswith(("proj", "attn", "fc", "dense", "query", "key",
                                                                       "value", "c_proj", "qkv")))
        raise ModelError(f"LoRA targets {','.join(missing)} do not match {spec.name}: it has no such module (its "
                         f"projections: {','.join(layers) or 'none found'}); pass names from that list")
    return targets


def lora_rank(spec, value, *, name: str = "lora_r") -> int:
    """A LoRA rank from 1 to the width of ``spec``'s layers: an adapter of rank r adds r x (in + out) weights to a
    layer of in x out, so a rank at the width costs more than training the layer itself."""
    return positive_int(name, value, high=spec.hidden_size,
                        hint=f"{spec.name}'s layers are {spec.hidden_size} wide; ranks of 4 to 64 are usual")


def knobs(spec, *, method: str, precision=None, quantization=None, optimizer="adamw_torch_fused", lora_r=16,
          lora_alpha=None, lora_dropout=0.05, lora_targets=None, gradient_checkpointing=None, auto: bool = False,
          quantization_wins: bool = False) -> None:
    """The training knobs every entry takes, checked against each other and ``spec``.

    ``auto`` admits method "auto"; ``quantization_wins`` (the estimate) turns LoRA with a 4/8-bit base into QLoRA with
    a warning, where the planner refuses the contradiction."""
    methods = (("auto",) if auto else ()) + simulate.METHODS
    choice("method", method, methods)
    if precision is not None:  # the engine's names and their short forms (bf16, fp16, fp32)
        choice("precision", precision, simulate.PRECISIONS + tuple(simulate.PRECISION_ALIASES),
               hint="leave it out for bf16-mixed where the card supports bf16, else 16-mixed")
    if quantization is not None:
        choice("quantization", quantization, simulate.QUANTIZATIONS)
    choice("optimizer", optimizer, simulate.OPTIMIZERS)
    quantized = quantization not in (None, "none")
    if method == "full" and quantized:
        raise ConfigError(f"method full trains unquantized weights, so quantization {quantization} contradicts it; use "
                          f"--method qlora for a {quantization} base, or drop --quantization")
    if method == "qlora" and quantization == "none":
        raise ConfigError("method qlora trains LoRA adapters on a 4-bit or 8-bit base, so quantization none "
                          "contradicts it; use --method lora for a 16-bit base, or --quantization 4bit")
    if method == "lora" and quantized:
        if not quantization_wins:
            raise ConfigError(f"method lora keeps the base in 16 bits, so quantization {quantization} contradicts it; "
                              f"use --method qlora for a {quantization} base, or drop --quantization")
        log.warning("LoRA on a %s base is QLoRA: estimating method qlora", quantization)
    uses_lora = method != "full"
    rank = positive_int("lora_r", lora_r, hint="ranks of 4 to 64 are usual")
    if uses_lora:
        lora_rank(spec, rank)
        targets(spec, lora_targets)
    if lora_alpha is not None:
        positive_int("lora_alpha", lora_alpha, high=1 << 20, hint="leave it out for twice the rank")
    finite_float("lora_dropout", lora_dropout, low=0.0, high=1.0, high_open=True)
    flag("gradient_checkpointing", gradient_checkpointing, optional=True)


def batch_shape(spec, batch_size, seq_len) -> None:
    """A micro-batch of ``batch_size`` x ``seq_len`` tokens ``spec`` can run: a length within its positions, and
    hidden states (b x s x hidden, 2 bytes each at the least: the embeddings' output) that some card can hold."""
    b = positive_int("batch_size", batch_size, hint="the micro-batch in sequences, e.g. --batch-size 8")
    s = sequence_length(spec, seq_len)
    least = b * s * spec.hidden_size * 2
    if least > MAX_DEVICE_BYTES:
        raise ConfigError(f"a micro-batch of {b:,} x {s:,} tokens holds at least {fmt_bytes(least)} of hidden states "
                          f"({spec.name}: {spec.hidden_size} wide, 2 bytes each), more than any card; use a smaller "
                          "--batch-size (with accumulation for a large effective batch) or --seq-len")


def sequence_length(spec, seq_len, *, name: str = "seq_len") -> int:
    """A sequence length from 2 tokens (a causal LM predicts each token from the ones before) to ``spec``'s
    positions."""
    length = integer(name, seq_len, low=2, high=MAX_SEQ_LEN, hint="tokens per sequence, e.g. --seq-len 512")
    if spec.max_positions is not None and length > spec.max_positions:
        raise ConfigError(f"{name} {length:,} is beyond {spec.name}'s {spec.max_positions:,} positions; use --seq-len "
                          f"{spec.max_positions} or less")
    return length


# -- entry points ----------------------------------------------------------------------------------------------------
def estimate_inputs(spec, card_info, *, batch_size, seq_len, method, precision, quantization, gradient_checkpointing,
                    optimizer, lora_r, lora_alpha, lora_dropout, lora_targets, max_grad_norm,
                    expandable_segments, offload_activations=False) -> None:
    """Everything ``autofit.memory.estimate`` takes, checked before it simulates."""
    environment()
    card(card_info)
    knobs(spec, method=method, precision=precision, quantization=quantization, optimizer=optimizer, lora_r=lora_r,
          lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets,
          gradient_checkpointing=gradient_checkpointing, quantization_wins=True)
    flag("gradient_checkpointing", gradient_checkpointing)
    if max_grad_norm is not None:
        finite_float("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
    flag("expandable_segments", expandable_segments)
    flag("offload_activations", offload_activations)
    if offload_activations and card_info.source == "host":
        raise ConfigError("activation offloading moves a card's saved tensors to host RAM; a run on the CPU has "
                          "nothing to offload (drop offload_activations / --offload-activations)")
    batch_shape(spec, batch_size, seq_len)


def plan_inputs(spec, card_info, *, seq_len, effective_batch, method, dataset, tokenizer, margin, precision,
                optimizer, quantization, lora_r, lora_alpha, lora_dropout, lora_targets, gradient_checkpointing,
                probe) -> None:
    """Everything ``autofit.planner.plan`` takes, checked before it searches."""
    environment()
    card(card_info)
    knobs(spec, method=method, precision=precision, quantization=quantization, optimizer=optimizer, lora_r=lora_r,
          lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets,
          gradient_checkpointing=gradient_checkpointing, auto=True)
    if seq_len is not None:
        sequence_length(spec, seq_len)
    if effective_batch is not None and effective_batch != "max":  # "max": the largest micro-batch that fits
        positive_int("effective_batch", effective_batch, high=MAX_EFFECTIVE_BATCH,
                     hint="sequences per optimizer step; 16 to 512 are usual, or 'max'")
    if margin is not None:  # None: the planner's default for the card (or the host)
        finite_float("margin", margin, low=0.0, high=0.5, high_open=True,
                     hint="the share of the card kept free, e.g. 0.05")
    flag("probe", probe, optional=True)
    if dataset is not None and not isinstance(dataset, (str, os.PathLike, list, tuple)):
        raise DataError(f"dataset (--data) must be a file path or a list of samples; got {_shown(dataset, typed=True)}")
    tokenizer_object(tokenizer)


def fit_inputs(card_info, *, method, seq_len, names) -> None:
    """What ``autofit.planner.fit_table`` takes (each model's plan is checked as it is made)."""
    environment()
    card(card_info)
    choice("method", method, ("auto",) + simulate.METHODS)
    if seq_len is not None:
        integer("seq_len", seq_len, low=2, high=MAX_SEQ_LEN)
    if names is not None:
        if isinstance(names, str) or not isinstance(names, Iterable):
            raise ConfigError(f"models (--models) must be a list of model names; got {_shown(names, typed=True)}")
        names = list(names)
        if not names:
            raise ConfigError("models (--models) names no model; list names separated by commas, e.g. --models "
                              "distilgpt2,gpt2, or leave it out for the whole catalog")
        for name in names:
            text("models", name, hint="list names separated by commas, e.g. --models distilgpt2,gpt2")


def tokenizer_object(value) -> None:
    """None, or a transformers tokenizer."""
    if value is None:
        return
    from transformers import PreTrainedTokenizerBase

    if not isinstance(value, PreTrainedTokenizerBase):
        raise ConfigError(f"tokenizer must be a transformers tokenizer (AutoTokenizer.from_pretrained(...)) or None; "
                          f"got {_shown(value, typed=True)}")


def probe_inputs(plan, *, plan_type: type, isolate, use_cache, rank, max_trials) -> None:
    """What ``autofit.probing.probe`` takes."""
    environment()
    if not isinstance(plan, plan_type):
        raise ConfigError(f"probe() takes a Plan (from autofit.plan or Plan.from_json); got {_shown(plan, typed=True)}")
    flag("isolate", isolate)
    flag("use_cache", use_cache)
    flag("rank", rank)
    positive_int("max_trials", max_trials, high=1_000)


def trainer(value) -> None:
    """A ``transformers.Trainer`` (what ``autofit.guard.guard`` wraps)."""
    from transformers import Trainer

    if not isinstance(value, Trainer):
        raise ConfigError(f"guard() wraps a transformers.Trainer; got {_shown(value, typed=True)}; build the Trainer "
                          "first, then guard(trainer)")


# -- data --------------------------------------------------------------------------------------------------------------
def _has_text(sample) -> bool:
    if isinstance(sample, str):
        return bool(sample.strip())
    return any(isinstance(m.get("content"), str) and m["content"].strip() for m in sample)


def samples(values, where: str = "the data") -> list:
    """The samples of ``values`` that hold text: each a string or a chat (a list of role/content messages). Blank
    samples are dropped with a warning; none left is a ``DataError``, as is anything that is not a sample."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise DataError(f"{where} must be a list of samples (strings or chats); got {_shown(values, typed=True)}")
    if not values:
        raise DataError(f"{where} has no samples; put one sample per record (or per paragraph) in it")
    for i, sample in enumerate(values):
        chat = isinstance(sample, list) and all(isinstance(m, dict) and "role" in m for m in sample) and sample
        if not isinstance(sample, str) and not chat:
            raise DataError(f"{where} sample {i} is {_shown(sample, typed=True)}, not a string or a list of "
                            "role/content messages; read files with autofit.data.load_samples")
    kept = [s for s in values if _has_text(s)]
    if not kept:
        raise DataError(f"{where}: all {len(values)} samples are blank; put text in them (a model cannot learn from "
                        "empty samples)")
    if len(kept) < len(values):
        first = next(i for i, s in enumerate(values) if not _has_text(s))
        log.warning("%s: dropped %d blank sample(s) of %d (the first is sample %d); training on the other %d",
                    where, len(values) - len(kept), len(values), first, len(kept))
    return kept


# -- files -----------------------------------------------------------------------------------------------------------
def _blocking_file(path: Path) -> Path | None:
    """The first existing part of ``path`` above it that is a file rather than a folder."""
    for parent in list(path.parents)[::-1]:
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def file_path(path, *, what: str = "--out") -> Path:
    """A path a file can be written to: not a folder, not under a file."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).strip():
        raise ConfigError(f"{what} must be a file path; got {_shown(path, typed=True)}")
    model_ref(path)
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; name a file in it, e.g. {path / 'plan.json'}")
    blocker = _blocking_file(path)
    if blocker is not None:
        raise ConfigError(f"{what} {path} lies under {blocker}, which is a file; pick another path")
    return path


def run_folder(path, *, what: str = "output_dir") -> Path:
    """A path a run's folder can live at: a folder or nothing yet, not a file, not under a file."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).strip():
        raise ConfigError(f"{what} must be a folder path; got {_shown(path, typed=True)}")
    model_ref(path)
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder; name a folder for the run")
    blocker = _blocking_file(path)
    if blocker is not None:
        raise ConfigError(f"{what} {path} lies under {blocker}, which is a file; pick another folder")
    return path


# -- training --------------------------------------------------------------------------------------------------------
def train_inputs(*, data, output_dir, plan, plan_type: type, steps, epochs, random_init, resume, overwrite,
                 tokenizer, packing, learning_rate, eval_steps, save_steps, plan_options: Mapping,
                 plan_parameters: Iterable[str]) -> Path:
    """Everything ``autofit.training.train`` takes, checked before it loads anything; returns the output folder."""
    environment()
    if data is None or not isinstance(data, (str, os.PathLike, list, tuple)):
        raise DataError(f"data (--data) must be a data file (.jsonl, .json, .txt) or a list of samples; got "
                        f"{_shown(data, typed=True)}")
    out = run_folder(output_dir)
    if plan is not None and not isinstance(plan, (plan_type, str, os.PathLike)):
        raise ConfigError(f"plan (--plan) must be a Plan or the path of a plan.json; got {_shown(plan, typed=True)}")
    if steps is not None and epochs is not None:
        raise ConfigError("give steps or epochs, not both")
    if steps is not None:
        positive_int("steps", steps, high=MAX_STEPS, hint="optimizer steps to train, e.g. --steps 100")
    if epochs is not None:
        finite_float("epochs", epochs, low=0.0, high=MAX_EPOCHS, low_open=True,
                     hint="passes over the data, e.g. --epochs 1 (or 0.5 for half)")
    if learning_rate is not None:
        finite_float("learning_rate", learning_rate, low=0.0, high=MAX_LEARNING_RATE, low_open=True,
                     hint="fine-tuning uses 1e-5 to 1e-3; leave it out for the default")
    for name, value in (("eval_steps", eval_steps), ("save_steps", save_steps)):
        if value is not None:
            positive_int(name, value, high=MAX_STEPS)
    for name, value in (("random_init", random_init), ("resume", resume),
                        ("overwrite", overwrite)):
        flag(name, value)
    flag("packing", packing, optional=True)
    tokenizer_object(tokenizer)
    unknown = sorted(set(plan_options) - set(plan_parameters))
    if unknown:
        raise ConfigError(f"train() has no option {unknown[0]!r}; it takes plan()'s options: "
                          f"{', '.join(sorted(plan_parameters))}")
    if plan is not None and plan_options:
        log.warning("a plan was given, so %s ignored: the plan's knobs are used", ", ".join(
            f"{k}={v!r}" for k, v in sorted(plan_options.items())) + (" is" if len(plan_options) == 1 else " are"))
    if resume and overwrite:
        raise ConfigError("resume and overwrite contradict each other: --resume continues the run in --out, "
                          "--overwrite starts it over; pass one")
    state = run_state(out)
    if state is not None and not resume and not overwrite:
        raise ConfigError(f"{out} holds {state}; pass --overwrite (overwrite=True) to replace it, --resume to "
                          "continue it, or another --out")
    return out


# What a finished run leaves: final weights (a full model or a LoRA adapter).
_FINISHED = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors",
             "adapter_model.bin")


def run_state(out: Path) -> str | None:
    """What run ``out`` holds, in words, or None when it holds none: "a finished run (...)" or "an unfinished run"."""
    if not out.is_dir():
        return None
    finished = [name for name in _FINISHED if (out / name).is_file()]
    if finished:
        return f"a finished run ({finished[0]})"
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*") if p.is_dir())
    if checkpoints or (out / "plan.json").is_file() or (out / "memory_log.jsonl").is_file():
        return "an unfinished run" + (f" ({', '.join(checkpoints[-2:])})" if checkpoints else "")
    return None


# -- plans -----------------------------------------------------------------------------------------------------------
_PLAN_REQUIRED = ("model_name", "gpu", "method", "quantization", "precision", "gradient_checkpointing", "optimizer",
                  "batch_size", "grad_accum", "effective_batch", "seq_len", "eval_batch_size", "budget_bytes",
                  "estimate", "tokens_per_second", "source", "reasons", "seq_len_source")
_ESTIMATE_BYTES = ("weights", "gradients", "optimizer_state", "activations", "logits_and_loss", "temporaries",
                   "workspaces", "allocator_margin", "cuda_context", "peak_allocated", "min_reserved", "peak_reserved",
                   "device_total")


def plan_data(data) -> dict:
    """The parsed plan file ``data`` when it has the shape ``Plan.to_dict`` writes; ``Plan.__post_init__`` checks the
    values. Raises ``ConfigError``."""
    if not isinstance(data, dict):
        raise ConfigError(f"a plan file holds a JSON object as autofit probe --out writes it; got a JSON "
                          f"{type(data).__name__} ({_shown(data)})")
    missing = [key for key in _PLAN_REQUIRED if key not in data]
    if missing:
        raise ConfigError(f"the plan has no {missing[0]!r}; write plans with autofit probe MODEL --out plan.json")
    for key in ("gpu", "estimate"):
        if not isinstance(data[key], dict):
            raise ConfigError(f"the plan's {key} must be a JSON object; got {_shown(data[key], typed=True)}")
    estimate = data["estimate"]
    if not isinstance(estimate.get("config"), dict):
        raise ConfigError("the plan's estimate has no config object; write plans with autofit probe --out")
    for key in _ESTIMATE_BYTES:
        integer(f"the plan's estimate {key}", estimate.get(key), low=0, high=1 << 50)
    for key in ("reasons",):
        if not isinstance(data[key], list) or not all(isinstance(r, str) for r in data[key]):
            raise ConfigError(f"the plan's {key} must be a list of strings")
    for key in ("trials", "alternatives"):
        value = data.get(key) or []
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise ConfigError(f"the plan's {key} must be a list of JSON objects")
    return data


def plan_fields(plan) -> None:
    """The invariants of a ``Plan``, whatever built it: knobs from the engine's lists, whole numbers in range, finite
    figures, LoRA settings exactly when the method trains adapters, and the estimate made for the same knobs."""
    text("the plan's model_name", plan.model_name)
    choice("the plan's method", plan.method, simulate.METHODS)
    choice("the plan's quantization", plan.quantization, simulate.QUANTIZATIONS)
    choice("the plan's precision", plan.precision, simulate.PRECISIONS)
    choice("the plan's optimizer", plan.optimizer, simulate.OPTIMIZERS)
    choice("the plan's source", plan.source, ("estimated", "probed"))
    choice("the plan's seq_len_source", plan.seq_len_source, ("user", "data", "default"))
    flag("the plan's gradient_checkpointing", plan.gradient_checkpointing)
    flag("the plan's expandable_segments", plan.expandable_segments)
    for name in ("batch_size", "grad_accum", "eval_batch_size"):
        positive_int(f"the plan's {name}", getattr(plan, name), high=MAX_EFFECTIVE_BATCH)
    positive_int("the plan's effective_batch", plan.effective_batch, high=MAX_EFFECTIVE_BATCH)
    integer("the plan's seq_len", plan.seq_len, low=2, high=MAX_SEQ_LEN)
    positive_int("the plan's budget_bytes", plan.budget_bytes, high=max(plan.gpu.total_bytes, 1))
    finite_float("the plan's tokens_per_second", plan.tokens_per_second, low=0.0)
    if plan.truncated_share is not None:
        finite_float("the plan's truncated_share", plan.truncated_share, low=0.0, high=1.0)
    if plan.measured_reserved is not None:
        integer("the plan's measured_reserved", plan.measured_reserved, low=0)
    if plan.method == "full":
        for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets"):
            if getattr(plan, name) is not None:
                raise ConfigError(f"the plan's method is full but it sets {name}; a full fine-tuning plan has no "
                                  "LoRA settings (set them to null, or method to lora)")
    else:
        positive_int("the plan's lora_r", plan.lora_r, high=MAX_HIDDEN)
        positive_int("the plan's lora_alpha", plan.lora_alpha, high=1 << 20)
        finite_float("the plan's lora_dropout", plan.lora_dropout, low=0.0, high=1.0, high_open=True)
        if not plan.lora_targets or not all(isinstance(t, str) and t for t in plan.lora_targets):
            raise ConfigError(f"the plan's method is {plan.method} but its lora_targets {plan.lora_targets!r} name no "
                              "module; name the modules to adapt, e.g. [\"q_proj\", \"v_proj\"]")
    cfg = plan.estimate.config
    for name in ("method", "quantization", "precision", "gradient_checkpointing", "optimizer"):
        if getattr(cfg, name) != getattr(plan, name):
            raise ConfigError(f"the plan's {name} is {getattr(plan, name)!r} but its estimate was made for "
                              f"{getattr(cfg, name)!r}; make plans with autofit probe --out rather than editing one")


def plan_for_model(plan, spec) -> None:
    """A plan that can train ``spec``: its length within the model's positions, its LoRA targets modules the model
    has and its rank within the layers' width. A plan made for another model is refused where it cannot apply and
    warned about where it can."""
    again = f"plan again for this model (autofit probe {spec.name} --out plan.json)"
    if spec.max_positions is not None and plan.seq_len > spec.max_positions:
        raise ConfigError(f"the plan's sequence length {plan.seq_len} is beyond {spec.name}'s {spec.max_positions} "
                          f"positions; {again}")
    if plan.method != "full":
        if plan.lora_r > spec.hidden_size:
            raise ConfigError(f"the plan's LoRA rank {plan.lora_r} is above {spec.name}'s layer width "
                              f"{spec.hidden_size}; {again}")
        missing = [t for t in plan.lora_targets if t.rsplit(".", 1)[-1] not in module_names(spec)]
        if missing:
            raise ConfigError(f"the plan's LoRA targets {','.join(missing)} are not modules of {spec.name} (the plan "
                              f"was made for {plan.model_name}); {again}")
    if plan.model_name != spec.name and Path(plan.model_name).name != Path(spec.name).name:
        log.warning("the plan was made for %s and is applied to %s: its memory estimate is for that model",
                    plan.model_name, spec.name)

