"""Several GPUs: a world of cards, what data parallelism (DDP) or sharding (FSDP2) does to each rank's memory, the
communication a step adds, and how to launch the run through accelerate.

A rank's plan is a single-card plan (``planner.plan``) of the tightest card with the rank's sizes: DDP keeps a full
replica and adds its gradient buckets and NCCL's buffers; FSDP2 ``fully_shard`` divides weights, gradients and
optimizer state by the world size and adds the unsharded copies of the layers in flight. The single-card step is
simulated; the distribution terms are named components computed from the model's parameter counts (analytic), and
``tests/test_distributed.py`` checks them against two real ranks on the gloo backend. The effective batch is
``micro-batch x accumulation x world size``, kept exactly as asked.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, replace

from autofit import gpu as gpus
from autofit.collectives import FAILED, OUT_OF_MEMORY, RAN, agree_level, agree_max  # noqa: F401 - re-exported
from autofit.errors import ConfigError, DoesNotFitError, GpuError
from autofit.units import MiB, fmt_bytes

STRATEGIES = ("ddp", "fsdp")

# -- what DDP and FSDP2 hold per rank ---------------------------------------------------------------------------------
# DDP's default bucket size (torch.nn.parallel.DistributedDataParallel's bucket_cap_mb=25, also accelerate's and
# transformers' default). With gradient_as_bucket_view=False (PyTorch's, accelerate's and the Trainer's default) the
# buckets are flat copies of every trainable gradient, allocated when the model is wrapped and kept for the whole run;
# with True the gradients are views into them, so they cost only what the single-card step had already freed.
BUCKET_CAP_MB = 25
# NCCL's own buffers live outside PyTorch's allocator. NCCL_BUFFSIZE defaults to 4 MiB per channel and peer (NCCL
# environment variables documentation); how many channels NCCL opens depends on the topology. An assumption, to be
# measured on the card: 4 channels, send and receive, to the two ring neighbours: 4 x 2 x 2 x 4 MiB = 64 MiB.
NCCL_BUFFERS = 4 * 2 * 2 * 4 * MiB
# FSDP2 keeps in flight, besides its shards: the layer running now, the next one prefetched (implicit prefetch in
# forward and backward), and in backward the current layer's unsharded gradients and its reduce-scatter input. An
# assumption that bounds FSDP2's schedule (torch.distributed.fsdp's FSDPParamGroup): IN_FLIGHT_LAYERS unsharded
# layers of parameters, plus one layer's unsharded gradients and reduce-scatter input where the layer trains.
IN_FLIGHT_LAYERS = 2
# -- communication -------------------------------------------------------------------------------------------------
# Per-direction link rates in GB/s. PCIe x16: 15.75 (3.0), 31.5 (4.0), 63.0 (5.0) (PCI-SIG: 8, 16, 32 GT/s per lane,
# 128b/130b encoding). NVLink per direction is half the bidirectional figure of NVIDIA's datasheets: V100 SXM2 300
# GB/s, A100 SXM4 600 GB/s, H100 SXM and H200 SXM 900 GB/s. GeForce cards talk over PCIe (NVLink bridges on the RTX
# 3090 are optional hardware and not assumed). x8 cards per TechPowerUp's GPU database: RTX 3050, 4060, 4060 Ti,
# 5060 Ti.
PCIE_GBS = {3: 15.75, 4: 31.5, 5: 63.0}
NVLINK_GBS = {"v100-16gb": 150.0, "v100-32gb": 150.0, "a100-40gb": 300.0, "a100-80gb": 300.0, "h100-sxm": 450.0,
              "h200": 450.0}
X8_CARDS = ("rtx3050", "rtx4060", "rtx4060ti", "rtx4060ti-16gb", "rtx5060ti")
PCIE_GENERATION = {"pascal": 3, "volta": 3, "turing": 3, "ampere": 4, "ada": 4, "hopper": 5, "blackwell": 5}
# An assumption: collectives reach LINK_EFFICIENCY of the link's rate (NCCL's bus bandwidth over the raw rate); a
# probe on the cards measures the step instead. Nodes are assumed joined by a 100 Gb/s network (12.5 GB/s).
LINK_EFFICIENCY = 0.7
INTER_NODE_GBS = 12.5
# Ranks on one machine's CPUs (a CPU world, for runs and tests without GPUs) talk through gloo over loopback TCP. Its
# all-reduce between two ranks on a 2-core machine reached 1.4-1.6 GB/s of bus bandwidth for 16-64 MiB of fp32, less
# for small tensors (``python benchmarks/gloo_loopback.py``, benchmarks/results/cpu-2026-12-06/gloo_loopback.txt); the
# link's rate is this over LINK_EFFICIENCY, so that the model's collectives run at the measured rate.
LOOPBACK_BUS_GBS = 1.5
# DDP all-reduces each bucket as soon as its gradients are ready, so communication hides behind the rest of the last
# micro-batch's backward (accumulation steps run under no_sync); FSDP2's all-gathers and reduce-scatters overlap the
# micro-batch's compute. What does not fit behind compute adds to the step.
BACKWARD_SHARE = 2 / 3  # of a micro-batch's compute: backward is twice the forward's FLOPs (Kaplan et al. 2020)


@dataclass(frozen=True, kw_only=True, slots=True)
class Link:
    """How the ranks talk: the kind of link and its per-direction rate in GB/s (10**9 B/s)."""

    kind: str  # "nvlink", "pcie" or "network"
    gbs: float
    source: str


@dataclass(frozen=True, kw_only=True, slots=True)
class World:
    """The cards of a run, one rank per card, on ``nodes`` machines of ``len(cards) // nodes`` cards each."""

    cards: tuple[gpus.GpuInfo, ...]
    nodes: int = 1

    def __post_init__(self) -> None:
        if not self.cards:
            raise GpuError("a world needs at least one card")
        if not isinstance(self.nodes, int) or isinstance(self.nodes, bool) or self.nodes < 1:
            raise GpuError(f"nodes must be a whole number >= 1; got {self.nodes!r}")
        if len(self.cards) % self.nodes:
            raise GpuError(f"{len(self.cards)} cards do not split evenly over {self.nodes} nodes; give the same "
                           "number of cards on each node")

    @property
    def size(self) -> int:
        return len(self.cards)

    @property
    def per_node(self) -> int:
        return self.size // self.nodes

    @property
    def on_cpu(self) -> bool:
        """Ranks on this machine's CPUs (gloo), not GPUs."""
        return self.cards[0].source == "host"

    def tightest(self, margin: float | None = None) -> gpus.GpuInfo:
        """The card with the smallest budget: every rank runs the same step, so it bounds them all."""
        from autofit import planner

        return min(self.cards, key=lambda c: planner.budget(c, margin))

    @property
    def link(self) -> Link:
        """The slowest link a ring collective crosses."""
        if self.nodes > 1:
            return Link(kind="network", gbs=INTER_NODE_GBS, source="assumed 100 Gb/s between nodes")
        links = [card_link(c) for c in self.cards]
        return min(links, key=lambda link: link.gbs)

    @property
    def name(self) -> str:
        names = {c.name for c in self.cards}
        node = f" on {self.nodes} nodes" if self.nodes > 1 else ""
        if len(names) == 1:
            return f"{self.size}x {self.cards[0].name}{node}"
        return " + ".join(c.name for c in self.cards) + node


def card_link(card: gpus.GpuInfo) -> Link:
    """The link ``card`` talks to its peers over on one machine (see ``PCIE_GBS`` and ``NVLINK_GBS``; a CPU rank:
    ``LOOPBACK_BUS_GBS``)."""
    if card.source == "host":
        return Link(kind="loopback", gbs=LOOPBACK_BUS_GBS / LINK_EFFICIENCY,
                    source=f"gloo over loopback, {LOOPBACK_BUS_GBS:g} GB/s measured on 2 cores")
    if card.key in NVLINK_GBS:
        return Link(kind="nvlink", gbs=NVLINK_GBS[card.key], source=f"NVLink of the {card.name} (NVIDIA datasheet)")
    generation = PCIE_GENERATION.get(card.family, 3)
    lanes = 8 if card.key in X8_CARDS else 16
    rate = PCIE_GBS[generation] * lanes / 16
    return Link(kind="pcie", gbs=rate, source=f"PCIe {generation}.0 x{lanes}")


# -- naming several cards ---------------------------------------------------------------------------------------------
_COUNT = re.compile(r"\s*(\d+)\s*[x\u00d7*]\s*(.+)", re.IGNORECASE)


def several(gpu, gpus_count: int | None = None) -> bool:
    """Whether ``gpu`` (and ``--gpus``) name more than one card: ``"2x rtx3080-20gb"``, a list, or a count above 1."""
    if gpus_count is not None:
        return True
    if isinstance(gpu, (list, tuple)):
        return True
    if isinstance(gpu, World):
        return True
    return isinstance(gpu, str) and (_COUNT.fullmatch(gpu) is not None or "," in gpu or "+" in gpu)


def world(gpu=None, gpus_count: int | None = None, *, nodes: int = 1) -> World:
    """The cards ``gpu`` names, as a ``World``. Raises ``GpuError`` with one line.

    - ``"2x rtx3080-20gb"`` (also ``2*...``): a count and a kind, as ``gpu="rtx3080-20gb", gpus_count=2``.
    - ``"rtx3090,rtx3080-20gb"`` or ``"rtx3090+rtx3080"``, or a list of specs or ``GpuInfo``: those cards.
    - None: every detected card (``gpus_count`` of them when given).
    ``nodes``: machines with the same cards each; a world of ``nodes x cards per node``, planned on paper.
    """
    if isinstance(gpu, World):
        return gpu
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise GpuError(f"nodes must be a whole number of machines >= 1; got {nodes!r}")
    if gpus_count is not None and (isinstance(gpus_count, bool) or not isinstance(gpus_count, int) or gpus_count < 1):
        raise GpuError(f"--gpus must be a whole number of cards >= 1; got {gpus_count!r}")
    if isinstance(gpu, str) and (match := _COUNT.fullmatch(gpu)):
        count = int(match.group(1))
        if gpus_count is not None and gpus_count != count:
            raise GpuError(f"--gpus {gpus_count} and --gpu {gpu!r} disagree on the number of cards; give one of them")
        if count < 1:
            raise GpuError(f"{gpu!r} names no card; write 2x rtx3080-20gb for two")
        gpu, gpus_count = match.group(2).strip(), count
    if isinstance(gpu, str) and ("," in gpu or "+" in gpu):
        gpu = [part for part in re.split(r"[,+]", gpu)]
    if isinstance(gpu, (list, tuple)):
        if not gpu:
            raise GpuError("an empty list of GPUs; name at least one card, e.g. gpu=['rtx3090', 'rtx3090']")
        if any(isinstance(g, str) and not g.strip() for g in gpu):
            raise GpuError(f"an empty card name in {gpu!r}; write cards as rtx3090,rtx3080-20gb")
        cards = tuple(gpus.resolve(g.strip() if isinstance(g, str) else g) for g in gpu)
        if gpus_count is not None and gpus_count != len(cards):
            raise GpuError(f"--gpus {gpus_count} and the {len(cards)} cards named disagree; give one of them")
        if any(c.source == "host" for c in cards) and not all(c.source == "host" for c in cards):
            raise GpuError("the CPU and GPUs cannot be ranks of one world; name GPUs (e.g. 2x rtx3060), or "
                           "--gpus N --gpu cpu for N ranks on this machine's CPUs")
        return World(cards=cards * nodes if nodes > 1 else cards, nodes=nodes)
    if gpu is None or (isinstance(gpu, str) and gpu.strip().lower() == "cuda"):
        found = gpus.detect()
        if not found:
            if gpus_count is None:
                raise GpuError("no CUDA GPU detected; name the cards you plan for, e.g. gpu='2x rtx3080-20gb' or "
                               "--gpus 2 --gpu rtx3080-20gb")
            raise GpuError(f"--gpus {gpus_count} without --gpu needs {gpus_count} detected cards and none is here; "
                           f"name the kind: --gpus {gpus_count} --gpu rtx3080-20gb (or --gpu cpu for ranks on this "
                           "machine's CPUs)")
        if gpus_count is not None:
            if gpus_count > len(found):
                raise GpuError(f"--gpus {gpus_count} but {len(found)} CUDA card(s) are visible; pass --gpus "
                               f"{len(found)} or name the kind (--gpu rtx3080-20gb) to plan on paper")
            found = found[:gpus_count]
        return World(cards=tuple(found) * nodes if nodes > 1 else tuple(found), nodes=nodes)
    card = gpus.resolve(gpu)
    count = gpus_count or 1
    if card.source == "host":
        if nodes > 1:
            raise GpuError("ranks on the CPU are planned for this machine only; leave --nodes out with --gpu cpu")
        return cpu_world(count)
    return World(cards=(card,) * count * nodes, nodes=nodes)


def cpu_world(ranks: int) -> World:
    """``ranks`` processes on this machine's CPUs (gloo): each rank a share of the host, ``1/ranks`` of its RAM, since
    every rank holds its own replica. What ``autofit train --gpus N`` runs where no GPU is."""
    host = gpus.host_memory()
    share = replace(host, name=f"CPU rank (1/{ranks} of host memory)", total_bytes=host.total_bytes // ranks,
                    free_bytes=host.free_bytes // ranks, used_by_others_bytes=host.used_by_others_bytes // ranks)
    return World(cards=(share,) * ranks)


# -- per-rank memory --------------------------------------------------------------------------------------------------
def bucket_bytes(gradient_sizes: list[int], bucket_cap_mb: float = BUCKET_CAP_MB) -> int:
    """Bytes of DDP's gradient buckets for trainable gradients of ``gradient_sizes`` bytes each: every bucket is a flat
    tensor of its gradients (each bucket holds at least one gradient; a gradient is never split), and the caching
    allocator rounds each bucket to 512 bytes. The sum is the gradients' total, rounded once per bucket."""
    from autofit.sim.tracker import round_bytes

    cap = bucket_cap_mb * MiB
    buckets, current = [], 0
    for size in reversed(gradient_sizes):  # DDP fills buckets in reverse order of registration (backward order)
        if current and current + size > cap:
            buckets.append(current)
            current = 0
        current += size
    if current:
        buckets.append(current)
    return sum(round_bytes(b) for b in buckets)


def ddp_extra(gradient_bytes: int, gradients_at_peak: int, *, gradient_as_bucket_view: bool = False) -> int:
    """Bytes DDP adds to a rank's peak over the single-card step: the buckets. As copies, all of them; as the
    gradients' own storage, what the single-card step had not yet allocated (or had freed) at its peak."""
    if gradient_as_bucket_view:
        return max(0, gradient_bytes - gradients_at_peak)
    return gradient_bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class FsdpShape:
    """What FSDP2 shards, per unit it wraps: bytes of one decoder layer's parameters as gathered (the compute dtype)
    and of its trainable gradients as reduced, and the root's (embeddings, head, final norm) gathered bytes."""

    layer_gathered: int
    layer_grad: int
    root_gathered: int


def fsdp_extra(shape: FsdpShape) -> int:
    """Bytes of unsharded tensors FSDP2 holds at a rank's peak: the root's parameters (the root is not resharded
    between forward and backward), ``IN_FLIGHT_LAYERS`` gathered layers, and one layer's unsharded gradients and
    reduce-scatter input."""
    return shape.root_gathered + IN_FLIGHT_LAYERS * shape.layer_gathered + 2 * shape.layer_grad


def fsdp_shape(spec, cfg) -> FsdpShape:
    """``FsdpShape`` of ``spec`` trained as ``cfg``: parameters gathered in the run's 16-bit dtype under mixed
    precision (accelerate's FSDP2 mixed-precision policy casts them before the all-gather), fp32 in a 32-true run;
    gradients reduced in the trainable parameters' dtype."""
    from autofit import model as models

    gathered = 4 if cfg.precision == "32-true" else 2
    if cfg.method == "full":
        layer_trainable = spec.layer_params
    else:  # the adapters, spread evenly over the layers
        layer_trainable = models.count_params(spec, method=cfg.method, quantization=cfg.quantization, half=cfg.half,
                                              lora_r=cfg.lora_r, lora_targets=cfg.lora_targets).trainable
        layer_trainable //= spec.num_layers
    return FsdpShape(layer_gathered=gathered * spec.layer_params, layer_grad=grad_width(cfg) * layer_trainable,
                     root_gathered=gathered * spec.non_layer_params)


def grad_width(cfg) -> int:
    """Bytes per trainable gradient: 2 where full fine-tuning trains 16-bit weights, else 4 (fp32 master weights,
    peft's fp32 adapters)."""
    return 2 if cfg.method == "full" and cfg.precision in ("bf16-true", "16-true") else 4


# -- the plan -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, slots=True)
class WorldPlan:
    """A plan for several cards: the rank's single-card plan (``rank``: micro-batch, accumulation, method, ...) on the
    tightest card, the strategy, per-rank memory by named part, and the step's communication.

    Attributes the rank plan has (``batch_size``, ``grad_accum``, ``seq_len``, ``method``...) read through; the
    ``effective_batch`` here is the world's: ``batch_size x grad_accum x world size``.
    """

    rank: object  # planner.Plan of one rank (its effective_batch is the rank's share)
    world: World
    strategy: str  # "ddp" or "fsdp"
    effective_batch: int
    rank_parts: dict  # name -> bytes of one rank at its peak; the sum is rank_need
    rank_need: int
    rank_budget: int
    memory_source: str
    comm_bytes: int  # per optimizer step, per rank, sent over the link
    comm_seconds: float  # communication that does not hide behind compute, per optimizer step
    step_seconds: float
    tokens_per_second: float  # of the whole world
    reasons: tuple[str, ...]
    bucket_cap_mb: int = BUCKET_CAP_MB
    gradient_as_bucket_view: bool = False
    layer_class: str | None = None
    host_load_bytes: int = 0  # host RAM one machine needs while its ranks load the model (see ``host_load``)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        if self.rank.batch_size * self.rank.grad_accum * self.world.size != self.effective_batch:
            raise ConfigError(f"batch_size x grad_accum x world size must equal effective_batch "
                              f"({self.rank.batch_size} x {self.rank.grad_accum} x {self.world.size} != "
                              f"{self.effective_batch})")

    def __getattr__(self, name: str):
        if name.startswith("_") or name == "rank":
            raise AttributeError(name)
        return getattr(self.rank, name)

    @property
    def world_size(self) -> int:
        return self.world.size

    @property
    def headroom_bytes(self) -> int:
        return self.rank_budget - self.rank_need

    # -- launching --------------------------------------------------------------------------------------------------
    def accelerate_config(self) -> str:
        """The content of an accelerate config file (YAML) for this plan: pass it as ``--config_file``."""
        mixed = {"bf16-mixed": "bf16", "16-mixed": "fp16"}.get(self.rank.precision, "no")
        lines = []
        if self.world.on_cpu:
            lines += ["# ranks on the CPU: accelerate starts several local processes only through torchrun, its",
                      "# multi-GPU launcher; the Trainer's use_cpu=True then joins them over gloo"]
        lines += ["compute_environment: LOCAL_MACHINE",
                 f"distributed_type: {'FSDP' if self.strategy == 'fsdp' else 'MULTI_GPU'}",
                 "downcast_bf16: 'no'",
                 "machine_rank: 0",
                 "main_training_function: main",
                 f"mixed_precision: '{mixed}'",  # quoted: YAML reads a bare no as false
                 f"num_machines: {self.world.nodes}",
                 f"num_processes: {self.world.size}",
                 "rdzv_backend: static",
                 "same_network: true",
                 "use_cpu: false"]
        if self.world.nodes > 1:
            lines += ["main_process_ip: MAIN_NODE_IP  # the first node's address", "main_process_port: 29500"]
        if self.strategy == "fsdp":
            lines += ["fsdp_config:",
                      f"  fsdp_activation_checkpointing: {str(self.rank.gradient_checkpointing).lower()}",
                      "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP",
                      "  fsdp_cpu_ram_efficient_loading: true",
                      "  fsdp_offload_params: false",
                      "  fsdp_reshard_after_forward: true",
                      "  fsdp_state_dict_type: SHARDED_STATE_DICT",
                      f"  fsdp_transformer_layer_cls_to_wrap: {self.layer_class}",
                      "  fsdp_version: 2"]
        return "\n".join(lines) + "\n"

    def launch_command(self, script: str = "train.py", config_file: str = "accelerate.yaml") -> str:
        """The ``accelerate launch`` command line that starts ``script`` on every rank with this plan's config."""
        parts = ["accelerate", "launch", "--config_file", config_file, "--num_processes", str(self.world.size)]
        if self.strategy == "ddp":
            parts.append("--multi_gpu")
        if self.world.nodes > 1:
            parts += ["--num_machines", str(self.world.nodes), "--machine_rank", "RANK_OF_THIS_NODE"]
        return " ".join(shlex.quote(p) if p not in ("RANK_OF_THIS_NODE",) else p for p in parts + [script])

    def to_json(self) -> str:
        """The plan as JSON text that ``read_plan`` (``autofit train --plan``) reads back equal."""
        import json

        return json.dumps(json.loads(plan_to_text(self)), indent=2)

    def training_arguments(self, output_dir: str = "out", **overrides):
        """``transformers.TrainingArguments`` for every rank (the per-device batch and accumulation of the rank
        plan, DDP's bucket size or FSDP2's settings); ``overrides`` win. Raises ``ConfigError``."""
        extra: dict = {}
        if self.strategy == "ddp":
            extra.update(ddp_bucket_cap_mb=self.bucket_cap_mb, ddp_find_unused_parameters=False)
        else:
            extra.update(fsdp=True,
                         fsdp_config={"version": 2, "reshard_after_forward": True,
                                      "transformer_layer_cls_to_wrap": [self.layer_class],
                                      "activation_checkpointing": self.rank.gradient_checkpointing})
            # FSDP checkpoints the wrapped layers itself; the model's own checkpointing would do it twice
            extra["gradient_checkpointing"] = False
        extra.update(overrides)
        return self.rank.training_arguments(output_dir, **extra)

    # -- presentation -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dict(world=[c.name for c in self.world.cards], nodes=self.world.nodes, strategy=self.strategy,
                    effective_batch=self.effective_batch, batch_size=self.rank.batch_size,
                    grad_accum=self.rank.grad_accum, seq_len=self.rank.seq_len, rank_parts=dict(self.rank_parts),
                    rank_need=self.rank_need, rank_budget=self.rank_budget, memory_source=self.memory_source,
                    comm_bytes=self.comm_bytes, comm_seconds=self.comm_seconds, step_seconds=self.step_seconds,
                    tokens_per_second=self.tokens_per_second, host_load_bytes=self.host_load_bytes,
                    link=self.world.link.kind,
                    link_gbs=self.world.link.gbs, reasons=list(self.reasons),
                    accelerate_config=self.accelerate_config(), launch_command=self.launch_command(),
                    rank_plan=self.rank.to_dict())

    def summary(self) -> str:
        r = self.rank
        link = self.world.link
        strategy = ("DDP (a full replica per rank, gradients all-reduced in "
                    f"{self.bucket_cap_mb} MiB buckets)" if self.strategy == "ddp" else
                    "FSDP2 fully_shard (weights, gradients and optimizer state sharded over the ranks)")
        method = {"full": "full fine-tuning", "lora": f"LoRA r={r.lora_r}",
                  "qlora": f"QLoRA r={r.lora_r} ({r.quantization})"}[r.method]
        unit = "CPU rank" if self.world.on_cpu else "GPU"  # what a rank runs on
        lines = [
            f"plan for {r.model_name} on {self.world.name} ({r.source})",
            f"  strategy             {strategy}",
            f"  method               {method}",
            f"  {'per-' + unit + ' micro-batch':<21}{r.batch_size} x {r.seq_len} tokens",
            f"  accumulation         {r.grad_accum} (effective batch {r.batch_size} x {r.grad_accum} x "
            f"{self.world.size} {unit}s = {self.effective_batch})",
            f"  checkpointing        {'on' if r.gradient_checkpointing else 'off'}",
            f"  precision            {r.precision}",
            f"  est. throughput      {self.tokens_per_second:,.0f} tokens/s over {self.world.size} {unit}s "
            f"(step {self.step_seconds:.2f}s, of which {self.comm_seconds:.2f}s communication not hidden)",
            f"  communication        {fmt_bytes(self.comm_bytes)} per rank per step over {link.kind} "
            f"({link.gbs:g} GB/s per direction, {link.source})",
            f"  {'memory per ' + unit:<21}needs {fmt_bytes(self.rank_need)} of a {fmt_bytes(self.rank_budget)} budget "
            f"({fmt_bytes(self.headroom_bytes)} headroom) on the tightest card",
            f"    ({self.memory_source})",
        ]
        width = max(len(k) for k in self.rank_parts)
        lines += [f"    {k:<{width}}  {fmt_bytes(v):>11}" for k, v in self.rank_parts.items()]
        lines.append(f"  host RAM             {fmt_bytes(self.host_load_bytes)} per machine while loading "
                     + ("(each rank materialises its own copy)" if self.strategy == "ddp" else
                        "(rank 0 loads, the others start on the meta device: fsdp_cpu_ram_efficient_loading)"))
        lines.append("  why:")
        lines += [f"    - {x}" for x in self.reasons]
        lines.append("  launch:")
        lines.append("    autofit writes accelerate.yaml with plan.accelerate_config(); then")
        lines.append(f"    {self.launch_command()}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# -- planning ---------------------------------------------------------------------------------------------------------
def _strength(rank) -> tuple:
    """Higher is a stronger training setup: full over LoRA over QLoRA, fp32 master weights over 16-bit ones."""
    method = {"full": 2, "lora": 1, "qlora": 0}[rank.method]
    return method, 0 if rank.precision.endswith("-true") and rank.precision != "32-true" else 1


def plan(model, gpu=None, *, gpus_count: int | None = None, nodes: int = 1, strategy: str = "auto",
         effective_batch: int | str | None = None, margin: float | None = None,
         gradient_as_bucket_view: bool = False, **kwargs):
    """The fastest plan for ``model`` on one card or several (see ``world`` for what ``gpu``/``gpus_count`` take):
    ``autofit.plan``. One card (no count, one spec): ``planner.plan``'s ``Plan``, with ``kwargs`` passed on. ``gpu``
    left out where several cards are visible: all of them. Where the cards are this machine's, DDP gives way to FSDP2
    when its copies of the model would not load in the RAM available.

    In a script started on several ranks (``torchrun``, ``accelerate launch``: an initialised process group, or the
    launcher's ``WORLD_SIZE`` above 1) the world is the launcher's ranks: rank 0 plans, every rank gets its plan (see
    ``plan_on_every_rank``).
    """
    launch = launched()
    if launch is not None:
        return plan_on_every_rank(launch, model, gpu, gpus_count=gpus_count, nodes=nodes, strategy=strategy,
                                  effective_batch=effective_batch, margin=margin,
                                  gradient_as_bucket_view=gradient_as_bucket_view, **kwargs)
    return _plan(model, gpu, gpus_count=gpus_count, nodes=nodes, strategy=strategy, effective_batch=effective_batch,
                 margin=margin, gradient_as_bucket_view=gradient_as_bucket_view, **kwargs)


def _plan(model, gpu=None, *, gpus_count: int | None = None, nodes: int = 1, strategy: str = "auto",
          effective_batch: int | str | None = None, margin: float | None = None,
          gradient_as_bucket_view: bool = False, **kwargs):
    """``plan`` in this process alone; see ``plan``.

    ``strategy``: "ddp", "fsdp" or "auto" (the stronger training setup, full fine-tuning with fp32 master weights
    first, then the faster). ``effective_batch``: the world's, kept exactly (it must divide by the world size); None
    is the single-card default (16) rounded up to a multiple of the world size; "max" gives each rank the largest
    micro-batch its card fits. Other keywords go to ``planner.plan`` for the rank. Raises
    ``DoesNotFitError`` when no strategy fits, ``ConfigError``/``GpuError`` for bad input.
    """
    from autofit import model as models
    from autofit import planner

    if gpu is None and gpus_count is None and len(gpus.detect()) > 1:
        gpu = "cuda"  # every visible card
    elif not several(gpu, gpus_count) and nodes == 1:
        if strategy not in ("auto",) + STRATEGIES:
            raise ConfigError(f"strategy must be auto, ddp or fsdp; got {strategy!r}")
        return planner.plan(model, gpu, effective_batch=effective_batch, margin=margin, **kwargs)
    w = world(gpu, gpus_count, nodes=nodes)
    if strategy not in ("auto",) + STRATEGIES:
        raise ConfigError(f"strategy must be auto, ddp or fsdp; got {strategy!r}")
    rank_batch, default_note = effective_batch, None
    unit = "CPU rank" if w.on_cpu else "GPU"
    if effective_batch is None:  # the single-card default, spread over the ranks
        effective_batch = -(-planner.DEFAULT_EFFECTIVE_BATCH // w.size) * w.size
        default_note = (f"effective batch {effective_batch}: the default ({planner.DEFAULT_EFFECTIVE_BATCH}, a "
                        f"multiple of {w.size} {unit}s), {effective_batch // w.size} per {unit}; pass "
                        f"effective_batch=N (a multiple of {w.size}) to change it")
    if isinstance(effective_batch, int) and not isinstance(effective_batch, bool):
        if effective_batch < w.size or effective_batch % w.size:
            nearest = max(1, effective_batch // w.size) * w.size
            raise ConfigError(f"effective_batch {effective_batch} does not divide over {w.size} {unit}s; pick a "
                              f"multiple of {w.size} (e.g. effective_batch={nearest})")
        rank_batch = effective_batch // w.size
    reserved = kwargs.pop("reserved_by_others", None)
    if reserved is not None:  # what other processes hold, on every card of the world
        held = planner._byte_count(reserved, "reserved_by_others")
        w = replace(w, cards=tuple(gpus.with_reserved_by_others(c, held) for c in w.cards))
    spec = models.resolve(model)
    kwargs.pop("probe", None)  # probing several ranks needs them all: planned from the estimate here
    if w.on_cpu and strategy == "fsdp":
        raise ConfigError("FSDP2 is planned for GPUs; ranks on the CPU run DDP (--strategy ddp, or leave it out)")
    tried, failures = [], []
    for s in (STRATEGIES if strategy == "auto" and not w.on_cpu else ("ddp",) if w.on_cpu else (strategy,)):
        try:
            tried.append(_plan_strategy(spec, w, s, rank_batch, margin, gradient_as_bucket_view, kwargs))
        except DoesNotFitError as err:
            failures.append(str(err))
    if not tried:
        raise DoesNotFitError(f"{spec.name} does not fit {w.name}: " + "; ".join(failures))
    tried, failures = _loadable(tried, failures, w)
    best = max(tried, key=lambda p: (_strength(p.rank), p.tokens_per_second))
    reasons = ([default_note] if default_note else []) + list(best.reasons)
    for other in tried:
        if other is not best:
            why = ("a stronger setup" if _strength(best.rank) > _strength(other.rank) else "faster")
            reasons.append(f"{best.strategy.upper()} over {other.strategy.upper()}: {why} ({other.strategy.upper()} "
                           f"would train {other.rank.method} in {other.rank.precision} at micro-batch "
                           f"{other.rank.batch_size}, {other.tokens_per_second:,.0f} tokens/s)")
    reasons += [f"ruled out: {f}" for f in failures]
    # the rank plan's own reasons; under FSDP its figures are a replica's, before sharding
    label = ("per CPU rank" if w.on_cpu else "per GPU") + ("" if best.strategy == "ddp" else ", figures before sharding")
    reasons += [f"{label}: {r}" for r in best.rank.reasons if not r.startswith("effective batch ")]
    return replace(best, reasons=tuple(reasons))


def _loadable(tried: list, failures: list, w: World) -> tuple[list, list]:
    """The plans whose loading fits this machine's RAM, where the cards are this machine's: DDP, whose ranks each
    materialise a copy of the model, is ruled out when those copies outgrow the RAM available now and FSDP2 (rank 0
    loads, the others start on the meta device) is there to take its place. On cards named on paper the RAM is not
    known; each plan says what it needs."""
    if not all(c.source in ("nvml", "torch") for c in w.cards):
        return tried, failures
    available = gpus.host_memory().free_bytes
    kept = [p for p in tried if p.strategy != "ddp" or p.host_load_bytes <= available]
    if not kept or len(kept) == len(tried):
        return tried, failures
    dropped = [p for p in tried if all(p is not k for k in kept)]
    return kept, failures + [f"DDP: its {w.per_node} copies of the model while loading need "
                             f"{fmt_bytes(p.host_load_bytes)} of host RAM, {fmt_bytes(available)} available now"
                             for p in dropped]


_STRATEGY_NEEDS = {"ddp": "a whole replica and its gradient buckets per rank",
                   "fsdp": "a shard per rank and the layers gathered in flight"}


def host_load(spec, rank_plan, w: World, strategy: str) -> int:
    """Bytes of host RAM one machine needs while its ranks load the model: the weights as loaded (fp32 where full
    fine-tuning keeps fp32 master weights, else 16-bit) once per rank under DDP, where every rank materialises its copy
    before moving it to its card; once per machine under FSDP2 with ``fsdp_cpu_ram_efficient_loading`` (rank 0
    loads, the other ranks build on the meta device and receive their shards)."""
    cfg = rank_plan.step_config
    width = 4 if cfg.method == "full" and cfg.precision in ("bf16-mixed", "16-mixed", "32-true") else 2
    copies = w.per_node if strategy == "ddp" else 1
    return copies * width * spec.total_params


def _layer_class(spec) -> str:
    """The class name of the model's decoder layers (what FSDP wraps one unit at a time)."""
    from autofit.sim import simulate

    layers = simulate.decoder_layers(simulate.build_model(spec, simulate.StepConfig(device="cpu"), 1))
    return type(layers[0]).__name__


def _plan_strategy(spec, w: World, strategy: str, rank_batch, margin, bucket_view: bool, kwargs) -> WorldPlan:
    """One strategy's plan: the single-card planner on the tightest card, its budget moved by what the strategy adds
    or removes per rank, settled until the rank's need fits the real budget."""
    from autofit import planner

    if strategy == "fsdp":
        kwargs = _fsdp_options(kwargs)
    card = w.tightest(margin)
    real_budget = planner.budget(card, margin)
    # bytes the rank plan's card gets (FSDP: what sharding saves) or loses (DDP: the buckets), beyond NCCL's buffers;
    # first from the strongest setup the method allows, then settled on the plan made
    shift = _first_shift(spec, card, w, strategy, bucket_view, kwargs)
    share = margin if margin is not None else planner.DEFAULT_MARGIN
    rank_plan, parts = None, None
    # fp32 master weights first where the card has bf16 and nothing else was asked: what sharding makes room for
    asks = [kwargs]
    if kwargs.get("precision") is None and (kwargs.get("method") or "auto") in ("auto", "full") and card.bf16:
        asks.insert(0, dict(kwargs, method="full", precision="bf16-mixed"))
    for _ in range(5):
        delta = shift - (NCCL_BUFFERS if w.size > 1 and not w.on_cpu else 0)
        virtual = _shifted(card, delta, share)
        try:
            rank_plan = planner.plan(spec, virtual, effective_batch=rank_batch, margin=margin, probe=False, **asks[0])
        except DoesNotFitError as err:
            if len(asks) > 1:  # the precision asked first does not fit: the planner's own choice, from scratch
                asks.pop(0)
                shift = _first_shift(spec, card, w, strategy, bucket_view, dict(asks[0], precision="bf16-true")
                                     if card.bf16 and strategy == "ddp" else asks[0])
                continue
            raise DoesNotFitError(f"{strategy.upper()} ({_STRATEGY_NEEDS[strategy]}): "
                                  + str(err).replace(virtual.name, card.name),
                                  binding=err.binding, ways_out=err.ways_out) from None
        parts = _rank_parts(spec, rank_plan, w, strategy, bucket_view)
        need = sum(parts.values())
        if need <= real_budget:
            break
        # the settled plan needs more than the shifted card promised: move the shift by the difference and plan again
        shift -= need - real_budget
    else:
        raise DoesNotFitError(f"{spec.name} with {strategy.upper()} does not settle under {card.name}'s "
                              f"{fmt_bytes(real_budget)} budget per rank")
    if strategy == "fsdp" and rank_plan.method == "qlora":
        # bitsandbytes' packed 4-bit weights shard only with a matching quant_storage dtype; not planned here
        raise DoesNotFitError("FSDP: QLoRA's 4-bit weights are not planned under FSDP2 (DDP runs them)")
    rank_plan = replace(rank_plan, gpu=card, budget_bytes=real_budget,
                        reasons=tuple(_rank_reasons(rank_plan.reasons, virtual, card)))
    comm, exposed, step = _communication(spec, rank_plan, w, strategy)
    tokens = rank_plan.batch_size * rank_plan.grad_accum * rank_plan.seq_len * w.size
    reasons = [f"{w.size} ranks on {w.name}; the tightest card ({card.name}, {fmt_bytes(real_budget)} budget) "
               "bounds every rank",
               f"headroom {fmt_bytes(real_budget - sum(parts.values()))} per rank "
               f"({(real_budget - sum(parts.values())) / real_budget:.0%} of the budget)"]
    if strategy == "ddp":
        reasons.append(f"DDP: each rank holds the whole model; gradient buckets of {BUCKET_CAP_MB} MiB "
                       + ("as the gradients' own storage (gradient_as_bucket_view=True)" if bucket_view else
                          "copy every gradient (gradient_as_bucket_view=False, as the Trainer runs; True would save "
                          f"up to {fmt_bytes(parts['DDP gradient buckets'])} per rank in a script of your own)"))
    else:
        reasons.append(f"FSDP2: weights, gradients and optimizer state divided over {w.size} ranks; the root "
                       f"(embeddings, head) and {IN_FLIGHT_LAYERS} layers gathered at a time")
    if w.on_cpu:
        reasons.append(f"ranks on the CPU share its cores: each runs at 1/{w.size} of the rate this machine was "
                       "measured at, so they train no faster than one process; a way to run and test the launch where "
                       "no GPU is")
    host = host_load(spec, rank_plan, w, strategy)
    detected = all(c.source in ("nvml", "torch", "host") for c in w.cards)
    if detected:  # the cards are here, so this machine is the one that loads
        available = gpus.host_memory().free_bytes
        reasons.append(f"host RAM while loading: {fmt_bytes(host)} of the {fmt_bytes(available)} available now"
                       + ("" if host <= available else "; too little: FSDP loads on rank 0 only (--strategy fsdp)"
                          if strategy == "ddp" else "; too little: free RAM or add swap before launching"))
    else:
        reasons.append(f"host RAM while loading: {fmt_bytes(host)} per machine "
                       + (f"({w.per_node} ranks, a copy each)" if strategy == "ddp" else "(rank 0 loads)"))
    source = ("single-card step simulated; DDP's buckets" + ("" if w.on_cpu else " and NCCL's buffers")
              + " added by named components (analytic)"
              if strategy == "ddp" else
              "single-card step simulated; sharding and gathered layers by named components (analytic)")
    return WorldPlan(rank=rank_plan, world=w, strategy=strategy,
                     effective_batch=rank_plan.effective_batch * w.size, rank_parts=parts,
                     rank_need=sum(parts.values()),
                     rank_budget=real_budget, memory_source=source, comm_bytes=comm, comm_seconds=exposed,
                     step_seconds=step, tokens_per_second=tokens / step, reasons=tuple(reasons),
                     gradient_as_bucket_view=bucket_view, host_load_bytes=host,
                     layer_class=_layer_class(spec) if strategy == "fsdp" else None)


def _fsdp_options(kwargs: dict) -> dict:
    """The planner's options under FSDP2: no optimizer lever. bitsandbytes' 8-bit and paged optimizers allocate their
    state like the parameter and hand DTensor shards to their kernels, which FSDP2 breaks (bitsandbytes issues #89,
    "8-bit optimizers dont work with FSDP", and #1633, an illegal memory access under FSDP2, both open); torchao's
    CPUOffloadOptimizer is not planned over shards either (FSDP2's own CPUOffloadPolicy is the engine for that).
    Activation offloading stays as allowed."""
    from autofit import offload

    if kwargs.get("optimizer") in offload.LEVER_OF:
        raise DoesNotFitError(f"FSDP: the optimizer {kwargs['optimizer']} is not planned over FSDP2's shards "
                              "(bitsandbytes' 8-bit optimizers do not run on them); DDP runs it")
    names = offload.allowed(kwargs.get("allow"), no_offload=bool(kwargs.get("no_offload")))
    return dict(kwargs, allow=tuple(n for n in names if n not in offload.LEVERS))


def _first_shift(spec, card, w: World, strategy: str, bucket_view: bool, kwargs) -> int:
    """The budget a rank gains (FSDP) or loses (DDP) for the strongest setup ``kwargs`` allow (full fine-tuning with
    the asked or default precision when the method is auto): a first guess the settling corrects."""
    from autofit import memory, planner

    if w.size == 1:
        return 0
    method = kwargs.get("method") or "auto"
    method = "full" if method == "auto" else method
    base = memory.step_config(card, method=method, precision=kwargs.get("precision"),
                              quantization=kwargs.get("quantization"), gradient_checkpointing=False)
    if strategy == "ddp":
        return 0 if bucket_view else -grad_width(base) * planner._trainable(spec, base)
    return planner._static_bytes(spec, base) * (w.size - 1) // w.size - fsdp_extra(fsdp_shape(spec, base))


def _shifted(card: gpus.GpuInfo, delta: int, margin: float) -> gpus.GpuInfo:
    """``card`` with ``delta`` more bytes of budget (fewer when negative): its memory grows by ``delta / (1 -
    margin)`` so that the planner's margin, a share of the card, leaves exactly ``delta`` more."""
    grow = int(math.ceil(delta / (1 - margin))) if delta > 0 else 0
    if delta > 0:
        return replace(card, total_bytes=card.total_bytes + grow, free_bytes=card.free_bytes + grow)
    if delta < 0:
        return gpus.with_reserved_by_others(card, card.used_by_others_bytes - delta)
    return card


def _rank_reasons(reasons, virtual: gpus.GpuInfo, card: gpus.GpuInfo) -> list[str]:
    """The rank plan's reasons, less the one about memory held by others when that was the strategy's own room."""
    held = fmt_bytes(virtual.used_by_others_bytes)
    shifted = virtual.used_by_others_bytes != card.used_by_others_bytes
    # the rank plan's headroom is against the shifted budget; the world plan states the rank's own
    return [r for r in reasons
            if not r.startswith("headroom ") and not (shifted and r.startswith(f"{held} of the card"))]


def _rank_parts(spec, rank_plan, w: World, strategy: str, bucket_view: bool) -> dict[str, int]:
    """One rank's need at its peak by named part: the single-card step's parts with the strategy's changes."""
    single = rank_plan.peak_parts()
    beyond = rank_plan.required_bytes - rank_plan.estimate.required_bytes
    n = w.size
    parts = dict(single)
    if strategy == "ddp":
        gradients = grad_width(rank_plan.step_config) * (rank_plan.trainable_params or 0)
        parts["DDP gradient buckets"] = ddp_extra(gradients, single.get("gradients", 0),
                                                  gradient_as_bucket_view=bucket_view)
    else:
        for name in ("weights", "gradients", "optimizer state"):
            parts[name] = -(-single.get(name, 0) // n)
        parts["FSDP gathered root and layers"] = fsdp_extra(fsdp_shape(spec, rank_plan.step_config))
    if n > 1 and not w.on_cpu:  # gloo's buffers on the CPU are not a card's
        parts["NCCL buffers"] = NCCL_BUFFERS
    if beyond > 0:
        parts["run and unknowns"] = beyond
    return parts


def _communication(spec, rank_plan, w: World, strategy: str) -> tuple[int, float, float]:
    """(bytes each rank sends per optimizer step, seconds of it not hidden behind compute, step seconds)."""
    from autofit import planner

    n = w.size
    cfg = rank_plan.step_config
    speed = planner.throughput(spec, cfg, rank_plan.gpu, batch_size=rank_plan.batch_size, seq_len=rank_plan.seq_len,
                               grad_accum=rank_plan.grad_accum, trainable=rank_plan.trainable_params or 0)
    rate = w.link.gbs * 1e9 * LINK_EFFICIENCY
    # ranks on one machine's CPUs share its cores (the launcher gives each 1/n of the threads): each runs at 1/n of
    # the rate the host was measured at, so n ranks train no faster than one process would
    share = n if w.on_cpu else 1
    step_seconds, compute_seconds = speed.step_seconds * share, speed.compute_seconds * share
    if n == 1:
        return 0, 0.0, step_seconds
    grads = grad_width(cfg) * (rank_plan.trainable_params or 0)
    if strategy == "ddp":
        sent = int(2 * (n - 1) / n * grads)  # ring all-reduce, once per optimizer step (accumulation under no_sync)
        hidden = BACKWARD_SHARE * compute_seconds
        exposed = max(0.0, sent / rate - hidden)
    else:
        shape = fsdp_shape(spec, cfg)
        params = shape.root_gathered + spec.num_layers * shape.layer_gathered
        # per micro-batch: all-gather in forward and again in backward, reduce-scatter of the gradients
        per_micro = int((n - 1) / n * (2 * params + grads))
        sent = per_micro * rank_plan.grad_accum
        exposed = rank_plan.grad_accum * max(0.0, per_micro / rate - compute_seconds) \
            + (n - 1) / n * shape.root_gathered / rate  # the first gather waits: nothing runs before it
    return sent, exposed, step_seconds + exposed


# -- agreeing on out-of-memory across ranks ------------------------------------------------------------------------
def agree(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank: an all-reduce (MAX) of the flag when a process group is
    running, else ``flag``. Every rank must call it at the same point (it is a collective)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    backend = dist.get_backend()
    device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def trial_on_every_rank(step) -> bool:
    """Runs ``step()`` on this rank and returns whether it ran out of memory on any rank, the same answer on all of
    them, so that every rank moves on (retries smaller, or goes on) together. Errors other than out-of-memory are
    re-raised unchanged, after the other ranks have been told (they see an out-of-memory and stop waiting)."""
    from autofit.probing import is_oom

    oom = False
    try:
        step()
    except BaseException as err:
        if not is_oom(err):
            agree(True)
            raise
        oom = True
        del err
    import gc

    gc.collect()
    return agree(oom)


# -- a script of the user's own, started on every rank ---------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, slots=True)
class Launch:
    """The ranks this process is one of: ``world_size`` of them, ``local_world_size`` on each machine."""

    world_size: int
    rank: int
    local_rank: int
    local_world_size: int

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)


def _env_int(name: str, default: int | None = None) -> int | None:
    import os

    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"the launcher's {name}={text!r} is not a whole number; start the script with torchrun or "
                          "accelerate launch, or unset it") from None
    if value < 0:
        raise ConfigError(f"the launcher's {name}={value} is negative; start the script with torchrun or accelerate "
                          "launch, or unset it")
    return value


def launched() -> Launch | None:
    """The ranks of this run when there are several: from the initialised process group, else from the variables
    ``torchrun`` and ``accelerate launch`` set (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``). None
    for a single process. Raises ``ConfigError`` for unreadable variables."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        size, rank = dist.get_world_size(), dist.get_rank()
    else:
        size = _env_int("WORLD_SIZE", 1)
        if size <= 1:
            return None
        rank = _env_int("RANK")
        if rank is None:
            raise ConfigError(f"WORLD_SIZE={size} but RANK is not set; start the script with torchrun or accelerate "
                              "launch, which set both")
    if size <= 1:
        return None
    if rank >= size:
        raise ConfigError(f"RANK={rank} is not below WORLD_SIZE={size}; start the script with torchrun or accelerate "
                          "launch")
    local_size = _env_int("LOCAL_WORLD_SIZE", size)
    if not 1 <= local_size <= size or size % local_size:
        raise ConfigError(f"LOCAL_WORLD_SIZE={local_size} does not divide WORLD_SIZE={size} into machines of equal "
                          "ranks; start the script with torchrun or accelerate launch")
    local_rank = _env_int("LOCAL_RANK", rank % local_size)
    return Launch(world_size=size, rank=rank, local_rank=local_rank, local_world_size=local_size)


def join_group(launch: Launch, *, cpu: bool = False) -> None:
    """Initialises the default process group from the launcher's variables where the script has not yet (NCCL where
    CUDA is here and the ranks are not ``cpu`` ones, else gloo); accelerate and the Trainer use a group that is
    already initialised."""
    import os

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={launch.world_size} but {' and '.join(missing)} not set; start the script with "
                          "torchrun or accelerate launch, or call torch.distributed.init_process_group() first")
    backend = "gloo"
    if torch.cuda.is_available() and not cpu:
        backend = "nccl"
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world_size)


def _launched_world(launch: Launch, gpu, gpus_count, nodes) -> World:
    """The world of the launcher's ranks: the cards ``gpu`` names (as many as there are ranks), or one card of the
    kind ``gpu`` names per rank, or (``gpu`` None) each rank's own card, gathered from every rank. Every rank calls
    it; errors are raised on every rank alike."""
    import torch
    import torch.distributed as dist

    if nodes != 1 and nodes != launch.nodes:
        raise ConfigError(f"nodes={nodes} but the launcher started {launch.nodes} machine(s) of "
                          f"{launch.local_world_size} ranks; leave nodes out in a launched script")
    if several(gpu, gpus_count):
        w = world(gpu, gpus_count, nodes=launch.nodes if nodes == 1 else nodes)
        if w.size != launch.world_size:
            raise ConfigError(f"the launcher started {launch.world_size} ranks but {w.size} cards are named; name "
                              f"one card per rank, or one kind (gpu='rtx3080-20gb') for all of them")
        return w
    if gpu is not None:
        card = gpus.resolve(gpu)
        if card.source == "host":
            if launch.nodes > 1:
                raise GpuError("ranks on the CPU are planned for one machine; name the kind of GPU every rank has "
                               "(e.g. gpu='rtx3080-20gb')")
            return cpu_world(launch.world_size)
        return World(cards=(card,) * launch.world_size, nodes=launch.nodes)
    # each rank's own card: the one its LOCAL_RANK names (or the only one it sees)
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise GpuError("no CUDA GPU detected on this rank; name the kind of GPU every rank has "
                           "(e.g. gpu='rtx3080-20gb')")
        mine: object = gpus.resolve(launch.local_rank if count > 1 else 0)
    except GpuError as err:
        mine = str(err)
    everyone: list = [None] * launch.world_size
    dist.all_gather_object(everyone, mine)
    failed = [(r, m) for r, m in enumerate(everyone) if isinstance(m, str)]
    if failed:
        rank, message = failed[0]
        raise GpuError(f"rank {rank}: {message}")
    return World(cards=tuple(everyone), nodes=launch.nodes)


def read_plan(text: str):
    """The plan in a plan.json: a ``WorldPlan`` (what ``WorldPlan.to_json`` or ``plan_to_text`` wrote) or a single
    card's ``Plan`` (``Plan.to_json``). Raises ``ConfigError`` naming what is wrong."""
    import json

    from autofit.plans import Plan

    try:
        data = json.loads(text)
    except (ValueError, RecursionError, TypeError):
        data = None
    if not (isinstance(data, dict) and set(data) in ({"world_plan"}, {"plan"})):
        return Plan.from_json(text)  # a single card's plan, or its own one-line error
    try:
        return plan_from_text(text)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ConfigError(f"not a plan file autofit wrote: its world plan is unreadable ({type(err).__name__}: "
                          f"{str(err)[:100]})") from None


def plan_to_text(p) -> str:
    """``p`` (a ``Plan`` or a ``WorldPlan``) as JSON text, what ``plan_from_text`` reads back equal."""
    import json
    from dataclasses import asdict, fields

    if not isinstance(p, WorldPlan):
        return json.dumps({"plan": json.loads(p.to_json())})
    data = {f.name: getattr(p, f.name) for f in fields(WorldPlan) if f.name not in ("rank", "world")}
    data["reasons"] = list(p.reasons)
    data["world"] = {"cards": [asdict(c) for c in p.world.cards], "nodes": p.world.nodes}
    data["rank"] = json.loads(p.rank.to_json())
    return json.dumps({"world_plan": data})


def plan_from_text(text: str):
    """The ``Plan`` or ``WorldPlan`` that ``plan_to_text`` wrote."""
    import json

    from autofit.plans import Plan

    data = json.loads(text)
    if "plan" in data:
        return Plan.from_dict(data["plan"])
    data = dict(data["world_plan"])
    cards = []
    for c in data["world"]["cards"]:
        c = dict(c)
        if isinstance(c.get("compute_capability"), list):
            c["compute_capability"] = tuple(c["compute_capability"])
        cards.append(gpus.GpuInfo(**c))
    data["world"] = World(cards=tuple(cards), nodes=data["world"]["nodes"])
    data["rank"] = Plan.from_dict(data["rank"])
    data["reasons"] = tuple(data["reasons"])
    return WorldPlan(**data)


def plan_on_every_rank(launch: Launch, model, gpu=None, **kwargs):
    """``plan`` in a script running on every rank: every rank calls it at the same point. The world is the launcher's
    (``_launched_world``); rank 0 alone plans and broadcasts the plan as JSON (``broadcast_object_list``), so every
    rank trains the same micro-batch and accumulation even where the cards' free memory differs a little. An error
    planning on rank 0 is raised on every rank, with its message. Joins the default process group first where the
    script has not (``join_group``)."""
    import torch.distributed as dist

    from autofit import errors

    join_group(launch, cpu=isinstance(gpu, str) and gpu.strip().lower() == "cpu")
    w = _launched_world(launch, gpu, kwargs.pop("gpus_count", None), kwargs.pop("nodes", 1))
    payload: list = [None]
    failure = None
    if dist.get_rank() == 0:
        try:
            payload[0] = {"plan": plan_to_text(_plan(model, w, **kwargs))}
        except BaseException as err:  # the other ranks raise it too; rank 0 raises its own, unchanged
            known = isinstance(err, errors.AutofitError)
            payload[0] = {"error": type(err).__name__ if known else "AutofitError",
                          "message": str(err) if known else f"planning failed on rank 0 ({type(err).__name__})"}
            failure = err
    dist.broadcast_object_list(payload, src=0)
    if failure is not None:
        raise failure
    answer = payload[0]
    if "error" in answer:
        cls = getattr(errors, answer["error"], errors.AutofitError)
        raise cls(answer["message"])
    return plan_from_text(answer["plan"])
