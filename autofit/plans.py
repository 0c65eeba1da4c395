"""The values a plan hands on: ``Plan`` (every knob of a run, the estimate behind it and why) and ``Trial`` (one
real trial step on a device). Both the planner and the prober build them; training code reads them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from autofit import gpu as gpus
from autofit import validate
from autofit.errors import ConfigError
from autofit.memory import MemoryEstimate
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

    def __post_init__(self) -> None:
        validate.plan_fields(self)
        if self.batch_size * self.grad_accum != self.effective_batch:
            raise ConfigError(f"batch_size x grad_accum must equal effective_batch ({self.batch_size} x "
                              f"{self.grad_accum} != {self.effective_batch})")
        if self.source not in ("estimated", "probed"):
            raise ConfigError(f"source must be estimated or probed; got {self.source!r}")

    # -- handing the plan to training code -------------------------------------------------------------------------
    def training_arguments(self, output_dir: str = "out", **overrides):
        """``transformers.TrainingArguments`` for this plan; ``overrides`` win.

        A plan for a GPU built into arguments on a machine without CUDA fails transformers' own check; pass
        ``use_cpu=True, bf16=False, fp16=False`` to build them there anyway (a dry run). Raises ``ConfigError``.
        """
        import dataclasses

        from transformers import TrainingArguments

        fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        # transformers 5 renamed gradient checkpointing to activation checkpointing; use the name it has
        ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        kwargs = dict(
            output_dir=output_dir,
            per_device_train_batch_size=self.batch_size,
            per_device_eval_batch_size=self.eval_batch_size,
            gradient_accumulation_steps=self.grad_accum,
            bf16=self.precision == "bf16",
            fp16=self.precision == "fp16",
            optim={"adamw_8bit": "adamw_bnb_8bit"}.get(self.optimizer, self.optimizer),
            max_grad_norm=1.0,
        )
        kwargs[ckpt] = self.gradient_checkpointing
        if self.gradient_checkpointing:
            kwargs[f"{ckpt}_kwargs"] = {"use_reentrant": False}
        if self.gpu.source == "host":
            kwargs["use_cpu"] = True
        kwargs.update(overrides)
        try:
            return TrainingArguments(**kwargs)
        except ValueError as err:
            raise ConfigError(f"transformers rejects these arguments here: {str(err).splitlines()[0]} (this plan is "
                              f"for {self.gpu.name}; without it, pass use_cpu=True, bf16=False, fp16=False)") from None

    def lora_config(self, model=None):
        """The peft ``LoraConfig`` of this plan, or None for full fine-tuning. Given the ``model`` it will wrap, its
        targets' weight layout is read from it (GPT-2's ``Conv1D`` stores weights transposed: ``fan_in_fan_out``)."""
        if self.method == "full":
            return None
        from peft import LoraConfig

        transposed = model is not None and any(
            type(m).__name__ == "Conv1D" for name, m in model.named_modules()
            if name.rsplit(".", 1)[-1] in self.lora_targets)
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=list(self.lora_targets), task_type="CAUSAL_LM", fan_in_fan_out=transposed)

    def quantization_config(self):
        """The transformers ``BitsAndBytesConfig`` of this plan, or None when weights stay 16-bit."""
        if self.quantization == "none":
            return None
        import torch
        from transformers import BitsAndBytesConfig

        if self.quantization == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    @property
    def step_config(self) -> StepConfig:
        return self.estimate.config

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.estimate.required_bytes

    # -- serialisation ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in self.__slots__}
        out["gpu"] = asdict(self.gpu)
        out["estimate"] = self.estimate.to_dict()
        out["lora_targets"] = list(self.lora_targets) if self.lora_targets else None
        out["reasons"] = list(self.reasons)
        out["trials"] = [asdict(t) if hasattr(t, "__dataclass_fields__") else t for t in self.trials]
        out["alternatives"] = list(self.alternatives)
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
        """The human table: knobs, memory at the peak, reasons."""
        e = self.estimate
        method = {"full": "full fine-tuning", "lora": f"LoRA r={self.lora_r}",
                  "qlora": f"QLoRA r={self.lora_r} ({self.quantization})"}[self.method]
        lines = [
            f"plan for {self.model_name} on {self.gpu.name} ({self.source}"
            + (f", {len(self.trials)} trials" if self.trials else "") + ")",
            f"  method               {method}" + (f" on {','.join(self.lora_targets)}" if self.lora_targets else ""),
            f"  micro-batch          {self.batch_size} x {self.seq_len} tokens",
            f"  accumulation         {self.grad_accum} (effective batch {self.effective_batch})",
            f"  sequence length      {self.seq_len} ({self.seq_len_source}"
            + (f", {self.truncated_share:.1%} of samples truncated" if self.truncated_share is not None else "") + ")",
            f"  checkpointing        {'on' if self.gradient_checkpointing else 'off'}",
            f"  precision            {self.precision}",
            f"  optimizer            {self.optimizer}",
            f"  eval batch           {self.eval_batch_size}",
            f"  est. throughput      {self.tokens_per_second:,.0f} tokens/s",
            f"  memory               needs {fmt_bytes(e.required_bytes)} of a {fmt_bytes(self.budget_bytes)} budget "
            f"({fmt_bytes(self.headroom_bytes)} headroom)",
        ]
        parts = e.components(tight=True)  # they sum to what the plan needs
        width = max(len(k) for k in parts)
        for name, value in parts.items():
            lines.append(f"    {name:<{width}}  {fmt_bytes(value):>11}")
        lines.append(f"    (on a card with memory to spare the allocator caches more: up to "
                     f"{fmt_bytes(e.peak_reserved)} reserved, {fmt_bytes(e.device_total)} in nvidia-smi)")
        lines.append("  why:")
        lines.extend(f"    - {r}" for r in self.reasons)
        lines.append("  use it:  args = plan.training_arguments(output_dir='out')  # transformers.TrainingArguments")
        return "\n".join(lines)
