"""A model of PyTorch's CUDA caching allocator, replayed over the ledger's events.

The constants and the policy follow c10/cuda/CUDACachingAllocator.cpp (PyTorch 2.x):
requests round up to 512-byte blocks (``round_size``); requests up to 1 MiB come from the
small pool, carved out of 2 MiB segments; larger ones from the large pool, out of 20 MiB
segments below 10 MiB and exact 2 MiB-rounded segments above (``get_allocation_size``).
A free block is reused best-fit within its pool and split when the rest is big enough
(``should_split``); neighbours merge when freed. When a new segment would pass the cap,
the allocator first releases every fully free cached segment (``release_cached_blocks``)
and tries again; failing that, it is out of memory.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from memlint.ledger import ALLOC, FREE, Ledger

MIN_BLOCK = 512
SMALL_REQUEST = 1 << 20          # kSmallSize: requests up to 1 MiB use the small pool
SMALL_SEGMENT = 2 << 20          # kSmallBuffer
LARGE_SEGMENT = 20 << 20         # kLargeBuffer, for requests below kMinLargeAlloc
MIN_LARGE_ALLOC = 10 << 20       # kMinLargeAlloc
ROUND_LARGE = 2 << 20            # kRoundLarge


def round_size(nbytes: int) -> int:
    """Bytes a request occupies, as ``torch.cuda.memory_allocated`` counts them."""
    if nbytes < MIN_BLOCK:
        return MIN_BLOCK
    return -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def segment_size(nbytes: int) -> int:
    if nbytes <= SMALL_REQUEST:
        return SMALL_SEGMENT
    if nbytes < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return -(-nbytes // ROUND_LARGE) * ROUND_LARGE


@dataclass(eq=False, slots=True)  # identity, not fields: blocks are nodes of their segment's list
class _Block:
    segment: int
    offset: int
    size: int
    small: bool
    free: bool = True
    prev: _Block | None = None  # the neighbours in the segment, by address
    next: _Block | None = None


class OutOfMemory(Exception):
    """The modelled allocator could not satisfy a request under its cap."""


class CachingAllocatorModel:
    """Replays allocations and frees; tracks reserved bytes and their peak.

    A segment's blocks form a linked list by address (split and merge touch only neighbours);
    when two merge, the lower one absorbs the upper, so a segment's first block stays its handle.
    """

    def __init__(self, cap_bytes: int | None = None) -> None:
        self.cap = cap_bytes
        self.reserved = 0
        self.peak_reserved = 0
        self.allocated = 0
        self.peak_allocated = 0
        self._segments: dict[int, _Block] = {}  # segment -> its first block
        # pool (small?) -> free blocks as sorted (size, segment, offset, block): best fit by bisection
        self._free: dict[bool, list[tuple[int, int, int, _Block]]] = {True: [], False: []}
        self._next_segment = 0

    def malloc(self, nbytes: int) -> _Block:
        size = round_size(nbytes)
        small = size <= SMALL_REQUEST
        block = self._best_fit(size, small)
        if block is None:
            block = self._new_segment(size, small)
        block.free = False
        self._split(block, size)
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def release(self, block: _Block) -> None:
        self.allocated -= block.size
        block.free = True
        self._merge(block)

    def _best_fit(self, size: int, small: bool) -> _Block | None:
        pool = self._free[small]
        index = bisect.bisect_left(pool, (size,))
        if index == len(pool):
            return None
        return pool.pop(index)[3]

    def _new_segment(self, size: int, small: bool) -> _Block:
        seg_bytes = segment_size(size)
        if self.cap is not None and self.reserved + seg_bytes > self.cap:
            self._release_cached_segments()
            if self.reserved + seg_bytes > self.cap:
                raise OutOfMemory(size)
        segment = self._next_segment
        self._next_segment += 1
        block = self._segments[segment] = _Block(segment, 0, seg_bytes, small)
        self.reserved += seg_bytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return block

    def _split(self, block: _Block, size: int) -> None:
        remaining = block.size - size
        # should_split: small pool splits any remainder >= 512 B, large pool only above 1 MiB.
        if (block.small and remaining >= MIN_BLOCK) or (not block.small and remaining > SMALL_REQUEST):
            rest = _Block(block.segment, block.offset + size, remaining, block.small, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._add_free(rest)

    def _merge(self, block: _Block) -> None:
        upper = block.next
        if upper is not None and upper.free:
            self._remove_free(upper)
            _absorb(block, upper)
        lower = block.prev
        if lower is not None and lower.free:
            self._remove_free(lower)
            _absorb(lower, block)
            block = lower
        self._add_free(block)

    def _release_cached_segments(self) -> None:
        for segment, first in list(self._segments.items()):
            if first.free and first.next is None:
                self._remove_free(first)
                del self._segments[segment]
                self.reserved -= first.size

    def _add_free(self, block: _Block) -> None:
        bisect.insort(self._free[block.small], (block.size, block.segment, block.offset, block))

    def _remove_free(self, block: _Block) -> None:
        pool = self._free[block.small]
        pool.pop(bisect.bisect_left(pool, (block.size, block.segment, block.offset)))


def _absorb(lower: _Block, upper: _Block) -> None:
    """Merge the free block ``upper`` into its neighbour below."""
    lower.size += upper.size
    lower.next = upper.next
    if upper.next is not None:
        upper.next.prev = lower


def replay_allocator(ledger: Ledger, cap_bytes: int | None = None) -> CachingAllocatorModel:
    """Replay a ledger through the allocator model; raises OutOfMemory under ``cap_bytes``.

    An elastic storage that does not fit is skipped: PyTorch's cuDNN convolution tries the plans
    cuDNN proposes in order and takes the first whose workspace the allocator can give
    (``try_plans`` in aten/src/ATen/native/cudnn/Conv_v8.cpp catches the out-of-memory error), down
    to plans that need none.
    """
    model = CachingAllocatorModel(cap_bytes)
    malloc, release, storages = model.malloc, model.release, ledger.storages  # the search replays a step 20 times
    blocks: dict[int, _Block] = {}
    for kind, sid, _ in ledger.events:
        if kind == ALLOC:
            try:
                blocks[sid] = malloc(storages[sid].nbytes)
            except OutOfMemory:
                if not storages[sid].elastic:
                    raise
        elif kind == FREE and sid in blocks:
            release(blocks.pop(sid))
    return model
