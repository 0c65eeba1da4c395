"""The allocation tracker: every tensor storage an op creates, and when it is released, in allocator-rounded bytes.

The tracker is a ``TorchDispatchMode``: it sees each op's outputs below autograd, registers every storage it has not
seen, and learns of the storage's release through a weak reference (PyTorch keeps one Python object per storage for
as long as the storage lives, so the callback fires exactly when the memory would be returned). The same tracker runs
over fake tensors (the estimate) and over real CPU tensors (tests, and the budgeted CPU device that stands in for a
GPU when probing), so the two can be compared byte for byte.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

# CUDA's caching allocator rounds every request up to a multiple of 512 bytes
# (kMinBlockSize in c10/cuda/CUDACachingAllocator.cpp).
ROUND_BYTES = 512


def round_bytes(n: int) -> int:
    """``n`` bytes as the CUDA caching allocator would hand them out (a multiple of 512, at least 512)."""
    return max(ROUND_BYTES, -(-n // ROUND_BYTES) * ROUND_BYTES)


@dataclass(frozen=True, kw_only=True, slots=True)
class Timeline:
    """What a tracker recorded, as arrays.

    ``sizes[u]`` and ``tags[u]`` belong to allocation ``u``; ``events`` lists allocations as ``u`` and releases as
    ``-u - 1`` in the order they happened; ``marks`` are ``(event index, label)`` pairs the caller placed.
    """

    sizes: np.ndarray
    tags: np.ndarray
    events: np.ndarray
    marks: tuple[tuple[int, str], ...]
    baseline: int  # bytes live before the first event
    adopted: int  # allocations 0 .. adopted-1 existed before recording (weights, buffers)
    ops: tuple[str, ...]  # the op that made each allocation ("" for adopted tensors)
    raw_sizes: np.ndarray | None = None  # each allocation's bytes before rounding (None: not recorded)

    def live_curve(self) -> np.ndarray:
        """Live bytes after each event (int64)."""
        signed = np.where(self.events >= 0, self.sizes[np.maximum(self.events, 0)], -self.sizes[-self.events - 1])
        return self.baseline + np.cumsum(signed)

    def peak(self) -> int:
        curve = self.live_curve()
        return int(max(self.baseline, curve.max())) if len(curve) else self.baseline


class Tracker(TorchDispatchMode):
    """Records allocations and releases of tensor storages under its mode.

    ``budget`` (bytes), when set, makes an allocation that would take live memory past it raise
    ``torch.OutOfMemoryError`` the way a full GPU does; the tensor the op made is dropped, so nothing leaks.
    ``tag`` is stamped on each new allocation (the caller sets it to say which phase of a step is running).
    """

    def __init__(self, *, budget: int | None = None) -> None:
        super().__init__()
        self.budget = budget
        self.tag = 0
        self.live = 0
        self.peak = 0
        self._sizes: list[int] = []
        self._raw: list[int] = []  # bytes before rounding: affine in the batch size where sizes are
        self._tags: list[int] = []
        self._ops: list[str] = []
        self._events: list[int] = []
        self._marks: list[tuple[int, str]] = []
        self._uid_of: dict[int, int] = {}  # StorageImpl address -> uid, while alive
        self._refs: dict[int, list[weakref.ref]] = {}
        self._baseline = 0
        self._adopted = 0
        self._hidden = 0  # > 0 while ``hidden()`` is entered: ops run unrecorded

    @contextlib.contextmanager
    def hidden(self) -> Iterator[None]:
        """Runs what it wraps unrecorded: memory the device does not hold (a copy in host RAM, say)."""
        self._hidden += 1
        try:
            yield
        finally:
            self._hidden -= 1

    # -- registration -------------------------------------------------------------------------------------------
    def adopt(self, tensors) -> None:
        """Counts tensors that exist before tracking starts (weights, buffers, inputs) as already live."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and self.uid(t) is None:
                self._register(t, event=False)

    def uid(self, t: torch.Tensor) -> int | None:
        """The allocation id of ``t``'s storage, or None if the tracker has not seen it."""
        return self._uid_of.get(t.untyped_storage()._cdata)

    def mark(self, label: str) -> None:
        """Places ``label`` at the current point of the event stream."""
        self._marks.append((len(self._events), label))

    def reset_peak(self) -> None:
        self.peak = self.live

    def _register(self, t: torch.Tensor, *, event: bool = True, op: str = "") -> None:
        if is_traceable_wrapper_subclass(t):
            # a wrapper (a DTensor, say) owns no memory: the tensors it wraps do, and they are made below this mode
            names, _ = t.__tensor_flatten__()
            for name in names:
                inner = getattr(t, name)
                if isinstance(inner, torch.Tensor):
                    self._register(inner, event=event, op=op)
            return
        self._register_storage(t.untyped_storage(), event=event, op=op)

    def _register_storage(self, storage, *, event: bool = True, op: str = "") -> None:
        key = storage._cdata
        if key in self._uid_of:
            return
        raw = storage.nbytes()
        nbytes = round_bytes(raw)
        if event and self.budget is not None and self.live + nbytes > self.budget:
            raise torch.OutOfMemoryError(
                f"budgeted device out of memory. Tried to allocate {nbytes} bytes with {self.live} of "
                f"{self.budget} bytes in use"
            )
        uid = len(self._sizes)
        self._sizes.append(nbytes)
        self._raw.append(raw)
        self._tags.append(self.tag)
        self._ops.append(op)
        self._uid_of[key] = uid
        self.live += nbytes
        if event:
            self._events.append(uid)
            self.peak = max(self.peak, self.live)
        else:
            self._baseline += nbytes
            self._adopted += 1
            self.peak = max(self.peak, self.live)

        def release(_, key=key, uid=uid, nbytes=nbytes):
            refs = [r for r in self._refs.get(key, ()) if r() is not None]
            if refs:
                self._refs[key] = refs
            else:
                self._refs.pop(key, None)
            if self._uid_of.get(key) != uid:  # already released by a resize (see ``_resized``)
                return
            self.live -= nbytes
            self._events.append(-uid - 1)
            self._uid_of.pop(key, None)

        # a storage resized in place is registered again under a new id, each with its own callback; a dead storage's
        # address can be reused, so only the callbacks of live storages are kept
        refs = [r for r in self._refs.get(key, ()) if r() is not None]
        refs.append(weakref.ref(storage, release))
        self._refs[key] = refs

    def _resized(self, storage, old_nbytes: int) -> None:
        """A storage resized in place (``UntypedStorage.resize_``): FSDP2 frees an unsharded parameter or an
        all-gather buffer by resizing its storage to zero and allocates it again the same way, which no op output
        shows. A resize releases the old allocation and, when not to zero, registers a new one."""
        key = storage._cdata
        uid = self._uid_of.get(key)
        if uid is None and old_nbytes:
            return  # a storage this tracker never saw: not its memory
        if uid is not None:
            self.live -= self._sizes[uid]
            self._events.append(-uid - 1)
            self._uid_of.pop(key, None)
        if storage.nbytes():
            self._register_storage(storage, op="resize_")

    def __enter__(self):
        _ACTIVE.append(self)
        if len(_ACTIVE) == 1:
            torch.UntypedStorage.resize_ = _tracked_resize
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            _ACTIVE.remove(self)
            if not _ACTIVE:
                torch.UntypedStorage.resize_ = _RESIZE

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._hidden:
            return out
        flat, _ = tree_flatten(out)
        registered = []
        try:
            for t in flat:
                if isinstance(t, torch.Tensor):
                    self._register(t, op=func.__name__)
                    registered.append(t)
        except torch.OutOfMemoryError:
            del out, flat, registered, t
            raise
        return out

    # -- results --------------------------------------------------------------------------------------------------
    def timeline(self) -> Timeline:
        """A snapshot of what was recorded so far (pre-tracking tensors count in ``baseline``, not as events)."""
        return Timeline(
            sizes=np.array(self._sizes, dtype=np.int64),
            ops=tuple(self._ops),
            tags=np.array(self._tags, dtype=np.int16),
            events=np.array(self._events, dtype=np.int64),
            marks=tuple(self._marks),
            baseline=self._baseline,
            adopted=self._adopted,
            raw_sizes=np.array(self._raw, dtype=np.int64),
        )


# Trackers entered now, innermost last; while any is, ``UntypedStorage.resize_`` tells them of in-place resizes.
_ACTIVE: list[Tracker] = []
_RESIZE = torch.UntypedStorage.resize_


def _tracked_resize(storage, size):
    old = storage.nbytes()
    out = _RESIZE(storage, size)
    for tracker in list(_ACTIVE):
        tracker._resized(storage, old)
    return out
