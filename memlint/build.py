"""Build the model without memory: construct it under FakeTensorMode.

Every parameter is a fake tensor (shape, dtype, device, no storage), so a 70B model costs
megabytes. While constructing, record where each submodule was created in the user's code
(the first frame outside torch and outside the module's own ``__init__`` chain), which the
report and the diagnostics point at.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from memlint.errors import ModelError
from memlint.loader import user_line

_TORCH_DIR = os.path.dirname(torch.__file__)
_SKIP_DIRS = (_TORCH_DIR, os.path.dirname(__file__))


def new_fake_mode() -> FakeTensorMode:
    """Fake mode that also accepts real tensors the user made at import time (turned fake on use)."""
    return FakeTensorMode(allow_non_fake_inputs=True)


@contextlib.contextmanager
def fake_parameter_conversions() -> Iterator[None]:
    """Let ``model.to(dtype)`` / ``.half()`` convert fake parameters.

    ``nn.Module._apply`` swaps a FakeTensor parameter with ``torch.utils.swap_tensors``, which
    refuses tensors that have weak references, as fake tensors do (the fake mode's memo). On
    that refusal, set the parameter's data instead: same object, new dtype, as eager does.
    """
    original = torch.utils.swap_tensors

    def swap(first: torch.Tensor, second: torch.Tensor) -> None:
        try:
            original(first, second)
        except RuntimeError:
            if not isinstance(first, FakeTensor):
                raise
            with torch.no_grad():
                first.data = second.detach()

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


@contextlib.contextmanager
def record_creation_sites(sites: dict[int, str]) -> Iterator[None]:
    """Map ``id(module)`` to ``file:line`` of the user's code that created it."""
    original_init = torch.nn.Module.__init__

    def init(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        frame = sys._getframe(1)
        while frame is not None:
            filename = frame.f_code.co_filename
            if frame.f_locals.get("self") is not self and not filename.startswith(_SKIP_DIRS):
                sites[id(self)] = f"{filename}:{frame.f_lineno}"
                break
            frame = frame.f_back

    torch.nn.Module.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.__init__ = original_init  # type: ignore[method-assign]


def build_fake_model(build: Callable[[], Any], fake_mode: FakeTensorMode, name: str, path: str,
                     value_mode: Any = None) -> tuple[torch.nn.Module, dict[str, str]]:
    """Construct the model on fake tensors; returns it and module path -> creation site.

    ``value_mode`` answers ``.item()`` during construction (e.g. stochastic-depth rates read
    from ``torch.linspace(...)``, common in vision transformers).
    """
    sites: dict[int, str] = {}
    try:
        with fake_mode, value_mode or contextlib.nullcontext(), record_creation_sites(sites), \
                fake_parameter_conversions():
            model = build()
    except MemoryError:
        raise ModelError(f"building {name} ran out of host memory even on fake tensors", path=path,
                         hint="the constructor allocates real memory itself (e.g. numpy arrays); "
                              "build big tables lazily") from None
    except Exception as exc:
        raise ModelError(f"building {name} raised {type(exc).__name__}: {exc}", path=path,
                         line=user_line(exc, Path(path)),
                         hint="the model must construct with no arguments; add a build_model() that "
                              "passes them") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"{name} returned {type(model).__name__}, not an nn.Module", path=path)
    by_path = {module_name: sites[id(module)] for module_name, module in model.named_modules()
               if id(module) in sites}
    return model, by_path
