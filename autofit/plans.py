"""The values a plan hands on: ``Plan`` (every knob of a run, the estimate behind it and why) and ``Trial`` (one
real trial step on a device). Both the planner and the prober build them; training code reads them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from autofit import gpu as gpus
from autofit import offload, validate
from autofit.host import HostEstimate
from autofit.errors import ConfigError
from autofit.memory import MemoryEstimate
from autofit.runs import RunEstimate
from autofit.sim import arch, simulate
from autofit.sim.simulate import StepConfig
from autofit.units import fmt_bytes


# -- trials ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, slots=True)
class Trial:
    """One trial on the device: its knobs, what happened, what it measured."""

    number: int
    batch_size: int
    seq_len: int
    method: str
    quantization: str
    precision: str
    gradient_checkpointing: bool
    optimizer: str
    eval_batch_size: int | None
    outcome: str  # "fits" or "oom"
    peak_allocated: int | None
    peak_reserved: int | None
    predicted_reserved: int  # the estimate's min_reserved for these knobs, before calibration
    limit_bytes: int | None  # what the allocator was allowed
    seconds: float  # wall time of the whole trial
    step_seconds: float | None  # the last training step, after warm-up
    tokens_per_second: float | None
    memory_returned: bool  # allocated memory back at its level before the trial
    isolated: bool  # ran in its own process
    note: str = ""
    device_used: int | None = None  # this process's memory on the card per NVML after the steps (nvidia-smi's view)
    outside_allocator: int | None = None  # of device_used, what the caching allocator did not hold (context etc.)

    @property
    def fits(self) -> bool:
        return self.outcome == "fits"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Trial":
        return cls(**data)

    def line(self) -> str:
        knobs = f"batch {self.batch_size} x {self.seq_len}"
        if not self.fits:
            return f"trial {self.number}: {knobs}: out of memory ({self.seconds:.1f}s)"
        return (f"trial {self.number}: {knobs}: fits, peak reserved {fmt_bytes(self.peak_reserved)} (estimate "
                f"{fmt_bytes(self.predicted_reserved)}), {self.tokens_per_second:,.0f} tokens/s ({self.seconds:.1f}s)")


# -- the plan -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """Every knob of a fine-tuning run on one card, the memory estimate behind it, and why."""

    model_name: str
    gpu: gpus.GpuInfo
    method: str
    quantization: str
    precision: str
    gradient_checkpointing: bool
    optimizer: str
    lora_r: int | None
    lora_alpha: int | None
    lora_dropout: float | None
    lora_targets: tuple[str, ...] | None
    batch_size: int
    grad_accum: int
    effective_batch: int
    seq_len: int
    eval_batch_size: int
    budget_bytes: int
    estimate: MemoryEstimate
    tokens_per_second: float
    source: str  # "estimated" or "probed"
    reasons: tuple[str, ...]
    seq_len_source: str  # "user", "data" or "default"
    truncated_share: float | None = None
    expandable_segments: bool = False
    alternatives: tuple[dict, ...] = ()  # close candidates a probe ranks by measured speed (config, batch, tokens/s)
    trials: tuple = ()  # probe trials, when probed
    measured_reserved: int | None = None  # peak reserved bytes the probe measured at the chosen micro-batch
    run: RunEstimate | None = None  # the run's peaks over steps of varying length, where it was modelled
    need_bytes: int | None = None  # what the planner checked against the budget: the step's or run's need,
    # calibrated, with the estimate's uncertainty kept free until a probe measured it (None: the step's need)
    largest_batch: int | None = None  # the largest micro-batch that fits, whatever the effective batch
    gradient_bytes: int | None = None  # the trainable parameters' gradients once all exist (not all live at the peak)
    trainable_params: int | None = None
    task: str = "causal-lm"  # the head trained (autofit.sim.arch.TASKS)
    target_len: int | None = None  # an encoder-decoder's target (decoder) tokens per sample; None: seq_len
    host: HostEstimate | None = None  # the run's host RAM at its peak, and the data loader that fits it

    def __post_init__(self) -> None:
        validate.plan_fields(self)
        if self.task not in arch.TASKS:
            raise ConfigError(f"the plan's task must be one of {', '.join(arch.TASKS)}; got {self.task!r}")
        if self.batch_size * self.grad_accum != self.effective_batch:
            raise ConfigError(f"batch_size x grad_accum must equal effective_batch ({self.batch_size} x "
                              f"{self.grad_accum} != {self.effective_batch})")
        if self.source not in ("estimated", "probed"):
            raise ConfigError(f"source must be estimated or probed; got {self.source!r}")
        if self.largest_batch is not None and self.largest_batch < self.batch_size:
            raise ConfigError(f"largest_batch ({self.largest_batch}) cannot be below batch_size ({self.batch_size})")

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        quant = "" if self.quantization == "none" else f" {self.quantization}"
        return (f"Plan({self.model_name} on {self.gpu.name}: {self.method}{quant}, micro-batch {self.batch_size} x "
                f"{self.grad_accum} x {self.seq_len} tokens, {self.precision}, checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'}, needs {fmt_bytes(self.estimate.required_bytes)} "
                f"of {fmt_bytes(self.budget_bytes)}, {self.source})")

    # -- handing the plan to training code -------------------------------------------------------------------------
    def training_arguments(self, output_dir: str = "out", *, cls=None, **overrides):
        """``transformers.TrainingArguments`` for this plan (or ``cls``, a subclass such as TRL's ``SFTConfig``);
        ``overrides`` win.

        A class with ``max_length`` gets the plan's sequence length there; one with ``packing`` (TRL's ``SFTConfig``)
        gets ``packing=True`` with the ``"wrapped"`` strategy: full rows of ``seq_len`` tokens in ordinary batches,
        the batch the estimate simulated. Padding-free batches (``packing_strategy="bfd"``, or ``padding_free=True``;
        FlashAttention only) hold at most as many tokens, so the plan holds for them as an upper bound.

        A plan for a GPU built into arguments on a machine without CUDA fails transformers' own check; pass
        ``use_cpu=True, bf16=False, fp16=False`` to build them there anyway (a dry run). Raises ``ConfigError``.
        """
        import dataclasses

        from transformers import TrainingArguments

        cls = cls or TrainingArguments
        if not (isinstance(cls, type) and issubclass(cls, TrainingArguments)):
            raise ConfigError(f"cls must be TrainingArguments or a subclass (TRL's SFTConfig); got {cls!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        # transformers 5 renamed gradient checkpointing to activation checkpointing; use the name it has
        ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        kwargs = dict(
            output_dir=output_dir,
            per_device_train_batch_size=self.batch_size,
            per_device_eval_batch_size=self.eval_batch_size,
            gradient_accumulation_steps=self.grad_accum,
            bf16=self.precision == "bf16-mixed",  # "-true" precisions train a 16-bit model without autocast
            fp16=self.precision == "16-mixed",
            optim={"adamw_8bit": "adamw_bnb_8bit", "adamw_cpu_offload": "adamw_torch"}.get(self.optimizer,
                                                                                            self.optimizer),
            max_grad_norm=1.0,
        )
        if self.optimizer == "adamw_cpu_offload":
            # torchao copies each gradient to the host as backward finishes it, before the Trainer would clip; the
            # optimizer itself comes from optimizer_cls_and_kwargs() (TrainingArguments.optim cannot name it)
            kwargs["max_grad_norm"] = 0.0
        if self.host is not None:
            kwargs.update(dataloader_num_workers=self.host.loader.num_workers,
                          dataloader_pin_memory=self.host.loader.pin_memory)
        kwargs[ckpt] = self.gradient_checkpointing
        if self.gradient_checkpointing:
            kwargs[f"{ckpt}_kwargs"] = {"use_reentrant": False}
        if self.gpu.source == "host":
            kwargs["use_cpu"] = True
        if "max_length" in fields:
            kwargs["max_length"] = self.seq_len
        if "packing" in fields:
            kwargs.update(packing=True, packing_strategy="wrapped")
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise ConfigError(f"transformers rejects these arguments here: {str(err).splitlines()[0]} (this plan is "
                              f"for {self.gpu.name}; without it, pass use_cpu=True, bf16=False, fp16=False)") from None

    def optimizer_cls_and_kwargs(self, args=None):
        """``(optimizer class, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)`` where the plan's optimizer is one
        ``TrainingArguments.optim`` cannot name (AdamW offloaded to the CPU through torchao), else None. ``args``
        (the ``TrainingArguments``) supplies the learning rate, betas, epsilon and weight decay. Raises
        ``ConfigError`` when torchao is not installed."""
        found = offload.training_optimizer(self.optimizer)
        if found is None:
            return None
        cls, kwargs = found
        if args is not None:
            kwargs = dict(kwargs, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                          eps=args.adam_epsilon, weight_decay=args.weight_decay)
        return cls, kwargs

    def lora_config(self, model=None):
        """The peft ``LoraConfig`` of this plan, or None for full fine-tuning. Given the ``model`` it will wrap, its
        targets' weight layout is read from it (GPT-2's ``Conv1D`` stores weights transposed: ``fan_in_fan_out``)."""
        if self.method == "full":
            return None
        from peft import LoraConfig

        transposed = model is not None and any(
            type(m).__name__ == "Conv1D" for name, m in model.named_modules()
            if name.rsplit(".", 1)[-1] in self.lora_targets or self.lora_targets == (arch.ALL_LINEAR,))
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=arch.peft_targets(self.lora_targets), task_type=arch._PEFT_TASK[self.task],
                          fan_in_fan_out=transposed)

    def quantization_config(self):
        """The transformers ``BitsAndBytesConfig`` of this plan, or None when weights stay 16-bit."""
        if self.quantization == "none":
            return None
        import torch
        from transformers import BitsAndBytesConfig

        if self.quantization == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float16 if self.precision.startswith("16") else torch.bfloat16)

    @property
    def step_config(self) -> StepConfig:
        return self.estimate.config

    @property
    def offload_activations(self) -> bool:
        """Whether the planned step keeps its saved activations in host RAM (``prepare_model`` applies it)."""
        return self.estimate.config.offload_activations

    def prepare_model(self, model):
        """Applies to ``model`` what ``training_arguments()`` cannot carry: activation offloading where the plan has
        it (``offload.offload_activations``). Returns the handle whose ``remove()`` undoes it, or None."""
        return offload.offload_activations(model) if self.offload_activations else None

    @property
    def required_bytes(self) -> int:
        """Free device memory the plan needs: what the planner checked against the budget."""
        if self.need_bytes is not None:
            return self.need_bytes
        return max(self.estimate.required_bytes, self.run.required_bytes if self.run is not None else 0)

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.required_bytes

    # -- serialisation ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in self.__slots__}
        out["gpu"] = asdict(self.gpu)
        out["estimate"] = self.estimate.to_dict()
        out["lora_targets"] = list(self.lora_targets) if self.lora_targets else None
        out["reasons"] = list(self.reasons)
        out["trials"] = [asdict(t) if hasattr(t, "__dataclass_fields__") else t for t in self.trials]
        out["run"] = self.run.to_dict() if self.run is not None else None
        out["alternatives"] = list(self.alternatives)
        out["host"] = self.host.to_dict() if self.host is not None else None
        return out

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), indent=2, **kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        """The plan ``to_dict`` wrote. Raises ``ConfigError`` (``GpuError`` for its card) naming what is wrong."""
        data = dict(validate.plan_data(data))
        try:
            gpu = dict(data["gpu"])
            if isinstance(gpu.get("compute_capability"), list):
                gpu["compute_capability"] = tuple(gpu["compute_capability"])
            data["gpu"] = gpus.GpuInfo(**gpu)
            data["estimate"] = MemoryEstimate.from_dict(data["estimate"])
            targets = data.get("lora_targets")
            data["lora_targets"] = tuple(targets) if isinstance(targets, list) and targets else targets or None
            data["reasons"] = tuple(data["reasons"])
            data["trials"] = tuple(Trial.from_dict(t) for t in data.get("trials") or ())
            data["alternatives"] = tuple(data.get("alternatives") or ())
            data["run"] = RunEstimate.from_dict(data["run"]) if data.get("run") else None
            data["host"] = HostEstimate.from_dict(data["host"]) if data.get("host") else None
            if isinstance(data.get("precision"), str):  # plans written before "-mixed"/"-true" named precision so
                data["precision"] = simulate.precision_name(data["precision"])
            return cls(**data)
        except (KeyError, TypeError, ValueError) as err:
            # a field missing, unknown or of another type in the plan or its parts (GpuInfo, MemoryEstimate, Trial)
            raise ConfigError(f"not a plan file autofit wrote ({type(err).__name__}: {str(err).splitlines()[0]}); "
                              "write plans with autofit probe MODEL --out plan.json") from None

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """The plan in ``text`` (what ``to_json`` wrote). Raises ``ConfigError``."""
        if not isinstance(text, (str, bytes)):
            raise ConfigError(f"Plan.from_json reads JSON text; got a {type(text).__name__}")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise ConfigError(f"not a plan file autofit wrote: not JSON ({str(err).splitlines()[0][:100]})") from None
        return cls.from_dict(data)

    def summary(self) -> str:
        """The human table: knobs, memory at the peak (what is live then, and why), reasons. ``str(plan)`` is this."""
        e = self.estimate
        host = self.gpu.source == "host"
        method = {"full": "full fine-tuning", "lora": f"LoRA r={self.lora_r}",
                  "qlora": f"QLoRA r={self.lora_r} ({self.quantization})"}[self.method]
        largest = (f" (the largest that fits: {self.largest_batch})"
                   if self.largest_batch is not None and self.largest_batch > self.batch_size else "")
        lines = [
            f"plan for {self.model_name} on {self.gpu.name} ({self.source}"
            + (f", {len(self.trials)} trials" if self.trials else "") + ")",
            f"  method               {method}" + (f" on {','.join(self.lora_targets)}" if self.lora_targets else ""),
            f"  micro-batch          {self.batch_size} x {self.seq_len} tokens{largest}",
            f"  accumulation         {self.grad_accum} (effective batch {self.effective_batch})",
            f"  sequence length      {self.seq_len} ({self.seq_len_source}"
            + (f", {self.truncated_share:.1%} of samples truncated" if self.truncated_share is not None else "") + ")"
            + (f"; target length {self.target_len or self.seq_len} ({self.task})" if self.task == "seq2seq-lm" else
               f"; {self.task}" if self.task != "causal-lm" else ""),
            f"  checkpointing        {'on' if self.gradient_checkpointing else 'off'}",
        ]
        if self.offload_activations:
            lines.append(f"  activations          offloaded to pinned host RAM (torch save_on_cpu): "
                         f"{fmt_bytes(e.offloaded_pinned)} held, {fmt_bytes(e.offloaded_copied)} each way a micro-batch")
        lines += [
            f"  precision            {self.precision}",
            f"  optimizer            {self.optimizer}",
            f"  eval batch           {self.eval_batch_size}",
            f"  est. throughput      {self.tokens_per_second:,.0f} tokens/s",
            f"  memory               needs {fmt_bytes(self.required_bytes)} of a {fmt_bytes(self.budget_bytes)} "
            f"{'RAM ' if host else ''}budget ({fmt_bytes(self.headroom_bytes)} headroom)",
            f"    at the peak ({e.where}):",
        ]
        parts = self.peak_parts()
        width = max(len(k) for k in parts)
        for name, value in parts.items():
            lines.append(f"    {name:<{width}}  {fmt_bytes(value):>11}" + self._part_note(name, value))
        beyond = self.required_bytes - e.required_bytes
        if beyond > 0:
            lines.append(f"    {'+ run and unknowns':<{width}}  {fmt_bytes(beyond):>11}   the run's fragmentation over "
                         "varying lengths and what the estimate cannot know until measured (see why)")
        if not host and e.peak_reserved > e.min_reserved:
            spare = self.gpu.total_bytes - self.gpu.used_by_others_bytes
            if e.device_total <= spare:
                lines.append(f"    (with memory to spare on this card the allocator caches more: up to "
                             f"{fmt_bytes(e.peak_reserved)} reserved, {fmt_bytes(e.device_total)} in nvidia-smi)")
            else:
                lines.append("    (the allocator caches what the card has room for and releases cached blocks "
                             "before it would fail)")
        if self.run is not None:
            r = self.run
            lines.append(f"  over a run           {r.steps} steps padded to {min(r.lengths)}-{max(r.lengths)} tokens "
                         f"({r.length_source}): needs {fmt_bytes(r.required_bytes)}; {r.growth()}")
        if self.host is not None:
            h = self.host
            lines.append(f"  host RAM             {h.line()}")
            lines.append(f"    data loader        {h.loader.num_workers} worker{'' if h.loader.num_workers == 1 else 's'}, "
                         "pinned batches "
                         f"{'on' if h.loader.pin_memory else 'off'}")
            for name, value in h.parts:
                lines.append(f"    {name:<40}  {fmt_bytes(value):>11}")
        if self.expandable_segments:
            lines.append("  allocator            export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True   "
                         "(before Python starts; autofit train sets it)")
        lines.append("  why:")
        lines.extend(f"    - {r}" for r in self.reasons)
        lines.append("  use it:  args = plan.training_arguments(output_dir='out')  # transformers.TrainingArguments")
        if self.offload_activations:
            lines.append("           plan.prepare_model(model)  # offloads its activations, as planned (autofit train "
                         "does this)")
        return "\n".join(lines)

    def peak_parts(self) -> dict[str, int]:
        """What the plan needs, by part, at the peak instant; the parts sum to ``estimate.required_bytes``.

        The evaluation pass, where it peaks above the training step, is its own part rather than hidden in the
        allocator margin; a CPU run has no workspaces, allocator margin or CUDA context, so those are left out.
        """
        e = self.estimate
        parts = e.components(tight=True)
        tensors = (e.weights + e.gradients + e.optimizer_state + e.activations + e.logits_and_loss + e.temporaries)
        excess = max(0, (e.eval_peak or 0) - tensors)
        if excess:
            parts["allocator margin"] -= excess
            parts = {**{k: v for k, v in parts.items() if k not in ("allocator margin", "CUDA context")},
                     f"evaluation pass (batch {self.eval_batch_size})": excess,
                     "allocator margin": parts["allocator margin"], "CUDA context": parts["CUDA context"]}
        if self.gpu.source == "host":
            parts = {k: v for k, v in parts.items()
                     if k not in ("cuBLAS workspaces", "allocator margin", "CUDA context") or v}
        return parts

    def _part_note(self, name: str, value: int) -> str:
        """Why a part has the size it has at the peak, where that surprises: gradients that are not all there."""
        if name != "gradients" or not self.gradient_bytes or value >= self.gradient_bytes:
            return ""
        if value == 0:
            return (f"   none yet: last step's were freed by zero_grad and backward has not reached this step's "
                    f"({fmt_bytes(self.gradient_bytes)} once all exist)")
        return f"   part of them: backward is part-way ({fmt_bytes(self.gradient_bytes)} once all exist)"
