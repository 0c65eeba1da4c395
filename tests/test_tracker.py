"""The tracker follows storages resized in place, as FSDP2 frees and re-gathers parameters."""

import torch

from autofit.sim.tracker import Tracker, round_bytes


def test_a_storage_resized_to_zero_and_back_is_released_and_allocated_again():
    tracker = Tracker()
    with tracker:
        t = torch.empty(1000)  # 4000 B
        assert tracker.live == round_bytes(4000)
        t.untyped_storage().resize_(0)
        assert tracker.live == 0
        t.untyped_storage().resize_(8000)
        assert tracker.live == round_bytes(8000)
        del t
    assert tracker.live == 0 and tracker.peak == round_bytes(8000)
    events = tracker.timeline().events.tolist()
    assert events == [0, -1, 1, -2]  # allocated, released by the resize, allocated again, released when freed
    assert tracker.timeline().ops == ("empty.memory_format", "resize_")


def test_resizes_of_storages_made_before_tracking_are_not_counted():
    before = torch.empty(100)
    tracker = Tracker()
    with tracker:
        before.untyped_storage().resize_(800)
    assert tracker.live == 0 and tracker.timeline().events.tolist() == []
    from autofit.sim import tracker as tracking

    assert torch.UntypedStorage.resize_ is tracking._RESIZE  # restored on exit
