"""Trace the model's forward into a torch.fx graph whose nodes carry module, op, shapes and dtypes.

``torch.fx.symbolic_trace`` first (module-level nodes, readable); where it cannot follow the
model (data-dependent control flow, as in most transformers models) ``make_fx`` over the fake
tensors, which records aten ops with their ``nn_module_stack``. Either way shapes come from
running the graph on fake tensors, never real data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils._pytree import tree_flatten

from memlint.report import GraphNode

CONV_OPS = {torch.ops.aten.convolution.default}
FUNCTIONAL_CONVS = {torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d}
FACTORY_OPS = {"empty", "zeros", "ones", "full", "arange", "linspace", "rand", "randn", "randint", "eye", "tensor",
               "scalar_tensor", "empty_strided"}


@dataclass
class TraceResult:
    tracer: str
    nodes: list[GraphNode]
    module_outputs: dict[str, list[list[int]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """Tensors inside any output: tuples, dicts, dataclass-like ``ModelOutput`` objects."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        return []
    return [leaf for item in items for leaf in tensor_leaves(item)]


def _shapes(value: Any) -> tuple[list[list[int]], list[str]]:
    shapes, dtypes = [], []
    for leaf in tree_flatten(value)[0]:
        if isinstance(leaf, torch.Tensor):
            shapes.append([int(d) for d in leaf.shape])
            dtypes.append(str(leaf.dtype).removeprefix("torch."))
    return shapes, dtypes


def trace_model(model: torch.nn.Module, make_inputs: Callable[[], tuple[tuple, dict]], fake_mode: Any,
                sites: dict[str, str], scalar_mode: Any) -> TraceResult:
    """Trace with symbolic_trace, falling back to make_fx; ``scalar_mode`` answers ``.item()``.

    In eval mode: a forward in training mode changes a model's state (I-BERT's quantisers replace
    their min/max buffers), and the simulated step must find the model as the user built it.
    """
    model.eval()
    with fake_mode, scalar_mode:  # the values of inputs made from data (torch.tensor) are known to it
        args, kwargs = make_inputs()
    try:
        return _symbolic(model, args, kwargs, fake_mode, sites)
    except Exception as exc:  # symbolic_trace refuses much real-world code; that is expected
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
    try:
        result = _make_fx(model, args, kwargs, fake_mode, sites, scalar_mode)
    except Exception as exc:  # the estimate does not need the graph: go on without it, and say so
        failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
        return TraceResult("none", [], notes=[f"the model could not be traced ({reason}; make_fx: {failure}); "
                                              "the estimate is unaffected, graph-based rules were skipped"])
    result.notes.append(f"torch.fx.symbolic_trace could not trace the model ({reason}); used make_fx")
    return result


def _symbolic(model: torch.nn.Module, args: tuple, kwargs: dict, fake_mode: Any,
              sites: dict[str, str]) -> TraceResult:
    if kwargs:
        raise TypeError("keyword inputs")
    graph_module = torch.fx.symbolic_trace(model)
    with fake_mode:
        FakeTensorProp(graph_module, mode=fake_mode).propagate(*args)
    modules = dict(model.named_modules())
    nodes, outputs = [], {}
    for node in graph_module.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        shapes, dtypes = _shapes(node.meta.get("val"))
        module_name = node.target if node.op == "call_module" else None
        module = modules.get(module_name) if module_name else None
        attributes = _module_attributes(module, node) if module is not None else _function_attributes(node)
        if module_name:
            outputs[module_name] = shapes
        nodes.append(GraphNode(op=node.op, target=_target_name(node), module=module_name,
                               module_type=type(module).__name__ if module is not None else None,
                               output_shapes=shapes, output_dtypes=dtypes, attributes=attributes,
                               source=sites.get(module_name) if module_name else None))
    return TraceResult("torch.fx.symbolic_trace", nodes, outputs)


def _make_fx(model: torch.nn.Module, args: tuple, kwargs: dict, fake_mode: Any, sites: dict[str, str],
             scalar_mode: Any) -> TraceResult:
    def forward(*flat_args: Any) -> list[torch.Tensor]:
        # Only tensors can be graph outputs; caches and other objects in the output are dropped.
        output = model(*flat_args[: len(args)], **dict(zip(kwargs, flat_args[len(args):])))
        return tensor_leaves(output)

    with fake_mode, scalar_mode, torch.no_grad():
        graph_module = make_fx(forward, tracing_mode="real", record_module_stack=True,
                               _error_on_data_dependent_ops=False)(*args, *kwargs.values())
    modules = dict(model.named_modules())
    nodes: list[GraphNode] = []
    outputs: dict[str, list[list[int]]] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        shapes, dtypes = _shapes(node.meta.get("val"))
        stack = node.meta.get("nn_module_stack") or {}
        module_name = _module_path(list(stack.values())[-1][0]) if stack else None
        module = modules.get(module_name) if module_name is not None else None
        attributes = _function_attributes(node)
        if module_name is not None and shapes:
            outputs[module_name] = shapes  # last op of the module is its output
        nodes.append(GraphNode(op="call_function", target=_target_name(node), module=module_name,
                               module_type=type(module).__name__ if module is not None else None,
                               output_shapes=shapes, output_dtypes=dtypes, attributes=attributes,
                               source=sites.get(module_name) if module_name is not None else None))
    return TraceResult("make_fx", nodes, outputs)


def _module_path(stack_key: str) -> str:
    """``L['self'].features[0]`` / ``L__self___features_0`` styles to ``features.0``."""
    text = stack_key
    for prefix in ("L['self'].", "L['self']", "self."):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text.replace("[", ".").replace("]", "").replace("'", "").strip(".")


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


def _input_shape(node: torch.fx.Node) -> list[int] | None:
    first = node.args[0] if node.args else None
    value = first.meta.get("val") if isinstance(first, torch.fx.Node) else None
    return [int(d) for d in value.shape] if isinstance(value, torch.Tensor) else None


def _module_attributes(module: torch.nn.Module, node: torch.fx.Node) -> dict[str, Any]:
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return {"kind": "conv", "input_shape": _input_shape(node), "weight_shape": list(module.weight.shape),
                "stride": list(module.stride), "padding": _padding(module.padding),
                "dilation": list(module.dilation), "groups": module.groups, "transposed": module.transposed,
                "dtype": str(module.weight.dtype).removeprefix("torch.")}
    return {}


def _padding(padding: Any) -> Any:
    return padding if isinstance(padding, str) else list(padding)


def _functional_conv_attributes(node: torch.fx.Node) -> dict[str, Any]:
    """``F.conv1d/2d/3d(input, weight, bias, stride, padding, dilation, groups)`` called directly in a
    symbolically traced forward (an aten ``convolution`` under make_fx is handled below)."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    values = {**dict(zip(names, node.args)), **node.kwargs}
    weight = values.get("weight")
    value = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return {}
    spatial = value.dim() - 2

    def expand(item: Any, default: int) -> list[int]:
        item = default if item is None else item
        return [int(item)] * spatial if isinstance(item, int) else [int(v) for v in item]

    padding = values.get("padding", 0)
    return {"kind": "conv", "input_shape": _input_shape(node), "weight_shape": [int(d) for d in value.shape],
            "stride": expand(values.get("stride"), 1),
            "padding": padding if isinstance(padding, str) else expand(padding, 0),
            "dilation": expand(values.get("dilation"), 1), "groups": int(values.get("groups", 1) or 1),
            "transposed": False, "dtype": str(value.dtype).removeprefix("torch.")}


def _function_attributes(node: torch.fx.Node) -> dict[str, Any]:
    target = node.target
    if target in FUNCTIONAL_CONVS:
        try:
            return _functional_conv_attributes(node)
        except (TypeError, ValueError):  # symbolic sizes or odd arguments: no attributes, as before
            return {}
    if target in CONV_OPS:
        _, weight, _, stride, padding, dilation, transposed, _, groups = node.args
        return {"kind": "conv", "input_shape": _input_shape(node),
                "weight_shape": [int(d) for d in weight.meta["val"].shape], "stride": list(stride),
                "padding": list(padding), "dilation": list(dilation), "groups": int(groups),
                "transposed": bool(transposed), "dtype": str(weight.meta["val"].dtype).removeprefix("torch.")}
    name = _target_name(node).split(".")[0]
    if name in FACTORY_OPS:
        return {"kind": "factory", "device_given": "device" in node.kwargs}
    return {}
