"""memlint's FakeTensorMode: PyTorch's, with shortcuts where its bookkeeping costs more than the op.

Every op of a simulated step dispatches through this mode, about 4,000 of them in a ResNet-50
analysis, and FakeTensorMode's own cache answers a repeated op in 0.1 ms (its key walks every
argument's metadata; a miss runs the meta kernel as well). The shortcuts, none of which changes
what an op returns (``tests/test_fakemode.py`` compares them with FakeTensorMode, op by op and
on whole analyses):

* An op whose outputs alias nothing (``convolution``, ``add``) is answered from its outputs'
  layouts, kept per layout of its arguments the first time it runs (that first run skips
  FakeTensorMode's cache, whose entry would never be read); an op that only writes its first
  argument and returns it (``add_``, ``fill_``) returns it. A fake tensor made from a layout costs a
  third of a cache hit.
* A pointwise op on tensors of one dense layout, and batch norm, lay out their outputs by a rule
  that the first shape teaches (like the input, one per channel, empty): the batch search's second
  batch size, every op at new shapes, needs no meta kernel for them (see ``_shape_free_key``).
* Batch norm, forward and backward, is a Python decomposition of some twenty ops, each a miss of
  the fake-tensor cache at every new shape (7 ms a call on a cold cache: a third of a second of
  a ResNet-50 analysis). Its layouts come from the same decomposition run on plain meta tensors.
* ``detach`` (autograd's, 500 a ResNet-50 iteration) runs its meta kernel directly, and a small
  value lifted into the mode (``torch.tensor(0.0)``: Adam's step counts) keeps a copy of its value.
* In-place foreach updates (an optimizer's step) return nothing, so they are checked, not run.
"""
from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import (FakeTensor, FakeTensorMode, disable_fake_tensor_cache,
                                          in_kernel_invocation_manager, unset_fake_temporarily)
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

# Ops whose first layouts are taken from their meta kernels on meta tensors (see _outputs_on_meta).
_LAYOUT_FROM_META = (aten.native_batch_norm.default, aten.native_batch_norm_backward.default)

# An output's layout: (shape, strides, dtype, device), or None for an output the op leaves out.
Layout = tuple[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device]
# How to make an op's outputs again: the container (None for a single tensor) and the layouts;
# or IN_PLACE: the op returns its first argument, as it was.
Recipe = tuple[type | None, tuple[Layout | None, ...]] | str

_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
_PLAIN_SCALARS = frozenset({int, float, bool, type(None)})


class MemlintFakeMode(FakeTensorMode):
    """FakeTensorMode with the shortcuts of this module, for arguments that are all its own fakes.

    In-place foreach updates (``_foreach_*_``) return nothing and allocate nothing: on fake tensors
    they only check their arguments, and the meta kernels of ``_foreach_lerp_``,
    ``_foreach_addcmul_`` and ``_foreach_addcdiv_`` check them one tensor at a time in Python
    (0.2 ms a tensor: Adam's step on ResNet-50's 161 parameters spent 90 ms in them, more than its
    forward). Autograd has bumped the version counters before any mode sees the op. The lists
    must still be as long as each other, as the kernels check.

    Anything else (a real tensor, a fake tensor that keeps its value, a symbolic size, an op
    whose outputs alias its inputs, an argument the meta kernels refuse) goes the usual way,
    and fails there with PyTorch's own error.
    """

    # The recipes of every instance (None: the op goes the usual way), and the rules of shape-free recipes
    # (see _shape_free_key). A recipe is a layout, whichever mode makes the tensors, so like
    # FakeTensorMode's cache they serve every analysis of a process.
    _recipes: dict[tuple, Recipe | None] = {}
    _rules: dict[tuple, Rule | None] = {}

    def __init__(self) -> None:
        super().__init__(allow_non_fake_inputs=True)  # accepts real tensors the user made at import time

    @classmethod
    def cache_clear(cls) -> None:
        """FakeTensorMode's cache, the recipes and the rules, all shared by all instances."""
        FakeTensorMode.cache_clear()
        cls._recipes.clear()
        cls._rules.clear()

    def __deepcopy__(self, memo: dict) -> MemlintFakeMode:
        """The mode itself. ``copy.deepcopy`` of a module built on fake tensors (``nn.TransformerEncoder``
        clones its layer so) copies each fake tensor's ``__dict__``, its mode included: the copies'
        parameters would belong to another mode, and every op would take them for foreign tensors and
        fake them again, in new memory (an encoder of two layers came out 11% high)."""
        return self

    def dispatch(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        kind = _kind(func)
        if kind == LISTS_IN_PLACE and self._all_fake_and_aligned(args, kwargs):
            return None
        if func is aten.detach.default and self._own_without_value(args[0]):
            return self._detached(args[0])
        if func is aten.lift_fresh.default and _a_value(args[0]):
            return self._keeping_value(args[0])
        key = self._key(func, args, kwargs, kind) if kind in (FRESH, IN_PLACE) else None
        if key is None:
            return super().dispatch(func, types, args, kwargs)
        if key not in self._recipes:
            shape_free = _shape_free_key(func, key, args, kwargs) if kind == FRESH else None
            rule = self._rules.get(shape_free[0]) if shape_free is not None else None
            if rule is not None:
                self._recipes[key] = _recipe_by_rule(rule, shape_free[1])
            elif func in _LAYOUT_FROM_META and not kwargs:
                self._recipes[key] = _outputs_on_meta(func, args)
                self._learn_rule(shape_free, self._recipes[key])
            elif kind == FRESH:
                # Without FakeTensorMode's cache: its key and entry (a pytree walk of the arguments, then of
                # the outputs) would cost more than the meta kernel, and the recipe answers the next call.
                with disable_fake_tensor_cache(self):
                    out = super().dispatch(func, types, args, kwargs)
                recipe = self._recipes[key] = self._recipe(out, args, kwargs)
                self._learn_rule(shape_free, recipe)
                return self._made(recipe) if recipe is not None and _repeats_a_tensor(out) else out
            else:
                before = _storage_layout(args[0])
                out = super().dispatch(func, types, args, kwargs)
                self._recipes[key] = IN_PLACE if out is args[0] and _storage_layout(out) == before else None
                return out
        recipe = self._recipes[key]
        if recipe is None:
            return super().dispatch(func, types, args, kwargs)
        return args[0] if recipe is IN_PLACE else self._made(recipe)

    def _key(self, func: Any, args: tuple, kwargs: dict, kind: str) -> tuple | None:
        """The op, its arguments' layouts and values, and the global state that decides a factory's output.

        An in-place op on one tensor whose other arguments are numbers (``uniform_``, ``zero_``,
        ``relu_``: building a model runs one per parameter, each shape a miss) is keyed by the tensor's
        dtype, device and whether it overlaps itself (an expanded tensor, which in-place ops refuse),
        not by its shape: what it does to its argument does not depend on the shape.
        """
        key: list[Any] = [func, torch.get_default_dtype(), torch._C._get_default_device(),
                          torch.is_inference_mode_enabled()]
        target = args[0] if args else None
        if kind == IN_PLACE and self._own_without_value(target) and target.layout == torch.strided \
                and all(type(value) in _PLAIN_SCALARS for value in (*args[1:], *kwargs.values())):
            overlaps = any(stride == 0 and size > 1 for size, stride in zip(target.shape, target.stride()))
            key += [target.dtype, target.device, overlaps, *((type(v), v) for v in args[1:]),
                    *((name, type(v), v) for name, v in kwargs.items())]
            return tuple(key)
        if not (self._add_to_key(key, args) and self._add_to_key(key, kwargs.items())):
            return None
        return tuple(key)

    def _add_to_key(self, key: list[Any], values: Any) -> bool:
        for value in values:
            if isinstance(value, FakeTensor):
                if not self._own_without_value(value) or value.layout != torch.strided or value.dtype.is_complex:
                    return False
                key.append((value.shape, value.stride(), value.storage_offset(), value.dtype, value.device))
            elif isinstance(value, _SCALARS):
                key.append((type(value), value))  # 1 and 1.0 are equal keys, but promote differently
            elif isinstance(value, (list, tuple)):
                key.append(len(value))
                if not self._add_to_key(key, value):
                    return False
            else:  # a real tensor, a symbolic size, a generator, ...
                return False
        return True

    def _recipe(self, out: Any, args: tuple, kwargs: dict) -> Recipe | None:
        """How to make ``out`` again, if every tensor in it is a fresh fake tensor that owns its storage; else None.

        An output that repeats an earlier one is made as a tensor of its own. The schema promises fresh
        outputs and the CPU kernels keep that promise, but a meta kernel may not: oneDNN's LSTM backward
        (``mkldnn_rnn_layer_backward``) returns one tensor for both bias gradients, where FakeTensorMode's
        cache, on a hit, and a real CPU step return two.
        """
        container = type(out) if isinstance(out, (tuple, list)) else None
        outputs = out if container is not None else (out,)
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        layouts: list[Layout | None] = []
        for tensor in outputs:
            if tensor is None:
                layouts.append(None)
                continue
            if not (self._own_without_value(tensor) and tensor.layout == torch.strided
                    and tensor.storage_offset() == 0 and not tensor.requires_grad):
                return None
            storage = tensor.untyped_storage()
            layout = _layout(tensor)
            if storage._cdata in inputs or storage.nbytes() != strided_nbytes(*layout[:3]):
                return None
            layouts.append(layout)
        return container, tuple(layouts)

    def _learn_rule(self, shape_free: tuple[tuple, FakeTensor] | None, recipe: Recipe | None) -> None:
        """Keep the rule of the first recipe of a shape-free key (None where its outputs follow none)."""
        if shape_free is not None and shape_free[0] not in self._rules:
            self._rules[shape_free[0]] = _rule_of(recipe, shape_free[1])

    def _detached(self, tensor: FakeTensor) -> FakeTensor:
        """``tensor.detach()`` as FakeTensorMode makes it, without its cache: the meta kernel on the
        tensor itself gives a view of its storage (autograd, above this mode, makes it share the version)."""
        with in_kernel_invocation_manager(self):
            meta = aten.detach.default(tensor)
        return FakeTensor(self, meta, tensor.device, pytype=tensor.pytype, dispatch_keys=tensor.dispatch_keys)

    def _keeping_value(self, value: torch.Tensor) -> FakeTensor:
        """``torch.tensor(0.0)`` (a step count): a fake tensor that keeps a copy of its value, as FakeTensorMode
        makes it (``from_real_tensor(make_constant=True)``), without its meta converter (0.3 ms a call)."""
        with unset_fake_temporarily():
            constant = value.clone()
        fake = FakeTensor(self, _meta(value.shape, value.stride(), value.dtype), value.device, constant=constant)
        self.fake_tensor_converter.set_tensor_memo(constant, fake)  # the value, met again, is this tensor
        return fake

    def _made(self, recipe: Recipe) -> Any:
        container, layouts = recipe
        outputs = [None if layout is None else FakeTensor(self, _meta(*layout[:3]), layout[3]) for layout in layouts]
        if container is None:
            return outputs[0]
        return container(outputs) if container in (tuple, list) else container(*outputs)  # or a named tuple

    def _all_fake_and_aligned(self, args: Any, kwargs: Any) -> bool:
        lengths = set()
        for value in (*args, *(kwargs or {}).values()):
            if isinstance(value, (list, tuple)):
                lengths.add(len(value))
            tensors = value if isinstance(value, (list, tuple)) else (value,)
            if not all(self._own_without_value(t) for t in tensors if isinstance(t, torch.Tensor)):
                return False
        return len(lengths) == 1

    def _own_without_value(self, tensor: torch.Tensor) -> bool:
        """One of this mode's fake tensors that keeps no value (a constant an update would invalidate)."""
        return isinstance(tensor, FakeTensor) and tensor.fake_mode is self and tensor.constant is None


def _repeats_a_tensor(out: Any) -> bool:
    tensors = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if t is not None]
    return len({id(t) for t in tensors}) < len(tensors)


def _a_value(tensor: Any) -> bool:
    """A real CPU tensor small enough for FakeTensorMode to keep as a fake tensor's value (``may_turn_const``)."""
    return (type(tensor) is torch.Tensor and tensor.device.type == "cpu" and tensor.layout == torch.strided
            and tensor.numel() <= 1 and not tensor.requires_grad and not tensor.is_quantized)


def _layout(tensor: torch.Tensor) -> Layout:
    return tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device


def _meta(shape: Any, stride: Any, dtype: torch.dtype) -> torch.Tensor:
    """A meta tensor of this layout (a real one, whichever fake mode is on): what a fake tensor wraps."""
    with unset_fake_temporarily():
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


def strided_nbytes(shape: Any, stride: Any, dtype: torch.dtype) -> int:
    """The bytes ``empty_strided(shape, stride, dtype=dtype)`` allocates (the storage a fresh output needs)."""
    if 0 in shape:
        return 0
    return (1 + sum((size - 1) * step for size, step in zip(shape, stride))) * dtype.itemsize


# The kinds of op the mode answers itself (see _kind).
FRESH, IN_PLACE, LISTS_IN_PLACE = "fresh", "in place", "lists in place"
_KINDS: dict[Any, str | None] = {}


def _kind(func: Any) -> str | None:
    """FRESH for an op whose schema promises outputs that alias nothing; IN_PLACE for one that only
    writes its first argument and returns it (``add_``, ``fill_``, ``uniform_``); LISTS_IN_PLACE for an
    ``aten::_foreach_*_`` op, which writes its first list and returns nothing; else None.

    Views, ops that change their argument's shape (``resize_``, ``squeeze_``), and ops whose
    outputs' shapes depend on values (``nonzero``) are left out; what the others return is
    checked the first time (``MemlintFakeMode.dispatch``).
    """
    if func in _KINDS:
        return _KINDS[func]
    schema = getattr(func, "_schema", None)
    kind = None
    if schema is not None:
        written = [a.alias_info for a in schema.arguments]
        returned = [r.alias_info for r in schema.returns]
        if not schema.returns:
            if schema.name.startswith("aten::_foreach_") and written and written[0] is not None \
                    and written[0].is_write:
                kind = LISTS_IN_PLACE
        elif isinstance(func, torch._ops.OpOverload) and not func.is_view and not (
                {torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output, torch.Tag.inplace_view}
                & set(func.tags)):
            if not any(written) and not any(returned):
                kind = FRESH
            elif (written[0] is not None and written[0].is_write and not any(written[1:]) and len(returned) == 1
                  and returned[0] is not None and returned[0].before_set == written[0].before_set):
                kind = IN_PLACE
    _KINDS[func] = kind
    return kind


def _storage_layout(tensor: Any) -> tuple | None:
    if not isinstance(tensor, torch.Tensor):
        return None
    return _layout(tensor), tensor.storage_offset(), tensor.untyped_storage()._cdata, tensor.untyped_storage().nbytes()


# Shape-free recipes. A pointwise op on tensors of one layout makes outputs of that layout, and batch
# norm makes its output like its input and its statistics one per channel, whatever the shape: so the
# batch search's second batch size, where every op is a miss of the recipes, needs no meta kernel for them.
# A rule says, per output, which of these it is (None: an output the op leaves out); it is learnt from
# the first recipe of its shape-free key, and an op whose outputs match none of them has no rule.
LIKE_INPUT, PER_CHANNEL, EMPTY = "like input", "per channel", "empty"
Rule = tuple[type | None, tuple[tuple[str, torch.dtype, torch.device] | None, ...]]


def _shape_free_key(func: Any, key: tuple, args: tuple, kwargs: dict) -> tuple[tuple, FakeTensor] | None:
    """The key of an op's rule and the tensor its outputs follow, where the op can have one; else None.

    The tensor must be dense in some order of its dimensions (contiguous, channels-last, any permutation:
    its strides are then fixed by that order and its shape). The key holds that order, which dimensions
    have size 1, and of every other argument its value, or, for a tensor, its dtype and device and whether
    it has the followed tensor's layout (every tensor of a pointwise op must) or is one value per channel.
    """
    pointwise = func not in _LAYOUT_FROM_META
    if pointwise and torch.Tag.pointwise not in func.tags:
        return None
    tensors = [a for a in args if isinstance(a, FakeTensor)]
    if not tensors:
        return None
    followed = tensors[0] if pointwise or func is aten.native_batch_norm.default else args[1]
    shape, strides = followed.shape, followed.stride()
    order = _dense_order(shape, strides)
    if order is None or (not pointwise and len(shape) < 2):
        return None
    parts: list[Any] = [*key[:4], order, tuple(size == 1 for size in shape), followed.dtype, followed.device]
    for name, value in (*enumerate(args), *kwargs.items()):
        if isinstance(value, FakeTensor):
            if value.shape == shape and value.stride() == strides:
                parts.append((name, LIKE_INPUT, value.dtype, value.device))
            elif not pointwise and value.shape == (shape[1],) and value.stride() == (1,):
                parts.append((name, PER_CHANNEL, value.dtype, value.device))
            else:
                return None
        elif isinstance(value, (list, tuple)):
            if not all(type(item) in _PLAIN_SCALARS for item in value):
                return None
            parts.append((name, type(value), tuple(value)))
        elif isinstance(value, _SCALARS):
            parts.append((name, type(value), value))
        else:
            return None
    return tuple(parts), followed


def _dense_order(shape: Any, strides: tuple[int, ...]) -> tuple[int, ...] | None:
    """The dimensions, outermost first, when the strides are exactly a dense tensor's in that order
    (size-1 dimensions included, and no empty tensor); else None."""
    order = sorted(range(len(shape)), key=strides.__getitem__, reverse=True)
    expected = 1
    for dim in reversed(order):
        if strides[dim] != expected:
            return None
        expected *= shape[dim]
    return tuple(order) if expected > 0 else None


def _placements(followed: torch.Tensor) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """The shape and strides of an output of each kind, for this followed tensor."""
    placed = {LIKE_INPUT: (tuple(followed.shape), followed.stride()), EMPTY: ((0,), (1,))}
    if followed.dim() >= 2:
        placed[PER_CHANNEL] = ((followed.shape[1],), (1,))
    return placed


def _rule_of(recipe: Recipe | None, followed: torch.Tensor) -> Rule | None:
    if not isinstance(recipe, tuple):
        return None
    container, layouts = recipe
    kinds = {placed: kind for kind, placed in _placements(followed).items()}
    outputs = []
    for layout in layouts:
        if layout is None:
            outputs.append(None)
            continue
        kind = kinds.get(layout[:2])
        if kind is None:
            return None
        outputs.append((kind, layout[2], layout[3]))
    return container, tuple(outputs)


def _recipe_by_rule(rule: Rule, followed: torch.Tensor) -> Recipe:
    placed = _placements(followed)
    container, outputs = rule
    return container, tuple(None if output is None else (*placed[output[0]], *output[1:]) for output in outputs)


def _outputs_on_meta(func: Any, args: tuple) -> Recipe | None:
    """The recipe of ``func``'s outputs from its meta kernel on meta copies of the arguments; None if it refuses.

    The meta kernels decompose batch norm as FakeTensorMode would, except that the decomposition
    (``native_batch_norm_helper`` in torch/_decomp/decompositions.py) asks for the input's device:
    on a CPU tensor the saved mean and inverse deviation take the input's dtype, and in eval mode
    they are empty, as ``batch_norm_cpu`` makes them. Meta tensors take the other branch, so the
    CPU's is applied here.
    """
    try:
        metas = [_meta(a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
        with unset_fake_temporarily():
            out = func(*metas)
    except Exception:  # the usual way raises PyTorch's own error for it
        return None
    device = args[0].device if func is aten.native_batch_norm.default else args[1].device
    layouts = [None if t is None else (tuple(t.shape), t.stride(), t.dtype, device) for t in out]
    if func is aten.native_batch_norm.default and device.type == "cpu":
        data, training = args[0], args[5]
        for index in (1, 2):
            shape, stride, _, _ = layouts[index]
            layouts[index] = (shape, stride, data.dtype, device) if training else ((0,), (1,), data.dtype, device)
    return tuple, tuple(layouts)


def new_fake_mode() -> MemlintFakeMode:
    """A fresh fake mode for one model: its fake-tensor cache and layouts serve every simulation of it."""
    return MemlintFakeMode()
