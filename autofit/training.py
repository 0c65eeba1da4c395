"""The thin training wrapper: from a plan to a finished fine-tuning run with ``transformers.Trainer``.

``train(model, data, output_dir=...)`` makes (or loads) the plan, loads the model as the plan says (16-bit base with
LoRA adapters, bitsandbytes 4- or 8-bit base for QLoRA with norms in fp32, or fp32 weights for full fine-tuning),
tokenizes the data (packed for plain text, truncated for records), builds ``TrainingArguments`` from the plan, sets
the allocator options it asks for, and runs the Trainer under the out-of-memory guard with a per-step memory log.
It saves the adapter or the model, the tokenizer, ``plan.json`` and ``memory_log.jsonl``, and reports measured peak
memory against the plan's estimate. Without a GPU it trains on the CPU with a plan made for host memory. Weights and
tokenizers come from a local directory or the local Hugging Face cache; ``random_init=True`` trains the architecture
from its config with a tokenizer built from the data, so the whole path runs anywhere.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import TrainerCallback

from autofit import data as datasets
from autofit import planner
from autofit.sim import kbit
from autofit import model as models
from autofit.errors import ConfigError, DataError, ModelError
from autofit.files import write_atomic
from autofit.guard import guard
from autofit.progress import Terminal
from autofit.units import fmt_bytes

log = logging.getLogger(__name__)

EVAL_SHARE = 0.05  # held out for evaluation when the data has enough samples
MAX_EVAL_SAMPLES = 64


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainResult:
    """What a run did and measured."""

    output_dir: str
    plan: planner.Plan
    global_step: int
    train_loss: float | None
    eval_loss: float | None
    peak_allocated: int | None  # device bytes, max over steps (CUDA); None on the CPU
    peak_reserved: int | None
    peak_host_rss: int  # the process's peak resident memory, bytes
    alloc_retries: int | None
    tokens_per_second: float | None
    guard_events: tuple = ()

    def report(self) -> str:
        e = self.plan.estimate
        lines = [f"trained {self.global_step} steps into {self.output_dir}"
                 + (f": loss {self.train_loss:.4f}" if self.train_loss is not None else "")
                 + (f", eval loss {self.eval_loss:.4f}" if self.eval_loss is not None else "")]
        if self.tokens_per_second:
            lines.append(f"  throughput: {self.tokens_per_second:,.0f} tokens/s measured "
                         f"({self.plan.tokens_per_second:,.0f} estimated)")
        if self.peak_reserved is not None:
            lines.append(f"  peak reserved {fmt_bytes(self.peak_reserved)} measured vs {fmt_bytes(e.peak_reserved)} "
                         f"estimated ({self.peak_reserved / e.peak_reserved:.1%}); peak allocated "
                         f"{fmt_bytes(self.peak_allocated)} vs {fmt_bytes(e.peak_allocated)}; "
                         f"{self.alloc_retries} allocator retries")
        else:
            lines.append(f"  peak resident memory {fmt_bytes(self.peak_host_rss)} (estimate for the step: "
                         f"{fmt_bytes(e.peak_allocated)} of tensors)")
        for ev in self.guard_events:
            lines.append(f"  out of memory at step {ev.global_step}: continued with micro-batch {ev.micro_batch_after} "
                         f"(was {ev.micro_batch_before})")
        return "\n".join(lines)


def train(
    model,
    data,
    *,
    output_dir: str,
    plan: planner.Plan | str | None = None,
    gpu=None,
    steps: int | None = None,
    epochs: float | None = None,
    random_init: bool = False,
    resume: bool = False,
    tokenizer=None,
    packing: bool | None = None,
    learning_rate: float | None = None,
    eval_steps: int | None = None,
    save_steps: int | None = None,
    progress: bool = True,
    **plan_options,
) -> TrainResult:
    """Fine-tunes ``model`` on ``data`` (a file or a list of samples) into ``output_dir``; see the module docstring.

    ``plan``: a ``Plan``, a path to a ``plan.json``, or None to plan now for ``gpu`` (default: the detected card, else
    the CPU) with ``plan_options`` passed to ``plan()``. ``steps`` or ``epochs`` bound the run (default: one epoch).
    A run bounded by ``steps`` is a short one: it keeps no checkpoints (optimizer state included) unless
    ``save_steps`` asks for them; the final model is saved either way. ``resume`` continues from the last checkpoint
    in ``output_dir``. Raises ``AutofitError`` subclasses for bad input.
    """
    if steps is not None and epochs is not None:
        raise ConfigError("give steps or epochs, not both")
    samples = datasets.load_samples(data) if not isinstance(data, (list, tuple)) else list(data)
    if not samples:
        raise DataError("the data has no samples")
    spec = models.resolve(model)
    tok = tokenizer or datasets.load_tokenizer(spec.name if spec.source != "module" else model)
    if tok is None:
        if not random_init:
            raise ModelError(f"no tokenizer for {spec.name} in a local directory or the Hugging Face cache; pass a "
                             "directory with the model's files, or random_init=True to train the architecture from "
                             "its config with a tokenizer built from the data")
        tok = datasets.build_tokenizer(samples)
    if random_init and len(tok) != spec.vocab_size:
        # the architecture with the data's tokenizer: its vocabulary sizes the embeddings and the head
        config = copy.deepcopy(spec.config)
        config.vocab_size = len(tok)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, key, getattr(tok, key, None))
        spec = replace(models.resolve(config), name=spec.name)
    reporter = Terminal(progress)
    plan = _plan(spec, plan, gpu, samples, tok, plan_options, reporter if progress else None)
    reporter.done()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "plan.json", plan.to_json())
    if plan.expandable_segments:
        _use_expandable_segments()
    net = load_model(spec, plan, model_ref=model, random_init=random_init)
    packed = packing if packing is not None else all(isinstance(s, str) for s in samples) and \
        not str(data).endswith((".jsonl", ".json"))
    train_samples, eval_samples = _split(samples)
    told = reporter if progress else None
    train_set = datasets.tokenize(train_samples, tok, seq_len=plan.seq_len, packing=packed, progress=told)
    eval_set = (datasets.tokenize(eval_samples, tok, seq_len=plan.seq_len, packing=packed, progress=told)
                if eval_samples else None)
    reporter.done()
    if learning_rate is None and random_init:
        learning_rate = 1e-3  # random weights learn at pretraining rates, not fine-tuning ones
    args = _arguments(plan, out, steps, epochs, learning_rate, eval_steps, save_steps, bool(eval_set), progress,
                      len(train_set))
    from transformers import Trainer

    memory_log = MemoryLog(out / "memory_log.jsonl", tokens_per_step=plan.effective_batch * plan.seq_len)
    trainer = Trainer(model=net, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=lambda batch: datasets.collate(batch, tok.pad_token_id), processing_class=tok,
                      callbacks=[memory_log])
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # it prints logs to stdout, where --json output goes
    state = guard(trainer)
    checkpoint = _last_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        log.warning("no checkpoint in %s to resume from; starting from the beginning", out)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_loss = trainer.evaluate().get("eval_loss") if eval_set is not None else None
    trainer.save_model(str(out))
    tok.save_pretrained(str(out))
    trainer.state.save_to_json(str(out / "trainer_state.json"))  # the run's log history, checkpoints or not
    summary = memory_log.summary()
    return TrainResult(
        output_dir=str(out), plan=plan, global_step=result.global_step, train_loss=result.training_loss,
        eval_loss=eval_loss, peak_allocated=summary["peak_allocated"], peak_reserved=summary["peak_reserved"],
        peak_host_rss=summary["peak_host_rss"], alloc_retries=summary["alloc_retries"],
        tokens_per_second=summary["tokens_per_second"], guard_events=tuple(state.events))


def _use_expandable_segments() -> None:
    """Turns on the caching allocator's expandable segments, as the plan says: through the environment when CUDA has
    not started (it is read at the first allocation), else through the allocator's settings call, which applies to
    segments made from then on. A user's own PYTORCH_CUDA_ALLOC_CONF is kept, with a warning."""
    current = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if current is not None and "expandable_segments:True" not in current:
        log.warning("the plan uses expandable segments, but PYTORCH_CUDA_ALLOC_CONF=%s is set; kept as it is", current)
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")


def _plan(spec, plan, gpu, samples, tok, options, progress=None) -> planner.Plan:
    if isinstance(plan, planner.Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        try:
            return planner.Plan.from_json(Path(plan).read_text())
        except OSError as err:
            raise ConfigError(f"cannot read the plan {plan}: {err.strerror}") from None
    options = dict(options)
    if "seq_len" not in options:
        options["dataset"], options["tokenizer"] = samples, tok
    # gpu None: the detected card, or this machine's CPU and RAM when there is none (the plan says which)
    return planner.plan(spec, gpu, progress=progress, **options)


def load_model(spec: models.ModelSpec, plan: planner.Plan, *, model_ref=None, random_init: bool = False):
    """The model as ``plan`` trains it, on the plan's device: weights from a local directory or the Hugging Face
    cache (``random_init``: from the config), quantized for QLoRA, with LoRA adapters for LoRA and QLoRA."""
    from transformers import AutoModelForCausalLM

    cfg = plan.step_config
    device = "cpu" if cfg.device == "cpu" else f"cuda:{plan.gpu.index or 0}"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"this plan is for {plan.gpu.name} but no CUDA device is here; plan for this machine with "
                          "gpu='cpu', or train on the card")
    dtype = cfg.weights_dtype
    if cfg.quantization != "none":
        if not kbit.bitsandbytes_available() or cfg.device != "cuda":
            raise ConfigError("QLoRA needs bitsandbytes and a CUDA card (pip install 'autofit[quant]'); on this machine "
                              "use method='lora' or method='full'")
    if isinstance(model_ref, torch.nn.Module) and not random_init:
        net = model_ref  # the user's own module: trained as given
    elif random_init:
        if cfg.quantization != "none":
            net = kbit.build_bnb_model(spec, cfg, device)
            _checkpointing_prep(net, cfg)
            return net
        with torch.device(device):
            net = AutoModelForCausalLM.from_config(spec.config, dtype=dtype)
    else:
        ref = _weights_ref(spec, model_ref)
        kwargs = dict(local_files_only=True, dtype=dtype)
        if cfg.quantization != "none":
            kwargs.update(quantization_config=plan.quantization_config(), device_map={"": device})
        try:
            net = AutoModelForCausalLM.from_pretrained(ref, **kwargs)
        except (OSError, ValueError) as err:
            raise ModelError(f"the weights of {spec.name} are not in a local directory or the Hugging Face cache "
                             f"({str(err).splitlines()[0][:120]}); pass a directory with the weights, or random_init=True "
                             "to train the architecture from its config") from None
        if cfg.quantization != "none":
            kbit.upcast_non_quantized(net)
        else:
            net = net.to(device)
    if cfg.method != "full":
        from peft import get_peft_model

        for p in net.parameters():
            p.requires_grad_(False)
        net = get_peft_model(net, plan.lora_config(net))
    _checkpointing_prep(net, cfg)
    return net


def _checkpointing_prep(net, cfg) -> None:
    if cfg.gradient_checkpointing and hasattr(net, "config"):
        net.config.use_cache = False


def _weights_ref(spec, model_ref) -> str:
    if isinstance(model_ref, (str, os.PathLike)):
        return str(model_ref)
    return spec.name


def _split(samples: list) -> tuple[list, list]:
    """Holds out a few samples for evaluation when there are enough."""
    n = min(MAX_EVAL_SAMPLES, int(len(samples) * EVAL_SHARE))
    if n < 2:
        return samples, []
    return samples[:-n], samples[-n:]


def _arguments(plan, out, steps, epochs, learning_rate, eval_steps, save_steps, evaluate, progress, n_items):
    per_step = plan.batch_size * plan.grad_accum
    total = steps or max(1, int(((epochs or 1.0) * n_items) // per_step))
    # a run of a given number of steps is a short one (a smoke test, a try): its checkpoints would be mostly
    # optimizer state (twice the weights for AdamW) that nothing resumes from, so it keeps none unless asked
    keep = save_steps is not None or steps is None
    save = save_steps or max(1, min(500, total // 2))
    overrides = dict(
        learning_rate=learning_rate or (1e-4 if plan.method != "full" else 2e-5),
        logging_steps=max(1, min(10, total // 10)),
        save_strategy="steps" if keep else "no", save_total_limit=2,
        report_to=[], disable_tqdm=not progress, dataloader_drop_last=False,
    )
    if keep:
        overrides["save_steps"] = save
    if steps is not None:
        overrides["max_steps"] = steps
    else:
        overrides["num_train_epochs"] = epochs or 1.0
    if evaluate:
        overrides.update(eval_strategy="steps", eval_steps=eval_steps or (save if keep else max(1, total // 2)))
    return plan.training_arguments(str(out), **overrides)


def _last_checkpoint(out: Path) -> str | None:
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(checkpoints[-1]) if checkpoints else None


class MemoryLog(TrainerCallback):
    """A Trainer callback writing one JSON line per step: peak allocated and reserved device memory since the last
    step and the allocator's retries (CUDA), the process's peak resident memory, and tokens per second."""

    def __init__(self, path: Path, *, tokens_per_step: int) -> None:
        self.path, self.tokens_per_step = path, tokens_per_step
        self.rows: list[dict] = []
        self._start = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self._start if self._start else None
        row = {"step": state.global_step, "seconds": seconds,
               "tokens_per_second": self.tokens_per_step / seconds if seconds else None,
               "peak_host_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if torch.cuda.is_available():
            stats = torch.cuda.memory_stats()
            row.update(peak_allocated=torch.cuda.max_memory_allocated(), peak_reserved=torch.cuda.max_memory_reserved(),
                       alloc_retries=stats.get("num_alloc_retries", 0), ooms=stats.get("num_ooms", 0))
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.rows and self.rows[-1].get("tokens_per_second"):
            logs["tokens_per_second"] = round(self.rows[-1]["tokens_per_second"])

    def summary(self) -> dict:
        def peak(key):
            values = [r[key] for r in self.rows if r.get(key) is not None]
            return max(values) if values else None

        speeds = [r["tokens_per_second"] for r in self.rows[1:] if r.get("tokens_per_second")]  # step 1 warms up
        return dict(peak_allocated=peak("peak_allocated"), peak_reserved=peak("peak_reserved"),
                    peak_host_rss=peak("peak_host_rss") or 0, alloc_retries=peak("alloc_retries"),
                    tokens_per_second=sum(speeds) / len(speeds) if speeds else None)
