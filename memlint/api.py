"""``memlint.estimate``: the CLI's model analysis from Python, for notebooks and training scripts.

    import memlint
    report = memlint.estimate(model, torch.randn(64, 3, 224, 224), target="a100-80gb")
    print(report.peak_device_bytes, report.max_batch_size)
    print(memlint.api.render(report))        # the CLI's table

It runs in this process (no child process, no import of a file) and returns the ModelReport
that ``memlint check`` prints and writes as JSON.

How a model instance is analysed without its memory: memlint never runs the instance you pass.
It makes a shallow copy of the module tree (each module object copied, its ``_parameters``,
``_buffers`` and ``_modules`` dicts new) in which every parameter and buffer is replaced by a
fake tensor of the same shape, dtype and ``requires_grad``, created inside memlint's
FakeTensorMode: no storage is allocated or copied, so a model with real weights on a GPU, on
the CPU or on the meta device costs nothing. Tied weights stay tied (one fake per tensor), and
your model is left untouched (its training flag, weights and gradients). Other attributes
(hooks, plain tensor attributes, configuration) are shared with your model, not copied.
Because the modules are not re-created, the report has no creation site (``source``) for its
layers; pass a zero-argument callable (a class or ``lambda: Net(cfg)``) instead of an instance
to get them: it is then called under the fake mode, as the CLI does.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable

from memlint.report import ModelReport
from memlint.settings import MODES, OPTIMIZERS, PRECISIONS

DEFAULT_BATCH_SIZE = 32


def estimate(model: Any, example_inputs: Any, *, target: str = "gtx1050ti", batch_size: int | None = None,
             optimizer: str | Callable[[Any], Any] = "adam", precision: str = "fp32", mode: str = "train",
             threshold: float = 0.8, loss_fn: Callable[[Any, Any], Any] | None = None, depth: int = 3,
             find_max_batch: bool = True) -> ModelReport:
    """Estimate the memory of one training (or inference) step of ``model``.

    ``model``: an ``nn.Module`` instance (analysed on a fake copy, see the module docstring) or a
    zero-argument callable that returns one. ``example_inputs``: one batch (a tensor, a tuple of
    positional inputs or a dict of keyword inputs; only shapes and dtypes are used, and dimension 0
    is the batch) or a callable ``batch_size -> inputs``. ``batch_size``: default the first
    dimension of ``example_inputs``, else 32. ``target``: a name of ``memlint targets``,
    ``NAME:SIZE`` or ``mem:SIZE``. ``optimizer``: one of ``sgd``, ``sgd-momentum``, ``adam``,
    ``adamw``, ``none``, or a callable ``params -> torch.optim.Optimizer``. ``loss_fn(output,
    inputs)``: default the mean of the first floating-point output. ``find_max_batch=False``
    skips the search for the largest batch size (``max_batch_size`` is then None).

    Raises ValueError for a wrong argument and memlint.errors.ModelError when the model cannot
    be built or run on fake tensors (the message says why).
    """
    import torch

    from memlint.estimator import Workload, analyse
    from memlint.targets import resolve_target

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if not callable(optimizer) and optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)} or a callable, not {optimizer!r}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], not {threshold}")
    if batch_size is not None and batch_size <= 0:
        raise ValueError(f"batch_size must be positive, not {batch_size}")

    if isinstance(model, torch.nn.Module):
        instance = model
        build: Callable[[], Any] = lambda: fake_copy(instance)  # noqa: E731
        described: Any = type(model)
        name = type(model).__name__
    elif callable(model):
        build = model
        described = model
        name = getattr(model, "__name__", None) or type(model).__name__
        if name == "<lambda>":
            name = "model"
    else:
        raise ValueError(f"model must be an nn.Module or a zero-argument callable, not {type(model).__name__}")

    if callable(example_inputs):
        make_inputs = example_inputs
        size = batch_size or DEFAULT_BATCH_SIZE
    else:
        leading = _batch_dimension(example_inputs)
        if batch_size is None and leading is None:
            raise ValueError("example_inputs has no tensor with a batch dimension: pass batch_size, or a callable "
                             "batch_size -> inputs")
        size = batch_size or leading or DEFAULT_BATCH_SIZE
        template = example_inputs
        make_inputs = lambda n: _resized(template, n)  # noqa: E731

    path, line = _where(described)
    workload = Workload(
        name=name, path=path, line=line, build=build,
        example_inputs=make_inputs, loss_fn=loss_fn,
        build_optimizer=optimizer if callable(optimizer) else None, batch_size=size, input_shape=None,
        input_dtype="float32", optimizer=None if callable(optimizer) else optimizer, precision=precision, mode=mode)
    return analyse(workload, resolve_target(target) if isinstance(target, str) else target, threshold, depth,
                   find_max_batch=find_max_batch)


def fake_copy(model: Any) -> Any:
    """A shallow copy of the module tree with fake parameters and buffers (call inside a FakeTensorMode)."""
    import torch

    tensors: dict[int, Any] = {}
    modules: dict[int, Any] = {}

    def fake(tensor: Any) -> Any:
        if tensor is None:
            return None
        if id(tensor) not in tensors:
            new = torch.empty(tuple(tensor.shape), dtype=tensor.dtype)
            if isinstance(tensor, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=tensor.requires_grad)
            tensors[id(tensor)] = new
        return tensors[id(tensor)]

    def clone(module: Any) -> Any:
        if module is None:
            return None
        if id(module) not in modules:
            new = copy.copy(module)
            modules[id(module)] = new
            new.__dict__["_parameters"] = {k: fake(v) for k, v in module._parameters.items()}
            new.__dict__["_buffers"] = {k: fake(v) for k, v in module._buffers.items()}
            new.__dict__["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
            new.__dict__["_modules"] = {k: clone(v) for k, v in module._modules.items()}
        return modules[id(module)]

    return clone(model)


def _tensors(value: Any):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _batch_dimension(value: Any) -> int | None:
    return next((int(t.shape[0]) for t in _tensors(value) if t.dim() > 0), None)


def _resized(value: Any, batch_size: int) -> Any:
    """``value`` with every tensor made anew (under the fake mode) with dimension 0 set to ``batch_size``.

    Integer tensors (token ids) are zeros, a valid index for any embedding; the values of
    floating-point ones do not matter to the estimate.
    """
    import torch

    if isinstance(value, torch.Tensor):
        shape = (batch_size, *value.shape[1:]) if value.dim() > 0 else ()
        if value.is_floating_point() or value.is_complex():
            new = torch.empty(shape, dtype=value.dtype)
        else:
            new = torch.zeros(shape, dtype=value.dtype)
        return new.requires_grad_(value.requires_grad) if value.is_floating_point() else new
    if isinstance(value, dict):
        return {key: _resized(item, batch_size) for key, item in value.items()}
    if isinstance(value, list):
        return [_resized(item, batch_size) for item in value]
    if isinstance(value, tuple):
        return tuple(_resized(item, batch_size) for item in value)
    return value


def _where(obj: Any) -> tuple[str, int]:
    """Where the model is defined; for PyTorch's own classes (nn.Sequential) where estimate() was called."""
    import os

    import torch

    try:
        path = inspect.getsourcefile(obj)
        line = inspect.getsourcelines(obj)[1]
    except (TypeError, OSError):
        path, line = None, 1
    if path is None or path.startswith(os.path.dirname(torch.__file__)):
        here = os.path.dirname(os.path.abspath(__file__))
        frame = inspect.currentframe()
        while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
            frame = frame.f_back
        if frame is None:
            return "<model>", 1
        return frame.f_code.co_filename, frame.f_lineno
    return path, line


def render(report: ModelReport) -> str:
    """The CLI's text rendering of a report (layer table, breakdown, verdict), without colour."""
    import io

    from memlint.engine import CheckResult
    from memlint.reporters.text import report as text_report

    out = io.StringIO()
    text_report(CheckResult(reports=[report], files_checked=1), out, False)
    lines = out.getvalue().splitlines()
    # The text format ends with a verdict over the files checked, which means nothing here.
    if lines and lines[-1].startswith("All checks passed"):
        lines.pop()
    return "\n".join(lines).strip("\n") + "\n"
