"""Host memory of a planned run: what the machine's RAM holds while the run loads, tokenizes, trains and saves.

The card's memory is simulated (``memory``); this module models the host side of the same run, phase by phase, on
top of a process that imported torch and transformers (its resident set measured once, ``IMPORTED_RSS``):
- loading: transformers memory-maps a safetensors checkpoint, so its pages become resident as they are read; a
  dtype other than the stored one makes a converted copy in RAM first (a card-bound model is built on the CPU and
  moved); quantizing on load streams the stored weights through the card.
- tokenizing: the tokenizer's Python lists while it runs, then the tokenized items that stay for the run.
- training: a CPU run's step (weights, gradients, optimizer state, activations: the plan's estimate), data loader
  workers and the batches they pin, and what the optimizer holds outside the card (``offload``).
- saving: safetensors takes a CPU tensor's memory as it is but copies a card's tensors to the host, so a card-bound
  model's state dict is gathered whole in RAM (safetensors/torch.py, ``_flatten_as_ptr``, 0.8).
The peak over the phases is checked against RAM available now and free swap (``psutil``). The loader is the variant
that fits: worker processes and pinned batches go first, the run itself never changes for them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import psutil
import torch

from autofit import model as models
from autofit import offload
from autofit.sim import arch
from autofit.sim.simulate import StepConfig
from autofit.units import fmt_bytes

MIB = 1024 ** 2
# Measured on this project's CPU machine (benchmarks/host_memory.py, results under benchmarks/results/cpu-2026-12-05):
# the resident set of a process that imported torch, transformers and autofit (249-250 MiB); what from_pretrained
# leaves resident beyond the weights it converts (the model's modules and loading machinery: 87 MiB anonymous and
# 19-20 MiB of mapped files for Llama models of 228 and 310 MiB of weights alike); a DataLoader worker's private
# memory (USS 11-19 MiB; the rest of its resident set is shared with the parent by fork; the larger kept); and the
# resident bytes per token of ``data.tokenize`` run after loading a model, as train() runs it (build_tokenizer's BPE,
# 709,260 tokens of 3,000 samples): 140 at its peak, 97-101 kept (the freed Python lists stay in the allocator's
# arenas; tokenizing first in a fresh process keeps 48 of a 90 peak).
IMPORTED_RSS = 250 * MIB
LOADING_RSS = 107 * MIB
WORKER_BYTES = 19 * MIB
TOKENIZE_PEAK_PER_TOKEN = 140
DATASET_PER_TOKEN = 100
# An assumption until benchmarks/gpu_validation.py measures it: the host memory the CUDA runtime, cuBLAS and the
# driver map into a process that trains on a card (their libraries' pages and the context's host-side state).
CUDA_HOST_BYTES = 1024 * MIB
# The Trainer's loader: prefetch_factor batches per worker are in flight (torch.utils.data.DataLoader's default, 2);
# a batch holds input_ids, attention_mask and labels as int64 (data.collate).
PREFETCH = 2
BATCH_TENSORS = 3
LOADER_WORKERS = 2  # the planned loader's workers where RAM allows: collating runs beside the card's step
_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass(frozen=True, kw_only=True, slots=True)
class Loader:
    """The Trainer's data loader settings a plan hands over."""

    num_workers: int
    pin_memory: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class HostEstimate:
    """Host RAM of a planned run at its peak: the phase that peaks, its named parts (bytes), and the machine's RAM
    available and swap free when it was planned."""

    peak_bytes: int
    phase: str
    parts: tuple[tuple[str, int], ...]  # (name, bytes) live at the peak, the process itself first
    phases: tuple[tuple[str, int], ...]  # (phase, bytes) of every phase
    available_bytes: int = field(compare=False)  # the machine when it was planned: not part of the plan's identity
    swap_free_bytes: int = field(compare=False)
    total_bytes: int = field(compare=False)
    loader: Loader
    notes: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.available_bytes

    @property
    def fits_with_swap(self) -> bool:
        return self.peak_bytes <= self.available_bytes + self.swap_free_bytes

    def verdict(self) -> str:
        if self.fits:
            return f"{fmt_bytes(self.available_bytes - self.peak_bytes)} to spare"
        if self.fits_with_swap:
            return f"short by {fmt_bytes(self.peak_bytes - self.available_bytes)}: the run would swap"
        return (f"short by {fmt_bytes(self.peak_bytes - self.available_bytes - self.swap_free_bytes)} even with "
                "swap: the run would be killed")

    def line(self) -> str:
        return (f"needs {fmt_bytes(self.peak_bytes)} while {self.phase} of {fmt_bytes(self.available_bytes)} "
                f"available ({fmt_bytes(self.swap_free_bytes)} swap free): {self.verdict()}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["parts"] = [list(p) for p in self.parts]
        out["phases"] = [list(p) for p in self.phases]
        out["notes"] = list(self.notes)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "HostEstimate":
        data = dict(data)
        data["parts"] = tuple(tuple(p) for p in data["parts"])
        data["phases"] = tuple(tuple(p) for p in data["phases"])
        data["notes"] = tuple(data.get("notes") or ())
        data["loader"] = Loader(**data["loader"])
        return cls(**data)


@dataclass(frozen=True, kw_only=True, slots=True)
class Machine:
    """This machine's RAM as the host estimate sees it: the process's resident set now, RAM available and swap free."""

    process_bytes: int
    available_bytes: int
    swap_free_bytes: int
    total_bytes: int

    @classmethod
    def now(cls) -> "Machine":
        vm, swap = psutil.virtual_memory(), psutil.swap_memory()
        return cls(process_bytes=psutil.Process().memory_info().rss, available_bytes=int(vm.available),
                   swap_free_bytes=int(swap.free), total_bytes=int(vm.total))


def stored_dtype(spec: arch.ModelSpec) -> torch.dtype:
    """The dtype a checkpoint of ``spec`` stores its weights in (the config's ``dtype``; fp32 when it names none)."""
    # transformers 5 keeps it as dtype (its torch_dtype property only warns); 4.x as torch_dtype
    stored = vars(spec.config)
    value = stored.get("dtype") or stored.get("torch_dtype")
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def checkpoint_bytes(spec: arch.ModelSpec) -> int:
    """Bytes of the weights in a safetensors checkpoint of ``spec`` (tied weights stored once)."""
    return spec.total_params * _BYTES.get(stored_dtype(spec), 4)


def batch_bytes(batch_size: int, seq_len: int) -> int:
    return BATCH_TENSORS * 8 * batch_size * seq_len


def estimate(spec: arch.ModelSpec, cfg: StepConfig, *, batch_size: int, seq_len: int, tokens: int | None,
             step_bytes: int = 0, step_resident: int = 0, loader: Loader, save: bool = True,
             machine: Machine | None = None, train: bool = True, offloaded: int = 0) -> HostEstimate:
    """The host peak of a run of ``spec`` with ``cfg`` (see the module docstring).

    ``tokens``: tokens in the tokenized training data (None: no data given, not counted). ``step_bytes``: for a CPU
    run, the step's need in RAM (the plan's estimate); ``step_resident``: what of it stays between steps (weights,
    gradients, optimizer state), alive while saving. ``train`` False models loading, tokenizing and saving only.
    ``offloaded``: pinned host bytes of offloaded activations (the plan's ``estimate.offloaded_pinned``).
    """
    machine = machine or Machine.now()
    cpu = cfg.device == "cpu"
    # the process as a run starts it (measured, so that a plan does not depend on what the planning process holds)
    base = IMPORTED_RSS
    fixed = [("process (Python, torch, transformers)", base)]
    if not cpu:
        fixed.append(("CUDA runtime, host side (assumed)", CUDA_HOST_BYTES))
    notes = []
    # loading
    file_bytes = checkpoint_bytes(spec)
    load_dtype = cfg.weights_dtype  # what training.load_model asks from_pretrained for
    converted = spec.total_params * _BYTES.get(load_dtype, 4) if load_dtype != stored_dtype(spec) else 0
    loading = [("from_pretrained's modules and machinery", LOADING_RSS)]
    if cfg.quantization != "none":
        loading.append(("checkpoint pages (safetensors mmap), quantized on the card", file_bytes))
    else:
        loading.append(("checkpoint pages (safetensors mmap)", file_bytes))
        if converted:
            loading.append((f"weights converted to {str(load_dtype).removeprefix('torch.')}", converted))
    # a CPU run keeps its weights in RAM from loading on: the mapped pages (same dtype) or the converted copy
    weights_kept = (converted or file_bytes) if cpu else 0
    dataset = DATASET_PER_TOKEN * tokens if tokens else 0
    tokenizing = TOKENIZE_PEAK_PER_TOKEN * tokens if tokens else 0
    if tokens is None:
        notes.append("no dataset given: its tokens are not counted")
    workers = loader.num_workers * WORKER_BYTES
    pinned = batch_bytes(batch_size, seq_len) * (max(1, loader.num_workers) * PREFETCH) if loader.pin_memory else 0
    held = offload.host_bytes(spec, cfg)
    phases: dict[str, list[tuple[str, int]]] = {}
    phases["loading the model"] = loading
    # while tokenizing, a same-dtype CPU model's pages are mapped but not yet read: they count from the first step
    phases["tokenizing"] = [loading[0]] + ([("converted weights", converted)] if cpu and converted else []) + \
        [("tokenizing (Python lists, transient)", tokenizing)]
    run_parts = [loading[0], ("tokenized dataset", dataset)]
    if loader.num_workers:
        run_parts.append((f"data loader workers ({loader.num_workers})", workers))
    if pinned:
        run_parts.append(("pinned batches", pinned))
    run_parts.extend(held.items())
    if offloaded:
        run_parts.append(("offloaded activations (pinned)", offloaded))
    if train:
        phases["training"] = ([("training step (RAM is the device)", step_bytes)] if cpu else []) + run_parts
    # what the Trainer saves: the whole model for full fine-tuning, the adapters (fp32, as peft makes them) for LoRA
    saved = spec.total_params * _BYTES.get(load_dtype, 4) if cfg.method == "full" else 4 * models.count_params(
        spec, method=cfg.method, quantization=cfg.quantization, half=cfg.half, lora_r=cfg.lora_r,
        lora_targets=cfg.lora_targets).trainable
    gathered = 0 if cpu else saved
    if save:
        kept = [("weights, gradients, optimizer state", step_resident)] if cpu and train else \
            ([("weights (mapped pages, read)", weights_kept)] if cpu else [])
        phases["saving"] = kept + run_parts + ([("state dict gathered for saving", gathered)] if gathered else [])
    totals = {name: sum(v for _, v in parts) for name, parts in phases.items()}
    phase = max(totals, key=totals.get)
    extra = sum(v for _, v in fixed)
    return HostEstimate(
        peak_bytes=extra + totals[phase], phase=phase,
        parts=tuple(fixed) + tuple((n, v) for n, v in phases[phase] if v),
        phases=tuple((n, extra + t) for n, t in totals.items()),
        available_bytes=machine.available_bytes, swap_free_bytes=machine.swap_free_bytes,
        total_bytes=machine.total_bytes, loader=loader, notes=tuple(notes))


def loader_variants(device: str) -> list[Loader]:
    """The loaders a plan tries, preferred first: on a card, workers collating beside the step with pinned batches,
    then no workers, then nothing pinned; on the CPU, no workers and nothing pinned (pinning serves copies to a card,
    and workers would take the cores the step runs on)."""
    if device == "cpu":
        return [Loader(num_workers=0, pin_memory=False)]
    workers = min(LOADER_WORKERS, max(0, (os.cpu_count() or 1) - 1))
    out = [Loader(num_workers=workers, pin_memory=True), Loader(num_workers=0, pin_memory=True),
           Loader(num_workers=0, pin_memory=False)]
    return [v for i, v in enumerate(out) if v not in out[:i]]


def plan_host(spec, cfg: StepConfig, *, batch_size: int, seq_len: int, tokens: int | None, step_bytes: int = 0,
              step_resident: int = 0, machine: Machine | None = None, offloaded: int = 0
              ) -> tuple[HostEstimate, list[str]]:
    """The host estimate with the first loader variant whose run fits RAM available (else the lightest), and the
    reasons to state: the loader chosen and why, and whether the run fits the host."""
    machine = machine or Machine.now()
    variants = loader_variants(cfg.device)
    tried = [estimate(spec, cfg, batch_size=batch_size, seq_len=seq_len, tokens=tokens, step_bytes=step_bytes,
                      step_resident=step_resident, loader=v, machine=machine, offloaded=offloaded) for v in variants]
    chosen = next((e for e in tried if e.fits), tried[-1])
    reasons = []
    first = tried[0]
    if chosen is not first:
        reasons.append(f"data loader with {chosen.loader.num_workers} workers and pinning "
                       f"{'on' if chosen.loader.pin_memory else 'off'}: {first.loader.num_workers} workers with "
                       f"pinned batches would need {fmt_bytes(first.peak_bytes)} of host RAM, "
                       f"{fmt_bytes(machine.available_bytes)} is available")
    if not chosen.fits:
        reasons.append(f"host RAM {chosen.line()}; free RAM (close programs) or use a machine with more")
    return chosen, reasons


def refit_loader(plan, spec: arch.ModelSpec, *, tokens: int | None, machine: Machine | None = None, tell=None):
    """``plan`` with the data loader that fits this machine's RAM now (a plan may come from another machine, or RAM
    may have filled since): the host estimate redone with the data's ``tokens``; only the loader changes, never the
    run. ``tell`` hears why when the loader changes."""
    from dataclasses import replace

    cfg = plan.estimate.config
    cpu = cfg.device == "cpu"
    e = plan.estimate
    est, _ = plan_host(spec, cfg, batch_size=plan.batch_size, seq_len=plan.seq_len, tokens=tokens,
                       step_bytes=plan.required_bytes if cpu else 0,
                       step_resident=e.weights + e.gradients + e.optimizer_state if cpu else 0, machine=machine,
                       offloaded=e.offloaded_pinned)
    before = plan.host.loader if plan.host is not None else None
    if tell is not None and before is not None and est.loader != before:
        tell(f"data loader changed from {before.num_workers} workers (pinning {'on' if before.pin_memory else 'off'}) "
             f"to {est.loader.num_workers} (pinning {'on' if est.loader.pin_memory else 'off'}): host RAM {est.line()}")
    return replace(plan, host=est)


def tokens_of(lengths, seq_len: int) -> int | None:
    """Tokens the tokenized training data holds: each sample's tokens plus its EOS, cut to ``seq_len``."""
    if lengths is None:
        return None
    return int(sum(min(int(n) + 1, seq_len) for n in lengths))
