"""Torch-function modes that also see what torch.nn.functional's Python composites call.

A TorchFunctionMode's handler runs with the mode popped from the stack. When a Python function of
torch.nn.functional that dispatches itself through ``__torch_function__`` reaches the handler
(``F.multi_head_attention_forward``, which ``nn.MultiheadAttention`` calls), the functions it calls
in turn (its linear projections, ``scaled_dot_product_attention``) would then run without the mode,
so CUDA's autocast policy and kernel stand-ins would not apply inside ``nn.MultiheadAttention``. On
a GPU, autocast works at the dispatcher and sees them all. ``SeeThroughMode.call`` runs such a
composite with the mode back on the stack and only the composite's own override check answered
False, so every function it calls reaches the mode again.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _pop_mode, _push_mode

_OVERRIDE_CHECKS = ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic")


def _is_functional_composite(func: Any) -> bool:
    return inspect.isfunction(func) and func.__module__ == "torch.nn.functional"


@contextlib.contextmanager
def _own_override_check_skipped() -> Iterator[None]:
    """torch.nn.functional's next override check answers False (the composite's own); later ones as usual."""
    originals = {name: getattr(F, name) for name in _OVERRIDE_CHECKS}
    pending = [True]

    def once_false(original: Callable[..., bool]) -> Callable[..., bool]:
        def check(*args: Any) -> bool:
            if pending:
                pending.clear()
                return False
            return original(*args)
        return check

    for name, original in originals.items():
        setattr(F, name, once_false(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(F, name, original)


class SeeThroughMode(TorchFunctionMode):
    """A TorchFunctionMode whose handlers finish with ``self.call``."""

    def call(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if not _is_functional_composite(func):
            return func(*args, **kwargs)
        _push_mode(self)  # not ``with self``: a mode's __exit__ may end a region (autocast clears its cache)
        try:
            with _own_override_check_skipped():
                return func(*args, **kwargs)
        finally:
            _pop_mode()
