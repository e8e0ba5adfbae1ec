"""The ledger: every storage a simulated step allocates and frees, in order.

The simulator writes events; everything numeric (peaks, the breakdown at the peak, the
timeline, per-layer activation bytes) is derived here by replaying them, so the same
record serves the verdict, the table and the plot. Plain Python: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from memlint.report import BREAKDOWN_KEYS, TimelinePoint

ALLOC, FREE, OP = 0, 1, 2

# Roles a storage can play; `temporaries` is the default until something better is known.
ROLES = ("parameters", "buffers", "gradients", "optimizer_state", "activations", "inputs", "temporaries")


@dataclass
class StorageInfo:
    nbytes: int
    role: str
    module: str | None
    phase: str


@dataclass
class Peak:
    """The largest live total and what made it up."""

    total: int
    event_index: int
    phase: str
    op: str
    by_role: dict[str, int]
    by_module: dict[str, int]


@dataclass
class Ledger:
    """Allocation events of one simulated run. ``round_size`` maps a request to the bytes it occupies."""

    storages: list[StorageInfo] = field(default_factory=list)
    events: list[tuple[int, int, str]] = field(default_factory=list)
    activation_bytes_by_module: dict[str, int] = field(default_factory=dict)
    iteration_marks: list[int] = field(default_factory=list)

    def allocate(self, nbytes: int, role: str, module: str | None, phase: str) -> int:
        sid = len(self.storages)
        self.storages.append(StorageInfo(nbytes, role, module, phase))
        self.events.append((ALLOC, sid, ""))
        return sid

    def free(self, sid: int) -> None:
        self.events.append((FREE, sid, ""))

    def mark_op(self, name: str, phase: str) -> None:
        self.events.append((OP, -1, f"{phase}/{name}"))

    def mark_iteration(self) -> None:
        self.iteration_marks.append(len(self.events))

    def set_role(self, sid: int, role: str) -> None:
        """Give a storage its final role (a storage's role is what it turns out to be, e.g. a gradient)."""
        self.storages[sid].role = role

    def replay(self, round_size: Callable[[int], int], start: int = 0,
               on_op: Callable[[int, str, dict[str, int]], None] | None = None) -> Peak:
        """Walk the events from ``start`` and return the peak of live rounded bytes."""
        live_by_role = dict.fromkeys(ROLES, 0)
        live: dict[int, int] = {}
        total = 0
        best = Peak(0, 0, "", "", dict(live_by_role), {})
        best_live: dict[int, int] = {}
        last_op = ""
        for index, (kind, sid, name) in enumerate(self.events):
            if kind == OP:
                last_op = name.partition("/")[2]
                if on_op is not None and index >= start:
                    on_op(index, name, live_by_role)
                continue
            info = self.storages[sid]
            size = round_size(info.nbytes)
            if kind == ALLOC:
                live[sid] = size
                live_by_role[info.role] += size
                total += size
            elif sid in live:
                del live[sid]
                live_by_role[info.role] -= size
                total -= size
            if index >= start and total > best.total:
                best = Peak(total, index, info.phase, last_op, dict(live_by_role), {})
                best_live = dict(live)
        best.by_module = self._by_module(best_live)
        return best

    def _by_module(self, live: dict[int, int]) -> dict[str, int]:
        by_module: dict[str, int] = {}
        for sid, size in live.items():
            module = self.storages[sid].module or ""
            by_module[module] = by_module.get(module, 0) + size
        return by_module

    def peak_per_iteration(self, round_size: Callable[[int], int]) -> list[int]:
        """Peak of each iteration (events between marks), as ``max_memory_allocated`` after a reset."""
        bounds = [*self.iteration_marks, len(self.events)]
        peaks = []
        live = 0
        sizes = [round_size(s.nbytes) for s in self.storages]
        alive: set[int] = set()
        position = 0
        for end in bounds[1:]:
            # The allocator's peak counter restarts at what is live when it is reset.
            peak = live
            while position < end:
                kind, sid, _ = self.events[position]
                if kind == ALLOC:
                    alive.add(sid)
                    live += sizes[sid]
                elif kind == FREE and sid in alive:
                    alive.discard(sid)
                    live -= sizes[sid]
                peak = max(peak, live)
                position += 1
            peaks.append(peak)
        return peaks

    def timeline(self, round_size: Callable[[int], int], start: int, max_points: int = 2000) -> list[TimelinePoint]:
        """Live bytes per category after each op from ``start``, thinned to ``max_points`` (for plots)."""
        points: list[TimelinePoint] = []

        def record(index: int, label: str, live_by_role: dict[str, int]) -> None:
            phase, _, op = label.partition("/")
            points.append(TimelinePoint(index=index, phase=phase, op=op, module=None,
                                        categories={k: v for k, v in live_by_role.items() if v}))

        self.replay(round_size, start, on_op=record)
        stride = max(1, -(-len(points) // max_points))
        return points[::stride]


def _allocations(ledger: Ledger) -> list[tuple[int, int, str]]:
    """The alloc/free sequence; op markers may differ (a fresh fake mode records a few extra)."""
    return [event for event in ledger.events if event[0] != OP]


def interpolate(first: Ledger, first_batch: int, second: Ledger, second_batch: int, batch: int) -> Ledger | None:
    """The ledger at ``batch`` from two simulations, when both ran the same ops in the same order.

    Every storage's size is then affine in the batch size (a shape's batch dimension times
    the rest), so two points determine it; sizes round up, never down. Returns None when the
    op sequences differ (control flow that depends on the batch): simulate instead.
    """
    if len(first.storages) != len(second.storages) or _allocations(first) != _allocations(second):
        return None
    span = second_batch - first_batch
    storages = []
    for a, b in zip(first.storages, second.storages):
        size = a.nbytes + -(-(b.nbytes - a.nbytes) * (batch - first_batch) // span)
        if size < 0:
            return None
        storages.append(StorageInfo(size, a.role, a.module, a.phase))
    return Ledger(storages=storages, events=first.events, iteration_marks=first.iteration_marks)
