"""The ``autofit`` command: parses arguments, calls the public API, prints tables or JSON. No logic of its own.

Errors a user can act on (a malformed argument included) print one line and exit 2; ``--debug`` shows the traceback
instead. Ctrl-C (SIGINT) and SIGTERM stop a command within seconds with nothing left half-written, worker processes
ended, and exit status 130 and 143.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import re
import signal
import sys
import threading
from dataclasses import asdict

from autofit.errors import AutofitError, CacheError, Terminated

# autofit.sim.simulate.PRECISIONS and their short names, spelled out so that --help needs no torch (tests/test_cli.py
# checks they agree)
PRECISION_CHOICES = ("bf16-mixed", "16-mixed", "bf16-true", "16-true", "32-true", "bf16", "fp16", "fp32")

EPILOG = """examples:
  autofit probe distilgpt2 --gpu rtx3060            plan every knob for a card (probes it when present)
  autofit fit --gpu rtx4060-laptop                  which catalog models fit an 8 GB laptop card, and how
  autofit estimate distilgpt2 --gpu rtx3060 --batch-size 8 --seq-len 512
  autofit estimate TinyLlama/TinyLlama-1.1B-Chat-v1.0 --gpu rtx4060-laptop --method qlora \\
      --batch-size 4 --seq-len 1024 --gradient-checkpointing --plot mem.png
  autofit inspect meta-llama/Llama-3.2-1B --method lora --lora-r 16
  autofit gpus
  autofit models

Models are named from autofit's catalog (autofit models), the local Hugging Face cache, or a local directory with
config.json; nothing is downloaded. GPUs are named from the catalog (rtx3060, "RTX 4060 Laptop", a100-80gb), by
size (12GiB), or as a detected device (cuda:0); without --gpu, the detected card is used.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with autofit's one-line errors (argparse prints its usage block first)."""

    def error(self, message: str):
        self.exit(2, f"autofit: error: {message}; see {self.prog} --help\n")


def _Progress(enabled: bool):
    """Progress on stderr: a line rewritten in place, tqdm bars for counted work (``autofit.progress.Terminal``)."""
    from autofit.progress import Terminal

    return Terminal(enabled)


# Library errors name the Python API's parameters (gpu='rtx3060', seq_len=512, random_init=True); the command line
# says the same with its flags. Only parameters that are flags of some command are rewritten.
_PARAMETER = re.compile(r"\b(gpu|seq_len|effective_batch|method|quantization|precision|lora_r|lora_targets|optimizer|"
                        r"random_init|eval_batch_size|reserved_by_others|gradient_checkpointing|margin|allow)="
                        r"('[^']*'|\"[^\"]*\"|[^\s,;)]+)")
_FLAG_NAMES = {"eval_batch_size": "eval-batch"}


def as_flags(message: str) -> str:
    """``message`` with each ``name=value`` of a parameter written as the command line's ``--name value``."""
    def flag(match: re.Match) -> str:
        name, value = match.group(1), match.group(2).strip("'\"")
        option = "--" + _FLAG_NAMES.get(name, name.replace("_", "-"))
        if name == "gradient_checkpointing":
            return f"{option} {'on' if value == 'True' else 'off' if value == 'False' else 'auto'}"
        if value == "True":
            return option
        return f"{option} {value}"

    return _PARAMETER.sub(flag, message)


def _effective_batch(text: str) -> int | str:
    if text == "max":
        return "max"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of sequences or 'max', not {text!r}") from None
    return value


# Help for defaults that depend on the card: the same words wherever the option appears.
EFFECTIVE_BATCH_HELP = (
    "sequences per optimizer step, kept exactly as micro-batch x accumulation; 'max' takes the largest micro-batch "
    "that fits, with no accumulation. Default: set by the card: the largest micro-batch that fits, up to 64, with no "
    "accumulation; 16 by accumulation where fewer than 16 fit; 16 on the CPU")
SEQ_LEN_HELP = ("tokens per sequence. Default: from --data (95th percentile), else 1024 or the model's positions; a "
                "default length is halved while nothing fits the card")
METHOD_HELP = ("auto (default): the strongest method that fits a useful micro-batch (4) on the card: full, then "
               "LoRA, then QLoRA")
PRECISION_HELP = ("bf16-mixed or 16-mixed (fp32 weights, 16-bit autocast), bf16-true or 16-true (16-bit weights, "
                  "gradients and optimizer states, no autocast: a model loaded in bf16), 32-true; bf16, fp16 and fp32 "
                  "are short for bf16-mixed, 16-mixed and 32-true. Default: set by the card: bf16-mixed where it "
                  "supports bf16 (Ampere and newer), 16-mixed on older cards and on a card given only by its size, "
                  "32-true on the CPU")
CHECKPOINTING_HELP = "auto (default): on only where it lets a larger micro-batch run faster on the card"
EVAL_BATCH_HELP = ("evaluation micro-batch. Default: set by the card: the largest, up to 64, that fits after the "
                   "training step")
RESERVED_HELP = ("memory other programs hold on the card, such as a display (e.g. 800MiB, 0). Default: what a "
                 "detected card reports; 512MiB for a desktop GeForce card named from the catalog, 0 for others")
MARGIN_HELP = ("share of the card's memory kept free (default: 0.05); on the CPU without it, the budget is half "
               "the RAM available")


OPTIMIZER_CHOICES = ("adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "adamw_cpu_offload")
ALLOW_HELP = ("levers the planner may pull, comma-separated: optimizer levers for full fine-tuning when plain AdamW "
              "leaves no useful micro-batch (8bit, paged, cpu-offload; default: all with --method full, none with "
              "auto), and activations (offloaded to host RAM when nothing fits without it; allowed by default)")
NO_OFFLOAD_HELP = ("never keep training state in host RAM (no paged or CPU-offloaded optimizer, no offloaded "
                   "activations)")
OFFLOAD_ACTIVATIONS_HELP = ("keep the tensors each forward saves for the backward in pinned host RAM "
                            "(torch.autograd.graph.save_on_cpu): less card memory, a copy over PCIe each way")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _add_knobs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training setup")
    g.add_argument("--method", choices=("full", "lora", "qlora"), default="full",
                   help="full fine-tuning, LoRA adapters on a 16-bit base, or LoRA on a 4/8-bit base (default: full)")
    g.add_argument("--quantization", choices=("none", "8bit", "4bit"), default=None,
                   help="base weights for qlora (default: 4bit for qlora, none otherwise)")
    g.add_argument("--precision", choices=PRECISION_CHOICES, default=None, metavar="PRECISION", help=PRECISION_HELP)
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer in backward instead of keeping its activations")
    g.add_argument("--optimizer", choices=OPTIMIZER_CHOICES,
                   default="adamw_torch_fused", help="the Trainer's optim setting (default: adamw_torch_fused)")
    g.add_argument("--lora-r", type=int, default=16, metavar="N", help="LoRA rank (default: 16)")
    g.add_argument("--lora-targets", type=_csv, default=None, metavar="A,B",
                   help="modules to adapt (default: peft's targets for the architecture)")
    g.add_argument("--offload-activations", action="store_true", help=OFFLOAD_ACTIVATIONS_HELP)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autofit", description="Fit fine-tuning to your GPU: estimate, probe and plan the memory of a training "
        "step.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common.add_argument("--quiet", action="store_true", help="no progress messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add = functools.partial(sub.add_parser, parents=[common])

    p = add("estimate", help="memory of one training step, without allocating anything",
                       description="Simulate a training step on fake tensors that imitate CUDA and print where the "
                       "memory goes at its peak: weights, gradients, optimizer state, activations, logits, "
                       "workspaces, allocator margin and CUDA context, with the three totals a GPU reports.")
    p.add_argument("model", help="catalog name, repo id in the local HF cache, or a directory with config.json")
    p.add_argument("--gpu", default=None, help="card to plan for (rtx3060, 12GiB, cuda:0, cpu); default: detected")
    p.add_argument("--batch-size", type=int, required=True, metavar="N", help="per-device micro-batch")
    p.add_argument("--seq-len", type=int, required=True, metavar="N", help="tokens per sequence")
    _add_knobs(p)
    _add_task(p)
    p.add_argument("--expandable-segments", action="store_true",
                   help="model PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    p.add_argument("--plot", metavar="FILE", help="also write a PNG of the components against batch size")
    g = p.add_argument_group("a run, not two steps")
    g.add_argument("--run", action="store_true",
                   help="estimate a run whose batches are padded to different lengths (up to --seq-len), replayed "
                        "through the allocator model: its peaks and how reserved memory grows with the steps")
    g.add_argument("--steps", type=int, default=30, metavar="N", help="steps in the run (default: 30)")
    g.add_argument("--data", metavar="FILE", help="draw each batch's samples from this data's token lengths "
                   "(needs the model's tokenizer locally; default: every length up to --seq-len equally likely)")
    g.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="an evaluation pass every N steps, at --eval-batch (default: none)")
    g.add_argument("--eval-batch", type=int, default=None, metavar="N", help="evaluation batch (default: --batch-size)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_estimate)

    p = add("probe", help="plan every knob for a card: method, batch, accumulation, length, checkpointing",
            description="Choose the fastest configuration that fits the card: full fine-tuning, LoRA or QLoRA, "
            "micro-batch and accumulation (the effective batch stays what you ask), sequence length, gradient "
            "checkpointing and precision, with the memory estimate and the reasons behind each choice. With a GPU "
            "present and no --gpu, the card is probed with real trial steps; otherwise the plan comes from the "
            "estimate for the named card.",
            epilog="The plan's TrainingArguments: Plan.from_json(open('plan.json').read()).training_arguments()",
            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--gpu", default=None, help="card to plan for (rtx3060, 12GiB, cuda:0, cpu; several: "
                   "2x rtx3080-20gb or rtx3090,rtx3080-20gb); default: detected")
    p.add_argument("--seq-len", type=int, default=None, metavar="N", help=SEQ_LEN_HELP)
    p.add_argument("--effective-batch", type=_effective_batch, default=None, metavar="N|max",
                   help=EFFECTIVE_BATCH_HELP)
    p.add_argument("--method", choices=("auto", "full", "lora", "qlora"), default="auto", help=METHOD_HELP)
    p.add_argument("--data", metavar="FILE", help="text, JSON lines or chat data: the sequence length is measured")
    p.add_argument("--quantization", choices=("4bit", "8bit"), default=None, help="base weights for qlora")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=None, metavar="PRECISION", help=PRECISION_HELP)
    p.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto", help=CHECKPOINTING_HELP)
    p.add_argument("--optimizer", choices=OPTIMIZER_CHOICES,
                   default="adamw_torch_fused", help="the Trainer's optim setting (default: adamw_torch_fused)")
    p.add_argument("--eval-batch", type=int, default=None, metavar="N", help=EVAL_BATCH_HELP)
    p.add_argument("--reserved-by-others", default=None, metavar="SIZE", help=RESERVED_HELP)
    p.add_argument("--lora-r", type=int, default=16, metavar="N")
    p.add_argument("--lora-targets", type=_csv, default=None, metavar="A,B")
    p.add_argument("--margin", type=float, default=None, metavar="F", help=MARGIN_HELP)
    _add_task(p)
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="plan for N cards of --gpu (or N detected cards): DDP or FSDP2, launched by accelerate")
    p.add_argument("--strategy", choices=("auto", "ddp", "fsdp"), default="auto",
                   help="with several cards: DDP (a replica per card) or FSDP2 (sharded); auto picks")
    p.add_argument("--nodes", type=int, default=1, metavar="N",
                   help="machines with --gpus cards each (planned on paper; default: 1)")
    p.add_argument("--allow", type=_csv, default=None, metavar="A,B", help=ALLOW_HELP)
    p.add_argument("--no-offload", action="store_true", help=NO_OFFLOAD_HELP)
    p.add_argument("--offload-activations", action="store_true",
                   help=OFFLOAD_ACTIVATIONS_HELP + " in every configuration tried (default: only when nothing fits "
                   "without it)")
    p.add_argument("--no-probe", action="store_true", help="plan from the estimate even when the card is present")
    p.add_argument("--probe-on", metavar="cuda:N", default=None,
                   help="probe on this device with its allocator capped at the planned card's budget, so a large "
                   "card stands in for a smaller one (plan for --gpu rtx3060, probe on an 80 GB card)")
    p.add_argument("--isolate", action="store_true", help="run every probe trial in a fresh process")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached simulations and calibration")
    p.add_argument("--out", metavar="FILE", help="write the plan as JSON (Plan.from_json reads it back)")
    p.add_argument("--plot", metavar="FILE", help="also write a PNG of the plan's memory against the micro-batch, "
                   "with its budget, its micro-batch and the largest that fits")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_probe)

    p = add("fit", help="every catalog model on one card: the best plan, or why none fits",
            description="Plan every model of autofit's catalog for one card and print a table a user choosing a "
            "model can read instead of a guide.")
    p.add_argument("--gpu", default=None, help="card (rtx4060-laptop, 12GiB, cuda:0); default: detected")
    p.add_argument("--method", choices=("auto", "full", "lora", "qlora"), default="auto")
    p.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help="tokens per sequence. Default: 1024 or the model's positions, halved while nothing fits the card")
    p.add_argument("--reserved-by-others", default=None, metavar="SIZE", help=RESERVED_HELP)
    p.add_argument("--models", type=_csv, default=None, metavar="A,B", help="only these models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_fit)

    p = add("train", help="fine-tune a model on your data with the plan for this machine",
            description="Plan (or load a plan), load the model as the plan says, tokenize the data, and run "
            "transformers' Trainer under autofit's out-of-memory guard. Saves the adapter or model, the tokenizer, "
            "plan.json and memory_log.jsonl in --out. Weights and tokenizer come from a local directory or the "
            "Hugging Face cache; --random-init trains the architecture from its config with a tokenizer built from "
            "the data, so the whole path runs anywhere.",
            epilog="example: autofit train distilgpt2 --data notes.txt --random-init --steps 20")
    p.add_argument("model")
    p.add_argument("--data", required=True, metavar="FILE", help="plain text, JSON lines (text, chat, prompt/"
                   "completion, instruction/output) or a JSON array")
    p.add_argument("--out", default="autofit-out", metavar="DIR", help="output folder (default: autofit-out)")
    p.add_argument("--plan", metavar="FILE", help="a plan.json from autofit probe --out (default: plan now)")
    p.add_argument("--gpu", default=None, help="card to plan for (default: the detected card, else the CPU)")
    bound = p.add_mutually_exclusive_group()
    bound.add_argument("--steps", type=int, default=None, metavar="N",
                       help="optimizer steps; a run of N steps keeps no checkpoints unless --save-steps asks")
    bound.add_argument("--epochs", type=float, default=None, metavar="N", help="passes over the data (default: 1)")
    p.add_argument("--random-init", action="store_true", help="random weights from the config (no download)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (refused otherwise)")
    p.add_argument("--save-steps", type=int, default=None, metavar="N",
                   help="keep a checkpoint (with optimizer state, for --resume) every N steps (default: twice per run "
                   "bounded by --epochs, none for --steps)")
    p.add_argument("--seq-len", type=int, default=None, metavar="N", help=SEQ_LEN_HELP)
    p.add_argument("--effective-batch", type=_effective_batch, default=None, metavar="N|max",
                   help=EFFECTIVE_BATCH_HELP)
    p.add_argument("--method", choices=("auto", "full", "lora", "qlora"), default=None, help=METHOD_HELP)
    p.add_argument("--eval-batch", type=int, default=None, metavar="N", help=EVAL_BATCH_HELP)
    p.add_argument("--reserved-by-others", default=None, metavar="SIZE", help=RESERVED_HELP)
    p.add_argument("--learning-rate", type=float, default=None, metavar="LR")
    p.add_argument("--allow", type=_csv, default=None, metavar="A,B", help=ALLOW_HELP)
    p.add_argument("--no-offload", action="store_true", help=NO_OFFLOAD_HELP)
    p.add_argument("--offload-activations", action="store_true", help=OFFLOAD_ACTIVATIONS_HELP)
    p.add_argument("--no-packing", action="store_true", help="truncate each sample instead of packing plain text")
    g = p.add_argument_group("several GPUs (or CPU ranks)")
    g.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="train on N ranks of this machine: plans the world (DDP or FSDP2) for N cards of --gpu (default: "
                   "the detected ones; without a GPU, N ranks on the CPU), then starts every rank through accelerate "
                   "launch, each running this command with the plan. --gpu 2x rtx3090 says the same")
    g.add_argument("--strategy", choices=("auto", "ddp", "fsdp"), default="auto",
                   help="with several ranks: DDP (a replica per card) or FSDP2 (sharded); auto picks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_train)

    p = add("cache", help="the calibration and simulation cache: list it or clear it",
            description="autofit keeps probe calibrations and probe studies in a SQLite database, and simulations "
            "as files, under $AUTOFIT_CACHE or ~/.cache/autofit. AUTOFIT_CACHE=off (or --no-cache) keeps nothing.")
    p.add_argument("action", choices=("list", "clear"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cache)

    p = add("inspect", help="architecture and exact parameter counts of a model",
                       description="Resolve a model offline and count its parameters exactly, as a fine-tuning "
                       "method loads it.")
    p.add_argument("model")
    p.add_argument("--method", choices=("full", "lora", "qlora"), default=None,
                   help="count as this method loads the model (default: full, or lora when --lora-r is given)")
    p.add_argument("--lora-r", type=int, default=None, metavar="N")
    p.add_argument("--lora-targets", type=_csv, default=None, metavar="A,B")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_inspect)

    p = add("gpus", help="detected GPUs and the catalog of known cards")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_gpus)

    p = add("models", help="the built-in catalog of model configs (usable offline)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_models)
    return parser


def _joined_counts(argv: list[str]) -> list[str]:
    """``--gpu 2x rtx3080-20gb`` typed without quotes: the count joined to the card that follows it."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if out and out[-1] == "--gpu" and re.fullmatch(r"\d+[x*]", argv[i]) and i + 1 < len(argv):
            out.append(f"{argv[i]} {argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Runs the command line ``argv``; returns the exit status (0, 2 for an error, 130 / 143 when interrupted)."""
    parser = _parser()
    try:
        args = parser.parse_args(_joined_counts(sys.argv[1:] if argv is None else list(argv)))
    except SystemExit as stop:  # --help, or a malformed argument (printed on one line)
        return stop.code if isinstance(stop.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="autofit: %(levelname)s: %(message)s")
    if not args.debug:
        # bitsandbytes warns at import, on CPUs with AVX-512 BF16, that an optional CPU kernel from the Hub did not
        # load; planning never runs its kernels, so that says nothing about the plan
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        with _sigterm_raises():
            return args.handler(args)
    except AutofitError as err:
        if args.debug:
            raise
        rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else "0"
        where = "" if rank == "0" else f" (rank {rank})"  # started on several ranks: each says it, rank 0 plainly
        print(f"autofit: error{where}: " + as_flags(" ".join(str(err).split())), file=sys.stderr)  # one line, in flags
        return 2
    except KeyboardInterrupt as stop:
        how = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        after = "; autofit train ... --resume continues from the last complete checkpoint" \
            if args.command == "train" else ""
        print(f"autofit: {how}: stopped with no file half-written{after}", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    except BrokenPipeError:  # output piped into a reader that stopped early (head): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises ``Terminated`` (a KeyboardInterrupt) as Ctrl-C raises KeyboardInterrupt, so that every
    ``finally`` runs: staged checkpoints are removed, worker processes ended, nothing is left half-written."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    sys.exit(main())


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _add_task(p) -> None:
    p.add_argument("--task", default=None, metavar="TASK",
                   help="the head trained: causal-lm, seq2seq-lm, classification (sequence), token (per-token "
                        "classification); default: the model's own (T5/BART seq2seq, BERT-style encoders classification)")
    p.add_argument("--target-len", type=int, default=None, metavar="N",
                   help="encoder-decoders: target (decoder) tokens per sample; default: from source/target --data, "
                        "else the source length")


def _model_ref(args):
    """The model as ``--task`` and ``--target-len`` (or seq2seq --data pairs) make it: a name, or a resolved spec
    with the seq2seq lengths read from the pairs (args.seq_len and args.data updated)."""
    data_path = getattr(args, "data", None)
    task, target_len = getattr(args, "task", None), getattr(args, "target_len", None)
    from autofit import model as models
    from autofit import seq2seq

    pairs = data_path is not None and seq2seq.is_pairs_file(data_path)
    if task is None and target_len is None and not pairs:
        return args.model
    spec = models.resolve(args.model, task=task)
    if pairs and spec.task == "seq2seq-lm":
        from autofit import data

        tok = data.load_tokenizer(spec.name)
        if tok is None:
            raise AutofitError(f"--data needs {spec.name}'s tokenizer in a local directory or the Hugging Face cache; "
                               "without it, pass --seq-len and --target-len")
        lengths = seq2seq.choose_lengths(seq2seq.load_pairs(data_path), tok, max_positions=spec.max_positions)
        args.seq_len = args.seq_len or lengths.source.seq_len
        target_len = target_len or lengths.target.seq_len
        args.data = None
    return models.resolve(spec, target_len=target_len) if target_len else spec


# -- handlers ----------------------------------------------------------------------------------------------------------
def _estimate(args) -> int:
    from autofit import memory as est
    from autofit import validate

    if args.plot:
        validate.file_path(args.plot, what="--plot")
    progress = _Progress(not args.quiet and not args.json)
    if args.run:
        return _estimate_run(args, progress)
    result = est.estimate(
        _model_ref(args), args.gpu, batch_size=args.batch_size, seq_len=args.seq_len, method=args.method,
        precision=args.precision, quantization=args.quantization,
        gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer, lora_r=args.lora_r,
        lora_targets=args.lora_targets, expandable_segments=args.expandable_segments,
        offload_activations=args.offload_activations, progress=progress)
    plotted = None
    if args.plot:
        from autofit import plot

        plotted = plot.batch_sweep(result, args.plot, gpu=args.gpu, progress=progress)
    progress.done()
    if args.json:
        out = result.to_dict()
        if plotted:
            out["plot"] = plotted
        _print_json(out)
    else:
        print(result.summary())
        if plotted:
            print(f"wrote {plotted}")
    return 0


def _estimate_run(args, progress) -> int:
    from autofit import data, runs
    from autofit import model as models

    sample_lengths = None
    if args.data:
        tok = data.load_tokenizer(models.resolve(args.model).name)
        if tok is None:
            raise AutofitError(f"--data needs {args.model}'s tokenizer in a local directory or the Hugging Face cache; "
                               "without it, leave --data out to draw lengths evenly up to --seq-len")
        sample_lengths = data.token_lengths(data.load_samples(args.data), tok)
    result = runs.estimate_run(
        args.model, args.gpu, batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
        sample_lengths=sample_lengths, eval_every=args.eval_every,
        eval_batch_size=(args.eval_batch or args.batch_size) if args.eval_every else None,
        expandable_segments=args.expandable_segments, progress=progress, method=args.method,
        precision=args.precision, quantization=args.quantization, gradient_checkpointing=args.gradient_checkpointing,
        optimizer=args.optimizer, lora_r=args.lora_r, lora_targets=args.lora_targets,
        offload_activations=args.offload_activations)
    progress.done()
    if args.json:
        _print_json(result.to_dict())
    else:
        print(result.summary())
    return 0


def _probe(args) -> int:
    from autofit import gpu as gpus
    from autofit import planner, validate

    if args.no_cache:
        os.environ["AUTOFIT_CACHE"] = "off"
    if args.out:
        validate.file_path(args.out)  # before minutes of planning, not after
    from autofit import distributed

    if distributed.several(args.gpu, args.gpus) or args.nodes != 1 or (args.gpu is None and len(gpus.detect()) > 1):
        return _probe_world(args)
    if args.gpu is None and not gpus.detect():
        raise AutofitError("no CUDA GPU detected, so there is no card to probe; plan for the card you will train on "
                           "with --gpu, e.g. autofit probe MODEL --gpu rtx3060 (autofit gpus lists the names)")
    progress = _Progress(not args.quiet and not args.json)
    kwargs = {} if args.margin is None else {"margin": args.margin}
    stand_in = args.probe_on is not None
    model_ref = _model_ref(args)
    result = planner.plan(
        model_ref, args.gpu, seq_len=args.seq_len, effective_batch=args.effective_batch, method=args.method,
        dataset=args.data, quantization=args.quantization, precision=args.precision, lora_r=args.lora_r,
        lora_targets=args.lora_targets, optimizer=args.optimizer, eval_batch_size=args.eval_batch,
        reserved_by_others=args.reserved_by_others, allow=args.allow, no_offload=args.no_offload,
        offload_activations=True if args.offload_activations else None,
        gradient_checkpointing={"auto": None, "on": True, "off": False}[args.gradient_checkpointing],
        probe=False if stand_in or args.no_probe or args.gpu is not None and not str(args.gpu).startswith("cuda")
        else None, progress=progress, **kwargs)
    if stand_in:
        from autofit import probing

        index = gpus.resolve(args.probe_on).index
        device = probing.CudaDevice(index=index, limit_bytes=result.budget_bytes - result.estimate.cuda_context)
        result = probing.probe(result, device=device, isolate=args.isolate, use_cache=not args.no_cache,
                               progress=progress)
    plotted = None
    if args.plot:
        from autofit import plot

        plotted = plot.plan_figure(result, args.plot, progress=progress)
    progress.done()
    if args.out:
        from autofit.files import write_atomic

        write_atomic(args.out, result.to_json())
    if args.json:
        print(result.to_json())
        return 0
    print(as_flags(result.summary()))
    if plotted:
        print(f"wrote {plotted}")
    if result.source == "estimated":
        present = bool(gpus.detect())
        print("  note: planned from the estimate for this card" + (" (pass --gpu cuda:N to probe the card present)"
                                                                      if present else "; no GPU here to probe"))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _probe_world(args) -> int:
    """``autofit probe`` for several cards: the world's plan, from the estimate (see ``autofit.distributed``)."""
    from autofit import distributed

    progress = _Progress(not args.quiet and not args.json)
    kwargs = {} if args.margin is None else {"margin": args.margin}
    result = distributed.plan(
        args.model, args.gpu, gpus_count=args.gpus, nodes=args.nodes, strategy=args.strategy,
        effective_batch=args.effective_batch,
        method=args.method, seq_len=args.seq_len, dataset=args.data, quantization=args.quantization,
        precision=args.precision, lora_r=args.lora_r, lora_targets=args.lora_targets, optimizer=args.optimizer,
        eval_batch_size=args.eval_batch, reserved_by_others=args.reserved_by_others,
        gradient_checkpointing={"auto": None, "on": True, "off": False}[args.gradient_checkpointing],
        allow=args.allow, no_offload=args.no_offload, offload_activations=True if args.offload_activations else None,
        progress=progress, **kwargs)
    progress.done()
    if args.out:
        from autofit.files import write_atomic

        write_atomic(args.out, result.to_json())  # autofit train --plan reads it
    if args.json:
        _print_json(result.to_dict())
        return 0
    print(as_flags(result.summary()))
    print("  note: planned from the estimate; the CLI does not probe several cards: in a script started on every "
          "rank (torchrun, accelerate launch), autofit.probe(plan.rank) runs each trial on all ranks together")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _fit(args) -> int:
    from autofit import planner
    from autofit.units import fmt_bytes

    progress = _Progress(not args.quiet and not args.json)
    rows = planner.fit_table(args.gpu, method=args.method, seq_len=args.seq_len, names=args.models, progress=progress,
                             reserved_by_others=args.reserved_by_others)
    progress.done()
    if args.json:
        _print_json(rows)
        return 0
    from autofit import gpu as gpus

    card = gpus.resolve(args.gpu) if args.gpu is not None or gpus.detect() else gpus.host_memory()
    print(f"fine-tuning on {card.name} ({fmt_bytes(card.total_bytes)}):")
    print(f"  {'model':<40} {'method':<13} {'batch x accum':>13} {'seq':>5} {'ckpt':>4} {'needs':>10} {'tokens/s':>9}")
    for r in rows:
        if r["fits"]:
            method = r["method"] + (f" {r['quantization']}" if r["quantization"] != "none" else "")
            print(f"  {r['model']:<40} {method:<13} {str(r['batch_size']) + ' x ' + str(r['grad_accum']):>13} "
                  f"{r['seq_len']:>5} {'on' if r['checkpointing'] else 'off':>4} {fmt_bytes(r['required_bytes']):>10} "
                  f"{r['tokens_per_second']:>9,}")
        else:
            way = f"; {as_flags(r['ways_out'][0])}" if r.get("ways_out") else ""
            print(f"  {r['model']:<40} does not fit: {as_flags(r.get('binding') or r['reason'])}{way}")
    return 0


def _train(args) -> int:
    from autofit import distributed, training

    options = {k: v for k, v in dict(seq_len=args.seq_len, effective_batch=args.effective_batch,
                                      method=args.method, eval_batch_size=args.eval_batch,
                                      reserved_by_others=args.reserved_by_others, allow=args.allow,
                                      no_offload=args.no_offload or None,
                                      offload_activations=args.offload_activations or None).items()
               if v is not None}  # given ones: a plan wins, and says so
    launch = distributed.launched()
    if launch is None and (args.gpus not in (None, 1) or distributed.several(args.gpu)):
        return _train_on_ranks(args, options)
    if args.strategy != "auto" and launch is None:
        raise AutofitError("--strategy chooses how several ranks share the work; add --gpus N")
    if launch is not None and launch.rank != 0 and not args.debug:
        _quiet_rank()
    result = training.train(args.model, args.data, output_dir=args.out, plan=args.plan, gpu=args.gpu,
                            steps=args.steps, epochs=args.epochs, random_init=args.random_init, resume=args.resume,
                            overwrite=args.overwrite, learning_rate=args.learning_rate,
                            packing=False if args.no_packing else None, save_steps=args.save_steps,
                            progress=not args.quiet and not args.json, **options)
    if launch is not None and launch.rank != 0:
        return 0  # rank 0 reports for every rank
    if args.json:
        from dataclasses import asdict

        out = {k: v for k, v in asdict(result).items() if k not in ("plan", "guard_events")}
        out["guard_events"] = [asdict(e) for e in result.guard_events]
        out["plan"] = result.plan.to_dict()
        _print_json(out)
    else:
        if not os.environ.get("AUTOFIT_RANKS_OF"):
            print(as_flags(result.plan.summary()))
        print(result.report())
    return 0


def _quiet_rank() -> None:
    """A rank other than 0 keeps its warnings to itself: rank 0 says the same once."""
    logging.getLogger().setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()


def _train_on_ranks(args, options: dict) -> int:
    """``autofit train --gpus N``: the world's plan made here (bad input fails before anything starts), then every
    rank started through ``accelerate launch``, each running ``autofit train`` with that plan; returns the ranks'
    exit status."""
    import shutil
    import subprocess
    import tempfile

    from autofit import distributed, training

    progress = _Progress(not args.quiet and not args.json)
    if args.plan:
        world_plan = training.read_plan_file(args.plan)
        if not isinstance(world_plan, distributed.WorldPlan):
            raise AutofitError(f"{args.plan} is a plan for one device; train it without --gpus")
        count = args.gpus if args.gpus is not None else distributed.world(args.gpu).size  # --gpu 2x CARD
        if count != world_plan.world_size:
            raise AutofitError(f"{args.plan} is a plan for {world_plan.world_size} ranks, not {count}; pass "
                               f"--gpus {world_plan.world_size} or plan again")
    else:
        world_plan = training.plan_ranks(
            args.model, args.data, output_dir=args.out, gpu=args.gpu, gpus_count=args.gpus, strategy=args.strategy,
            random_init=args.random_init, resume=args.resume, overwrite=args.overwrite, progress=progress, **options)
    progress.done()
    n = world_plan.world_size
    folder = tempfile.mkdtemp(prefix="autofit-ranks-")
    try:
        plan_file, config_file = os.path.join(folder, "plan.json"), os.path.join(folder, "accelerate.yaml")
        with open(plan_file, "w") as fh:
            fh.write(world_plan.to_json())
        with open(config_file, "w") as fh:
            fh.write(world_plan.accelerate_config())
        rank_args = [args.model, "--data", args.data, "--out", args.out, "--plan", plan_file]
        for flag, value in (("--steps", args.steps), ("--epochs", args.epochs), ("--save-steps", args.save_steps),
                            ("--learning-rate", args.learning_rate)):
            if value is not None:
                rank_args += [flag, str(value)]
        for flag, on in (("--random-init", args.random_init), ("--resume", args.resume),
                         ("--overwrite", args.overwrite), ("--no-packing", args.no_packing), ("--json", args.json),
                         ("--quiet", args.quiet), ("--debug", args.debug)):
            if on:
                rank_args.append(flag)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
                   "--num_processes", str(n), "--num_machines", "1", "--main_process_port", str(_free_port())]
        if world_plan.strategy == "ddp":
            command.append("--multi_gpu")
        command += ["--module", "autofit", "train"] + rank_args
        env = dict(os.environ, AUTOFIT_RANKS_OF="autofit train")  # the ranks leave the plan's summary to this process
        if world_plan.world.on_cpu and "OMP_NUM_THREADS" not in env:  # the machine's cores shared by its ranks
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
        if not args.json:
            print(as_flags(world_plan.summary()))
            print(f"starting {n} ranks: accelerate launch --num_processes {n} ... -m autofit train "
                  f"{' '.join(rank_args[:5])} ...", flush=True)
        done = subprocess.run(command, env=env)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if done.returncode != 0:
        if done.returncode in (2, 130, 143):
            return done.returncode
        print(f"autofit: error: a rank stopped with exit status {done.returncode}; the ranks' messages above say why",
              file=sys.stderr)
        return 2
    return 0


def _free_port() -> int:
    """A TCP port free on this machine now, for the ranks' rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cache(args) -> int:
    import shutil

    from autofit import calibration
    from autofit import gpu as gpus
    from autofit.sim import simulate

    root = calibration.cache_root()
    if root is None:
        raise AutofitError("the cache is off (AUTOFIT_CACHE=off); unset it to use one")
    try:
        store, problem = calibration.Store(), None
    except CacheError as err:
        if args.action == "clear":
            raise CacheError(f"cannot clear the cache: {err}") from None
        store, problem = None, str(err)
    sims = simulate.cache_dir()
    sim_files = sorted(sims.glob("*.npz")) if sims and sims.is_dir() else []
    if args.action == "clear":
        n = store.clear()
        if sims and sims.parent.is_dir():
            try:
                shutil.rmtree(sims.parent)
            except OSError as err:
                raise CacheError(f"cleared {n} calibration(s) but not the simulations in {sims.parent} "
                                 f"({err.strerror or err}); make the folder writable") from None
        (root / gpus.HOST_SPEED_FILE).unlink(missing_ok=True)  # the CPU is measured again on its next plan
        print(f"cleared {n} calibration(s), the probe studies and {len(sim_files)} cached simulation(s) in {root}")
        return 0
    entries = store.entries() if store is not None else []
    if args.json:
        _print_json({"path": str(store.path if store else calibration.database_path()), "usable": store is not None,
                     "problem": problem, "read_only": bool(store and store.readonly), "calibrations": entries,
                     "simulations": len(sim_files)})
        return 0
    print(f"cache: {root}" + (f" (not usable: {problem}; autofit runs without it)" if problem else "")
          + (" (read-only: calibrations are read, not recorded)" if store is not None and store.readonly else ""))
    print(f"  {len(sim_files)} cached simulations ({sum(f.stat().st_size for f in sim_files) / 2**20:.1f} MiB)")
    print(f"  {len(entries)} calibrations (measured / estimated peak reserved memory):")
    for e in entries:
        print(f"    {e['ratio']:.3f} x{e['samples']}  {e['model'].split('@')[0]} on {e['card']}: {e['method']}"
              f"{'' if e['quantization'] == 'none' else ' ' + e['quantization']}, {e['precision']}, checkpointing "
              f"{'on' if e['checkpointing'] else 'off'}, {e['optimizer']}")
    return 0


def _inspect(args) -> int:
    from autofit import model as models
    from autofit import validate

    spec = models.resolve(args.model)
    method = args.method or ("lora" if args.lora_r is not None or args.lora_targets is not None else "full")
    lora_r = 16 if args.lora_r is None else args.lora_r
    validate.knobs(spec, method=method, lora_r=lora_r, lora_targets=args.lora_targets)
    counts = models.count_params(spec, method=method, quantization="4bit" if method == "qlora" else "none",
                                 lora_r=lora_r, lora_targets=args.lora_targets)
    info = {
        "name": spec.name, "source": spec.source, "model_type": spec.model_type, "method": method,
        "total_params": counts.total, "trainable_params": counts.trainable, "params_by_dtype": dict(counts.by_dtype),
        "num_layers": spec.num_layers, "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size, "max_positions": spec.max_positions, "sliding_window": spec.sliding_window,
        "tied_embeddings": spec.tied_embeddings, "lora_targets": list(args.lora_targets or spec.lora_targets),
    }
    if method != "full":
        info["lora_r"] = lora_r
    if args.json:
        _print_json(info)
        return 0
    print(f"{spec.name} ({spec.model_type}, from {spec.source})")
    print(f"  {spec.num_layers} layers, hidden {spec.hidden_size}, {spec.num_heads} heads ({spec.num_kv_heads} kv, "
          f"dim {spec.head_dim}), intermediate {spec.intermediate_size}, vocab {spec.vocab_size}, "
          f"positions {spec.max_positions}")
    print(f"  parameters: {counts.total:,} total, {counts.trainable:,} trainable ({method}"
          + (f", r={info['lora_r']} on {','.join(info['lora_targets'])}" if method != "full" else "") + ")")
    for dtype, n in sorted(counts.by_dtype.items()):
        print(f"    {dtype:<9} {n:>16,}")
    return 0


def _gpus(args) -> int:
    from autofit import gpu as gpus
    from autofit.units import fmt_bytes

    detected, catalog = gpus.detect(), gpus.catalog()
    if args.json:
        _print_json({"detected": [asdict(g) for g in detected], "catalog": [asdict(g) for g in catalog]})
        return 0
    if detected:
        print("detected:")
        for g in detected:
            print(f"  cuda:{g.index}  {g.name}: {fmt_bytes(g.total_bytes)} total, {fmt_bytes(g.free_bytes)} free, "
                  f"{fmt_bytes(g.used_by_others_bytes)} used by other processes")
    else:
        print("detected: no CUDA GPU (name a card with --gpu, e.g. --gpu rtx3060)")
    print("\ncatalog (--gpu KEY):")
    for g in catalog:
        cc = ".".join(map(str, g.compute_capability)) if g.compute_capability else "?"
        tflops = f"{g.peak_tflops_16:g} TFLOPS" if g.peak_tflops_16 else "? TFLOPS"
        bw = f"{g.bandwidth_gbs:g} GB/s" if g.bandwidth_gbs else "? GB/s"
        print(f"  {g.key:<20} {g.name:<34} {fmt_bytes(g.total_bytes):>10}  sm {cc:<4} {tflops:>14} {bw:>11}")
    return 0


def _models(args) -> int:
    from autofit import model as models

    rows = []
    for name in models.catalog_names():
        spec = models.resolve(name)
        rows.append({"name": name, "params": spec.total_params, "num_layers": spec.num_layers,
                     "max_positions": spec.max_positions, "model_type": spec.model_type})
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        print(f"  {r['name']:<42} {r['params'] / 1e9:>7.2f}B  {r['num_layers']:>3} layers  "
              f"{r['max_positions'] or '?':>6} positions  {r['model_type']}")
    return 0


if __name__ == "__main__":
    entry()
