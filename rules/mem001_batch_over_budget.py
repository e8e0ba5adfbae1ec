"""MEM001: the training step at the configured batch size does not fit the target's budget."""
from __future__ import annotations

from typing import Iterable

from memlint.diagnostics import Diagnostic, Severity
from memlint.rules.base import Rule, RuleContext
from memlint.units import format_gib


def breakdown_text(breakdown: dict[str, int]) -> str:
    """``weights 0.23, gradients 0.23, ...`` in GiB, the way the message and the table show it."""
    parts = [
        ("weights", breakdown["parameters"] + breakdown["buffers"]),
        ("gradients", breakdown["gradients"]),
        ("optimizer state", breakdown["optimizer_state"]),
        ("activations", breakdown["activations"]),
        ("inputs and temporaries", breakdown["inputs"] + breakdown["temporaries"]),
        ("workspace/context", breakdown["workspace"] + breakdown["context"]),
    ]
    return ", ".join(f"{label} {format_gib(value)}" for label, value in parts if value)


def report_location(ctx: RuleContext) -> tuple[int, int]:
    """Where the batch size is written, when memlint found it in this file; else the model's definition."""
    model = ctx.model
    assert model is not None
    site = ctx.extras.get("batch_size_site")
    if site is not None and model.batch_size_source:
        return site.line, site.column  # type: ignore[attr-defined]
    return model.line, 1


class BatchOverBudget(Rule):
    code = "MEM001"
    name = "batch-over-budget"
    summary = "The estimated peak memory of a training step exceeds the target's budget"
    severity = Severity.ERROR
    needs_model = True
    fix = "lower the batch size to the largest that fits, or use activation checkpointing or mixed precision"
    what = """
memlint builds the model on fake tensors, simulates a training step (forward, loss, backward,
optimizer step) and estimates its peak device memory: weights, gradients, optimizer state,
activations saved for backward, inputs, temporaries, the caching allocator's reserve, library
workspaces and the CUDA context. This rule fires when that peak exceeds the threshold (default
80%) of the target's memory, and names the largest batch size that fits.
"""
    why = """
An out-of-memory error after renting a GPU, or in the middle of the first epoch, is the most
expensive way to learn the batch size was too large. Planning past 80% of a device's memory
also leaves no room for the OS, the CUDA context and fragmentation.
"""
    example = """
# memlint check train.py --target gtx1050ti
loader = DataLoader(dataset, batch_size=512)  # MEM001: needs ~6.1 GiB, budget 3.2 GiB
"""
    instead = """
loader = DataLoader(dataset, batch_size=96)  # the largest batch size that fits
"""

    def check(self, ctx: RuleContext) -> Iterable[Diagnostic]:
        model = ctx.model
        if model is None or model.peak_device_bytes <= model.budget_bytes:
            return
        line, column = report_location(ctx)
        parts_fit = f"The largest batch size that fits is {model.max_batch_size}." if model.max_batch_size \
            else "No batch size fits: see MEM002."
        action = "training" if model.mode == "train" else "running inference on"
        per_device = f" per device ({model.strategy} on {model.devices} devices)" \
            if getattr(model, "strategy", "none") != "none" else ""
        fix = f"use batch size {model.max_batch_size}" if model.max_batch_size else self.fix
        checkpointing = checkpointing_help(model)
        yield ctx.diagnostic(self, line, column, (
            f"{action} {model.name} at batch size {model.batch_size} needs ~{format_gib(model.peak_device_bytes, 1)} "
            f"GiB at peak{per_device} ({breakdown_text(model.breakdown)}); that is over {model.threshold:.0%} of "
            f"{model.target} ({format_gib(model.budget_bytes, 1)} of {format_gib(model.capacity_bytes, 1)} GiB). "
            f"{parts_fit}"),
            fix=f"{fix}; or {checkpointing}" if checkpointing else fix)


def checkpointing_help(model) -> str | None:
    """When checkpointing the top-level blocks would make this batch fit, say which and how much it saves.

    The estimate (memlint/compute.py) per block: the activations it saves for backward minus the
    input that checkpointing keeps.
    """
    blocks = [block for block in getattr(model, "checkpoint_blocks", []) if block.get("saves_bytes")]
    saves = sum(block["saves_bytes"] for block in blocks)
    if not blocks or model.peak_device_bytes - saves > model.budget_bytes:
        return None
    names = [block["name"] for block in blocks]
    shown = ", ".join(names[:2]) + (f", ... ({len(names)} blocks)" if len(names) > 2 else "")
    return (f"keep batch size {model.batch_size} and checkpoint each top-level block ({shown}) with "
            f"torch.utils.checkpoint(block, x, use_reentrant=False): it would save ~{format_gib(saves, 1)} GiB and "
            f"fit (memlint --checkpoint-layers simulates it)")
