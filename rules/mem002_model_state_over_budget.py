"""MEM002: the model's own state exceeds the budget at any batch size."""
from __future__ import annotations

from typing import Iterable

from memlint.diagnostics import Diagnostic, Severity
from memlint.rules.base import Rule, RuleContext
from memlint.units import format_gib


class ModelStateOverBudget(Rule):
    code = "MEM002"
    name = "model-state-over-budget"
    summary = "Parameters (with gradients and optimizer state when training) alone exceed the budget"
    severity = Severity.ERROR
    needs_model = True
    fix = "shard the model (FSDP/ZeRO), train in lower precision, use a lighter optimizer, or pick a larger target"
    what = """
Adds the bytes of the parameters and buffers, and in training the gradients and the optimizer
state (Adam keeps two fp32 tensors per parameter), plus the target's CUDA context and library
workspace, and compares them with the budget. No batch size can make this fit.
"""
    why = """
Lowering the batch size, the usual cure for MEM001, cannot help here: the model's own state is
too large before a single activation is stored.
"""
    example = """
# a 7B-parameter model trained with Adam in fp32 on a 24 GB card
model = LlamaForCausalLM(LlamaConfig())  # MEM002: 7B x 16 bytes = 100 GiB of state
"""
    instead = """
# shard the state over devices, or fine-tune fewer parameters
model = FSDP(LlamaForCausalLM(LlamaConfig()))
"""

    def check(self, ctx: RuleContext) -> Iterable[Diagnostic]:
        model = ctx.model
        if model is None:
            return
        b = model.breakdown
        state = b["parameters"] + b["buffers"] + b["gradients"] + b["optimizer_state"]
        needed = state + model.overhead_bytes
        if needed <= model.budget_bytes:
            return
        what = "parameters, gradients and optimizer state" if model.mode == "train" else "parameters and buffers"
        yield ctx.diagnostic(self, model.line, 1, (
            f"the {what} of {model.name} take {format_gib(state, 1)} GiB "
            f"({format_gib(needed, 1)} GiB with context and workspace), over {model.threshold:.0%} of "
            f"{model.target} ({format_gib(model.budget_bytes, 1)} GiB) at any batch size"))
