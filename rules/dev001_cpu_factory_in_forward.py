"""DEV001: a tensor factory without ``device=`` inside ``forward`` makes a CPU tensor on every call."""
from __future__ import annotations

from typing import Iterator

import libcst as cst

from memlint.diagnostics import Diagnostic, Severity
from memlint.rules._static import (
    FACTORIES, LEGACY_TENSOR_TYPES, NO_DEVICE_ARGUMENT, calls_in, code, device_text, facts, first_param,
    has_star_kwargs, is_move_call, keyword, module_classes, position, reachable_methods, target_names, walk,
)
from memlint.rules.base import Rule, RuleContext


def _squash(text: str, limit: int = 70) -> str:
    text = " ".join(text.split()).replace("( ", "(").replace(" )", ")")
    return text if len(text) <= limit else text[: limit - 4] + "...)"


def _with_device(call: cst.Call, device: str) -> str:
    arg = cst.Arg(keyword=cst.Name("device"), value=cst.parse_expression(device),
                  equal=cst.AssignEqual(whitespace_before=cst.SimpleWhitespace(""),
                                        whitespace_after=cst.SimpleWhitespace("")))
    args = list(call.args)
    if args and isinstance(args[-1].comma, cst.Comma):  # a trailing comma: keep it after the new argument
        args[-1] = args[-1].with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
    return _squash(code(call.with_changes(args=[*args, arg])), limit=200)


def _device_hint(func: cst.FunctionDef, forward: cst.FunctionDef) -> tuple[str, str]:
    """What the method would pass as ``device=`` (a ``device`` variable, ``x.device``), and a note."""
    for assign in walk(func.body, cst.Assign):
        if any("device" in target_names(t.target) for t in assign.targets):
            return "device", ""
    for attr in walk(func.body, cst.Attribute):
        if attr.attr.value == "device" and isinstance(attr.value, (cst.Name, cst.Attribute)):
            return code(attr), ""
    if func is not forward:
        return "device", f" (pass the input's device into `{func.name.value}`)"
    param = first_param(forward, 1)
    return (f"{param}.device" if param else "x.device"), ""


class CpuFactoryInForward(Rule):
    code = "DEV001"
    name = "cpu-factory-in-forward"
    summary = "Tensor created without `device=` inside `forward()` lands on the CPU"
    severity = Severity.WARNING
    fix = "Pass `device=` (e.g. `device=x.device`), or use `torch.zeros_like(x)` / `x.new_zeros(...)`."
    what = """
Checks for tensor factories (`torch.zeros`, `torch.ones`, `torch.empty`, `torch.full`, `torch.arange`,
`torch.linspace`, `torch.rand*`, `torch.eye`, `torch.tensor`, `torch.as_tensor`, `torch.from_numpy` and
the legacy `torch.Tensor(...)` / `torch.FloatTensor(...)` / `torch.LongTensor(...)` constructors) called
without `device=` inside the `forward()` of an `nn.Module` subclass, or inside a method of the same
class that `forward` calls through `self.method(...)`. Import aliases (`import torch as T`,
`from torch import zeros`) are resolved.

A factory whose result is moved at once (`torch.zeros(3).to(x.device)`, `.cuda()`, `.type_as(x)`) is
reported with severity info: it works, but allocates on the CPU and copies on every call.
"""
    why = """
A factory without `device=` allocates on the default device, the CPU. After `model.to("cuda")` the
module's parameters and inputs live on the GPU, but a tensor made inside `forward` does not move with
them: the first operation mixing the two raises "Expected all tensors to be on the same device", or,
for a tensor that is moved afterwards, every forward pass allocates host memory and waits for a
host-to-device copy. Neither shows up while you test on a laptop without a GPU.
"""
    example = """
class Attention(nn.Module):
    def forward(self, x):
        mask = torch.ones(x.size(1), x.size(1)).tril()
        positions = torch.arange(x.size(1)).to(x.device)
        return self.attend(x, mask, positions)
"""
    instead = """
class Attention(nn.Module):
    def forward(self, x):
        mask = torch.ones(x.size(1), x.size(1), device=x.device).tril()
        positions = torch.arange(x.size(1), device=x.device)
        return self.attend(x, mask, positions)
"""
    VALID = (
        # device= given, whatever its value
        """
import torch
from torch import nn

class Net(nn.Module):
    def forward(self, x):
        a = torch.zeros(3, device=x.device)
        b = torch.arange(10, device="cpu")
        return x + a.sum() + b.sum()
""",
        # *_like factories and x.new_* follow their argument's device
        """
import torch
import torch.nn as nn

class Net(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x) + x.new_ones(x.shape) + x.new_tensor([1.0])
""",
        # not a module: a plain function, and an autograd Function's static forward
        """
import torch

def make_batch(n):
    return torch.randn(n, 3)

class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(torch.tensor(2.0))
        return x * x
""",
        # factories in __init__ and in methods forward never calls are not per-call allocations
        """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(3))

    def reset_parameters(self):
        self.scale.copy_(torch.ones(3))

    def forward(self, x):
        return x * self.scale
""",
        # a `zeros` that is not torch's, and **kwargs that may carry device=
        """
import torch
from numpy import zeros

class Net(torch.nn.Module):
    def forward(self, x, **factory_kwargs):
        buf = zeros(3)
        return x + torch.zeros(3, **factory_kwargs)
""",
        # from_numpy cannot take device=: moving it at once is the only way
        """
import numpy as np
import torch
from torch import nn

class Net(nn.Module):
    def forward(self, x):
        table = torch.from_numpy(np.arange(4)).to(x.device)
        return x + table
""",
        # a class with forward but no base class: not clearly a module
        """
import torch

class Helper:
    def forward(self, x):
        return x + torch.ones(3)
""",
    )
    INVALID = (
        """
import torch
from torch import nn

class Net(nn.Module):
    def forward(self, x):
        mask = torch.ones(x.size(0), x.size(0))
        return x @ mask
""",
        # import alias
        """
import torch as T

class Net(T.nn.Module):
    def forward(self, x):
        return x + T.arange(x.size(-1))
""",
        # from-import of the factory itself
        """
from torch import nn, zeros

class Net(nn.Module):
    def forward(self, x):
        return x + zeros(3)
""",
        # reached through self.method(...), transitively
        """
import torch
from torch import nn

class Net(nn.Module):
    def forward(self, x):
        return self._attend(x)

    def _attend(self, x):
        return x + self._mask(x.size(1))

    def _mask(self, n):
        return torch.full((n, n), float("-inf")).triu(1)
""",
        # legacy typed constructor
        """
import torch
import torch.nn as nn

class Embed(nn.Module):
    def forward(self, x):
        ids = torch.LongTensor([0, 1, 2])
        return x[ids]
""",
        # moved at once: still reported (info), create it on the device directly
        """
import torch
from torch import nn

class Net(nn.Module):
    def forward(self, x):
        return x + torch.zeros(3).to(x.device)
""",
        # a subclass of a module class of the same file, and a class with forward deriving from anything
        """
import torch
from torch import nn

class Base(nn.Module):
    pass

class Child(Base):
    def extra(self, x):
        return x

    def forward(self, x):
        return x + torch.rand(3)

class Wrapped(SomeFrameworkLayer):
    def forward(self, x):
        return x + torch.randn(3)
""",
        # .to(dtype) is not a move
        """
import torch
from torch import nn

class Net(nn.Module):
    def forward(self, x):
        return x * torch.tensor([1.0, 2.0]).to(torch.float16)
""",
    )

    def check(self, ctx: RuleContext) -> Iterator[Diagnostic]:
        info = facts(ctx)
        if not info.imports.imports_module("torch"):
            return
        imports = info.imports
        for cls in module_classes(ctx):
            reached = reachable_methods(cls, "forward")
            if not reached:
                continue
            forward = reached[0][0]
            for func, path in reached:
                calls = calls_in(func.body, stop=(cst.ClassDef,))
                moved: dict[int, cst.Call] = {}
                for call in calls:
                    if is_move_call(call, imports):
                        node = call.func.value  # type: ignore[union-attr]
                        while True:  # the receiver chain: torch.zeros(3).float()[None].to(d)
                            if isinstance(node, cst.Call) and isinstance(node.func, cst.Attribute):
                                moved[id(node)] = call
                                node = node.func.value
                            elif isinstance(node, cst.Call):
                                moved[id(node)] = call
                                break
                            elif isinstance(node, cst.Subscript):
                                node = node.value
                            else:
                                break
                where = f"{cls.name.value}.{path[-1]}" + (
                    "" if len(path) == 1 else f" (called from {' -> '.join(path[:-1])})")
                for call in calls:
                    qualified = imports.qualify(call.func)
                    if qualified not in FACTORIES and qualified not in LEGACY_TENSOR_TYPES:
                        continue
                    if keyword(call, "device") is not None or has_star_kwargs(call):
                        continue
                    diagnostic = self._diagnose(ctx, call, qualified, moved.get(id(call)), where, func, forward)
                    if diagnostic is not None:
                        yield diagnostic

    def _diagnose(self, ctx: RuleContext, call: cst.Call, qualified: str, move: cst.Call | None, where: str,
                  func: cst.FunctionDef, forward: cst.FunctionDef) -> Diagnostic | None:
        line, column = position(ctx, call)
        shown = _squash(code(call))
        imports = facts(ctx).imports
        if move is not None:
            if qualified in NO_DEVICE_ARGUMENT:
                return None
            device = device_text(move, imports)
            better = _with_device(call, device)
            return ctx.diagnostic(
                self, line, column,
                f"`{shown}` in `{where}` is created on the CPU and then copied to the device on every call; "
                f"create it on the device directly: {better}",
                severity=Severity.INFO, fix=better)
        device, note = _device_hint(func, forward)
        if qualified in LEGACY_TENSOR_TYPES:
            better = f"torch.tensor(..., device={device})"
            message = (f"legacy constructor `{shown}` in `{where}` always allocates on the CPU, also after "
                       f"the module moves to the GPU; use {better} or torch.empty(..., device={device})")
        elif qualified == "torch.from_numpy":
            better = f"torch.as_tensor(..., device={device})"
            message = (f"`{shown}` in `{where}` makes a CPU tensor on every call, also after the module "
                       f"moves to the GPU; use {better}")
        else:
            better = _with_device(call, device)
            message = (f"`{shown}` in `{where}` creates its tensor on the CPU, also after the module moves "
                       f"to the GPU (a device mismatch, or a copy every call); pass device=: {better}")
        return ctx.diagnostic(self, line, column, message + note, fix=better)
