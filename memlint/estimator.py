"""Attribute memory: simulate the step, replay it through the allocator model, find the largest batch.

This is the stage between the simulation (which records what is allocated) and the rules
(which judge it): it turns a ledger into the ModelReport of the JSON contract.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from memlint.allocator import CachingAllocatorModel, OutOfMemory, fits_without_replay, replay_allocator, round_size
from memlint.build import (SmallValuesMode, build_fake_model, fake_parameter_conversions, initialise_lazy_modules,
                           libraries_see_real_tensors)
from memlint.errors import ModelError
from memlint.fakemode import new_fake_mode
from memlint.gpu_kernels import GpuKernelMode, fused_encoder_layers
from memlint.library_memory import (add_cublas_workspaces, cublas_workspace_bytes, cudnn_workspace_bytes,
                                    persistent_workspace_bytes)
from memlint.ledger import Ledger, from_first_iteration, interpolated_sizes, same_allocations
from memlint.report import LayerReport, ModelReport
from memlint.scale import ScalePlan
from memlint.simulate import Assumptions, SimulationResult, StepPlan, ValueAssumingMode, simulate_step
from memlint.step import AUTOCAST, CAST, input_factory, loss_factory, optimizer_factory
from memlint.targets import Target
from memlint.tracing import TraceResult, trace_model

MAX_BATCH_LIMIT = 1 << 16  # search no further: such a batch is a configuration, not a plan
AFFINE, CURVED, APART = "affine", "curved", "apart"  # how two simulated batch sizes interpolate (_pair_kind)

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
    # Compute and scale (memlint/scale.py): per-device strategy, block checkpointing, epoch size.
    strategy: str = "none"
    devices: int = 1
    checkpoint_layers: bool = False
    epoch_size: int | None = None


@dataclass
class Evaluation:
    """One batch size through the memory model: the allocator's verdict under the budget.

    ``allocator`` is the caching allocator's replay, where one ran: under the cap when the step
    fits, else (when asked for, see ``Estimator.evaluate``) under the smallest cap that it needs.
    A probe of the batch search that does not fit, or that bounds decide without a replay, has none.
    """

    fits: bool
    allocator: CachingAllocatorModel | None

    @property
    def reserved(self) -> int:
        """What the caching allocator holds at peak on this target (0 where no replay ran)."""
        return self.allocator.peak_reserved if self.allocator else 0


class Estimator:
    """Builds the model once on fake tensors, then simulates it at any batch size."""

    def __init__(self, workload: Workload, target: Target, threshold: float) -> None:
        self.workload = workload
        self.target = target
        self.threshold = threshold
        self.fake_mode = new_fake_mode()
        self.build_assumptions = Assumptions()
        self.model, self.sites = build_fake_model(workload.build, self.fake_mode, workload.name, workload.path,
                                                  SmallValuesMode(self.build_assumptions, "while building"))
        # Lazy modules take their shapes from a first forward, in the dtype they were built in.
        inputs = input_factory(workload.batch_size, workload.example_inputs, workload.input_shape,
                               workload.input_dtype, workload.path, None)
        _run_model_code(lambda: initialise_lazy_modules(self.model, inputs, self.fake_mode), workload, self.model)
        if workload.precision in CAST:
            with self.fake_mode, fake_parameter_conversions():
                self.model.to(CAST[workload.precision])
        self.optimizer_factory = optimizer_factory(workload.optimizer, workload.build_optimizer)
        self.loss = loss_factory(workload.loss_fn, workload.path)
        self.cublas_workspace = cublas_workspace_bytes(target.capability) if target.kind == "gpu" else 0
        self.kernels = "cuda" if target.kind == "gpu" else "cpu"  # whose kernels the step follows (simulate.py)
        self.evaluations: dict[int, Evaluation] = {}
        self.simulated: dict[int, Ledger] = {}
        self.pair_kinds: dict[tuple[int, int], str] = {}  # two simulated batch sizes: how they interpolate
        self.curve: tuple[int, int, int] | None = None  # three simulated batch sizes that interpolate quadratically
        self.simulate_every_size = False  # where interpolation failed (max_batch_size): no more of it
        self.scale = ScalePlan(self.model, workload, target)
        self.bool_answer = True  # see _traced_and_simulated
        self.probes_misalign = False  # see _from_first_iteration

    def plan(self, batch_size: int) -> StepPlan:
        w = self.workload
        gpu = self.target.kind == "gpu"
        return StepPlan(mode=w.mode, make_inputs=input_factory(batch_size, w.example_inputs, w.input_shape,
                                                             w.input_dtype, w.path, CAST.get(w.precision)),
                        loss_fn=self.loss, optimizer_factory=self.optimizer_factory,
                        autocast_dtype=AUTOCAST.get(w.precision), kernels=self.kernels,
                        kernel_scratch=cudnn_workspace_bytes if gpu else None, bool_answer=self.bool_answer)

    def trace(self) -> TraceResult:
        scalars = ValueAssumingMode(Assumptions(), bool_answer=self.bool_answer, kernels=self.kernels)
        return _run_model_code(lambda: trace_model(self.model, self.plan(self.workload.batch_size).make_inputs,
                                                     self.fake_mode, self.sites, scalars), self.workload)

    def simulate(self, batch_size: int, extra_modes: tuple[Any, ...] = (), iterations: int | None = None,
                 optimizer_step: bool = True) -> SimulationResult:
        # Through the ScalePlan: block checkpointing, strategy markers, one device's ledger; then
        # the library memory the GPU allocates beside the step.
        result = self.scale.simulate(lambda modes: self._simulate(batch_size, modes, iterations, optimizer_step),
                                     extra_modes)
        add_cublas_workspaces(result.ledger, self.cublas_workspace)
        return result

    def _simulate(self, batch_size: int, extra_modes: tuple[Any, ...], iterations: int | None,
                  optimizer_step: bool) -> SimulationResult:
        plan = self.plan(batch_size)
        plan.optimizer_step = optimizer_step
        if iterations is not None:
            plan.iterations = iterations
        # The CUDA kernels' stand-ins on a GPU; on a host, the fake CPU tensors run the CPU's own kernels.
        gpu = self.target.kind == "gpu"
        kernels = (GpuKernelMode(),) if gpu else ()

        def run() -> SimulationResult:
            with fused_encoder_layers(self.model) if gpu else contextlib.nullcontext():
                return simulate_step(self.model, plan, self.fake_mode, (*kernels, *extra_modes))

        return _run_model_code(run, self.workload, self.model)

    def allocator_cap(self) -> int:
        """Bytes the caching allocator may reserve: the budget less what lives outside it."""
        return self.target.budget_bytes(self.threshold) - self.target.context_bytes - self.target.workspace_bytes

    def evaluate(self, batch_size: int, ledger: Ledger | None = None, *, sized: bool = False) -> Evaluation:
        """Replay a step through the allocator model capped at the budget, as a real card would run it.

        Under the cap the allocator frees its cached segments before giving up, so a step
        fits when that replay succeeds; its reserved peak is then what the card holds. What a
        step that does not fit would need costs a bisection of replays, so it is computed only
        when ``sized`` (for the reported batch size), not for every probe of the batch search;
        a probe far from the answer is decided without a replay (``fits_without_replay``).
        """
        known = self.evaluations.get(batch_size)
        if known is None or (sized and known.allocator is None):
            ledger, sizes = (ledger, None) if ledger is not None else self._step_at(batch_size)
            cap = self.allocator_cap()
            decided = None if sized else fits_without_replay(ledger, cap, sizes)
            if decided is not None:
                self.evaluations[batch_size] = Evaluation(decided, None)
                return self.evaluations[batch_size]
            try:
                allocator: CachingAllocatorModel | None = replay_allocator(ledger, cap_bytes=cap, sizes=sizes)
                fits = True
            except OutOfMemory:
                allocator = smallest_sufficient_cap(ledger, sizes) if sized else None
                fits = False
            self.evaluations[batch_size] = Evaluation(fits, allocator)
        return self.evaluations[batch_size]

    def _step_at(self, batch_size: int) -> tuple[Ledger, list[int] | None]:
        """The step's events and sizes at a batch size: interpolated (the events of a simulation, other sizes)
        affinely between the first two simulated batch sizes, in sorted order, that allow it
        (``_pair_kind``), or quadratically through ``curve``, fitted where the first pair that ran the
        same ops is curved; else simulated (its own sizes: None)."""
        if self.curve is None and not self.simulate_every_size:
            for b1, b2 in itertools.combinations(sorted(self.simulated), 2):
                sizes = self._interpolation(b1, b2, batch_size)
                if sizes is not None:
                    return self.simulated[b1], sizes
                if self._pair_kind(b1, b2) == CURVED:
                    self._fit_curve(b1, b2)
                    break
        if self.curve is not None:
            sizes = interpolated_sizes(self._points(self.curve), batch_size)
            if sizes is not None:
                return self.simulated[self.curve[0]], sizes
        return self.simulated_ledger(batch_size), None

    def _interpolation(self, b1: int, b2: int, batch_size: int) -> list[int] | None:
        return interpolated_sizes(self._points((b1, b2)), batch_size) if self._pair_kind(b1, b2) == AFFINE else None

    def _pair_kind(self, b1: int, b2: int) -> str:
        """How two simulated batch sizes ``b1 < b2`` interpolate: APART where they ran different ops (the ops
        depend on the batch size); CURVED where a storage grows faster than the batch between them
        (``s2 * b1 > s1 * b2``), which an affine size with no negative constant never does, and a
        batch-by-batch product does (contrastive logits, every sample against every other: a line through
        two points of it passes under the curve beyond them); else AFFINE."""
        kind = self.pair_kinds.get((b1, b2))
        if kind is None:
            first, second = self.simulated[b1], self.simulated[b2]
            kind = APART if not same_allocations(first, second) else CURVED if any(
                s2.nbytes * b1 > s1.nbytes * b2 for s1, s2 in zip(first.storages, second.storages)) else AFFINE
            self.pair_kinds[b1, b2] = kind
        return kind

    def _fit_curve(self, b1: int, b2: int) -> None:
        """Interpolate quadratically through a third simulation, at ``2 * b2``; where that one runs other
        ops, simulate every batch size instead."""
        b3 = 2 * b2
        if same_allocations(self.simulated[b1], self.simulated_ledger(b3)):
            self.curve = (b1, b2, b3)
        else:
            self.simulate_every_size = True

    def _points(self, batch_sizes: tuple[int, ...]) -> list[tuple[Ledger, int]]:
        return [(self.simulated[size], size) for size in batch_sizes]

    def _interpolated_regardless(self, batch_size: int) -> bool:
        """Whether ``_step_at(batch_size)`` would interpolate the same with a simulation at ``batch_size``.

        It takes the first pair of simulated sizes, in sorted order, that interpolates. A simulation
        at ``batch_size`` would add pairs only after those of the smallest simulated size with the
        sizes below ``batch_size``: when one of those interpolates, the simulation changes nothing.
        """
        smallest, *others = sorted(self.simulated)
        return any(self._interpolation(smallest, other, batch_size) is not None
                   for other in others if other < batch_size)

    def simulated_ledger(self, batch_size: int) -> Ledger:
        """The step's ledger at ``batch_size``, as a simulation of all its iterations records it."""
        if batch_size not in self.simulated:
            self.simulated[batch_size] = self._from_first_iteration(batch_size) or self.simulate(batch_size).ledger
        return self.simulated[batch_size]

    def _from_first_iteration(self, batch_size: int) -> Ledger | None:
        """The ledger from a simulation of the first iteration only, where the step's own shows how (ledger.py).

        Not under a distributed strategy, whose rewrite of the ledger spans its iterations. Once a
        probe failed to line up with the step, later ones are not tried: the step's ops depend on the
        batch size (a detector loops over its images), and each probe would be simulated twice.
        """
        step = self.simulated.get(self.workload.batch_size)
        if step is None or len(step.iteration_marks) < 2 or self.scale.strategy is not None or self.probes_misalign:
            return None
        ledger = from_first_iteration(step, self.simulate(batch_size, iterations=1, optimizer_step=False).ledger)
        self.probes_misalign = ledger is None
        return ledger

    def max_batch_size(self) -> int | None:
        """The largest batch that runs, found the way it is measured: doubling from 1, then bisection.

        The caching allocator makes "fits" slightly non-monotonic near the limit, so the
        procedure matters; this is the one of the calibration protocol. Its probes are
        interpolated between simulated batch sizes (``_step_at``). An affine search's answer is
        evaluated again with a simulation at it, where that simulation takes part in its
        interpolation (``_interpolated_regardless``): an answer beyond the simulated sizes keeps
        the interpolation from the first pair, so it is not simulated. A quadratic search's answer
        (or 1, where none fits) is simulated: where that simulation is not what the curve
        predicted, the search runs again with every probe simulated.
        """
        if 1 in self.simulated and not self.evaluate(1).fits:
            return None  # nothing fits: no second simulation needed (a third of a 70B model's analysis)
        if len(self.simulated) < 2:
            self.simulated_ledger(2 * max(self.simulated, default=1))
        answer = self._doubling_then_bisection()
        if answer is not None and self.curve is None and not self.simulate_every_size:
            answer = self._answer_simulated(answer)
        if self.curve is None or self._curve_predicts(answer or 1):
            return answer
        self.curve, self.simulate_every_size = None, True
        self.evaluations.clear()
        return self._doubling_then_bisection()

    def _doubling_then_bisection(self) -> int | None:
        if not self.evaluate(1).fits:
            return None
        good = 1
        while good * 2 <= MAX_BATCH_LIMIT and self.evaluate(good * 2).fits:
            good *= 2
        bad = good * 2
        while bad - good > 1:
            middle = (good + bad) // 2
            good, bad = (middle, bad) if self.evaluate(middle).fits else (good, middle)
        return good

    def _answer_simulated(self, good: int) -> int:
        """The affine search's answer, or the largest batch below it that fits where a simulation at it
        takes part in its interpolation."""
        while good > 1 and good not in self.simulated:
            if not self._interpolated_regardless(good):
                self.simulated_ledger(good)
                self.evaluations.pop(good, None)  # evaluated again on the step its own simulation joins
            if self.evaluate(good).fits:
                break
            self.simulated_ledger(good)  # the next candidates interpolate with it too
            good -= 1
        return good

    def _curve_predicts(self, batch_size: int) -> bool:
        """Whether a simulation at ``batch_size`` allocates what the quadratic interpolation gave it."""
        assert self.curve is not None
        predicted = interpolated_sizes(self._points(self.curve), batch_size)
        simulated = self.simulated_ledger(batch_size)
        return same_allocations(self.simulated[self.curve[0]], simulated) and \
            predicted == [storage.nbytes for storage in simulated.storages]


def smallest_sufficient_cap(ledger: Ledger, sizes: list[int] | None = None,
                            resolution: int = 2 << 20) -> CachingAllocatorModel:
    """The allocator run under the smallest cap (to 2 MiB) that the step needs: what it really needs.

    Uncapped, the caching allocator keeps every segment it ever made; a card with less memory
    would release cached segments instead, so the uncapped reserve overstates the need.
    """
    uncapped = replay_allocator(ledger, sizes=sizes)
    lo, hi, best = uncapped.peak_allocated - 1, uncapped.peak_reserved, uncapped
    while hi - lo > resolution:
        middle = (lo + hi) // 2
        if middle >= best.peak_reserved:  # a cap the last run never reached changes nothing in it: no replay
            hi = middle
            continue
        try:
            best, hi = replay_allocator(ledger, cap_bytes=middle, sizes=sizes), middle
        except OutOfMemory:
            lo = middle
    return best


_SHAPE_WORDS = ("shape", "size", "dim", "mat1", "mat2", "expected", "must match", "channels", "broadcast")


def _run_model_code(run: Callable[[], Any], workload: Workload, model: torch.nn.Module | None = None) -> Any:
    """Run the user's model code, as on real tensors (``libraries_see_real_tensors``), with readable errors.

    Shape mismatches and other errors in the user's forward become one ModelError. The message
    names the layer that failed (the innermost module whose forward was running),
    what it received, and the line of the user's file the failure came from.
    """
    running: list[tuple[torch.nn.Module, list[str]]] = []

    def enter(module: torch.nn.Module, args: Any) -> None:
        running.append((module, [_shape_text(a) for a in (args if isinstance(args, tuple) else (args,))
                                 if isinstance(a, torch.Tensor)]))

    def leave(module: torch.nn.Module, _args: Any, _output: Any) -> None:
        if running and running[-1][0] is module:
            running.pop()

    hooks = (torch.nn.modules.module.register_module_forward_pre_hook(enter),
             torch.nn.modules.module.register_module_forward_hook(leave)) if model is not None else ()
    try:
        with libraries_see_real_tensors():
            return run()
    except ModelError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        names = {module: name for name, module in model.named_modules()} if model is not None else {}
        failing = next(((names[m], m, shapes) for m, shapes in reversed(running) if m in names and names[m]), None)
        where = (f" in {failing[0]} ({type(failing[1]).__name__}"
                 f"{', which received ' + ' and '.join(failing[2]) if failing[2] else ''})") if failing else ""
        line = _user_line(exc, workload.path) or workload.line
        inplace = "modified by an inplace operation" in first
        if not inplace and isinstance(exc, (RuntimeError, ValueError, IndexError, TypeError)) and \
                any(word in first.lower() for word in _SHAPE_WORDS):
            fed = (f"memlint fed inputs of shape ({workload.batch_size}, "
                   f"{', '.join(map(str, workload.input_shape))}) (batch size {workload.batch_size}, then "
                   "--input-shape / input-shape, which is per sample, without the batch dimension)"
                   if workload.example_inputs is None and workload.input_shape else
                   f"memlint fed example_inputs({workload.batch_size}) from the file")
            raise ModelError(f"the input does not fit {workload.name}{where}: {type(exc).__name__}: {first}",
                             path=workload.path, line=line,
                             hint=f"{fed}; give the shape the model expects, or define "
                                  "example_inputs(batch_size) in the file") from exc
        hint = "rerun with --debug for the full traceback"
        if inplace:
            hint = ("an in-place operation (e.g. nn.ReLU(inplace=True), x += y, x.relu_()) overwrote a tensor that "
                    "backward needs: training fails the same way on a GPU; make that operation out of place")
        raise ModelError(f"running {workload.name} on fake tensors failed{where}: {type(exc).__name__}: {first}",
                         path=workload.path, line=line, hint=hint) from exc
    finally:
        for hook in hooks:
            hook.remove()


def _shape_text(tensor: torch.Tensor) -> str:
    return f"({', '.join(str(int(d)) for d in tensor.shape)})"


def _user_line(exc: BaseException, path: str) -> int | None:
    """The innermost traceback line in the user's file (``path`` as displayed, maybe relative)."""
    import os
    import traceback

    wanted = os.path.normpath(path)
    line = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        filename = os.path.normpath(frame.f_code.co_filename)
        if filename == os.path.abspath(wanted) or filename.endswith(os.sep + wanted.lstrip(os.sep)):
            line = lineno
    return line


def _traced_and_simulated(estimator: Estimator) -> tuple[TraceResult, Any, SimulationResult]:
    """The trace and the step at the batch size asked for, with the step's counter (memlint/compute.py).

    A bool read from a fake tensor is assumed True. Where the step then fails, True may be the
    branch the real data does not take (Longformer's global attention, when no token is global):
    the analysis runs again with False from then on, and fails with the first error when that
    fails too.
    """
    def run() -> tuple[TraceResult, Any, SimulationResult]:
        trace = estimator.trace()
        counter = estimator.scale.step_counter()  # FLOPs, bytes and time of the step
        return trace, counter, estimator.simulate(estimator.workload.batch_size, (counter,))

    try:
        return run()
    except ModelError as first:
        estimator.bool_answer = False
        try:
            return run()
        except ModelError:
            raise first


def analyse(workload: Workload, target: Target, threshold: float, depth: int = 3, *,
            find_max_batch: bool = True) -> ModelReport:
    """The whole pipeline for one model: build, trace, simulate, attribute, search the batch."""
    estimator = Estimator(workload, target, threshold)
    trace, counter, result = _traced_and_simulated(estimator)
    ledger = estimator.simulated[workload.batch_size] = result.ledger
    peaks = ledger.peak_per_iteration(round_size)
    worst_iteration = max(range(len(peaks)), key=peaks.__getitem__)
    peak = ledger.replay(round_size, start=ledger.iteration_marks[worst_iteration])
    evaluation = estimator.evaluate(workload.batch_size, ledger, sized=True)
    # CUDA's caching allocator counts whole blocks: a cached block reused without splitting off a
    # remainder of 1 MiB or less counts entirely, so its replay gives max_memory_allocated.
    peak_allocated = evaluation.allocator.peak_allocated if target.kind == "gpu" else peak.total
    cublas = persistent_workspace_bytes(ledger)
    breakdown = {role: peak.by_role.get(role, 0) for role in
                 ("parameters", "buffers", "gradients", "optimizer_state", "activations", "inputs", "temporaries")}
    # Library workspaces, and what the caching allocator holds beyond the live tensors (the parts
    # then add up to peak_device_bytes).
    breakdown["workspace"] = target.workspace_bytes + peak.by_role["workspace"] + evaluation.reserved - peak.total
    breakdown["context"] = target.context_bytes
    report = ModelReport(
        path=workload.path, name=workload.name, target=target.name, capacity_bytes=target.memory_bytes,
        threshold=threshold, batch_size=workload.batch_size, mode=workload.mode,
        optimizer=(workload.optimizer or ("build_optimizer" if workload.build_optimizer else "adam"))
        if workload.mode == "train" else "none",
        precision=workload.precision, peak_allocated_bytes=peak_allocated,
        peak_device_bytes=evaluation.reserved + target.workspace_bytes + target.context_bytes,
        max_batch_size=estimator.max_batch_size() if find_max_batch else None, tracer=trace.tracer,
        breakdown=breakdown,
        layers=_layers(estimator.model, trace, result, estimator.sites, depth, f"{workload.path}:{workload.line}"),
        line=workload.line, budget_bytes=target.budget_bytes(threshold), peak_phase=peak.phase,
        overhead_bytes=target.context_bytes + target.workspace_bytes + cublas, cublas_workspace_bytes=cublas,
        assumptions=[*estimator.build_assumptions.render(), *trace.notes, *result.assumptions], graph=trace.nodes,
        timeline=ledger.timeline(round_size, ledger.iteration_marks[worst_iteration]),
        parameter_dtypes=_parameter_dtypes(estimator.model),
    )
    estimator.scale.annotate(report, counter, result)
    return report


def _parameter_dtypes(model: torch.nn.Module) -> dict[str, int]:
    """Parameter bytes per dtype (``{"float32": 4000}``), each parameter counted once."""
    found: dict[str, int] = {}
    for parameter in model.parameters():
        name = str(parameter.dtype).removeprefix("torch.")
        found[name] = found.get(name, 0) + parameter.numel() * parameter.element_size()
    return found


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
