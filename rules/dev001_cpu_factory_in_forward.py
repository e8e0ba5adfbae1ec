"""DEV001: a tensor factory without ``device=`` inside ``forward`` makes a CPU tensor on every call."""
from __future__ import annotations

from typing import Iterator

import libcst as cst

from memlint.diagnostics import Diagnostic, Severity
from memlint.rules._static import (
    FACTORIES, LEGACY_TENSOR_TYPES, NO_DEVICE_ARGUMENT, call_name, calls_in, children, code, device_text, facts,
    first_param, has_star_kwargs, is_move_call, is_sync_call, keyword, method_name, module_classes, names_in,
    position, positional, reachable_methods, shorten, target_names, walk,
)
from memlint.rules.base import Rule, RuleContext


def _keyword_arg(name: str, value: cst.BaseExpression) -> cst.Arg:
    return cst.Arg(keyword=cst.Name(name), value=value,
                   equal=cst.AssignEqual(whitespace_before=cst.SimpleWhitespace(""),
                                         whitespace_after=cst.SimpleWhitespace("")))


def _with_device(call: cst.Call, device: str, move: cst.Call | None = None) -> str:
    """The factory call with ``device=`` added (and the move's ``dtype=`` when the factory has none)."""
    args = list(call.args)
    if args and isinstance(args[-1].comma, cst.Comma):  # a trailing comma: keep it after the new argument
        args[-1] = args[-1].with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
    extra = []
    dtype = keyword(move, "dtype") if move is not None else None
    if dtype is not None and keyword(call, "dtype") is None:
        extra.append(_keyword_arg("dtype", dtype.value))
    extra.append(_keyword_arg("device", cst.parse_expression(device)))
    return shorten(code(call.with_changes(args=[*args, *extra])), limit=200)


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


_SIZED = frozenset(f"torch.{n}" for n in ("zeros", "ones", "empty", "rand", "randn"))
_SCALAR_CALLS = frozenset({"dim", "numel", "len", "float", "int", "bool", "item", "sqrt", "log", "exp",
                           "min", "max", "abs", "round", "prod"})
_COLLECTING = frozenset({"append", "extend", "insert", "add", "update", "setdefault"})
_TRACING = frozenset({"is_tracing", "is_scripting", "is_compiling", "is_torchdynamo_compiling", "is_exporting"})


def _scalar_expr(expr: cst.BaseExpression) -> bool | None:
    """True: surely one number; False: surely not (a list, tuple, array); None: cannot tell."""
    if isinstance(expr, (cst.Integer, cst.Float, cst.Imaginary)):
        return True
    if isinstance(expr, cst.Name):
        return True if expr.value in ("True", "False") else None
    if isinstance(expr, (cst.List, cst.Tuple, cst.ListComp, cst.GeneratorExp, cst.Set)):
        return False
    if isinstance(expr, cst.UnaryOperation):
        return _scalar_expr(expr.expression)
    if isinstance(expr, cst.BinaryOperation):
        sides = (_scalar_expr(expr.left), _scalar_expr(expr.right))
        if False in sides:
            return False
        literal = any(isinstance(s, (cst.Integer, cst.Float)) for s in (expr.left, expr.right))
        return True if literal or sides == (True, True) else None
    if isinstance(expr, cst.Call):
        if call_name(expr) == "size":  # x.size(-1) is a number, x.size() a torch.Size
            return True if positional(expr) else None
        return True if call_name(expr) in _SCALAR_CALLS else None
    if isinstance(expr, cst.Subscript) and isinstance(expr.value, cst.Attribute) and expr.value.attr.value == "shape":
        index = expr.slice[0].slice if len(expr.slice) == 1 else None
        return True if isinstance(index, cst.Index) else None
    return None


def _zero_dim(call: cst.Call, qualified: str) -> bool:
    """A single number (``torch.rand([])``, ``torch.tensor(0.5)``, ``torch.tensor(x.size(-1))``).

    PyTorch lets a 0-dim CPU tensor take part in operations with tensors on any device (it is
    passed as a scalar), and such tensors are often made on the CPU on purpose, to compare on
    the host (``if torch.rand([]) < self.layerdrop:``).
    """
    args = positional(call)
    if qualified in _SIZED:
        if not args and keyword(call, "size") is None:
            return True
        first = args[0].value if args else keyword(call, "size").value  # type: ignore[union-attr]
        return isinstance(first, (cst.List, cst.Tuple)) and not first.elements and len(args) <= 1
    if qualified in ("torch.tensor", "torch.as_tensor", "torch.scalar_tensor") and args:
        return _scalar_expr(args[0].value) is True
    return False


def _data_names(expr: cst.BaseExpression) -> set[str]:
    """Names whose data flows into ``expr``; not those only used as an index (``gpu[cpu_idx]`` stays on the GPU)."""
    names: set[str] = set()
    stack: list[cst.CSTNode] = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, cst.Subscript):
            stack.append(node.value)
        elif isinstance(node, cst.Name):
            names.add(node.value)
        else:
            stack.extend(children(node) if not isinstance(node, (cst.Attribute, cst.Arg)) else [node.value])
    return names


class _Flow:
    """Where a factory's tensor goes inside one method: moved, returned, used on the host, or into the math.

    Names are followed through assignments (``pos = torch.arange(n)`` then ``ids = pos[None] + 1``),
    ignoring order; a move of any of them counts as a move of the tensor.
    """

    def __init__(self, func: cst.FunctionDef, calls: list[cst.Call], imports) -> None:
        self.func = func
        self.owner: dict[int, int] = {}
        self.assigns: list[tuple[set[str], set[str]]] = []
        self.statement_targets: list[set[str]] = []
        self.operands: list[set[str] | None] = []  # per assignment: the variables its value computes with
        self.value_uses: dict[int, int] = {}  # a name read in an assignment's value -> that statement
        for index, small in enumerate(walk(func.body, cst.BaseSmallStatement, stop=(cst.ClassDef,))):
            targets, value = self._targets(small)
            self.statement_targets.append(targets)
            self.operands.append(None)
            if value is not None and targets:
                self.assigns.append((targets, _data_names(value)))
                callees = {n for c in calls_in(value, stop=(cst.ClassDef,)) for n in names_in(c.func)}
                self.operands[index] = _data_names(value) - callees
                self.value_uses.update((id(n), index) for n in walk(value, cst.Name, stop=(cst.ClassDef,)))
            for inner in calls_in(small, stop=(cst.ClassDef,)):
                self.owner[id(inner)] = index
                # ``parts.append(torch.arange(n))``: the list now holds the tensor
                if (method_name(inner) in _COLLECTING and isinstance(inner.func.value, cst.Name)  # type: ignore[union-attr]
                        and inner.args):
                    collected = {inner.func.value.value}  # type: ignore[union-attr]
                    self.statement_targets[index] = self.statement_targets[index] | collected
                    self.assigns.append((collected, set().union(*(names_in(a.value) for a in inner.args))))
        self.moves = [self._summary(call.func.value, call) for call in calls  # type: ignore[union-attr]
                      if is_move_call(call, imports)]
        self.host = [self._summary(call.func.value, call) for call in calls  # type: ignore[union-attr]
                     if is_sync_call(call)]
        # iterated in Python, or decided on in an ``if``/``while``: the host reads it
        for loop in walk(func.body, cst.For, stop=(cst.ClassDef,)):
            self.host.append(self._summary(loop.iter, loop))
        for branch in walk(func.body, (cst.If, cst.While), stop=(cst.ClassDef,)):
            for inner in calls_in(branch.test):
                self.host.append(self._summary(inner, branch))
        # what a return hands back: ``return table[idx]`` returns ``table``'s data, not ``idx``'s
        self.returns = [(_data_names(node.value), {id(c) for c in calls_in(node.value, stop=(cst.ClassDef,))
                                                    if id(c) not in self._slice_calls(node.value)}, node)
                        for node in walk(func.body, cst.Return) if node.value is not None]
        # which names are only ever used to index other tensors (``x[idx]``)
        self.in_slice: set[int] = set()
        for sub in walk(func.body, cst.Subscript, stop=(cst.ClassDef,)):
            for element in sub.slice:
                self.in_slice.update(id(n) for n in walk(element, (cst.Name, cst.Call), stop=(cst.ClassDef,)))
        self.bound: set[int] = set()
        for node in walk(func.body, (cst.Assign, cst.AnnAssign, cst.AugAssign), stop=(cst.ClassDef,)):
            for target in ([t.target for t in node.targets] if isinstance(node, cst.Assign) else [node.target]):
                if isinstance(target, (cst.Name, cst.Tuple, cst.List)):
                    self.bound.update(id(n) for n in walk(target, cst.Name))
        self.uses: dict[str, list[int]] = {}
        for name in walk(func.body, cst.Name, stop=(cst.ClassDef,)):
            if id(name) not in self.bound:
                self.uses.setdefault(name.value, []).append(id(name))
        # numbers the function sizes its factories with (``torch.arange(q_size)``): not device tensors,
        # and variables holding other factory results of the same function (``k = torch.arange(m)``)
        self.sizes: set[str] = set()
        for call in calls:
            if imports.qualify(call.func) in FACTORIES:
                for arg in positional(call):
                    self.sizes |= names_in(arg.value)
                if id(call) in self.owner:
                    self.sizes |= self.statement_targets[self.owner[id(call)]]
        self.tracing: set[int] = set()
        for node in walk(func.body, (cst.If, cst.IfExp), stop=(cst.ClassDef,)):
            if any(call_name(c) in _TRACING for c in calls_in(node.test)):
                self.tracing.update(id(c) for c in calls_in(node, stop=(cst.ClassDef,)))

    @staticmethod
    def _targets(small: cst.CSTNode) -> tuple[set[str], cst.BaseExpression | None]:
        if isinstance(small, cst.Assign):
            exprs = [t.target for t in small.targets]
        elif isinstance(small, (cst.AnnAssign, cst.AugAssign)) and small.value is not None:
            exprs = [small.target]
        else:
            return set(), None
        names: set[str] = set()
        for expr in exprs:
            names.update(target_names(expr))
            if isinstance(expr, cst.Subscript) and isinstance(expr.value, cst.Name):
                names.add(expr.value.value)  # ``pos[:, 0::2] = torch.sin(...)`` fills ``pos``
        return names, small.value  # type: ignore[return-value]

    @staticmethod
    def _slice_calls(expr: cst.BaseExpression) -> set[int]:
        return {id(c) for sub in walk(expr, cst.Subscript, stop=(cst.ClassDef,))
                for element in sub.slice for c in calls_in(element, stop=(cst.ClassDef,))}

    @staticmethod
    def _summary(expr: cst.BaseExpression, node: cst.CSTNode) -> tuple[set[str], set[int], cst.CSTNode]:
        return names_in(expr), {id(c) for c in calls_in(expr, stop=(cst.ClassDef,))}, node

    def _only_indexes(self, owner: int | None, tainted: set[str]) -> bool:
        """Is the tensor (and what is computed from it, with sizes only) used just to index other tensors?

        ``q = torch.arange(n)[:, None] * s; rel = q - k; return table[rel.long()]``: PyTorch accepts
        CPU indices for a device tensor (at the cost of a copy), so this is no device mismatch.
        """
        if owner is None or not tainted:
            return False
        allowed = tainted | self.sizes

        def computes_only_with_sizes(index: int) -> bool:
            operands = self.operands[index]
            return operands is not None and self.statement_targets[index] <= tainted and operands <= allowed

        if not computes_only_with_sizes(owner):
            return False
        uses = [use for name in tainted for use in self.uses.get(name, [])]
        if not any(use in self.in_slice for use in uses):
            return False
        return all(use in self.in_slice or (use in self.value_uses and computes_only_with_sizes(self.value_uses[use]))
                   for use in uses)

    def fate(self, factory: cst.Call, *, returns_matter: bool) -> "str | tuple[cst.Call, bool]":
        """``"host"`` (made for the CPU on purpose: silent), ``(move, at_once)`` (moved later: info),
        ``"returned"`` (a helper hands it to its caller: info), ``"index"`` (only used to index other
        tensors, which PyTorch allows at the cost of a copy: info), ``"unsure"`` (maybe a scalar: info),
        or ``"device"`` (it meets the module's tensors on the CPU: warning)."""
        if id(factory) in self.tracing:
            return "host"
        owner = self.owner.get(id(factory))
        tainted = set(self.statement_targets[owner]) if owner is not None else set()
        changed = bool(tainted)
        while changed:
            changed = False
            for targets, names in self.assigns:
                if names & tainted and not targets <= tainted:
                    tainted |= targets
                    changed = True
        key = id(factory)
        if any(key in ids or names & tainted for names, ids, _ in self.host):
            return "host"
        for names, ids, move in self.moves:
            if key in ids:
                return move, True  # type: ignore[return-value]
        later = [move for names, ids, move in self.moves if names & tainted]
        if later:
            # prefer a move after the factory (the other branch of an ``if`` may have its own)
            start = owner if owner is not None else -1
            after = [m for m in later if self.owner.get(id(m), -1) >= start]
            return (after or later)[0], False  # type: ignore[return-value]
        if returns_matter and any(key in ids or names & tainted for names, ids, _ in self.returns):
            return "returned"
        if key in self.in_slice or self._only_indexes(owner, tainted):
            return "index"
        if factory.args and _scalar_expr(factory.args[0].value) is None and \
                call_name(factory) in ("tensor", "as_tensor", "scalar_tensor"):
            return "unsure"
        return "device"


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
                factories = []
                for call in calls:
                    qualified = imports.qualify(call.func)
                    if qualified not in FACTORIES and qualified not in LEGACY_TENSOR_TYPES:
                        continue
                    if keyword(call, "device") is not None or has_star_kwargs(call) or _zero_dim(call, qualified):
                        continue
                    factories.append((call, qualified))
                if not factories:
                    continue
                flow = _Flow(func, calls, imports)
                where = f"{cls.name.value}.{path[-1]}" + (
                    "" if len(path) == 1 else f" (called from {' -> '.join(path[:-1])})")
                for call, qualified in factories:
                    fate = flow.fate(call, returns_matter=func is not forward)
                    if fate == "host":
                        continue
                    diagnostic = self._diagnose(ctx, call, qualified, fate, where, func, forward)
                    if diagnostic is not None:
                        yield diagnostic

    def _diagnose(self, ctx: RuleContext, call: cst.Call, qualified: str, fate: "str | tuple[cst.Call, bool]",
                  where: str, func: cst.FunctionDef, forward: cst.FunctionDef) -> Diagnostic | None:
        line, column = position(ctx, call)
        shown = shorten(code(call))
        imports = facts(ctx).imports
        if isinstance(fate, tuple):
            move, at_once = fate
            if qualified in NO_DEVICE_ARGUMENT:
                return None
            device = device_text(move, imports)
            better = _with_device(call, device, move)
            if at_once:
                what = "is created on the CPU and then copied to the device on every call"
            else:
                what = (f"is created on the CPU and copied to the device later (`{shorten(code(move), 50)}`, "
                        f"line {position(ctx, move)[0]}), on every call")
            return ctx.diagnostic(self, line, column,
                                  f"`{shown}` in `{where}` {what}; create it on the device directly: {better}",
                                  severity=Severity.INFO, fix=better)
        device, note = _device_hint(func, forward)
        if fate == "returned" and qualified in NO_DEVICE_ARGUMENT:
            return None
        soft = {
            "returned": f"builds a CPU tensor that `{func.name.value}` returns; unless every caller moves it,",
            "index": "makes CPU indices for tensors that live on the device once the module is moved: PyTorch "
                     "copies them over on every call;",
            "unsure": "creates a CPU tensor; fine if its data is a single number or the tensor is meant for the "
                      "host, otherwise",
        }
        if fate in soft:
            better = _with_device(call, device)
            return ctx.diagnostic(self, line, column,
                                  f"`{shown}` in `{where}` {soft[fate]} pass device=: {better}{note}",
                                  severity=Severity.INFO, fix=better)
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
