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
import inspect
import json
import logging
import os
import re
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from autofit import data as datasets
from autofit import distributed
from autofit import gpu as gpus
from autofit import host as hostmem
from autofit import planner, validate
from autofit.sim import kbit, simulate
from autofit import model as models
from autofit.errors import ConfigError, ModelError
from autofit.files import write_atomic
from autofit.guard import guard
from autofit.progress import Terminal
from autofit.units import fmt_bytes

log = logging.getLogger(__name__)

EVAL_SHARE = 0.05  # held out for evaluation when the data has enough samples
MAX_EVAL_SAMPLES = 64
# plan()'s options that train() passes on; the data and tokenizer it passes itself
PLAN_OPTIONS = tuple(name for name in inspect.signature(planner.plan).parameters
                     if name not in ("model", "gpu", "dataset", "tokenizer", "progress"))
# Hidden folders beside the checkpoints: a checkpoint being written, and an old one being deleted. Neither matches
# transformers' ``checkpoint-*``, so a half-written or half-deleted checkpoint is never taken for one.
STAGING, DISCARDED = ".staging-", ".discarded-"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_STATE = "trainer_state.json"  # transformers writes it last: a checkpoint without it is incomplete
# Files of a finished run's weights, moved into place last so that their presence means the save completed.
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors",
            "adapter_model.bin")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainResult:
    """What a run did and measured."""

    output_dir: str
    plan: planner.Plan  # or a distributed.WorldPlan, trained on its ranks
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
        ranks = (f" on {self.plan.world_size} ranks ({self.plan.strategy.upper()})"
                 if isinstance(self.plan, distributed.WorldPlan) else "")
        lines = [f"trained {self.global_step} steps{ranks} into {self.output_dir}"
                 + (f": loss {self.train_loss:.4f}" if self.train_loss is not None else "")
                 + (f", eval loss {self.eval_loss:.4f}" if self.eval_loss is not None else "")]
        if self.tokens_per_second:
            lines.append(f"  throughput: {self.tokens_per_second:,.0f} tokens/s measured "
                         f"({self.plan.tokens_per_second:,.0f} estimated)")
        if self.peak_reserved is not None and getattr(self.plan, "strategy", "ddp") == "fsdp":
            lines.append(f"  peak reserved {fmt_bytes(self.peak_reserved)} and allocated "
                         f"{fmt_bytes(self.peak_allocated)} on rank 0 (planned per rank: {fmt_bytes(self.plan.rank_need)} "
                         f"with the CUDA context); {self.alloc_retries} allocator retries")
        elif self.peak_reserved is not None:
            # under DDP the gradient buckets are the allocator's too: the rank's step plus them
            buckets = self.plan.rank_parts.get("DDP gradient buckets", 0) if ranks else 0
            reserved, allocated = e.peak_reserved + buckets, e.peak_allocated + buckets
            lines.append(f"  peak reserved {fmt_bytes(self.peak_reserved)} measured vs {fmt_bytes(reserved)} "
                         f"estimated ({self.peak_reserved / reserved:.1%}); peak allocated "
                         f"{fmt_bytes(self.peak_allocated)} vs {fmt_bytes(allocated)}"
                         f"{' on rank 0, with DDP buckets' if ranks else ''}; {self.alloc_retries} allocator retries")
        else:
            lines.append(f"  peak resident memory {fmt_bytes(self.peak_host_rss)}{' on rank 0' if ranks else ''} "
                         "(estimate for the step: "
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
    overwrite: bool = False,
    tokenizer=None,
    packing: bool | None = None,
    learning_rate: float | None = None,
    eval_steps: int | None = None,
    save_steps: int | None = None,
    progress: bool | Callable[[str], None] = True,
    **plan_options,
) -> TrainResult:
    """Fine-tunes ``model`` on ``data`` (a file or a list of samples) into ``output_dir``; see the module docstring.

    ``plan``: a ``Plan``, a path to a ``plan.json``, or None to plan now for ``gpu`` (default: the detected card, else
    the CPU) with ``plan_options`` passed to ``plan()``; a given plan is checked against the model. ``steps`` or
    ``epochs`` bound the run (default: one epoch). ``resume`` continues from the last complete checkpoint in
    ``output_dir`` (with the plan saved there); a folder that holds a run is otherwise refused unless ``overwrite``.
    ``progress``: True for progress bars, or a callable that also hears how data preparation goes. Checkpoints and
    the final weights are written whole or not at all, so an interrupted run (Ctrl-C, SIGTERM) resumes without
    losing or repeating a step. Raises ``AutofitError`` subclasses for bad input.
    """
    out = validate.train_inputs(
        data=data, output_dir=output_dir, plan=plan, plan_type=(planner.Plan, distributed.WorldPlan), steps=steps,
        epochs=epochs,
        random_init=random_init, resume=resume, overwrite=overwrite, tokenizer=tokenizer, packing=packing,
        learning_rate=learning_rate, eval_steps=eval_steps, save_steps=save_steps, plan_options=plan_options,
        plan_parameters=PLAN_OPTIONS)
    # started on several ranks (autofit train --gpus N, accelerate launch, torchrun): every rank runs all of this;
    # rank 0 alone writes the folder's files and speaks, the others wait for it where they read what it wrote
    launch = distributed.launched()
    main = launch is None or launch.rank == 0
    if not main:
        progress = False
    # progress: a callable hears every message; True shows them on a terminal (bars for counted work)
    tell = progress if callable(progress) else Terminal(bool(progress))
    if not isinstance(data, (list, tuple)):
        tell(f"reading {data}")
    samples = datasets.load_samples(data) if not isinstance(data, (list, tuple)) else validate.samples(data)
    spec, tok = _model_and_tokenizer(model, samples, tokenizer, random_init, tell)
    if resume and plan is None and (out / "plan.json").is_file():
        plan = out / "plan.json"  # the run continues with the knobs it started with
        if plan_options:
            log.warning("resuming with the plan in %s, so %s ignored", plan, ", ".join(
                f"{k}={v!r}" for k, v in sorted(plan_options.items())) + (" is" if len(plan_options) == 1 else " are"))
    plan = _plan(spec, plan, gpu, samples, tok, plan_options, tell, launch)
    if launch is not None:  # gloo for ranks on the CPU, even where a card is here
        distributed.join_group(launch, cpu=plan.step_config.device == "cpu")
    validate.plan_for_model(plan, spec)
    _check_ranks(plan, launch)
    _barrier()  # every rank has read the folder as it was before rank 0 changes it
    if main:
        if overwrite:
            _clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(out)
        write_atomic(out / "plan.json", plan.to_json())
    if plan.expandable_segments:
        _use_expandable_segments()
    simulate._shutdown_pool()  # planning is over: the run does not share its pages with idle simulation workers
    net = load_model(spec, plan, model_ref=model, random_init=random_init,
                     device_index=launch.local_rank if launch is not None else None)
    packed = packing if packing is not None else all(isinstance(s, str) for s in samples) and \
        not str(data).endswith((".jsonl", ".json"))
    train_samples, eval_samples = _split(samples)
    train_set = datasets.tokenize(train_samples, tok, seq_len=plan.seq_len, packing=packed, progress=tell)
    eval_set = datasets.tokenize(eval_samples, tok, seq_len=plan.seq_len, packing=packed) if eval_samples else None
    getattr(tell, "done", lambda: None)()  # end a terminal's progress line before the Trainer prints
    if learning_rate is None and random_init:
        learning_rate = 1e-3  # random weights learn at pretraining rates, not fine-tuning ones
    # the loader that fits this machine's RAM now, with the data's tokens counted; plan.json says what the run used
    tokens = sum(len(item["input_ids"]) for item in train_set)
    if isinstance(plan, distributed.WorldPlan):  # each rank's loader, on this machine
        plan = replace(plan, rank=hostmem.refit_loader(plan.rank, spec, tokens=tokens, tell=log.warning))
    else:
        plan = hostmem.refit_loader(plan, spec, tokens=tokens, tell=log.warning)
    if main:
        write_atomic(out / "plan.json", plan.to_json())
    args = _arguments(plan, out, steps, epochs, learning_rate, eval_steps, save_steps, bool(eval_set), progress,
                      len(train_set))
    checkpoint = _last_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        log.warning("no complete checkpoint in %s to resume from; starting from the beginning", out)
    # steps after the checkpoint run again: their rows go, so the log holds each step once; a rank's own log each
    log_path = out / ("memory_log.jsonl" if main else f"memory_log.rank{launch.rank}.jsonl")
    _trim_memory_log(log_path, _step_of(checkpoint))
    memory_log = MemoryLog(log_path, tokens_per_step=plan.effective_batch * plan.seq_len)
    planned_optimizer = plan.optimizer_cls_and_kwargs(args)  # one TrainingArguments.optim cannot name, or None
    trainer = _Trainer(model=net, args=args, train_dataset=train_set, eval_dataset=eval_set,
                       data_collator=lambda batch: datasets.collate(batch, tok.pad_token_id), processing_class=tok,
                       callbacks=[memory_log],
                       **({"optimizer_cls_and_kwargs": planned_optimizer} if planned_optimizer else {}))
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # it prints logs to stdout, where --json output goes
    if hasattr(progress, "done"):
        progress.done()  # the Trainer's own progress bar takes over
    if getattr(plan, "strategy", "ddp") == "fsdp":
        # FSDP gathers inside the step, where a rank that ran out of memory would leave the others waiting
        log.info("FSDP: trained without the out-of-memory guard, on the planned micro-batch")
        state = None
    else:
        state = guard(trainer)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_loss = trainer.evaluate().get("eval_loss") if eval_set is not None else None
    _save_final(trainer, tok, out, main)
    if main:
        trainer.state.save_to_json(str(out / "trainer_state.json"))  # the run's log history, checkpoints or not
    _barrier()
    summary = memory_log.summary()
    return TrainResult(
        output_dir=str(out), plan=plan, global_step=result.global_step, train_loss=result.training_loss,
        eval_loss=eval_loss, peak_allocated=summary["peak_allocated"], peak_reserved=summary["peak_reserved"],
        peak_host_rss=summary["peak_host_rss"], alloc_retries=summary["alloc_retries"],
        tokens_per_second=summary["tokens_per_second"], guard_events=tuple(state.events) if state else ())


def _model_and_tokenizer(model, samples, tokenizer, random_init, tell):
    """The model's spec and the tokenizer the run uses: the given one, the model's own from disk, or (``random_init``)
    one built from ``samples``, whose vocabulary then sizes the architecture's embeddings and head."""
    spec = models.resolve(model)
    if spec.task != "causal-lm":
        raise ConfigError(f"train() fine-tunes causal language models; {spec.name} trains as {spec.task}: take its "
                          "plan into your own Trainer (plan.training_arguments()), Lightning or loop (README)")
    tok = tokenizer or datasets.load_tokenizer(spec.name if spec.source != "module" else model)
    if tok is None:
        if not random_init:
            raise ModelError(f"no tokenizer for {spec.name} in a local directory or the Hugging Face cache; pass a "
                             "directory with the model's files, or random_init=True to train the architecture from "
                             "its config with a tokenizer built from the data")
        tell(f"training a tokenizer on {len(samples):,} samples")
        tok = datasets.build_tokenizer(samples)
    if random_init and len(tok) != spec.vocab_size:
        config = copy.deepcopy(spec.config)
        config.vocab_size = len(tok)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, key, getattr(tok, key, None))
        spec = replace(models.resolve(config), name=spec.name)
    return spec, tok


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


def _plan(spec, plan, gpu, samples, tok, options, progress=None, launch=None):
    """The run's plan: the one given (a ``Plan``, a ``WorldPlan`` or a plan.json), else one made now for ``gpu`` (the
    detected card, else the CPU; a ``distributed.World``: its ranks); on several ranks, the world's, decided on rank 0
    (``distributed.plan``)."""
    if isinstance(plan, (planner.Plan, distributed.WorldPlan)):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return read_plan_file(plan)
    if gpu is None:
        gpu = "cuda" if gpus.detect() else "cpu"
    options = dict(options)
    if "seq_len" not in options:
        options["dataset"], options["tokenizer"] = samples, tok
    if launch is not None or isinstance(gpu, distributed.World):
        # a world planned before its ranks start, or every rank calling it: rank 0 plans the launcher's world
        return distributed.plan(spec, None if gpu == "cuda" else gpu, progress=progress, **options)
    return planner.plan(spec, "cuda:0" if gpu == "cuda" else gpu, progress=progress, **options)


def read_plan_file(path):
    """The ``Plan`` or ``WorldPlan`` in the plan.json at ``path``. Raises ``ConfigError`` naming the file."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read the plan {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the plan {path} is not text; pass a plan.json from autofit probe --out") from None
    try:
        return distributed.read_plan(text)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def plan_ranks(model, data, *, output_dir: str, gpu=None, gpus_count: int | None = None, strategy: str = "auto",
               random_init: bool = False, resume: bool = False, overwrite: bool = False, tokenizer=None,
               progress: bool | Callable[[str], None] = True, **plan_options) -> "distributed.WorldPlan":
    """The plan ``train`` would follow on several ranks of this machine, made before they start: what
    ``autofit train --gpus N`` launches the ranks with. ``gpu`` and ``gpus_count`` name the world as
    ``distributed.world`` takes them (no GPU here and none named: ranks on the CPU). The same checks as ``train``, so
    bad input fails here in one line and nothing is launched. Raises ``AutofitError`` subclasses."""
    out = validate.train_inputs(
        data=data, output_dir=output_dir, plan=None, plan_type=planner.Plan, steps=None, epochs=None,
        random_init=random_init, resume=resume, overwrite=overwrite, tokenizer=tokenizer, packing=None,
        learning_rate=None, eval_steps=None, save_steps=None, plan_options=plan_options, plan_parameters=PLAN_OPTIONS)
    if resume and (out / "plan.json").is_file():  # the run continues with the plan it started with
        plan = read_plan_file(out / "plan.json")
        if not isinstance(plan, distributed.WorldPlan):
            raise ConfigError(f"{out} holds a run on one device; resume it with autofit train without --gpus")
        return plan
    tell = progress if callable(progress) else Terminal(bool(progress))
    samples = datasets.load_samples(data) if not isinstance(data, (list, tuple)) else validate.samples(data)
    spec, tok = _model_and_tokenizer(model, samples, tokenizer, random_init, tell)
    w = distributed.world("cpu" if gpu is None and not gpus.detect() else gpu, gpus_count)
    if w.size > 1 and not w.on_cpu and w.size > len(gpus.detect()):
        raise ConfigError(f"{w.size} ranks need {w.size} CUDA cards here and {len(gpus.detect())} are visible; plan "
                          f"such a world on paper with autofit probe --gpu {w.name.replace(' ', '')}")
    result = _plan(spec, None, w, samples, tok, dict(plan_options, strategy=strategy), tell)
    getattr(tell, "done", lambda: None)()
    return result


def _check_ranks(plan, launch) -> None:
    """A plan for several ranks runs on as many ranks, and a plan for one device on one process."""
    ranks = launch.world_size if launch is not None else 1
    planned = plan.world_size if isinstance(plan, distributed.WorldPlan) else 1
    if planned != ranks:
        how = (f"autofit train --gpus {planned} starts them" if planned > 1 else
               "plan for the launcher's ranks (leave --plan out) or start one process")
        raise ConfigError(f"the plan is for {planned} rank(s) but this run has {ranks}; {how}")


def _barrier() -> None:
    """Waits for every rank, where a process group is running."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def load_model(spec: models.ModelSpec, plan: planner.Plan, *, model_ref=None, random_init: bool = False,
               device_index: int | None = None):
    """The model as ``plan`` trains it, on the plan's device (``device_index``: this rank's card): weights from a
    local directory or the Hugging Face cache (``random_init``: from the config), quantized for QLoRA, with LoRA
    adapters for LoRA and QLoRA."""
    from transformers import AutoModelForCausalLM

    cfg = plan.step_config
    index = device_index if device_index is not None else plan.gpu.index or 0
    device = "cpu" if cfg.device == "cpu" else f"cuda:{index}"
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
            plan.prepare_model(net)
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
    plan.prepare_model(net)  # activation offloading, where planned
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
    per_step = plan.effective_batch  # samples per optimizer step, over every rank
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


# -- checkpoints and files, whole or not at all ------------------------------------------------------------------------
class _Trainer(Trainer):
    """``transformers.Trainer`` whose checkpoints appear whole or not at all: each is written into a hidden staging
    folder beside the others and renamed into place once complete (a rename within one file system is atomic), and
    old ones are renamed aside before they are deleted, so an interruption never leaves a partial ``checkpoint-N``."""

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / f"{STAGING}{name}"
        main = self.is_world_process_zero()  # on several ranks each writes its part (its RNG state, its shards) into
        if main:                             # the staging folder; rank 0 alone moves the whole into place
            _discard(staging)
        _barrier()
        self._get_output_dir = lambda trial=None: str(staging)  # transformers saves into <this>/checkpoint-N
        try:
            super()._save_checkpoint(model, trial)
            _barrier()
            if main:
                _discard(run_dir / name)  # one of the same step from an earlier, overwritten run
                os.replace(staging / name, run_dir / name)
        finally:
            del self._get_output_dir
            if main:
                _discard(staging)
        keep = self.args.save_total_limit
        if keep and main:
            for _, old in _checkpoints(run_dir)[:-keep]:
                _discard(old)
        _barrier()


def _discard(path: Path) -> None:
    """Removes ``path``: renamed aside first (atomic), then deleted, so it is never seen half-deleted."""
    if not path.exists():
        return
    aside = path.with_name(f"{DISCARDED}{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _clear_leftovers(out: Path) -> None:
    """Removes what an interrupted save left: staging folders and checkpoints renamed aside but not yet deleted."""
    for path in out.iterdir():
        if path.name.startswith((STAGING, DISCARDED)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _clear_run(out: Path) -> None:
    """Removes the run in ``out`` that ``overwrite`` replaces: its checkpoints, weights, plan and memory log."""
    if not out.is_dir():
        return
    log.warning("overwriting the run in %s", out)
    for _, path in _checkpoints(out, complete=False):
        _discard(path)
    for name in _WEIGHTS + ("plan.json", "memory_log.jsonl", "adapter_config.json"):
        (out / name).unlink(missing_ok=True)


def _checkpoints(out: Path, *, complete: bool = True) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints in ``out``, oldest first; with ``complete``, those transformers finished."""
    found = []
    for path in out.glob("checkpoint-*"):
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir() and (not complete or (path / _STATE).is_file()):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _last_checkpoint(out: Path) -> str | None:
    """The last complete checkpoint in ``out``; incomplete ones (left by an earlier version, or a crash of the file
    system) are named in a warning and passed over."""
    complete = _checkpoints(out)
    partial = sorted(set(p for _, p in _checkpoints(out, complete=False)) - set(p for _, p in complete))
    if partial:
        log.warning("passing over incomplete checkpoint(s) %s (no %s)", ", ".join(p.name for p in partial), _STATE)
    return str(complete[-1][1]) if complete else None


def _step_of(checkpoint: str | None) -> int:
    return int(_CHECKPOINT.match(Path(checkpoint).name).group(1)) if checkpoint else 0


def _trim_memory_log(path: Path, step: int) -> None:
    """Keeps the memory log's rows up to ``step`` (and drops any line an earlier crash cut short)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))


def _save_final(trainer, tok, out: Path, main: bool = True) -> None:
    """Saves the model (or adapter) and tokenizer into ``out`` through a staging folder, each file renamed into place
    whole and the weights last, so that weights in ``out`` mean a finished run. On several ranks every rank takes
    part in the save (FSDP gathers its shards) and rank 0 writes."""
    staging = out / f"{STAGING}final"
    if main:
        _discard(staging)
    _barrier()
    try:
        trainer.save_model(str(staging))
        _barrier()
        if main:
            tok.save_pretrained(str(staging))
            for path in sorted(staging.iterdir(), key=lambda p: p.name in _WEIGHTS):
                os.replace(path, out / path.name)
    finally:
        if main:
            _discard(staging)


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
