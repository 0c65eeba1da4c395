"""What the GPU benchmarks share: the card they run on, the models and configurations they try, one measured trial
against its estimate, and where results go."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
from dataclasses import replace
from pathlib import Path

import torch

from autofit import calibration, gpu, memory, model, probing

from autofit.sim import kbit, simulate
from autofit.sim.simulate import StepConfig

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["distilgpt2", "openai-community/gpt2", "openai-community/gpt2-medium", "HuggingFaceTB/SmolLM2-135M",
          "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "Qwen/Qwen2.5-0.5B"]


def environment(dry_run: bool) -> dict:
    env = {"python": platform.python_version(), "versions": calibration.versions(), "argv": " ".join(sys.argv),
           "date": datetime.date.today().isoformat(), "dry_run": dry_run}
    if not dry_run:
        props = torch.cuda.get_device_properties(0)
        env.update(card=props.name, total_memory=props.total_memory, compute_capability=[props.major, props.minor],
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   bitsandbytes=kbit.bitsandbytes_available())
    return env


def out_dir(env: dict, name: str | None = None) -> Path:
    card = "dry-run-cpu" if env["dry_run"] else re.sub(r"[^A-Za-z0-9]+", "-", env["card"]).strip("-").lower()
    path = RESULTS / (name or f"{card}-{env['date']}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def shrink(spec: model.ModelSpec, layers: int = 2, vocab: int = 4096) -> model.ModelSpec:
    """A dry run's stand-in: the same architecture cut to a few layers and a small vocabulary (CPU time), resolved as
    its own model."""
    config = model.with_layers(spec.config, layers)
    config.vocab_size = min(config.vocab_size, vocab)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= config.vocab_size:
            setattr(config, key, 0)
        elif isinstance(value, list):
            setattr(config, key, [v if v < config.vocab_size else 0 for v in value])
    return replace(model.resolve(config), name=f"{spec.name} ({layers} layers)")


def narrow(spec: model.ModelSpec, width: int = 64, heads: int = 4) -> model.ModelSpec:
    """A dry run's stand-in for long runs: ``shrink`` made ``width`` wide too, for GPT-2 and Llama-style configs
    (transformers maps GPT-2's n_embd and n_head to these names). bf16 matrix products on a CPU without bf16 units
    run tens of times slower than fp32 ones, so the full width would take minutes per run."""
    config = model.with_layers(shrink(spec).config, 2)
    config.hidden_size, config.num_attention_heads = width, heads
    if hasattr(config, "n_inner"):
        config.n_inner = 4 * width
    if getattr(config, "intermediate_size", None):
        config.intermediate_size = 2 * width
    if getattr(config, "num_key_value_heads", None):
        config.num_key_value_heads = heads // 2
    if getattr(config, "head_dim", None):
        config.head_dim = width // heads
    return replace(model.resolve(config), name=f"{spec.name} (2 layers, {width} wide)")


def methods(dry_run: bool) -> list[str]:
    if dry_run:
        return ["full", "lora"]
    return ["full", "lora"] + (["qlora"] if kbit.bitsandbytes_available() else [])


def step_config(card, method: str, checkpointing: bool, dry_run: bool) -> StepConfig:
    if dry_run:
        return StepConfig(method=method, gradient_checkpointing=checkpointing, device="cpu", precision="fp32")
    return memory.step_config(card, method=method, gradient_checkpointing=checkpointing)


def device(dry_run: bool, limit: int | None = None):
    if dry_run:
        return probing.BudgetedCpuDevice(budget_bytes=limit or 64 * 2**30)
    return probing.CudaDevice(index=0, limit_bytes=limit)


def detected_card(dry_run: bool):
    return gpu.resolve("cpu") if dry_run else gpu.resolve("cuda:0")


def measure(spec, cfg, dev, batch_size: int, seq_len: int, *, steps: int = 3) -> dict:
    """One configuration: the estimate (simulated, two depths) against a real trial of ``steps`` steps."""
    est = memory.simulate_point(spec, cfg, batch_size=batch_size, seq_len=seq_len)
    trial = probing.run_trial(spec, cfg, dev, batch_size=batch_size, seq_len=seq_len, steps=steps,
                              predicted=est.min_reserved)
    row = dict(model=spec.name, method=cfg.method, quantization=cfg.quantization, precision=cfg.precision,
               checkpointing=cfg.gradient_checkpointing, batch_size=batch_size, seq_len=seq_len,
               attention_kernel=est.attention_kernel, outcome=trial.outcome,
               predicted_allocated=est.peak_allocated, predicted_reserved=est.peak_reserved,
               predicted_min_reserved=est.min_reserved, predicted_device=est.device_total,
               measured_allocated=trial.peak_allocated, measured_reserved=trial.peak_reserved,
               measured_device=trial.device_used, tokens_per_second=trial.tokens_per_second,
               predicted_context=est.cuda_context, measured_outside_allocator=trial.outside_allocator)
    for what in ("allocated", "reserved", "device"):
        m, p = row[f"measured_{what}"], row[f"predicted_{what}"]
        row[f"error_{what}"] = (p - m) / m if m else None
    return row


def write(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str))


def errors(rows: list[dict], what: str) -> dict:
    values = [abs(r[f"error_{what}"]) for r in rows if r.get(f"error_{what}") is not None]
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean_abs": sum(values) / len(values), "worst": max(values)}


def cuda_or_dry(args) -> bool:
    """True for a dry run: asked for, or no CUDA here (said so)."""
    if args.dry_run:
        return True
    if not torch.cuda.is_available():
        print("# no CUDA device here: running the dry mode on the budgeted CPU device (pass --dry-run to say so)")
        return True
    os.environ.setdefault("AUTOFIT_WORKERS", str(min(8, os.cpu_count() or 1)))
    return False


def silence() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # checkpoint saves draw bars that bury the benchmarks' own lines
    simulate._quiet_transformers  # noqa: B018 - the simulations hush themselves; the trials use this
