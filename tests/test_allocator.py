import numpy as np
import pytest

from autofit.sim import allocator
from autofit.sim.allocator import AllocatorOutOfMemory, CachingAllocator

MiB = 1 << 20


def test_segment_sizes_follow_the_caching_allocator():
    assert allocator.segment_size(512) == 2 * MiB  # small pool
    assert allocator.segment_size(MiB) == 2 * MiB
    assert allocator.segment_size(MiB + 512) == 20 * MiB  # 1-10 MiB share 20 MiB segments
    assert allocator.segment_size(10 * MiB) == 10 * MiB  # from 10 MiB, rounded to 2 MiB
    assert allocator.segment_size(11 * MiB) == 12 * MiB


def test_small_requests_share_a_segment_and_coalesce():
    a = CachingAllocator()
    blocks = [a.malloc(100) for _ in range(4)]
    assert a.reserved == 2 * MiB and a.allocated == 4 * 512 and a.segments == 1
    for b in blocks:
        a.free(b)
    assert a.allocated == 0
    big = a.malloc(MiB)  # the largest small request fits the coalesced segment: no new one
    assert a.segments == 1 and big.size == MiB
    a.malloc(MiB + 512)  # over 1 MiB is a large request: a 20 MiB segment of the large pool
    assert a.segments == 2 and a.reserved == 22 * MiB


def test_large_blocks_split_only_when_more_than_1_mib_remains():
    a = CachingAllocator()
    x = a.malloc(3 * MiB)  # a 20 MiB segment, split: 17 MiB remain
    assert a.reserved == 20 * MiB and x.size == 3 * MiB
    y = a.malloc(16 * MiB + 512)  # takes the 17 MiB block; < 1 MiB would remain, so it keeps the whole block
    assert a.reserved == 20 * MiB and y.size == 17 * MiB
    assert a.allocated == 20 * MiB  # allocated counts whole blocks, as torch.cuda.memory_allocated does


def test_best_fit_picks_the_smallest_block_that_fits():
    a = CachingAllocator()
    big, small = a.malloc(40 * MiB), a.malloc(12 * MiB)
    a.free(big)
    a.free(small)
    c = a.malloc(11 * MiB)
    assert c.size == 12 * MiB and a.reserved == 52 * MiB  # the 12 MiB block, not a piece of the 40 MiB one


def test_limit_releases_free_segments_then_fails():
    a = CachingAllocator(limit=40 * MiB)
    x = a.malloc(30 * MiB)
    a.free(x)  # cached, still reserved
    y = a.malloc(32 * MiB)  # 30 + 32 > 40: the free 30 MiB segment goes back first
    assert a.reserved == 32 * MiB and a.retries == 1
    with pytest.raises(AllocatorOutOfMemory):
        a.malloc(10 * MiB)
    assert y.size == 32 * MiB


def test_replay_and_min_limit():
    sizes = np.array([30 * MiB, 32 * MiB, 4 * MiB])
    events = np.array([0, -1, 1, 2, -2, -3])
    stats = allocator.replay(sizes, events)
    # 32 MiB does not fit the cached 30 MiB block (a new segment); 4 MiB is carved from it
    assert stats.peak_allocated == 36 * MiB and stats.peak_reserved == 62 * MiB
    need = allocator.min_limit(sizes, events)
    assert 52 * MiB <= need < 62 * MiB  # releasing the cached 30 MiB lets it run in 32 + a 20 MiB segment
    allocator.replay(sizes, events, limit=need)
    with pytest.raises(AllocatorOutOfMemory):
        allocator.replay(sizes, events, limit=need - 2 * MiB)


def test_expandable_segments_grow_in_pages():
    a = CachingAllocator(expandable=True)
    a.malloc(3 * MiB)
    a.malloc(3 * MiB)
    assert a.reserved == 20 * MiB and a.segments == 1  # one 20 MiB page of the large pool
    a.malloc(15 * MiB)
    assert a.reserved == 40 * MiB and a.segments == 1  # the segment grew, no new one
