"""What an analysis found about one model: the JSON contract (version 1) that reporters and rules read.

Plain data only, no torch: reporters and static tooling import it cheaply.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

BREAKDOWN_KEYS = (
    "parameters", "buffers", "gradients", "optimizer_state", "activations",
    "inputs", "temporaries", "workspace", "context",
)
JSON_VERSION = 1


@dataclass
class LayerReport:
    """One module of the model: what it holds and what it saves for backward."""

    name: str
    type: str
    output_shape: list[Any] | None
    parameter_bytes: int
    activation_bytes: int
    source: str | None
    depth: int = 0
    flops_forward: int = 0
    flops_backward: int = 0
    bytes_moved: int = 0  # bytes its ops read and wrote in one step (memlint/compute.py)


@dataclass
class GraphNode:
    """A traced op with the facts rules need (shapes, dtypes, where it came from)."""

    op: str
    target: str
    module: str | None
    module_type: str | None
    output_shapes: list[list[int]]
    output_dtypes: list[str]
    attributes: dict[str, Any] = field(default_factory=dict)
    source: str | None = None


@dataclass
class TimelinePoint:
    """Live allocated bytes per category after one simulated op (for plots and the peak)."""

    index: int
    phase: str
    op: str
    module: str | None
    categories: dict[str, int]


@dataclass
class ModelReport:
    path: str
    name: str
    target: str
    capacity_bytes: int
    threshold: float
    batch_size: int
    mode: str
    optimizer: str
    precision: str
    peak_allocated_bytes: int
    peak_device_bytes: int
    max_batch_size: int | None
    tracer: str
    breakdown: dict[str, int]
    layers: list[LayerReport]
    line: int = 1
    budget_bytes: int = 0
    peak_phase: str = ""
    assumptions: list[str] = field(default_factory=list)
    graph: list[GraphNode] = field(default_factory=list)
    timeline: list[TimelinePoint] = field(default_factory=list)
    batch_size_source: str | None = None
    overhead_bytes: int = 0  # CUDA context + library workspaces: what a card loses at any batch size
    cublas_workspace_bytes: int = 0  # in peak_allocated_bytes: allocated once per process, per thread
    # Compute and scale (memlint/compute.py, memlint/distributed.py): FLOPs and bytes of one step, its
    # roofline lower-bound time on the target, the strategy the peak is per device of, and what
    # checkpointing each top-level block would save.
    flops_per_step: int | None = None
    bytes_per_step: int | None = None
    step_time_s: float | None = None
    epoch_time_s: float | None = None
    compute_notes: list[str] = field(default_factory=list)
    strategy: str = "none"
    devices: int = 1
    checkpoint_layers: bool = False
    checkpoint_blocks: list[dict[str, Any]] = field(default_factory=list)
    # Parameter bytes per dtype as the model was built ({"float32": ...}; after a --precision bf16/fp16
    # cast): the precision rules read it.
    parameter_dtypes: dict[str, int] = field(default_factory=dict)

    def to_json(self, *, full: bool = False) -> dict[str, Any]:
        """The stable contract; ``full`` adds the graph and timeline used by rules and reports."""
        data = asdict(self)
        if not full:
            for key in ("graph", "timeline"):
                data.pop(key)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelReport":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["layers"] = [LayerReport(**layer) for layer in data.get("layers", [])]
        values["graph"] = [GraphNode(**node) for node in data.get("graph", [])]
        values["timeline"] = [TimelinePoint(**point) for point in data.get("timeline", [])]
        return cls(**values)
