"""Proof on real hardware, in one short run: estimate accuracy, plans on capped cards, plan quality, probe cost and
runs of varying lengths, measured on the GPU found, within a wall-time budget.

    python benchmarks/gpu_validation.py --minutes 8             # the GPU found; stops on budget, summary at the end
    python benchmarks/gpu_validation.py --minutes 8 --schedule  # print the planned units and what would be dropped
    python benchmarks/gpu_validation.py --dry-run --minutes 2   # every part on the budgeted CPU device, tiny shapes
    python benchmarks/gpu_validation.py --summarize benchmarks/results/nvidia-h200-2026-12-02   # rebuild summary.md

Parts, in priority order (benchmarks/GPU.md says how to run it on a borrowed GPU):

a. Estimate accuracy: 24 configurations (the issue's minimum) spread over six model shapes (random weights from the
   catalog configs) x full / LoRA / QLoRA (QLoRA when bitsandbytes imports) x checkpointing off and on x two (batch,
   length) points, ordered so that any prefix covers every shape and every combination as evenly as it can: the
   estimate (simulated) against ``max_memory_allocated``, ``max_memory_reserved`` and NVML process memory after
   three real steps. The other combinations run last, as part ``a-more``, if time is left.
b. The guides' cards stood in for by capping the allocator: the plan for an 8 GB laptop RTX 4060, a 12 GB RTX 3060
   and a 20 GB RTX 3080 for three models, 30 Trainer steps each with evaluation every 10 steps and a checkpoint
   saved at step 20: out-of-memory errors and the reserved peak against the capped budget.
c. Plan quality under the RTX 3060 cap: the plan's measured tokens per second against the best of a small grid
   (method x checkpointing x the micro-batch the estimate puts at the cap and the sizes either side).
d. Probe cost against accelerate's ``find_executable_batch_size`` and doubling-then-bisect
   (``probe_vs_baselines.py``), capped at 10 GiB.
fam (model families): t5-base (an encoder-decoder, 256 source and 64 target tokens) and bert-base-uncased (an
   encoder with a classification head, 256 tokens), full fine-tuning at two batch sizes each: the estimate
   (simulated at full depth for T5, extrapolated for BERT) against allocated and reserved peaks of real steps.
ranks (issue 11): on a world of one (NCCL), the memory DDP's gradient buckets and FSDP2's shards and gathered layers add
   to two AdamW steps of distilgpt2 and Qwen2.5-0.5B, against ``distributed.bucket_bytes`` and ``fsdp_extra``
   (``ranks_overhead.py``).
runs (issue 10): 30 steps whose padded length changes every step (lengths drawn from a fixed distribution, fixed
   seed), six configurations (distilgpt2 and TinyLlama-1.1B x full bf16-mixed, full bf16-true and LoRA, checkpointing
   split between them, so each model has each precision once and each precision both settings); peaks after steps
   2, 10 and 30 against ``runs.estimate_run``. The other six run last, as ``runs-more``.
offload (issue 12; only when named in ``--parts``): Qwen2.5-0.5B in bf16-true with plain, 8-bit (bitsandbytes) and
   CPU-offloaded (torchao) AdamW state, six steps each: the card's peaks, the host memory added and tokens/s against
   the simulated peaks, the optimizer's host state by layout and the planner's throughput (``gpu_offload.py``).

The budget (``--minutes``) counts from the script's start: imports, the simulation workers and the CUDA context are
in it. Each part is a list of units; before each unit the cost model (``gpu_budget``) predicts its seconds, and a
unit the time left cannot cover is skipped with the rest of its part, in one printed line. Every finished row is
appended at once to ``results.jsonl`` under ``benchmarks/results/<card>-<date>/`` and under ``$OUT`` when set; the
summary (``summary.md``, printed too) is rebuilt from those rows at the end, or by ``--summarize`` after a cut.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts from here: imports, simulation workers and the CUDA context are in it

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gpu_budget as budgeting  # noqa: E402
import gpu_common as common  # noqa: E402
import gpu_results as results  # noqa: E402
from autofit import gpu, memory, model, planner, probing, runs, training  # noqa: E402
from autofit.errors import AutofitError  # noqa: E402
from autofit.guard import guard  # noqa: E402
from autofit.sim import kbit, simulate  # noqa: E402
from autofit.sim.simulate import StepConfig  # noqa: E402
from autofit.units import fmt_bytes  # noqa: E402

# -- what each part runs ----------------------------------------------------------------------------------------------
A_MODELS = common.MODELS  # six shapes: the issue asks for at least five
A_POINTS = [(2, 512), (8, 1024)]
A_STEPS = 3  # real steps per trial, as gpu_accuracy.py runs them
A_CORE = 24  # the minimum number of configurations; the rest of the product runs last ("a-more")
BC_MODELS = ["distilgpt2", "HuggingFaceTB/SmolLM2-135M", "Qwen/Qwen2.5-0.5B"]
CARDS = ["rtx4060-laptop", "rtx3060", "rtx3080-20gb"]  # the guides' 8, 12 and 20 GB cards
B_STEPS, B_EVAL_EVERY, B_SAVE_AT, B_EVAL_SAMPLES = 30, 10, 20, 8
B_ASSUMED_BATCH = planner.DEFAULT_EFFECTIVE_BATCH  # what the schedule assumes before a plan says (plan_speed.txt)
C_CARD = 1  # index into the cards: the RTX 3060's 12 GB
D_MODELS = ["distilgpt2", "HuggingFaceTB/SmolLM2-135M"]
D_BUDGET, D_SEQ, D_TRIALS, D_BATCH = "10GiB", 256, 26, 32  # the last two: the cost prior's trials and mean batch
FAM_MODELS = ["t5-base", "bert-base-uncased"]
FAM_POINTS, FAM_SEQ, FAM_TARGET = (4, 16), 256, 64  # batch sizes; source (or only) length; T5's target length
RANKS_MODELS, RANKS_BATCH, RANKS_SEQ = ["distilgpt2", "Qwen/Qwen2.5-0.5B"], 4, 512
RUN_MODELS = ["distilgpt2", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"]  # GPT-2 and a Llama-style model of 1.1B
RUN_PRECISIONS = ["bf16-mixed", "bf16-true", "lora"]  # "lora": a bf16 base with fp32 adapters under autocast
RUN_STEPS, RUN_MARKS, RUN_BATCH, RUN_MAX_LEN, RUN_SEED = 30, (2, 10, 30), 8, 1024, 15
# Sample lengths of the runs: log-normal, median 256 tokens, sigma 0.8, clipped to [16, max]: the long right tail of
# instruction data (an assumption, not fitted to a data set); each step's batch is padded to its longest sample.
RUN_MEDIAN, RUN_SIGMA = 256, 0.8
# The dry run proves the harness, not the figures: CPU steps of full-width 2-layer shapes take seconds, so it runs
# fewer, shorter steps (the runs mark steps 2, 4 and 6 of 6) on cards scaled to the shrunk model
DRY = dict(points=[(2, 64), (4, 128)], seq=64, card_factors=(1.25, 1.5, 2.0), b_steps=4, b_eval_every=2, b_save_at=2,
           run_steps=6, run_marks=(2, 4, 6), run_batch=1, run_max_len=32, run_median=16, d_budget="160MiB")

# -- what units cost --------------------------------------------------------------------------------------------------
RESERVE_S = 20.0  # kept free of units: the summary and plots take a few seconds, the rest absorbs an overrun
HARD_STOP_S = 10.0  # a unit still running this close to the end is cut, so the summary is always written
# Priors for an H200, all assumptions until a GPU run measures them (its summary prints measured against predicted):
# start-up = imports (~10 s), the simulation worker pool (~5 s), the CUDA context and cuBLAS (~5 s), with room;
# fixed per unit = the host-side work (two simulations for an estimate; a plan; a Trainer with three evaluations and
# a save); a build = module construction and random initialisation on the card; compute = 6 FLOP per parameter and
# token at an assumed 100 TFLOP/s achieved (an eighth of the H200's dense bf16 peak: small models, short batches).
CUDA_COSTS = budgeting.Costs(
    startup=45.0, fixed={"trial": 2.0, "train": 12.0, "grid": 8.0, "probe": 8.0, "run": 10.0, "ranks": 10.0},
    build=1.5, build_per_param=2e-9, per_param_token=6 / 100e12,
    source="assumed for an H200 (gpu_validation.CUDA_COSTS), corrected by the units measured")
# Priors for the dry run, fitted to dry runs on a busy 2-core x86 machine (benchmarks/results/dry-run-cpu-costs-*/:
# a, b and c, d and runs); a dry run's units vary by 2x with the machine's other load.
DRY_COSTS = budgeting.Costs(
    startup=12.0, fixed={"trial": 5.7, "train": 27.0, "grid": 140.0, "probe": 155.0, "run": 5.5, "ranks": 60.0},
    build=0.4, build_per_param=5.5e-8, per_param_token=1.0e-10,
    source="measured by a dry run on 2 CPU cores (gpu_validation.DRY_COSTS), corrected by the units measured")


class OutOfTime(BaseException):
    """The budget ran out inside a unit: a BaseException, so no handler meant for errors swallows it."""


def _work(tokens: int, method: str, checkpointing: bool) -> int:
    # compute per token relative to full fine-tuning: forward 2, backward 4 FLOP per parameter (LoRA computes no
    # weight gradients for the frozen base: about 2), checkpointing runs the forward again (+2)
    backward = 4 if method == "full" else 2
    return int(tokens * (2 + backward + (2 if checkpointing else 0)) / 6)


def _short(name: str) -> str:
    return name.split("/")[-1].split(" (")[0]


# -- the units ------------------------------------------------------------------------------------------------------
def spread(models: list[str], methods: list[str], points: list[tuple[int, int]]) -> list[tuple]:
    """Every (model, method, checkpointing, point), ordered so that any prefix spreads over the models and, for each
    model, over every setting: in block k of 2 x len(points) rounds, round j gives model i checkpointing j % 2, point
    (j // 2 + i) mod len(points) and method (i + j + k) mod len(methods). Each block gives every model both
    checkpointing settings at every point; across blocks each model meets every method once per setting."""
    n_points, n_methods = len(points), len(methods)
    order = []
    for k in range(n_methods):
        for j in range(2 * n_points):
            for i, name in enumerate(models):
                order.append((name, methods[(i + j + k) % n_methods], j % 2 == 1, points[(j // 2 + i) % n_points]))
    return order


def run_lengths(seed: int, steps: int, batch: int, max_len: int, median: int) -> list[int]:
    """The padded length of each step's batch: the longest of ``batch`` lengths drawn from the log-normal above."""
    rng = np.random.default_rng(seed)
    drawn = np.clip(np.round(rng.lognormal(np.log(median), RUN_SIGMA, size=(steps, batch))), 16, max_len)
    return [int(x) for x in drawn.max(axis=1)]


def run_configs() -> list[tuple[str, str, bool]]:
    """The twelve (model, precision, checkpointing) runs, the balanced six first: model i with precision j gets
    checkpointing when i + j is odd; the models alternate, so a part cut short still has both."""
    first, rest = [], []
    for j, precision in enumerate(RUN_PRECISIONS):
        for i, name in enumerate(RUN_MODELS):
            on = (i + j) % 2 == 1
            first.append((name, precision, on))
            rest.append((name, precision, not on))
    return first + rest


def build_parts(*, dry: bool, methods: list[str], specs: dict, wanted: list[str],
                models: list[str] | None = None) -> list[tuple[str, list[budgeting.Unit]]]:
    """Every unit in priority order, grouped in parts; ``specs`` maps each model name to its (dry: shrunk) spec."""
    U = budgeting.Unit
    parts: dict[str, list] = {}
    if "a" in wanted:
        units = []
        for name, method, ck, (b, s) in spread(models or A_MODELS, methods, DRY["points"] if dry else A_POINTS):
            units.append(U(part="a", label=f"{_short(name)} {method} ckpt-{'on' if ck else 'off'} b{b} s{s}",
                           kind="trial", params=specs[name].total_params,
                           tokens=_work(A_STEPS * b * s, method, ck), args=(name, method, ck, b, s)))
        parts["a"], parts["a-more"] = units[:A_CORE], [replace(u, part="a-more") for u in units[A_CORE:]]
    bc_models = models or BC_MODELS
    seq = DRY["seq"] if dry else planner.DEFAULT_SEQ_LEN
    if "b" in wanted:
        steps = DRY["b_steps"] if dry else B_STEPS
        evals = steps // (DRY["b_eval_every"] if dry else B_EVAL_EVERY)
        tokens = steps * B_ASSUMED_BATCH * seq + evals * B_EVAL_SAMPLES * seq // 3  # evaluation: a forward, 1/3
        labels = ["8GB-like", "12GB-like", "20GB-like"] if dry else CARDS
        parts["b"] = [U(part="b", label=f"{_short(name)} on {card}", kind="train", params=specs[name].total_params,
                        tokens=tokens, args=(name, card),
                        note=f"effective batch {B_ASSUMED_BATCH} assumed until planned")
                      for name in bc_models for card in labels]
    if "c" in wanted:
        configs = 2 * len(methods)
        b = 4 if dry else 8
        units = [U(part="c", label=f"{_short(name)} grid under the {'12GB-like' if dry else CARDS[C_CARD]} cap",
                   kind="grid", params=specs[name].total_params, builds=2 * configs,
                   tokens=2 * configs * A_STEPS * b * seq, args=(name,)) for name in bc_models]
        parts["c"], parts["c-more"] = units[:1], [replace(u, part="c-more") for u in units[1:]]
    if "d" in wanted:
        if dry:  # the benchmark's own small shape on the budgeted CPU device: one run says it works
            spec = specs["tiny"]
            parts["d"] = [U(part="d", label=f"probe vs baselines, small GPT-2 shape, {DRY['d_budget']}", kind="probe",
                            params=spec.total_params, builds=D_TRIALS, tokens=D_TRIALS * 2 * 8 * seq, args=("tiny",))]
        else:
            units = [U(part="d", label=f"probe vs baselines, {_short(name)}, {D_BUDGET}", kind="probe",
                       params=specs[name].total_params, builds=D_TRIALS, tokens=D_TRIALS * 2 * D_BATCH * D_SEQ,
                       args=(name,)) for name in (models or D_MODELS)]
            parts["d"], parts["d-more"] = units[:1], [replace(u, part="d-more") for u in units[1:]]
    if "fam" in wanted:
        seq = DRY["seq"] if dry else FAM_SEQ
        parts["fam"] = [U(part="fam", label=f"{_short(name)} full b{b} s{seq}", kind="trial",
                          params=specs[name].total_params, tokens=_work(A_STEPS * b * seq, "full", False),
                          args=(name, b, seq)) for name in FAM_MODELS for b in FAM_POINTS]
    if "runs" in wanted:
        batch = DRY["run_batch"] if dry else RUN_BATCH
        lengths = _lengths(dry)
        units = []
        for name, precision, ck in run_configs():
            method = "lora" if precision == "lora" else "full"
            units.append(U(part="runs", label=f"{_short(name)} {precision} ckpt-{'on' if ck else 'off'} "
                                               f"{len(lengths)} steps", kind="run",
                           params=specs[f"runs:{name}"].total_params, tokens=_work(batch * sum(lengths), method, ck),
                           args=(name, precision, ck)))
        parts["runs"], parts["runs-more"] = units[:6], [replace(u, part="runs-more") for u in units[6:]]
    if "ranks" in wanted:  # three builds (plain, DDP, FSDP2) of two steps each
        names = ["distilgpt2"] if dry else (models or RANKS_MODELS)
        b, s = (2, DRY["seq"]) if dry else (RANKS_BATCH, RANKS_SEQ)
        parts["ranks"] = [U(part="ranks", label=f"{_short(name)} DDP and FSDP2 on a world of one", kind="ranks",
                            params=(common.shrink(model.resolve(name)) if dry else model.resolve(name)).total_params, builds=3, tokens=3 * 2 * b * s,
                            args=(name, b, s)) for name in names]
    if "offload" in wanted:
        import gpu_offload

        name = "tiny" if dry else gpu_offload.MODEL
        batch, seq, steps = ((gpu_offload.DRY_BATCH, gpu_offload.DRY_SEQ, gpu_offload.DRY_STEPS) if dry else
                             (gpu_offload.BATCH, gpu_offload.SEQ, gpu_offload.STEPS))
        parts["offload"] = [U(part="offload", label=f"{_short(name)} {opt} b{batch} s{seq}", kind="trial",
                              params=specs[name].total_params, tokens=steps * batch * seq, args=(name, opt))
                            for opt in gpu_offload.OPTIMIZERS]
    # each part's required core first, in the order; what only adds more of the same after all of them
    order = ["a", "b", "c", "d", "runs", "fam", "ranks", "offload", "c-more", "d-more", "a-more", "runs-more"]
    return [(p, parts[p]) for p in order if parts.get(p)]


def _lengths(dry: bool) -> list[int]:
    if dry:
        return run_lengths(RUN_SEED, DRY["run_steps"], DRY["run_batch"], DRY["run_max_len"], DRY["run_median"])
    return run_lengths(RUN_SEED, RUN_STEPS, RUN_BATCH, RUN_MAX_LEN, RUN_MEDIAN)


def model_names(wanted: list[str], models: list[str] | None) -> list[str]:
    names = []
    for part, default in (("a", A_MODELS), ("b", BC_MODELS), ("c", BC_MODELS), ("d", D_MODELS), ("fam", FAM_MODELS)):
        if part in wanted:
            names += models or default
    if "offload" in wanted:
        import gpu_offload

        names.append(gpu_offload.MODEL)
    return list(dict.fromkeys(names))


def resolve_specs(names: list[str], dry: bool, run_names: list[str] = ()) -> dict:
    """Each name's spec (a dry run's: shrunk to 2 layers), and under "runs:NAME" the runs' models (a dry run's: made
    narrow too; ``gpu_common.narrow`` says why)."""
    specs = {}
    for name in names:
        spec = model.resolve(name)
        specs[name] = common.shrink(spec) if dry else spec
    for name in run_names:
        spec = specs.get(name) if not dry else None
        specs[f"runs:{name}"] = spec or (common.narrow(model.resolve(name)) if dry else model.resolve(name))
    if dry:
        import probe_vs_baselines

        specs["tiny"] = model.resolve(probe_vs_baselines.tiny_config())
    return specs


# -- running the units ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Context:
    dry: bool
    card: gpu.GpuInfo  # the card found (dry: the host)
    specs: dict
    log: results.ResultsLog
    scheduler: budgeting.Scheduler
    tmp: Path  # Trainer checkpoints and probe results: never in the results folders
    methods: list[str]
    said: set = field(default_factory=set)

    def note(self, text: str) -> None:
        """A note row and a printed line, once per text."""
        if text not in self.said:
            self.said.add(text)
            print(f"# {text}", flush=True)
            self.log.append({"section": "note", "text": text})


def run_a(unit, ctx: Context):
    name, method, checkpointing, b, s = unit.args
    spec = ctx.specs[name]
    cfg = common.step_config(ctx.card, method, checkpointing, ctx.dry)
    row = common.measure(spec, cfg, common.device(ctx.dry), b, s, steps=A_STEPS)
    ctx.log.append({"section": "a", **row})
    print(f"a {unit.label:<52} {row['outcome']:<4} reserved {results._pct(row['error_reserved'])} allocated "
          f"{results._pct(row['error_allocated'])} NVML {results._pct(row['error_device'])}", flush=True)


def _budgets(dry: bool, spec) -> list[tuple[str, gpu.GpuInfo]]:
    """(card name, GpuInfo) stood in for. A dry run scales "cards" to the shrunk model: 1.25, 1.5 and 2 times what
    it needs at batch 1."""
    if not dry:
        return [(name, gpu.resolve(name)) for name in CARDS]
    cfg = common.step_config(None, "full", False, True)
    unit = memory.simulate_point(spec, cfg, batch_size=1, seq_len=DRY["seq"]).min_reserved
    out = []
    for label, factor in zip(("8GB-like", "12GB-like", "20GB-like"), DRY["card_factors"]):
        total = int(unit * factor)
        out.append((label, gpu.GpuInfo(name=f"{label} budget", key=None, total_bytes=total, free_bytes=total,
                                       used_by_others_bytes=0, compute_capability=None, bf16=False,
                                       peak_tflops_16=None, bandwidth_gbs=None, source="host")))
    return out


def _random_dataset(spec, seq_len, n):
    """Random token ids of the model's own vocabulary: the logits are as big as real text's."""
    from autofit.data import TokenizedDataset

    g = torch.Generator().manual_seed(0)
    return TokenizedDataset([torch.randint(0, spec.vocab_size, (seq_len,), generator=g) for _ in range(n)],
                            truncated=0, seq_len=seq_len, packing=True)


def run_capped(spec, plan, dev, out_dir: Path, *, steps: int, eval_every: int, save_at: int, dry: bool) -> dict:
    """Trains ``plan`` for ``steps`` steps with evaluation every ``eval_every`` steps and a checkpoint saved at
    ``save_at`` into ``out_dir``, on ``dev``; returns what it saw (peaks over every step, evaluation and save)."""
    from transformers import PrinterCallback, Trainer, TrainerCallback

    from autofit.data import collate

    class Peaks(TrainerCallback):
        # MemoryLog resets the peak statistics when each step begins; listed before it, this reads them first, and
        # after each evaluation and save, so the run's peak is the highest of all
        allocated = reserved = 0

        def _read(self, *args, **kwargs):
            if not dry:
                self.allocated = max(self.allocated, torch.cuda.max_memory_allocated())
                self.reserved = max(self.reserved, torch.cuda.max_memory_reserved())

        on_step_begin = on_evaluate = on_save = on_train_end = _read

    started = time.perf_counter()
    record = dict(model=spec.name, card=plan.gpu.name, method=plan.method, quantization=plan.quantization,
                  batch_size=plan.batch_size, grad_accum=plan.grad_accum, seq_len=plan.seq_len, steps=steps,
                  checkpointing=plan.gradient_checkpointing, budget=dev.limit_bytes or dev.budget_bytes,
                  predicted_min_reserved=plan.estimate.min_reserved, predicted_reserved=plan.estimate.peak_reserved)
    with dev.session():
        dev.cleanup()  # blocks cached by earlier units would count against this one's cap
        net = training.load_model(spec, plan, random_init=True)
        n = plan.effective_batch * (steps + 1)
        train_set = _random_dataset(spec, plan.seq_len, n)
        eval_set = _random_dataset(spec, plan.seq_len, B_EVAL_SAMPLES)
        args = plan.training_arguments(str(out_dir), max_steps=steps, eval_strategy="steps", eval_steps=eval_every,
                                       save_strategy="steps", save_steps=save_at, save_total_limit=1,
                                       report_to=[], disable_tqdm=True, logging_steps=max(1, steps // 5),
                                       **({"use_cpu": True} if dry else {}))
        log = training.MemoryLog(out_dir / "memory_log.jsonl", tokens_per_step=plan.effective_batch * plan.seq_len)
        peaks = Peaks()
        trainer = Trainer(model=net, args=args, train_dataset=train_set, eval_dataset=eval_set,
                          data_collator=lambda batch: collate(batch, 0), callbacks=[peaks, log])
        trainer.remove_callback(PrinterCallback)  # its log dictionaries would bury the script's own lines
        state = guard(trainer)
        if not dry:
            torch.cuda.reset_peak_memory_stats()
        tracker = getattr(dev, "_tracker", None) if dry else None
        try:
            trainer.train()
            record["oom"] = False
        except AutofitError as err:  # the guard gave up below batch 1
            record.update(oom=True, error=str(err))
        except torch.OutOfMemoryError as err:
            record.update(oom=True, error=str(err).splitlines()[0])
        peaks._read()
        record["guard_events"] = len(state.events)
        record["measured_allocated"] = tracker.peak if dry else peaks.allocated
        record["measured_reserved"] = tracker.peak if dry else peaks.reserved
        record["nvml_used"] = dev.used_now()
        record["tokens_per_second"] = log.summary()["tokens_per_second"]
        del trainer, net, state
        dev.cleanup()
    record["seconds"] = time.perf_counter() - started
    record["reserved_share"] = record["measured_reserved"] / record["budget"]
    return record


def run_b(unit, ctx: Context):
    name, label = unit.args
    spec = ctx.specs[name]
    card = dict(_budgets(ctx.dry, spec))[label]
    try:
        p = planner.plan(spec, card, probe=False, **({"seq_len": DRY["seq"]} if ctx.dry else {}))
    except AutofitError as err:
        ctx.log.append(dict(section="b", model=spec.name, card=label, planned=False, reason=str(err)))
        print(f"b {unit.label:<52} no plan: {err}", flush=True)
        return None
    steps = DRY["b_steps"] if ctx.dry else B_STEPS
    every = DRY["b_eval_every"] if ctx.dry else B_EVAL_EVERY
    tokens = steps * p.effective_batch * p.seq_len + (steps // every) * B_EVAL_SAMPLES * p.seq_len // 3
    ran = replace(unit, tokens=_work(tokens, p.method, p.gradient_checkpointing), note="")
    ctx.scheduler.check(ran)  # the plan's own batch: raises OverBudget when the run no longer fits the time left
    dev = common.device(ctx.dry, p.budget_bytes - p.estimate.cuda_context)
    folder = Path(tempfile.mkdtemp(prefix="capped-", dir=ctx.tmp))
    try:
        row = run_capped(spec, p, dev, folder, steps=steps, eval_every=every,
                         save_at=DRY["b_save_at"] if ctx.dry else B_SAVE_AT, dry=ctx.dry)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # checkpoints of every run would fill the disk
    row.update(section="b", card=label, planned=True)
    ctx.log.append(row)
    print(f"b {unit.label:<52} {p.method} {p.batch_size}x{p.grad_accum} s{p.seq_len}"
          f"{' ckpt' if p.gradient_checkpointing else ''}: {'OOM' if row['oom'] else 'ok'}, reserved "
          f"{row['reserved_share']:.1%} of {fmt_bytes(row['budget'])}", flush=True)
    return ran


def _grid_sizes(sm, divisors: list[int], limit: int, must: int | None) -> list[int]:
    """The micro-batch the estimate puts at the cap (the largest divisor that fits) and the sizes either side."""
    fit = [d for d in divisors if sm.min_reserved(d) <= limit]
    anchor = divisors.index(max(fit)) if fit else 0
    sizes = set(divisors[max(0, anchor - 1): anchor + 2])
    if must is not None:
        sizes.add(must)
    return sorted(sizes)


def run_c(unit, ctx: Context):
    (name,) = unit.args
    spec = ctx.specs[name]
    label, card = _budgets(ctx.dry, spec)[C_CARD]
    try:
        p = planner.plan(spec, card, probe=False, **({"seq_len": DRY["seq"]} if ctx.dry else {}))
    except AutofitError as err:
        ctx.log.append(dict(section="c", model=spec.name, card=label, planned=False, reason=str(err)))
        return None
    limit = p.budget_bytes - p.estimate.cuda_context
    dev = common.device(ctx.dry, limit)
    divisors = [d for d in range(1, p.effective_batch + 1) if p.effective_batch % d == 0]
    grid = []
    for method in ctx.methods:
        for checkpointing in (False, True):
            cfg = replace(p.step_config, method=method, gradient_checkpointing=checkpointing,
                          quantization="4bit" if method == "qlora" else "none")
            mine = method == p.method and checkpointing == p.gradient_checkpointing
            sm = memory.StepModel(spec, cfg, seq_len=p.seq_len)
            for b in _grid_sizes(sm, divisors, limit, p.batch_size if mine else None):
                t = probing.run_trial(spec, cfg, dev, batch_size=b, seq_len=p.seq_len, steps=A_STEPS)
                grid.append(dict(method=method, checkpointing=checkpointing, batch_size=b, fits=t.fits,
                                 tokens_per_second=t.tokens_per_second, peak_reserved=t.peak_reserved))
                if not t.fits:
                    break  # larger micro-batches will not fit either
    fitting = [g for g in grid if g["fits"] and g["tokens_per_second"]]
    best = max(fitting, key=lambda g: g["tokens_per_second"]) if fitting else None
    same = [g for g in fitting if g["method"] == p.method]
    best_in_method = max(same, key=lambda g: g["tokens_per_second"]) if same else None
    mine = next((g for g in fitting if g["method"] == p.method and g["checkpointing"] == p.gradient_checkpointing
                 and g["batch_size"] == p.batch_size), None)
    share = mine["tokens_per_second"] / best["tokens_per_second"] if mine and best else None
    within = mine["tokens_per_second"] / best_in_method["tokens_per_second"] if mine and best_in_method else None
    # "auto" takes the strongest method that fits a useful batch, not the fastest: both comparisons are reported
    ctx.log.append(dict(section="c", model=spec.name, card=label, planned=True,
                        plan=dict(method=p.method, batch_size=p.batch_size, checkpointing=p.gradient_checkpointing),
                        grid=grid, best=best, best_in_method=best_in_method, plan_measured=mine, share_of_best=share,
                        share_of_best_in_method=within))
    print(f"c {unit.label:<52} plan {p.method} b{p.batch_size}{' ckpt' if p.gradient_checkpointing else ''}: "
          f"{results._share(share)} of the grid's best, {results._share(within)} of the best {p.method} run "
          f"({len(grid)} trials)", flush=True)
    return None


def run_d(unit, ctx: Context):
    import probe_vs_baselines

    (name,) = unit.args
    out = Path(tempfile.mkstemp(prefix="probe-", suffix=".json", dir=ctx.tmp)[1])
    argv = ["--json", str(out)]
    if ctx.dry:
        argv += ["--budget", DRY["d_budget"], "--seq-len", str(DRY["seq"]), "--effective-batch", "16"]
    else:
        argv += ["--cuda", "--model", name, "--budget", D_BUDGET, "--seq-len", str(D_SEQ)]
    probe_vs_baselines.main(argv)
    row = json.loads(out.read_text())
    out.unlink()
    ctx.log.append(dict(section="d", model=ctx.specs[name].name, **row))


def run_varying(spec, precision: str, checkpointing: bool, dev, *, lengths: list[int], batch: int, dry: bool,
                compute_capability: tuple[int, int], marks_at: tuple[int, ...]) -> tuple[list[dict], float]:
    """``len(lengths)`` training steps whose batch is ``batch`` x the step's padded length; the peaks since the model
    and optimizer were built, and NVML process memory, after each step in ``marks_at``. Returns them and the
    seconds."""
    method = "lora" if precision == "lora" else "full"
    cfg = StepConfig(method=method, precision="bf16-mixed" if precision == "lora" else precision,
                     gradient_checkpointing=checkpointing,
                     device="cpu" if dry else "cuda", compute_capability=compute_capability)
    marks = []
    started = time.perf_counter()
    with dev.session():
        dev.cleanup()
        net = dev.build(spec, cfg)  # bf16-true: the model built in bf16, as StepConfig.weights_dtype says
        net.train()
        if checkpointing:
            simulate._enable_checkpointing(net)
        params = [p for p in model.unique_params(net) if p.requires_grad]
        optimizer = simulate.make_optimizer(params, cfg.optimizer)
        autocast = dev.autocast()
        dev.reset()  # peaks are the run's, from the built model on (as the estimate's are)
        for step, length in enumerate(lengths, start=1):
            batch_ = simulate.make_batch(batch, length, spec.vocab_size, device=dev.torch_device)
            simulate.train_step(net, optimizer, params, cfg, batch_, autocast)
            del batch_
            if step in marks_at:
                allocated, reserved = dev.peaks()
                marks.append(dict(step=step, max_allocated=allocated, max_reserved=reserved, nvml=dev.used_now()))
        del net, optimizer, params
        dev.cleanup()
    return marks, time.perf_counter() - started


def run_runs(unit, ctx: Context):
    name, precision, checkpointing = unit.args
    spec = ctx.specs[f"runs:{name}"]
    lengths = _lengths(ctx.dry)
    batch = DRY["run_batch"] if ctx.dry else RUN_BATCH
    method = "lora" if precision == "lora" else "full"
    estimate, error = None, None
    try:
        est = runs.estimate_run(spec, ctx.card, batch_size=batch, lengths=lengths, method=method,
                                precision="bf16-mixed" if precision == "lora" else precision,
                                gradient_checkpointing=checkpointing)
        estimate = dict(peak_allocated=est.peak_allocated, peak_reserved=est.peak_reserved,
                        device_total=est.device_total,
                        reserved_after={int(k): int(v) for k, v in est.reserved_after.items()})
    except Exception as err:  # noqa: BLE001 - an estimate that fails must not cost the measurement beside it
        error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        print(f"# runs {unit.label}: the estimate failed ({error}); measuring anyway", flush=True)
    cc = ctx.card.compute_capability or (8, 6)
    marks, seconds = run_varying(spec, precision, checkpointing, common.device(ctx.dry), lengths=lengths,
                                 batch=batch, dry=ctx.dry, compute_capability=cc,
                                 marks_at=DRY["run_marks"] if ctx.dry else RUN_MARKS)
    row = dict(section="runs", model=spec.name, precision=precision, method=method, checkpointing=checkpointing,
               batch_size=batch, lengths=lengths, seed=RUN_SEED, marks=marks, estimate=estimate,
               estimate_error=error, seconds=seconds)
    ctx.log.append(row)
    measured = ", ".join(f"{m['step']}: {fmt_bytes(m['max_reserved'])}" for m in marks)
    predicted = "" if not estimate else ", estimated " + ", ".join(
        f"{m['step']}: {fmt_bytes(estimate['reserved_after'].get(m['step'], 0))}" for m in marks)
    print(f"runs {unit.label:<49} reserved after step {measured}{predicted}", flush=True)


def run_fam(unit, ctx: Context):
    name, b, s = unit.args
    spec = ctx.specs[name]
    if spec.task == "seq2seq-lm":
        spec = model.resolve(spec, target_len=DRY["seq"] // 2 if ctx.dry else FAM_TARGET)
    cfg = common.step_config(ctx.card, "full", False, ctx.dry)
    row = common.measure(spec, cfg, common.device(ctx.dry), b, s, steps=A_STEPS)
    ctx.log.append({"section": "fam", "task": spec.task, "target_len": spec.target_len, **row})
    print(f"fam {unit.label:<40} {row['outcome']:<4} reserved {results._pct(row['error_reserved'])} allocated "
          f"{results._pct(row['error_allocated'])}", flush=True)


def run_ranks(unit, ctx: Context):
    import ranks_overhead

    name, b, s = unit.args
    out = Path(tempfile.mkstemp(prefix="ranks-", suffix=".json", dir=ctx.tmp)[1])
    argv = ["--model", name, "--batch", str(b), "--seq-len", str(s), "--json", str(out)]
    argv += ["--layers", "2"] if ctx.dry else ["--cuda"]
    ranks_overhead.main(argv)
    row = json.loads(out.read_text())
    out.unlink()
    ctx.log.append(row)


def run_offload(unit, ctx: Context):
    import gpu_offload

    name, optimizer = unit.args
    row = gpu_offload.measure(ctx.specs[name], ctx.card, common.device(ctx.dry), optimizer, dry=ctx.dry)
    ctx.log.append(row)
    print(gpu_offload.line(row), flush=True)


RUNNERS = {"fam": run_fam, "a": run_a, "a-more": run_a, "b": run_b, "c": run_c, "c-more": run_c, "d": run_d,
           "d-more": run_d, "runs": run_runs, "runs-more": run_runs, "ranks": run_ranks, "offload": run_offload}


def _methods(dry: bool, qlora: str) -> list[str]:
    if dry or qlora == "off":
        return ["full", "lora"]
    if qlora == "on":
        return ["full", "lora", "qlora"]
    return common.methods(False)


# -- the run --------------------------------------------------------------------------------------------------------
def _on_alarm(signum, frame):
    raise OutOfTime()


def _warm_up(dry: bool) -> None:
    """Starts the simulation workers before CUDA exists in this process (they are forked from it, and a fork of a
    process holding a CUDA context must never touch CUDA), then the CUDA context and cuBLAS, so their cost is paid
    before the first unit is timed."""
    spec = common.shrink(model.resolve("distilgpt2"))
    memory.simulate_point(spec, StepConfig(device="cpu", precision="fp32"), batch_size=1, seq_len=32)
    if not dry:
        torch.cuda.init()
        x = torch.ones(256, 256, device="cuda", dtype=torch.bfloat16)
        (x @ x).sum().item()
        del x
        torch.cuda.empty_cache()


def summarize(folder: Path, *, run: str | None = None, extra: Path | None = None) -> str:
    rows, runs = results.read_rows(folder, run=run)
    text = results.summary_markdown(rows, runs_in_file=len(runs))
    for target in dict.fromkeys([folder] + ([extra] if extra else [])):
        tmp = target / (results.SUMMARY_FILE + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target / results.SUMMARY_FILE)
        results.plots(rows, target)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None, help="wall-time budget of the whole script")
    parser.add_argument("--schedule", action="store_true", help="print the planned units and stop")
    parser.add_argument("--summarize", default=None, metavar="DIR", help="rebuild DIR/summary.md from its results")
    parser.add_argument("--dry-run", action="store_true", help="the budgeted CPU device, 2-layer shapes")
    parser.add_argument("--parts", default="a,b,c,d,runs,fam,ranks")
    parser.add_argument("--models", default=None, help="comma-separated: replaces every part's models but the runs'")
    parser.add_argument("--qlora", choices=("auto", "on", "off"), default="auto",
                        help="QLoRA rows: when bitsandbytes imports (auto), always (on; --schedule only) or never")
    parser.add_argument("--out", default=None, help="results folder name under benchmarks/results")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(Path(args.summarize)))
        return 0
    seconds = None if args.minutes is None else 60.0 * args.minutes
    dry = args.dry_run if args.schedule else common.cuda_or_dry(args)
    common.silence()
    os.environ.setdefault("AUTOFIT_CACHE", "off")  # measurements must not be scaled by earlier calibrations
    wanted = args.parts.split(",")
    models = args.models.split(",") if args.models else None
    if not args.schedule:
        _warm_up(dry)  # before anything (bitsandbytes' import included) can create a CUDA context
    bnb = kbit.bitsandbytes_available()
    if args.qlora == "on" and not args.schedule and not bnb:
        print("# --qlora on needs bitsandbytes, which does not import here; carry its wheel (benchmarks/GPU.md)")
        return 2
    methods = _methods(dry, args.qlora)
    specs = resolve_specs(model_names(wanted, models), dry, RUN_MODELS if "runs" in wanted else [])
    parts = build_parts(dry=dry, methods=methods, specs=specs, wanted=wanted, models=models)
    costs = DRY_COSTS if dry else CUDA_COSTS
    if args.schedule:
        outcomes, lines = budgeting.schedule(parts, costs, seconds=seconds, reserve=RESERVE_S)
        print(f"# {' '.join(['python'] + sys.argv)}")
        print(budgeting.format_schedule(outcomes, lines, seconds=seconds, reserve=RESERVE_S, startup=costs.startup,
                                        source=costs.source))
        return 0

    env = common.environment(dry)
    run_id = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    startup = time.monotonic() - STARTED
    env.update(run=run_id, budget_seconds=seconds, startup_seconds=round(startup, 1), parts=wanted,
               methods=methods, bitsandbytes=bnb, optuna=_importable("optuna"), costs=costs.source)
    folder = common.out_dir(env, args.out)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    log = results.ResultsLog([folder] + ([out] if out else []), run=run_id)
    log.append({"section": "environment", **env})
    outcomes, lines = budgeting.schedule(parts, costs, seconds=seconds, reserve=RESERVE_S, startup=startup)
    print(budgeting.format_schedule(outcomes, lines, seconds=seconds, reserve=RESERVE_S, startup=startup,
                                    source=costs.source), flush=True)

    def on_outcome(o: budgeting.Outcome) -> None:
        log.append(o.to_row())
        if o.status != "skipped":
            print(f"  [{o.started + o.seconds:6.1f} s] {o.unit.part} {o.unit.label}: {o.status} in {o.seconds:.1f} s "
                  f"(predicted {o.predicted:.1f} s)", flush=True)

    budget = budgeting.Budget(seconds=seconds, reserve=RESERVE_S, started=STARTED)
    scheduler = budgeting.Scheduler(budget=budget, costs=budgeting.CostModel(costs),
                                    say=lambda line: print(line, flush=True), on_outcome=on_outcome)
    tmp = Path(tempfile.mkdtemp(prefix="autofit-gpu-validation-"))
    ctx = Context(dry=dry, card=common.detected_card(dry), specs=specs, log=log, scheduler=scheduler, tmp=tmp,
                  methods=methods)
    if not dry and "qlora" not in methods and "a" in wanted:
        ctx.note("QLoRA rows skipped: bitsandbytes does not import here" if not bnb else
                 "QLoRA rows left out (--qlora off)")
    cut = False
    if seconds is not None:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds - HARD_STOP_S - budget.elapsed()))
    try:
        scheduler.run(parts, lambda unit: RUNNERS[unit.part](unit, ctx))
    except OutOfTime:
        cut = True
    finally:
        if seconds is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
        shutil.rmtree(tmp, ignore_errors=True)
    if cut:
        done = {o.unit.label for o in scheduler.outcomes}
        cut_units = [u for _, units in parts for u in units if u.label not in done]
        ctx.note(f"budget ran out inside a unit: cut {cut_units[0].part} {cut_units[0].label}; not reached: "
                 f"{len(cut_units) - 1} units" if cut_units else "budget ran out")
        for i, u in enumerate(cut_units):
            log.append(budgeting.Outcome(unit=u, status="cut" if i == 0 else "skipped",
                                         predicted=scheduler.costs.predict(u)).to_row())
    text = summarize(folder, run=run_id, extra=out)
    print(text)
    print(f"# wrote {folder}/results.jsonl and summary.md{f' (and under {out})' if out else ''}; "
          f"{time.monotonic() - STARTED:.0f} s in all", flush=True)
    if cut:
        sys.stdout.flush()
        os._exit(0)  # worker processes of a cut simulation may never answer: leave without waiting for them
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    sys.exit(main())
