"""PREC002: the model or its inputs are in float64."""
from __future__ import annotations

from typing import Iterable

from memlint.diagnostics import Diagnostic, Severity
from memlint.rules import _precision as prec
from memlint.rules._static import position
from memlint.rules.base import Rule, RuleContext
from memlint.units import format_bytes

HALVED = ("parameters", "gradients", "optimizer_state", "activations", "inputs")


def float64_share(parameter_dtypes: dict[str, int]) -> tuple[float, int]:
    """Share of the model's parameter bytes that are float64, and those bytes."""
    total = sum(parameter_dtypes.values())
    f64 = parameter_dtypes.get("float64", 0)
    return (f64 / total if total else 0.0), f64


def savings(breakdown: dict[str, int]) -> tuple[int, str]:
    """Bytes float32 would save at the peak: half of what float64 storage holds there."""
    parts = [(key, breakdown.get(key, 0) // 2) for key in HALVED if breakdown.get(key, 0)]
    text = ", ".join(f"{key.replace('_', ' ')} {format_bytes(value)}" for key, value in parts)
    return sum(value for _, value in parts), text


class Float64Model(Rule):
    code = "PREC002"
    name = "float64-model"
    summary = "The model or its inputs are float64: twice the memory of float32, for no gain on a GPU"
    severity = Severity.WARNING
    also_model = True
    fix = "keep the model and its inputs in float32 (drop `.double()` / `dtype=torch.float64`)"
    what = """
Finds a model, its parameters or its inputs in float64: statically, `model.double()`,
`model.to(torch.float64)`, `torch.set_default_dtype(torch.float64)`, module constructors and
`nn.Parameter` built with `dtype=torch.float64`, weights loaded with `torch_dtype=torch.float64`,
Lightning's `precision="64"`, and float64 inputs built in `example_inputs()`; and, once the model is
analysed, a model whose parameters are mostly float64, wherever the cast came from. With the analysis, the message says how many bytes float32 would save at the peak (half
of the parameters, gradients, optimizer state, activations and inputs held there).

A tensor computed in float64 inside `forward` for numerical reasons is left alone, and so are CPU
targets, where float64 is native and often wanted.
"""
    why = """
float64 doubles every parameter, gradient, optimizer state and activation, and GPUs run it at
1/2 (datacenter cards) to 1/64 (consumer cards) of the float32 rate; Apple's MPS backend has no
float64 at all. Deep-learning training gains nothing from the extra precision. It usually arrives
by accident: numpy arrays are float64, and `torch.from_numpy` keeps that.
"""
    example = """
torch.set_default_dtype(torch.float64)   # PREC002: every parameter is now float64
model = Net().double()                   # PREC002
"""
    instead = """
model = Net()                            # float32
x = torch.from_numpy(array).float()      # numpy's float64 made float32
"""
    VALID = (
        # float32 model; a float64 step inside forward for numerical reasons is fine
        """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        total = x.double().sum(dim=-1, keepdim=True)
        return self.fc(x) + total.float()

def build_model():
    return Net()

def example_inputs(batch_size):
    return torch.randn(batch_size, 16)
""",
        # float32 made explicit; double() of data that is converted back
        """
import numpy as np
import torch
from torch import nn

model = nn.Linear(8, 8).float()
torch.set_default_dtype(torch.float32)
batch = torch.from_numpy(np.zeros((2, 8))).double().float()
""",
        # float64 bookkeeping on the host, not the model or its inputs
        """
import numpy as np
import torch

def load_batch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).float()

loss_history = torch.zeros(100, dtype=torch.float64)
""",
    )
    INVALID = (
        # the model cast to float64
        """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x)

def build_model():
    return Net().double()

def example_inputs(batch_size):
    return torch.randn(batch_size, 16, dtype=torch.float64)
""",
        # the default dtype: every parameter created afterwards is float64
        """
import torch
from torch import nn

torch.set_default_dtype(torch.float64)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x)

def example_inputs(batch_size):
    return torch.randn(batch_size, 16)
""",
        # parameters and layers created in float64
        """
import torch
import torch.nn as nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(16, dtype=torch.float64))
        self.fc = nn.Linear(16, 4, dtype=torch.double)
""",
    )

    def check(self, ctx: RuleContext) -> Iterable[Diagnostic]:
        target = prec.target_of(ctx)
        if target is not None and target.kind == "cpu":
            return
        mps = " (and MPS has no float64 at all)" if target is not None and target.kind == "unified" else ""
        traced = self._traced(ctx, target)
        found = [site for site in prec.sites(ctx) if site.dtype == "fp64"]
        for site in found:
            line, column = position(ctx, site.node)
            yield ctx.diagnostic(self, line, column, (
                f"`{site.text}` {site.what()} float64, which takes twice the memory of float32 and gains nothing "
                f"in training{mps}" + (f"; the analysed {traced}" if traced else "")))
        if traced and not found:
            assert ctx.model is not None
            yield ctx.diagnostic(self, ctx.model.line, 1, f"{traced}{mps}")

    @staticmethod
    def _traced(ctx: RuleContext, target) -> str | None:  # noqa: ANN001
        """``Net is built in float64 (...): float32 would save ~X at the peak (...)`` when the analysis shows it."""
        model = ctx.model
        if model is None:
            return None
        share, f64 = float64_share(model.parameter_dtypes)
        if share < 0.5:
            return None
        saved, parts = savings(model.breakdown)
        where = f" on {target.name}" if target is not None else ""
        text = f"{model.name} is built in float64 ({format_bytes(f64)} of float64 parameters, {share:.0%} of them)"
        if saved:
            text += f": float32 would save ~{format_bytes(saved)} at the peak{where} (half of {parts})"
        return text
