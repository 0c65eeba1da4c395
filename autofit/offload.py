"""Optimizer levers beyond the plain AdamW: 8-bit states, paged 8-bit states and optimizer state offloaded to the CPU.

Each lever is an optimizer name the engine simulates (``autofit.sim.simulate.OPTIMIZERS``): what PyTorch's
allocator sees on the card is simulated; what it does not see (paged state in CUDA managed memory, the pinned host
copies of an offloaded optimizer) is counted here, exactly, from each library's layout. This module also prices each
lever for the planner's throughput model (PCIe from ``catalog/pcie.json``, the CPU's AdamW from its measured copy
rate) and writes what it bought and cost.

Levers, by the name a user allows or forbids them with (``plan(allow=...)``, ``--allow``, ``--no-offload``):
- ``8bit``: bitsandbytes ``AdamW8bit`` (``optim="adamw_bnb_8bit"``): moments in one byte per value.
- ``paged``: bitsandbytes ``PagedAdamW8bit`` (``optim="paged_adamw_8bit"``): the same, its large moments in CUDA
  managed memory that the driver pages to host RAM when the card runs short.
- ``cpu-offload``: torchao ``CPUOffloadOptimizer`` (AdamW on the CPU over pinned host copies).
- ``activations``: the forward's saved tensors copied to pinned host RAM and back for the backward
  (``torch.autograd.graph.save_on_cpu(pin_memory=True)``), for any method; the planner pulls it only when nothing
  fits at the sequence length without it, before it shortens the sequence. The engine simulates what stays on the
  card; what the copies hold in host RAM and move over PCIe comes from the same simulation
  (``memory.OffloadFit``). ``offload_activations(model)`` applies it to a model a script trains.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from autofit import gpu as gpus
from autofit.errors import ConfigError
from autofit.sim import arch
from autofit.sim.simulate import Adam8bit, CpuOffloadAdam, StepConfig
from autofit.units import fmt_bytes

# lever name -> the optimizer the engine simulates and the plan hands to the Trainer
LEVERS = {"8bit": "adamw_8bit", "paged": "paged_adamw_8bit", "cpu-offload": "adamw_cpu_offload"}
ACTIVATIONS = "activations"  # the lever that offloads the forward's saved tensors (StepConfig.offload_activations)
OFFLOADING = ("paged", "cpu-offload", ACTIVATIONS)  # the levers that put state in host memory: what --no-offload forbids
LEVER_OF = {optimizer: lever for lever, optimizer in LEVERS.items()}
NAMES = {"adamw_8bit": "8-bit AdamW states (bitsandbytes AdamW8bit)",
         "paged_adamw_8bit": "paged 8-bit AdamW states (bitsandbytes PagedAdamW8bit)",
         "adamw_cpu_offload": "AdamW offloaded to the CPU (torchao CPUOffloadOptimizer)"}

# Assumptions of the cost model (a probe on the card measures instead):
# PCIE_EFFICIENCY: the share of a link's rate a pinned copy sustains (CUDA's bandwidthTest on a gen3 x16 link
# commonly shows 12-13 of 15.75 GB/s). A card outside the catalog is assumed on a gen4 x16 link.
PCIE_EFFICIENCY = 0.8
DEFAULT_LINK = "gen4 x16"
# AdamW's memory traffic per parameter, in units of the parameter's width w: read param, grad, two moments and
# write param and moments is 7w (28 bytes for fp32, as planner.ADAMW_BYTES); 8-bit moments read and written as
# one byte each: 3w + 4 bytes.
ADAMW_WIDTHS = 7
PCIE_FILE = Path(__file__).parent / "catalog" / "pcie.json"


def allowed(allow=None, *, no_offload: bool = False) -> tuple[str, ...]:
    """The lever names a plan may use: ``allow`` (names of ``LEVERS``, a comma-separated string or an iterable;
    None: all of them), less the offloading ones when ``no_offload``. Raises ``ConfigError`` for an unknown name."""
    known = (*LEVERS, ACTIVATIONS)
    if allow is None:
        names = known
    else:
        if isinstance(allow, str):
            allow = [a for a in allow.replace(" ", "").split(",") if a]
        try:
            names = tuple(dict.fromkeys(allow))
        except TypeError:
            raise ConfigError(f"allow names levers ({', '.join(known)}); got {allow!r}") from None
        unknown = [a for a in names if a not in known]
        if unknown:
            raise ConfigError(f"unknown lever {unknown[0]!r} in allow; the levers are {', '.join(known)} "
                              "(e.g. allow='8bit,cpu-offload')")
    if no_offload:
        names = tuple(n for n in names if n not in OFFLOADING)
    return names


def is_lever(cfg: StepConfig) -> bool:
    return cfg.optimizer in LEVER_OF


# -- the state's layout ---------------------------------------------------------------------------------------------
_SIZES: dict[tuple[str, str], tuple[int, ...]] = {}


def _trainable_sizes(spec: arch.ModelSpec) -> tuple[int, ...]:
    """Values in each trainable parameter of full fine-tuning, tied weights once (the model built on ``meta``)."""
    if spec.module is not None:
        return tuple(p.numel() for p in {id(p): p for p in spec.module.parameters()}.values())
    key = (spec.fingerprint, spec.task)
    if key not in _SIZES:
        model = arch.build(spec.config, task=spec.task)  # on meta, with the task's head
        _SIZES[key] = tuple(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return _SIZES[key]


@dataclass(frozen=True, kw_only=True, slots=True)
class StateLayout:
    """Where an optimizer's state lives, in bytes: on the card (what the simulation sees), in CUDA managed memory
    (paged; on the card while it has room, else in host RAM) and pinned in host RAM (offloaded)."""

    device: int
    managed: int
    pinned: int


def layout(spec: arch.ModelSpec, cfg: StepConfig) -> StateLayout:
    """The optimizer state of full fine-tuning ``spec`` with ``cfg.optimizer``, placed by each library's rules
    (``Adam8bit`` and ``CpuOffloadAdam`` in the engine cite them). Weight width follows the precision."""
    width = 4 if cfg.weights_dtype == torch.float32 else 2
    device = managed = pinned = 0
    sizes = _trainable_sizes(spec)
    if cfg.optimizer in ("adamw_8bit", "paged_adamw_8bit") and any(n >= Adam8bit.MIN_8BIT_SIZE for n in sizes):
        device += 2 * 4 * Adam8bit.QMAP_VALUES  # the signed and unsigned quantization maps, once
    for n in sizes:
        if cfg.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
            if n < Adam8bit.MIN_8BIT_SIZE:
                device += 2 * 4 * n
                continue
            device += 2 * 4 * -(-n // Adam8bit.BLOCK)  # absmax1, absmax2
            if cfg.optimizer == "paged_adamw_8bit" and n >= Adam8bit.PAGED_MIN_SIZE:
                managed += 2 * n
            else:
                device += 2 * n
        elif cfg.optimizer == "adamw_cpu_offload":
            if n < CpuOffloadAdam.MINIMAL_SIZE:
                device += 2 * width * n
            else:
                pinned += 4 * width * n  # parameter, gradient and two moments, in the parameter's dtype
        else:
            device += 2 * width * n
    return StateLayout(device=device, managed=managed, pinned=pinned)


def host_bytes(spec: arch.ModelSpec, cfg: StepConfig) -> dict[str, int]:
    """Host memory the optimizer of ``cfg`` holds outside the card, by name (empty for the plain ones)."""
    if cfg.method != "full" or not is_lever(cfg) or cfg.device != "cuda":
        return {}
    state = layout(spec, cfg)
    out = {}
    if state.pinned:
        out["offloaded optimizer (pinned)"] = state.pinned
    if state.managed:
        out["paged optimizer state (managed)"] = state.managed
    return out


def state_bytes_per_param(cfg: StepConfig, scale: float) -> float:
    """Bytes of optimizer state per trainable parameter on the card, a lower bound for the planner's static part
    (``scale``: 0.5 for 16-bit weights' states, else 1): the moments alone, 2 bytes for 8-bit ones; none for paged
    and offloaded state, which is not on the card (``layout`` has the exact bytes, block scales and small tensors)."""
    if cfg.optimizer == "adamw_8bit":
        return 2.0
    if cfg.optimizer in ("paged_adamw_8bit", "adamw_cpu_offload"):
        return 0.0
    return 8 * scale


# -- the cost ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _links() -> tuple[dict, dict]:
    data = json.loads(PCIE_FILE.read_text(encoding="utf-8"))
    return data["links"], data["lane_gbs"]


def pcie_gbs(card: gpus.GpuInfo) -> float:
    """The card's host link in GB/s, one direction, at ``PCIE_EFFICIENCY`` of its rate (``catalog/pcie.json``)."""
    links, lane = _links()
    link = links.get(card.key or "", DEFAULT_LINK)
    gen, lanes = link.removeprefix("gen").split(" x")
    return lane[gen] * int(lanes) * PCIE_EFFICIENCY


def optimizer_seconds(spec: arch.ModelSpec, cfg: StepConfig, card: gpus.GpuInfo, *, trainable: int,
                      bus_bytes_per_second: float, grad_accum: int) -> float | None:
    """Seconds of one optimizer step with a lever, or None for the plain optimizers (the planner prices those).

    8-bit: AdamW's traffic over the card's bus with one-byte moments. Paged: the same, plus every paged byte moved
    to the card and back once a step (the worst case: the card short of room the whole run). CPU offload: each
    micro-batch's gradients copied to the host (torchao copies them as each is accumulated), AdamW on the CPU at
    this machine's measured copy rate, and the parameters copied back."""
    if not is_lever(cfg):
        return None
    width = 4 if cfg.weights_dtype == torch.float32 else 2
    if cfg.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        seconds = (3 * width + 4) * trainable / bus_bytes_per_second
        if cfg.optimizer == "paged_adamw_8bit":
            seconds += 2 * layout(spec, cfg).managed / (pcie_gbs(card) * 1e9)
        return seconds
    link = pcie_gbs(card) * 1e9
    offloaded = layout(spec, cfg).pinned // (4 * width)  # values offloaded
    host = gpus.host_speed().bandwidth_gbs * 1e9
    return (grad_accum * width * offloaded / link + ADAMW_WIDTHS * width * offloaded / host
            + width * offloaded / link + (trainable - offloaded) * ADAMW_WIDTHS * width / bus_bytes_per_second)


# -- what the planner asks of it ----------------------------------------------------------------------------------
def variants(knobs_list: list[dict], levers: tuple[str, ...]) -> list[dict]:
    """The knobs of full fine-tuning with each allowed lever, after the plain ones: each precision variant of
    ``knobs_list`` (16-bit weights first: they leave the most room) with each lever, 8-bit before paged before
    offloaded (the order of their cost)."""
    plain = [k for k in knobs_list if k.get("optimizer") not in LEVER_OF]
    ordered = sorted(plain, key=lambda k: not str(k.get("precision") or "").endswith("-true"))
    return [dict(k, optimizer=LEVERS[lever]) for lever in LEVERS if lever in levers for k in ordered]


def reason(cfg: StepConfig, plain_static: int, static: int, plain_speed: float, speed: float,
           host: dict[str, int]) -> str:
    """What the chosen lever bought and cost, in one line."""
    held = "; ".join(f"{fmt_bytes(v)} {k}" for k, v in host.items())
    where = f" (host RAM: {held})" if held else ""
    cost = f"{1 - speed / plain_speed:.0%} slower" if plain_speed and speed < plain_speed else "no slower"
    return (f"optimizer {cfg.optimizer}: {NAMES[cfg.optimizer]} bring the optimizer state the card's allocator "
            f"holds from {fmt_bytes(plain_static)} to {fmt_bytes(static)}{where}; a step is estimated {cost} than "
            f"with plain AdamW at the same micro-batch")


def trial_optimizer(params, optimizer: str):
    """The optimizer a probe trial on a card steps with for a lever: the library's own where it imports (so the trial
    measures its real speed), else the engine's imitation (the same memory on the card)."""
    from autofit.sim import simulate

    try:
        if optimizer == "adamw_8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=1e-4)
        if optimizer == "paged_adamw_8bit":
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(params, lr=1e-4)
        if optimizer == "adamw_cpu_offload":
            from torchao.optim import CPUOffloadOptimizer

            return CPUOffloadOptimizer(params, torch.optim.AdamW, offload_gradients=False, lr=1e-4)
    except ImportError:
        pass
    return simulate.make_optimizer(params, optimizer)


def training_optimizer(optimizer: str):
    """``(optimizer class, kwargs)`` for the Trainer's ``optimizer_cls_and_kwargs`` where ``TrainingArguments.optim``
    cannot name the optimizer (CPU offload), else None. Raises ``ConfigError`` when torchao is missing."""
    if optimizer != "adamw_cpu_offload":
        return None
    try:
        from torchao.optim import CPUOffloadOptimizer
    except ImportError:
        raise ConfigError("this plan offloads the optimizer to the CPU through torchao: pip install 'autofit[offload]' "
                          "(or plan with --no-offload)") from None
    return CPUOffloadOptimizer, {"optimizer_class": torch.optim.AdamW, "offload_gradients": False, "fused": True}


# -- activation offloading ------------------------------------------------------------------------------------------
def activation_seconds(copied: int, card: gpus.GpuInfo) -> float:
    """Seconds a micro-batch spends copying its ``copied`` bytes of saved tensors to the host and back: torch's
    ``save_on_cpu`` copies on the compute stream, so the copies add to the step rather than overlap it."""
    return 2 * copied / (pcie_gbs(card) * 1e9)


def activation_reason(seq_len: int, pinned: int, copied: int, card: gpus.GpuInfo, share: float) -> str:
    """What offloading activations bought and costs, in one line."""
    return (f"activations offloaded to host RAM (torch.autograd.graph.save_on_cpu, pinned): nothing fits at {seq_len} "
            f"tokens with them on the card; the copies hold {fmt_bytes(pinned)} of pinned host RAM and move "
            f"{fmt_bytes(copied)} each way a micro-batch over the card's link ({pcie_gbs(card):.1f} GB/s assumed), "
            f"an estimated {share:.0%} of each step; forbid with --no-offload (or allow= without 'activations')")


class _Offloading:
    """What ``offload_activations`` returns: ``remove()`` takes the hooks off again."""

    def __init__(self, handles) -> None:
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def offload_activations(model: torch.nn.Module) -> _Offloading:
    """Runs every forward of ``model`` under ``torch.autograd.graph.save_on_cpu(pin_memory=True)``, as a plan with
    ``offload_activations`` asks: the tensors its forward saves for the backward wait in pinned host RAM, and the
    backward copies each back as it needs it. The training wrapper does this; a script that trains the model itself
    calls it once before training. Returns a handle whose ``remove()`` undoes it."""
    entered: list = []

    def enter(module, args):
        context = torch.autograd.graph.save_on_cpu(pin_memory=True)
        context.__enter__()
        entered.append(context)

    def leave(module, args, output):  # always called, so an out-of-memory error in the forward leaves no hooks on
        if entered:
            entered.pop().__exit__(None, None, None)

    return _Offloading([model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True)])
