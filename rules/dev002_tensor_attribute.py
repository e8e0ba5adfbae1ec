"""DEV002: a plain tensor stored on ``self`` in ``__init__`` is not moved by ``module.to(device)``."""
from __future__ import annotations

from typing import Iterator

import libcst as cst

from memlint.diagnostics import Diagnostic, Severity
from memlint.rules._static import (
    CONTAINER, calls_in, code, facts, first_param, is_move_call, iter_small, keyword, method_name, methods,
    module_classes, position, self_attribute, shorten, string_value, tensor_kind,
)
from memlint.rules.base import Rule, RuleContext

_REGISTERING = frozenset({"torch.nn.Parameter", "torch.nn.parameter.Parameter", "torch.nn.Buffer",
                          "torch.nn.parameter.Buffer", "torch.nn.UninitializedParameter",
                          "torch.nn.UninitializedBuffer"})
# A class that overrides these moves its own attributes; what it does is its business.
_MOVING_OVERRIDES = frozenset({"_apply", "to", "cuda", "_save_to_state_dict"})


def _registered_names(ctx: RuleContext) -> set[str]:
    """Names registered as buffers or parameters anywhere in the file.

    File-wide on purpose: ``nn.Module.__setattr__`` sends a tensor assigned to a name that a base
    class registered (``_NormBase`` registers ``num_batches_tracked``) into ``_buffers``, so the
    plain-looking assignment in the subclass is a buffer after all.
    """
    info = facts(ctx)
    registered: set[str] = set()
    for call in info.calls:
        if method_name(call) in ("register_buffer", "register_parameter") and call.args:
            first = keyword(call, "name") or call.args[0]
            value = string_value(first.value)
            if value:
                registered.add(value)
    for node in info.assigns:
        value = node.value
        if not isinstance(value, cst.Call):
            continue
        qualified = info.imports.qualify(value.func) or ""
        if qualified in _REGISTERING or code(value.func).rsplit(".", 1)[-1] in (
                "Parameter", "Buffer", "UninitializedParameter", "UninitializedBuffer"):
            registered.update(a for a in (self_attribute(t.target) for t in node.targets) if a)
    return registered


def _moved_by_hand(cls: cst.ClassDef, ctx: RuleContext) -> set[str]:
    """Attributes the class moves itself somewhere: ``self.table.to(x.device)``."""
    imports = facts(ctx).imports
    moved: set[str] = set()
    for call in calls_in(cls, stop=(cst.ClassDef,)):
        if isinstance(call.func, cst.Attribute) and is_move_call(call, imports):
            attribute = self_attribute(call.func.value)
            if attribute:
                moved.add(attribute)
    return moved


class TensorAttribute(Rule):
    code = "DEV002"
    name = "tensor-attribute"
    summary = "Plain tensor stored on `self` in `__init__` is not moved by `module.to(device)`"
    severity = Severity.WARNING
    fix = 'Use `self.register_buffer("name", tensor)` (with `persistent=False` if it should stay out of state_dict), or `nn.Parameter`.'
    what = """
Checks for `self.X = <tensor>` in the `__init__` of an `nn.Module` subclass, where the value is made by a
torch factory or operation (`torch.ones(n, n)`, `torch.tril(torch.ones(n, n))`,
`1.0 / 10000 ** (torch.arange(0, d, 2) / d)`, a local variable holding one) or is a list, tuple or
dict literal of such tensors, and is not wrapped in `nn.Parameter` nor registered with
`register_buffer`.

If the class itself moves the attribute with `.to(...)` somewhere, the finding is info: it works, at
the cost of a copy each time.
"""
    why = """
`module.to(device)`, `.cuda()` and `.half()` convert parameters and buffers, the tensors registered with
the module. A tensor assigned as a plain attribute is neither: after `model.cuda()` it is still on the
CPU, and the first forward pass on the GPU fails with "Expected all tensors to be on the same device"
(or quietly copies it every call). It is also missing from `state_dict()`, so a saved model does not
carry it, and DataParallel/DDP replicas do not get a copy on their device.
"""
    example = """
class CausalSelfAttention(nn.Module):
    def __init__(self, block_size):
        super().__init__()
        self.mask = torch.tril(torch.ones(block_size, block_size))
"""
    instead = """
class CausalSelfAttention(nn.Module):
    def __init__(self, block_size):
        super().__init__()
        self.register_buffer("mask", torch.tril(torch.ones(block_size, block_size)), persistent=False)
"""
    VALID = (
        # registered buffers and parameters are moved with the module
        """
import torch
from torch import nn

class Attn(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.register_buffer("mask", torch.tril(torch.ones(n, n)))
        self.scale = nn.Parameter(torch.ones(n))
        self.bias = torch.nn.Parameter(torch.zeros(n))
        mask2 = torch.ones(n)
        self.register_buffer("mask2", mask2, persistent=False)
""",
        # submodules, numbers, shapes and dtypes are not tensors
        """
import torch
import torch.nn as nn

class Net(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.scale = d ** -0.5
        self.dtype = torch.float32
        self.eps = torch.finfo(torch.float32).eps
        self.shape = torch.Size([d, d])
        self.n = torch.ones(3).numel()
""",
        # not a module, and not __init__
        """
import torch

class Config:
    def __init__(self):
        self.table = torch.arange(10)

class Net(torch.nn.Module):
    def forward(self, x):
        self.cache = torch.zeros(3, device=x.device)
        return x
""",
        # assigned a tensor first, made a Parameter/Buffer afterwards
        """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = torch.empty(n, n)
        self.weight = nn.Parameter(self.weight)
        self.table = nn.Buffer(torch.arange(n))
""",
        # a class that moves its attributes itself in _apply
        """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.table = torch.arange(n)

    def _apply(self, fn, recurse=True):
        self.table = fn(self.table)
        return super()._apply(fn, recurse)
""",
    )
    INVALID = (
        """
import torch
from torch import nn

class Attn(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.mask = torch.tril(torch.ones(n, n))
""",
        # through a local variable, and an arithmetic expression
        """
import torch
import torch.nn as nn

class Rotary(nn.Module):
    def __init__(self, dim, base=10000):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.inv_freq = inv_freq
""",
        # a list literal of tensors
        """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.anchors = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
""",
        # a dict literal, a tuple, an alias import, and an annotated assignment
        """
import torch as T
from torch import nn, Tensor

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.tables = {"a": T.zeros(3), "b": T.ones(3)}
        self.pair = (T.eye(3), T.eye(4))
        self.offset: Tensor = T.full((3,), 0.5)
""",
        # moved by hand in forward: info
        """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.randn(10, 4)

    def forward(self, idx):
        return self.table.to(idx.device)[idx]
""",
    )

    def check(self, ctx: RuleContext) -> Iterator[Diagnostic]:
        info = facts(ctx)
        if not info.imports.imports_module("torch"):
            return
        registered: set[str] | None = None
        for cls in module_classes(ctx):
            moved: set[str] | None = None
            table = methods(cls)
            init = table.get("__init__")
            if init is None or _MOVING_OVERRIDES & set(table):
                continue
            self_name = first_param(init) or "self"
            env: dict[str, str | None] = {}
            for small in iter_small(init.body):
                if isinstance(small, cst.Assign):
                    pairs = [(t.target, small.value) for t in small.targets]
                elif isinstance(small, cst.AnnAssign) and small.value is not None:
                    pairs = [(small.target, small.value)]
                else:
                    continue
                for target, value in pairs:
                    if (isinstance(target, cst.Tuple) and isinstance(value, cst.Tuple)
                            and len(target.elements) == len(value.elements)):
                        pairs.extend((t.value, v.value) for t, v in zip(target.elements, value.elements))
                        continue
                    kind = tensor_kind(value, info.imports, env)
                    if isinstance(target, cst.Name):
                        env[target.value] = kind
                        continue
                    attribute = self_attribute(target, self_name)
                    if attribute is None or kind is None:
                        continue
                    if registered is None:
                        registered = _registered_names(ctx)
                    if attribute in registered:
                        continue
                    if moved is None:
                        moved = _moved_by_hand(cls, ctx)
                    yield self._diagnose(ctx, cls, target, attribute, value, kind, attribute in moved)

    def _diagnose(self, ctx: RuleContext, cls: cst.ClassDef, target: cst.BaseExpression, attribute: str,
                  value: cst.BaseExpression, kind: str, moved_by_hand: bool) -> Diagnostic:
        line, column = position(ctx, target)
        shown = shorten(code(value), 60)
        fix = f'self.register_buffer("{attribute}", {shorten(code(value), 200)}, persistent=False)'
        if kind == CONTAINER:
            return ctx.diagnostic(
                self, line, column,
                f"`self.{attribute}` in `{cls.name.value}.__init__` holds plain tensors in a container "
                f"(`{shown}`): `model.to(device)` does not move them, so they stay on the CPU and are left "
                f"out of state_dict; register each with register_buffer (or use nn.ParameterList/ParameterDict)",
                fix="register each tensor with self.register_buffer(...), or use nn.ParameterList / nn.ParameterDict")
        if moved_by_hand:
            return ctx.diagnostic(
                self, line, column,
                f"`self.{attribute}` in `{cls.name.value}.__init__` is a plain tensor (`{shown}`) that the "
                f"class copies with `.to()` itself, on every use; register it as a buffer so "
                f"`model.to(device)` moves it once: {fix}",
                severity=Severity.INFO, fix=fix)
        return ctx.diagnostic(
            self, line, column,
            f"`self.{attribute}` in `{cls.name.value}.__init__` is a plain tensor (`{shown}`): "
            f"`model.to(device)` moves parameters and buffers only, so it stays on the CPU (and is left out "
            f"of state_dict); use {fix}",
            fix=fix)
