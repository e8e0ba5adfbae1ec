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

from memlint.ledger import ALLOC, Ledger

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
        # Free blocks per pool (small?), as sorted keys that order them by (size, segment, offset), so
        # that a bisection finds the best fit (ints: a replay makes some 100,000 comparisons, which tuples
        # made the larger part of its time), and the block of each key.
        self._free: dict[bool, list[int]] = {True: [], False: []}
        self._free_blocks: dict[int, _Block] = {}
        self._next_segment = 0

    # malloc and release run some 6,000 times a replay, and the batch search replays a step some twenty
    # times: they split and merge blocks inline.
    def malloc(self, nbytes: int) -> _Block:
        size = round_size(nbytes)
        small = size <= SMALL_REQUEST
        pool = self._free[small]
        index = bisect.bisect_left(pool, size << _SIZE_SHIFT)  # best fit
        block = self._free_blocks.pop(pool.pop(index)) if index < len(pool) else self._new_segment(size, small)
        block.free = False
        remaining = block.size - size
        # should_split: the small pool splits off any remainder of 512 B or more, the large pool above 1 MiB.
        if remaining > SMALL_REQUEST or (small and remaining >= MIN_BLOCK):
            upper = block.next
            rest = _Block(block.segment, block.offset + size, remaining, small, prev=block, next=upper)
            if upper is not None:
                upper.prev = rest
            block.next = rest
            block.size = size
            key = _free_key(rest)
            bisect.insort(pool, key)
            self._free_blocks[key] = rest
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return block

    def release(self, block: _Block) -> None:
        """Free a block and merge it with its free neighbours."""
        self.allocated -= block.size
        block.free = True
        pool, free_blocks = self._free[block.small], self._free_blocks
        upper = block.next
        if upper is not None and upper.free:
            del free_blocks[_take(pool, upper)]
            _absorb(block, upper)
        lower = block.prev
        if lower is not None and lower.free:
            del free_blocks[_take(pool, lower)]
            _absorb(lower, block)
            block = lower
        key = _free_key(block)
        bisect.insort(pool, key)
        free_blocks[key] = block

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

    def _release_cached_segments(self) -> None:
        for segment, first in list(self._segments.items()):
            if first.free and first.next is None:
                del self._free_blocks[_take(self._free[first.small], first)]
                del self._segments[segment]
                self.reserved -= first.size


# A free block's key: its size, then its segment, then its offset, each in its own bits.
_OFFSET_BITS, _SEGMENT_BITS = 48, 32
_SIZE_SHIFT = _OFFSET_BITS + _SEGMENT_BITS


def _free_key(block: _Block) -> int:
    return (block.size << _SIZE_SHIFT) | (block.segment << _OFFSET_BITS) | block.offset


def _take(pool: list[int], block: _Block) -> int:
    """Remove a free block's key from its pool's sorted keys; return the key."""
    key = _free_key(block)
    del pool[bisect.bisect_left(pool, key)]
    return key


def _absorb(lower: _Block, upper: _Block) -> None:
    """Merge the free block ``upper`` into its neighbour below."""
    lower.size += upper.size
    lower.next = upper.next
    if upper.next is not None:
        upper.next.prev = lower


def fits_without_replay(ledger: Ledger, cap_bytes: int, sizes: list[int] | None = None) -> bool | None:
    """Whether ``replay_allocator(ledger, cap_bytes, sizes)`` would fit, where two bounds decide it alone; else None.

    The allocator reserves memory only by making segments, one per request at most: a step whose
    segments, one per allocation, would sum to no more than the cap never meets the cap. And the
    reserved memory holds every live block: a step whose live bytes, with no kernel scratch (which
    the allocator may skip, ``elastic``), pass the cap cannot run under it. The batch search's
    probes far from the answer are decided so, without a replay (ResNet-50: 11 of its 21).
    """
    storages = ledger.storages
    if sizes is None:
        sizes = [storage.nbytes for storage in storages]
    allocations = ledger.allocation_events()
    if sum(segment_size(round_size(sizes[sid])) for kind, sid in allocations if kind == ALLOC) <= cap_bytes:
        return True
    live, alive = 0, set()
    for kind, sid in allocations:
        if storages[sid].elastic:
            continue
        if kind == ALLOC:
            alive.add(sid)
            live += round_size(sizes[sid])
            if live > cap_bytes:
                return False
        elif sid in alive:
            alive.discard(sid)
            live -= round_size(sizes[sid])
    return None


def replay_allocator(ledger: Ledger, cap_bytes: int | None = None,
                     sizes: list[int] | None = None) -> CachingAllocatorModel:
    """Replay a ledger through the allocator model; raises OutOfMemory under ``cap_bytes``.

    ``sizes`` replaces the storages' sizes (the step at another batch size, ``interpolated_sizes``).

    An elastic storage that does not fit is skipped: PyTorch's cuDNN convolution tries the plans
    cuDNN proposes in order and takes the first whose workspace the allocator can give
    (``try_plans`` in aten/src/ATen/native/cudnn/Conv_v8.cpp catches the out-of-memory error), down
    to plans that need none.
    """
    model = CachingAllocatorModel(cap_bytes)
    malloc, release, storages = model.malloc, model.release, ledger.storages  # the search replays a step 20 times
    if sizes is None:
        sizes = [storage.nbytes for storage in storages]
    blocks: dict[int, _Block] = {}
    for kind, sid in ledger.allocation_events():
        if kind == ALLOC:
            try:
                blocks[sid] = malloc(sizes[sid])
            except OutOfMemory:
                if not storages[sid].elastic:
                    raise
        elif sid in blocks:
            release(blocks.pop(sid))
    return model
