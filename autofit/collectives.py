"""Collectives that let the ranks of a process group take the same decision: the worst outcome of a step over the
ranks, the largest of some figures. Outside a process group (or in a group of one) each is the local value."""

from __future__ import annotations


def _running() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


RAN, OUT_OF_MEMORY, FAILED = 0, 1, 2  # what a rank's step did, worst last: ``agree_level`` keeps the worst


def agree_level(level: int) -> int:
    """The largest ``level`` over the ranks (``RAN``, ``OUT_OF_MEMORY`` or ``FAILED``) on every rank, through an
    all-reduce (MAX) when a process group is running, else ``level``. A collective: every rank calls it at the same
    point."""
    import torch
    import torch.distributed as dist

    if not _running():
        return level
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([level], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def agree_max(values: list[float]) -> list[float]:
    """Each of ``values`` as its largest over the ranks (float64), through one all-reduce (MAX) when a process group
    is running, else ``values``. A collective: every rank calls it at the same point."""
    import torch
    import torch.distributed as dist

    if not _running():
        return list(values)
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()
