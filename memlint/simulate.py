"""Simulate a training (or inference) step on fake tensors and record every allocation.

A TorchDispatchMode sees each aten op's outputs; a storage never seen before is a new
allocation, and a weakref finalizer on the storage tells us when autograd, the optimizer
or Python let it go. Roles come from what a storage turns out to be: saved for backward
(``saved_tensors_hooks``), accumulated into ``.grad``, kept in ``optimizer.state``.
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import torch
from torch._subclasses import fake_tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memlint.autocast import CudaAutocastMode
from memlint.fakemode import strided_nbytes
from memlint.ledger import FREE, Ledger, StorageInfo
from memlint.onednn import lstm_workspace_bytes
from memlint.recompute import modes_survive_recomputation
from memlint.values import ValueKnowledge

aten = torch.ops.aten

# Ops that index with a list of tensors, which may be boolean masks (``x[mask]``, ``x[mask] = v``).
_MASK_INDEXED = frozenset({aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                           aten._index_put_impl_.default})


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _indexes_with_a_mask(func: Any, args: tuple) -> bool:
    return func in _MASK_INDEXED and len(args) > 1 and any(_is_mask(index) for index in args[1])


_IS_DYNAMIC: dict[Any, bool] = {}  # op -> whether _DYNAMIC_SHAPE_OPS has it (by name: torchvision's are late)


def _has_dynamic_shape(func: Any, args: tuple) -> bool:
    """Whether an op's output sizes depend on values its fake tensors lack."""
    dynamic = _IS_DYNAMIC.get(func)
    if dynamic is None:
        dynamic = _IS_DYNAMIC[func] = func._schema.name in _DYNAMIC_SHAPE_OPS
    return dynamic or _indexes_with_a_mask(func, args)


def _unique_bound(x: torch.Tensor, dim: int | None, inverse: bool, counts: bool,
                  distinct: int | None = None) -> tuple[torch.Tensor, ...]:
    """``unique`` with ``distinct`` results, by default every element (every slice along ``dim``): the values,
    inverse and counts."""
    if distinct is None:
        distinct = x.numel() if dim is None else x.shape[dim]

    def long(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.long, device=x.device)

    values = torch.empty((distinct,) if dim is None else x.shape, dtype=x.dtype, device=x.device)
    if dim is not None:  # the kernels return the inverse and counts whether asked or not
        return values, long(distinct), long(distinct)
    return values, long(*x.shape) if inverse else long(0), long(distinct) if counts else long(0)


# Ops whose output size depends on tensor values, by name (torchvision's are registered when it is imported).
# Where the values are unknown, we assume the largest output (every element selected, every element
# distinct), which can only over-estimate, and say so; ``nonzero`` of a one-hot selection gets its known
# share instead, and an op on known values runs for real (memlint/values.py).
_DYNAMIC_SHAPE_OPS: dict[str, tuple[Callable[..., Any], str]] = {  # name: (largest outputs, what that assumes)
    # Parameters are named as in the ops' schemas: the dispatcher may pass any of them by name.
    "aten::nonzero": (lambda self, rows=None: torch.empty((self.numel() if rows is None else rows, self.dim()),
                                                          dtype=torch.long, device=self.device),
                      "every element selected"),
    "aten::masked_select": (lambda self, mask: torch.empty((torch.broadcast_shapes(self.shape, mask.shape).numel(),),
                                                           dtype=self.dtype, device=self.device),
                            "every element selected"),
    "aten::_unique": (lambda self, sorted=True, return_inverse=False, distinct=None: _unique_bound(
        self, None, return_inverse, False, distinct)[:2], "every element distinct"),
    "aten::_unique2": (lambda self, sorted=True, return_inverse=False, return_counts=False, distinct=None:
                       _unique_bound(self, None, return_inverse, return_counts, distinct), "every element distinct"),
    "aten::unique_dim": (lambda self, dim, sorted=True, return_inverse=False, return_counts=False: _unique_bound(
        self, dim, return_inverse, return_counts), "every element distinct"),
    "aten::unique_consecutive": (lambda self, return_inverse=False, return_counts=False, dim=None: _unique_bound(
        self, dim, return_inverse, return_counts), "every element distinct"),
    "torchvision::nms": (lambda dets, scores, iou_threshold: torch.empty(dets.shape[0], dtype=torch.long,
                                                                          device=dets.device), "every box kept"),
}


def _grouped_mm_any_dtype(mat_a: torch.Tensor, mat_b: torch.Tensor, offs: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``_grouped_mm`` without its meta kernel's check that the inputs are bf16.

    The meta kernel checks the inputs of CUDA's CUTLASS path only; the CPU kernel and CUDA's
    fallback for other dtypes (aten/src/ATen/native/cuda/GroupedBlas.cpp, ``_grouped_mm_fallback``)
    take fp32 and return the same output. Mixture-of-experts layers of transformers call it in fp32.
    bf16 inputs keep the meta kernel and its checks.
    """
    if mat_a.dtype == torch.bfloat16:
        return aten._grouped_mm.default(mat_a, mat_b, offs, bias, out_dtype)
    from torch._meta_registrations import _create_grouped_mm_output_tensor

    return _create_grouped_mm_output_tensor(mat_a, mat_b, offs, out_dtype)


def _sizes_that_split(tensor: torch.Tensor, sizes: list[int], dim: int = 0) -> tuple:
    """``split_with_sizes`` arguments whose sizes add up to the dimension they split.

    Sizes read from tensor values (a mixture of experts' tokens per expert, ``counts.tolist()``)
    are assumed values, which need not add up; the real ones do. Equal parts keep the split's
    total, which is what the memory of the parts' results depends on.
    """
    total = tensor.shape[dim]
    if sum(sizes) != total and sizes:
        base, extra = divmod(total, len(sizes))
        sizes = [base + (i < extra) for i in range(len(sizes))]
    return tensor, sizes, dim


# Questions about a fake tensor's metadata (its device, sizes, strides), which C++ code asks through the
# dispatcher: half of the ops a step dispatches (2,468 of 4,229 in ResNet-50's). FakeTensorMode answers
# them from these handlers before anything else; answering them here as well spares them the modes
# below, which neither allocate nor count anything for them. Without the table, they go down as any op.
_METADATA_QUERIES = getattr(fake_tensor, "_DISPATCH_META_HANDLERS", {})


def _sparse_clone(tensor: torch.Tensor, memory_format: Any = None) -> torch.Tensor:
    """``clone`` of a sparse COO tensor that copies its elements, as the kernels do; its meta kernel keeps none.

    Autograd clones a sparse gradient (``nn.Embedding(sparse=True)``) into ``.grad``, SGD into its
    momentum: with no elements, both would hold no memory.
    """
    return aten._sparse_coo_tensor_with_dims_and_tensors.default(
        tensor.sparse_dim(), tensor.dense_dim(), tensor.shape, tensor._indices().clone(), tensor._values().clone(),
        dtype=tensor.dtype, layout=torch.sparse_coo, device=tensor.device, is_coalesced=tensor.is_coalesced())


# Comparisons that answer a Python bool from the tensors' values (an orthogonal parametrization checks
# its weight with ``allclose``): FakeTensorMode refuses them as data-dependent.
_VALUE_COMPARISONS = frozenset({aten.allclose.default, aten.equal.default})

# Ops whose meta kernel refuses inputs that the real kernels take: the output as the kernels make it.
_PERMISSIVE_OPS = {aten._grouped_mm.default: _grouped_mm_any_dtype}

_HALF = (torch.float16, torch.bfloat16)
# Normalisations whose meta kernels give the saved statistics (outputs 1 and 2) the input's dtype.
_NORMS = (aten.native_layer_norm.default, aten.native_group_norm.default, aten.native_batch_norm.default)


def _outputs_as_kernels_make_them(func: Any, args: tuple, out: Any, kernels: str) -> Any:
    """Fix the outputs where a meta kernel and the real kernels differ: dtypes on a half-precision input, a size.

    The saved mean and inverse deviation of a normalisation: with fp32 weights (autocast's mixed
    precision) the CPU and CUDA kernels keep them in fp32 (``param_scalar_type`` in
    aten/src/ATen/native/layer_norm.cpp and group_norm.cpp, ``mixed_type`` in batch_norm_cpu), and
    CUDA's layer and batch norm always do (``toAccumulateType`` in cuda/layer_norm_kernel.cu and
    ``batch_norm_cuda`` in cuda/Normalization.cu); the meta kernels make them bf16/fp16. And
    ``native_group_norm_backward``'s meta kernel makes an fp32 input gradient where the kernels give
    the input's dtype. And oneDNN's LSTM on a CPU returns a workspace for its backward, which its
    meta kernel leaves empty (memlint/onednn.py).
    """
    if func in _NORMS:
        data, params = args[0], [a for a in args[1:3] if isinstance(a, torch.Tensor)]
        if data.dtype in _HALF and out[1].dtype != torch.float32 and (
                any(p.dtype == torch.float32 for p in params)
                or (kernels == "cuda" and func is not aten.native_group_norm.default)):
            return (out[0], *(torch.empty_like(stat, dtype=torch.float32) for stat in out[1:3]), *out[3:])
    elif func is aten.native_group_norm_backward.default:
        data = args[1]
        if out[0] is not None and out[0].dtype != data.dtype:
            return (torch.empty_like(out[0], dtype=data.dtype), *out[1:])
    elif func is aten.mkldnn_rnn_layer.default and kernels == "cpu" and torch.is_grad_enabled():
        steps, batch, width = args[0].shape  # the workspace that oneDNN's LSTM keeps for its backward
        workspace = lstm_workspace_bytes(steps, batch, width, args[10], args[0].element_size())
        return (*out[:3], torch.empty(workspace, dtype=torch.uint8, device=args[0].device))
    return out


@dataclass
class Assumptions:
    """What the simulation had to assume about values it cannot see; reported to the user."""

    notes: dict[str, int] = field(default_factory=dict)

    def add(self, note: str) -> None:
        self.notes[note] = self.notes.get(note, 0) + 1

    def render(self) -> list[str]:
        return [f"{note} ({count}x)" if count > 1 else note for note, count in self.notes.items()]


# The strided tensors that hold a sparse tensor's memory (its indices and values), by layout.
_SPARSE_PARTS: dict[torch.layout, Callable[[torch.Tensor], tuple[torch.Tensor, ...]]] = {
    torch.sparse_coo: lambda t: (t._indices(), t._values()),
    torch.sparse_csr: lambda t: (t.crow_indices(), t.col_indices(), t.values()),
    torch.sparse_bsr: lambda t: (t.crow_indices(), t.col_indices(), t.values()),
    torch.sparse_csc: lambda t: (t.ccol_indices(), t.row_indices(), t.values()),
    torch.sparse_bsc: lambda t: (t.ccol_indices(), t.row_indices(), t.values()),
}


def storage_holders(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensor itself, or a sparse tensor's parts: a sparse gradient (``nn.Embedding(sparse=True)``)
    has no storage of its own."""
    parts = _SPARSE_PARTS.get(tensor.layout)
    return parts(tensor) if parts is not None else (tensor,)


class StorageTracker:
    """Maps live storages to ledger ids and knows which module and phase we are in."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.sid_of: dict[int, int] = {}
        self.module_stack: list[str] = []
        self.phase = "setup"

    @property
    def module(self) -> str | None:
        return self.module_stack[-1] if self.module_stack else None

    def sid(self, tensor: torch.Tensor) -> int | None:
        return self.sid_of.get(storage_holders(tensor)[-1].untyped_storage()._cdata)

    def track(self, tensor: torch.Tensor, role: str = "temporaries", module: str | None = None) -> int | None:
        """The ledger id of the tensor's storage, allocated when first seen (a sparse tensor's: its values')."""
        holders = storage_holders(tensor)
        if len(holders) > 1:
            return [self.track(holder, role, module) for holder in holders][-1]
        storage = tensor.untyped_storage()
        key = storage._cdata
        known = self.sid_of.get(key)
        if known is not None:
            return known
        nbytes = storage.nbytes()
        if nbytes == 0:
            return None
        sid = self.ledger.allocate(nbytes, role, module if module is not None else self.module, self.phase)
        self.sid_of[key] = sid
        weakref.finalize(storage, self._release, key, sid)
        return sid

    def adopt(self, tensor: torch.Tensor, sid: int) -> None:
        """Give a new storage an id whose allocation the ledger has already recorded (a copied event's)."""
        storage = tensor.untyped_storage()
        self.sid_of[storage._cdata] = sid
        weakref.finalize(storage, self._release, storage._cdata, sid)

    def _release(self, key: int, sid: int) -> None:
        if self.sid_of.get(key) == sid:
            del self.sid_of[key]
            self.ledger.free(sid)

    def live_state(self) -> dict[int, StorageInfo]:
        """The live storages as they are now (copies): an iteration that ends as it began can be repeated."""
        return {sid: replace(self.ledger.storages[sid]) for sid in self.sid_of.values()}

    def retag(self, tensor: torch.Tensor, role: str, only_from: tuple[str, ...] = ("temporaries",),
              module: str | None = None) -> None:
        for holder in storage_holders(tensor):
            sid = self.track(holder)
            if sid is None:
                continue
            info = self.ledger.storages[sid]
            if info.role in only_from:
                info.role = role
                if module is not None:
                    info.module = module


_MASK_INDEX: dict[Any, int | None] = {}
# Outputs that the kernels compute whatever the mask says: the grid's gradient of grid_sample, which
# ``grid_sampler_2d_backward_cpu`` (aten/src/ATen/native/GridSampler.cpp), ``..._cuda``
# (native/cuda/GridSampler.cpp) and their 3-d twins allocate with ``empty_like(grid)`` unconditionally.
_COMPUTED_REGARDLESS = {aten.grid_sampler_2d_backward.default: 1, aten.grid_sampler_3d_backward.default: 1}


def _drop_masked_outputs(func: Any, args: tuple, kwargs: dict, out: Any) -> Any:
    """Outputs an ``output_mask`` turns off are not computed (undefined) by the CPU and CUDA kernels.

    Some meta kernels allocate them anyway (``native_batch_norm_backward`` computes a gradient
    for an input that needs none, e.g. a normalisation on the batch itself); left alone, that
    would count memory the real step never allocates.
    """
    if func not in _MASK_INDEX:
        names = [argument.name for argument in getattr(getattr(func, "_schema", None), "arguments", ())]
        _MASK_INDEX[func] = names.index("output_mask") if "output_mask" in names else None
    index = _MASK_INDEX[func]
    if index is None or not isinstance(out, tuple):
        return out
    mask = kwargs.get("output_mask", args[index] if index < len(args) else None)
    if not isinstance(mask, (list, tuple)):
        return out
    kept = _COMPUTED_REGARDLESS.get(func)
    return tuple(None if i < len(mask) and not mask[i] and i != kept else value for i, value in enumerate(out))


class ValueAssumingMode(TorchDispatchMode):
    """Answers questions about values that fake tensors do not have, and records the assumption.

    ``.item()`` gets 1 (ints), 0.5 (floats) or ``bool_answer`` (bools, True unless a step that
    assumed True failed: see ``_traced_and_simulated`` in estimator.py); ``nonzero``-like ops select
    every element. Values that are known anyway (memlint/values.py) are used instead. Without this,
    stochastic depth or a data-dependent mask would stop the analysis.
    A loop that waits on a value would never end on a constant answer (``trunc_normal_`` redraws
    ``while mask.any()``): the same line of the same call asking ``LOOP_LIMIT`` times in a row
    gets False from then on, and that line gets False at once in later calls (a model that
    initialises hundreds of weights with ``trunc_normal_`` would otherwise loop for each).
    """

    def __init__(self, assumptions: Assumptions, where: str = "", bool_answer: bool = True,
                 kernels: str = "cuda") -> None:
        super().__init__()
        self.assumptions = assumptions
        self.kernels = kernels  # whose kernels' output dtypes to follow: a GPU target's ("cuda") or a host's ("cpu")
        self.where = where
        self.bool_answer = bool_answer
        self._last_site: tuple[int, str, int] | None = None
        self._repeats = 0
        self._waiting_lines: set[tuple[str, int]] = set()  # lines that asked LOOP_LIMIT times in a row
        self.loops_cut = 0  # how many lines have been answered False so (the run is no longer uniform)
        self._assumed_an_int = False
        self.knowledge = ValueKnowledge()

    def note(self, text: str) -> None:
        self.assumptions.add(f"{self.where}: {text}" if self.where else text)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        metadata = _METADATA_QUERIES.get(func)
        if metadata is not None and isinstance(args[0], fake_tensor.FakeTensor):
            return metadata(args)
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default or func is aten.item.default:  # item: spared its decomposition
            return self._assumed_scalar(args[0])
        if func in _VALUE_COMPARISONS:
            return self._compared(func, args, kwargs)
        if func is aten.split_with_sizes.default and self._assumed_an_int:
            split = _sizes_that_split(*args)
            if list(split[1]) != list(args[1]):
                self.note("split sizes read from tensor values (.tolist()): assumed equal parts")
                args = split
        if _has_dynamic_shape(func, args):  # spared FakeTensorMode's refusal, an exception that costs ms
            out = self._dynamic_shape_outputs(func, args, kwargs)
        elif func in _PERMISSIVE_OPS:
            out = _PERMISSIVE_OPS[func](*args, **kwargs)
        elif func is aten.clone.default and args[0].layout == torch.sparse_coo:
            out = _sparse_clone(*args, **kwargs)
        else:
            try:
                out = func(*args, **kwargs)
            except fake_tensor.DynamicOutputShapeException:
                out = self._dynamic_shape_outputs(func, args, kwargs)
                if out is None:
                    raise
            else:
                out = _outputs_as_kernels_make_them(func, args, out, self.kernels)
                self.knowledge.learn(func, args, kwargs, out)
        out = _drop_masked_outputs(func, args, kwargs, out)
        self.record(func, args, out)
        return out

    def record(self, func: Any, args: tuple, out: Any) -> None:
        """Hook for subclasses that want to see every op's arguments and outputs."""

    def _dynamic_shape_outputs(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """Outputs of an op whose sizes depend on values: ``nonzero`` of a tensor whose share of non-zeros
        is known selects that share; an op whose inputs' values are known runs for real (``torch.unique``
        of a detection model's feature-level ids); else the largest outputs. None for an op without
        a known largest output."""
        rows = self.knowledge.nonzero_rows(args[0]) if func is aten.nonzero.default else None
        if rows is not None:
            self.note(f"{func.__name__} of a tensor whose share of non-zeros is known (a one-hot selection: each "
                      "expert gets tokens x top-k / experts; a mask set at sampled indices): assumed that share of "
                      "its elements")
            out = _DYNAMIC_SHAPE_OPS["aten::nonzero"][0](args[0], rows)
            self.knowledge.learn_nonzero(args[0], out)
            return out
        real = self.knowledge.computed(func, args, kwargs)
        if real is not None:
            device = next(t.device for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor))
            fakes = [torch.empty_strided(r.shape, r.stride(), dtype=r.dtype, device=device) for r in real]
            for fake, value in zip(fakes, real):
                self.knowledge.values[fake] = value
            return fakes[0] if len(func._schema.returns) == 1 else tuple(fakes)
        if _indexes_with_a_mask(func, args):
            out = func(args[0], self._masks_as_indices(args[1]), *args[2:], **kwargs)
            self.knowledge.learn(func, args, kwargs, out)
            return out
        distinct = self.knowledge.distinct_values(args[0]) if func._schema.name in ("aten::_unique2",
                                                                                  "aten::_unique") else None
        if distinct is not None:
            self.note(f"{func.__name__} of a tensor that holds few values: assumed it holds every one of them")
            values, *others = _DYNAMIC_SHAPE_OPS[func._schema.name][0](*args, **kwargs, distinct=distinct.numel())
            self.knowledge.values[values] = distinct
            return (values, *others)
        largest = _DYNAMIC_SHAPE_OPS.get(func._schema.name)
        if largest is None:
            return None
        bound, assumed = largest
        self.note(f"{func.__name__}: assumed {assumed} (an upper bound)")
        return bound(*args, **kwargs)

    def _masks_as_indices(self, indices: list) -> list:
        """Indices with each boolean mask replaced by the indices of its selected elements, as the kernels
        do (``x[mask]``): that many as its known share of non-zeros selects, else every element."""
        converted: list = []
        for index in indices:
            if not _is_mask(index):
                converted.append(index)
                continue
            rows = self.knowledge.nonzero_rows(index)
            if rows is None:
                self.note("indexing with a boolean mask: assumed every element selected (an upper bound)")
            selected = _DYNAMIC_SHAPE_OPS["aten::nonzero"][0](index, rows)
            converted.extend(selected.unbind(1))
        return converted

    def _assumed_scalar(self, tensor: torch.Tensor) -> Any:
        known = self.knowledge.scalar(tensor)
        if known is not None:  # a number FakeTensorMode keeps, or computed from known values (memlint/values.py)
            return known
        if tensor.dtype == torch.bool:
            value: Any = self._assumed_bool()
        elif tensor.dtype.is_floating_point or tensor.dtype.is_complex:
            value = 0.5
        else:
            value = 1
            self._assumed_an_int = True
        self.note(f".item() on a {str(tensor.dtype).removeprefix('torch.')} tensor: assumed {value}")
        return value

    def _compared(self, func: Any, args: tuple, kwargs: dict) -> bool:
        """``allclose`` or ``equal``: from the tensors' values where every one keeps its value, else assumed."""
        values = [getattr(a, "constant", None) if isinstance(a, torch.Tensor) else a for a in args]
        if all(value is not None for value in values):
            with fake_tensor.unset_fake_temporarily():
                return func(*values, **kwargs)
        answer = self._assumed_bool()
        self.note(f"{func.__name__} of tensors without values: assumed {answer}")
        return answer

    def _assumed_bool(self) -> bool:
        frame = _calling_frame()
        site = (id(frame), frame.f_code.co_filename, frame.f_lineno) if frame is not None else None
        self._repeats = self._repeats + 1 if site == self._last_site else 1
        self._last_site = site
        if site is not None and site[1:] in self._waiting_lines:
            return False
        if self._repeats <= LOOP_LIMIT:
            return self.bool_answer
        if site is not None:
            self._waiting_lines.add(site[1:])
            self.loops_cut += 1
            self.note(f"{site[1]}:{site[2]} asked for the same value {LOOP_LIMIT} times in a row (a loop waiting "
                      "on a value): answered False from then on, there")
        return False


LOOP_LIMIT = 1000
# Where torch's and memlint's own frames come from: a walk up the stack skips them to reach the user's code.
LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(__file__))


def _calling_frame() -> Any:
    """The innermost frame outside torch and memlint: the line that asked for a value."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(LIBRARY_DIRS):
        frame = frame.f_back
    return frame


class AllocationRecorder(ValueAssumingMode):
    """Records every op's output storages in the ledger, and the scratch memory its GPU kernel takes.

    ``kernel_scratch(func, args, out)`` gives the bytes a kernel borrows from the allocator while it
    runs and returns before the op ends (cuDNN's workspace): allocated after the outputs, then freed,
    and elastic: the kernel does without it when the allocator cannot give it (see replay_allocator).
    """

    def __init__(self, tracker: StorageTracker, assumptions: Assumptions,
                 kernel_scratch: Callable[[Any, tuple, Any], int] | None = None, bool_answer: bool = True,
                 kernels: str = "cuda") -> None:
        super().__init__(assumptions, bool_answer=bool_answer, kernels=kernels)
        self.tracker = tracker
        self.kernel_scratch = kernel_scratch
        self.recording = True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ops that make tensors the ledger already accounts for (``StorageTracker.adopt``)."""
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    def note(self, text: str) -> None:
        # The optimizer reads its step counters with .item(); that value does not shape memory.
        if self.tracker.phase != "optimizer":
            super().note(text)

    def record(self, func: Any, args: tuple, out: Any) -> None:
        if not self.recording:
            return
        ledger = self.tracker.ledger
        ledger.mark_op(func.__name__, self.tracker.phase)
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.tracker.track(value)
        scratch = self.kernel_scratch(func, args, out) if self.kernel_scratch is not None else 0
        if scratch:
            ledger.free(ledger.allocate(scratch, "workspace", self.tracker.module, self.tracker.phase, elastic=True))


@contextlib.contextmanager
def module_scope(stack: list[str], model: torch.nn.Module, root_name: str | None = "(model)") -> Iterator[None]:
    """Keep ``stack`` equal to the names of the modules whose forward is running (the model's own
    as ``root_name``; None: the model's own forward is not on it)."""
    names = {module: name or root_name for name, module in model.named_modules(remove_duplicate=False)
             if name or root_name}

    def enter(module: torch.nn.Module, _args: Any) -> None:
        name = names.get(module)
        if name is not None:
            stack.append(name)

    def leave(module: torch.nn.Module, _args: Any, _output: Any) -> None:
        if module in names and stack:
            stack.pop()

    pre = torch.nn.modules.module.register_module_forward_pre_hook(enter)
    post = torch.nn.modules.module.register_module_forward_hook(leave, always_call=True)
    try:
        yield
    finally:
        pre.remove()
        post.remove()


@dataclass
class StepPlan:
    """One simulated step: how to make inputs, compute the loss and update the weights."""

    mode: str
    make_inputs: Callable[[], tuple[tuple, dict]]
    loss_fn: Callable[[Any, tuple, dict], torch.Tensor]
    optimizer_factory: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None
    autocast_dtype: torch.dtype | None = None
    kernels: str = "cuda"  # whose kernels and autocast policy: a GPU target's ("cuda") or a host's ("cpu")
    iterations: int = 3  # as a real loop: step 1 creates the optimizer state, steps 2-3 run with it
    # False: an iteration ends before its optimizer step, unless a gradient is sparse. A probe of
    # what the batch size changes needs no step (ledger.from_first_iteration), and it is a third
    # of a ResNet-50 iteration (Adam makes and updates its state tensor by tensor).
    optimizer_step: bool = True
    kernel_scratch: Callable[[Any, tuple, Any], int] | None = None  # see AllocationRecorder
    bool_answer: bool = True  # what a bool read from a fake tensor is assumed to be (ValueAssumingMode)


# Iteration 1 is always simulated; from this one on, an iteration may be copied from the one before
# (see simulate_step).
FIRST_COPIED = 2


@dataclass
class SimulationResult:
    ledger: Ledger
    assumptions: list[str]
    activation_bytes_by_module: dict[str, int]
    parameter_owner: dict[int, str]
    output: Any = None


# A gradient as the optimizer step finds it: its parameter, its storage id, size, strides, offset and dtype.
Gradient = tuple[torch.nn.Parameter, int, torch.Size, tuple[int, ...], int, torch.dtype]


@dataclass
class _Iteration:
    """Where an iteration's records begin, what it found, and what its optimizer step found."""

    start: int  # its first event
    first_sid: int  # the first storage id it allocated
    state: dict[int, StorageInfo]  # the live storages it began with
    notes: dict[str, int]  # the assumptions noted before it
    loops_cut: int  # ValueAssumingMode.loops_cut before it
    step_mark: int | None = None  # its STEP_BEGINS event
    first_step_sid: int = 0  # the first storage id its optimizer step allocated
    gradients: list[Gradient] | None = None  # None: the step is not repeatable on copied gradients

    def noted(self, assumptions: Assumptions) -> dict[str, int]:
        """The assumptions noted since it began."""
        return {note: count - self.notes.get(note, 0) for note, count in assumptions.notes.items()}


def simulate_step(model: torch.nn.Module, plan: StepPlan, fake_mode: Any,
                  extra_modes: tuple[Any, ...] = ()) -> SimulationResult:
    """Run ``plan.iterations`` steps on fake tensors under an AllocationRecorder.

    From ``FIRST_COPIED`` on, an iteration is copied from the one before instead of simulated
    where that one shows how:

    * the one before ended with exactly the storages it began with, none of them changed: it
      hands the next one the same state, so the next records the same allocations and frees
      under new ids, and so do the rest;
    * it ended with them and the state its optimizer step made (Adam's, in the first): the next
      one's forward and backward find what this one's found, and are copied; its optimizer step
      is simulated, on gradients made as this one's step found them.

    Neither where the one before cut a loop waiting on a value (its answers changed on the way).
    Extra modes that record against the ledger (``attach``) copy their records too
    (``repeat_iteration``); a ``StepCounter`` counts the simulated optimizer step in place of
    the one before's.
    """
    ledger = Ledger()
    tracker = StorageTracker(ledger)
    for mode in extra_modes:  # extra modes that mark moments of the step (memlint/distributed.py) see the ledger
        if hasattr(mode, "attach"):
            mode.attach(tracker)
    assumptions = Assumptions()
    owner = _register_model_state(tracker, model)
    activation_by_module: dict[str, int] = {}
    counted: set[int] = set()

    def pack(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        sid = tracker.track(tensor)
        if sid is not None and ledger.storages[sid].role == "temporaries":
            ledger.storages[sid].role = "activations"
            if sid not in counted:
                counted.add(sid)
                module = ledger.storages[sid].module or "(model)"
                activation_by_module[module] = activation_by_module.get(module, 0) + ledger.storages[sid].nbytes
        # With saved-tensor hooks autograd no longer checks version counters itself; a training step
        # whose backward would fail (an in-place op overwrote a saved tensor) must fail here too.
        return (tensor.detach() if _saves_its_own_output(tensor) else tensor), tensor._version

    params = [p for p in model.parameters() if p.requires_grad]
    grad_hooks = [p.register_post_accumulate_grad_hook(
        lambda p: tracker.retag(p.grad, "gradients", module=owner.get(id(p)))) for p in params] \
        if plan.mode == "train" else []
    output = None
    with fake_mode, contextlib.ExitStack() as stack:
        for mode in extra_modes:
            stack.enter_context(mode)
        recorder = stack.enter_context(AllocationRecorder(tracker, assumptions, plan.kernel_scratch,
                                                          plan.bool_answer, plan.kernels))
        stack.enter_context(module_scope(tracker.module_stack, model))
        stack.enter_context(modes_survive_recomputation())
        optimizer = plan.optimizer_factory(params) if plan.mode == "train" and plan.optimizer_factory else None
        model.train(plan.mode == "train")
        iterations = plan.iterations if plan.mode == "train" else 1
        last: _Iteration | None = None
        number = 1
        while number <= iterations:
            now = tracker.live_state()
            if last is not None and number >= FIRST_COPIED and recorder.loops_cut == last.loops_cut:
                if now == last.state:
                    _repeat_last_iteration(ledger, assumptions, last, extra_modes, iterations - number + 1)
                    break
                if _only_the_step_kept_storages(last, now):
                    last = _copy_forward_backward(last, now, ledger, tracker, recorder, optimizer, assumptions,
                                                  extra_modes)
                    number += 1
                    continue
            last = _Iteration(len(ledger.events), len(ledger.storages), now, dict(assumptions.notes),
                              recorder.loops_cut)
            ledger.mark_iteration()
            activation_by_module.clear()  # report what one step saves: the last one's
            output = _one_iteration(model, plan, tracker, optimizer, pack, _step_begins(last, tracker, optimizer,
                                                                                       extra_modes))
            number += 1
        for hook in grad_hooks:
            hook.remove()
    return SimulationResult(ledger, assumptions.render(), activation_by_module,
                            {sid: name for sid, name in _param_sids(tracker, model)}, output)


def _step_begins(iteration: _Iteration, tracker: StorageTracker, optimizer: torch.optim.Optimizer | None,
                 extra_modes: tuple[Any, ...]) -> Callable[[], None]:
    """What to keep when the iteration's optimizer step begins, for copying the next iteration."""
    def keep() -> None:
        iteration.step_mark, iteration.first_step_sid = len(tracker.ledger.events), len(tracker.ledger.storages)
        iteration.gradients = _gradients(tracker, optimizer) if optimizer is not None else None
        for mode in extra_modes:
            if hasattr(mode, "step_begins"):
                mode.step_begins()
    return keep


def _gradients(tracker: StorageTracker, optimizer: torch.optim.Optimizer) -> list[Gradient] | None:
    """The optimizer's gradients (views of one storage where cuDNN's RNN backward made them so); None
    where one is sparse, or a storage holds two dtypes."""
    found: list[Gradient] = []
    dtypes: dict[int, torch.dtype] = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            grad = parameter.grad
            if grad is None:
                continue
            sid = tracker.sid(grad) if grad.layout == torch.strided else None
            if sid is None or dtypes.setdefault(sid, grad.dtype) != grad.dtype:
                return None
            found.append((parameter, sid, grad.shape, grad.stride(), grad.storage_offset(), grad.dtype))
    return found


def _only_the_step_kept_storages(last: _Iteration, now: dict[int, StorageInfo]) -> bool:
    """Whether ``last`` ended with the storages it began with, unchanged, and what its optimizer step made."""
    return (last.gradients is not None and all(now.get(sid) == info for sid, info in last.state.items())
            and all(sid in last.state or sid >= last.first_step_sid for sid in now))


def _repeat_last_iteration(ledger: Ledger, assumptions: Assumptions, last: _Iteration,
                           extra_modes: tuple[Any, ...], times: int) -> None:
    """Record the last iteration ``times`` more, with the assumptions it noted and the extra modes' records."""
    noted = last.noted(assumptions)
    for _ in range(times):
        shift = len(ledger.events) - ledger.iteration_marks[-1]
        ledger.repeat_last_iteration()
        _extra_modes_repeat(extra_modes, shift)
        for note, count in noted.items():
            assumptions.notes[note] += count


def _extra_modes_repeat(extra_modes: tuple[Any, ...], shift: int) -> None:
    for mode in extra_modes:
        if hasattr(mode, "attach"):
            mode.repeat_iteration(shift)


def _copy_forward_backward(last: _Iteration, state: dict[int, StorageInfo], ledger: Ledger, tracker: StorageTracker,
                           recorder: AllocationRecorder, optimizer: torch.optim.Optimizer, assumptions: Assumptions,
                           extra_modes: tuple[Any, ...]) -> _Iteration:
    """The next iteration, which begins with ``state``: ``last``'s events up to its optimizer step
    copied, the step simulated.

    The storages that ``last`` allocated before its step and freed after it, other than the
    gradients (the batch, freed when the iteration returns), are freed after the copy's step in
    the order ``last`` freed them.
    """
    assert last.gradients is not None and last.step_mark is not None
    noted = last.noted(assumptions)
    copy = _Iteration(len(ledger.events), len(ledger.storages), state, dict(assumptions.notes), recorder.loops_cut)
    gradient_sids = {sid for _, sid, *_ in last.gradients}
    freed_after_step = [sid for kind, sid, _ in ledger.events[last.step_mark:]
                        if kind == FREE and last.first_sid <= sid < last.first_step_sid and sid not in gradient_sids]
    ledger.mark_iteration()
    renamed = ledger.repeat_events(last.start, last.step_mark + 1)  # through the STEP_BEGINS mark
    _extra_modes_repeat(extra_modes, copy.start - last.start)
    for note, count in noted.items():
        assumptions.notes[note] += count
    copy.step_mark, copy.first_step_sid = len(ledger.events) - 1, len(ledger.storages)
    copy.gradients = [(parameter, renamed[sid], *layout) for parameter, sid, *layout in last.gradients]
    with recorder.paused():
        _give_gradients(tracker, copy.gradients)
    for mode in extra_modes:
        if hasattr(mode, "count_step_again"):
            mode.count_step_again()
    tracker.phase = "optimizer"
    _optimizer_step(tracker, optimizer)
    for sid in freed_after_step:
        ledger.free(renamed[sid])
    tracker.phase = "idle"
    return copy


def _give_gradients(tracker: StorageTracker, gradients: list[Gradient]) -> None:
    """Each parameter its gradient again, made as the optimizer step found it, under its copied id.

    A gradient that fills a storage of its own is made with its layout at once; a storage that
    several share (cuDNN's RNN weights') is made once and viewed. A view costs the fake mode twice
    what an ``empty_strided`` does, and ResNet-50 has 161 gradients.
    """
    sharers = collections.Counter(sid for _, sid, *_ in gradients)
    storages: dict[int, torch.Tensor] = {}
    for parameter, sid, size, stride, offset, dtype in gradients:
        nbytes = tracker.ledger.storages[sid].nbytes
        if sharers[sid] == 1 and offset == 0 and strided_nbytes(size, stride, dtype) == nbytes:
            parameter.grad = torch.empty_strided(size, stride, dtype=dtype, device=parameter.device)
            tracker.adopt(parameter.grad, sid)
            continue
        storage = storages.get(sid)
        if storage is None:
            storage = storages[sid] = torch.empty(nbytes // dtype.itemsize, dtype=dtype, device=parameter.device)
            tracker.adopt(storage, sid)
        parameter.grad = storage.as_strided(size, stride, offset)


def _one_iteration(model: torch.nn.Module, plan: StepPlan, tracker: StorageTracker,
                   optimizer: torch.optim.Optimizer | None, pack: Callable, step_begins: Callable[[], None]) -> Any:
    tracker.phase = "inputs"
    args, kwargs = plan.make_inputs()
    _tag_inputs(tracker, args, kwargs)  # in a function: a loop variable here would keep the last input alive
    if plan.mode != "train":
        tracker.phase = "forward"
        with torch.no_grad(), _autocast(plan):
            return model(*args, **kwargs)
    tracker.phase = "forward"
    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack), _autocast(plan):
        output = model(*args, **kwargs)
        tracker.phase = "loss"
        loss = plan.loss_fn(output, args, kwargs)
    # As in `for x, y in loader: loss = loss_fn(model(x), y); loss.backward(); ...`: the batch is held
    # until the step ends (it is freed when this function returns), the output is not.
    del output
    tracker.phase = "backward"
    loss.backward()
    del loss
    tracker.phase = "optimizer"
    if optimizer is not None and (plan.optimizer_step or _sparse_gradients(optimizer)):
        step_begins()
        tracker.ledger.mark_step()
        _optimizer_step(tracker, optimizer)
    else:
        tracker.ledger.mark_step()
        model.zero_grad(set_to_none=True)
    tracker.phase = "idle"
    return None


def _optimizer_step(tracker: StorageTracker, optimizer: torch.optim.Optimizer) -> None:
    optimizer.step()
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                tracker.retag(value, "optimizer_state", only_from=("temporaries", "gradients"))
    optimizer.zero_grad(set_to_none=True)


def _sparse_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a gradient is sparse (``nn.Embedding(sparse=True)``): its step's memory depends on the batch."""
    return any(p.grad is not None and p.grad.layout != torch.strided
               for group in optimizer.param_groups for p in group["params"])


def _saves_its_own_output(tensor: torch.Tensor) -> bool:
    """Whether autograd is saving an output of the node it made last (sequence numbers count the nodes made).

    Such a node, holding its output, would be held by it through ``grad_fn``: a reference cycle that
    outlives a branch the loss never reaches (a pooler's tanh), where autograd itself frees the node
    with the output. A detached tensor (same storage, same version counter) breaks it; saved inputs,
    made by earlier nodes, need no detach (a dispatch on fake tensors, so not done for every one).
    """
    node = tensor.grad_fn
    return node is not None and node._sequence_nr() == torch._C._autograd._get_sequence_nr() - 1


def _unpack(packed: tuple[torch.Tensor, int]) -> torch.Tensor:
    tensor, version = packed
    if tensor._version != version:
        raise RuntimeError(
            f"one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"a {str(tensor.dtype).removeprefix('torch.')} tensor of shape {tuple(tensor.shape)} is at version "
            f"{tensor._version}; expected version {version} instead")
    return tensor


def _tag_inputs(tracker: StorageTracker, args: tuple, kwargs: dict) -> None:
    for value in tree_flatten((args, kwargs))[0]:
        if isinstance(value, torch.Tensor):
            tracker.retag(value, "inputs")


def _autocast(plan: StepPlan) -> contextlib.AbstractContextManager:
    """The target's autocast policy: CUDA's (see autocast.py) on a GPU; on a host, the CPU's own.

    The fake tensors are CPU tensors, so ``torch.autocast("cpu")`` applies the CPU's policy to them
    as it would to real ones; CUDA's policy differs and is emulated.
    """
    if plan.autocast_dtype is None:
        return contextlib.nullcontext()
    if plan.kernels == "cpu":
        return torch.autocast("cpu", dtype=plan.autocast_dtype)
    return CudaAutocastMode(plan.autocast_dtype)


def _register_model_state(tracker: StorageTracker, model: torch.nn.Module) -> dict[int, str]:
    """Parameters and buffers exist before the step; record them first, with their owners."""
    owner: dict[int, str] = {}
    tracker.phase = "model"
    for module_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owner.setdefault(id(param), module_name or "(model)")
            tracker.track(param, "parameters", owner[id(param)])
        for buffer in module.buffers(recurse=False):
            tracker.track(buffer, "buffers", module_name or "(model)")
    return owner


def _param_sids(tracker: StorageTracker, model: torch.nn.Module) -> Iterator[tuple[int, str]]:
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            sid = tracker.sid(param)
            if sid is not None:
                yield sid, name or "(model)"
