"""Generators and checks shared by the fuzz tests (tests/test_fuzz.py) and the fuzz benchmark (benchmarks/fuzz.py).

Two kinds of cases:

* **Sources** (``python_sources``): Python files, valid and broken, built from the constructs
  memlint's static rules look at (DataLoader calls, ``.cuda()``, factories in ``forward``,
  ``.item()`` in loops, tensor attributes, nn.Module classes) with random names, literals and
  nesting, then sometimes mutated byte-wise. ``lint_source`` runs them through the static path
  (``memlint.engine.lint_file``): it must never raise, and must say E999 exactly when CPython
  rejects the text.
* **Layer stacks** (``layer_stacks``): random ``nn.Sequential`` stacks of convolutions, linear
  layers, norms, activations, pooling, attention (``nn.MultiheadAttention`` and
  ``F.scaled_dot_product_attention``) and recurrent layers (``nn.LSTM``, ``nn.GRU``) with random
  shapes. ``compare_stack`` runs memlint's estimator (``memlint.estimator.analyse``) on fake tensors
  and the same training step on real CPU tensors, where ``RealStorageTracker`` records the peak of
  live storages.

The real measurement: a TorchDispatchMode sees the output of every aten op of three real steps
(inputs, forward, ``mean()`` loss, backward, foreach Adam, ``zero_grad``), counts each new
storage once with its ``nbytes`` rounded as the CUDA caching allocator rounds it (512-byte
blocks, what memlint reports), and a weakref finalizer on the storage tells when it is freed.
Parameters and buffers are counted from the start. This is what ``peak_allocated_bytes``
means for a CPU target (memlint's ``--target cpu:64GiB``): on a GPU target memlint adds the CUDA
libraries' workspaces and the caching allocator's whole-block counting, which a CPU step has not.
For a host target memlint runs the CPU's own kernels, as the real step does; stacks with
attention keep a 10% tolerance all the same (when memlint modelled the CUDA kernels on every
target, a log-sum-exp padded to 32 per row, a sequence of length 1 came out 16% high; the same
stacks are now exact). Dropout is left out of the stacks.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memlint.allocator import round_size

ATTENTION_TOLERANCE = 0.10  # relative, for stacks with attention

# --------------------------------------------------------------------------------------------
# Sources for the static rules
# --------------------------------------------------------------------------------------------

_NAMES = st.sampled_from(["x", "y", "model", "batch", "loader", "data", "net", "out", "loss", "opt", "mask",
                          "self", "cuda", "device", "torch", "nn", "i", "step", "_", "λ", "value"])
_LITERALS = st.one_of(st.integers(-3, 4096).map(str), st.sampled_from([
    "'cuda'", "'cuda:0'", "'cpu'", "'mps'", "None", "True", "False", "1e-3", "0.5", "[]", "()", "{}",
    "f'cuda:{i}'", "b'x'", "...", "\"\"\"doc\"\"\"", "-1", "2**31"]))


@st.composite
def _expression(draw: Any, depth: int = 0) -> str:
    name, literal = draw(_NAMES), draw(_LITERALS)
    choices = [
        name, literal, f"{name}.cuda()", f"{name}.to({literal})", f"{name}.item()", f"torch.zeros({literal})",
        f"torch.randn({literal}, {literal}, device={literal})", f"torch.tensor([{literal}])",
        f"torch.utils.data.DataLoader({name}, batch_size={literal}, num_workers={literal}, pin_memory={literal})",
        f"DataLoader({name}, {literal})", f"DataLoader(batch_size={literal})", f"nn.Linear({literal}, {literal})",
        f"{name}[{literal}]", f"{name}.{name}", f"lambda {name}: {name}", f"{name}({literal}, k={literal})",
        f"float({name}.sum())", f"{name}.cpu().numpy()", f"print({name}.item())", f"[{name} for {name} in {name}]",
        "torch.cuda.synchronize()", f"{name} if {name} else {literal}", f"(yield {name})", f"await {name}",
        f"{name}.register_buffer('b', torch.ones({literal}))", f"torch.arange({literal})",
    ]
    if depth < 2:
        inner = draw(_expression(depth + 1))
        choices += [f"({inner}).cuda()", f"{name}({inner})", f"{inner} + {name}", f"not {inner}",
                    f"torch.zeros_like({inner})", f"{{'k': {inner}}}", f"*{inner}"]
    return draw(st.sampled_from(choices))


@st.composite
def _statement(draw: Any, depth: int = 0) -> list[str]:
    name, expression = draw(_NAMES), draw(_expression())
    simple = [f"{name} = {expression}", expression, f"self.{name} = {expression}", f"{name} += {expression}",
              f"return {expression}", "pass", "break", "continue", f"import {name}", f"from torch import {name}",
              "from torch.utils.data import DataLoader", f"del {name}", f"global {name}", f"assert {expression}",
              f"{name}: int = {expression}", f"raise {expression}", "import torch", "from torch import nn"]
    if depth >= 3 or draw(st.integers(0, 3)) > 0:
        return [draw(st.sampled_from(simple))]
    body = [line for _ in range(draw(st.integers(1, 3))) for line in draw(_statement(depth + 1))]
    indented = ["    " + line for line in body]
    header = draw(st.sampled_from([
        f"def {name}(self, {draw(_NAMES)}):", "def forward(self, x):", f"for {name} in {expression}:",
        f"while {expression}:", f"if {expression}:", f"with {expression} as {name}:", "try:",
        f"class {name.capitalize() or 'C'}(nn.Module):", "class Net(torch.nn.Module):", "def __init__(self):",
        f"async def {name}():", "else:", f"match {name}:", "@torch.no_grad()"]))
    if header == "try:":
        return [header, *indented, "except Exception:", "    pass"]
    if header.startswith("@"):
        return [header, "def decorated(x):", *indented]
    return [header, *indented]


@st.composite
def python_sources(draw: Any) -> str:
    """A module of random statements; sometimes broken by a mutation (a deleted, doubled or inserted span)."""
    lines = [line for _ in range(draw(st.integers(0, 8))) for line in draw(_statement())]
    text = "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n\n", "\r\n"]))
    mutation = draw(st.sampled_from(["none", "none", "delete", "insert", "duplicate", "garbage"]))
    if text and mutation != "none":
        start = draw(st.integers(0, len(text) - 1))
        end = draw(st.integers(start, min(len(text), start + 12)))
        if mutation == "delete":
            text = text[:start] + text[end:]
        elif mutation == "insert":
            text = text[:start] + draw(st.sampled_from(["(", ")", ":", "\t", "    ", "'", '"""', "\\", "#", "\x0c",
                                                         "é", "\u2028", "lambda", "def"])) + text[start:]
        elif mutation == "duplicate":
            text = text[:end] + text[start:end] + text[end:]
        else:
            text = text[:start] + draw(st.text(max_size=8)) + text[end:]
    return text


def lint_source(data: bytes, directory: Path, name: str = "case.py") -> list[Any]:
    """The static path on one file: memlint.engine.lint_file, as `memlint check --no-import` runs it.

    Raises AssertionError when the answer is wrong: E999 must be reported exactly when
    CPython does not accept the text (or libcst cannot parse it, which the message says).
    """
    from memlint.engine import SourceFile, lint_file, selected_rules
    from memlint.settings import Settings
    from memlint.targets import resolve_target

    path = directory / name
    path.write_bytes(data)
    settings = Settings(no_import=True)
    rules = selected_rules(settings, model_rules=False)
    file = SourceFile(path, name, candidate=True)
    found, provisional, _ = lint_file(file, settings, resolve_target("gtx1050ti"), rules)
    diagnostics = found + provisional
    codes = {d.code for d in diagnostics}
    known = {rule.code for rule in rules} | {"E902", "E999"}
    assert codes <= known, codes - known
    if "E902" in codes:
        return diagnostics
    text = file.text
    try:
        compile(text, name, "exec", flags=__import__("ast").PyCF_ONLY_AST, dont_inherit=True)
        valid = True
    except (SyntaxError, ValueError):
        valid = False
    except RecursionError:
        return diagnostics
    if not valid:
        assert codes == {"E999"}, (codes, text)
    elif "E999" in codes:
        assert all("libcst" in d.message for d in diagnostics if d.code == "E999"), (diagnostics, text)
    lines = max(1, len(text.splitlines()) + 1)
    for diagnostic in diagnostics:
        assert 1 <= diagnostic.line <= lines and diagnostic.column >= 1, (diagnostic, text)
    return diagnostics


# --------------------------------------------------------------------------------------------
# Layer stacks for the estimator
# --------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """nn.MultiheadAttention as a layer (its forward returns a tuple)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


class Recurrent(nn.Module):
    """nn.LSTM or nn.GRU over a batch-first sequence, as a layer (its forward returns a tuple)."""

    def __init__(self, kind: str, dim: int, hidden: int, layers: int, bidirectional: bool) -> None:
        super().__init__()
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[kind](dim, hidden, num_layers=layers, batch_first=True,
                                                          bidirectional=bidirectional)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


class SdpaAttention(nn.Module):
    """Projections around F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(batch, length, dim))


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
                "leaky": nn.LeakyReLU, "relu_inplace": lambda: nn.ReLU(inplace=True)}


@dataclass
class StackCase:
    """A model as data: the input's per-sample shape, the layers, the batch size."""

    kind: str  # "image", "sequence" or "flat"
    input_shape: tuple[int, ...]
    layers: list[tuple[str, tuple]] = field(default_factory=list)
    batch: int = 2

    @property
    def has_attention(self) -> bool:
        return any(name in ("mha", "sdpa") for name, _ in self.layers)

    def build(self) -> nn.Module:
        return nn.Sequential(*(_make_layer(name, args) for name, args in self.layers))

    def describe(self) -> str:
        layers = ", ".join(f"{name}{args}" for name, args in self.layers)
        return f"{self.kind} input {self.input_shape} x batch {self.batch}: {layers}"


def _make_layer(name: str, args: tuple) -> nn.Module:
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name]()
    return {
        "conv": lambda c_in, c_out, k, s, p: nn.Conv2d(c_in, c_out, k, stride=s, padding=p),
        "bn2d": nn.BatchNorm2d, "gn": nn.GroupNorm, "maxpool": nn.MaxPool2d, "avgpool": nn.AvgPool2d,
        "adaptive": lambda size: nn.Sequential(nn.AdaptiveAvgPool2d(size), nn.Flatten()),
        "linear": nn.Linear, "ln": nn.LayerNorm, "bn1d": nn.BatchNorm1d, "flatten": nn.Flatten,
        "mha": SelfAttention, "sdpa": SdpaAttention, "recurrent": Recurrent,
    }[name](*args)


@st.composite
def layer_stacks(draw: Any, max_layers: int = 6) -> StackCase:
    kind = draw(st.sampled_from(["image", "sequence", "flat"]))
    batch = draw(st.integers(1, 4))
    if kind == "image":
        shape: tuple[int, ...] = (draw(st.integers(1, 8)), draw(st.integers(4, 24)), draw(st.integers(4, 24)))
    elif kind == "sequence":
        shape = (draw(st.integers(1, 24)), draw(st.sampled_from([8, 12, 16, 24, 32])))
    else:
        shape = (draw(st.integers(1, 96)),)
    case = StackCase(kind, shape, batch=batch)
    current = shape
    for _ in range(draw(st.integers(1, max_layers))):
        options = ["activation"]
        if len(current) == 3:
            options += ["conv", "conv", "bn2d", "gn", "pool", "adaptive"]
        if len(current) in (1, 2):
            options += ["linear", "linear", "ln"]
        if len(current) == 1:
            options += ["bn1d"] if batch > 1 else []
        if len(current) == 2:
            options += ["attention", "attention", "attention", "flatten", "recurrent"]
        choice = draw(st.sampled_from(options))
        if choice == "activation":  # in place now and then: backward may then fail, on both sides
            case.layers.append((draw(st.sampled_from(sorted(_ACTIVATIONS) + ["relu", "gelu", "silu"])), ()))
        elif choice == "conv":
            c, h, w = current
            k = draw(st.integers(1, min(5, h, w)))
            s, p = draw(st.integers(1, 2)), draw(st.integers(0, k // 2))
            c_out = draw(st.integers(1, 16))
            case.layers.append(("conv", (c, c_out, k, s, p)))
            current = (c_out, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
        elif choice == "bn2d":
            case.layers.append(("bn2d", (current[0],)))
        elif choice == "gn":
            groups = draw(st.sampled_from([g for g in (1, 2, 4) if current[0] % g == 0]))
            case.layers.append(("gn", (groups, current[0])))
        elif choice == "pool":
            c, h, w = current
            k = draw(st.integers(1, min(3, h, w)))
            case.layers.append((draw(st.sampled_from(["maxpool", "avgpool"])), (k,)))
            current = (c, (h - k) // k + 1, (w - k) // k + 1)
        elif choice == "adaptive":
            size = draw(st.integers(1, 3))
            case.layers.append(("adaptive", (size,)))
            current = (current[0] * size * size,)
        elif choice == "linear":
            out = draw(st.integers(1, 96))
            case.layers.append(("linear", (current[-1], out)))
            current = (*current[:-1], out)
        elif choice == "ln":
            case.layers.append(("ln", (current[-1],)))
        elif choice == "bn1d":
            case.layers.append(("bn1d", (current[0],)))
        elif choice == "flatten":
            case.layers.append(("flatten", ()))
            current = (current[0] * current[1],)
        elif choice == "recurrent":
            hidden, bidirectional = draw(st.integers(1, 48)), draw(st.booleans())
            case.layers.append(("recurrent", (draw(st.sampled_from(["lstm", "gru"])), current[-1], hidden,
                                              draw(st.integers(1, 2)), bidirectional)))
            current = (current[0], hidden * (2 if bidirectional else 1))
        else:  # attention over a sequence: the width must split into heads
            dim = current[-1]
            heads = draw(st.sampled_from([h for h in (1, 2, 4) if dim % h == 0]))
            if draw(st.booleans()):
                case.layers.append(("mha", (dim, heads)))
            else:
                case.layers.append(("sdpa", (dim, heads, draw(st.booleans()))))
    if all(name in _ACTIVATIONS or name in ("maxpool", "avgpool", "adaptive", "flatten") for name, _ in case.layers):
        case.layers.append(("linear", (current[-1], draw(st.integers(1, 32)))))  # something to train
    return case


class RealStorageTracker(TorchDispatchMode):
    """Live bytes of real storages, each rounded to the allocator's 512-byte blocks, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.total = 0
        self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        if tensor.layout == torch.sparse_coo:  # a sparse tensor's memory is its indices' and its values'
            self.track(tensor._indices())
            self.track(tensor._values())
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live or storage.nbytes() == 0:
            return
        size = round_size(storage.nbytes())
        self.live[key] = size
        self.total += size
        self.peak = max(self.peak, self.total)
        weakref.finalize(storage, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        if self.live.get(key) == size:
            del self.live[key]
            self.total -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value)
        return out


def measure_real_step(build: Any, input_shape: tuple[int, ...], batch: int, iterations: int = 3,
                      seed: int = 0) -> int:
    """Peak live (rounded) bytes of real training steps on the CPU: the ground truth for memlint."""
    return real_step_peak(build, lambda: ((torch.randn((batch, *input_shape)),), {}),
                          lambda output, _args, _kwargs: output.mean(), iterations, seed)


def real_step_peak(build: Any, make_inputs: Any, loss_fn: Any, iterations: int = 3, seed: int = 0,
                   autocast_dtype: torch.dtype | None = None, train: bool = True, optimizer_factory: Any = None) -> int:
    """Peak live bytes of ``iterations`` real steps, as memlint simulates them (see the module docstring).

    ``make_inputs()`` gives a step's ``(args, kwargs)`` and ``loss_fn(output, args, kwargs)`` its loss;
    the inputs are held until the step ends, the output is not held across backward. With ``autocast_dtype`` the forward
    and the loss run under the CPU's autocast (a mixed-precision step on a host). Not ``train``: one
    forward in eval mode without autograd, as ``--mode infer``. The optimizer is Adam unless
    ``optimizer_factory(params)`` makes another.
    """
    torch.manual_seed(seed)
    model = build()
    tracker = RealStorageTracker()
    for tensor in [*model.parameters(), *model.buffers()]:
        tracker.track(tensor)
    model.train(train)

    def autocast() -> Any:
        return torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None)

    if not train:
        with tracker:
            args, kwargs = make_inputs()
            with torch.no_grad(), autocast():
                model(*args, **kwargs)
        return tracker.peak
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_factory(params) if optimizer_factory else torch.optim.Adam(params, lr=1e-4, foreach=True)
    with tracker:
        for _ in range(iterations):
            args, kwargs = make_inputs()
            with autocast():
                loss = loss_fn(model(*args, **kwargs), args, kwargs)
            loss.backward()
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del args, kwargs
    return tracker.peak


@dataclass
class Comparison:
    """One case: memlint's estimate and the real peak, or the error each side stopped with."""

    case: StackCase
    estimated: int | None
    measured: int | None
    estimate_error: str | None = None  # memlint's ModelError (a clear answer, not a crash)
    real_error: str | None = None  # the real step's exception

    @property
    def error(self) -> float:
        if not self.estimated or not self.measured:
            return 0.0
        return (self.estimated - self.measured) / self.measured

    def acceptable(self) -> bool:
        if self.estimate_error or self.real_error:  # both must refuse the model, or neither
            return bool(self.estimate_error) and bool(self.real_error)
        if self.case.has_attention:
            return abs(self.error) <= ATTENTION_TOLERANCE
        return self.estimated == self.measured


def compare_stack(case: StackCase) -> Comparison:
    """memlint's estimate (on fake tensors) against the same step on real CPU tensors.

    A ModelError from memlint is its clear answer (e.g. an in-place op that breaks backward);
    it must coincide with the real step failing. Any other exception from memlint is a crash
    and propagates.
    """
    from memlint.errors import ModelError
    from memlint.estimator import Workload, analyse
    from memlint.targets import resolve_target

    target = resolve_target("cpu:64GiB")
    workload = Workload(name="Stack", path="stack.py", line=1, build=case.build, example_inputs=None, loss_fn=None,
                        build_optimizer=None, batch_size=case.batch, input_shape=case.input_shape,
                        input_dtype="float32", optimizer="adam", precision="fp32", mode="train")
    comparison = Comparison(case, None, None)
    try:
        report = analyse(workload, target, 1.0, find_max_batch=False)
        comparison.estimated = report.peak_allocated_bytes
    except ModelError as exc:
        comparison.estimate_error = exc.message
    try:
        comparison.measured = measure_real_step(case.build, case.input_shape, case.batch)
    except (RuntimeError, ValueError) as exc:  # e.g. BatchNorm with one value per channel raises ValueError
        comparison.real_error = str(exc).splitlines()[0]
    return comparison


def worst(comparisons: list[Comparison]) -> Comparison | None:
    return max(comparisons, key=lambda c: abs(c.error), default=None)
