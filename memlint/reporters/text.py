"""The default output: ruff-style diagnostic lines, then per model a layer table and the verdict."""
from __future__ import annotations

from typing import TextIO

from rich.console import Console
from rich.table import Table

from memlint.diagnostics import Diagnostic
from memlint.engine import CheckResult
from memlint.report import ModelReport
from memlint.units import format_bytes, format_gib

_CATEGORY_LABELS = (
    ("parameters", "weights"), ("buffers", "buffers"), ("gradients", "gradients"),
    ("optimizer_state", "optimizer state"), ("activations", "activations"), ("inputs", "inputs"),
    ("temporaries", "temporaries"), ("workspace", "workspace + allocator reserve"), ("context", "CUDA context / OS"),
)


def diagnostic_line(d: Diagnostic) -> str:
    return f"{d.path}:{d.line}:{d.column}: {d.code} {d.message}"


def report_rich(result: CheckResult, out: TextIO, _color: bool) -> None:
    """Like ``text``, in colour even when the output is not a terminal."""
    report(result, out, True)


def report(result: CheckResult, out: TextIO, color: bool) -> None:
    """Diagnostics, then the models' tables; ``color`` only when writing to a terminal."""
    console = Console(file=out, force_terminal=color, no_color=not color, width=140 if not color else None,
                      highlight=False, soft_wrap=not color)
    for error in result.errors:
        console.print(error.render(), style="red", markup=False)
    for diagnostic in result.diagnostics:
        console.print(diagnostic_line(diagnostic), markup=False)
        if diagnostic.fix:
            console.print(f"  help: {diagnostic.fix}", style="dim", markup=False)
    for model in result.reports:
        console.print()
        _model_table(console, model)
    count = len(result.diagnostics)
    if count:
        console.print(f"Found {count} finding{'s' if count != 1 else ''}.", markup=False)
    elif not result.errors:
        console.print(f"All checks passed ({result.files_checked} file{'s' if result.files_checked != 1 else ''}).",
                      markup=False)


def _model_table(console: Console, model: ModelReport) -> None:
    title = (f"{model.name} ({model.path}) - {model.mode}, batch size {model.batch_size}, optimizer "
             f"{model.optimizer}, {model.precision}, traced with {model.tracer}")
    if model.strategy != "none":
        title += f"; per device under {model.strategy} on {model.devices} devices"
    if model.checkpoint_layers:
        title += "; top-level blocks checkpointed"
    table = Table(title=title, title_justify="left", show_lines=False)
    for column, justify in (("Layer", "left"), ("Type", "left"), ("Output shape", "left"), ("Params", "right"),
                            ("Activations saved", "right"), ("% of peak", "right"), ("FLOPs fwd", "right"),
                            ("FLOPs bwd", "right"), ("Defined at", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for layer in model.layers:
        shape = ", ".join("×".join(map(str, s)) for s in layer.output_shape) if layer.output_shape else ""
        share = layer.activation_bytes / model.peak_allocated_bytes if model.peak_allocated_bytes else 0.0
        table.add_row("  " * layer.depth + layer.name, layer.type, shape, format_bytes(layer.parameter_bytes),
                      format_bytes(layer.activation_bytes), f"{share:.1%}", format_flops(layer.flops_forward),
                      format_flops(layer.flops_backward), _short_source(layer.source))
    console.print(table)
    totals = Table(show_header=False, box=None, padding=(0, 2))
    totals.add_column(justify="left")
    totals.add_column(justify="right")
    for key, label in _CATEGORY_LABELS:
        if model.breakdown.get(key):
            totals.add_row(label, format_bytes(model.breakdown[key]))
    totals.add_row("peak allocated (torch.cuda.max_memory_allocated)", format_bytes(model.peak_allocated_bytes))
    totals.add_row("peak on the device (with reserve, workspace, context)", format_bytes(model.peak_device_bytes))
    _compute_rows(totals, model)
    console.print(totals)
    fits = model.peak_device_bytes <= model.budget_bytes
    verdict = "fits" if fits else "does NOT fit"
    console.print(
        f"{verdict}: {format_gib(model.peak_device_bytes)} GiB of {format_gib(model.budget_bytes)} GiB "
        f"({model.threshold:.0%} of {model.target}'s {format_gib(model.capacity_bytes)} GiB); largest batch size "
        f"that fits: {model.max_batch_size if model.max_batch_size else 'none'}",
        style="green" if fits else "red bold", markup=False)
    for note in [*model.assumptions, *model.compute_notes]:
        console.print(f"note: {note}", style="dim", markup=False)


def format_flops(flops: float | None) -> str:
    """``12.3 GFLOP``-style, decimal prefixes as FLOP counts are written."""
    if not flops:
        return "0"
    value = float(flops)
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(value) < 1000 or unit == "P":
            return f"{value:.0f}" if not unit else f"{value:.3g} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def format_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def _compute_rows(totals: Table, model: ModelReport) -> None:
    """FLOPs, the roofline time (a lower bound) and what checkpointing the blocks would save."""
    if model.flops_per_step is not None:
        totals.add_row("FLOPs per step (forward + backward)", format_flops(model.flops_per_step))
    if model.step_time_s is not None:
        totals.add_row(f"time per step on {model.target} (lower bound: roofline)", f"≥ {format_seconds(model.step_time_s)}")
    if model.epoch_time_s is not None:
        totals.add_row("time per epoch (lower bound)", f"≥ {format_seconds(model.epoch_time_s)}")
    saves = sum(block.get("saves_bytes", 0) for block in model.checkpoint_blocks)
    if saves:
        totals.add_row(f"checkpointing the {len(model.checkpoint_blocks)} top-level blocks would save", f"~{format_bytes(saves)}")


def _short_source(source: str | None) -> str:
    if not source:
        return ""
    path, _, line = source.rpartition(":")
    return f"{path.rsplit('/', 1)[-1]}:{line}"
