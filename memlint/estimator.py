"""Attribute memory: simulate the step, replay it through the allocator model, find the largest batch.

This is the stage between the simulation (which records what is allocated) and the rules
(which judge it): it turns a ledger into the ModelReport of the JSON contract.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from memlint.allocator import OutOfMemory, replay_allocator, round_size
from memlint.build import build_fake_model, new_fake_mode
from memlint.errors import ModelError
from memlint.gpu_kernels import GpuKernelMode
from memlint.report import LayerReport, ModelReport
from memlint.simulate import Assumptions, SimulationResult, StepPlan, ValueAssumingMode, simulate_step
from memlint.step import AUTOCAST, CAST, input_factory, loss_factory, optimizer_factory
from memlint.targets import Target
from memlint.tracing import TraceResult, trace_model

MAX_BATCH_LIMIT = 1 << 16  # search no further: such a batch is a configuration, not a plan

# cuBLAS takes its workspace from the caching allocator on the first matmul and keeps it
# (CUBLAS_WORKSPACE_CONFIG defaults in aten/src/ATen/cuda/CublasHandlePool.cpp): ":4096:8"
# (32 MiB) on compute capability 9.0 and newer, ":4096:2:16:8" (8 MiB + 128 KiB) before.
# The H200 allocation traces in shared/calibration/snapshots show the 32 MiB block.
CUBLAS_WORKSPACE_HOPPER = 4096 * 1024 * 8
CUBLAS_WORKSPACE_OLDER = 4096 * 1024 * 2 + 16 * 1024 * 8


def cublas_workspace_bytes(target: Target) -> int:
    if target.kind != "gpu":
        return 0
    capability = target.capability
    return CUBLAS_WORKSPACE_HOPPER if capability is None or capability >= (9, 0) else CUBLAS_WORKSPACE_OLDER


@dataclass
class Workload:
    """What to simulate: the model's entry points and the step's configuration."""

    name: str
    path: str
    line: int
    build: Callable[[], Any]
    example_inputs: Callable[[int], Any] | None
    loss_fn: Callable[[Any, Any], Any] | None
    build_optimizer: Callable[[Any], Any] | None
    batch_size: int
    input_shape: tuple[int, ...] | None
    input_dtype: str
    optimizer: str | None
    precision: str
    mode: str


class Estimator:
    """Builds the model once on fake tensors, then simulates it at any batch size."""

    def __init__(self, workload: Workload, target: Target, threshold: float) -> None:
        self.workload = workload
        self.target = target
        self.threshold = threshold
        self.fake_mode = new_fake_mode()
        self.model, self.sites = build_fake_model(workload.build, self.fake_mode, workload.name, workload.path)
        if workload.precision in CAST:
            with self.fake_mode:
                self.model.to(CAST[workload.precision])
        self.optimizer_factory = optimizer_factory(workload.optimizer, workload.build_optimizer)
        self.loss = loss_factory(workload.loss_fn, workload.path)
        self.workspace = cublas_workspace_bytes(target)
        self._fits: dict[int, bool] = {}

    def plan(self, batch_size: int, iterations: int = 3) -> StepPlan:
        w = self.workload
        return StepPlan(mode=w.mode, make_inputs=input_factory(batch_size, w.example_inputs, w.input_shape,
                                                             w.input_dtype, w.path),
                        loss_fn=self.loss, optimizer_factory=self.optimizer_factory,
                        autocast_dtype=AUTOCAST.get(w.precision), iterations=iterations)

    def trace(self) -> TraceResult:
        scalars = ValueAssumingMode(Assumptions())
        return _translate_errors(lambda: trace_model(self.model, self.plan(self.workload.batch_size).make_inputs,
                                                     self.fake_mode, self.sites, scalars), self.workload)

    def simulate(self, batch_size: int, iterations: int = 3) -> SimulationResult:
        return _translate_errors(lambda: simulate_step(self.model, self.plan(batch_size, iterations), self.fake_mode,
                                                       (GpuKernelMode(),)), self.workload)

    def device_cap(self) -> int:
        """Bytes the caching allocator may reserve: the budget less what lives outside it."""
        return self.target.budget_bytes(self.threshold) - self.target.context_bytes - self.target.workspace_bytes

    def fits(self, batch_size: int) -> bool:
        """Whether a step at this batch size runs under the budget, allocator and all."""
        if batch_size not in self._fits:
            # Iteration 2 of a deterministic simulation repeats exactly from then on (the
            # optimizer state exists from step 1), so two iterations decide what three would.
            ledger = self.simulate(batch_size, iterations=2).ledger
            try:
                replay_allocator(ledger, cap_bytes=self.device_cap(), extra_bytes=self.workspace)
                self._fits[batch_size] = True
            except OutOfMemory:
                self._fits[batch_size] = False
        return self._fits[batch_size]

    def max_batch_size(self, known_peaks: dict[int, int]) -> int | None:
        """Largest batch that fits, by evaluating the memory model, guided by an affine guess."""
        lo, hi = 0, MAX_BATCH_LIMIT + 1
        for batch, fits in self._fits.items():
            lo, hi = (max(lo, batch), hi) if fits else (lo, min(hi, batch))
        peaks = dict(known_peaks)
        while hi - lo > 1:
            candidate = _affine_guess(peaks, self.device_cap(), lo, hi)
            if self.fits(candidate):
                lo = candidate
            else:
                hi = candidate
        return lo or None


def _affine_guess(peaks: dict[int, int], cap: int, lo: int, hi: int) -> int:
    """Next batch to try: where the line through the two largest measured peaks meets the cap."""
    points = sorted(peaks.items())[-2:]
    guess = None
    if len(points) == 2 and points[1][0] != points[0][0]:
        (b0, p0), (b1, p1) = points
        slope = (p1 - p0) / (b1 - b0)
        if slope > 0:
            guess = int(b0 + (cap - p0) / slope)
    if guess is None or not lo < guess < hi:
        guess = (lo + hi) // 2 if hi <= MAX_BATCH_LIMIT else max(lo * 2, 1)
    # Probe both sides of an affine guess so the bracket closes in few steps.
    return min(max(guess, lo + 1), hi - 1)


def _translate_errors(run: Callable[[], Any], workload: Workload) -> Any:
    """Shape mismatches and other errors in the user's forward become one readable ModelError."""
    try:
        return run()
    except ModelError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shape_hint = ("check --input-shape (per sample, without the batch dimension) or example_inputs()"
                      if isinstance(exc, (RuntimeError, ValueError, IndexError)) else
                      "rerun with --debug for the full traceback")
        raise ModelError(f"running {workload.name} on fake tensors failed: {type(exc).__name__}: {first}",
                         path=workload.path, line=workload.line, hint=shape_hint) from exc


def analyse(workload: Workload, target: Target, threshold: float, depth: int = 3, *,
            find_max_batch: bool = True) -> ModelReport:
    """The whole pipeline for one model: build, trace, simulate, attribute, search the batch."""
    estimator = Estimator(workload, target, threshold)
    trace = estimator.trace()
    result = estimator.simulate(workload.batch_size)
    ledger = result.ledger
    peaks = ledger.peak_per_iteration(round_size)
    worst_iteration = max(range(len(peaks)), key=peaks.__getitem__)
    peak = ledger.replay(round_size, start=ledger.iteration_marks[worst_iteration])
    allocator = replay_allocator(ledger, extra_bytes=estimator.workspace)
    peak_allocated = peak.total + estimator.workspace
    library_bytes = target.workspace_bytes + estimator.workspace + (allocator.peak_reserved - allocator.peak_allocated)
    peak_device = allocator.peak_reserved + target.workspace_bytes + target.context_bytes
    breakdown = {role: peak.by_role.get(role, 0) for role in
                 ("parameters", "buffers", "gradients", "optimizer_state", "activations", "inputs", "temporaries")}
    breakdown["workspace"] = library_bytes
    breakdown["context"] = target.context_bytes
    estimator._fits[workload.batch_size] = peak_device <= target.budget_bytes(threshold)
    max_batch = None
    if find_max_batch:
        other = max(1, workload.batch_size * 2)
        second = estimator.simulate(other, iterations=2).ledger
        known = {workload.batch_size: allocator.peak_reserved,
                 other: replay_allocator(second, extra_bytes=estimator.workspace).peak_reserved}
        estimator._fits[other] = known[other] + target.workspace_bytes + target.context_bytes \
            <= target.budget_bytes(threshold)
        max_batch = estimator.max_batch_size(known)
    return ModelReport(
        path=workload.path, name=workload.name, target=target.name, capacity_bytes=target.memory_bytes,
        threshold=threshold, batch_size=workload.batch_size, mode=workload.mode,
        optimizer=(workload.optimizer or ("build_optimizer" if workload.build_optimizer else "adam"))
        if workload.mode == "train" else "none",
        precision=workload.precision, peak_allocated_bytes=peak_allocated, peak_device_bytes=peak_device,
        max_batch_size=max_batch, tracer=trace.tracer, breakdown=breakdown,
        layers=_layers(estimator.model, trace, result, estimator.sites, depth, f"{workload.path}:{workload.line}"), line=workload.line,
        budget_bytes=target.budget_bytes(threshold), peak_phase=peak.phase,
        assumptions=[*trace.notes, *result.assumptions], graph=trace.nodes,
        timeline=ledger.timeline(round_size, ledger.iteration_marks[worst_iteration]),
    )


def _layers(model: torch.nn.Module, trace: TraceResult, result: SimulationResult, sites: dict[str, str],
            depth: int, root_source: str) -> list[LayerReport]:
    """One row per module down to ``depth`` (0 is the whole model), with recursive totals."""
    rows: list[LayerReport] = []
    saved = result.activation_bytes_by_module
    for name, module in model.named_modules():
        level = 0 if not name else name.count(".") + 1
        if level > depth:
            continue
        prefix = f"{name}." if name else ""
        activation = sum(size for owner, size in saved.items()
                         if owner == (name or "(model)") or owner.startswith(prefix) or not name)
        parameter_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        rows.append(LayerReport(name=name or "(model)", type=type(module).__name__,
                                output_shape=trace.module_outputs.get(name), parameter_bytes=parameter_bytes,
                                activation_bytes=activation, source=sites.get(name) if name else root_source,
                                depth=level))
    return rows
