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


@dataclass(eq=False)  # identity: list.index/remove on a segment's blocks must not compare fields (hot path)
class _Block:
    segment: int
    offset: int
    size: int
    small: bool
    free: bool = True


class OutOfMemory(Exception):
    """The modelled allocator could not satisfy a request under its cap."""


class CachingAllocatorModel:
    """Replays allocations and frees; tracks reserved bytes and their peak."""

    def __init__(self, cap_bytes: int | None = None) -> None:
        self.cap = cap_bytes
        self.reserved = 0
        self.peak_reserved = 0
        self.allocated = 0
        self.peak_allocated = 0
        self._segments: dict[int, list[_Block]] = {}
        self._free = {True: [], False: []}  # pool (small?) -> sorted [(size, segment, offset)]
        self._blocks: dict[tuple[int, int], _Block] = {}
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
        index = bisect.bisect_left(pool, (size, -1, -1))
        if index == len(pool):
            return None
        _, segment, offset = pool.pop(index)
        return self._blocks[(segment, offset)]

    def _new_segment(self, size: int, small: bool) -> _Block:
        seg_bytes = segment_size(size)
        if self.cap is not None and self.reserved + seg_bytes > self.cap:
            self._release_cached_segments()
            if self.reserved + seg_bytes > self.cap:
                raise OutOfMemory(size)
        segment = self._next_segment
        self._next_segment += 1
        block = _Block(segment, 0, seg_bytes, small)
        self._segments[segment] = [block]
        self._blocks[(segment, 0)] = block
        self.reserved += seg_bytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return block

    def _split(self, block: _Block, size: int) -> None:
        remaining = block.size - size
        # should_split: small pool splits any remainder >= 512 B, large pool only above 1 MiB.
        if (block.small and remaining >= MIN_BLOCK) or (not block.small and remaining > SMALL_REQUEST):
            rest = _Block(block.segment, block.offset + size, remaining, block.small)
            block.size = size
            blocks = self._segments[block.segment]
            blocks.insert(blocks.index(block) + 1, rest)
            self._blocks[(rest.segment, rest.offset)] = rest
            self._add_free(rest)

    def _merge(self, block: _Block) -> None:
        blocks = self._segments[block.segment]
        index = blocks.index(block)
        for neighbour_index in (index + 1, index - 1):
            if 0 <= neighbour_index < len(blocks) and blocks[neighbour_index].free:
                neighbour = blocks[neighbour_index]
                self._remove_free(neighbour)
                del self._blocks[(neighbour.segment, neighbour.offset)]
                if neighbour_index < index:
                    del self._blocks[(block.segment, block.offset)]
                    block.offset = neighbour.offset
                    self._blocks[(block.segment, block.offset)] = block
                    index -= 1
                block.size += neighbour.size
                blocks.remove(neighbour)
        self._add_free(block)

    def _release_cached_segments(self) -> None:
        for segment, blocks in list(self._segments.items()):
            if len(blocks) == 1 and blocks[0].free:
                self._remove_free(blocks[0])
                del self._blocks[(segment, 0)]
                del self._segments[segment]
                self.reserved -= blocks[0].size

    def _add_free(self, block: _Block) -> None:
        bisect.insort(self._free[block.small], (block.size, block.segment, block.offset))

    def _remove_free(self, block: _Block) -> None:
        pool = self._free[block.small]
        pool.pop(bisect.bisect_left(pool, (block.size, block.segment, block.offset)))


def replay_allocator(ledger: Ledger, cap_bytes: int | None = None,
                     extra_bytes: int = 0) -> CachingAllocatorModel:
    """Replay a ledger through the allocator model; raises OutOfMemory under ``cap_bytes``.

    ``extra_bytes`` is allocated first and kept (e.g. the cuBLAS workspace).
    """
    model = CachingAllocatorModel(cap_bytes)
    if extra_bytes:
        model.malloc(extra_bytes)
    blocks: dict[int, _Block] = {}
    for kind, sid, _ in ledger.events:
        if kind == ALLOC:
            blocks[sid] = model.malloc(ledger.storages[sid].nbytes)
        elif kind == FREE and sid in blocks:
            model.release(blocks.pop(sid))
    return model
