"""Keep the simulation's torch-function modes alive when activation checkpointing recomputes.

``torch.utils.checkpoint`` re-runs the checkpointed forward inside backward, and the autograd
engine does not carry torch-function modes into backward. The recomputation would then run
CPU kernels and CPU autocast instead of the GPU stand-ins (gpu_kernels.py, autocast.py) and
save tensors of other shapes than the forward did, which checkpoint rejects. This patch wraps
the checkpointed function (both the non-reentrant generator and the reentrant autograd
Function, as torch/utils/checkpoint.py calls them) so that it re-enters the modes that were
active when the checkpoint was taken. The recomputation's allocations are then recorded
like the real ones.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch.utils.checkpoint as checkpoint_module
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack


def _with_modes(function: Callable[..., Any], modes: list[TorchFunctionMode]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        active = _get_current_function_mode_stack()
        with contextlib.ExitStack() as stack:
            for mode in modes:
                if not any(existing is mode for existing in active):
                    stack.enter_context(mode)
            return function(*args, **kwargs)
    return run


class _ReentrantShim:
    """Stands in for ``CheckpointFunction`` so that ``.apply`` wraps the function first."""

    def __init__(self, original: Any) -> None:
        self.original = original

    def apply(self, function: Callable[..., Any], *args: Any) -> Any:
        return self.original.apply(_with_modes(function, _get_current_function_mode_stack()), *args)


# The names checkpoint() calls the non-reentrant generator by (renamed to *_impl in 2.14);
# each takes the checkpointed function as its first argument.
_GENERATORS = ("_checkpoint_without_reentrant_generator", "_checkpoint_without_reentrant_generator_impl")


def _patched_generator(generator: Callable[..., Any]) -> Callable[..., Any]:
    def patched(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return generator(_with_modes(fn, _get_current_function_mode_stack()), *args, **kwargs)
    return patched


@contextlib.contextmanager
def modes_survive_recomputation() -> Iterator[None]:
    originals = {name: getattr(checkpoint_module, name) for name in (*_GENERATORS, "CheckpointFunction")
                 if hasattr(checkpoint_module, name)}
    for name, original in originals.items():
        replacement = _ReentrantShim(original) if name == "CheckpointFunction" else _patched_generator(original)
        setattr(checkpoint_module, name, replacement)
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(checkpoint_module, name, original)
