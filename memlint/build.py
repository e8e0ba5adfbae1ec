"""Build the model without memory: construct it under FakeTensorMode.

Every parameter is a fake tensor (shape, dtype, device, no storage), so a 70B model costs
megabytes. While constructing, record where each submodule was created in the user's code
(the first frame outside torch and outside the module's own ``__init__`` chain), which the
report and the diagnostics point at.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, UninitializedTensorMixin
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from memlint.errors import ModelError
from memlint.loader import user_line
from memlint.simulate import LIBRARY_DIRS, Assumptions, ValueAssumingMode

# Tensors of up to this many elements are also computed for real while the model is built.
SMALL_VALUES = 1 << 16


class SmallValuesMode(ValueAssumingMode):
    """While building, small tensors are also computed on real CPU tensors, so values read from them are real.

    Constructors compute with tensors as well as allocate them: RegNet derives its stage widths
    from ``torch.arange``/``round``/``log`` and ``.tolist()``, vision transformers their
    stochastic-depth rates from ``torch.linspace``. A fake tensor has no values; answering such a
    question with an assumption would build another network (a RegNet with 1-channel stages).
    Every op whose outputs are small and whose inputs are known runs again outside the fake mode;
    parameters and anything large stay fake, so the cost stays that of the small tensors.
    Values still unknown are assumed (and reported) as ``ValueAssumingMode`` does.
    """

    def __init__(self, assumptions: Assumptions, where: str = "") -> None:
        super().__init__(assumptions, where)
        self.values = WeakIdKeyDictionary()  # fake tensor -> its real value

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0] in self.values:
            with unset_fake_temporarily():
                return self.values[args[0]].item()
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self._compute_for_real(func, args, kwargs, out)
        return out

    def _compared(self, func: Any, args: tuple, kwargs: dict) -> bool:
        if all(a in self.values for a in args if isinstance(a, FakeTensor)):
            real = [self.values[a] if isinstance(a, FakeTensor) else a for a in args]
            with unset_fake_temporarily():
                return func(*real, **kwargs)
        return super()._compared(func, args, kwargs)

    def _compute_for_real(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        outputs = [out] if isinstance(out, torch.Tensor) else tree_flatten(out)[0]  # one tensor, mostly: no pytree
        if not any(isinstance(t, FakeTensor) for t in outputs) or any(
                isinstance(t, torch.Tensor) and t.numel() > SMALL_VALUES for t in outputs):
            return
        leaves, spec = tree_flatten((args, kwargs))
        for index, leaf in enumerate(leaves):
            if isinstance(leaf, FakeTensor):
                if leaf not in self.values:
                    return
                leaves[index] = self.values[leaf]
        real_args, real_kwargs = tree_unflatten(leaves, spec)
        try:
            with unset_fake_temporarily():
                result = func(*real_args, **real_kwargs)
        except Exception:  # e.g. a device this host lacks: the value stays unknown, and is assumed if asked
            return
        for fake, value in zip(outputs, tree_flatten(result)[0]):
            if isinstance(fake, FakeTensor) and isinstance(value, torch.Tensor):
                self.values[fake] = value


@contextlib.contextmanager
def libraries_see_real_tensors() -> Iterator[None]:
    """Code that asks whether a tensor is fake is told no while memlint runs the model.

    transformers treats a fake tensor as a sign of tracing (``is_tracing`` in
    ``transformers.utils.import_utils``) and then takes compile-friendly paths: a causal model
    without padding builds an explicit L x L mask instead of passing ``is_causal`` to SDPA. The
    step memlint predicts runs on real tensors, which take the other path.
    """
    import_utils = sys.modules.get("transformers.utils.import_utils")
    original = getattr(import_utils, "is_fake_tensor", None)
    if original is None:
        yield
        return
    import_utils.is_fake_tensor = lambda _value: False
    try:
        yield
    finally:
        import_utils.is_fake_tensor = original


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
def values_deep_copied_for_real() -> Iterator[None]:
    """Let ``copy.deepcopy`` copy a fake tensor that keeps its value (``torch.tensor(0)``: batch norm's count).

    ``Tensor.__deepcopy__`` copies a tensor's ``__dict__``, and a fake tensor's value is a real tensor
    there, whose copy under the fake mode comes out fake and then refuses its CPU storage
    (``set_``): copying a module with a batch norm failed. The value is copied outside the fake
    mode first, into the deep copy's memo, where ``__dict__``'s copy finds it.
    """
    def deep_copy(tensor: FakeTensor, memo: dict) -> torch.Tensor:
        value = tensor.constant
        if value is not None and id(value) not in memo:
            with unset_fake_temporarily():
                copy.deepcopy(value, memo)
        return torch.Tensor.__deepcopy__(tensor, memo)

    own = FakeTensor.__dict__.get("__deepcopy__")
    FakeTensor.__deepcopy__ = deep_copy  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own is None:
            del FakeTensor.__deepcopy__
        else:
            FakeTensor.__deepcopy__ = own  # type: ignore[method-assign]


@contextlib.contextmanager
def lazy_modules_on_fake() -> Iterator[None]:
    """Let lazy modules (``nn.LazyLinear``, ``nn.LazyConv2d``, ...) be built and initialised on fake tensors.

    An ``UninitializedParameter`` refuses a fake tensor as its data, so it is made on the meta
    device instead (no memory either); when the module's first forward infers its shapes
    (``LazyModuleMixin._infer_parameters``), the materialised meta tensors are replaced with fake
    ones, as the other parameters are.
    """
    originals = (UninitializedParameter.__new__, UninitializedBuffer.__new__, UninitializedTensorMixin.materialize,
                 LazyModuleMixin._infer_parameters)

    def on_meta(original: Callable) -> Callable:
        signature = inspect.signature(original)

        def new(cls: type, *args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(cls, *args, **kwargs)
            bound.arguments["device"] = "meta"
            with unset_fake_temporarily():
                return original(*bound.args, **bound.kwargs)
        return new

    def materialize(self: Any, shape: Any, device: Any = None, dtype: Any = None) -> None:
        with unset_fake_temporarily():
            originals[2](self, shape, dtype=dtype)

    def infer_parameters(self: Any, module: torch.nn.Module, args: Any, kwargs: Any = None) -> None:
        originals[3](self, module, args, kwargs)
        for tensors, wrap in ((module._parameters, lambda t: torch.nn.Parameter(t, t.requires_grad)),
                              (module._buffers, lambda t: t)):
            for name, tensor in list(tensors.items()):
                if tensor is not None and not isinstance(tensor, FakeTensor) and tensor.is_meta:
                    tensors[name] = wrap(torch.empty(tensor.shape, dtype=tensor.dtype).requires_grad_(
                        tensor.requires_grad))

    UninitializedParameter.__new__ = on_meta(originals[0])  # type: ignore[method-assign]
    UninitializedBuffer.__new__ = on_meta(originals[1])  # type: ignore[method-assign]
    UninitializedTensorMixin.materialize = materialize  # type: ignore[method-assign]
    LazyModuleMixin._infer_parameters = infer_parameters  # type: ignore[method-assign]
    try:
        yield
    finally:
        (UninitializedParameter.__new__, UninitializedBuffer.__new__, UninitializedTensorMixin.materialize,
         LazyModuleMixin._infer_parameters) = originals  # type: ignore[method-assign]


def initialise_lazy_modules(model: torch.nn.Module, make_inputs: Callable[[], tuple[tuple, dict]],
                            fake_mode: FakeTensorMode) -> None:
    """Run one forward on fake inputs where the model has lazy modules: it gives them their shapes."""
    if not any(isinstance(t, UninitializedTensorMixin) for t in (*model.parameters(), *model.buffers())):
        return
    with lazy_modules_on_fake(), fake_mode, torch.no_grad():
        args, kwargs = make_inputs()
        model(*args, **kwargs)


@contextlib.contextmanager
def record_creation_sites(sites: dict[int, str]) -> Iterator[None]:
    """Map ``id(module)`` to ``file:line`` of the user's code that created it."""
    original_init = torch.nn.Module.__init__

    def init(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        frame = sys._getframe(1)
        while frame is not None:
            filename = frame.f_code.co_filename
            if frame.f_locals.get("self") is not self and not filename.startswith(LIBRARY_DIRS):
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

    ``value_mode`` answers ``.item()`` during construction (a ``SmallValuesMode`` computes small
    tensors for real, e.g. stochastic-depth rates read from ``torch.linspace(...)``).
    """
    sites: dict[int, str] = {}
    try:
        with fake_mode, value_mode or contextlib.nullcontext(), record_creation_sites(sites), \
                fake_parameter_conversions(), lazy_modules_on_fake(), values_deep_copied_for_real():
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
