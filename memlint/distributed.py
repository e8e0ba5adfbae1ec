"""Memory per device under data parallelism: DDP, FSDP (full shard) and ZeRO stages 1 to 3.

The simulation runs one device's step at its own (per-device) batch size. A strategy changes
which of those bytes the device holds, and when, and adds buffers of its own; memlint applies
it by rewriting the simulated ledger before the allocator replay, storage by storage, by the
role each storage turned out to play and the module it belongs to. Everything downstream (the
caching-allocator replay, the breakdown, MEM001, the largest batch) then sees one device.

What each strategy does to the ledger (N devices; "shard" is ``ceil(bytes / N)``):

========  ==========  ===========================  ====================  ==========================
strategy  parameters  gradients                    optimizer state (*)   added buffers
========  ==========  ===========================  ====================  ==========================
ddp       replicated  replicated                   replicated            the Reducer's flat buckets
zero1     replicated  replicated                   sharded               -
zero2     replicated  sharded after its unit's     sharded               reduce-scatter input
                      backward
zero3     sharded     as zero2                     sharded               all-gather per module
fsdp      sharded     as zero2                     sharded               all-gather per block
========  ==========  ===========================  ====================  ==========================

(*) with the optimizer step's temporaries (its foreach intermediates), which work on the
shard too.

* **DDP** (``torch.nn.parallel.DistributedDataParallel`` defaults, ``bucket_cap_mb=25``,
  ``gradient_as_bucket_view=False``): the Reducer copies gradients into flat bucket tensors,
  one allocation per bucket, allocated when DDP is constructed and kept. In the first iteration
  all parameters share one bucket (PyTorch skips initial bucketing unless
  ``find_unused_parameters``); before the second forward the Reducer frees it and rebuilds
  buckets in the order gradients became ready (here: reverse definition order), the first
  capped at 1 MiB, the others at 25 MiB, each closed once it reaches its cap.
* **FSDP** (``fully_shard`` with ``reshard_after_forward=True`` on each top-level block, see
  memlint/blocks.py, and on the root): every parameter, gradient and optimizer-state tensor is
  held as one ``1/N`` shard. Before a block's forward its parameters are all-gathered into one
  unsharded buffer (with a ``1/N`` all-gather input that is freed at once), and the next
  block's are prefetched; the buffer is freed after the block's forward, gathered again
  before its backward (prefetching the next block in backward order) and freed after it.
  The root's own parameters (embeddings, heads: those outside every block) stay gathered
  from the start of forward to the end of backward, as FSDP2 does for the root. A block's
  gradients live unsharded until its backward ends; then they are copied into a flat
  reduce-scatter input, freed, and replaced by their shards.
* **ZeRO-3** is modelled as FSDP with the all-gather unit being each module that holds
  parameters (DeepSpeed fetches parameters per submodule), prefetching the next one.
  DeepSpeed's parameter cache (``stage3_max_live_parameters``) and its communication buckets
  (``reduce_bucket_size``, ``allgather_bucket_size``) are not modelled.
* **ZeRO-1/2** keep the parameters whole; their gradient reduction is modelled like FSDP's
  (per block, as a bucket of one block's gradients).

Not modelled: NCCL's own buffers (outside the caching allocator), communication time, the
recording of streams that can keep a freed buffer reserved a little longer.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook
from torch.utils._pytree import tree_flatten

from memlint.blocks import parameter_owners, top_level_blocks, within
from memlint.ledger import ALLOC, FREE, OP, Ledger, StorageInfo

STRATEGIES = ("none", "ddp", "fsdp", "zero1", "zero2", "zero3")
DDP_FIRST_BUCKET = 1 << 20      # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
DDP_BUCKET_CAP = 25 << 20       # DistributedDataParallel(bucket_cap_mb=25)

FWD_PRE, FWD_POST, BWD_PRE, BWD_POST = range(4)
_ORDER = {FWD_POST: 0, BWD_POST: 1, FWD_PRE: 2, BWD_PRE: 3}  # at one moment: frees before gathers


@dataclass(frozen=True)
class Unit:
    """What is all-gathered and reduce-scattered together: a block, a module, or the root's rest."""

    name: str          # module name; "" is the root (its parameters outside every other unit)
    gather_bytes: int  # its parameters, unsharded


@dataclass
class Strategy:
    name: str
    devices: int
    shard_parameters: bool
    shard_gradients: bool
    shard_optimizer: bool
    buckets: bool
    units: list[Unit] = field(default_factory=list)
    bucket_sizes: list[int] = field(default_factory=list)
    bucket_total: int = 0
    owners: dict[str, int] = field(default_factory=dict)  # parameter-owning module -> unit index

    @property
    def needs_markers(self) -> bool:
        return self.shard_parameters or self.shard_gradients

    def shard(self, nbytes: int) -> int:
        return math.ceil(nbytes / self.devices)


def plan_strategy(model: nn.Module, name: str, devices: int, blocks: list[str] | None = None) -> Strategy | None:
    """The strategy's plan for this model; None for ``none``."""
    if name in (None, "", "none"):
        return None
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}")
    devices = max(1, int(devices))
    strategy = Strategy(name=name, devices=devices, shard_parameters=name in ("fsdp", "zero3"),
                        shard_gradients=name in ("fsdp", "zero2", "zero3"),
                        shard_optimizer=name in ("fsdp", "zero1", "zero2", "zero3"), buckets=name == "ddp")
    owners = parameter_owners(model)
    modules = dict(model.named_modules())
    if name == "zero3":
        names = [m for m, module in modules.items() if m and next(module.parameters(recurse=False), None) is not None]
    else:
        names = list(blocks if blocks is not None else top_level_blocks(model))
    strategy.units = []
    for unit_name in names:
        params = {id(p): p for p in (modules[unit_name].parameters(recurse=False) if name == "zero3"
                                     else modules[unit_name].parameters())}
        strategy.units.append(Unit(unit_name, sum(p.numel() * p.element_size() for p in params.values())))
    unit_of = {unit.name: index for index, unit in enumerate(strategy.units)}
    rest = 0
    for param in {id(p): p for p in model.parameters()}.values():
        owner = owners.get(id(param), "")
        index = unit_of.get(owner) if name == "zero3" else next(
            (i for i, unit in enumerate(strategy.units) if within(owner, unit.name)), None)
        if index is None:
            rest += param.numel() * param.element_size()
    strategy.units.append(Unit("", rest))
    root = len(strategy.units) - 1
    for owner in set(owners.values()):
        index = unit_of.get(owner) if name == "zero3" else next(
            (i for i, unit in enumerate(strategy.units[:-1]) if within(owner, unit.name)), None)
        strategy.owners[owner or "(model)"] = root if index is None else index
    if strategy.buckets:
        grads = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]
        strategy.bucket_total = sum(p.numel() * p.element_size() for p in grads)
        strategy.bucket_sizes = ddp_buckets(list(reversed(grads)))
    return strategy


def ddp_buckets(params: list[torch.Tensor], limits: tuple[int, ...] = (DDP_FIRST_BUCKET, DDP_BUCKET_CAP)) -> list[int]:
    """Byte sizes of DDP's buckets, as ``_compute_bucket_assignment_by_size`` groups them (per dtype)."""
    open_buckets: dict[torch.dtype, int] = {}
    limit_index: dict[torch.dtype, int] = defaultdict(int)
    sizes = []
    for param in params:
        key = param.dtype
        open_buckets[key] = open_buckets.get(key, 0) + param.numel() * param.element_size()
        if open_buckets[key] >= limits[min(limit_index[key], len(limits) - 1)]:
            sizes.append(open_buckets.pop(key))
            limit_index[key] += 1
    sizes.extend(size for size in open_buckets.values() if size)
    return sizes


class UnitMarkers:
    """Records, during a simulation, where each unit's forward and backward begin and end.

    An extra mode of ``simulate_step``: it receives the storage tracker (``attach``) and
    writes ``(event index, kind, unit)`` marks against the ledger being recorded. Backward
    marks come from gradient hooks on the unit's outputs (its backward starts) and inputs (it
    ends), in ``any`` mode so that no gradient is held longer than autograd holds it.
    """

    def __init__(self, model: nn.Module, strategy: Strategy) -> None:
        self.model = model
        self.strategy = strategy
        self.marks: list[tuple[int, int, int]] = []
        self.ledger: Ledger | None = None
        self._handles: list[Any] = []
        self._iteration = self._iteration_first_mark = 0  # the iteration being marked, its first mark

    def attach(self, tracker: Any) -> None:
        self.ledger = tracker.ledger
        self.marks = []
        self._iteration = self._iteration_first_mark = 0

    def _mark(self, kind: int, unit: int) -> None:
        if self.ledger is not None:
            if self._iteration != len(self.ledger.iteration_marks):  # the first mark of an iteration
                self._iteration, self._iteration_first_mark = len(self.ledger.iteration_marks), len(self.marks)
            self.marks.append((len(self.ledger.events), kind, unit))

    def repeat_iteration(self, shift: int) -> None:
        """The simulation recorded its last iteration again, ``shift`` events later: so are its marks."""
        assert self.ledger is not None
        repeated = [(index + shift, kind, unit) for index, kind, unit in self.marks[self._iteration_first_mark:]] \
            if self._iteration == len(self.ledger.iteration_marks) - 1 else []
        self._iteration, self._iteration_first_mark = len(self.ledger.iteration_marks), len(self.marks)
        self.marks.extend(repeated)

    def _grad_hook(self, values: Any, kind: int, unit: int) -> None:
        tensors = [t for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        if tensors and torch.is_grad_enabled():
            self._handles.append(register_multi_grad_hook(tensors, lambda _grad: self._mark(kind, unit), mode="any"))

    def __enter__(self) -> "UnitMarkers":
        modules = dict(self.model.named_modules())
        for index, unit in enumerate(self.strategy.units):
            module = modules[unit.name] if unit.name else self.model

            def pre(_module: nn.Module, args: Any, kwargs: Any, index: int = index) -> None:
                if torch._C._current_graph_task_id() == -1:
                    self._mark(FWD_PRE, index)
                    self._grad_hook((args, kwargs), BWD_POST, index)

            def post(_module: nn.Module, _args: Any, _kwargs: Any, output: Any, index: int = index) -> None:
                if torch._C._current_graph_task_id() == -1:
                    self._mark(FWD_POST, index)
                    self._grad_hook(output, BWD_PRE, index)

            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(post, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _phase_ends(ledger: Ledger) -> list[tuple[int, int, int | None]]:
    """Per iteration: (start, end, end of backward or None) as event indices."""
    bounds = [*ledger.iteration_marks, len(ledger.events)] if ledger.iteration_marks else [0, len(ledger.events)]
    result = []
    for start, end in zip(bounds, bounds[1:]):
        last_backward = None
        for index in range(start, end):
            kind, _, label = ledger.events[index]
            if kind == OP and label.startswith("backward/"):
                last_backward = index
        result.append((start, end, None if last_backward is None else last_backward + 1))
    return result


def apply_strategy(ledger: Ledger, strategy: Strategy, marks: list[tuple[int, int, int]]) -> Ledger:
    """The ledger one device records under ``strategy`` (see the module docstring)."""
    storages = [replace(info) for info in ledger.storages]
    before: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
    free_as: dict[int, int] = {}

    def new(nbytes: int, role: str, module: str | None, phase: str) -> int:
        storages.append(StorageInfo(nbytes, role, module, phase))
        return len(storages) - 1

    for info in storages:
        if strategy.shard_parameters and info.role == "parameters":
            info.nbytes = strategy.shard(info.nbytes)
        elif strategy.shard_optimizer and (info.role == "optimizer_state"
                                           or (info.phase == "optimizer" and info.role == "temporaries")):
            info.nbytes = strategy.shard(info.nbytes)

    if strategy.buckets:
        _ddp_buckets(ledger, strategy, before, new)
    if strategy.needs_markers:
        _gathers_and_reductions(ledger, strategy, marks, storages, before, free_as, new)

    events: list[tuple[int, int, str]] = []
    remap: dict[int, int] = {}
    for index, event in enumerate(ledger.events):
        remap[index] = len(events)
        events.extend(before.get(index, ()))
        kind, sid, name = event
        events.append((FREE, free_as[sid], name) if kind == FREE and sid in free_as else event)
    events.extend(before.get(len(ledger.events), ()))
    remap[len(ledger.events)] = len(events)
    return Ledger(storages=storages, events=events, activation_bytes_by_module=dict(ledger.activation_bytes_by_module),
                  iteration_marks=[remap[mark] for mark in ledger.iteration_marks])


def _ddp_buckets(ledger: Ledger, strategy: Strategy, before: dict, new: Any) -> None:
    marks = ledger.iteration_marks or [0]
    whole = new(strategy.bucket_total, "gradients", None, "setup")
    before[marks[0]].append((ALLOC, whole, ""))
    if len(marks) > 1:  # rebuilt before the second forward: the old bucket goes first
        before[marks[1]].append((FREE, whole, ""))
        for size in strategy.bucket_sizes:
            before[marks[1]].append((ALLOC, new(size, "gradients", None, "forward"), ""))


def _gathers_and_reductions(ledger: Ledger, strategy: Strategy, marks: list[tuple[int, int, int]],
                            storages: list[StorageInfo], before: dict, free_as: dict[int, int], new: Any) -> None:
    root = len(strategy.units) - 1
    allocated_at: dict[int, int] = {}
    freed_at: dict[int, int] = {}
    for index, (kind, sid, _) in enumerate(ledger.events):
        if kind == ALLOC:
            allocated_at[sid] = index
        elif kind == FREE:
            freed_at[sid] = index
    gradients = [sid for sid, info in enumerate(ledger.storages) if info.role == "gradients"]

    for start, end, backward_end in _phase_ends(ledger):
        release_all = backward_end if backward_end is not None else end
        moments = sorted(((i, k, u) for i, k, u in marks if start <= i < end), key=lambda m: (m[0], _ORDER[m[1]]))
        # Gradients of each unit, reduced when the unit's backward ends (or when backward ends).
        pending: dict[int, list[int]] = defaultdict(list)
        for sid in gradients:
            if start <= allocated_at.get(sid, -1) < end:
                pending[strategy.owners.get(ledger.storages[sid].module or "(model)", root)].append(sid)
        gathered: dict[int, int] = {}
        first_backward = next((at for at, kind, _ in moments if kind in (BWD_PRE, BWD_POST)), end)

        def gather(unit: int, at: int) -> None:
            size = strategy.units[unit].gather_bytes
            if unit in gathered or size == 0 or not strategy.shard_parameters:
                return
            phase = "backward" if at >= first_backward else "forward"
            shard = new(strategy.shard(size), "temporaries", strategy.units[unit].name or None, phase)
            full = new(size, "parameters", strategy.units[unit].name or None, phase)
            before[at].extend([(ALLOC, shard, ""), (ALLOC, full, ""), (FREE, shard, "")])
            gathered[unit] = full

        def release(unit: int, at: int) -> None:
            if unit in gathered:
                before[at].append((FREE, gathered.pop(unit), ""))

        def reduce(unit: int, at: int) -> None:
            waiting = pending.pop(unit, [])
            later = [sid for sid in waiting if allocated_at[sid] >= at]  # not computed yet: reduced later
            if later:
                pending[unit] = later
            sids = [sid for sid in waiting if allocated_at[sid] < at and freed_at.get(sid, end) > at]
            if not sids:
                return
            flat = new(sum(storages[sid].nbytes for sid in sids), "temporaries", strategy.units[unit].name or None,
                       "backward")
            before[at].append((ALLOC, flat, ""))
            for sid in sids:
                shard = new(strategy.shard(storages[sid].nbytes), "gradients", storages[sid].module, "backward")
                before[at].extend([(FREE, sid, ""), (ALLOC, shard, "")])
                free_as[sid] = shard
            before[at].append((FREE, flat, ""))

        # Each unit is gathered when its forward (or backward) starts, with the next one prefetched.
        orders = {pre: [u for _, k, u in moments if k == pre] for pre in (FWD_PRE, BWD_PRE)}
        seen = dict.fromkeys(orders, 0)
        for at, kind, unit in moments:
            if kind in orders:
                gather(unit, at)
                seen[kind] += 1
                following = [u for u in orders[kind][seen[kind]:] if u != root]
                if following and unit != root:
                    gather(following[0], at)
            elif kind == FWD_POST and unit != root:
                release(unit, at)
            elif kind == BWD_POST and unit != root:
                release(unit, at)
                if strategy.shard_gradients:
                    reduce(unit, at)
        for unit in list(gathered):
            release(unit, release_all)
        if strategy.shard_gradients and backward_end is not None:
            for unit in list(pending):
                reduce(unit, backward_end)


# DeepSpeed's closed forms for model states (ZeRO paper, Rajbhandari et al. 2020, section 5.3):
# bytes per parameter for parameters + gradients + optimizer state, psi parameters, N devices.
def zero_closed_form(strategy: str, psi: int, devices: int, *, params: float = 2, grads: float = 2,
                     optimizer: float = 12) -> float:
    """Model-state bytes per device. Defaults: mixed-precision Adam (2 + 2 + 12 bytes per parameter)."""
    n = devices
    return {
        "ddp": (params + grads + optimizer) * psi,
        "zero1": (params + grads) * psi + optimizer * psi / n,
        "zero2": params * psi + (grads + optimizer) * psi / n,
        "zero3": (params + grads + optimizer) * psi / n,
        "fsdp": (params + grads + optimizer) * psi / n,
    }[strategy]
