"""PREC003: the target cannot run current PyTorch CUDA builds."""
from __future__ import annotations

from typing import Iterable

from memlint.diagnostics import Diagnostic, Severity
from memlint.rules.base import Rule, RuleContext


class TargetUnsupported(Rule):
    code = "PREC003"
    name = "target-unsupported-by-pytorch"
    summary = "The target device is not supported by current PyTorch CUDA builds"
    severity = Severity.WARNING
    needs_model = True
    once_per_run = True
    fix = "plan for a device current PyTorch supports (`memlint targets`), or pin an old PyTorch built for it"
    what = """
Fires when the target is marked `pytorch_supported = false` in the device database (for example
`tesla-k40`, compute capability 3.5: Kepler, which CUDA 12 dropped and today's PyTorch wheels have
no kernels for). It is said once per run and target, at the first analysed model, not once per
file: it is about the target, not about any file.
"""
    why = """
memlint's estimate is of a training step on that card; if current PyTorch cannot run there at all
("no kernel image is available for execution on the device"), the estimate plans a run that will not
start. The memory numbers stay valid for an old PyTorch built for the card, with old kernels and
old defaults.
"""
    example = """
# memlint check train.py --target tesla-k40
# PREC003: tesla-k40 (compute capability 3.5) is not supported by current PyTorch CUDA builds
"""
    instead = """
# memlint check train.py --target t4      # a device current PyTorch runs on
"""
    VALID = (
        """# memlint check --target t4
import torch
from torch import nn

def build_model():
    return nn.Linear(16, 4)

def example_inputs(batch_size):
    return torch.randn(batch_size, 16)
""",
    )
    INVALID = (
        """# memlint check --target tesla-k40
import torch
from torch import nn

def build_model():
    return nn.Linear(16, 4)

def example_inputs(batch_size):
    return torch.randn(batch_size, 16)
""",
    )

    def check(self, ctx: RuleContext) -> Iterable[Diagnostic]:
        target = ctx.target
        if ctx.model is None or target is None or target.pytorch_supported:
            return
        capability = target.capability
        where = f"{target.name} (compute capability {target.compute_capability})" if capability else target.name
        reason = ""
        if capability is not None and capability < (5, 0):
            reason = ": CUDA 12 dropped Kepler (compute capability 3.x), and PyTorch's CUDA wheels have no kernels for it"
        yield ctx.diagnostic(self, ctx.model.line, 1, (
            f"{where} is not supported by current PyTorch CUDA builds{reason}; the estimate is of a step that "
            f"today's PyTorch cannot run there (\"no kernel image is available for execution on the device\")"))
