"""The ledger: every storage a simulated step allocates and frees, in order.

The simulator writes events; everything numeric (peaks, the breakdown at the peak, the
timeline, per-layer activation bytes) is derived here by replaying them, so the same
record serves the verdict, the table and the plot. Plain Python: no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Callable

from memlint.report import TimelinePoint

ALLOC, FREE, OP = 0, 1, 2
# The OP event where an iteration's optimizer step begins (``Ledger.mark_step``).
STEP_BEGINS = "optimizer/step"

# Roles a storage can play; `temporaries` is the default until something better is known;
# `workspace` is library memory the GPU allocates beside the step (memlint/library_memory.py).
ROLES = ("parameters", "buffers", "gradients", "optimizer_state", "activations", "inputs", "temporaries",
         "workspace")


@dataclass
class StorageInfo:
    nbytes: int
    role: str
    module: str | None
    phase: str
    elastic: bool = False  # a kernel's scratch that the kernel does without when memory is short (cuDNN's)

    @property
    def persistent_workspace(self) -> bool:
        """Library memory kept for the whole process (cuBLAS's workspaces), not a kernel's scratch."""
        return self.role == "workspace" and not self.elastic

    def resized(self, nbytes: int) -> StorageInfo:
        """The same storage at another size (a direct copy: dataclasses.replace is 4x slower here)."""
        return StorageInfo(nbytes, self.role, self.module, self.phase, self.elastic)


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
    # allocation_events(), kept with the events list and length it was made from.
    _allocation_cache: tuple[list, int, list[tuple[int, int]]] | None = field(default=None, init=False, repr=False,
                                                                              compare=False)

    def allocation_events(self) -> list[tuple[int, int]]:
        """The ALLOC and FREE events as (kind, storage id), without the op marks: what the allocator reads.

        The batch search replays one ledger some twenty times; this is made once per change of the events.
        """
        kept = self._allocation_cache
        if kept is None or kept[0] is not self.events or kept[1] != len(self.events):
            kept = self._allocation_cache = (self.events, len(self.events),
                                        [(kind, sid) for kind, sid, _ in self.events if kind != OP])
        return kept[2]

    def allocate(self, nbytes: int, role: str, module: str | None, phase: str, elastic: bool = False) -> int:
        sid = len(self.storages)
        self.storages.append(StorageInfo(nbytes, role, module, phase, elastic))
        self.events.append((ALLOC, sid, ""))
        return sid

    def free(self, sid: int) -> None:
        self.events.append((FREE, sid, ""))

    def mark_op(self, name: str, phase: str) -> None:
        self.events.append((OP, -1, f"{phase}/{name}"))

    def mark_step(self) -> None:
        """Mark where the optimizer step begins: what it allocates depends on the parameters, not the batch."""
        self.events.append((OP, -1, STEP_BEGINS))

    def mark_iteration(self) -> None:
        self.iteration_marks.append(len(self.events))

    def repeat_last_iteration(self) -> None:
        """Record the last iteration again, its storages under new ids.

        For an iteration that freed every storage it allocated and nothing it found
        (``simulate_step`` checks): the next one, starting from the same state, records this.
        """
        start = self.iteration_marks[-1]
        self.mark_iteration()
        self.repeat_events(start, self.iteration_marks[-1])

    def repeat_events(self, start: int, end: int) -> dict[int, int]:
        """Record ``events[start:end]`` again, the storages they allocate under new ids (old id -> new id)."""
        renamed: dict[int, int] = {}
        for kind, sid, name in self.events[start:end]:
            if kind == ALLOC:
                renamed[sid] = len(self.storages)
                self.storages.append(replace(self.storages[sid]))
            self.events.append((kind, renamed.get(sid, sid), name))
        return renamed

    def set_role(self, sid: int, role: str) -> None:
        """Give a storage its final role (a storage's role is what it turns out to be, e.g. a gradient)."""
        self.storages[sid].role = role

    def replay(self, round_size: Callable[[int], int], start: int = 0,
               on_op: Callable[[int, str, dict[str, int]], None] | None = None, op_stride: int = 1) -> Peak:
        """Walk the events from ``start`` and return the peak of live rounded bytes.

        ``on_op`` sees every ``op_stride``-th op marker from ``start`` with the live bytes per role.
        """
        live_by_role = dict.fromkeys(ROLES, 0)
        live: set[int] = set()
        total = 0
        best = Peak(0, 0, "", "", dict(live_by_role), {})
        last_op = "/"
        ops_seen = 0
        for index, (kind, sid, name) in enumerate(self.events):
            if kind == OP:
                last_op = name
                if on_op is not None and index >= start:
                    if ops_seen % op_stride == 0:
                        on_op(index, name, live_by_role)
                    ops_seen += 1
                continue
            info = self.storages[sid]
            if kind == ALLOC:
                size = round_size(info.nbytes)
                live.add(sid)
                live_by_role[info.role] += size
                total += size
            elif sid in live:
                size = round_size(info.nbytes)
                live.discard(sid)
                live_by_role[info.role] -= size
                total -= size
            if index >= start and total > best.total:
                best = Peak(total, index, info.phase, last_op.partition("/")[2], dict(live_by_role), {})
        best.by_module = self._by_module(round_size, best.event_index) if best.total else {}
        return best

    def _by_module(self, round_size: Callable[[int], int], until: int) -> dict[str, int]:
        """Live rounded bytes per module just after event ``until`` (a second pass: less than a copy per new peak)."""
        live: dict[int, None] = {}  # ordered as the allocations
        for kind, sid, _ in self.events[:until + 1]:
            if kind == ALLOC:
                live[sid] = None
            elif kind == FREE:
                live.pop(sid, None)
        by_module: dict[str, int] = {}
        for sid in live:
            module = self.storages[sid].module or ""
            by_module[module] = by_module.get(module, 0) + round_size(self.storages[sid].nbytes)
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

        ops = sum(1 for kind, _, _ in self.events[start:] if kind == OP)
        self.replay(round_size, start, on_op=record, op_stride=max(1, -(-ops // max_points)))
        return points


def _allocations(events: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """The alloc/free sequence; op markers may differ (a fresh fake mode records a few extra)."""
    return [event for event in events if event[0] != OP]


def same_allocations(first: Ledger, second: Ledger) -> bool:
    """Whether two simulations allocated and freed their storages in the same order, as ``interpolated_sizes`` needs.

    They do not where control flow depends on the batch size: then simulate instead.
    """
    return len(first.storages) == len(second.storages) and first.allocation_events() == second.allocation_events()


def from_first_iteration(full: Ledger, probe: Ledger) -> Ledger | None:
    """``full``'s ledger at another batch size, from ``probe``: its first iteration simulated there.

    A step's later iterations repeat the first one's forward and backward (the same storages,
    allocated in the same order) and add an optimizer step on parameter-shaped storages, which
    the batch size does not change. Where ``full`` shows exactly that, and the probe allocates
    what ``full``'s first iteration allocates, every size at the probe's batch size is known
    from the probe: a simulation of one iteration stands in for one of all of them. A probe that
    ended before its optimizer step (``StepPlan.optimizer_step``) is matched with ``full``'s first
    iteration up to that step, whose sizes are then ``full``'s. Returns None otherwise (then
    simulate them all).
    """
    if len(full.iteration_marks) < 2 or len(probe.iteration_marks) != 1:
        return None
    first_end = full.iteration_marks[1]
    if _ended_before_step(probe):
        first_end = _step_begins(full, full.iteration_marks[0], first_end) or first_end
    sizes = _aligned_sizes(full, full.events[:first_end], probe, probe.events)
    if sizes is None or any(sizes[sid] != full.storages[sid].nbytes for sid in sizes
                            if full.storages[sid].phase == "optimizer"):
        return None
    first = _batch_dependent_allocations(full, full.events[full.iteration_marks[0]:first_end])
    bounds = [*full.iteration_marks[1:], len(full.events)]
    for start, end in zip(bounds, bounds[1:]):
        later = _batch_dependent_allocations(full, full.events[start:end])
        if len(later) != len(first) or any(
                (full.storages[a].nbytes, full.storages[a].role) != (full.storages[b].nbytes, full.storages[b].role)
                for a, b in zip(first, later)):
            return None
        sizes.update({b: sizes[a] for a, b in zip(first, later)})
    return Ledger(storages=[info.resized(sizes.get(sid, info.nbytes)) for sid, info in enumerate(full.storages)],
                  events=full.events, iteration_marks=full.iteration_marks)


def _step_begins(ledger: Ledger, start: int, end: int) -> int | None:
    """The index of the first optimizer step's mark among ``ledger.events[start:end]``, or None."""
    return next((index for index in range(start, end) if ledger.events[index] == (OP, -1, STEP_BEGINS)), None)


def _ended_before_step(probe: Ledger) -> bool:
    """Whether the probe's optimizer step allocated nothing: it did not run, or it works in place."""
    begins = _step_begins(probe, 0, len(probe.events))
    return begins is not None and all(kind != ALLOC for kind, _, _ in probe.events[begins:])


def _aligned_sizes(full: Ledger, full_events: list[tuple[int, int, str]], probe: Ledger,
                   probe_events: list[tuple[int, int, str]]) -> dict[int, int] | None:
    """Sizes in ``probe`` of ``full``'s storages, matched event by event (ids may differ).

    The probe may free more after them: what its end frees (the optimizer state), which
    ``full`` frees after its last iteration.
    """
    ours, theirs = _allocations(full_events), _allocations(probe_events)
    if len(theirs) < len(ours) or any(kind != FREE for kind, _, _ in theirs[len(ours):]):
        return None
    mapped: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for (kind, sid, _), (probe_kind, probe_sid, _) in zip(ours, theirs):
        if kind != probe_kind:
            return None
        if kind == ALLOC:
            mine, other = full.storages[sid], probe.storages[probe_sid]
            if (mine.role, mine.phase, mine.module, mine.elastic) != (other.role, other.phase, other.module, other.elastic):
                return None
            mapped[probe_sid], sizes[sid] = sid, other.nbytes
        elif mapped.get(probe_sid, -1) != sid:
            return None
    return sizes


def _batch_dependent_allocations(ledger: Ledger, events: list[tuple[int, int, str]]) -> list[int]:
    """The storages these events allocate outside the optimizer step, in order, but the cuBLAS
    workspaces (library_memory.py puts them before the first iteration's first op)."""
    return [sid for kind, sid, _ in events if kind == ALLOC and ledger.storages[sid].phase != "optimizer"
            and not ledger.storages[sid].persistent_workspace]


def interpolated_sizes(points: list[tuple[Ledger, int]], batch: int) -> list[int] | None:
    """The storages' sizes at ``batch`` from simulations at other batch sizes with ``same_allocations``
    (their events are the first's): each storage's, on the polynomial through its sizes there.

    Two points: every size affine in the batch size (a shape's batch dimension times the rest).
    Three: quadratic, as a batch-by-batch product makes it (contrastive logits, pairwise distances
    within the batch; ``Estimator.max_batch_size`` takes a third where a size outgrows the batch).
    Sizes round up, never down. Returns None where a size would be negative. Sizes, not a ledger:
    the batch search replays some twenty of them.
    """
    # Lagrange's weights at ``batch``, as integers over one denominator (exact: no float rounds a size).
    weights = [math.prod(Fraction(batch - other, at - other) for j, (_, other) in enumerate(points) if j != i)
               for i, (_, at) in enumerate(points)]
    denominator = math.lcm(*(weight.denominator for weight in weights))
    numerators = [int(weight * denominator) for weight in weights]
    scaled = ([numerator * storage.nbytes for storage in ledger.storages]
              for numerator, (ledger, _) in zip(numerators, points))
    sizes = [-(-total // denominator) for total in map(sum, zip(*scaled))]
    return None if sizes and min(sizes) < 0 else sizes
