"""Where compute, distributed strategies and activation checkpointing meet the estimator.

The estimator (memlint/estimator.py) calls this module at three points:

1. ``ScalePlan(model, workload, target)`` once the fake model is built;
2. every simulation runs through ``ScalePlan.simulate``, which wraps the top-level blocks in
   checkpointing (``--checkpoint-layers``), adds the unit markers a strategy needs, and rewrites
   the recorded ledger into one device's ledger (memlint/distributed.py), so the peak, the
   breakdown, MEM001 and the largest batch are all per device;
3. the main simulation also gets a ``StepCounter`` (memlint/compute.py), and
   ``ScalePlan.annotate`` fills the report's FLOPs, bytes, times and checkpointing estimate.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from memlint import compute
from memlint.blocks import checkpointing, top_level_blocks
from memlint.distributed import UnitMarkers, apply_strategy, plan_strategy
from memlint.targets import Target


class ScalePlan:
    def __init__(self, model: torch.nn.Module, workload: Any, target: Target) -> None:
        self.model = model
        self.target = target
        self.checkpoint_layers = bool(getattr(workload, "checkpoint_layers", False))
        self.epoch_size = getattr(workload, "epoch_size", None)
        self.blocks = top_level_blocks(model)
        self.strategy = plan_strategy(model, getattr(workload, "strategy", "none") or "none",
                                      getattr(workload, "devices", 1) or 1, self.blocks)

    def simulate(self, run: Callable[[tuple[Any, ...]], Any], extra_modes: tuple[Any, ...] = ()) -> Any:
        """``run(modes)`` simulates with those extra modes; returns its result for one device."""
        markers = UnitMarkers(self.model, self.strategy) if self.strategy and self.strategy.needs_markers else None
        modes = (*extra_modes, *((markers,) if markers else ()))
        with checkpointing(self.model, self.blocks) if self.checkpoint_layers else contextlib.nullcontext():
            result = run(modes)
        if self.strategy is not None:
            result.ledger = apply_strategy(result.ledger, self.strategy, markers.marks if markers else [])
        return result

    def step_counter(self) -> compute.StepCounter:
        """Counts the last step of the simulation it is passed to (each step replaces the last's counts)."""
        return compute.StepCounter(self.model, self.target, self.blocks)

    def annotate(self, report: Any, counter: compute.StepCounter, result: Any) -> None:
        devices = self.strategy.devices if self.strategy else 1
        compute.annotate(report, counter, result, data_parallel=devices, epoch_size=self.epoch_size,
                         checkpointed=self.checkpoint_layers)
        report.strategy = self.strategy.name if self.strategy else "none"
        report.devices = devices
        report.checkpoint_layers = self.checkpoint_layers
