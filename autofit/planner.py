"""The planner: every training knob chosen for a card at once, under its memory budget, fastest first.

``plan(model, gpu)`` searches method (full fine-tuning, LoRA, QLoRA), gradient checkpointing, micro-batch and
accumulation (the effective batch stays what was asked), and, when nothing else fits, a shorter sequence. Memory
comes from the estimate's fast ``StepModel``; candidates are ranked by a cost model of a step's time on the card
(FLOPs at a utilization that grows with tokens per micro-batch, weight and optimizer traffic over the memory bus,
checkpointing's recomputation, 4-bit dequantization), and the winner is confirmed by simulating its exact shape.
A ``Plan`` says why: which constraint bound, what was traded, how much headroom is left.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from autofit import calibration, data, memory, offload, probing, runs, validate
from autofit import host as hostmem
from autofit.progress import counted, stage
from autofit import seq2seq
from autofit import gpu as gpus
from autofit import model as models
from autofit.errors import ConfigError, DoesNotFitError, SimulationError
from autofit.memory import MemoryEstimate
from autofit.plans import Plan
from autofit.sim.simulate import StepConfig
from autofit.units import fmt_bytes, parse_size

log = logging.getLogger(__name__)

DEFAULT_EFFECTIVE_BATCH = 16  # when none is asked: the least effective batch; micro-batches below it accumulate to it
MAX_DEFAULT_BATCH = 64  # when none is asked and memory allows, the micro-batch (and effective batch) grows to this
DEFAULT_SEQ_LEN = 1024
MIN_SEQ_LEN = 64
DEFAULT_MARGIN = 0.05  # share of the card kept free beyond the estimate
HOST_RAM_SHARE = 0.5  # a CPU run may take half the RAM available when it is planned (an assumption: the rest stays
# for the system, the data loader, the tokenizer and other programs, and for the allocator's fragmentation)
LARGEST_BATCH_CAP = 4096  # largest_batch searches no further (a plan's micro-batch is then "at least" this)
GRADIENT_BYTES = 4  # bytes per trainable parameter's gradient: fp32, as the master weights and peft's adapters are
USEFUL_BATCH = 4  # "auto" takes the strongest method that fits at least this many sequences per micro-batch
CLOSE = 0.85  # alternatives within 15% of the chosen one's estimated speed are left for a probe to rank

# -- the cost model -----------------------------------------------------------------------------------------------------
# A card's peak figure is not what it sustains. SUSTAINED_MATMUL is the share of ``peak_tflops_16`` that a large
# 16-bit matmul measurably reaches, per kind of card (torch.matmul / mamf-finder results, best shape):
#   GeForce (Turing to Blackwell, desktop and laptop): 0.97-1.11, so 1.0. Boost clocks run above the rated ones:
#     RTX 3090 75.6-76.7 vs 71.0, RTX 4090 158.9-173.3 vs 165.2, RTX 3080 Ti 75.6 vs 68.2, RTX 4070 SUPER 74.7-76.8 vs
#     71.0, RTX 4060 Laptop 30.8 vs 29.1, RTX 3060 Laptop 25.7 vs 24.1, RTX 2080 39.0 vs 40.3 (bf16 or fp16 TFLOPS,
#     github.com/zzc0721/torch-performance-test-data database.md; RTX 2080 Ti 53.4 vs 53.8, gist ypwhs/a156353c).
#   Pascal and GTX 16 (no tensor cores; the figure is the FP32 rate): 0.9, a GTX 1080 Ti's 10.3 of 11.3 (gist ypwhs)
#     and a Tesla P40's 10.0 of 11.8 (zzc0721).
#   T4: 0.37. A 70 W card that caps its clock under sustained matmuls: about 24 of 65 TFLOPS over 100 fp16 4096^3
#     GEMMs (forums.developer.nvidia.com/t/about-gpu-peak-performance/264462; 42 in short bursts, zzc0721).
#   Volta: 0.68, a V100S's 88.9 of 130 (zzc0721).
#   Other data-centre and workstation cards: 0.8. A100 SXM 271.2 of 312, H100 SXM 794.5 of 989 (H200 the same),
#     A100 PCIe 252.9 of 312 (stas00/ml-engineering, compute/accelerator MAMF table); L40S 269 of 362, RTX A6000 123 of
#     154.8 (zzc0721). The L4 (a 72 W card like the T4) has no published measurement; it gets this share too.
SUSTAINED_MATMUL = {"geforce": 1.0, "no-tensor-cores": 0.9, "t4": 0.37, "volta": 0.68, "datacentre": 0.8}
# Model assumptions, not measurements (a probe on the card measures instead): a training step's matmuls reach
# MATMUL_EFFICIENCY of the sustained rate when a micro-batch carries many tokens, half of that at
# HALF_EFFICIENCY_TOKENS tokens; the memory bus runs at BUS_EFFICIENCY of its peak. A card known only by its size
# gets GENERIC_TFLOPS and GENERIC_BANDWIDTH (an RTX 3060's: 25.6 TFLOPS, 360 GB/s), which ranks candidates the same way.
MATMUL_EFFICIENCY = 0.7
HALF_EFFICIENCY_TOKENS = 1024
BUS_EFFICIENCY = 0.8
GENERIC_TFLOPS, GENERIC_BANDWIDTH = 25.6, 360.0
# On the CPU the rates are this machine's, measured on first use (``gpu.host_speed``: an fp32 matmul and a copy).
# HOST_STEP_EFFICIENCY is the share of that matmul rate a whole fp32 training step reaches. 0.8 is an assumption that
# benchmarks/cpu_throughput.py brackets: on a shared 2-core machine, with the CPU's rates measured just before each
# run, train measured 0.74-1.47x the estimate (median 1.25x) for distilgpt2, SmolLM2-135M and gpt2 at 128-256
# tokens; the spread is other jobs' load (benchmarks/results/cpu-2026-12-02). CPU matmuls reach their rate at small
# shapes, so half of it at HOST_HALF_EFFICIENCY_TOKENS (an assumption).
HOST_STEP_EFFICIENCY = 0.8
HOST_HALF_EFFICIENCY_TOKENS = 64
LAUNCH_SECONDS_PER_LAYER = 20e-6  # kernel launches and Python per layer per pass
NF4_DEQUANT_BYTES = 0.5 + 2 + 2  # read packed 4-bit, write the bf16 weight, read it back in the matmul
ADAMW_BYTES = 28  # fused AdamW per fp32 parameter: read param, grad, two moments; write param and moments


def sustained_share(card: gpus.GpuInfo) -> float:
    """The share of ``card.peak_tflops_16`` its matmuls sustain (``SUSTAINED_MATMUL``, by kind of card)."""
    if card.key == "t4":
        return SUSTAINED_MATMUL["t4"]
    if card.family == "pascal" or (card.family == "turing" and "GTX" in card.name):
        return SUSTAINED_MATMUL["no-tensor-cores"]
    if "GeForce" in card.name:
        return SUSTAINED_MATMUL["geforce"]
    if card.family == "volta":
        return SUSTAINED_MATMUL["volta"]
    return SUSTAINED_MATMUL["datacentre"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Throughput:
    """Estimated time of one optimizer step and the tokens per second it gives."""

    step_seconds: float
    tokens_per_second: float
    compute_seconds: float  # per micro-batch
    memory_seconds: float  # per micro-batch
    optimizer_seconds: float  # per optimizer step


def throughput(spec: models.ModelSpec, cfg: StepConfig, card: gpus.GpuInfo, *, batch_size: int, seq_len: int,
               grad_accum: int, trainable: int, offloaded: int = 0) -> Throughput:
    """Time of one optimizer step (``grad_accum`` micro-batches of ``batch_size`` x ``seq_len``) on ``card``;
    ``offloaded``: bytes of saved tensors each micro-batch copies to the host and back (activation offloading)."""
    host = card.source == "host"
    if host:
        speed = gpus.host_speed()
        tflops, bandwidth, weight_width = speed.matmul_tflops * HOST_STEP_EFFICIENCY, speed.bandwidth_gbs, 4
    else:
        tflops = (card.peak_tflops_16 or GENERIC_TFLOPS) * sustained_share(card) * MATMUL_EFFICIENCY
        bandwidth, weight_width = card.bandwidth_gbs or GENERIC_BANDWIDTH, 2
    tokens = batch_size * seq_len
    layer_weights = spec.num_layers * spec.layer_params
    # a classification head's (hidden x labels) FLOPs are negligible; language models project onto the vocabulary
    head = spec.hidden_size * spec.vocab_size if spec.task in ("causal-lm", "seq2seq-lm") else 0
    # forward FLOPs per token: 2 per weight of each matmul plus causal attention (Kaplan et al. 2020, eq. 2.2)
    attention = 2 * spec.num_layers * seq_len * spec.num_heads * spec.head_dim
    forward = 2 * (layer_weights + head) + attention
    passes = 3.0 if cfg.method == "full" else 2.0  # backward: activation and weight gradients, or activations only
    if cfg.gradient_checkpointing:
        passes += (2 * layer_weights + attention) / forward  # the layers' forward again, not the head
    half = HOST_HALF_EFFICIENCY_TOKENS if host else HALF_EFFICIENCY_TOKENS
    efficiency = tokens / (tokens + half)
    compute = forward * passes * tokens / (tflops * 1e12 * efficiency)
    weight_bytes = weight_width * (layer_weights + head)  # weights read per pass (16-bit on a card, fp32 on a CPU)
    weight_passes = passes
    dequant = 0.0
    if cfg.quantization == "4bit":
        quantized = layer_weights
        weight_bytes = 2 * head + 2 * (layer_weights - quantized)
        dequant = quantized * NF4_DEQUANT_BYTES * (3 if cfg.gradient_checkpointing else 2)
    elif cfg.quantization == "8bit":
        dequant = layer_weights * (1 + 2 + 2) * (3 if cfg.gradient_checkpointing else 2)
    bus = bandwidth * 1e9 * (1.0 if host else BUS_EFFICIENCY)  # the host's rate is a measured, sustained one
    memory_time = weight_bytes * weight_passes / bus
    # dequantization runs as its own kernels before each matmul: its time adds to the step rather than overlapping
    dequant_time = dequant / bus
    launches = LAUNCH_SECONDS_PER_LAYER * spec.num_layers * math.ceil(passes)
    micro = max(compute, memory_time) + dequant_time + launches
    if cfg.offload_activations and not host:
        micro += offload.activation_seconds(offloaded, card)
    optimizer = offload.optimizer_seconds(spec, cfg, card, trainable=trainable, bus_bytes_per_second=bus,
                                          grad_accum=grad_accum)  # None: a plain AdamW
    if optimizer is None:
        optimizer = ADAMW_BYTES * _state_scale(cfg) * trainable / bus
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
    ratio: float = 1.0  # measured over estimated memory from earlier probes of this configuration on this card
    largest: int = 0  # the largest micro-batch that fits, whatever the effective batch (``_confirm`` settles it)
    largest_estimate: MemoryEstimate | None = None
    # reasons that quote this candidate, written when it is settled: (index in the reasons, text of the candidate)
    deferred: list[tuple[int, Callable[["_Candidate"], str]]] = field(default_factory=list)

    calibrated: bool = False  # a probe measured this configuration on this card
    kept: int = 0  # bytes the budget already keeps free (its margin)
    context: int = 0  # bytes outside the allocator on the card: measured by an earlier probe, else assumed
    context_measured: bool = False

    def need(self, est: MemoryEstimate, min_reserved: int | None = None) -> int:
        """Bytes the step (or a run that reserves at least ``min_reserved``) needs on the card: the least the
        allocator runs in, calibrated, plus the CUDA context; until a probe has measured this configuration, with
        the estimate's uncertainty kept free where it exceeds the budget's own margin (``memory.uncertainty_bytes``)."""
        reserved = est.min_reserved if min_reserved is None else min_reserved
        unknown = 0 if self.calibrated or est.config.device == "cpu" else \
            max(0, memory.uncertainty_bytes(est, context_measured=self.context_measured) - self.kept)
        return int(reserved * self.ratio) + est.cuda_context + unknown


@dataclass(frozen=True, kw_only=True, slots=True)
class _Asked:
    """What the caller asked of ``plan``, for the answer when nothing fits."""

    methods: tuple[str, ...]
    method: str
    quantization: str | None
    knobs: dict
    checkpointing: tuple[bool, ...]
    seq_source: str
    eval_batch_size: int | None
    margin: float | None
    levers: tuple[str, ...] = ()  # optimizer levers the search may pull (offload.LEVERS)
    activations: bool = False  # activation offloading may be pulled when nothing fits without it


def budget(card: gpus.GpuInfo, margin: float | None = None) -> int:
    """Bytes a step may need on ``card``: its memory, less what other processes hold, less ``margin`` of it
    (default ``DEFAULT_MARGIN``). On the host (``gpu="cpu"``) without a margin: ``HOST_RAM_SHARE`` of the RAM
    available now; with one, the RAM available less that share of all of it."""
    if margin is None:
        if card.source == "host":
            return int(card.free_bytes * HOST_RAM_SHARE)
        margin = DEFAULT_MARGIN
    if not 0 <= margin < 0.5:
        raise ConfigError(f"margin is a share of the card's memory in [0, 0.5); got {margin}")
    return int(_available(card) - margin * card.total_bytes)


def _available(card: gpus.GpuInfo) -> int:
    """Bytes free for this run on ``card``: what is free now on a detected card or the host, else its total less
    what other processes hold."""
    return card.free_bytes if card.source in ("nvml", "torch", "host") else card.total_bytes - card.used_by_others_bytes


def plan(
    model,
    gpu=None,
    *,
    seq_len: int | None = None,
    effective_batch: int | str | None = None,
    method: str = "auto",
    dataset=None,
    tokenizer=None,
    margin: float | None = None,
    precision: str | None = None,
    optimizer: str = "adamw_torch_fused",
    quantization: str | None = None,
    lora_r: int = 16,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.05,
    lora_targets: tuple[str, ...] | None = None,
    gradient_checkpointing: bool | None = None,
    eval_batch_size: int | None = None,
    reserved_by_others: int | str | None = None,
    probe: bool | None = None,
    progress: Callable[[str], None] | None = None,
    allow=None,
    no_offload: bool = False,
    offload_activations: bool | None = None,
) -> "Plan":
    """The fastest plan that fits ``model`` on ``gpu``; see the module docstring.

    ``model``: anything ``autofit.model.resolve`` takes. ``gpu``: a ``GpuInfo``, catalog name, size, device index,
    ``"cpu"``, or None for the detected card (the CPU and its RAM when there is none, as ``train()`` does).
    ``seq_len`` fixes the sequence length; else it comes from ``dataset`` (a file or a list of samples; the 95th
    percentile of token lengths) or defaults to 1024 (or the model's positions), halved while nothing fits.
    ``effective_batch`` is kept exactly: batch x accumulation; ``"max"`` takes the largest micro-batch that fits, with
    no accumulation; None lets the card decide (the largest micro-batch that fits up to 64, or 16 with accumulation
    when fewer fit; 16 on the CPU). ``method``: "auto" (the strongest method that fits a useful micro-batch: full,
    then LoRA, then QLoRA), "full", "lora" or "qlora". ``gradient_checkpointing`` None lets the planner choose.
    ``eval_batch_size`` fixes the evaluation batch (default: the largest up to 64 that fits after the training
    step). ``reserved_by_others`` (bytes, or a size such as ``"800MiB"``) replaces what the card is assumed to hold
    for other processes (a desktop GeForce card from the catalog: ``gpu.DISPLAY_ALLOWANCE`` for its display).
    ``margin``: the share of the card kept free beyond the estimate (default 0.05; on the CPU, by default, half the RAM
    available is the budget). ``probe`` (None: when the card is present) confirms the plan with trial steps on the
    card. ``allow`` names the optimizer levers full fine-tuning may pull when plain AdamW leaves no useful
    micro-batch (``offload.LEVERS``: "8bit", "paged", "cpu-offload"; default: all when method="full" is asked, none
    for "auto" unless named) and whether activations may be offloaded ("activations": pulled, for any method, only
    when nothing fits at the sequence length without it; allowed unless ``allow`` leaves it out);
    ``no_offload`` forbids the ones that hold state in host RAM. ``offload_activations`` True offloads them in
    every configuration tried, False never (None: as a lever). Every plan carries its
    host-RAM estimate (``plan.host``) and the data loader that fits it. Raises
    ``DoesNotFitError`` when nothing fits, naming what binds and every way out, in one line.
    """
    spec = models.resolve(model)
    reasons: list[str] = []
    card = _card(gpu, reasons)
    if reserved_by_others is not None:
        reserved = _byte_count(reserved_by_others, "reserved_by_others")
        card = gpus.with_reserved_by_others(card, reserved)
        reasons.append(f"{fmt_bytes(reserved)} of the card held by other processes, as reserved_by_others says")
    elif card.source == "catalog" and card.used_by_others_bytes:
        reasons.append(f"{fmt_bytes(card.used_by_others_bytes)} of the card assumed held by the display and desktop "
                       "programs (a desktop GeForce card usually drives the screen); pass reserved_by_others=0 for a "
                       "headless card, or what nvidia-smi shows in use")
    validate.plan_inputs(spec, card, seq_len=seq_len, effective_batch=effective_batch, method=method, dataset=dataset,
                         tokenizer=tokenizer, margin=margin, precision=precision, optimizer=optimizer,
                         quantization=quantization, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         lora_targets=lora_targets, gradient_checkpointing=gradient_checkpointing, probe=probe)
    allowed = budget(card, margin)
    measured = _read_context(card)
    if measured is not None:
        reasons.append(f"CUDA context and workspaces outside PyTorch's allocator: {fmt_bytes(measured[0])}, the largest "
                       f"of {measured[1]} earlier probe measurement{'s' if measured[1] != 1 else ''} on {card.name} "
                       f"({calibration.context_versions()}), in place of the assumed "
                       f"{fmt_bytes(memory.cuda_context_bytes())}")
    if card.source == "host" and margin is None:
        reasons.append(f"budget {fmt_bytes(allowed)}: {HOST_RAM_SHARE:.0%} of the {fmt_bytes(card.free_bytes)} of RAM "
                       f"available now (of {fmt_bytes(card.total_bytes)}); the rest stays for the system, the data "
                       "loader and other programs")
    if method not in ("auto", "full", "lora", "qlora"):
        raise ConfigError(f"method must be auto, full, lora or qlora; got {method!r}")
    want_max = effective_batch == "max"
    if want_max:
        effective_batch = None
    elif effective_batch is not None and (isinstance(effective_batch, bool) or not isinstance(effective_batch, int)):
        raise ConfigError(f"effective_batch must be a whole number of sequences or 'max'; got {effective_batch!r}")
    if effective_batch is not None and effective_batch < 1:
        raise ConfigError(f"effective batch must be at least 1; got {effective_batch}")
    if eval_batch_size is not None and (isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int)
                                        or eval_batch_size < 1):
        raise ConfigError(f"eval_batch_size must be a whole number of sequences >= 1; got {eval_batch_size!r}")
    host_default = card.source == "host" and effective_batch is None and not want_max
    if host_default:
        effective_batch = DEFAULT_EFFECTIVE_BATCH
    adaptive = effective_batch is None
    target_batch = effective_batch or MAX_DEFAULT_BATCH
    pairs = spec.task == "seq2seq-lm" and dataset is not None and seq2seq.is_pairs(dataset) and seq_len is None
    if pairs:  # an encoder-decoder's data: a source and a target length, each from its side of the pairs
        spec, seq_len, why = seq2seq.lengths_for(spec, dataset, tokenizer, seq_len)
        reasons.append(why)
        dataset = None
    seq, seq_source, truncated, lengths = _sequence_length(spec, seq_len, dataset, tokenizer, reasons, progress)
    if pairs:
        seq_source = "data"
        reasons.remove(f"sequence length {seq} as asked")
    knobs = dict(precision=precision, optimizer=optimizer, lora_r=lora_r, lora_alpha=lora_alpha,
                 lora_dropout=lora_dropout, lora_targets=tuple(lora_targets) if lora_targets else None)
    methods = ("full", "lora", "qlora") if method == "auto" else (method,)
    if quantization not in (None, "none", "4bit", "8bit"):
        raise ConfigError(f"quantization must be none, 4bit or 8bit; got {quantization!r}")
    checkpointing = (False, True) if gradient_checkpointing is None else (gradient_checkpointing,)
    levers = _levers(card, method, optimizer, allow, no_offload)
    if offload_activations is not None:
        validate.flag("offload_activations", offload_activations)
    if offload_activations and card.source == "host":
        raise ConfigError("activation offloading moves a card's saved tensors to host RAM; a run on the CPU has "
                          "nothing to offload (drop offload_activations / --offload-activations)")
    if offload_activations:
        knobs["offload_activations"] = True
    activations = (offload_activations is None and card.source != "host"
                   and offload.ACTIVATIONS in offload.allowed(allow, no_offload=no_offload))
    asked = _Asked(methods=methods, method=method, quantization=quantization, knobs=knobs,
                   checkpointing=checkpointing, seq_source=seq_source, eval_batch_size=eval_batch_size,
                   margin=margin, levers=levers, activations=activations)

    bases = _feasible_methods(spec, card, allowed, methods, quantization, knobs, reasons, _loaded_precision(spec),
                              levers)
    # stages: each checkpointing setting of the first method, then the exact settling and the largest micro-batch;
    # the count grows when the search goes on to a lighter method or a shorter sequence
    outer, progress = progress, counted(progress, len(checkpointing) + 2, f"planning {spec.name}")
    try:
        result = _plan(spec, card, allowed, seq, seq_source, truncated, lengths, bases, asked, reasons, target_batch,
                       adaptive, want_max, host_default, eval_batch_size, progress)
    finally:
        if progress is not None:
            progress.close()
    use_probe = probe if probe is not None else (card.source in ("nvml", "torch") and _cuda_present(card))
    if use_probe:
        result = probing.probe(result, spec=spec, progress=outer)
    return result


def _plan(spec, card, allowed, seq, seq_source, truncated, lengths, bases, asked: _Asked, reasons, target_batch,
          adaptive, want_max, host_default, eval_batch_size, progress) -> Plan:
    """The search and its settling, once the asked knobs are read and checked (see ``plan``)."""
    method, checkpointing = asked.method, asked.checkpointing
    if not bases:
        raise _does_not_fit(spec, card, allowed, seq, asked, progress)
    shortened = False

    def settled(found: _Candidate | None):
        """(reasons before settling, fast model's speed, what ``_settle`` returns) of ``found``, or None where
        nothing was found or its micro-batch 1 does not fit once simulated exactly (its reasons taken back)."""
        if found is None:
            return None
        before, searched = len(reasons), found.speed.tokens_per_second
        try:
            return before, searched, _settle(spec, found, card, allowed, seq, target_batch, lengths, reasons,
                                             progress, adaptive, eval_batch_size, want_max)
        except DoesNotFitError as err:
            del reasons[before:]
            reasons.append(f"{_config_name(found.cfg)} ruled out at {seq} tokens once simulated exactly ("
                           f"{str(err).split(': ', 1)[-1]})")
            return None

    while True:
        seen: list[_Candidate] = []
        chosen = _search(spec, card, allowed, seq, target_batch, bases, method, checkpointing, reasons, progress, seen,
                         adaptive, shortened)
        done = settled(chosen)
        if done is None and asked.activations:
            chosen = _offloaded_search(spec, card, allowed, seq, target_batch, bases, method, checkpointing, reasons,
                                       progress, seen, adaptive, shortened)
            done = settled(chosen)
        if done is not None:
            break
        if seq_source == "user" or seq <= MIN_SEQ_LEN:
            raise _does_not_fit(spec, card, allowed, seq, asked, progress)
        shorter = max(MIN_SEQ_LEN, seq // 2 // 64 * 64 or MIN_SEQ_LEN)
        reasons.append(f"sequence length shortened from {seq} to {shorter}: nothing fits at {seq}")
        seq, shortened = shorter, True
        if lengths is not None:
            truncated = data.truncated_share(lengths, seq)
            reasons.append(f"{truncated:.1%} of the data's samples are longer than {seq} tokens and will be truncated")

    cand = chosen
    mark, searched, (estimate, run, expandable, need) = done
    if cand.speed.tokens_per_second < searched and len(checkpointing) == 2:
        rival = _rival(spec, cand, seen, card, allowed, seq, target_batch, progress, adaptive)
        if rival is not None:
            theirs = reasons[:mark]
            try:
                settled = _settle(spec, rival, card, allowed, seq, target_batch, lengths, theirs, progress,
                                  adaptive, eval_batch_size, want_max)
            except DoesNotFitError:
                settled = None
            if settled is not None and rival.speed.tokens_per_second > cand.speed.tokens_per_second:
                _switch_reason(theirs, cand, rival)
                reasons[:] = theirs
                cand, (estimate, run, expandable, need) = rival, settled
    # (a method useful only with checkpointing, trained faster without it, keeps its smaller micro-batch by design)
    chose = next((i for i, r in enumerate(reasons[:mark]) if r.startswith(f"{_config_name(cand.cfg)} chosen: ")
                  and "fits a micro-batch of" in r and "no method fits" not in r
                  and "the faster setting without it is used" not in r), None)
    useful = min(USEFUL_BATCH, cand.effective)
    if chose is not None and cand.batch_size < useful and not want_max:
        # chosen as the strongest method that fits a useful micro-batch, which it no longer does once settled: the
        # lighter methods are searched and settled as the rule asks; the stronger method stays where none does
        base = replace(cand.cfg, gradient_checkpointing=False)
        lighter = bases[bases.index(base) + 1:] if base in bases else []
        theirs, found, switched = reasons[:mark], [], False
        alt = _search(spec, card, allowed, seq, target_batch, lighter, method, checkpointing, theirs, progress,
                      found, adaptive, shortened) if lighter else None
        if alt is not None:
            try:
                settled = _settle(spec, alt, card, allowed, seq, target_batch, lengths, theirs, progress, adaptive,
                                  eval_batch_size, want_max)
            except DoesNotFitError:
                settled = None
            if settled is not None and alt.batch_size >= min(USEFUL_BATCH, alt.effective):
                theirs[chose] = (f"{_config_name(cand.cfg)} passed over: it settles at micro-batch {cand.batch_size} "
                                 f"(simulated exactly and checked against the run), below {useful}")
                theirs[:] = [r for r in theirs if r != _SIXTEEN_BIT_TRADE or _sixteen_bit(alt.cfg)]
                reasons[:] = theirs
                seen.extend(found)
                cand, (estimate, run, expandable, need), switched = alt, settled, True
        if not switched:
            reasons[chose] = (f"{_config_name(cand.cfg)} chosen: the strongest method that fits; it settles at "
                              f"micro-batch {cand.batch_size} (simulated exactly and checked against the run)"
                              + (f", and no lighter method reaches {useful} either" if lighter else ""))
    unknown = memory.uncertainty_bytes(estimate, context_measured=cand.context_measured)
    if card.source != "host" and not cand.calibrated and unknown > cand.kept:
        note = memory.UNCERTAINTY_NOTE if not cand.context_measured else memory.ALLOCATOR_NOTE
        reasons.append(f"{fmt_bytes(unknown)} kept free (more than the budget's margin) for what the estimate does "
                       f"not know until a probe on this card measures it ({note})")
    if want_max:
        reasons.insert(0, f"effective batch {cand.effective}: the largest micro-batch that fits, one step each, as "
                          "effective_batch='max' asked")
    elif host_default:
        reasons.insert(0, f"effective batch {cand.effective}: the default; on a CPU a larger micro-batch runs no "
                          "faster, it only lengthens each step, so it does not grow to fill the memory; pass "
                          "effective_batch=N to change it")
    elif adaptive:
        reasons.insert(0, f"effective batch {cand.effective}: " + (
            f"the largest micro-batch that fits (at most {MAX_DEFAULT_BATCH}), as none was asked"
            if cand.batch_size >= DEFAULT_EFFECTIVE_BATCH else
            f"the default, micro-batches accumulating to it") + "; pass effective_batch=N to fix it, or "
            "effective_batch='max' for the largest micro-batch")
    alternatives = tuple(
        dict(config={k: _plain(getattr(c.cfg, k)) for k in c.cfg.__slots__}, batch_size=c.batch_size,
             grad_accum=c.grad_accum,
             tokens_per_second=round(c.speed.tokens_per_second, 1))
        for c in seen if c is not cand and c.speed.tokens_per_second >= CLOSE * cand.speed.tokens_per_second)
    trainable = _trainable(spec, cand.cfg)
    if offload.is_lever(cand.cfg):
        reasons.append(_lever_reason(spec, cand, card, seq))
    if cand.cfg.offload_activations and asked.activations:
        copy = offload.activation_seconds(estimate.offloaded_copied, card) * cand.grad_accum
        share = copy / (cand.effective * seq / cand.speed.tokens_per_second)
        reasons.append(offload.activation_reason(seq, estimate.offloaded_pinned, estimate.offloaded_copied, card,
                                                 share))
    host_estimate = _host(spec, cand, estimate, need, seq, lengths, reasons)
    return Plan(
        model_name=spec.name, gpu=card, method=cand.cfg.method, quantization=cand.cfg.quantization,
        precision=cand.cfg.precision, gradient_checkpointing=cand.cfg.gradient_checkpointing,
        optimizer=cand.cfg.optimizer,
        lora_r=cand.cfg.lora_r if cand.cfg.uses_lora else None,
        lora_alpha=(cand.cfg.lora_alpha or 2 * cand.cfg.lora_r) if cand.cfg.uses_lora else None,
        lora_dropout=cand.cfg.lora_dropout if cand.cfg.uses_lora else None,
        lora_targets=(cand.cfg.lora_targets or spec.lora_targets) if cand.cfg.uses_lora else None,
        batch_size=cand.batch_size, grad_accum=cand.grad_accum, effective_batch=cand.effective, seq_len=seq,
        eval_batch_size=cand.eval_batch_size, budget_bytes=allowed, estimate=estimate,
        tokens_per_second=cand.speed.tokens_per_second, source="estimated", reasons=tuple(reasons),
        seq_len_source=seq_source, truncated_share=truncated, alternatives=alternatives,
        expandable_segments=expandable, run=run, need_bytes=need,
        largest_batch=max(cand.largest, cand.batch_size), gradient_bytes=GRADIENT_BYTES * trainable,
        trainable_params=trainable, task=spec.task, target_len=spec.target_len, host=host_estimate,
    )



def _settle(spec, cand: _Candidate, card, allowed, seq, target_batch, lengths, reasons, progress, adaptive,
            eval_batch_size, want_max) -> tuple[MemoryEstimate, "runs.RunEstimate | None", bool, int]:
    """Settles ``cand`` by exact simulation (``_confirm``), then against a run of varying lengths (``_run_check``,
    on a GPU). Returns the step estimate, the run's estimate, whether expandable segments are on, and the bytes
    needed."""
    estimate = _confirm(spec, cand, card, allowed, seq, target_batch, reasons, progress, adaptive, eval_batch_size)
    if want_max:
        if cand.largest > cand.batch_size:
            estimate = cand.largest_estimate
            cand.batch_size = cand.largest
        cand.grad_accum, cand.effective = 1, cand.batch_size
        cand.speed = throughput(spec, cand.cfg, card, batch_size=cand.batch_size, seq_len=seq, grad_accum=1,
                                offloaded=_copied(cand, cand.batch_size, seq),
                                trainable=_trainable(spec, cand.cfg))
    if want_max:  # the micro-batch reasons were about the default effective batch, not this one
        reasons[:] = [r for r in reasons if not r.startswith(("micro-batch ", "headroom "))]
        _headroom_reason(reasons, allowed, cand.need(estimate), estimate)
    run, expandable, need = None, False, cand.need(estimate)
    if card.source != "host":
        estimate, run, expandable = _run_check(spec, cand, card, allowed, seq, target_batch, lengths, reasons,
                                               progress, adaptive, estimate, want_max)
        if run is not None:
            need = max(cand.need(estimate), cand.need(estimate, run.min_reserved))
            reasons[:] = [r for r in reasons if not r.startswith("headroom ")]
            _headroom_reason(reasons, allowed, need, estimate)
    for index, text in cand.deferred:  # reasons that quote the candidate, written now that it is settled
        reasons[index] = text(cand)
    return estimate, run, expandable, need


def _rival(spec, cand: _Candidate, seen: list[_Candidate], card, allowed, seq, target_batch, progress,
           adaptive) -> _Candidate | None:
    """The other checkpointing setting of ``cand``'s configuration, when its fast-model speed beats ``cand``'s settled
    one: settling (exact simulation, then the run) can step a micro-batch down, and the setting that lost on the
    fast model can then be the faster. Sized now where the search skipped it."""
    flipped = replace(cand.cfg, gradient_checkpointing=not cand.cfg.gradient_checkpointing)
    rival = next((c for c in seen if c.cfg == flipped), None)
    if rival is None:
        rival = _size(spec, flipped, card, allowed, seq, target_batch, progress, adaptive)
        if not rival.max_batch:
            return None
    return rival if rival.speed.tokens_per_second > cand.speed.tokens_per_second else None


def _switch_reason(reasons: list[str], lost: _Candidate, won: _Candidate) -> None:
    """Replaces what the search said of ``lost``'s checkpointing setting with why ``won``'s is used after all."""
    on = won.cfg.gradient_checkpointing
    text = (f"gradient checkpointing {'on' if on else 'off'}: {won.speed.tokens_per_second:,.0f} estimated tokens/s at "
            f"micro-batch {won.batch_size}, against {lost.speed.tokens_per_second:,.0f} "
            f"{'without' if on else 'with'} it once simulated exactly and checked against the run "
            f"(micro-batch {lost.batch_size})")
    stale = [index for index, _ in lost.deferred + won.deferred]
    if stale:
        reasons[stale[0]] = text
        for index in sorted(stale[1:], reverse=True):
            del reasons[index]
    else:
        reasons.append(text)

def _plain(value):
    """A config value as JSON keeps it (tuples as lists), so a plan equals itself read back from plan.json."""
    return list(value) if isinstance(value, tuple) else value


def _card(gpu, reasons: list[str]) -> gpus.GpuInfo:
    """The card ``gpu`` names; None is the detected card, or this machine's CPU and RAM when there is none."""
    if gpu is None:
        found = gpus.detect()
        if found:
            return found[0]
        reasons.append("no CUDA GPU detected: planned for this machine's CPU and RAM, where train() would run; pass "
                       "gpu='rtx3060' (or any card autofit knows, or a size such as gpu='12GiB') to plan for a card")
        return gpus.host_memory()
    return gpus.resolve(gpu)


def _byte_count(value, name: str) -> int:
    if isinstance(value, str):
        return parse_size(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a byte count >= 0 or a size such as '512MiB'; got {value!r}")
    return value


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
                              "tokenizer=... or seq_len=...")
        measured = data.measure_lengths(samples, tok, progress=progress)
        lengths = measured.lengths
        choice = data.choose_seq_len(lengths, max_positions=spec.max_positions)
        reasons.append(f"sequence length {choice.seq_len}: the {choice.percentile:g}th percentile of {choice.samples} "
                       f"samples is {choice.percentile_tokens} tokens (longest {choice.max_tokens}), rounded up to a "
                       f"multiple of 64; {choice.truncated_share:.1%} of samples truncated{measured.note}")
        return choice.seq_len, "data", choice.truncated_share, lengths
    seq = min(DEFAULT_SEQ_LEN, spec.max_positions or DEFAULT_SEQ_LEN)
    reasons.append(f"sequence length {seq} by default (pass seq_len=N, or a dataset to measure it)")
    return seq, "default", None, None


def _state_scale(cfg: StepConfig) -> float:
    """Bytes of a trainable weight's gradient and AdamW moments relative to fp32: 0.5 when full fine-tuning trains
    16-bit weights (their gradients and moments are 16-bit too), else 1."""
    return 0.5 if cfg.method == "full" and cfg.weights_dtype != torch.float32 else 1.0


def _static_bytes(spec, cfg: StepConfig) -> int:
    """Weights, gradients and optimizer state: memory that does not depend on the batch (a lower bound)."""
    counts = models.count_params(spec, method=cfg.method, quantization=cfg.quantization, half=cfg.half,
                                 lora_r=cfg.lora_r, lora_targets=cfg.lora_targets)
    sizes = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "nf4": 0.516}
    scale = _state_scale(cfg)
    weights = sum(n * sizes.get(k, 4) for k, n in counts.by_dtype.items()) * scale
    per_trainable = 4 * scale + offload.state_bytes_per_param(cfg, scale)
    return int(weights + per_trainable * counts.trainable)


def _trainable(spec, cfg: StepConfig) -> int:
    return models.count_params(spec, method=cfg.method, quantization=cfg.quantization, half=cfg.half,
                               lora_r=cfg.lora_r, lora_targets=cfg.lora_targets).trainable


def _loaded_precision(spec) -> str | None:
    """The "-true" precision of a model object whose floating-point weights are all 16-bit (transformers 5 loads
    checkpoints in their stored dtype), or None: a name, a config, or an fp32 or quantized model."""
    if spec.module is None:
        return None
    dtypes = {p.dtype for p in spec.module.parameters() if p.is_floating_point()}
    if dtypes == {torch.bfloat16}:
        return "bf16-true"
    if dtypes == {torch.float16}:
        return "16-true"
    return None


def _feasible_methods(spec, card, allowed, methods, quantization, knobs, reasons, loaded=None,
                      levers: tuple[str, ...] = ()) -> list[StepConfig]:
    """Step configs (checkpointing off) of the methods whose weights, gradients and optimizer state fit at all, the
    strongest first. Full fine-tuning comes in two precisions when none is asked: fp32 weights under autocast, then
    16-bit weights (bf16-true), where the card has bf16; a model object loaded in 16 bits is planned as loaded."""
    bases = []
    for method in methods:
        quant = "none"
        if method == "qlora":
            quant = quantization if quantization in ("4bit", "8bit") else "4bit"
        variants = [knobs]
        if method == "full" and knobs.get("precision") is None:
            if loaded is not None:
                variants = [dict(knobs, precision=loaded)]
                reasons.append(f"full fine-tuning in {loaded}: the model was loaded with 16-bit weights, so its "
                               "gradients and AdamW states are 16-bit too (pass precision='bf16-mixed' for fp32 "
                               "weights under autocast)")
            elif card.bf16 and card.source != "host":
                variants = [knobs, dict(knobs, precision="bf16-true")]
        if method == "full":
            variants = variants + offload.variants(variants, levers)  # levers after the plain optimizer
        for variant in variants:
            base = memory.step_config(card, method=method, quantization=quant, gradient_checkpointing=False, **variant)
            if offload.is_lever(base) and not _host_holds(spec, base, reasons):
                continue
            static = _static_bytes(spec, base)
            if static > allowed - (_context(card) if base.device == "cuda" else 0):
                name = _config_name(base)
                if len(variants) > 1 and base.autocast and not offload.is_lever(base):
                    name += f" with fp32 weights ({base.precision})"
                reasons.append(f"{name} ruled out: weights, gradients and optimizer state alone need "
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
    lever: _Candidate | None = None  # the fastest optimizer lever so far that fits a useful micro-batch
    for base in bases:
        if lever is not None and not offload.is_lever(base):
            return _chosen_lever(lever, reasons)
        if lever is not None and _cannot_beat(spec, base, card, seq, target_batch, min(checkpointing), lever):
            reasons.append(f"{_config_name(base)} not tried: even with the whole effective batch in one micro-batch "
                           f"it would be slower than {lever.cfg.optimizer} at micro-batch {lever.batch_size}")
            continue
        name = _config_name(base)
        per_method = []
        lean = replace(base, gradient_checkpointing=max(checkpointing))
        if ((shortened or _static_bytes(spec, base) > allowed // 2)
                and _exact(spec, lean, card, 1, seq, progress).required_bytes > allowed):
            reasons.append(f"{name} ruled out at {seq} tokens: a micro-batch of 1 does not fit")
            continue
        for ckpt in checkpointing:
            cfg = replace(base, gradient_checkpointing=ckpt)
            if ckpt and per_method and _checkpointing_cannot_win(spec, cfg, card, seq, target_batch, per_method[0]):
                _defer(per_method[0], reasons, lambda c: (
                    f"gradient checkpointing off: even with the whole effective batch in one micro-batch, "
                    f"recomputation would cost more than micro-batch {c.batch_size} gains"))
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
            reasons.append(f"{name} ruled out at {seq} tokens: a micro-batch of 1 does not fit")
            continue
        best = max(per_method, key=lambda c: c.speed.tokens_per_second)
        if len(per_method) == 1 and len(checkpointing) == 2 and best.cfg.gradient_checkpointing:
            reasons.append(f"gradient checkpointing on: without it {name} does not fit a micro-batch "
                           f"of 1 at {seq} tokens")
        if len(per_method) == 2:
            other = next(c for c in per_method if c is not best)
            _defer(best, reasons, lambda c, other=other: (
                f"gradient checkpointing {'on' if c.cfg.gradient_checkpointing else 'off'}: "
                f"{c.speed.tokens_per_second:,.0f} estimated tokens/s at micro-batch {c.batch_size}, against "
                f"{other.speed.tokens_per_second:,.0f} {'without' if c.cfg.gradient_checkpointing else 'with'} it "
                f"(at most micro-batch {other.batch_size})"))
        found.append(best)
        # a method that fits a useful micro-batch in either checkpointing setting is strong enough; its fastest
        # setting is the one used
        if offload.is_lever(base):  # levers are ranked by speed among themselves before one is chosen
            if any(c.batch_size >= min(USEFUL_BATCH, c.effective) for c in per_method) and (
                    lever is None or best.speed.tokens_per_second > lever.speed.tokens_per_second):
                lever = best
            continue
        if len(bases) > 1 and any(c.batch_size >= min(USEFUL_BATCH, c.effective) for c in per_method):
            useful = min(USEFUL_BATCH, best.effective)
            how = "" if best.batch_size >= useful else " (with checkpointing; the faster setting without it is used)"
            if base is not bases[0]:
                reasons.append(f"{name} chosen: the strongest method that fits a micro-batch of "
                               f"{useful} or more{how}")
            else:
                reasons.append(f"{name} chosen: it fits a micro-batch of {useful} or more{how}")
            if base.method == "full" and _sixteen_bit(base):
                reasons.append(_SIXTEEN_BIT_TRADE)
            return best
    if lever is not None:
        return _chosen_lever(lever, reasons)
    if not found:
        return None
    best = max(found, key=lambda c: (c.batch_size >= min(USEFUL_BATCH, c.effective), c.speed.tokens_per_second))
    if method_asked == "auto":
        reasons.append(f"{_config_name(best.cfg)} chosen: no method fits a micro-batch of "
                       f"{min(USEFUL_BATCH, best.effective)}; this one is fastest")
    if best.cfg.method == "full" and _sixteen_bit(best.cfg):
        reasons.append(_SIXTEEN_BIT_TRADE)
    return best


def _offloaded_search(spec, card, allowed, seq, target_batch, bases, method_asked, checkpointing, reasons, progress,
                      seen, adaptive, shortened) -> _Candidate | None:
    """The search again with every configuration's activations offloaded to host RAM (the lever pulled when nothing
    fits at ``seq`` without it); None when nothing fits this way either or the host cannot hold the copies."""
    offloaded = [replace(b, offload_activations=True) for b in bases if not b.offload_activations]
    if not offloaded:
        return None
    found: list[_Candidate] = []
    chosen = _search(spec, card, allowed, seq, target_batch, offloaded, method_asked, checkpointing, reasons,
                     progress, found, adaptive, shortened)
    if chosen is None:
        return None
    # settled as every plan is: exactly, with the estimate's uncertainty kept free (the fast model ranks without it)
    ratio, samples = _calibration(spec, chosen.cfg, card)
    chosen.ratio, chosen.calibrated, chosen.kept = ratio, bool(samples), _available(card) - allowed
    least = chosen.need(_exact(spec, chosen.cfg, card, 1, seq, progress))
    if least > allowed:
        reasons.append(f"offloading activations ruled out at {seq} tokens: {_config_name(chosen.cfg)} still needs "
                       f"{fmt_bytes(least)} at micro-batch 1, the budget is {fmt_bytes(allowed)}")
        return None
    pinned = chosen.step_model.offloaded(chosen.batch_size, seq)[0]
    machine = hostmem.Machine.now()
    plain = hostmem.estimate(spec, replace(chosen.cfg, offload_activations=False), batch_size=chosen.batch_size,
                             seq_len=seq, tokens=None, loader=hostmem.Loader(num_workers=0, pin_memory=False),
                             machine=machine)
    if plain.peak_bytes + pinned > machine.available_bytes:
        reasons.append(f"offloading activations ruled out at {seq} tokens: the copies need {fmt_bytes(pinned)} of "
                       f"pinned host RAM, and with the run's own {fmt_bytes(plain.peak_bytes)} that is more than the "
                       f"{fmt_bytes(machine.available_bytes)} available")
        return None
    seen.extend(found)
    return chosen


# -- the optimizer levers (offload.py): 8-bit, paged 8-bit and CPU-offloaded AdamW state -----------------------------
def _levers(card, method: str, optimizer: str, allow, no_offload: bool) -> tuple[str, ...]:
    """The levers the search may pull: those allowed, for full fine-tuning on a card, when the optimizer asked is a
    plain AdamW; by default only when method="full" is asked (``auto`` moves to LoRA first)."""
    names = offload.allowed(allow, no_offload=no_offload)
    if card.source == "host" or optimizer in offload.LEVER_OF or (allow is None and method != "full"):
        return ()
    return names


def _host_holds(spec, cfg: StepConfig, reasons: list[str]) -> bool:
    """Whether host RAM available now holds what the lever of ``cfg`` keeps there, with the run's own host need
    (``host.estimate`` without the lever); says so in the reasons when it does not."""
    held = sum(offload.host_bytes(spec, cfg).values())
    if not held:
        return True
    machine = hostmem.Machine.now()
    plain = hostmem.estimate(spec, replace(cfg, optimizer="adamw_torch_fused"), batch_size=1, seq_len=MIN_SEQ_LEN,
                             tokens=None, loader=hostmem.Loader(num_workers=0, pin_memory=False), machine=machine)
    if plain.peak_bytes + held <= machine.available_bytes:
        return True
    reasons.append(f"{_config_name(cfg)} ruled out: it keeps {fmt_bytes(held)} in host RAM, and with the run's own "
                   f"{fmt_bytes(plain.peak_bytes)} that is more than the {fmt_bytes(machine.available_bytes)} available")
    return False


def _cannot_beat(spec, cfg: StepConfig, card, seq, target_batch, checkpointing: bool, lever: _Candidate) -> bool:
    """True when ``cfg`` at its best case (the whole effective batch in one micro-batch) is no faster than ``lever``."""
    best_case = throughput(spec, replace(cfg, gradient_checkpointing=checkpointing), card, batch_size=target_batch,
                           seq_len=seq, grad_accum=1, trainable=_trainable(spec, cfg))
    return best_case.tokens_per_second <= lever.speed.tokens_per_second


def _chosen_lever(cand: _Candidate, reasons: list[str]) -> _Candidate:
    reasons.append(f"{_config_name(cand.cfg)} chosen: plain AdamW leaves no micro-batch of "
                   f"{min(USEFUL_BATCH, cand.effective)}; of the optimizer levers allowed, this one is fastest")
    if _sixteen_bit(cand.cfg):
        reasons.append(_SIXTEEN_BIT_TRADE)
    return cand


def _lever_reason(spec, cand: _Candidate, card, seq: int) -> str:
    """What the chosen lever bought (the static part on the card) and cost (estimated speed against plain AdamW)."""
    plain = replace(cand.cfg, optimizer="adamw_torch_fused")
    state = offload.layout(spec, cand.cfg)
    plain_state = offload.layout(spec, plain)
    speed = throughput(spec, plain, card, batch_size=cand.batch_size, seq_len=seq, grad_accum=cand.grad_accum,
                       trainable=_trainable(spec, plain)).tokens_per_second
    return offload.reason(cand.cfg, plain_state.device, state.device, speed, cand.speed.tokens_per_second,
                          offload.host_bytes(spec, cand.cfg))


def _host(spec, cand: _Candidate, estimate: MemoryEstimate, need: int, seq: int, lengths, reasons: list[str]):
    """The run's host-RAM estimate with the data loader that fits (``host.plan_host``); its reasons appended."""
    cpu = cand.cfg.device == "cpu"
    try:
        est, notes = hostmem.plan_host(
            spec, cand.cfg, batch_size=cand.batch_size, seq_len=seq, tokens=hostmem.tokens_of(lengths, seq),
            step_bytes=need if cpu else 0,
            step_resident=estimate.weights + estimate.gradients + estimate.optimizer_state if cpu else 0,
            offloaded=estimate.offloaded_pinned)
    except Exception as err:  # the host estimate never stops a plan
        log.warning("host memory not estimated (%s)", err)
        return None
    reasons.extend(notes)
    return est


def _defer(cand: _Candidate, reasons: list[str], text: Callable[[_Candidate], str]) -> None:
    """A reason that quotes ``cand``: written now with its method named, and again without once ``cand`` is chosen
    and settled (its micro-batch may still change when simulated exactly)."""
    cand.deferred.append((len(reasons), text))
    name = _config_name(cand.cfg) if offload.is_lever(cand.cfg) else _method_name(cand.cfg.method)
    reasons.append(f"{name}: {text(cand)}")


def _checkpointing_cannot_win(spec, cfg, card, seq, target_batch, without: _Candidate) -> bool:
    """True when checkpointing's best case (the whole effective batch in one micro-batch) is still slower."""
    best_case = throughput(spec, cfg, card, batch_size=target_batch, seq_len=seq, grad_accum=1,
                           trainable=_trainable(spec, cfg))
    return best_case.tokens_per_second <= without.speed.tokens_per_second


def _method_name(method: str) -> str:
    return {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}[method]


def _config_name(cfg: StepConfig) -> str:
    """"full fine-tuning", or "full fine-tuning in bf16-true" for 16-bit weights; "LoRA"; "QLoRA"."""
    name = _method_name(cfg.method)
    if offload.is_lever(cfg):
        name = f"{name} in {cfg.precision} with {cfg.optimizer}"
    elif cfg.method == "full" and _sixteen_bit(cfg):
        name = f"{name} in {cfg.precision}"
    return f"{name}, activations offloaded" if cfg.offload_activations else name


# The quality cost of training 16-bit weights, stated wherever a plan chooses it. bf16 keeps 8 bits of mantissa, so
# an update smaller than about 2^-9 of a weight rounds away (no fp32 master copy keeps it); Micikevicius et al. 2018
# ("Mixed Precision Training", section 3.1, "FP32 master copy of weights") show the same effect for fp16 weights.
def _sixteen_bit(cfg: StepConfig) -> bool:
    """16-bit weights without an fp32 master copy (bf16-true, 16-true); 32-true is not."""
    return cfg.precision in ("bf16-true", "16-true")


_SIXTEEN_BIT_TRADE = ("16-bit weights trade quality for memory: without an fp32 master copy, updates smaller than "
                      "about 1/512 of a weight round away (a small learning rate can stall); bf16-mixed keeps fp32 "
                      "weights at twice the memory for weights, gradients and optimizer state")


def _sizes(target_batch: int, adaptive: bool) -> list[int]:
    """Micro-batches a plan may use: divisors of the asked effective batch; without one, 1, 2, 4 and 8 (which
    accumulate to the default of 16) and every size from 16 to the cap (trained without accumulation)."""
    if adaptive:
        return [d for d in range(1, DEFAULT_EFFECTIVE_BATCH) if DEFAULT_EFFECTIVE_BATCH % d == 0] + \
            list(range(DEFAULT_EFFECTIVE_BATCH, MAX_DEFAULT_BATCH + 1))
    return [d for d in range(1, target_batch + 1) if target_batch % d == 0]


def _gallop(ok: Callable[[int], bool], low: int, cap: int) -> int:
    """The largest batch in [``low``, ``cap``] with ``ok`` true, given ``ok(low)`` and that ``ok`` stays false once it
    turns false: doubling from ``low``, then bisecting."""
    high = low * 2
    while high <= cap and ok(high):
        low, high = high, high * 2
    high = min(high, cap + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if ok(mid) else (low, mid)
    return low


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
    stage(progress, f"{_method_name(cfg.method)}, checkpointing {'on' if cfg.gradient_checkpointing else 'off'}"
                    + (", activations offloaded" if cfg.offload_activations else ""))
    cand = _Candidate(cfg=cfg, context=_context(card), context_measured=_measured_context(card) is not None)
    sm = memory.StepModel(spec, cfg, seq_len=seq, evaluate=True, progress=progress)
    cand.step_model = sm
    context = _context(card) if cfg.device == "cuda" else 0

    def largest(fits) -> int:
        return _gallop(fits, 1, target_batch) if fits(1) else 0

    cand.upper = largest(lambda b: sm.query(b, seq)[0] + context <= allowed)
    cand.max_batch = largest(lambda b: memory.from_step_model(sm, b, seq).min_reserved + context <= allowed)
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
                            trainable=_trainable(spec, cfg), offloaded=_copied(cand, cand.batch_size, seq))
    return cand


def _copied(cand: _Candidate, batch_size: int, seq: int) -> int:
    """Bytes a micro-batch of ``cand`` copies each way when it offloads activations (its fast model's fit)."""
    if not cand.cfg.offload_activations or cand.step_model is None:
        return 0
    return cand.step_model.offloaded(batch_size, seq)[1]


def _exact(spec, cfg, card, batch_size, seq, progress, eval_batch_size=None) -> MemoryEstimate:
    est = memory.simulate_point(spec, cfg, batch_size=batch_size, seq_len=seq, eval_batch_size=eval_batch_size,
                                progress=progress)
    if est.cuda_context:
        est = replace(est, cuda_context=_context(card))
    return replace(est, gpu_name=card.name)


def _eval_batch(cand: _Candidate, allowed: int, target_batch: int) -> int:
    """The largest evaluation batch (up to twice the effective batch, at most 64) the fast model fits, at least 1."""
    context = cand.context if cand.cfg.device == "cuda" else 0
    best = 1
    for b in range(1, min(64, 2 * target_batch) + 1):
        if cand.step_model.eval_need(b) + context <= allowed:
            best = b
    return best


def _confirm(spec, cand: _Candidate, card, allowed, seq, target_batch, reasons, progress,
             adaptive: bool = False, eval_batch_size: int | None = None) -> MemoryEstimate:
    """Settles the micro-batch by exact simulation: the largest divisor of the effective batch that fits, searched
    between the fast model's cautious bound and its hard upper bound; then the largest micro-batch that fits at all
    (``cand.largest``). ``eval_batch_size`` fixes the evaluation batch; else it is the largest the fast model fits
    after the training step, halved when the evaluation pass is what does not fit."""
    stage(progress, f"micro-batch {cand.batch_size}, simulated exactly")
    divisors = _sizes(target_batch, adaptive)
    tried: dict[tuple[int, int], MemoryEstimate] = {}
    fixed_eval = eval_batch_size is not None
    cand.eval_batch_size = eval_batch_size if fixed_eval else _eval_batch(cand, allowed, cand.effective)

    ratio, samples = _calibration(spec, cand.cfg, card)
    cand.ratio, cand.calibrated, cand.kept = ratio, bool(samples), _available(card) - allowed
    if samples:
        reasons.append(f"estimates scaled by {ratio:.3f}: measured over estimated memory in {samples} earlier "
                       f"probe trial{'s' if samples != 1 else ''} of this configuration on {card.name}")
    need = cand.need

    def exact(b: int) -> MemoryEstimate:
        key = (b, cand.eval_batch_size)
        if key not in tried:
            tried[key] = _exact(spec, cand.cfg, card, b, seq, progress, cand.eval_batch_size)
        return tried[key]

    def fits(b: int, shrink_eval: bool = True) -> bool:
        est = exact(b)
        # when the evaluation pass is what does not fit, shrink it rather than the training batch
        while (shrink_eval and not fixed_eval and need(est) > allowed and cand.eval_batch_size > 1
               and est.eval_peak is not None and est.eval_peak >= _tensors(est)):
            cand.eval_batch_size //= 2
            est = exact(b)
        return need(est) <= allowed

    # divisors above the cautious choice that the hard bound still allows, smallest first
    above = [d for d in divisors if cand.batch_size < d <= cand.upper]
    below = [d for d in divisors if d <= cand.batch_size]
    chosen = None
    cautious = cand.batch_size
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
        reasons.append(f"micro-batch {cautious} needs {fmt_bytes(need(exact(cautious)))} when simulated exactly; "
                       f"stepped down to {chosen}")
    if chosen is None:
        est = exact(1)
        if fixed_eval and est.eval_peak is not None and est.eval_peak >= _tensors(est):
            fitting = max(1, min(_eval_batch(cand, allowed, cand.eval_batch_size), cand.eval_batch_size - 1))
            raise DoesNotFitError(
                f"the evaluation pass at eval_batch_size={cand.eval_batch_size} does not fit {card.name}: the step "
                f"needs {fmt_bytes(need(est))} of a {fmt_bytes(allowed)} budget; eval_batch_size={fitting} fits, or "
                "leave it to the planner")
        raise DoesNotFitError(f"{spec.name} does not fit {card.name} at batch 1 x {seq} tokens: it needs "
                              f"{fmt_bytes(need(est))}, the budget is {fmt_bytes(allowed)}")
    estimate = exact(chosen)
    cand.effective = _effective(chosen, target_batch, adaptive)
    cand.batch_size, cand.grad_accum = chosen, cand.effective // chosen
    cand.speed = throughput(spec, cand.cfg, card, batch_size=chosen, seq_len=seq, grad_accum=cand.grad_accum,
                            offloaded=_copied(cand, chosen, seq),
                            trainable=_trainable(spec, cand.cfg))
    stage(progress, "the largest micro-batch that fits")
    cand.largest = _largest_batch(cand, chosen, exact, allowed, seq)
    cand.largest_estimate = exact(cand.largest)
    next_up = next((d for d in divisors if d > chosen), None)
    refused = next_up is not None and next_up > cand.largest
    largest = (f"; the largest micro-batch that fits is {cand.largest} (effective_batch='max' takes it)"
               if cand.largest > chosen else "")
    if chosen == target_batch:
        reasons.append(f"micro-batch {chosen}: the whole {'batch cap' if adaptive else 'effective batch'} in one "
                       f"step, no accumulation{largest}")
    elif refused or next_up is None:
        bound = f"micro-batch {next_up} would not fit" if next_up else "nothing larger fits"
        reasons.append(f"micro-batch {chosen} x {cand.grad_accum} accumulation = effective batch {cand.effective}; "
                       f"bound by memory ({bound}" + ("" if adaptive else
                                                      "; micro-batches divide the effective batch exactly") + ")"
                       + largest)
    else:
        reasons.append(f"micro-batch {chosen} x {cand.grad_accum} accumulation = effective batch {cand.effective}"
                       + largest)
    _headroom_reason(reasons, allowed, need(estimate), estimate)
    why = {"bf16-mixed": " (the card supports bf16; fp32 weights, bf16 autocast)",
           "16-mixed": " (no bf16 on this card; fp32 weights, fp16 autocast with loss scaling)",
           "bf16-true": " (16-bit weights, gradients and optimizer states; no autocast)",
           "16-true": " (16-bit weights, gradients and optimizer states; no autocast)",
           "32-true": " (a CPU run)" if card.source == "host" else " (fp32 throughout)"}[cand.cfg.precision]
    if cand.cfg.precision == "16-mixed" and card.source == "size":
        why = (" (a card given only by its size is assumed to lack bf16; pass precision='bf16-mixed' if it has it, "
               "as Ampere and newer cards do)")
    reasons.append(f"precision {cand.cfg.precision}{why}")
    return estimate


def _headroom_reason(reasons: list[str], allowed: int, needed: int, estimate: MemoryEstimate) -> None:
    headroom = allowed - needed
    reasons.append(f"headroom {fmt_bytes(headroom)} ({headroom / allowed:.0%} of the budget); peak at "
                   f"{estimate.where}")


def _largest_batch(cand: _Candidate, chosen: int, exact: Callable[[int], MemoryEstimate], allowed: int,
                   seq: int) -> int:
    """The largest micro-batch that fits, whatever the effective batch, given that ``chosen`` fits; ``exact`` is
    the exactly simulated estimate of a micro-batch.

    The fast model's live tensors are exact in the batch, so nothing past ``hard`` (where they alone pass the budget)
    fits. The guess takes the larger of the fast model's live bytes and the evaluation pass's (which does not grow
    with the training batch), plus the allocator margin seen at ``chosen``; exact simulations then confirm it and
    the next size up, galloping away from the guess only when it is wrong, so a plan usually pays two more
    simulations. Need is taken as rising with the batch.
    """
    sm = cand.step_model
    context = cand.context if cand.cfg.device == "cuda" else 0

    def need(b: int) -> int:
        return cand.need(exact(b))

    def live(b: int) -> int:
        return sm.query(b, seq)[0] + context

    def furthest(ok: Callable[[int], bool]) -> int:  # the largest b in [chosen, cap] with ok(b), ok(chosen) taken
        return _gallop(ok, chosen, LARGEST_BATCH_CAP)

    def fits(b: int) -> bool:
        return need(b) <= allowed

    hard = furthest(lambda b: live(b) <= allowed)
    base = exact(chosen)
    evaluation = (base.eval_peak or 0) + base.workspaces + context
    margin = need(chosen) - max(live(chosen), evaluation)
    guess = min(hard, furthest(lambda b: max(live(b), evaluation) + margin <= allowed))
    if guess == chosen or fits(guess):  # gallop up from the guess to the first size that does not fit
        low, step = guess, 1
        while low + step <= hard and fits(low + step):
            low, step = low + step, step * 2
        high = min(low + step, hard + 1)
    else:  # gallop down to the first size that fits
        high, step = guess, 1
        while high - step > chosen and not fits(high - step):
            high, step = high - step, step * 2
        low = max(high - step, chosen)
    while high - low > 1:  # low fits, high does not
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


# A run is checked with an evaluation pass every RUN_EVAL_EVERY steps at the plan's eval batch, where a Trainer
# that evaluates would run one (an assumption: evaluation every few hundred steps changes the allocator's state the
# same way). Expandable segments are turned on when the run needs them to fit, or when they lower its need by
# EXPANDABLE_GAIN of the budget or more (a policy: below that the plan keeps PyTorch's default allocator).
RUN_EVAL_EVERY = 10
EXPANDABLE_GAIN = 0.03


def _run_check(spec, cand: _Candidate, card, allowed, seq, target_batch, sample_lengths, reasons, progress,
               adaptive, estimate: MemoryEstimate, want_max: bool = False
               ) -> tuple[MemoryEstimate, "runs.RunEstimate | None", bool]:
    """Checks the chosen micro-batch against a run of varying lengths, not two steps: steps it down while the run
    does not fit, and turns on expandable segments where they make it fit or lower its need enough to matter.
    Returns the step estimate at the batch kept, the run's estimate (None where a run cannot be modelled) and
    whether expandable segments are on."""
    try:
        model = runs.run_model(spec, cand.cfg, seq, progress=progress)
    except (SimulationError, ConfigError) as err:
        reasons.append(f"planned on two steps at {seq} tokens; a run of varying lengths was not modelled: {err}")
        return estimate, None, False
    source = "the data's sample lengths" if sample_lengths is not None else runs.DEFAULT_LENGTHS
    first = cand.batch_size
    sizes = range(1, first + 1) if want_max else [d for d in _sizes(target_batch, adaptive) if d <= first]
    for b in reversed(sizes):
        step = estimate if b == first else _exact(spec, cand.cfg, card, b, seq, progress, cand.eval_batch_size)
        step_flex = memory.simulate_point(spec, cand.cfg, batch_size=b, seq_len=seq, expandable_segments=True,
                                          eval_batch_size=cand.eval_batch_size, progress=progress)
        step_flex = replace(step_flex, cuda_context=step.cuda_context, gpu_name=card.name)
        lengths = runs.step_lengths(b, seq, sample_lengths=sample_lengths)
        kw = dict(eval_every=RUN_EVAL_EVERY, eval_batch_size=cand.eval_batch_size, length_source=source)
        plain = model.estimate(b, lengths, step=step, **kw)
        flex = model.estimate(b, lengths, expandable_segments=True, step=step_flex, **kw)
        need_plain = cand.need(step, max(plain.min_reserved, step.min_reserved))
        need_flex = cand.need(step_flex, max(flex.min_reserved, step_flex.min_reserved))
        if min(need_plain, need_flex) <= allowed:
            break
    else:
        raise DoesNotFitError(f"{spec.name} fits two steps of micro-batch 1 x {seq} tokens on {card.name}, but not a "
                              f"run of varying lengths: it needs {fmt_bytes(need_flex)} of a {fmt_bytes(allowed)} "
                              "budget; use a shorter --seq-len or a larger card")
    use_flex = need_plain > allowed or need_plain - need_flex >= EXPANDABLE_GAIN * allowed
    run, step = (flex, step_flex) if use_flex else (plain, step)
    run = replace(run, cuda_context=step.cuda_context)  # the card's measured context, where a probe measured it
    if b != first:
        cand.effective = b if want_max else _effective(b, target_batch, adaptive)
        cand.batch_size, cand.grad_accum = b, cand.effective // b
        cand.speed = throughput(spec, cand.cfg, card, batch_size=b, seq_len=seq, grad_accum=cand.grad_accum,
                                offloaded=_copied(cand, b, seq),
                                trainable=_trainable(spec, cand.cfg))
        reasons.append(f"micro-batch {first} stepped down to {b} x {cand.grad_accum} accumulation: two steps fit, "
                       f"but a run of varying lengths does not (the allocator's cached blocks fragment as shapes "
                       f"change)")
    reasons.append(f"over a run of {run.steps} steps padded to {min(run.lengths)}-{max(run.lengths)} tokens "
                   f"({source}), evaluating every {RUN_EVAL_EVERY}: needs {fmt_bytes(cand.need(step, run.min_reserved))}"
                   f" (two steps at {seq} tokens: {fmt_bytes(cand.need(step))}); {run.growth()}")
    if use_flex:
        why = ("the run fits only with them" if need_plain > allowed else
               f"they lower the run's need by {fmt_bytes(need_plain - need_flex)}")
        reasons.append(f"expandable segments on (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True): {why}, from "
                       f"{fmt_bytes(need_plain)} to {fmt_bytes(need_flex)}")
    return step, run, use_flex


# What earlier probes measured outside the allocator, per card name, read once per plan (``_read_context``).
_CONTEXTS: dict[str, tuple[int, int] | None] = {}


def _read_context(card) -> tuple[int, int] | None:
    """(bytes, measurements) outside PyTorch's allocator that earlier probes measured on ``card`` with this PyTorch,
    CUDA and module loading mode; None when none did (or the cache is off). Remembered for this plan's helpers."""
    found = None
    if card.source != "host" and calibration.cache_root() is not None:
        try:
            store = calibration.open_store()
            if store is not None:
                found = store.context(card.name, calibration.context_versions())
                store.close()
        except Exception as err:  # an unusable cache never stops a plan
            log.warning("calibration unavailable (%s)", err)
    _CONTEXTS[card.name] = found
    return found


def _measured_context(card) -> tuple[int, int] | None:
    return _CONTEXTS.get(card.name)


def _context(card) -> int:
    """Bytes the card's process holds outside PyTorch's allocator: measured by an earlier probe, else assumed."""
    measured = _measured_context(card)
    return measured[0] if measured is not None else memory.cuda_context_bytes()


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


_STATIC_PARTS = {"full": "its weights, gradients and AdamW state", "lora": "its 16-bit weights and the adapters' "
                 "training state", "qlora": "its quantized weights and the adapters' training state"}
_PART_NAMES = {"weights": "weights", "gradients": "gradients", "optimizer_state": "optimizer state",
               "activations": "activations", "logits_and_loss": "logits and loss", "temporaries": "temporaries"}


def _base_config(card, method: str, asked: _Asked, *, checkpointing: bool, **overrides) -> StepConfig:
    quant = "none"
    if method == "qlora":
        quant = asked.quantization if asked.quantization in ("4bit", "8bit") else "4bit"
    knobs = {**asked.knobs, **overrides}
    return memory.step_config(card, method=method, quantization=quant, gradient_checkpointing=checkpointing, **knobs)


def _least_need(spec, cfg: StepConfig, seq: int, card, allowed: int, progress) -> tuple[int, str]:
    """(bytes, what binds) of ``cfg`` at micro-batch 1 x ``seq`` as the search judges it against ``allowed``: the
    simulated step with the card's context and, until a probe measured it, the estimate's uncertainty kept free
    beyond the budget's margin; its static part when the step cannot be simulated. The largest part is named."""
    context = _context(card) if cfg.device == "cuda" else 0
    try:
        est = memory.simulate_point(spec, cfg, batch_size=1, seq_len=seq, progress=progress)
    except Exception:  # the step could not be simulated: its static part is all that is known
        return _static_bytes(spec, cfg) + context, "its weights, gradients and optimizer state"
    ratio, samples = _calibration(spec, cfg, card) if cfg.device == "cuda" else (1.0, 0)
    need = int(est.min_reserved * ratio) + context
    if cfg.device == "cuda" and not samples:
        unknown = memory.uncertainty_bytes(est, context_measured=_measured_context(card) is not None)
        need += max(0, unknown - (_available(card) - allowed))
    parts = {name: getattr(est, name) for name in _PART_NAMES}
    largest = max(parts, key=parts.get)
    return need, f"{_PART_NAMES[largest]} the largest part ({fmt_bytes(parts[largest])})"


def _does_not_fit(spec, card, allowed, seq, asked: _Asked, progress=None) -> DoesNotFitError:
    """The answer when nothing fits, in one line: for every method asked, what binds (its static part, or the step
    at micro-batch 1), then every way out: another method, a shorter sequence, a lever (an 8-bit optimizer,
    checkpointing, 4-bit weights), and the catalog cards that would do."""
    context = _context(card) if card.source != "host" else 0
    shortest = seq if asked.seq_source == "user" else MIN_SEQ_LEN
    lean = max(asked.checkpointing)  # checkpointing where allowed: the least memory a step needs
    terms: list[str] = []
    least: dict[str, int] = {}
    static_binds: dict[str, bool] = {}
    for method in asked.methods:
        cfg = _base_config(card, method, asked, checkpointing=lean)
        static = _static_bytes(spec, cfg) + context
        static_binds[method] = static > allowed
        if static_binds[method]:
            least[method] = static
            terms.append(f"{_STATIC_PARTS[method]} alone need {fmt_bytes(static)}")
        else:
            least[method], binding = _least_need(spec, cfg, shortest, card, allowed, progress)
            terms.append(f"micro-batch 1 x {shortest} tokens{' with checkpointing' if lean else ''} needs "
                         f"{fmt_bytes(least[method])}, {binding}")
    ways: list[str] = []
    order = ("full", "lora", "qlora")

    def longest(cfg: StepConfig) -> int | None:
        """The longest of ``seq``, ``seq`` / 2, ... (at least MIN_SEQ_LEN) at which micro-batch 1 of ``cfg`` fits."""
        length = seq
        while length >= MIN_SEQ_LEN:
            if _least_need(spec, cfg, length, card, allowed, progress)[0] <= allowed:
                return length
            if asked.seq_source != "user":
                return None  # the planner already tried every length down to MIN_SEQ_LEN
            length //= 2
        return None

    # another method: the ones not asked, strongest first; the first that fits makes the lighter ones moot
    for method in order:
        if method in asked.methods:
            continue
        cfg = _base_config(card, method, asked, checkpointing=True)
        if _static_bytes(spec, cfg) + context > allowed:
            continue
        length = longest(cfg)
        if length is None:
            continue
        lighter = [m for m in order[order.index(method) + 1:] if m not in asked.methods]
        named = " or ".join(f"method='{m}'" for m in [method, *lighter])
        ways.append(f"{named} (fits micro-batch 1 x {seq} tokens with checkpointing)" if length == seq else
                    f"{named} with seq_len={length} (fits micro-batch 1 with checkpointing)")
        break
    # a shorter sequence, where the step rather than the static part binds
    dynamic = [m for m in asked.methods if not static_binds[m]]
    if dynamic and asked.seq_source == "user" and seq > MIN_SEQ_LEN:
        method = dynamic[-1]
        length = longest(_base_config(card, method, asked, checkpointing=lean))
        if length is not None and length < seq:
            ways.append(f"seq_len={length} (fits {_method_name(method)} at micro-batch 1)")
    if any(static_binds.values()):
        bound = [_method_name(m) for m in asked.methods if static_binds[m]]
        listed = bound[0] if len(bound) == 1 else ", ".join(bound[:-1]) + " and " + bound[-1]
        ways.append(f"for {listed} a shorter sequence or smaller batch does not help (weights and "
                    "optimizer state do not depend on them)")
    # levers
    if "full" in asked.methods and static_binds.get("full") and asked.knobs.get("optimizer") != "adamw_8bit":
        cfg = _base_config(card, "full", asked, checkpointing=lean, optimizer="adamw_8bit")
        static = _static_bytes(spec, cfg) + context
        verdict = "within the budget" if static <= allowed else "still over it"
        ways.append(f"optimizer='adamw_8bit' (AdamW state in 2 bytes per parameter instead of 8) brings full "
                    f"fine-tuning's static part to {fmt_bytes(static)}, {verdict}")
    if "full" in asked.methods:
        ways.extend(_lever_ways(spec, card, allowed, shortest, lean, asked, context, progress))
    if lean is False and dynamic:
        cfg = _base_config(card, dynamic[-1], asked, checkpointing=True)
        need, _ = _least_need(spec, cfg, shortest, card, allowed, progress)
        ways.append(f"gradient_checkpointing=True (keeps one layer's activations at a time: {fmt_bytes(need)} at "
                    f"micro-batch 1)")
    if "qlora" in asked.methods and asked.quantization == "8bit":
        ways.append("quantization='4bit' (half the weights' bytes of 8-bit)")
    # a card: the least any asked method needs, against each catalog card's budget with the margin asked
    target = min(least.values())
    cards = sorted((c for c in gpus.catalog() if budget(c, asked.margin) >= target), key=lambda c: c.total_bytes)
    names = ", ".join(f"{c.key} ({fmt_bytes(c.total_bytes)})" for c in cards[:4]) or "none in the catalog"
    ways.append(f"cards that would do: {names}")
    if len(asked.methods) == 1:
        which, binding = f"with {_method_name(asked.methods[0])}", terms[0]
    else:
        which = "with any method"
        binding = "; ".join(f"{_method_name(m)}: {t}" for m, t in zip(asked.methods, terms))
    return DoesNotFitError(f"{spec.name} does not fit {card.name} (budget {fmt_bytes(allowed)}) {which}: {binding}. "
                           f"Ways out: {'; '.join(ways)}", binding=binding, ways_out=tuple(ways))


def _lever_ways(spec, card, allowed, seq, lean, asked: _Asked, context, progress) -> list[str]:
    """For each optimizer lever, the least full fine-tuning needs with it (its leanest precision, micro-batch 1 x
    ``seq``, checkpointing where allowed), against the budget; levers the search was not allowed say so."""
    precision = asked.knobs.get("precision") or ("bf16-true" if card.bf16 else None)
    ways = []
    for lever, optimizer in offload.LEVERS.items():
        cfg = _base_config(card, "full", asked, checkpointing=lean, optimizer=optimizer,
                           **({"precision": precision} if precision else {}))
        static = _static_bytes(spec, cfg) + context
        need = static if static > allowed else _least_need(spec, cfg, seq, card, allowed, progress)[0]
        shape = "its static part" if static > allowed else \
            f"micro-batch 1 x {seq} tokens{' with checkpointing' if lean else ''}"
        verdict = "fits" if need <= allowed else "still over"
        held = sum(offload.host_bytes(spec, cfg).values())
        ways.append(f"allow='{lever}' ({optimizer}, {cfg.precision}): {shape} needs {fmt_bytes(need)} on the card, "
                    f"{verdict}" + (f", with {fmt_bytes(held)} in host RAM" if held else "")
                    + ("" if lever in asked.levers else " (not tried: not allowed)"))
    return ways


# -- many models on one card ---------------------------------------------------------------------------------------------
def fit_table(gpu, *, method: str = "auto", seq_len: int | None = None,
              names: list[str] | None = None, progress: Callable[[str], None] | None = None,
              reserved_by_others: int | str | None = None) -> list[dict]:
    """For every catalog model (or ``names``), the best plan on ``gpu`` or why none fits (``reason``: the whole
    answer; ``binding`` and ``ways_out``: its parts). ``progress`` hears the count, the time elapsed and what is left."""
    validate.fit_inputs(_card(gpu, []), method=method, seq_len=seq_len, names=names)
    rows = []
    names = list(names or models.catalog_names())
    work = counted(progress, len(names), "planning models")
    try:
        for name in names:
            stage(work, name)
            try:
                spec = models.resolve(name)
                length = min(seq_len, spec.max_positions) if seq_len and spec.max_positions else seq_len
                p = plan(spec, gpu, method=method, seq_len=length, probe=False, reserved_by_others=reserved_by_others,
                         progress=work.inner if hasattr(work, "inner") else work)
                rows.append(dict(model=name, fits=True, method=p.method, quantization=p.quantization,
                                 batch_size=p.batch_size, grad_accum=p.grad_accum, seq_len=p.seq_len,
                                 checkpointing=p.gradient_checkpointing, required_bytes=p.estimate.required_bytes,
                                 budget_bytes=p.budget_bytes, tokens_per_second=round(p.tokens_per_second),
                                 largest_batch=p.largest_batch))
            except DoesNotFitError as err:
                rows.append(dict(model=name, fits=False, reason=str(err), binding=err.binding,
                                 ways_out=list(err.ways_out)))
    finally:
        if work is not None:
            work.close()
    return rows


def forget() -> None:
    """Drops everything this process keeps from earlier plans (simulations, fitted depth models, run models,
    parameter counts, replay answers), so that the next plan is made as in a fresh process; what is kept on disk
    stays (``AUTOFIT_CACHE=off`` leaves it out). For a long-lived process that plans many models, and for timing a
    cold plan."""
    from autofit.sim import simulate, table

    simulate._CACHE.clear()
    memory._ENVELOPES.clear()
    memory.step_model.cache_clear()
    runs._MODELS.clear()
    models._COUNTS.clear()
    offload._SIZES.clear()
    table.forget()
