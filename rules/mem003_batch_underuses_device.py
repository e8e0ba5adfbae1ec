"""MEM003: the configured batch leaves more than half of the budget unused."""
from __future__ import annotations

from typing import Iterable

from memlint.diagnostics import Diagnostic, Severity
from memlint.rules.base import Rule, RuleContext
from memlint.rules.mem001_batch_over_budget import report_location
from memlint.units import format_gib


class BatchUnderusesDevice(Rule):
    code = "MEM003"
    name = "batch-underuses-device"
    summary = "The batch size uses less than half of the memory budget"
    severity = Severity.INFO
    needs_model = True
    fix = "raise the batch size (and scale the learning rate with it)"
    what = """
Fires when the estimated peak of a training step at the configured batch size is under half of
the target's budget, and names the largest batch size that still fits.
"""
    why = """
A GPU that is mostly empty is mostly wasted: small batches underuse its parallelism and make
each epoch slower. The lecture behind memlint: do not plan past 80% of the memory, and do not
under-consume it either.
"""
    example = """
# memlint check train.py --target a100-80gb
loader = DataLoader(dataset, batch_size=8)  # MEM003: uses 6 GiB of a 64 GiB budget
"""
    instead = """
loader = DataLoader(dataset, batch_size=96)
"""

    def check(self, ctx: RuleContext) -> Iterable[Diagnostic]:
        model = ctx.model
        if model is None or model.peak_device_bytes * 2 >= model.budget_bytes:
            return
        if not model.max_batch_size or model.max_batch_size <= model.batch_size:
            return
        line, column = report_location(ctx)
        yield ctx.diagnostic(self, line, column, (
            f"batch size {model.batch_size} uses ~{format_gib(model.peak_device_bytes, 1)} GiB of the "
            f"{format_gib(model.budget_bytes, 1)} GiB budget on {model.target} "
            f"({model.peak_device_bytes / model.budget_bytes:.0%}); batch size {model.max_batch_size} still fits"),
            fix=f"try batch size {model.max_batch_size}")
