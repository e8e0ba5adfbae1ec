"""FLOPs, bytes moved and a roofline lower bound of the time per training step.

Counted on the simulated step itself (an extra mode of the main simulation), on its last
iteration (the first one also creates the optimizer state):

* **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode``, i.e. PyTorch's registered formulas
  (matmuls, convolutions, attention, forward and backward), attributed to modules by its
  ``ModuleTracker``. Ops it has no formula for (element-wise, norms, the optimizer) count 0.
  Backward is told from forward by the autograd engine (a running graph task), so
  recomputation under activation checkpointing counts as backward, where it runs.
* **Bytes moved**: per op, the bytes of its input and output tensors (views and ``empty``
  move nothing; an expanded tensor reads its storage once).
* **Time**: a roofline per op, ``max(flops / peak rate of its dtype, bytes / memory bandwidth)``,
  summed over the step. A lower bound: no kernel launch latency, no caching effects, no
  communication, every kernel at the datasheet's peak.

Which rate an fp32 op gets follows PyTorch's defaults: matmuls run in fp32
(``torch.backends.cuda.matmul.allow_tf32`` is off by default), cuDNN convolutions in TF32
(``torch.backends.cudnn.allow_tf32`` is on by default) where the target has TF32 tensor cores.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, TYPE_CHECKING

import torch
from torch.autograd.graph import register_multi_grad_hook
from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode
from torch.utils.module_tracker import ModuleTracker

from memlint.simulate import storage_holders

if TYPE_CHECKING:
    from memlint.report import ModelReport
    from memlint.simulate import SimulationResult
    from memlint.targets import Target

aten = torch.ops.aten

DTYPE_KEYS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        DTYPE_KEYS[getattr(torch, _name)] = "fp8"

# Ops that allocate or alias but move no data.
_NO_TRAFFIC = {aten.empty, aten.empty_strided, aten.new_empty, aten.new_empty_strided, aten.empty_like,
               aten.detach, aten.alias, aten.lift_fresh, aten.resize_}
_CONVOLUTIONS = {aten.convolution, aten._convolution, aten.convolution_backward}


def _is_bw() -> bool:
    return torch._C._current_graph_task_id() != -1


def _collect(value: Any, into: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors inside an op's arguments or outputs (tuples, lists, dicts); faster than pytree here."""
    if isinstance(value, torch.Tensor):
        into.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect(item, into)
    elif isinstance(value, dict):
        for item in value.values():
            _collect(item, into)
    return into


def _tensor_bytes(values: Any) -> int:
    """Bytes of the tensors in ``values``; an expanded (non-contiguous) tensor counts its storage at most."""
    total = 0
    for value in _collect(values, []):
        holders = storage_holders(value)
        if len(holders) > 1:  # a sparse tensor moves its indices and values
            total += _tensor_bytes(holders)
            continue
        nbytes = value.numel() * value.element_size()
        if nbytes and not value.is_contiguous():
            nbytes = min(nbytes, value.untyped_storage().nbytes())
        total += nbytes
    return total


NO_TRAFFIC, VIEW, MUTATES, PRODUCES = range(4)


def _traffic(func: Any) -> tuple[int, tuple[tuple[int, str], ...]]:
    """How an op moves data, from its schema: nothing, a view, writes into arguments, or new outputs."""
    if func._overloadpacket in _NO_TRAFFIC:
        return NO_TRAFFIC, ()
    schema = func._schema
    mutated = tuple((i, arg.name) for i, arg in enumerate(schema.arguments)
                    if arg.alias_info is not None and arg.alias_info.is_write)
    if mutated:
        return MUTATES, mutated
    if any(ret.alias_info is not None for ret in schema.returns):
        return VIEW, ()
    return PRODUCES, ()


class Roofline:
    """Peak rates of a target and the rule that picks one for an op."""

    def __init__(self, target: "Target") -> None:
        self.peaks = dict(target.peak_flops)
        self.bandwidth = target.memory_bandwidth
        self.matmul_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
        self.conv_tf32 = bool(torch.backends.cudnn.allow_tf32)
        self.fallbacks: set[str] = set()

    @property
    def usable(self) -> bool:
        return self.bandwidth > 0 and "fp32" in self.peaks

    def rate(self, dtype: torch.dtype | None, convolution: bool) -> float:
        key = DTYPE_KEYS.get(dtype, "fp32") if dtype is not None else "fp32"
        if key == "fp32" and (self.conv_tf32 if convolution else self.matmul_tf32) and "tf32" in self.peaks:
            key = "tf32"
        if key not in self.peaks:
            self.fallbacks.add(key)
            key = "fp32"
        return self.peaks.get(key, 0.0)

    def seconds(self, flops: int, nbytes: int, dtype: torch.dtype | None, convolution: bool) -> tuple[float, bool]:
        """The op's lower bound and whether compute (not memory) bounds it."""
        compute = flops / self.rate(dtype, convolution) if flops else 0.0
        memory = nbytes / self.bandwidth if self.bandwidth else 0.0
        return max(compute, memory), compute > memory

    def notes(self) -> list[str]:
        notes = ["time per step is a roofline lower bound: each op at the target's peak rate or memory "
                 "bandwidth, whichever binds; no launch latency, no communication"]
        if "tf32" in self.peaks:
            notes.append(f"fp32 matmuls at the {'tf32' if self.matmul_tf32 else 'fp32'} rate "
                         f"(torch.backends.cuda.matmul.allow_tf32={self.matmul_tf32}; PyTorch's default is False), "
                         f"fp32 convolutions at the {'tf32' if self.conv_tf32 else 'fp32'} rate "
                         f"(torch.backends.cudnn.allow_tf32={self.conv_tf32}; PyTorch's default is True)")
        for key in sorted(self.fallbacks):
            notes.append(f"the target publishes no {key} rate: {key} ops timed at its fp32 rate")
        return notes


class _StandInCosts:
    """Counts a kernel that the simulation replaces by a stand-in (``memlint.gpu_kernels``): attention
    (``_gpu_sdpa``) and cuDNN's recurrent layers (``_gpu_rnn``).

    A stand-in only allocates, so FlopCounterMode would see no op: while the counter is active, the
    stand-in is wrapped to add the costs of the CUDA kernel. A wrapper rather than one more
    TorchFunctionMode: a second mode changes which ops the simulation dispatches (``prim.device``
    queries of tensor indexing) and so the recorded event sequence.
    """

    def __init__(self, name: str, count: Any) -> None:
        self.name, self.count = name, count
        self.original: Any = None

    def __enter__(self) -> None:
        from memlint import gpu_kernels

        self.original = getattr(gpu_kernels, self.name, None)
        if self.original is None:
            return
        original, count = self.original, self.count

        def counted(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            count(args, kwargs, out)
            return out
        setattr(gpu_kernels, self.name, counted)

    def __exit__(self, *exc: Any) -> None:
        from memlint import gpu_kernels

        if self.original is not None:
            setattr(gpu_kernels, self.name, self.original)
            self.original = None


def _matrix_products(rows: int, matrices: list[torch.Tensor]) -> int:
    """FLOPs of multiplying ``rows`` vectors by each matrix, 2 a multiply-add as FlopCounterMode's matmul
    formula counts them: a recurrent layer's weights times every step of every sample."""
    return 2 * rows * sum(matrix.numel() for matrix in matrices)


def _onednn_rnn_flops(input: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor, *_args: Any,
                      out_val: Any = None, **_kwargs: Any) -> int:
    """oneDNN's LSTM layer on a host target (``mkldnn_rnn_layer``, one layer and direction), which
    FlopCounterMode has no formula for: its two weight matrices' products, as cuDNN's are counted."""
    return _matrix_products(input.numel() // max(1, input.shape[-1]), [weight_ih, weight_hh])


def _onednn_rnn_backward_flops(input: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor, *_args: Any,
                               out_val: Any = None, **_kwargs: Any) -> int:
    """Its backward: the data and the weight gradients, each as much as the forward."""
    return 2 * _onednn_rnn_flops(input, weight_ih, weight_hh)


class _StepModuleTracker(ModuleTracker):
    """FlopCounterMode's ModuleTracker, told when a step starts, idle before the first one,
    and neutral to the memory the simulation records.

    ModuleTracker hooks every module's inputs and outputs for backward in "all" mode, which holds
    each gradient until its siblings arrive and holds the grad_fns: that would change when the
    simulation sees gradients freed (and break the interpolation between two batch sizes, which
    needs identical event sequences). This tracker hooks them in "any" mode, which holds nothing: a
    module's backward starts with its first output gradient and ends with its first input gradient.
    When checkpointing recomputes a forward inside backward, the recomputed tensors' graph never
    runs, so no hooks are put on them; the module names are only kept current for attribution.
    """

    def __init__(self, counter: "StepCounter") -> None:
        super().__init__()
        self.counter = counter
        self._recomputing: list[tuple[str, bool]] = []

    def _hook(self, values: Any, fn: Any) -> None:
        tensors = [t for t in _collect(values, []) if t.requires_grad]
        if tensors:
            self._hooks.append(register_multi_grad_hook(tensors, fn, mode="any"))

    def _fw_pre_hook(self, mod: torch.nn.Module, input: Any) -> None:
        backward = _is_bw()
        if mod is self.counter.model and not backward:
            self.counter.start_step()
        if not self.counter.active:
            return
        name = self._get_mod_name(mod)
        if not backward:
            self._get_append_fn(name, False)()
            self._hook(input, self._get_pop_fn(name, True))
            return
        added = name not in self.parents
        self._recomputing.append((name, added))
        if added:
            self.parents.add(name)

    def _fw_post_hook(self, mod: torch.nn.Module, input: Any, output: Any) -> None:
        if not self.counter.active:
            return
        if not _is_bw():
            name = self._get_mod_name(mod)
            self._get_pop_fn(name, False)()
            self._hook(output, self._get_append_fn(name, True))
            return
        if self._recomputing:
            name, added = self._recomputing.pop()
            if added:
                self.parents.discard(name)


def _can_decompose(func: Any) -> bool:
    try:
        return bool(func._can_decompose())
    except (AttributeError, RuntimeError):  # e.g. prim::device, which has no dispatcher entry
        return False


class _CountingMode(_FlopCounterMode):
    """FlopCounterMode's dispatch mode, with one dictionary lookup per op on the common path.

    FlopCounterMode decomposes ops that have no FLOP formula but a CompositeImplicitAutograd
    kernel, to count the matmuls inside. The first time such an op runs, its decomposition is
    probed (on the same fake tensors, outside the simulation's recording); only when it holds
    counted ops does it go through FlopCounterMode's own dispatch (as do higher-order operators).
    The others (batch norm, for one) run as one op, as the GPU runs them.
    """

    def __init__(self, counter: "StepCounter") -> None:
        super().__init__(counter)
        self.ops: dict[Any, tuple[bool, int, tuple[tuple[int, str], ...]]] = {}

    def _classify(self, func: Any, args: tuple, kwargs: dict) -> tuple[bool, int, tuple[tuple[int, str], ...]]:
        if isinstance(func, torch._ops.HigherOrderOperator):
            return True, PRODUCES, ()
        special = False
        if func not in self.counter.flop_registry and _can_decompose(func):
            probe = FlopCounterMode(display=False)
            try:
                with probe:
                    func.decompose(*args, **kwargs)
                special = probe.get_total_flops() > 0
            except Exception:  # a decomposition that cannot run here: count the op as it is
                special = False
        return (special, *_traffic(func))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        kind = self.ops.get(func)
        if kind is None:
            kind = self.ops[func] = self._classify(func, args, kwargs)
        if kind[0]:
            return super().__torch_dispatch__(func, types, args, kwargs)
        out = func(*args, **kwargs)
        if self.counter.active:
            self.counter.count_op(func._overloadpacket, kind[1], kind[2], out, args, kwargs)
        return out


class StepCounter(FlopCounterMode):
    """FlopCounterMode that also keeps, per module and phase, the bytes moved and the roofline time.

    Pass it to ``simulate_step`` as an extra mode. Counts restart whenever the root module's
    forward starts (outside backward), so they describe the last simulated step; a step whose
    forward and backward the simulation copies from the one before, running only its optimizer
    step, has that step counted in place of the one before's (``step_begins``, ``count_step_again``).
    """

    def __init__(self, model: torch.nn.Module, target: "Target", blocks: list[str] = ()) -> None:
        super().__init__(display=False)
        # The CPU's fused attention kernel (a host target runs it) has no formula of its own: the flash kernel's.
        registry = self.flop_registry
        registry[aten._scaled_dot_product_flash_attention_for_cpu] = registry[aten._scaled_dot_product_flash_attention]
        registry[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
            registry[aten._scaled_dot_product_flash_attention_backward]
        registry[aten.mkldnn_rnn_layer] = _onednn_rnn_flops
        registry[aten.mkldnn_rnn_layer_backward] = _onednn_rnn_backward_flops
        self.mod_tracker = _StepModuleTracker(self)
        self.model = model
        self.active = False
        self.roofline = Roofline(target)
        self.root = type(model).__name__
        self.blocks = list(blocks)
        self.block_inputs: dict[str, int] = {}
        self._stand_ins = (_StandInCosts("_gpu_sdpa", self.count_attention),
                           _StandInCosts("_gpu_rnn", self.count_recurrent))
        self._handles: list[Any] = []
        self._backward_hooks: list[Any] = []  # a step's stand-ins' backward counts (on parameters too: removed)
        self._block_names: dict[torch.nn.Module, str] = {}
        self._names: dict[frozenset[str], tuple[str, ...]] = {}
        self.steps = 0
        self._at_step: tuple | None = None
        self._reset()

    def _reset(self) -> None:
        self.flop_counts.clear()
        # (modules running, backward?) -> [flops, bytes]; spread over module names when read.
        self._by_scope: dict[tuple[frozenset[str], bool], list[int]] = defaultdict(lambda: [0, 0])
        self.total_flops = 0
        self.total_bytes = 0
        self.seconds = 0.0
        self.compute_bound_seconds = 0.0

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> "StepCounter":
        self.flop_counts.clear()
        self.mod_tracker.__enter__()
        self.mode = _CountingMode(self)
        self.mode.__enter__()
        for stand_in in self._stand_ins:
            stand_in.__enter__()
        if self.blocks:
            # A hook of every module, not of the blocks: PyTorch's fused inference path of a transformer
            # layer (``_transformer_encoder_layer_fwd``) is not taken by a module with hooks of its own.
            modules = dict(self.model.named_modules())
            self._block_names = {modules[name]: name for name in self.blocks}
            self._handles.append(torch.nn.modules.module.register_module_forward_hook(self._on_block,
                                                                                      with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> Any:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._remove_backward_hooks()
        for stand_in in self._stand_ins:
            stand_in.__exit__(*exc)
        assert self.mode is not None
        result = self.mode.__exit__(*exc)
        self.mode = None
        self.mod_tracker.__exit__()
        return result

    def start_step(self) -> None:
        """The root module's forward starts (outside backward): a new step."""
        self.steps += 1
        self.active = True
        self._reset()
        self._remove_backward_hooks()

    def _remove_backward_hooks(self) -> None:
        """A hook on a parameter outlives its step: the next step's backward would count the kernel again."""
        for hook in self._backward_hooks:
            hook.remove()
        self._backward_hooks.clear()

    def step_begins(self) -> None:
        """Keep the counts as the optimizer step finds them."""
        self._at_step = ({module: dict(ops) for module, ops in self.flop_counts.items()},
                         {scope: list(costs) for scope, costs in self._by_scope.items()},
                         self.total_flops, self.total_bytes, self.seconds, self.compute_bound_seconds)

    def count_step_again(self) -> None:
        """Back to the counts kept when the optimizer step began: the next step runs its own on a copy
        of this forward and backward (memlint/simulate.py), and is counted in place of this one's."""
        assert self._at_step is not None
        flops, scopes, self.total_flops, self.total_bytes, self.seconds, self.compute_bound_seconds = self._at_step
        self.flop_counts.clear()
        for module, ops in flops.items():
            self.flop_counts[module].update(ops)
        self._by_scope = defaultdict(lambda: [0, 0], {scope: list(costs) for scope, costs in scopes.items()})

    def _on_block(self, module: torch.nn.Module, args: Any, kwargs: Any, _output: Any) -> None:
        name = self._block_names.get(module)
        if name is not None and not _is_bw():
            self.block_inputs[name] = _tensor_bytes((args, kwargs))

    # -- counting ------------------------------------------------------------------------------
    def _module_names(self, parents: frozenset[str]) -> tuple[str, ...]:
        names = self._names.get(parents)
        if names is None:
            prefix = self.root + "."
            names = self._names[parents] = tuple(
                "(model)" if parent == self.root else parent[len(prefix):]
                for parent in parents if parent == self.root or parent.startswith(prefix))
        return names

    def _totals(self, backward: bool | None) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for (parents, is_backward), (flops, nbytes) in self._by_scope.items():
            value = nbytes if backward is None else flops if is_backward == backward else 0
            if value:
                for name in self._module_names(parents):
                    totals[name] += value
        return totals

    @property
    def forward(self) -> dict[str, int]:
        return self._totals(False)

    @property
    def backward(self) -> dict[str, int]:
        return self._totals(True)

    @property
    def moved(self) -> dict[str, int]:
        return self._totals(None)

    def _add(self, flops: int, nbytes: int, dtype: torch.dtype | None, convolution: bool) -> None:
        scope = self._by_scope[(frozenset(self.mod_tracker.parents), _is_bw())]
        scope[0] += flops
        scope[1] += nbytes
        self.total_flops += flops
        self.total_bytes += nbytes
        if self.roofline.usable:
            seconds, compute_bound = self.roofline.seconds(flops, nbytes, dtype, convolution)
            self.seconds += seconds
            if compute_bound:
                self.compute_bound_seconds += seconds

    def _count_flops(self, func_packet: Any, out: Any, args: tuple, kwargs: dict) -> Any:
        """FlopCounterMode's own path (decomposed ops, higher-order operators)."""
        if self.active:
            mutates = getattr(func_packet, "__name__", "").endswith("_")
            self.count_op(func_packet, MUTATES if mutates else PRODUCES, ((0, "self"),) if mutates else (), out, args,
                          kwargs)
        return out

    def count_op(self, func_packet: Any, traffic: int, mutated: tuple[tuple[int, str], ...], out: Any, args: tuple,
                 kwargs: dict) -> None:
        flops = 0
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            for parent in set(self.mod_tracker.parents):
                self.flop_counts[parent][func_packet] += flops
        inputs = _collect(args, [])
        if kwargs:
            _collect(kwargs, inputs)
        dtype = next((t.dtype for t in inputs if t.is_floating_point()), None)
        if traffic == NO_TRAFFIC or traffic == VIEW:
            nbytes = 0
        elif traffic == MUTATES:  # reads its inputs, writes the arguments it mutates
            written = [args[i] if i < len(args) else kwargs.get(name) for i, name in mutated]
            nbytes = _tensor_bytes(inputs) + _tensor_bytes(written)
        else:
            outputs = _collect(out, [])  # none: a metadata query (prim.device, ...), which moves nothing
            nbytes = _tensor_bytes(inputs) + _tensor_bytes(outputs) if outputs else 0
        self._add(flops, nbytes, dtype, func_packet in _CONVOLUTIONS)

    def count_attention(self, args: tuple, kwargs: dict, out: Any) -> None:
        """PyTorch's formulas for the CUDA memory-efficient attention kernel, forward and backward."""
        if not self.active or not isinstance(out, torch.Tensor):
            return
        names = ("query", "key", "value")
        query, key, value = (args[i] if i < len(args) else kwargs[names[i]] for i in range(3))
        shapes = (query.shape, key.shape, value.shape)
        forward = self.flop_registry[aten._scaled_dot_product_efficient_attention](*shapes, out_val=out)
        moved = _tensor_bytes((query, key, value, out))
        self._count_kernel(aten._scaled_dot_product_efficient_attention, forward, moved, query.dtype)
        backward = self.flop_registry[aten._scaled_dot_product_efficient_attention_backward](
            out.shape, *shapes, out_val=None)
        # q, k, v, out and d(out) read; dq, dk, dv written.
        traffic = moved + _tensor_bytes(out) + _tensor_bytes((query, key, value))
        self._count_backward_later((query, key, value), aten._scaled_dot_product_efficient_attention_backward,
                                   backward, traffic, query.dtype)

    def count_recurrent(self, args: tuple, kwargs: dict, out: Any) -> None:
        """cuDNN's LSTM, GRU or RNN (FlopCounterMode has no formula for ``_cudnn_rnn``): its weight
        matrices' products (``_matrix_products``); the backward's data and weight passes each do as much
        again. Arguments as ``_gpu_rnn``'s."""
        if not self.active:
            return
        data, params, batch_first = args[1], args[3], args[9]
        steps, batch = (data.shape[1], data.shape[0]) if batch_first else data.shape[:2]
        forward = _matrix_products(steps * batch, [w for w in params if w.dim() == 2])
        moved = _tensor_bytes((data, *params, *(out if isinstance(out, tuple) else (out,))))
        self._count_kernel(aten._cudnn_rnn, forward, moved, data.dtype)
        self._count_backward_later((data, *params), aten._cudnn_rnn_backward, 2 * forward, 2 * moved, data.dtype)

    def _count_kernel(self, op: Any, flops: int, nbytes: int, dtype: torch.dtype) -> None:
        """A stand-in's kernel: its costs, attributed to the modules running it."""
        self._add(flops, nbytes, dtype, False)
        for parent in set(self.mod_tracker.parents):
            self.flop_counts[parent][op] += flops

    def _count_backward_later(self, inputs: tuple, op: Any, flops: int, nbytes: int, dtype: torch.dtype) -> None:
        """A stand-in's backward, counted when the first gradient of its inputs exists: it has just run.
        None for a recomputed output's own graph, which never runs backward."""
        needing = [t for t in inputs if t.requires_grad]
        if needing and not _is_bw():
            self._backward_hooks.append(register_multi_grad_hook(
                needing, lambda _grad: self._count_kernel(op, flops, nbytes, dtype), mode="any"))


def annotate(report: "ModelReport", counter: StepCounter, result: "SimulationResult", *, data_parallel: int = 1,
             epoch_size: int | None = None, checkpointed: bool = False) -> None:
    """Fill the report's FLOPs, bytes, step and epoch times and the per-block checkpointing estimate."""
    forward, backward, moved = counter.forward, counter.backward, counter.moved  # each a pass over the scopes
    for layer in report.layers:
        layer.flops_forward = forward.get(layer.name, 0)
        layer.flops_backward = backward.get(layer.name, 0)
        layer.bytes_moved = moved.get(layer.name, 0)
    if not counter.steps:  # the model's forward never ran: nothing counted
        return
    report.flops_per_step = counter.total_flops
    report.bytes_per_step = counter.total_bytes
    if counter.roofline.usable:
        report.step_time_s = counter.seconds
        report.compute_notes = counter.roofline.notes()
        if counter.seconds:
            report.compute_notes.append(f"{counter.compute_bound_seconds / counter.seconds:.0%} of that time is "
                                        "bound by compute, the rest by memory bandwidth")
        if epoch_size:
            steps = math.ceil(epoch_size / (report.batch_size * max(1, data_parallel)))
            report.epoch_time_s = steps * counter.seconds
    else:
        report.compute_notes = [f"{report.target} publishes no fp32 rate or memory bandwidth: no time estimate"]
    if report.mode == "train" and not checkpointed:
        report.checkpoint_blocks = checkpoint_savings(counter.blocks, result.activation_bytes_by_module,
                                                      counter.block_inputs)


def checkpoint_savings(blocks: list[str], saved_by_module: dict[str, int], inputs: dict[str, int]) -> list[dict]:
    """Per block: what it saves for backward, and what checkpointing it would save.

    Checkpointing a block keeps only its input and recomputes the rest in backward, so the
    estimate is the activation bytes of the block (and its children) minus the input it keeps.
    """
    rows = []
    for name in blocks:
        saved = sum(size for owner, size in saved_by_module.items() if owner == name or owner.startswith(name + "."))
        kept = inputs.get(name, 0)
        rows.append({"name": name, "activation_bytes": saved, "input_bytes": kept, "saves_bytes": max(0, saved - kept)})
    return rows
