"""The planner: every training knob chosen for a card at once, under its memory budget, fastest first.

``plan(model, gpu)`` searches method (full fine-tuning, LoRA, QLoRA), gradient checkpointing, micro-batch and
accumulation (the effective batch stays what was asked), and, when nothing else fits, a shorter sequence. Memory
comes from the estimate's fast ``StepModel``; candidates are ranked by a cost model of a step's time on the card
(FLOPs at a utilization that grows with tokens per micro-batch, weight and optimizer traffic over the memory bus,
checkpointing's recomputation, 4-bit dequantization), and the winner is confirmed by simulating its exact shape.
A ``Plan`` says why: which constraint bound, what was traded, how much headroom is left.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from autofit import calibration, data, memory, probing, validate
from autofit import gpu as gpus
from autofit import model as models
from autofit.errors import ConfigError, DoesNotFitError
from autofit.memory import MemoryEstimate
from autofit.plans import Plan
from autofit.sim.simulate import StepConfig
from autofit.units import GiB, MiB, fmt_bytes

log = logging.getLogger(__name__)

DEFAULT_EFFECTIVE_BATCH = 16  # when none is asked: the least effective batch; micro-batches below it accumulate to it
MAX_DEFAULT_BATCH = 64  # when none is asked and memory allows, the micro-batch (and effective batch) grows to this
DEFAULT_SEQ_LEN = 1024
MIN_SEQ_LEN = 64
DEFAULT_MARGIN = 0.05  # share of the card kept free beyond the estimate
USEFUL_BATCH = 4  # "auto" takes the strongest method that fits at least this many sequences per micro-batch
CLOSE = 0.85  # alternatives within 15% of the chosen one's estimated speed are left for a probe to rank

# -- the cost model -----------------------------------------------------------------------------------------------------
# Model assumptions, not measurements (a probe on the card measures instead): dense matmuls reach MATMUL_EFFICIENCY of
# the card's peak when a micro-batch carries many tokens, half of that at HALF_EFFICIENCY_TOKENS tokens; the memory
# bus runs at BUS_EFFICIENCY of its peak. A card known only by its size gets GENERIC_TFLOPS and GENERIC_BANDWIDTH
# (an RTX 3060's: 25.6 TFLOPS, 360 GB/s, see autofit/gpu.py), which ranks candidates the same way.
MATMUL_EFFICIENCY = 0.6
HALF_EFFICIENCY_TOKENS = 1024
BUS_EFFICIENCY = 0.8
GENERIC_TFLOPS, GENERIC_BANDWIDTH = 25.6, 360.0
HOST_TFLOPS, HOST_BANDWIDTH = 0.5, 20.0  # a few CPU cores training in fp32
LAUNCH_SECONDS_PER_LAYER = 20e-6  # kernel launches and Python per layer per pass
NF4_DEQUANT_BYTES = 0.5 + 2 + 2  # read packed 4-bit, write the bf16 weight, read it back in the matmul
ADAMW_BYTES = 28  # fused AdamW per fp32 parameter: read param, grad, two moments; write param and moments


@dataclass(frozen=True, kw_only=True, slots=True)
class Throughput:
    """Estimated time of one optimizer step and the tokens per second it gives."""

    step_seconds: float
    tokens_per_second: float
    compute_seconds: float  # per micro-batch
    memory_seconds: float  # per micro-batch
    optimizer_seconds: float  # per optimizer step


def throughput(spec: models.ModelSpec, cfg: StepConfig, card: gpus.GpuInfo, *, batch_size: int, seq_len: int,
               grad_accum: int, trainable: int) -> Throughput:
    """Time of one optimizer step (``grad_accum`` micro-batches of ``batch_size`` x ``seq_len``) on ``card``."""
    if card.source == "host":
        tflops, bandwidth = HOST_TFLOPS, HOST_BANDWIDTH
    else:
        tflops, bandwidth = card.peak_tflops_16 or GENERIC_TFLOPS, card.bandwidth_gbs or GENERIC_BANDWIDTH
    tokens = batch_size * seq_len
    layer_weights = spec.num_layers * spec.layer_params
    head = spec.hidden_size * spec.vocab_size
    # forward FLOPs per token: 2 per weight of each matmul plus causal attention (Kaplan et al. 2020, eq. 2.2)
    attention = 2 * spec.num_layers * seq_len * spec.num_heads * spec.head_dim
    forward = 2 * (layer_weights + head) + attention
    passes = 3.0 if cfg.method == "full" else 2.0  # backward: activation and weight gradients, or activations only
    if cfg.gradient_checkpointing:
        passes += (2 * layer_weights + attention) / forward  # the layers' forward again, not the head
    efficiency = MATMUL_EFFICIENCY * tokens / (tokens + HALF_EFFICIENCY_TOKENS)
    compute = forward * passes * tokens / (tflops * 1e12 * efficiency)
    weight_bytes = 2 * (layer_weights + head)  # 16-bit weights read per pass
    weight_passes = passes
    dequant = 0.0
    if cfg.quantization == "4bit":
        quantized = layer_weights
        weight_bytes = 2 * head + 2 * (layer_weights - quantized)
        dequant = quantized * NF4_DEQUANT_BYTES * (3 if cfg.gradient_checkpointing else 2)
    elif cfg.quantization == "8bit":
        dequant = layer_weights * (1 + 2 + 2) * (3 if cfg.gradient_checkpointing else 2)
    bus = bandwidth * 1e9 * BUS_EFFICIENCY
    memory_time = weight_bytes * weight_passes / bus
    # dequantization runs as its own kernels before each matmul: its time adds to the step rather than overlapping
    dequant_time = dequant / bus
    launches = LAUNCH_SECONDS_PER_LAYER * spec.num_layers * math.ceil(passes)
    micro = max(compute, memory_time) + dequant_time + launches
    optimizer = ADAMW_BYTES * trainable / (bandwidth * 1e9 * BUS_EFFICIENCY)
    step = grad_accum * micro + optimizer
    return Throughput(step_seconds=step, tokens_per_second=grad_accum * tokens / step, compute_seconds=compute,
                      memory_seconds=memory_time + dequant_time, optimizer_seconds=optimizer)


# -- the search ---------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class _Candidate:
    cfg: StepConfig
    step_model: memory.StepModel | None = None
    eval_batch_size: int = 1
    effective: int = 0
    max_batch: int = 0  # cautious: with the fast model's worst allocator margin
    upper: int = 0  # hard: the live tensors alone fit
    batch_size: int = 0
    grad_accum: int = 0
    speed: Throughput | None = None
    notes: list[str] = field(default_factory=list)


def budget(card: gpus.GpuInfo, margin: float = DEFAULT_MARGIN) -> int:
    """Bytes a step may need on ``card``: its memory, less what other processes hold, less ``margin`` of it."""
    if not 0 <= margin < 0.5:
        raise ConfigError(f"margin is a share of the card's memory in [0, 0.5); got {margin}")
    base = card.free_bytes if card.source in ("nvml", "torch", "host") else card.total_bytes - card.used_by_others_bytes
    return int(base - margin * card.total_bytes)


def plan(
    model,
    gpu=None,
    *,
    seq_len: int | None = None,
    effective_batch: int | None = None,
    method: str = "auto",
    dataset=None,
    tokenizer=None,
    margin: float = DEFAULT_MARGIN,
    precision: str | None = None,
    optimizer: str = "adamw_torch_fused",
    quantization: str | None = None,
    lora_r: int = 16,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.05,
    lora_targets: tuple[str, ...] | None = None,
    gradient_checkpointing: bool | None = None,
    probe: bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> "Plan":
    """The fastest plan that fits ``model`` on ``gpu``; see the module docstring.

    ``model``: anything ``autofit.model.resolve`` takes. ``gpu``: a ``GpuInfo``, catalog name, size, device index,
    ``"cpu"``, or None for the detected card. ``seq_len`` fixes the sequence length; else it comes from
    ``dataset`` (a file or a list of samples; the 95th percentile of token lengths) or defaults to 1024 (or the
    model's positions). ``effective_batch`` (default 16) is kept exactly: batch x accumulation. ``method``: "auto"
    (the strongest method that fits a useful micro-batch: full, then LoRA, then QLoRA), "full", "lora" or "qlora".
    ``gradient_checkpointing`` None lets the planner choose. ``probe`` (None: when the card is present) confirms the
    plan with trial steps on the card. Raises ``DoesNotFitError`` when nothing fits, with the memory the smallest
    configuration needs and which cards would do.
    """
    spec = models.resolve(model)
    card = gpus.resolve(gpu)
    validate.plan_inputs(spec, card, seq_len=seq_len, effective_batch=effective_batch, method=method, dataset=dataset,
                         tokenizer=tokenizer, margin=margin, precision=precision, optimizer=optimizer,
                         quantization=quantization, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         lora_targets=lora_targets, gradient_checkpointing=gradient_checkpointing, probe=probe)
    allowed = budget(card, margin)
    if method not in ("auto", "full", "lora", "qlora"):
        raise ConfigError(f"method must be auto, full, lora or qlora; got {method!r}")
    if effective_batch is not None and effective_batch < 1:
        raise ConfigError(f"effective batch must be at least 1; got {effective_batch}")
    adaptive = effective_batch is None
    target_batch = effective_batch or MAX_DEFAULT_BATCH
    reasons: list[str] = []
    seq, seq_source, truncated, lengths = _sequence_length(spec, seq_len, dataset, tokenizer, reasons, progress)
    knobs = dict(precision=precision, optimizer=optimizer, lora_r=lora_r, lora_alpha=lora_alpha,
                 lora_dropout=lora_dropout, lora_targets=tuple(lora_targets) if lora_targets else None)
    methods = ("full", "lora", "qlora") if method == "auto" else (method,)
    if quantization not in (None, "none", "4bit", "8bit"):
        raise ConfigError(f"quantization must be none, 4bit or 8bit; got {quantization!r}")
    checkpointing = (False, True) if gradient_checkpointing is None else (gradient_checkpointing,)

    bases = _feasible_methods(spec, card, allowed, methods, quantization, knobs, reasons)
    if not bases:
        raise _does_not_fit(spec, card, allowed, seq, knobs, seq_source)
    shortened = False
    while True:
        seen: list[_Candidate] = []
        chosen = _search(spec, card, allowed, seq, target_batch, bases, method, checkpointing, reasons, progress, seen,
                         adaptive, shortened)
        if chosen is not None:
            break
        if seq_source == "user" or seq <= MIN_SEQ_LEN:
            raise _does_not_fit(spec, card, allowed, seq, knobs, seq_source)
        shorter = max(MIN_SEQ_LEN, seq // 2 // 64 * 64 or MIN_SEQ_LEN)
        reasons.append(f"sequence length shortened from {seq} to {shorter}: nothing fits at {seq}")
        seq, shortened = shorter, True
        if lengths is not None:
            truncated = data.truncated_share(lengths, seq)
            reasons.append(f"{truncated:.1%} of the data's samples are longer than {seq} tokens and will be truncated")

    cand = chosen
    estimate = _confirm(spec, cand, card, allowed, seq, target_batch, reasons, progress, adaptive)
    if adaptive:
        reasons.insert(0, f"effective batch {cand.effective}: " + (
            f"the largest micro-batch that fits (at most {MAX_DEFAULT_BATCH}), as none was asked"
            if cand.batch_size >= DEFAULT_EFFECTIVE_BATCH else
            f"the default, micro-batches accumulating to it") + "; pass effective_batch / --effective-batch to fix it")
    alternatives = tuple(
        dict(config={k: getattr(c.cfg, k) for k in c.cfg.__slots__}, batch_size=c.batch_size, grad_accum=c.grad_accum,
             tokens_per_second=round(c.speed.tokens_per_second, 1))
        for c in seen if c is not cand and c.speed.tokens_per_second >= CLOSE * cand.speed.tokens_per_second)
    eval_batch = cand.eval_batch_size
    result = Plan(
        model_name=spec.name, gpu=card, method=cand.cfg.method, quantization=cand.cfg.quantization,
        precision=cand.cfg.precision, gradient_checkpointing=cand.cfg.gradient_checkpointing,
        optimizer=cand.cfg.optimizer,
        lora_r=cand.cfg.lora_r if cand.cfg.uses_lora else None,
        lora_alpha=(cand.cfg.lora_alpha or 2 * cand.cfg.lora_r) if cand.cfg.uses_lora else None,
        lora_dropout=cand.cfg.lora_dropout if cand.cfg.uses_lora else None,
        lora_targets=(cand.cfg.lora_targets or spec.lora_targets) if cand.cfg.uses_lora else None,
        batch_size=cand.batch_size, grad_accum=cand.grad_accum, effective_batch=cand.effective, seq_len=seq,
        eval_batch_size=eval_batch, budget_bytes=allowed, estimate=estimate,
        tokens_per_second=cand.speed.tokens_per_second, source="estimated", reasons=tuple(reasons),
        seq_len_source=seq_source, truncated_share=truncated, alternatives=alternatives,
    )
    use_probe = probe if probe is not None else (card.source in ("nvml", "torch") and _cuda_present(card))
    if use_probe:
        result = probing.probe(result, spec=spec, progress=progress)
    return result


def _cuda_present(card: gpus.GpuInfo) -> bool:
    try:
        import torch

        return torch.cuda.is_available() and card.index is not None and card.index < torch.cuda.device_count()
    except Exception:
        return False


def _sequence_length(spec, seq_len, dataset, tokenizer, reasons, progress=None):
    """(seq_len, source, truncated share, token lengths or None)."""
    if seq_len is not None:
        spec.check_seq_len(seq_len)
        reasons.append(f"sequence length {seq_len} as asked")
        return seq_len, "user", None, None
    if dataset is not None:
        samples = data.load_samples(dataset) if not isinstance(dataset, (list, tuple)) else validate.samples(dataset)
        tok = tokenizer or data.load_tokenizer(spec.name)
        if tok is None:
            raise ConfigError(f"no tokenizer for {spec.name} in a local directory or the Hugging Face cache; pass "
                              "tokenizer=... or --seq-len")
        measured = data.measure_lengths(samples, tok, progress=progress)
        lengths = measured.lengths
        choice = data.choose_seq_len(lengths, max_positions=spec.max_positions)
        reasons.append(f"sequence length {choice.seq_len}: the {choice.percentile:g}th percentile of {choice.samples} "
                       f"samples is {choice.percentile_tokens} tokens (longest {choice.max_tokens}), rounded up to a "
                       f"multiple of 64; {choice.truncated_share:.1%} of samples truncated{measured.note}")
        return choice.seq_len, "data", choice.truncated_share, lengths
    seq = min(DEFAULT_SEQ_LEN, spec.max_positions or DEFAULT_SEQ_LEN)
    reasons.append(f"sequence length {seq} by default (pass seq_len, or a dataset to measure it)")
    return seq, "default", None, None


def _static_bytes(spec, cfg: StepConfig) -> int:
    """Weights, gradients and optimizer state: memory that does not depend on the batch (a lower bound)."""
    counts = models.count_params(spec, method=cfg.method, quantization=cfg.quantization, half=cfg.half,
                                 lora_r=cfg.lora_r, lora_targets=cfg.lora_targets)
    sizes = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "nf4": 0.516}
    weights = sum(n * sizes.get(k, 4) for k, n in counts.by_dtype.items())
    per_trainable = 4 + (2 if cfg.optimizer == "adamw_8bit" else 8)
    return int(weights + per_trainable * counts.trainable)


def _trainable(spec, cfg: StepConfig) -> int:
    return models.count_params(spec, method=cfg.method, quantization=cfg.quantization, half=cfg.half,
                               lora_r=cfg.lora_r, lora_targets=cfg.lora_targets).trainable


def _feasible_methods(spec, card, allowed, methods, quantization, knobs, reasons) -> list[StepConfig]:
    """Step configs (checkpointing off) of the methods whose weights, gradients and optimizer state fit at all."""
    bases = []
    for method in methods:
        quant = "none"
        if method == "qlora":
            quant = quantization if quantization in ("4bit", "8bit") else "4bit"
        base = memory.step_config(card, method=method, quantization=quant, gradient_checkpointing=False, **knobs)
        static = _static_bytes(spec, base)
        if static > allowed - (memory.CUDA_CONTEXT_BYTES if base.device == "cuda" else 0):
            reasons.append(f"{_method_name(method)} ruled out: weights, gradients and optimizer state alone need "
                           f"{fmt_bytes(static)} of the {fmt_bytes(allowed)} budget")
            continue
        bases.append(base)
    return bases


def _search(spec, card, allowed, seq, target_batch, bases, method_asked, checkpointing, reasons,
            progress, seen: list | None = None, adaptive: bool = False, shortened: bool = False) -> _Candidate | None:
    """The best candidate at sequence length ``seq``, or None when nothing fits. Adds reasons as it decides; every
    candidate that fits is appended to ``seen``.

    Where a method's fitting is in doubt (its weights, gradients and optimizer state take half the budget, or nothing
    fitted at a longer length), one exact simulation of its leanest step, micro-batch 1 with checkpointing if
    allowed, tells whether it fits at all before its fast models are built."""
    found: list[_Candidate] = []
    for base in bases:
        method = base.method
        per_method = []
        lean = replace(base, gradient_checkpointing=max(checkpointing))
        if ((shortened or _static_bytes(spec, base) > allowed // 2)
                and _exact(spec, lean, card, 1, seq, progress).required_bytes > allowed):
            reasons.append(f"{_method_name(method)} ruled out at {seq} tokens: a micro-batch of 1 does not fit")
            continue
        for ckpt in checkpointing:
            cfg = replace(base, gradient_checkpointing=ckpt)
            if ckpt and per_method and _checkpointing_cannot_win(spec, cfg, card, seq, target_batch, per_method[0]):
                reasons.append(f"gradient checkpointing off: even with the whole effective batch in one micro-batch, "
                               f"recomputation would cost more than micro-batch {per_method[0].batch_size} gains")
                break
            cand = _size(spec, cfg, card, allowed, seq, target_batch, progress, adaptive)
            if cand.max_batch == 0:
                continue
            per_method.append(cand)
            if seen is not None:
                seen.append(cand)
            # checkpointing only pays when it lets a bigger micro-batch in; skip it when this one takes the whole batch
            if not ckpt and cand.batch_size == target_batch and len(checkpointing) > 1:  # the batch's cap, reached
                reasons.append("gradient checkpointing off: the whole effective batch fits in one micro-batch without it")
                break
        if not per_method:
            reasons.append(f"{_method_name(method)} ruled out at {seq} tokens: a micro-batch of 1 does not fit")
            continue
        best = max(per_method, key=lambda c: c.speed.tokens_per_second)
        if len(per_method) == 1 and len(checkpointing) == 2 and best.cfg.gradient_checkpointing:
            reasons.append(f"gradient checkpointing on: without it {_method_name(method)} does not fit a micro-batch "
                           f"of 1 at {seq} tokens")
        if len(per_method) == 2:
            other = next(c for c in per_method if c is not best)
            reasons.append(f"gradient checkpointing {'on' if best.cfg.gradient_checkpointing else 'off'}: "
                           f"{best.speed.tokens_per_second:,.0f} vs {other.speed.tokens_per_second:,.0f} estimated "
                           f"tokens/s (micro-batch {best.batch_size} vs {other.batch_size})")
        found.append(best)
        # a method that fits a useful micro-batch in either checkpointing setting is strong enough; its fastest
        # setting is the one used
        if method_asked == "auto" and any(c.batch_size >= min(USEFUL_BATCH, c.effective) for c in per_method):
            useful = min(USEFUL_BATCH, best.effective)
            how = "" if best.batch_size >= useful else " (with checkpointing; the faster setting without it is used)"
            if method != "full":
                reasons.append(f"{_method_name(method)} chosen: the strongest method that fits a micro-batch of "
                               f"{useful} or more{how}")
            else:
                reasons.append(f"full fine-tuning chosen: it fits a micro-batch of {useful} or more{how}")
            return best
    if not found:
        return None
    best = max(found, key=lambda c: (c.batch_size >= min(USEFUL_BATCH, c.effective), c.speed.tokens_per_second))
    if method_asked == "auto":
        reasons.append(f"{_method_name(best.cfg.method)} chosen: no method fits a micro-batch of "
                       f"{min(USEFUL_BATCH, best.effective)}; this one is fastest")
    return best


def _checkpointing_cannot_win(spec, cfg, card, seq, target_batch, without: _Candidate) -> bool:
    """True when checkpointing's best case (the whole effective batch in one micro-batch) is still slower."""
    best_case = throughput(spec, cfg, card, batch_size=target_batch, seq_len=seq, grad_accum=1,
                           trainable=_trainable(spec, cfg))
    return best_case.tokens_per_second <= without.speed.tokens_per_second


def _method_name(method: str) -> str:
    return {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}[method]


def _sizes(target_batch: int, adaptive: bool) -> list[int]:
    """Micro-batches a plan may use: divisors of the asked effective batch; without one, 1, 2, 4 and 8 (which
    accumulate to the default of 16) and every size from 16 to the cap (trained without accumulation)."""
    if adaptive:
        return [d for d in range(1, DEFAULT_EFFECTIVE_BATCH) if DEFAULT_EFFECTIVE_BATCH % d == 0] + \
            list(range(DEFAULT_EFFECTIVE_BATCH, MAX_DEFAULT_BATCH + 1))
    return [d for d in range(1, target_batch + 1) if target_batch % d == 0]


def _effective(batch_size: int, target_batch: int, adaptive: bool) -> int:
    if not adaptive:
        return target_batch
    return max(batch_size, DEFAULT_EFFECTIVE_BATCH)


def _size(spec, cfg, card, allowed, seq, target_batch, progress, adaptive=False) -> _Candidate:
    """Bounds on the largest micro-batch of ``cfg`` under ``allowed`` from the fast model, and the batch x
    accumulation the cautious bound gives (for ranking; ``_confirm`` settles the batch by exact simulation).

    The fast model's allocated peak is exact in the batch and a lower bound of what a step needs, so a batch whose
    allocated peak alone passes the budget is surely out (``upper``); its allocator margin is the worst share seen
    and errs high (``max_batch``).
    """
    cand = _Candidate(cfg=cfg)
    sm = memory.StepModel(spec, cfg, seq_len=seq, evaluate=True, progress=progress)
    cand.step_model = sm
    context = memory.CUDA_CONTEXT_BYTES if cfg.device == "cuda" else 0

    def largest(fits) -> int:
        if not fits(1):
            return 0
        low, high = 1, 2
        while high <= target_batch and fits(high):
            low, high = high, high * 2
        high = min(high, target_batch + 1)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    cand.upper = largest(lambda b: sm.query(b, seq)[0] + context <= allowed)
    cand.max_batch = largest(lambda b: memory.from_step_model(sm, b, seq).required_bytes <= allowed)
    if cand.upper and not cand.max_batch:
        cand.max_batch = 1 if _exact(spec, cfg, card, 1, seq, progress).required_bytes <= allowed else 0
        if not cand.max_batch:
            cand.upper = 0
    if not cand.max_batch:
        return cand
    cand.batch_size = max(d for d in _sizes(target_batch, adaptive) if d <= cand.max_batch)
    cand.effective = _effective(cand.batch_size, target_batch, adaptive)
    cand.grad_accum = cand.effective // cand.batch_size
    cand.speed = throughput(spec, cfg, card, batch_size=cand.batch_size, seq_len=seq, grad_accum=cand.grad_accum,
                            trainable=_trainable(spec, cfg))
    return cand


def _exact(spec, cfg, card, batch_size, seq, progress, eval_batch_size=None) -> MemoryEstimate:
    est = memory.simulate_point(spec, cfg, batch_size=batch_size, seq_len=seq, eval_batch_size=eval_batch_size,
                                progress=progress)
    return replace(est, gpu_name=card.name)


def _eval_batch(cand: _Candidate, allowed: int, target_batch: int) -> int:
    """The largest evaluation batch (up to twice the effective batch, at most 64) the fast model fits, at least 1."""
    context = memory.CUDA_CONTEXT_BYTES if cand.cfg.device == "cuda" else 0
    best = 1
    for b in range(1, min(64, 2 * target_batch) + 1):
        if cand.step_model.eval_need(b) + context <= allowed:
            best = b
    return best


def _confirm(spec, cand: _Candidate, card, allowed, seq, target_batch, reasons, progress,
             adaptive: bool = False) -> MemoryEstimate:
    """Settles the micro-batch by exact simulation: the largest divisor of the effective batch that fits, searched
    between the fast model's cautious bound and its hard upper bound."""
    divisors = _sizes(target_batch, adaptive)
    tried: dict[int, MemoryEstimate] = {}
    cand.eval_batch_size = _eval_batch(cand, allowed, cand.effective)

    ratio, samples = _calibration(spec, cand.cfg, card)
    if samples:
        reasons.append(f"estimates scaled by {ratio:.3f}: measured over estimated memory in {samples} earlier "
                       f"probe trial{'s' if samples != 1 else ''} of this configuration on {card.name}")

    def need(est: MemoryEstimate) -> int:
        return int(est.min_reserved * ratio) + est.cuda_context

    def fits(b: int) -> bool:
        if b not in tried:
            while True:
                est = _exact(spec, cand.cfg, card, b, seq, progress, cand.eval_batch_size)
                # when the evaluation pass is what does not fit, shrink it rather than the training batch
                if (need(est) > allowed and cand.eval_batch_size > 1 and est.eval_peak is not None
                        and est.eval_peak >= _tensors(est)):
                    cand.eval_batch_size //= 2
                    continue
                tried[b] = est
                break
        return need(tried[b]) <= allowed

    # divisors above the cautious choice that the hard bound still allows, smallest first
    above = [d for d in divisors if cand.batch_size < d <= cand.upper]
    below = [d for d in divisors if d <= cand.batch_size]
    chosen = None
    if fits(cand.batch_size):
        chosen = cand.batch_size
        low, high = 0, len(above)  # binary search: the largest divisor in `above` that fits
        while low < high:
            mid = (low + high) // 2
            if fits(above[mid]):
                chosen, low = above[mid], mid + 1
            else:
                high = mid
        if chosen != cand.batch_size:
            reasons.append(f"micro-batch {chosen} fits when simulated exactly (the fast model's allocator margin is "
                           "cautious)")
    else:
        for d in reversed(below[:-1]):
            if fits(d):
                chosen = d
                break
        reasons.append(f"micro-batch {cand.batch_size} needs {fmt_bytes(need(tried[cand.batch_size]))} when "
                       f"simulated exactly; stepped down to {chosen}")
    if chosen is None:
        raise DoesNotFitError(f"{spec.name} does not fit {card.name} at batch 1 x {seq} tokens: it needs "
                              f"{fmt_bytes(need(tried[1]))}, the budget is {fmt_bytes(allowed)}")
    estimate = tried[chosen]
    cand.effective = _effective(chosen, target_batch, adaptive)
    cand.batch_size, cand.grad_accum = chosen, cand.effective // chosen
    cand.speed = throughput(spec, cand.cfg, card, batch_size=chosen, seq_len=seq, grad_accum=cand.grad_accum,
                            trainable=_trainable(spec, cand.cfg))
    next_up = next((d for d in divisors if d > chosen), None)
    refused = next_up is not None and (next_up > cand.upper or (next_up in tried and not fits(next_up)))
    if chosen == target_batch:
        reasons.append(f"micro-batch {chosen}: the whole {'batch cap' if adaptive else 'effective batch'} in one "
                       "step, no accumulation")
    elif refused or next_up is None:
        bound = f"micro-batch {next_up} would not fit" if next_up else "nothing larger fits"
        reasons.append(f"micro-batch {chosen} x {cand.grad_accum} accumulation = effective batch {cand.effective}; "
                       f"bound by memory ({bound}" + ("" if adaptive else
                                                      "; micro-batches divide the effective batch exactly") + ")")
    else:
        reasons.append(f"micro-batch {chosen} x {cand.grad_accum} accumulation = effective batch {cand.effective}")
    headroom = allowed - need(estimate)
    reasons.append(f"headroom {fmt_bytes(headroom)} ({headroom / allowed:.0%} of the budget); peak at "
                   f"{estimate.where}")
    reasons.append(f"precision {cand.cfg.precision}"
                   + (" (the card supports bf16)" if cand.cfg.precision == "bf16" else
                      " (no bf16 on this card)" if cand.cfg.precision == "fp16" else " (host memory run)"))
    return estimate


def _calibration(spec, cfg: StepConfig, card) -> tuple[float, int]:
    """(measured over estimated ratio, trials behind it) from earlier probes of this configuration on this card."""
    if calibration.cache_root() is None:
        return 1.0, 0
    try:
        store = calibration.open_store()  # None, said once, when the cache cannot be used
        if store is None:
            return 1.0, 0
        found = store.ratio(calibration.Key.of(spec, card.name, cfg))
        store.close()
    except Exception as err:  # an unusable cache never stops a plan
        log.warning("calibration unavailable (%s)", err)
        return 1.0, 0
    return found if found else (1.0, 0)


def _tensors(est: MemoryEstimate) -> int:
    return est.weights + est.gradients + est.optimizer_state + est.activations + est.logits_and_loss + est.temporaries


def _does_not_fit(spec, card, allowed, seq, knobs, seq_source) -> DoesNotFitError:
    """The error for a model no configuration fits: the least it needs and the cards that have it."""
    shortest = MIN_SEQ_LEN if seq_source != "user" else seq
    cfg = memory.step_config(card, method="qlora", quantization="4bit", gradient_checkpointing=True, **knobs)
    try:
        least = memory.simulate_point(spec, cfg, batch_size=1, seq_len=shortest).required_bytes
    except Exception:  # the smallest configuration could not even be simulated
        least = _static_bytes(spec, cfg)
    margin_share = 1 - allowed / card.total_bytes if card.total_bytes else DEFAULT_MARGIN
    cards = sorted((c for c in gpus.catalog() if c.total_bytes * (1 - margin_share) >= least),
                   key=lambda c: c.total_bytes)
    names = ", ".join(f"{c.key} ({fmt_bytes(c.total_bytes)})" for c in cards[:4]) or "none in the catalog"
    return DoesNotFitError(
        f"{spec.name} does not fit {card.name}: even 4-bit QLoRA with checkpointing at batch 1 x {shortest} tokens "
        f"needs {fmt_bytes(least)} and the budget is {fmt_bytes(allowed)}; cards that would do: {names}")


# -- many models on one card ---------------------------------------------------------------------------------------------
def fit_table(gpu, *, method: str = "auto", seq_len: int | None = None,
              names: list[str] | None = None, progress: Callable[[str], None] | None = None) -> list[dict]:
    """For every catalog model (or ``names``), the best plan on ``gpu`` or why none fits."""
    validate.fit_inputs(gpus.resolve(gpu), method=method, seq_len=seq_len, names=names)
    rows = []
    for name in names or models.catalog_names():
        if progress:
            progress(f"planning {name}")
        try:
            spec = models.resolve(name)
            length = min(seq_len, spec.max_positions) if seq_len and spec.max_positions else seq_len
            p = plan(spec, gpu, method=method, seq_len=length, probe=False)
            rows.append(dict(model=name, fits=True, method=p.method, quantization=p.quantization,
                             batch_size=p.batch_size, grad_accum=p.grad_accum, seq_len=p.seq_len,
                             checkpointing=p.gradient_checkpointing, required_bytes=p.estimate.required_bytes,
                             budget_bytes=p.budget_bytes, tokens_per_second=round(p.tokens_per_second)))
        except DoesNotFitError as err:
            rows.append(dict(model=name, fits=False, reason=str(err)))
    return rows
