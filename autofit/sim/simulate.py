"""Real training steps on fake CPU tensors that imitate CUDA, with every allocation and release recorded.

A simulated step is the step ``transformers.Trainer`` runs on a GPU, op for op: the model as the method loads it
(fp32 weights for full fine-tuning; a 16-bit frozen base with fp32 peft LoRA adapters; 4- or 8-bit linear layers
stored as bitsandbytes stores them, the rest upcast to fp32 as ``prepare_model_for_kbit_training`` leaves it),
accelerate's forward wrapper (autocast, then 16-bit outputs converted to fp32), the loss with ``num_items_in_batch``,
backward, gradient clipping, the optimizer step and ``zero_grad(set_to_none=True)``. Tensors are fake (no memory, no
compute) and live on the CPU, because fake CUDA tensors abort in backward on a machine without CUDA; the CPU is made
to behave as CUDA would where it matters for memory: CUDA's autocast policy, the attention kernel CUDA picks for the
card, transformers' mask decisions answered as real tensors answer them, and CUDA's foreach/fused optimizer paths.
The same code runs on real CPU tensors, which is how the tests check the tracker byte for byte.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor, FakeTensorMode

from autofit.errors import ConfigError, ModelError, SimulationError
from autofit.files import atomic_file
from autofit.sim import arch, attention, batchline, kbit, table
from autofit.sim.cuda_autocast import CudaAutocast
from autofit.sim.tracker import Tracker, Timeline

log = logging.getLogger(__name__)

METHODS = ("full", "lora", "qlora")
QUANTIZATIONS = ("none", "8bit", "4bit")
# Precision as the ecosystem names it (Lightning's names): "-mixed" keeps fp32 weights for full fine-tuning and runs
# the forward under autocast (transformers' Trainer with bf16=True / fp16=True); "-true" trains 16-bit weights with
# 16-bit gradients and optimizer states and no autocast, as a model loaded in bf16 (transformers 5 loads checkpoints
# in their stored dtype by default) and trained with bf16=False runs.
PRECISIONS = ("bf16-mixed", "16-mixed", "bf16-true", "16-true", "32-true")
PRECISION_ALIASES = {"bf16": "bf16-mixed", "fp16": "16-mixed", "16": "16-mixed", "fp16-mixed": "16-mixed",
                      "fp16-true": "16-true", "fp32": "32-true", "32": "32-true", "fp32-true": "32-true"}
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "adamw_cpu_offload")

# What a live allocation holds; ``HOST`` allocations live in host memory on a real run and are not counted.
WEIGHTS, GRADIENTS, OPTIMIZER, ACTIVATIONS, LOGITS, TEMPORARIES, HOST = range(7)
CATEGORY_NAMES = ("weights", "gradients", "optimizer_state", "activations", "logits_and_loss", "temporaries", "host")

# Phase codes stamped on allocations (tag = 10 * step + phase).
SETUP, INPUTS, FORWARD, HEAD, BACKWARD, OPTIMIZE, EVAL = range(7)



def precision_name(name: str) -> str:
    """The canonical name of a precision (``"bf16"`` -> ``"bf16-mixed"``, ``"fp32"`` -> ``"32-true"``).
    Raises ``ConfigError`` for a name that is none of them."""
    canonical = PRECISION_ALIASES.get(name, name) if isinstance(name, str) else name
    if canonical not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)} (or bf16, fp16, fp32); got {name!r}")
    return canonical


@dataclass(frozen=True, kw_only=True, slots=True)
class StepConfig:
    """Everything but the batch shape that decides the memory of a training step."""

    method: str = "full"
    quantization: str = "none"
    precision: str = "bf16-mixed"  # any name precision_name() takes; stored canonical
    gradient_checkpointing: bool = False
    optimizer: str = "adamw_torch_fused"
    lora_r: int = 16
    lora_alpha: int | None = None  # None: 2 * lora_r
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] | None = None  # None: peft's defaults for the architecture
    max_grad_norm: float | None = 1.0
    compute_capability: tuple[int, int] = (8, 6)
    device: str = "cuda"  # the device imitated: "cuda", or "cpu" for runs in host memory
    # the forward's saved tensors copied to pinned host RAM (torch.autograd.graph.save_on_cpu(pin_memory=True))
    offload_activations: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", precision_name(self.precision))
        for name, allowed in (("method", METHODS), ("quantization", QUANTIZATIONS), ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.method == "full" and self.quantization != "none":
            raise ConfigError("full fine-tuning cannot train quantized weights; use the qlora method for 4-bit or "
                              "8-bit (method='qlora', --method qlora)")
        if self.method == "qlora" and self.quantization == "none":
            raise ConfigError("qlora needs 4-bit or 8-bit weights (quantization='4bit', --quantization 4bit)")
        if self.lora_r <= 0:
            raise ConfigError(f"lora_r must be positive; got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must lie in [0, 1); got {self.lora_dropout}")
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"device must be cuda or cpu; got {self.device!r}")
        if self.device == "cuda" and self.precision.startswith("bf16") and self.compute_capability < (8, 0):
            raise ConfigError("bf16 needs compute capability 8.0 or newer; use 16-mixed on this card "
                              "(precision='16-mixed', --precision 16-mixed)")
        if self.offload_activations and self.device != "cuda":
            raise ConfigError("activation offloading moves a card's saved tensors to host RAM; a run in host memory "
                              "has nothing to offload (drop offload_activations / --offload-activations)")
        if self.quantization != "none" and self.precision.endswith("-true") and self.precision != "32-true":
            raise ConfigError(f"a quantized base trains under mixed precision (bf16-mixed or 16-mixed), "
                              f"not {self.precision}")

    @classmethod
    def from_dict(cls, data: dict) -> "StepConfig":
        data = dict(data)
        data["compute_capability"] = tuple(data["compute_capability"])
        if data.get("lora_targets") is not None:
            data["lora_targets"] = tuple(data["lora_targets"])
        return cls(**data)

    @property
    def half(self) -> torch.dtype:
        """The 16-bit dtype of the run (the autocast dtype; bf16 for fp32 runs' frozen weights too)."""
        return torch.float16 if self.precision.startswith("16") else torch.bfloat16

    @property
    def autocast(self) -> bool:
        """Whether the forward runs under autocast (mixed precision)."""
        return self.precision.endswith("-mixed")

    @property
    def grad_scaler(self) -> bool:
        """Whether the loss is scaled and gradients unscaled (fp16 mixed precision)."""
        return self.precision == "16-mixed"

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype the model is loaded in: fp32 for mixed-precision full fine-tuning and 32-true, else 16-bit
        (LoRA's frozen base is 16-bit under mixed precision too; its adapters are what peft makes them)."""
        if self.precision == "32-true" or (self.method == "full" and self.autocast):
            return torch.float32
        return self.half

    @property
    def uses_lora(self) -> bool:
        return self.method in ("lora", "qlora")


@dataclass(frozen=True, kw_only=True, slots=True)
class Simulation:
    """What one simulated run recorded: the timeline, what each allocation held, and how it was run."""

    timeline: Timeline
    categories: np.ndarray  # category of each allocation uid
    phases: np.ndarray  # phase code of each allocation uid (tag % 10)
    steps: np.ndarray  # step number of each allocation uid (tag // 10; 0 = before the first step)
    num_layers: int
    batch_size: int
    seq_len: int
    attention_kernels: tuple[str, ...]  # one per attention call, in order
    step_peaks: tuple[int, ...]  # peak live bytes within each step
    fake: bool
    eval_batch_size: int | None = None
    eval_peak: int | None = None  # peak live bytes during the evaluation pass after the steps
    # bytes of each tensor the last step's forward copied to host RAM, in order (activation offloading; else empty)
    offloaded: tuple[int, ...] = ()
    memo: dict = field(default_factory=dict, compare=False, repr=False)  # results derived from it (replays)

    def peak(self) -> int:
        return self.timeline.peak()


# -- building the model as the method loads it -----------------------------------------------------------------------
def build_model(spec: arch.ModelSpec, cfg: StepConfig, num_layers: int, *, device: str = "meta") -> nn.Module:
    """The model ``cfg.method`` trains, with ``num_layers`` decoder layers, on ``device`` (``meta`` or ``cpu``)."""
    config = arch.with_layers(spec.config, num_layers)
    model = arch.build(config, dtype=cfg.weights_dtype, task=spec.task, device=device)
    if spec.task == "sequence-classification" and getattr(model.config, "problem_type", None) is None \
            and model.config.num_labels > 1:
        # What BERT-style heads decide on their first batch of integer labels. DeBERTa's head never decides and
        # instead gathers the rows whose label is >= 0 (a data-dependent count fake tensors cannot give); with an
        # unpadded batch every row is kept, and the gather only copies the (batch, labels) logits, a few KiB.
        model.config.problem_type = "single_label_classification"
    if cfg.method == "full":
        return model
    if cfg.quantization != "none":
        kbit.quantize_linears(model, cfg.quantization, compute_dtype=cfg.half)
        kbit.upcast_non_quantized(model)
    for p in model.parameters():
        p.requires_grad_(False)
    targets = cfg.lora_targets or spec.lora_targets
    model = arch.apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha or 2 * cfg.lora_r, dropout=cfg.lora_dropout,
                              targets=targets, device=device, task=spec.task)
    if cfg.quantization != "none":
        kbit.use_bnb_lora_forward(model)
    return model


def decoder_layers(model: nn.Module, task: str = "causal-lm") -> nn.ModuleList:
    """The ModuleList of repeated layers the recorder marks (an encoder-decoder's decoder layers)."""
    try:
        return arch.layer_stack(model, task)
    except ModelError as err:
        raise SimulationError(str(err)) from None


# -- imitating CUDA on the CPU ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def imitate_cuda(cfg: StepConfig, kernels: list[str]) -> Iterator[CudaAutocast]:
    """Patches that make CPU tensors take the code paths, and keep the tensors, that ``cfg.device`` tensors would.

    For a CUDA device: CUDA's autocast policy and attention kernel choice; for both: transformers' mask decisions
    answered as real tensors answer them, and code that asks about CUDA autocast told about ours.
    """
    import transformers.masking_utils as masking

    autocast = CudaAutocast()
    original_enabled = torch.is_autocast_enabled
    original_packed = masking.find_packed_sequence_indices
    original_is_tracing = masking.is_tracing

    def is_autocast_enabled(device_type: str | None = None) -> bool:
        # code written for CUDA (peft's bitsandbytes LoRA layers) asks about CUDA autocast: answer for ours
        return original_enabled("cpu" if device_type in (None, "cuda") else device_type)

    def find_packed_sequence_indices(position_ids):
        # transformers treats fake tensors as tracing and then assumes packed sequences, building a full mask that
        # rules out flash attention. Run its check as real tensors would (same ops, same temporaries) up to the
        # point where it reads the data; real position ids of an unpacked batch answer "not packed" there.
        if not isinstance(position_ids, FakeTensor):
            return original_packed(position_ids)
        masking.is_tracing = lambda *args, **kwargs: False
        try:
            return original_packed(position_ids)
        except DataDependentOutputException:
            return None
        finally:
            masking.is_tracing = original_is_tracing

    original_causal_skip = masking._ignore_causal_mask_sdpa
    original_bidirectional_skip = masking._ignore_bidirectional_mask_sdpa

    def answered_as_real(original, answer):
        # Whether SDPA may skip an all-ones padding mask: transformers reads the mask, which fake tensors cannot
        # answer, so it builds a full mask instead. Run the same ops as a real mask would, and where the data is
        # read, answer as a real unpadded batch does (every token kept).
        def wrapper(padding_mask, *args, **kwargs):
            if not isinstance(padding_mask, FakeTensor):
                return original(padding_mask, *args, **kwargs)
            masking.is_tracing = lambda *a, **k: False
            try:
                return original(padding_mask, *args, **kwargs)
            except DataDependentOutputException:
                return answer(*args, **kwargs)
            finally:
                masking.is_tracing = original_is_tracing
        return wrapper

    # causal: training reads the mask only where q_length == kv_length, and an unpadded mask is then skipped;
    # bidirectional: skipped unless a local window applies
    masking._ignore_causal_mask_sdpa = answered_as_real(original_causal_skip, lambda *a, **k: True)
    masking._ignore_bidirectional_mask_sdpa = answered_as_real(
        original_bidirectional_skip,
        lambda kv_length, local_attention_size=None: local_attention_size is None or kv_length < local_attention_size)
    torch.is_autocast_enabled = is_autocast_enabled
    masking.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        if cfg.device == "cpu":
            yield autocast  # the CPU's own autocast policy and attention kernels
            return
        with autocast.installed(), attention.cuda_sdpa(cfg.compute_capability, kernels):
            yield autocast
    finally:
        torch.is_autocast_enabled = original_enabled
        masking.find_packed_sequence_indices = original_packed
        masking._ignore_causal_mask_sdpa = original_causal_skip
        masking._ignore_bidirectional_mask_sdpa = original_bidirectional_skip


# -- the optimizer and the step -------------------------------------------------------------------------------------
class Adam8bit(torch.optim.Optimizer):
    """bitsandbytes' 8-bit AdamW as it sits in memory (bitsandbytes/optim/optimizer.py, ``Optimizer2State.init_state``
    and ``get_state_buffer``, 0.44 and later): two uint8 moments and two fp32 absmax vectors of one value per
    256-value block for tensors of ``MIN_8BIT_SIZE`` values or more, two fp32 moments below; the signed and unsigned
    quantization maps (256 fp32 values each) once. Paged (``paged=True``), moments of ``PAGED_MIN_SIZE`` values or
    more live in CUDA managed memory, which PyTorch's allocator never sees, so they are not allocated here; the
    planner accounts for them by name. Updates happen in place."""

    MIN_8BIT_SIZE = 4096  # Optimizer2State(min_8bit_size=4096)
    BLOCK = 256  # init_state: blocksize = 256 (2048 before bitsandbytes 0.44)
    PAGED_MIN_SIZE = 100_000  # get_state_buffer: "if not self.is_paged or p.numel() < 1e5"
    QMAP_VALUES = 256  # fill_qmap: create_dynamic_map(signed=True) and (signed=False), 256 values each

    def __init__(self, params, lr: float = 1e-4, paged: bool = False) -> None:
        super().__init__(params, {"lr": lr})
        self.paged = paged
        self.qmaps: tuple[torch.Tensor, ...] = ()

    def _buffer(self, p, dtype):
        if self.paged and p.numel() >= self.PAGED_MIN_SIZE:
            return None  # managed memory, outside the allocator
        return torch.zeros_like(p, dtype=dtype)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or self.state[p]:
                    continue
                state = self.state[p]
                if p.numel() >= self.MIN_8BIT_SIZE:
                    if not self.qmaps:
                        self.qmaps = tuple(torch.zeros(self.QMAP_VALUES, dtype=torch.float32, device=p.device)
                                           for _ in range(2))
                    blocks = -(-p.numel() // self.BLOCK)
                    state["qmap1"], state["qmap2"] = self.qmaps
                    for key in ("state1", "state2"):
                        buffer = self._buffer(p, torch.uint8)
                        if buffer is not None:
                            state[key] = buffer
                    state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                    state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                else:
                    state["state1"] = torch.zeros_like(p, dtype=torch.float32)
                    state["state2"] = torch.zeros_like(p, dtype=torch.float32)


class CpuOffloadAdam(torch.optim.Optimizer):
    """torchao's ``CPUOffloadOptimizer`` (torchao/optim/cpu_offload.py, ``offload_gradients=False``) as the card sees
    it: parameters of ``MINIMAL_SIZE`` values or more get pinned host copies (parameter, gradient, AdamW moments)
    and their step runs on the CPU, so they hold no optimizer state on the card; their gradients stay on the card
    until ``zero_grad``. Smaller parameters keep a fused AdamW on the card. The host copies are accounted by name."""

    MINIMAL_SIZE = 4096  # CPUOffloadOptimizer(minimal_size=4096)

    def __init__(self, params, lr: float = 1e-4) -> None:
        params = list(params)
        super().__init__(params, {"lr": lr})
        small = [p for p in params if p.numel() < self.MINIMAL_SIZE]
        self.on_device = torch.optim.AdamW(small, lr=lr, fused=True) if small else None
        if self.on_device is not None:
            self.state = self.on_device.state  # what the card holds is the on-device optimizer's state

    @torch.no_grad()
    def step(self):
        if self.on_device is not None:
            self.on_device.step()


def make_optimizer(params: list[nn.Parameter], name: str) -> torch.optim.Optimizer:
    """The optimizer a Trainer builds for ``optim=name``, on the CUDA code path (foreach or fused)."""
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)
    if name == "adamw_cpu_offload":
        return CpuOffloadAdam(params)
    return Adam8bit(params, paged=name == "paged_adamw_8bit")


def _clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> None:
    # torch.nn.utils.clip_grad_norm_ on CUDA: per-tensor norms in one foreach op, their norm, one foreach multiply
    norms = torch._foreach_norm(grads, 2.0)
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef)


class _Recorder:
    """Layer hooks that mark where each decoder layer's forward starts and ends and where its backward starts."""

    def __init__(self, tracker: Tracker, layers: nn.ModuleList) -> None:
        self.tracker, self.step, self.phase = tracker, 0, FORWARD
        self.handles = []
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(functools.partial(self._pre, i)))
            self.handles.append(layer.register_forward_hook(functools.partial(self._post, i)))

    def _pre(self, i, module, args):
        if self.phase == FORWARD:
            self.tracker.mark(f"{self.step}:F{i}")

    def _post(self, i, module, args, output):
        if self.phase != FORWARD:
            return  # a checkpointed layer recomputing its forward inside backward
        self.tracker.mark(f"{self.step}:E{i}")
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            step = self.step
            hidden.register_hook(lambda grad: self.tracker.mark(f"{step}:B{i}"))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _set_phase(tracker: Tracker, recorder: _Recorder, step: int, phase: int, label: str) -> None:
    tracker.tag = 10 * step + phase
    recorder.step, recorder.phase = step, phase
    tracker.mark(f"{step}:{label}")


def make_batch(batch_size: int, seq_len: int, vocab: int, device=None, *, task: str = "causal-lm",
               target_len: int | None = None, num_labels: int = 2) -> dict:
    """The batch a collator hands a Trainer for ``task``: ids, an all-ones attention mask, labels, and the count of
    labels the Trainer passes as ``num_items_in_batch``; random ids are as good as text for memory.

    Labels: the ids themselves for a causal LM; ``target_len`` target ids for an encoder-decoder (the model shifts
    them right into its decoder inputs); one class per sequence or per token for classification heads."""
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), device=device)
    if task == "seq2seq-lm":
        labels = torch.randint(0, vocab, (batch_size, target_len or seq_len), device=device)
    elif task == "sequence-classification":
        labels = torch.randint(0, num_labels, (batch_size,), device=device)
    elif task == "token-classification":
        labels = torch.randint(0, num_labels, (batch_size, seq_len), device=device)
    else:
        labels = input_ids.clone()
    return dict(input_ids=input_ids, attention_mask=torch.ones((batch_size, seq_len), dtype=torch.long, device=device),
                labels=labels, num_items_in_batch=torch.tensor(labels.numel(), device=device))


def spec_batch(spec: arch.ModelSpec, cfg: StepConfig, batch_size: int, seq_len: int, device=None) -> dict:
    """``make_batch`` for ``spec``'s task (its vocabulary, labels and, for an encoder-decoder, ``spec.target_len``)."""
    return make_batch(batch_size, seq_len, spec.vocab_size, device, task=spec.task, target_len=spec.target_len,
                      num_labels=getattr(spec.config, "num_labels", 2))


def _model_inputs(batch: dict) -> dict:
    # An all-ones mask is what a model sees; transformers reads it and, finding no padding, drops it. The step passes
    # None instead: the same decision, without reading (fake) data and without a host sync on a real device.
    return {k: batch[k] for k in ("input_ids", "labels", "num_items_in_batch")}


def _no_mark(phase: int, label: str) -> None:
    pass


class OffloadedActivations(torch.autograd.graph.saved_tensors_hooks):
    """``torch.autograd.graph.save_on_cpu(pin_memory=True)`` as the card sees it, for a run whose tensors all live in
    one place (fake tensors, or a budgeted CPU device): each tensor autograd saves in the forward is copied whole to
    host memory, out of the ``tracker``'s sight (torch copies the saved tensor's own elements, a view's too, into a
    new pinned buffer), and the card's reference is dropped; the backward that uses it gets a fresh copy, a new
    allocation on the card released once that node has run (torch: ``tensor.to(device)`` on unpack). Parameters are
    saved tensors too and go the same way. ``sizes`` lists the bytes of every copy made, in order."""

    def __init__(self, tracker: Tracker) -> None:
        self.sizes: list[int] = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            with tracker.hidden():
                copy = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout)
                copy.copy_(tensor)
            self.sizes.append(copy.untyped_storage().nbytes())
            return copy

        def unpack(copy: torch.Tensor) -> torch.Tensor:
            return copy.clone()  # the copy back to the card: an allocation the tracker sees

        super().__init__(pack, unpack)


def offloading(cfg: StepConfig, offload=None):
    """The context the forward of ``cfg``'s step runs in: ``offload`` (or torch's ``save_on_cpu`` with pinned
    buffers) when the step offloads activations, else nothing."""
    if not cfg.offload_activations:
        return contextlib.nullcontext()
    return offload if offload is not None else torch.autograd.graph.save_on_cpu(pin_memory=True)


def train_step(model, optimizer, params, cfg: StepConfig, batch: dict, autocast, mark=_no_mark,
               on_grads=None, offload=None) -> None:
    """One step of ``transformers.Trainer`` with accelerate: the forward under autocast with 16-bit outputs
    converted to fp32, loss, backward (scaled for fp16), unscale and clip, optimizer step, ``zero_grad``.
    ``autocast.region(dtype)`` opens an autocast region; ``mark(phase, label)`` is told when each phase starts;
    ``on_grads(grads)`` sees the gradients before the optimizer steps; ``offload`` is the saved-tensor hooks the
    forward runs under when ``cfg.offload_activations`` (default: torch's ``save_on_cpu(pin_memory=True)``)."""
    mark(FORWARD, "forward")
    with offloading(cfg, offload):
        if not cfg.autocast:
            outputs = model(**_model_inputs(batch))
        else:
            with autocast.region(cfg.half):
                outputs = model(**_model_inputs(batch))
            # accelerate's convert_outputs_to_fp32: 16-bit outputs (the logits) come back as fp32 copies
            mark(HEAD, "outputs")
            logits32 = outputs.logits.float() if outputs.logits.dtype != torch.float32 else outputs.logits
            del logits32
    loss = outputs.loss
    del outputs
    mark(BACKWARD, "backward")
    if cfg.grad_scaler:
        scale = torch.full((), 65536.0, device=loss.device)
        (loss * scale).backward()
    else:
        loss.backward()
    del loss
    mark(OPTIMIZE, "optimizer")
    grads = [p.grad for p in params if p.grad is not None]
    if on_grads is not None:
        on_grads(grads)
    if cfg.grad_scaler:
        found_inf = torch.zeros((), device=grads[0].device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, torch.full((), 1.0 / 65536.0,
                                                                                      device=grads[0].device))
        del found_inf
    if cfg.max_grad_norm:
        _clip_grad_norm(grads, cfg.max_grad_norm)
    del grads
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def eval_step(model, cfg: StepConfig, batch: dict, autocast) -> None:
    """An evaluation forward pass as the Trainer runs it: no gradients, autocast, fp32 logits, the loss."""
    with torch.no_grad():
        if not cfg.autocast:
            outputs = model(**_model_inputs(batch))
        else:
            with autocast.region(cfg.half):
                outputs = model(**_model_inputs(batch))
            logits32 = outputs.logits.float() if outputs.logits.dtype != torch.float32 else outputs.logits
            del logits32
        del outputs


def _traced_step(model, optimizer, params, cfg, autocast, tracker, recorder, step, batch_size, seq_len, spec,
                 grad_uids) -> tuple[int, ...]:
    """One traced step; returns the bytes of each tensor its forward offloaded to host memory."""
    _set_phase(tracker, recorder, step, INPUTS, "inputs")
    batch = spec_batch(spec, cfg, batch_size, seq_len)
    offload = OffloadedActivations(tracker) if cfg.offload_activations else None
    train_step(model, optimizer, params, cfg, batch, autocast,
               mark=lambda phase, label: _set_phase(tracker, recorder, step, phase, label),
               on_grads=lambda grads: grad_uids.update(tracker.uid(g) for g in grads), offload=offload)
    del batch
    tracker.mark(f"{step}:end")
    return tuple(offload.sizes) if offload is not None else ()


def run(
    spec: arch.ModelSpec,
    cfg: StepConfig,
    *,
    batch_size: int,
    seq_len: int,
    num_layers: int | None = None,
    steps: int = 2,
    fake: bool = True,
    budget: int | None = None,
    seed: int = 0,
    eval_batch_size: int | None = None,
) -> Simulation:
    """Runs ``steps`` training steps of ``spec`` (cut to ``num_layers`` layers) and records every allocation.

    With ``fake`` the tensors are fake CPU tensors (no memory, seconds for any model size); otherwise real CPU
    tensors, under ``budget`` bytes when given (``torch.OutOfMemoryError`` past it). Raises ``SimulationError``
    when the model cannot be stepped this way.
    """
    if batch_size <= 0 or seq_len <= 0:
        raise ConfigError(f"batch size and sequence length must be positive; got {batch_size} and {seq_len}")
    spec.check_seq_len(seq_len)
    depth = num_layers or spec.num_layers
    torch.manual_seed(seed)
    kernels: list[str] = []
    with _quiet_transformers():
        return _run(spec, cfg, batch_size, seq_len, depth, steps, fake, budget, kernels, eval_batch_size)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers warns about things a simulation does on purpose (random configs, no loss type); hush it."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _run(spec, cfg, batch_size, seq_len, depth, steps, fake, budget, kernels, eval_batch_size) -> Simulation:
    model = build_model(spec, cfg, depth, device="meta" if fake else "cpu")
    with contextlib.ExitStack() as stack:
        autocast = stack.enter_context(imitate_cuda(cfg, kernels))
        if fake:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            model = model.to_empty(device="cpu")
            model.tie_weights()
        model.train()
        if cfg.gradient_checkpointing:
            _enable_checkpointing(model)
        params = [p for p in arch.unique_params(model) if p.requires_grad]
        tracker = Tracker(budget=budget)
        tracker.adopt(list(model.parameters()) + list(model.buffers()))
        recorder = _Recorder(tracker, decoder_layers(model, spec.task))
        optimizer = make_optimizer(params, cfg.optimizer)
        step_peaks, grad_uids, offloaded = [], set(), ()
        try:
            with tracker, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for step in range(1, steps + 1):
                    tracker.reset_peak()
                    offloaded = _traced_step(model, optimizer, params, cfg, autocast, tracker, recorder, step,
                                             batch_size, seq_len, spec, grad_uids)
                    step_peaks.append(tracker.peak)
                eval_peak = None
                if eval_batch_size:
                    # the Trainer evaluates between steps: optimizer state alive, gradients already released
                    model.eval()
                    tracker.tag = 10 * (steps + 1) + EVAL
                    tracker.mark(f"{steps + 1}:eval")
                    tracker.reset_peak()
                    batch = spec_batch(spec, cfg, eval_batch_size, seq_len)
                    eval_step(model, cfg, batch, autocast)
                    del batch
                    eval_peak = tracker.peak
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            raise SimulationError(f"could not simulate a training step of {spec.name}: {type(err).__name__}: {err}") from err
        finally:
            recorder.remove()
        categories = _categorize(tracker, optimizer, cfg, grad_uids)
    timeline = tracker.timeline()
    return Simulation(
        timeline=timeline,
        categories=categories,
        phases=(timeline.tags % 10).astype(np.int8),
        steps=(timeline.tags // 10).astype(np.int8),
        num_layers=depth,
        batch_size=batch_size,
        seq_len=seq_len,
        attention_kernels=tuple(kernels),
        step_peaks=tuple(step_peaks),
        fake=fake,
        eval_batch_size=eval_batch_size,
        eval_peak=eval_peak,
        offloaded=offloaded,
    )


# -- many simulations: cached, and spread over the machine's cores -------------------------------------------------------
_CACHE: dict[tuple, Simulation] = {}
_CACHE_SIZE = 256
_POOL = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Job:
    """One simulation to run: what ``run`` takes."""

    spec: arch.ModelSpec
    cfg: StepConfig
    batch_size: int
    seq_len: int
    num_layers: int
    eval_batch_size: int | None = None


def workers() -> int:
    """Processes simulations run in: ``AUTOFIT_WORKERS``, else one per core up to 4 (1 where fork is unavailable)."""
    import multiprocessing
    import os

    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    value = os.environ.get("AUTOFIT_WORKERS")
    if value:
        return max(1, int(value))
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _key(job: Job) -> tuple:
    return (job.spec.fingerprint, job.cfg, job.batch_size, job.seq_len, job.num_layers, job.eval_batch_size)


def _run_job(job: Job) -> Simulation:
    return run(job.spec, job.cfg, batch_size=job.batch_size, seq_len=job.seq_len, num_layers=job.num_layers,
               eval_batch_size=job.eval_batch_size)


def cache_dir():
    """Where simulations are kept between runs: ``$AUTOFIT_CACHE/sims`` or ``~/.cache/autofit/sims``, one folder per
    set of library versions (a new PyTorch or transformers can change a step). None when ``AUTOFIT_CACHE=off``."""
    import hashlib
    import os
    from pathlib import Path

    import peft
    import transformers

    from autofit import __version__

    root = os.environ.get("AUTOFIT_CACHE")
    if root is not None and root.lower() in ("off", "0", "no", "false", ""):
        return None
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "autofit"
    versions = f"{__version__} {torch.__version__} {transformers.__version__} {peft.__version__}"
    return base / "sims" / hashlib.sha1(versions.encode()).hexdigest()[:12]


def _file_name(job: Job) -> str:
    import hashlib

    return hashlib.sha1(repr(_key(job)).encode()).hexdigest()[:24] + ".npz"


def _disk_path(job: Job):
    folder = cache_dir()
    if folder is None:
        return None
    return folder / _file_name(job)


def _load(job: Job) -> Simulation | None:
    path = _disk_path(job)
    if path is None or not path.exists():
        path = table.path(_file_name(job))  # the simulations shipped with autofit (autofit/sim/table.py)
    if path is None:
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            timeline = Timeline(sizes=f["sizes"], tags=f["tags"], events=f["events"],
                                marks=tuple((int(i), str(m)) for i, m in meta["marks"]), baseline=meta["baseline"],
                                adopted=meta["adopted"], ops=tuple(meta["ops"]),
                                raw_sizes=f["raw_sizes"] if "raw_sizes" in f.files else None)
            return Simulation(timeline=timeline, categories=f["categories"], phases=f["phases"], steps=f["steps"],
                              num_layers=meta["num_layers"], batch_size=meta["batch_size"], seq_len=meta["seq_len"],
                              attention_kernels=tuple(meta["kernels"]), step_peaks=tuple(meta["step_peaks"]),
                              fake=True, eval_batch_size=meta.get("eval_batch_size"),
                              eval_peak=meta.get("eval_peak"), offloaded=tuple(meta.get("offloaded", ())))
    except Exception as err:  # a foreign or damaged file: ignore it, it will be rewritten
        log.warning("ignoring unreadable cached simulation %s (%s)", path, err)
        return None


def _save(job: Job, sim: Simulation) -> None:
    """Writes atomically: a temporary file renamed into place, so a cache file is never half-written."""
    path = _disk_path(job)
    if path is None:
        return
    tl = sim.timeline
    meta = dict(marks=list(tl.marks), baseline=tl.baseline, adopted=tl.adopted, ops=list(tl.ops),
                num_layers=sim.num_layers, batch_size=sim.batch_size, seq_len=sim.seq_len,
                kernels=list(sim.attention_kernels), step_peaks=list(sim.step_peaks),
                eval_batch_size=sim.eval_batch_size, eval_peak=sim.eval_peak, offloaded=list(sim.offloaded))
    try:
        with atomic_file(path, "wb") as fh:
            raw = {} if tl.raw_sizes is None else {"raw_sizes": tl.raw_sizes}
            np.savez_compressed(fh, sizes=tl.sizes, tags=tl.tags, events=tl.events, categories=sim.categories,
                                phases=sim.phases, steps=sim.steps, meta=np.array(json.dumps(meta)), **raw)
    except OSError as err:
        if path.parent not in _UNWRITABLE:  # once per folder: a read-only cache is said once, not per simulation
            _UNWRITABLE.add(path.parent)
            log.warning("not caching simulations in %s (%s); running without the simulation cache", path.parent,
                        getattr(err, "strerror", None) or err)


def quiet_worker() -> None:
    """Initializer of worker processes: Ctrl-C reaches the whole process group, and only the parent should act on it
    (it stops the workers itself); SIGTERM kills a worker outright, whatever handler it inherited."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def stop_workers(pool) -> None:
    """Ends ``pool``'s worker processes now, without waiting for their jobs (after Ctrl-C or SIGTERM)."""
    # ProcessPoolExecutor has no public way to end running jobs before Python 3.14 (terminate_workers)
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def _shutdown_pool() -> None:
    """Stops the worker processes before the interpreter tears down the modules their manager thread needs."""
    global _POOL
    if _POOL is not None:
        _POOL.shutdown(wait=True, cancel_futures=True)
        _POOL = None


_UNWRITABLE: set = set()  # cache folders a simulation could not be saved in


def run_many(jobs: list[Job], progress=None) -> list[Simulation]:
    """Runs ``jobs`` in order: from the in-process cache, the disk cache, or else in parallel worker processes
    forked from this one."""
    global _POOL
    results: dict[int, Simulation] = {}
    todo = []

    def made(job: Job) -> Simulation | None:
        return _CACHE.get(_key(job)) or _load(job)

    for i, job in enumerate(jobs):
        hit = made(job) or batchline.synthesize(job, made)  # other batch sizes: exact from batches 2 and 4
        if hit is not None:
            results[i] = _CACHE[_key(job)] = hit
        else:
            todo.append(i)
    done = len(results)

    def report():
        if progress:
            progress(f"simulating {jobs[0].spec.name}: {done}/{len(jobs)} steps")

    report()
    n = workers()
    if len(todo) > 1 and n > 1:
        import concurrent.futures
        import multiprocessing

        if _POOL is None:
            _POOL = concurrent.futures.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"),
                                                           initializer=quiet_worker)
            atexit.register(_shutdown_pool)
        futures = {_POOL.submit(_run_job, replace(jobs[i], spec=replace(jobs[i].spec, module=None))): i
                   for i in todo}
        try:
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                done += 1
                report()
        except concurrent.futures.process.BrokenProcessPool:
            _POOL = None
            raise SimulationError("a simulation worker died; set AUTOFIT_WORKERS=1 to simulate in this process")
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C or SIGTERM: the workers go with the parent
            stop_workers(_POOL)
            _POOL = None
            raise
    else:
        for i in todo:
            results[i] = _run_job(jobs[i])
            done += 1
            report()
    for i in todo:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[_key(jobs[i])] = results[i]
        _save(jobs[i], results[i])
    return [results[i] for i in range(len(jobs))]


def _enable_checkpointing(model: nn.Module) -> None:
    # transformers' default for activation checkpointing is non-reentrant; autofit's trainer asks for the same
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    enable = getattr(target, "activation_checkpointing_enable", None) or target.gradient_checkpointing_enable
    kwargs_name = "activation_checkpointing_kwargs" if enable.__name__.startswith("activation") else "gradient_checkpointing_kwargs"
    enable(**{kwargs_name: {"use_reentrant": False}})
    if hasattr(target.config, "use_cache"):
        target.config.use_cache = False


def _categorize(tracker: Tracker, optimizer, cfg: StepConfig, grad_uids: set[int]) -> np.ndarray:
    """The category of every allocation: weights, gradients, optimizer state, activations, logits, temporaries."""
    sizes = len(tracker._sizes)
    tags = np.array(tracker._tags, dtype=np.int64)
    phase = tags % 10
    out = np.full(sizes, TEMPORARIES, dtype=np.int8)
    out[phase == FORWARD] = ACTIVATIONS
    out[phase == INPUTS] = ACTIVATIONS
    out[phase == HEAD] = LOGITS
    out[tags == 0] = WEIGHTS  # adopted before the first step
    # The head: everything allocated in forward after the last decoder layer ended, and its backward until the
    # first layer's backward starts, is the logits-and-loss chain.
    for start, end in _head_spans(tracker):
        events = np.array(tracker._events[start:end], dtype=np.int64)
        uids = events[events >= 0]
        out[uids] = LOGITS
    for uid in grad_uids:
        if uid is not None:
            out[uid] = GRADIENTS
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                uid = tracker.uid(value)
                if uid is not None:
                    # non-fused AdamW keeps its step counters on the host (torch/optim/adamw.py, _init_group)
                    out[uid] = HOST if key == "step" and cfg.optimizer == "adamw_torch" else OPTIMIZER
    return out


def _head_spans(tracker: Tracker):
    """Event ranges of the logits-and-loss chain in each step: [end of the last layer's forward, start of its
    backward), found from the recorder's marks."""
    marks = tracker._marks
    spans = []
    last_end = {}
    for index, label in marks:
        step, _, what = label.partition(":")
        if what.startswith("E"):
            last_end[step] = index
        elif what.startswith("B") and step in last_end:
            spans.append((last_end.pop(step), index))
    return spans
