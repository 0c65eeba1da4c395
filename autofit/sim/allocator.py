"""A model of PyTorch's CUDA caching allocator, replayed over a recorded allocation stream.

An out-of-memory error happens when the allocator cannot grow its reserved memory, and reserved memory exceeds
allocated memory by what fragmentation leaves unusable, so the budget check needs reserved memory. Rather than
guess a margin, autofit replays the simulated allocations and releases through a model of the allocator
(c10/cuda/CUDACachingAllocator.cpp; constants below are from that file): requests rounded to 512 bytes; a small pool
for requests up to 1 MiB carved from 2 MiB segments, a large pool for the rest carved from 20 MiB segments (requests
under 10 MiB) or from segments rounded up to 2 MiB; best-fit reuse of cached blocks (smallest block that fits, then
lowest address); splitting when what remains is at least 512 bytes (small pool) or more than 1 MiB (large pool);
coalescing of free neighbours; nothing returned to the driver until a request would take reserved memory past the
device's limit, when every wholly free segment is released and the request retried (``release_cached_blocks``), and
only then an out-of-memory error. With ``expandable_segments`` (the ``PYTORCH_CUDA_ALLOC_CONF`` option) each pool is
one segment that maps pages at its end as needed and unmaps free pages at its end under pressure.

Statistics follow the allocator's: ``allocated`` counts whole blocks (a block not split keeps its remainder), and
``reserved`` counts segments.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from autofit.sim import table

MIN_BLOCK = 512  # kMinBlockSize
SMALL_SIZE = 1 << 20  # kSmallSize: the largest "small" request
SMALL_BUFFER = 2 << 20  # kSmallBuffer: small pool segments
LARGE_BUFFER = 20 << 20  # kLargeBuffer: segments for requests between 1 and 10 MiB
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge: larger segments are rounded to 2 MiB


def round_size(size: int) -> int:
    return MIN_BLOCK if size < MIN_BLOCK else -(-size // MIN_BLOCK) * MIN_BLOCK


def segment_size(size: int) -> int:
    """Bytes the allocator asks the driver for when no cached block fits a request of ``size``."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class AllocatorOutOfMemory(Exception):
    """A request the modelled allocator cannot satisfy within its limit."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AllocatorStats:
    """Peaks of a replay, in bytes, as ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` report them."""

    peak_allocated: int
    peak_reserved: int
    segments: int
    reserved_at: tuple[int, ...] = ()  # peak reserved up to each mark a replay was given


class _Block:
    __slots__ = ("addr", "size", "free", "prev", "next", "small")

    def __init__(self, addr, size, small):
        self.addr, self.size, self.free, self.small = addr, size, True, small
        self.prev = self.next = None


class CachingAllocator:
    """The caching allocator's block bookkeeping, without memory behind it."""

    def __init__(self, *, expandable: bool = False, limit: int | None = None) -> None:
        self.expandable = expandable
        self.limit = limit
        self.retries = 0
        self._pools: dict[bool, list[tuple[int, int, _Block]]] = {True: [], False: []}  # (size, addr, block)
        self._tails: dict[bool, _Block | None] = {True: None, False: None}  # expandable: last block of the segment
        self._ends: dict[bool, int] = {True: 0, False: 0}  # expandable: bytes mapped per pool
        self._next_addr = 0
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved = 0
        self.segments = 0

    def malloc(self, size: int) -> _Block:
        size = round_size(size)
        small = size <= SMALL_SIZE
        pool = self._pools[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i < len(pool):
            block = pool.pop(i)[2]
        else:
            block = self._grow(size, small)
        block.free = False
        remaining = block.size - size
        if remaining >= MIN_BLOCK if small else remaining > SMALL_SIZE:
            rest = _Block(block.addr + size, remaining, small)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            if self.expandable and self._tails[small] is block:
                self._tails[small] = rest
            self._insert(rest)
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def free(self, block: _Block) -> None:
        self.allocated -= block.size
        block.free = True
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free:
                self._remove(neighbour)
                left, right = (neighbour, block) if neighbour is block.prev else (block, neighbour)
                left.size += right.size
                left.next = right.next
                if right.next is not None:
                    right.next.prev = left
                if self._tails[left.small] is right:
                    self._tails[left.small] = left
                block = left
        self._insert(block)

    def _grow(self, size: int, small: bool) -> _Block:
        if not self.expandable:
            nbytes = segment_size(size)
            if self.limit is not None and self.reserved + nbytes > self.limit:
                self.retries += 1
                self._release_free_segments()
                if self.reserved + nbytes > self.limit:
                    raise AllocatorOutOfMemory(size)
            block = _Block(self._next_addr, nbytes, small)
            self._next_addr += nbytes
            self.segments += 1
            self._reserve(nbytes)
            return block
        # expandable: extend the pool's single segment at its end, reusing a free block already there
        page = SMALL_BUFFER if small else LARGE_BUFFER
        tail = self._tails[small]
        have = tail.size if tail is not None and tail.free else 0
        need = -(-(size - have) // page) * page
        if self.limit is not None and self.reserved + need > self.limit:
            self.retries += 1
            self._release_free_tails(keep=small)
            if self.reserved + need > self.limit:
                raise AllocatorOutOfMemory(size)
        self._reserve(need)
        self._ends[small] += need
        if have:
            self._remove(tail)
            tail.size += need
            return tail
        block = _Block(self._ends[small] - need + (0 if small else 1 << 50), need, small)
        block.prev = tail
        if tail is not None:
            tail.next = block
        if tail is None:
            self.segments += 1
        self._tails[small] = block
        return block

    def _release_free_segments(self) -> None:
        """release_cached_blocks: every segment that is one free block goes back to the driver."""
        for small, pool in self._pools.items():
            keep = []
            for entry in pool:
                block = entry[2]
                if block.prev is None and block.next is None:
                    self.reserved -= block.size
                    self.segments -= 1
                else:
                    keep.append(entry)
            self._pools[small] = keep

    def _release_free_tails(self, keep: bool) -> None:
        """Expandable segments unmap whole free pages at the end of each pool's segment."""
        for small in (True, False):
            tail = self._tails[small]
            if tail is None or not tail.free:
                continue
            page = SMALL_BUFFER if small else LARGE_BUFFER
            unmap = tail.size // page * page
            if not unmap:
                continue
            self._remove(tail)
            tail.size -= unmap
            self._ends[small] -= unmap
            self.reserved -= unmap
            if tail.size:
                self._insert(tail)
            else:
                self._tails[small] = tail.prev
                if tail.prev is not None:
                    tail.prev.next = None

    def _reserve(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def _insert(self, block: _Block) -> None:
        bisect.insort(self._pools[block.small], (block.size, block.addr, block))

    def _remove(self, block: _Block) -> None:
        pool = self._pools[block.small]
        i = bisect.bisect_left(pool, (block.size, block.addr))
        del pool[i]


def replay(sizes: np.ndarray, events: np.ndarray, *, baseline_uids=(), expandable: bool = False,
           extra: tuple[int, ...] = (), limit: int | None = None, marks=()) -> AllocatorStats:
    """Runs an allocation stream through the allocator model.

    ``sizes[u]`` is the request of allocation ``u``; ``events`` lists allocations as ``u`` and releases as
    ``-u - 1``; ``baseline_uids`` are allocated first (tensors that existed before recording); ``extra`` are
    requests made once before everything else and never released (library workspaces). With ``limit`` (bytes the
    allocator may reserve) it raises ``AllocatorOutOfMemory`` where the real allocator would. ``marks`` are event
    counts (ascending) after which the peak reserved so far is recorded, in ``reserved_at``.
    """
    if limit is None:  # a replay that cannot fail is a pure function of its input: answered once (sim/table.py)
        key = table.answer_key("replay", sizes, events, baseline_uids, expandable=expandable, extra=extra,
                               marks=tuple(marks))
        hit = table.answer(key)
        if hit is None:
            stats = _replay(sizes, events, baseline_uids=baseline_uids, expandable=expandable, extra=extra,
                            marks=marks)
            table.keep(key, [stats.peak_allocated, stats.peak_reserved, stats.segments, list(stats.reserved_at)])
            return stats
        return AllocatorStats(peak_allocated=hit[0], peak_reserved=hit[1], segments=hit[2],
                              reserved_at=tuple(hit[3]))
    return _replay(sizes, events, baseline_uids=baseline_uids, expandable=expandable, extra=extra, limit=limit,
                   marks=marks)


def _replay(sizes, events, *, baseline_uids=(), expandable=False, extra=(), limit=None, marks=()) -> AllocatorStats:
    alloc = CachingAllocator(expandable=expandable, limit=limit)
    for nbytes in extra:
        alloc.malloc(nbytes)
    blocks: dict[int, _Block] = {}
    for uid in baseline_uids:
        blocks[int(uid)] = alloc.malloc(int(sizes[uid]))
    reserved_at = []
    start = 0
    for stop in (*marks, len(events)):
        for event in events[start:stop].tolist():
            if event >= 0:
                blocks[event] = alloc.malloc(int(sizes[event]))
            else:
                block = blocks.pop(-event - 1, None)
                if block is not None:
                    alloc.free(block)
        reserved_at.append(alloc.peak_reserved)
        start = stop
    return AllocatorStats(peak_allocated=alloc.peak_allocated, peak_reserved=alloc.peak_reserved,
                          segments=alloc.segments, reserved_at=tuple(reserved_at[:len(marks)]))


def min_limit(sizes: np.ndarray, events: np.ndarray, *, baseline_uids=(), expandable: bool = False,
              extra: tuple[int, ...] = (), step: int = ROUND_LARGE) -> int:
    """The smallest allocator limit (a multiple of ``step`` bytes) under which the stream runs without an
    out-of-memory error: the memory the step really needs, fragmentation the allocator cannot undo included."""
    key = table.answer_key("min_limit", sizes, events, baseline_uids, expandable=expandable, extra=extra, step=step)
    hit = table.answer(key)
    if hit is None:
        hit = _min_limit(sizes, events, baseline_uids=baseline_uids, expandable=expandable, extra=extra, step=step)
        table.keep(key, hit)
    return hit


def _min_limit(sizes, events, *, baseline_uids, expandable, extra, step) -> int:
    free_run = replay(sizes, events, baseline_uids=baseline_uids, expandable=expandable, extra=extra)
    low, high = free_run.peak_allocated // step, -(-free_run.peak_reserved // step)  # fails at low-1, runs at high
    low = max(low - 1, 0)
    while high - low > 1:
        mid = (low + high) // 2
        try:
            _replay(sizes, events, baseline_uids=baseline_uids, expandable=expandable, extra=extra, limit=mid * step)
            high = mid
        except AllocatorOutOfMemory:
            low = mid
    return high * step
