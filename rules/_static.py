"""Shared libcst helpers for the static rules (not a rule: the leading underscore keeps it out of the registry).

Everything here reads syntax only. Nothing imports torch: names are resolved from the file's own
``import`` statements, so ``import torch as T`` and ``from torch import zeros`` resolve to
``torch.zeros`` without ever loading torch.

One pass over the module (:func:`facts`) collects what several rules need (imports, classes, loops
over data loaders, device moves, accelerator evidence) and is cached on the :class:`RuleContext`,
so running all static rules over a file walks the whole tree once plus the small subtrees each
rule looks at.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator

import libcst as cst
from libcst.metadata import PositionProvider

if TYPE_CHECKING:
    from memlint.rules.base import RuleContext

# Factories that take ``device=``; without it the tensor is made on the CPU (the default device).
FACTORIES = frozenset(f"torch.{name}" for name in (
    "zeros", "ones", "empty", "full", "arange", "range", "linspace", "logspace", "rand", "randn",
    "randint", "randperm", "eye", "tensor", "as_tensor", "from_numpy", "empty_strided", "tril_indices",
    "triu_indices", "scalar_tensor",
))
# The legacy typed constructors: always CPU (``torch.cuda.FloatTensor`` is the GPU one).
LEGACY_TENSOR_TYPES = frozenset(f"torch.{name}" for name in (
    "Tensor", "FloatTensor", "DoubleTensor", "HalfTensor", "BFloat16Tensor", "ByteTensor", "CharTensor",
    "ShortTensor", "IntTensor", "LongTensor", "BoolTensor",
))
# Factories that cannot take ``device=``: moving the result afterwards is the only way.
NO_DEVICE_ARGUMENT = frozenset({"torch.from_numpy"} | LEGACY_TENSOR_TYPES)
DATALOADERS = frozenset({"torch.utils.data.DataLoader", "torch.utils.data.dataloader.DataLoader"})
DTYPES = frozenset(f"torch.{name}" for name in (
    "float", "float16", "float32", "float64", "half", "double", "bfloat16", "int", "int8", "int16",
    "int32", "int64", "long", "short", "uint8", "bool", "complex64", "complex128", "cfloat", "cdouble",
    "float8_e4m3fn", "float8_e5m2",
))
SYNC_METHODS = frozenset({"item", "cpu", "numpy", "tolist"})
_DEVICE_STRING = re.compile(r"^(cuda|mps|xpu|hpu|npu)(:\d+)?$")
_DEVICE_WORDS = frozenset({"dev", "gpu", "cuda", "rank", "local_rank", "device_id", "gpu_id"})
_EMPTY = cst.Module(body=[])


# --------------------------------------------------------------------------------------------
# Small syntax helpers
# --------------------------------------------------------------------------------------------

def code(node: cst.CSTNode) -> str:
    """The source text of a node, as written."""
    return _EMPTY.code_for_node(node)


def shorten(text: str, limit: int = 70) -> str:
    """Source text on one line for a message: whitespace squashed, cut at ``limit`` with ``...``."""
    text = " ".join(text.split()).replace("( ", "(").replace(" )", ")").replace("[ ", "[").replace(" ]", "]")
    if len(text) <= limit:
        return text
    cut = text[: limit - 3]
    return cut + ("...)" if cut.count("(") > cut.count(")") else "...")


def dotted_name(expr: cst.BaseExpression | None) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    parts: list[str] = []
    while isinstance(expr, cst.Attribute):
        parts.append(expr.attr.value)
        expr = expr.value
    if not isinstance(expr, cst.Name):
        return None
    parts.append(expr.value)
    return ".".join(reversed(parts))


def root_name(expr: cst.BaseExpression) -> str | None:
    """The variable an expression hangs off: ``batch`` for ``batch["x"].float``, ``x`` for ``*x``."""
    while True:
        if isinstance(expr, cst.Name):
            return expr.value
        if isinstance(expr, (cst.Attribute, cst.Subscript)):
            expr = expr.value
        elif isinstance(expr, cst.StarredElement):
            expr = expr.value
        else:
            return None


def method_name(call: cst.Call) -> str | None:
    """``item`` for ``loss.item()``; None when the call is not a method call."""
    return call.func.attr.value if isinstance(call.func, cst.Attribute) else None


def call_name(call: cst.Call) -> str:
    """The last part of what is called: ``DataLoader`` for ``data.DataLoader(...)``, '' if unnamed."""
    if isinstance(call.func, cst.Attribute):
        return call.func.attr.value
    if isinstance(call.func, cst.Name):
        return call.func.value
    return ""


def keyword(call: cst.Call, name: str) -> cst.Arg | None:
    return next((arg for arg in call.args if arg.keyword is not None and arg.keyword.value == name), None)


def positional(call: cst.Call) -> list[cst.Arg]:
    return [arg for arg in call.args if arg.keyword is None and not arg.star]


def has_star_kwargs(call: cst.Call) -> bool:
    """``**kwargs`` (or ``*args``) can carry any argument: a rule checking for one must stay silent."""
    return any(arg.star for arg in call.args)


_STOP_DEFAULT = (cst.FunctionDef, cst.ClassDef, cst.Lambda)


# Tokens and whitespace: never what a rule looks for, so the walk does not descend into them.
_TRIVIA = (
    cst.BaseParenthesizableWhitespace, cst.TrailingWhitespace, cst.EmptyLine, cst.Newline, cst.Comment,
    cst.Comma, cst.Dot, cst.LeftParen, cst.RightParen, cst.LeftSquareBracket, cst.RightSquareBracket,
    cst.LeftCurlyBrace, cst.RightCurlyBrace, cst.AssignEqual, cst.Colon, cst.Semicolon, cst.BaseBinaryOp,
    cst.BaseBooleanOp, cst.BaseCompOp, cst.BaseUnaryOp, cst.BaseAugOp, cst.ImportStar,
)
_TRIVIA_FIELDS = frozenset({
    "lpar", "rpar", "comma", "semicolon", "leading_lines", "lines_after_decorators", "header", "footer",
    "trailing_whitespace", "newline", "equal", "colon", "lbracket", "rbracket", "lbrace", "rbrace", "dot",
    "operator", "asynchronous", "first_line", "lines_after_decorator", "footer",
})
_FIELDS: dict[type, tuple[str, ...]] = {}


def _fields(kind: type) -> tuple[str, ...]:
    names = _FIELDS.get(kind)
    if names is None:
        names = tuple(f.name for f in dataclasses.fields(kind)
                      if f.name not in _TRIVIA_FIELDS and not f.name.startswith("whitespace"))
        _FIELDS[kind] = names
    return names


_IS_CHILD: dict[type, bool] = {}
_MATCH: dict[tuple[type, ...], dict[type, bool]] = {}


def _is_child(kind: type) -> bool:
    # isinstance against libcst's abstract bases goes through ABCMeta: cache the answer per type
    answer = _IS_CHILD.get(kind)
    if answer is None:
        answer = _IS_CHILD[kind] = issubclass(kind, cst.CSTNode) and not issubclass(kind, _TRIVIA)
    return answer


def _matcher(types: tuple[type, ...]) -> dict[type, bool]:
    table = _MATCH.get(types)
    if table is None:
        table = _MATCH[types] = {}
    return table


def _is(kind: type, types: tuple[type, ...], table: dict[type, bool]) -> bool:
    answer = table.get(kind)
    if answer is None:
        answer = table[kind] = issubclass(kind, types)
    return answer


def children(node: cst.CSTNode) -> list[cst.CSTNode]:
    """The syntax children of ``node`` (no tokens, no whitespace), in field order, which follows the source.

    Much cheaper than ``node.visit``, which rebuilds every node it passes through.
    """
    out: list[cst.CSTNode] = []
    for name in _fields(type(node)):
        value = getattr(node, name)
        kind = type(value)
        if kind is tuple or kind is list:
            out.extend(v for v in value if _is_child(type(v)))
        elif _is_child(kind):
            out.append(value)
    return out


def walk(node: cst.CSTNode, types: type | tuple[type, ...], *, stop: tuple[type, ...] = _STOP_DEFAULT) -> list:
    """Nodes of ``types`` under ``node`` (itself included), in source order, not entering ``stop`` nodes.

    By default nested functions, lambdas and classes are not entered: they run at another time.
    """
    types = types if isinstance(types, tuple) else (types,)
    wanted = _matcher(types)
    stopping = _matcher(stop)
    found = []
    stack = [node]
    while stack:
        current = stack.pop()
        kind = type(current)
        if _is(kind, types, wanted):
            found.append(current)
        if stop and current is not node and _is(kind, stop, stopping):
            continue
        stack.extend(reversed(children(current)))
    return found


def calls_in(node: cst.CSTNode, *, stop: tuple[type, ...] = _STOP_DEFAULT) -> list[cst.Call]:
    return walk(node, cst.Call, stop=stop)


def names_in(node: cst.CSTNode) -> set[str]:
    """Every plain variable name under ``node`` (attribute names and keywords excluded, nested scopes included)."""
    names: set[str] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, cst.Name):
            names.add(current.value)
        elif isinstance(current, (cst.Attribute, cst.Arg)):
            stack.append(current.value)  # ``a.b`` and ``f(b=a)`` read ``a`` only
        else:
            stack.extend(children(current))
    return names


def target_names(target: cst.BaseExpression) -> list[str]:
    """Names bound by an assignment or ``for`` target (``x``, ``x, y``, ``(i, (x, y))``)."""
    if isinstance(target, cst.Name):
        return [target.value]
    if isinstance(target, (cst.Tuple, cst.List)):
        out: list[str] = []
        for element in target.elements:
            out.extend(target_names(element.value))
        return out
    if isinstance(target, cst.StarredElement):
        return target_names(target.value)
    return []


def self_attribute(expr: cst.BaseExpression, self_name: str = "self") -> str | None:
    """``mask`` for ``self.mask``; None for anything else."""
    if isinstance(expr, cst.Attribute) and isinstance(expr.value, cst.Name) and expr.value.value == self_name:
        return expr.attr.value
    return None


def position(ctx: "RuleContext", node: cst.CSTNode) -> tuple[int, int]:
    """1-based line and 1-based column of ``node`` (like ruff)."""
    placer = ctx.extras.get("memlint.static.positions")
    if placer is None:
        placer = ctx.extras["memlint.static.positions"] = _Positions(ctx.module, ctx.source)
    start = placer.start(node)
    if start is None:  # not under a statement that could be placed: the whole module's positions
        start = ctx.wrapper.resolve(PositionProvider)[node].start
    return start.line, start.column + 1


class _Positions:
    """Where nodes start, from the code of their top-level statement alone.

    libcst's PositionProvider generates the code of the whole module to count its lines: a tenth of a
    second for a long file, a fifth of the static rules' time on the transformers package, spent for
    a single diagnostic. Here only the top-level statement holding the node is generated (it starts at
    column 0, so columns are as in the file), and the statement is placed at the line Python's own
    parser gives it. Where the two parsers do not agree on a statement (its first line of code differs),
    ``start`` gives None and the caller asks the whole module.
    """

    def __init__(self, module: cst.Module, source: str) -> None:
        self.module = module
        self.lines = source.splitlines()
        self.statement_of: dict[int, int] | None = None  # id(node) -> index of its top-level statement
        self.first_lines = _first_lines(module, source)  # of each top-level statement's code, by ``ast``
        self.placed: dict[int, tuple[int, dict] | None] = {}  # statement -> (line offset, its positions)

    def start(self, node: cst.CSTNode) -> "cst.metadata.CodePosition | None":
        if self.first_lines is None:
            return None
        if self.statement_of is None:
            self.statement_of = {}
            for index, statement in enumerate(self.module.body):
                stack: list[cst.CSTNode] = [statement]
                while stack:
                    current = stack.pop()
                    self.statement_of[id(current)] = index
                    stack.extend(children(current))
        index = self.statement_of.get(id(node))
        if index is None:
            return None
        if index not in self.placed:
            self.placed[index] = self._place(index)
        placed = self.placed[index]
        if placed is None or node not in placed[1]:
            return None
        offset, positions = placed
        start = positions[node].start
        return dataclasses.replace(start, line=start.line + offset)

    def _place(self, index: int) -> tuple[int, dict] | None:
        statement = self.module.body[index]
        alone = self.module.with_changes(body=[statement], header=[], footer=[])
        text = alone.code.splitlines()
        # The statement's own code starts after its leading blank and comment lines (and a decorator's).
        first = len(statement.leading_lines) + 1
        decorators = getattr(statement, "decorators", ())
        if decorators:
            first += len(decorators[0].leading_lines)
        line = self.first_lines[index]
        if not (0 < first <= len(text) and 0 < line <= len(self.lines)) or text[first - 1] != self.lines[line - 1]:
            return None
        wrapper = cst.metadata.MetadataWrapper(alone, unsafe_skip_copy=True)
        return line - first, wrapper.resolve(PositionProvider)


def _first_lines(module: cst.Module, source: str) -> list[int] | None:
    """The line of each top-level statement's first code (a decorator's, if it has one), by ``ast``;
    None where ``ast`` cannot parse the file or counts other statements."""
    import ast

    try:
        statements = ast.parse(source).body
    except (SyntaxError, ValueError):
        return None
    lines, at = [], 0
    for statement in module.body:
        if at >= len(statements):
            return None
        tree = statements[at]
        decorators = getattr(tree, "decorator_list", None)
        lines.append(decorators[0].lineno if decorators else tree.lineno)
        at += len(statement.body) if isinstance(statement, cst.SimpleStatementLine) else 1
    return lines if at == len(statements) else None


def string_value(expr: cst.BaseExpression) -> str | None:
    if isinstance(expr, cst.SimpleString):
        try:
            value = expr.evaluated_value
        except Exception:  # noqa: BLE001 - malformed escapes: not a device string anyway
            return None
        return value if isinstance(value, str) else None
    return None


def is_device_string(expr: cst.BaseExpression) -> bool:
    value = string_value(expr)
    return value is not None and bool(_DEVICE_STRING.match(value))


# --------------------------------------------------------------------------------------------
# Imports
# --------------------------------------------------------------------------------------------

class Imports:
    """Local name -> fully qualified name, read from the file's import statements."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def add(self, node: cst.Import | cst.ImportFrom) -> None:
        if isinstance(node, cst.Import):
            for alias in node.names:
                full = dotted_name(alias.name)
                if full is None:
                    continue
                if alias.asname is not None and isinstance(alias.asname.name, cst.Name):
                    self.names[alias.asname.name.value] = full
                else:
                    head = full.split(".", 1)[0]
                    self.names[head] = head
            return
        if node.relative or node.module is None or isinstance(node.names, cst.ImportStar):
            return
        module = dotted_name(node.module)
        if module is None:
            return
        for alias in node.names:
            name = dotted_name(alias.name)
            if name is None:
                continue
            local = alias.asname.name.value if alias.asname is not None and isinstance(alias.asname.name, cst.Name) else name
            self.names[local] = f"{module}.{name}"

    def qualify(self, expr: cst.BaseExpression | None) -> str | None:
        """``torch.zeros`` for ``T.zeros`` after ``import torch as T``; None for names not imported."""
        dotted = dotted_name(expr)
        if dotted is None:
            return None
        head, _, rest = dotted.partition(".")
        full = self.names.get(head)
        if full is None:
            return None
        return f"{full}.{rest}" if rest else full

    def imports_module(self, prefix: str) -> bool:
        return any(full == prefix or full.startswith(prefix + ".") for full in self.names.values())


# --------------------------------------------------------------------------------------------
# Device moves and host syncs
# --------------------------------------------------------------------------------------------

def is_dtype(expr: cst.BaseExpression, imports: Imports) -> bool:
    """``torch.float16``, ``x.dtype``, ``dtype``, ``torch.get_default_dtype()``."""
    if isinstance(expr, cst.Call):
        return "dtype" in call_name(expr).lower()
    qualified = imports.qualify(expr)
    if qualified in DTYPES:
        return True
    dotted = dotted_name(expr) or ""
    return "dtype" in dotted.rsplit(".", 1)[-1].lower()


def looks_like_device(expr: cst.BaseExpression, imports: Imports) -> bool:
    """``"cuda:0"``, ``torch.device("cuda")``, ``device``, ``args.device``, ``local_rank``, ``0``."""
    if is_device_string(expr) or isinstance(expr, cst.Integer):
        return True
    if isinstance(expr, cst.Call):
        return imports.qualify(expr.func) == "torch.device"
    dotted = dotted_name(expr)
    if dotted is None:
        return False
    last = dotted.rsplit(".", 1)[-1].lower()
    return "device" in last or last in _DEVICE_WORDS


def is_move_call(call: cst.Call, imports: Imports, *, to_accelerator: bool = False) -> bool:
    """``.cuda()``, ``.to(<device or tensor>)``, ``.type_as(t)``; not ``.to(torch.float16)``.

    With ``to_accelerator`` only moves that name an accelerator count: ``.cuda()``, ``.to("cuda")``,
    ``.to(device)`` (a device-looking name), not ``.to(x)`` or ``.to("cpu")``.
    """
    name = method_name(call)
    if name == "cuda":
        return True
    if name == "type_as":
        return not to_accelerator
    if name != "to":
        return False
    device_kw = keyword(call, "device")
    if device_kw is not None:
        return not to_accelerator or looks_like_device(device_kw.value, imports)
    args = positional(call)
    if not args:
        return False
    first = args[0].value
    if is_dtype(first, imports) or string_value(first) == "cpu":
        return False
    if to_accelerator:
        return looks_like_device(first, imports)
    return True


def device_text(call: cst.Call, imports: Imports) -> str:
    """What to write as ``device=`` instead of the move ``call``: ``x.device`` for ``.to(x)``."""
    if method_name(call) == "cuda":
        args = positional(call)
        return f'"cuda:{code(args[0].value)}"' if args and isinstance(args[0].value, cst.Integer) else '"cuda"'
    device_kw = keyword(call, "device")
    if device_kw is not None:
        return code(device_kw.value)
    args = positional(call)
    if not args:
        return "device"
    first = args[0].value
    if looks_like_device(first, imports):
        return code(first)
    return f"{code(first)}.device"


def is_sync_call(call: cst.Call) -> bool:
    """``.item()``, ``.cpu()``, ``.numpy()``, ``.tolist()``: the host waits for the device."""
    name = method_name(call)
    if name not in SYNC_METHODS:
        return False
    if name == "cpu":
        return True
    return not positional(call)


# --------------------------------------------------------------------------------------------
# Classes: which are nn.Module subclasses, and what their forward reaches
# --------------------------------------------------------------------------------------------

_NOT_MODULE_BASES = frozenset({"object", "ABC", "Protocol", "Generic", "Enum", "IntEnum", "NamedTuple",
                               "TypedDict", "Exception", "dict", "list", "tuple"})


def methods(cls: cst.ClassDef) -> dict[str, cst.FunctionDef]:
    found: dict[str, cst.FunctionDef] = {}
    if isinstance(cls.body, cst.IndentedBlock):
        for statement in cls.body.body:
            if isinstance(statement, cst.FunctionDef):
                found[statement.name.value] = statement
            elif isinstance(statement, cst.If):  # ``if TYPE_CHECKING`` / version switches
                for inner in walk(statement, cst.FunctionDef):
                    found.setdefault(inner.name.value, inner)
    return found


def _decorator_names(func: cst.FunctionDef) -> set[str]:
    return {(dotted_name(d.decorator) or "").rsplit(".", 1)[-1] for d in func.decorators}


def _base_verdict(base: cst.BaseExpression, imports: Imports) -> bool | None:
    """True: a module base; False: certainly not a module (autograd.Function); None: no opinion."""
    raw = dotted_name(base)
    if raw is None:
        return None
    qualified = imports.qualify(base) or raw
    last = raw.rsplit(".", 1)[-1]
    if last == "Function" or qualified.startswith("torch.autograd"):
        return False
    if last.endswith("Module"):
        return True
    if qualified.startswith("torch.nn.") and not qualified.startswith("torch.nn.functional"):
        return True
    return None


def is_module_class(cls: cst.ClassDef, imports: Imports, local_modules: Iterable[str] = ()) -> bool:
    """Does ``cls`` look like an ``nn.Module`` subclass? When unsure: no.

    Yes for a base named ``...Module`` (``nn.Module``, ``torch.nn.Module``, ``LightningModule``), a
    base from ``torch.nn`` (``nn.Linear``, ``nn.Sequential``), a base that is a module class of the
    same file, or any class with a (non-static) ``forward`` that subclasses something. No for
    ``torch.autograd.Function`` subclasses.
    """
    local = set(local_modules)
    verdicts = []
    for arg in cls.bases:
        if arg.keyword is not None or arg.star:
            continue
        verdict = _base_verdict(arg.value, imports)
        if verdict is None and dotted_name(arg.value) in local:
            verdict = True
        verdicts.append((arg.value, verdict))
    if any(v is False for _, v in verdicts):
        return False
    if any(v for _, v in verdicts):
        return True
    forward = methods(cls).get("forward")
    if forward is None or {"staticmethod", "classmethod"} & _decorator_names(forward):
        return False
    return any((dotted_name(base) or "").rsplit(".", 1)[-1] not in _NOT_MODULE_BASES
               for base, _ in verdicts if dotted_name(base))


def module_classes(ctx: "RuleContext") -> list[cst.ClassDef]:
    """The file's classes that look like nn.Module subclasses (cached per file)."""
    info = facts(ctx)
    if info.module_classes is None:
        found: list[cst.ClassDef] = []
        names: set[str] = set()
        changed = True
        while changed:  # a class deriving from a module class of the same file is one too
            changed = False
            for cls in info.classes:
                if cls not in found and is_module_class(cls, info.imports, names):
                    found.append(cls)
                    names.add(cls.name.value)
                    changed = True
        info.module_classes = [cls for cls in info.classes if cls in found]
    return info.module_classes


def first_param(func: cst.FunctionDef, index: int = 0) -> str | None:
    """The name of the ``index``-th parameter (``self`` is index 0 for methods)."""
    params = list(func.params.posonly_params) + list(func.params.params)
    return params[index].name.value if len(params) > index else None


def reachable_methods(cls: cst.ClassDef, entry: str = "forward") -> list[tuple[cst.FunctionDef, list[str]]]:
    """``entry`` and the methods of the same class it calls through ``self.name(...)``, transitively.

    Each comes with the call path from ``entry`` (``["forward", "_mask"]``).
    """
    table = methods(cls)
    if entry not in table:
        return []
    out: list[tuple[cst.FunctionDef, list[str]]] = []
    seen = {entry}
    queue = [(table[entry], [entry])]
    while queue:
        func, path = queue.pop(0)
        out.append((func, path))
        self_name = first_param(func) or "self"
        for call in calls_in(func.body, stop=(cst.ClassDef,)):
            called = self_attribute(call.func, self_name)
            if called and called in table and called not in seen:
                seen.add(called)
                queue.append((table[called], [*path, called]))
    return out


# --------------------------------------------------------------------------------------------
# Loops over data loaders
# --------------------------------------------------------------------------------------------

_ITER_WRAPPERS = frozenset({"tqdm", "track", "progress_bar", "progressbar", "iter"})


@dataclass
class LoaderLoop:
    """``for <targets> in <loader>:`` (``enumerate``/``tqdm`` unwrapped) and where it sits."""

    node: cst.For
    loader: cst.BaseExpression
    targets: list[str]
    function: cst.FunctionDef | None
    index: str | None = None  # the ``enumerate`` counter, when there is one

    @property
    def loader_text(self) -> str:
        return code(self.loader)


def _unwrap_loader(iterable: cst.BaseExpression, target: cst.BaseExpression | None):
    """(loader, batch target, enumerate counter name) of a ``for`` loop."""
    index = None
    for _ in range(4):
        if not isinstance(iterable, cst.Call) or not iterable.args or iterable.args[0].keyword is not None:
            break
        name = call_name(iterable)
        if name == "enumerate":
            iterable = iterable.args[0].value
            if isinstance(target, (cst.Tuple, cst.List)) and len(target.elements) == 2:
                counter = target.elements[0].value
                index = counter.value if isinstance(counter, cst.Name) else None
                target = target.elements[1].value
            else:
                target = None
        elif name in _ITER_WRAPPERS:
            iterable = iterable.args[0].value
        else:
            break
    return iterable, target, index


def _is_loader(expr: cst.BaseExpression, loader_names: set[str]) -> bool:
    dotted = dotted_name(expr)
    if dotted is None:
        return False
    last = dotted.rsplit(".", 1)[-1]
    return "loader" in last.lower() or dotted in loader_names


# --------------------------------------------------------------------------------------------
# The one pass over a file
# --------------------------------------------------------------------------------------------

@dataclass
class FileFacts:
    imports: Imports = field(default_factory=Imports)
    classes: list[cst.ClassDef] = field(default_factory=list)
    fors: list[tuple[cst.For, cst.FunctionDef | None]] = field(default_factory=list)
    calls: list[cst.Call] = field(default_factory=list)
    assigns: list[cst.Assign] = field(default_factory=list)
    functions: dict[str, cst.FunctionDef] = field(default_factory=dict)
    device_strings: list[cst.SimpleString] = field(default_factory=list)
    accelerator_node: cst.CSTNode | None = None
    module_classes: list[cst.ClassDef] | None = None
    _loops: list[LoaderLoop] | None = None

    def qualified(self, call: cst.Call) -> str | None:
        return self.imports.qualify(call.func)

    def dataloader_calls(self) -> list[cst.Call]:
        return [call for call in self.calls if self.qualified(call) in DATALOADERS]

    def loader_loops(self) -> list[LoaderLoop]:
        """``for`` loops over a data loader: a name containing "loader" or one assigned a DataLoader."""
        if self._loops is None:
            loader_names = set()
            for assign in self.assigns:
                if isinstance(assign.value, cst.Call) and self.qualified(assign.value) in DATALOADERS:
                    for target in assign.targets:
                        dotted = dotted_name(target.target)
                        if dotted:
                            loader_names.add(dotted)
            loops = []
            for node, function in self.fors:
                loader, target, index = _unwrap_loader(node.iter, node.target)
                if target is None or not _is_loader(loader, loader_names):
                    continue
                names = target_names(target)
                if names:
                    loops.append(LoaderLoop(node, loader, names, function, index))
            self._loops = loops
        return self._loops

    def accelerator(self) -> tuple[cst.CSTNode, str] | None:
        """The first sign that the file runs on an accelerator: ``.cuda()``, ``"cuda"``, ``torch.device("cuda")``,
        ``.to(0)``, ``.to(gpu_id)``, ``.to(local_rank)``."""
        if self.accelerator_node is None:
            return None
        return self.accelerator_node, f"`{shorten(code(self.accelerator_node), 40)}`"

    def moved_modules(self) -> dict[str, cst.Call]:
        """Names (``model``, ``self.net``) moved to an accelerator somewhere in the file, with the move."""
        moved: dict[str, cst.Call] = {}
        for call in self.calls:
            if is_move_call(call, self.imports, to_accelerator=True):
                receiver = dotted_name(call.func.value)  # type: ignore[union-attr]
                if receiver and receiver.count(".") <= 1:
                    moved.setdefault(receiver, call)
        for assign in self.assigns:
            value = assign.value
            if isinstance(value, cst.Call) and is_move_call(value, self.imports, to_accelerator=True):
                for target in assign.targets:
                    dotted = dotted_name(target.target)
                    if dotted and dotted.count(".") <= 1:
                        moved.setdefault(dotted, value)
        return moved


_ACCELERATOR_WORDS = ("gpu", "cuda", "rank")


def _names_accelerator(call: cst.Call) -> bool:
    """``x.cuda()``, or a move to an accelerator by index or by a name that says so: ``.to(0)``,
    ``.to(gpu_id)``, ``.to(local_rank)`` (not ``.to(device)``, which may well be the CPU)."""
    name = method_name(call)
    if name == "cuda":
        return True
    if name != "to":
        return False
    device = keyword(call, "device")
    args = positional(call)
    target = device.value if device is not None else (args[0].value if args else None)
    if isinstance(target, cst.Integer):
        return True
    dotted = (dotted_name(target) or "").rsplit(".", 1)[-1].lower()
    return any(word in dotted for word in _ACCELERATOR_WORDS)


def _collect_facts(module: cst.Module, info: FileFacts) -> None:
    stack: list[tuple[cst.CSTNode, cst.FunctionDef | None]] = [(module, None)]
    while stack:
        node, function = stack.pop()
        if isinstance(node, cst.Call):
            info.calls.append(node)
            if info.accelerator_node is None and _names_accelerator(node):
                info.accelerator_node = node
        elif isinstance(node, cst.SimpleString):
            if len(node.value) < 12 and is_device_string(node):
                info.device_strings.append(node)
                if info.accelerator_node is None:
                    info.accelerator_node = node
        elif isinstance(node, cst.Assign):
            info.assigns.append(node)
        elif isinstance(node, cst.For):
            info.fors.append((node, function))
        elif isinstance(node, cst.FunctionDef):
            info.functions.setdefault(node.name.value, node)
            function = node
        elif isinstance(node, cst.ClassDef):
            info.classes.append(node)
        elif isinstance(node, (cst.Import, cst.ImportFrom)):
            info.imports.add(node)
        stack.extend((child, function) for child in reversed(children(node)))


def facts(ctx: "RuleContext") -> FileFacts:
    """The shared one-pass summary of ``ctx``'s file, computed once and cached in ``ctx.extras``."""
    cached = ctx.extras.get("memlint.static.facts")
    if cached is None:
        cached = FileFacts()
        _collect_facts(ctx.module, cached)
        ctx.extras["memlint.static.facts"] = cached
    return cached  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Loop bodies
# --------------------------------------------------------------------------------------------

def is_modulo_guard(test: cst.BaseExpression) -> bool:
    """``step % 100 == 0``, ``(i + 1) % args.log_every == 0 and rank == 0``, ``not i % 10``."""
    for op in walk(test, cst.BinaryOperation, stop=(cst.Lambda,)):
        if isinstance(op.operator, cst.Modulo) and not isinstance(
                op.left, (cst.SimpleString, cst.ConcatenatedString, cst.FormattedString)):
            return True
    return False


def is_index_equality(test: cst.BaseExpression, index: str | None) -> bool:
    """``i == 0``, ``step == len(loader) - 1``: a branch taken on one step of the loop."""
    if index is None:
        return False
    for comparison in walk(test, cst.Comparison, stop=(cst.Lambda,)):
        if len(comparison.comparisons) != 1 or not isinstance(comparison.comparisons[0].operator, cst.Equal):
            continue
        sides = (comparison.left, comparison.comparisons[0].comparator)
        if any(isinstance(side, cst.Name) and side.value == index for side in sides):
            return True
    return False


def modulo_guarded_nodes(body: cst.CSTNode, index: str | None = None) -> set[int]:
    """ids of the nodes inside ``if <...% N...>:`` bodies (not their ``else``) under ``body``, and,
    given the loop's step counter ``index``, inside ``if index == ...:`` bodies (one step only)."""
    guarded: set[int] = set()
    for node in walk(body, cst.If):
        if is_modulo_guard(node.test) or is_index_equality(node.test, index):
            guarded.update(id(inner) for inner in walk(node.body, cst.CSTNode))
    return guarded


def statements(body: cst.CSTNode) -> Iterator[cst.SimpleStatementLine]:
    """The simple statement lines under ``body`` in source order, not entering nested definitions."""
    yield from walk(body, cst.SimpleStatementLine)


def iter_small(body: cst.CSTNode) -> Iterator[cst.BaseSmallStatement]:
    for line in statements(body):
        yield from line.body


# --------------------------------------------------------------------------------------------
# Which expressions make tensors
# --------------------------------------------------------------------------------------------

_NON_TENSOR_FUNCS = frozenset({
    "is_tensor", "is_storage", "numel", "is_floating_point", "is_complex", "is_nonzero", "save", "equal",
    "allclose", "typename", "result_type", "can_cast", "promote_types", "get_default_dtype", "device",
    "finfo", "iinfo", "Size", "manual_seed", "seed", "no_grad", "enable_grad", "inference_mode",
    "set_grad_enabled", "broadcast_shapes",
})
_NON_TENSOR_METHODS = frozenset({
    "item", "tolist", "numpy", "size", "dim", "ndimension", "numel", "nelement", "element_size", "data_ptr",
    "stride", "is_contiguous", "get_device", "storage", "untyped_storage", "storage_offset", "type",
    "is_floating_point", "is_complex", "equal", "allclose", "register_hook", "backward", "__len__",
})
_TENSOR_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "data", "real", "imag"})
TENSOR, CONTAINER = "tensor", "container"


def tensor_kind(expr: cst.BaseExpression, imports: Imports, env: dict[str, str | None] | None = None) -> str | None:
    """``"tensor"`` if ``expr`` surely makes a plain tensor (``torch.tril(torch.ones(n, n))``,
    ``1.0 / (base ** (torch.arange(0, d, 2) / d))``), ``"container"`` for a list/tuple/dict literal
    (or comprehension) of such tensors, else None. ``nn.Parameter(...)`` is not a plain tensor.
    ``env`` maps local names to what they were assigned.
    """
    env = env or {}
    if isinstance(expr, cst.Name):
        return env.get(expr.value)
    if isinstance(expr, cst.Call):
        qualified = imports.qualify(expr.func)
        if qualified is not None and qualified.startswith("torch."):
            last = qualified.rsplit(".", 1)[-1]
            if qualified in FACTORIES or qualified in LEGACY_TENSOR_TYPES:
                return TENSOR
            if last.endswith("_like") and qualified.count(".") == 1:
                return TENSOR
            if (last[:1].islower() and last not in _NON_TENSOR_FUNCS and expr.args
                    and tensor_kind(expr.args[0].value, imports, env) == TENSOR):
                return TENSOR
            if qualified.count(".") == 1 and last in {"cat", "concat", "concatenate", "stack", "hstack", "vstack"} \
                    and expr.args and tensor_kind(expr.args[0].value, imports, env) == CONTAINER:
                return TENSOR
            return None
        name = method_name(expr)
        if name is not None and name not in _NON_TENSOR_METHODS:
            return TENSOR if tensor_kind(expr.func.value, imports, env) == TENSOR else None  # type: ignore[union-attr]
        return None
    if isinstance(expr, cst.Attribute):
        if expr.attr.value in _TENSOR_ATTRIBUTES and tensor_kind(expr.value, imports, env) == TENSOR:
            return TENSOR
        return None
    if isinstance(expr, cst.BinaryOperation):
        if TENSOR in (tensor_kind(expr.left, imports, env), tensor_kind(expr.right, imports, env)):
            return TENSOR
        return None
    if isinstance(expr, cst.UnaryOperation):
        return TENSOR if not isinstance(expr.operator, cst.Not) and tensor_kind(expr.expression, imports, env) == TENSOR else None
    if isinstance(expr, cst.Subscript):
        return TENSOR if tensor_kind(expr.value, imports, env) == TENSOR else None
    if isinstance(expr, (cst.List, cst.Tuple, cst.Set)):
        elements = [e.value for e in expr.elements]
        return CONTAINER if elements and any(tensor_kind(e, imports, env) == TENSOR for e in elements) else None
    if isinstance(expr, cst.Dict):
        values = [e.value for e in expr.elements if isinstance(e, cst.DictElement)]
        return CONTAINER if any(tensor_kind(v, imports, env) == TENSOR for v in values) else None
    if isinstance(expr, (cst.ListComp, cst.SetComp)):
        return CONTAINER if tensor_kind(expr.elt, imports, env) == TENSOR else None
    if isinstance(expr, cst.DictComp):
        return CONTAINER if tensor_kind(expr.value, imports, env) == TENSOR else None
    if isinstance(expr, cst.IfExp):
        kinds = {tensor_kind(expr.body, imports, env), tensor_kind(expr.orelse, imports, env)}
        nones = [b for b in (expr.body, expr.orelse) if isinstance(b, cst.Name) and b.value == "None"]
        if kinds == {TENSOR} or (TENSOR in kinds and nones):
            return TENSOR
        return None
    return None


# --------------------------------------------------------------------------------------------
# Data flow of the batch inside a loop over a loader
# --------------------------------------------------------------------------------------------

_MOVE_WORDS = ("device", "cuda", "gpu", "move", "transfer", "prepare", "accelerat")
_HARMLESS_CALLS = frozenset({"print", "len", "isinstance", "type", "str", "repr", "id", "hasattr", "getattr",
                             "enumerate", "zip", "range", "format"})


def is_moveish_call(call: cst.Call, imports: Imports) -> bool:
    """A move, or a call that may well be one: ``to_device(batch)``, ``move_to_cuda(x)``, ``non_blocking=``."""
    if is_move_call(call, imports) or keyword(call, "non_blocking") is not None:
        return True
    name = call_name(call).lower()
    return any(word in name for word in _MOVE_WORDS)


def value_root(expr: cst.BaseExpression, *, through_calls: bool = True) -> str | None:
    """The variable a value comes from: ``x`` for ``x``, ``x[0]``, ``x.float()``, ``*x``, ``x["ids"].long()``.

    ``through_calls=False`` stops at method calls: ``x.tolist()`` is a new object, not ``x``.
    """
    for _ in range(32):
        if isinstance(expr, cst.Name):
            return expr.value
        if isinstance(expr, (cst.Attribute, cst.Subscript, cst.StarredElement)):
            expr = expr.value
        elif through_calls and isinstance(expr, cst.Call) and isinstance(expr.func, cst.Attribute):
            expr = expr.func.value
        else:
            return None
    return None


def _assignment(small: cst.BaseSmallStatement) -> tuple[list[str], cst.BaseExpression] | None:
    if isinstance(small, cst.Assign):
        names: list[str] = []
        for target in small.targets:
            names.extend(target_names(target.target))
        return names, small.value
    if isinstance(small, (cst.AnnAssign, cst.AugAssign)) and small.value is not None:
        return target_names(small.target), small.value
    return None


class LoopFlow:
    """Where the batch of a :class:`LoaderLoop` goes inside the loop body.

    ``unmoved``: names holding loader data (the loop variables and what is unpacked or indexed out of
    them without a call) that are never moved to a device, nor handed to some other function that
    might move them, anywhere in the body. Order is ignored on purpose: a move anywhere counts, and a
    name merely mentioned in a statement that moves something counts as moved (DEV003 stays silent).

    ``on_host``: the stricter opposite, for DEV004: loader data never re-bound to a moved value
    (``x = x.cuda()``) nor handed to a function that might move it in place (``to_device(batch)``);
    ``model(x.cuda())`` leaves ``x`` itself on the host.
    """

    def __init__(self, loop: LoaderLoop, imports: Imports, models: Iterable[str] = ()) -> None:
        models = set(models)
        tracked: dict[str, set[str]] = {name: {name} for name in loop.targets}
        moved: set[str] = set()
        rebound: set[str] = set()
        escaped: set[str] = set()
        for small in iter_small(loop.node.body):
            calls = calls_in(small)
            moves = [call for call in calls if is_moveish_call(call, imports)]
            if moves:
                moved |= names_in(small)
                assignment = _assignment(small)
                if assignment is not None:
                    rebound.update(assignment[0])
                for call in moves:
                    rebound.update(r for r in (value_root(arg.value) for arg in call.args) if r)
                continue
            assignment = _assignment(small)
            if assignment is not None:
                targets, value = assignment
                sources = names_in(value) & tracked.keys()
                if sources and not calls_in(value) and not isinstance(small, cst.AugAssign):
                    origin = set().union(*(tracked[name] for name in sources))
                    for target in targets:
                        tracked[target] = origin | {target}
                else:
                    for target in targets:
                        tracked.pop(target, None)
            for call in calls:
                if dotted_name(call.func) in models or call_name(call) in _HARMLESS_CALLS:
                    continue
                for arg in call.args:
                    root = value_root(arg.value, through_calls=False)
                    if root in tracked:
                        escaped.add(root)
        for line_node in walk(loop.node.body, (cst.If, cst.While, cst.For, cst.With)):
            # a move in a compound statement's header (``with to_device(batch):``) counts too
            header = getattr(line_node, "test", None) or getattr(line_node, "iter", None)
            if header is not None and any(is_moveish_call(c, imports) for c in calls_in(header)):
                moved |= names_in(header)
        touched = moved | escaped
        self.moved = moved
        self.unmoved = {name for name, origin in tracked.items() if not (origin & touched)}
        self.on_host = {name for name, origin in tracked.items() if not (origin & (rebound | escaped))}
        self.tracked = tracked
