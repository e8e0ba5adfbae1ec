"""The target-device database: what memory, precisions and throughput a device offers.

The data lives in ``memlint/data/targets.toml``; users add their own devices under
``[tool.memlint.targets.NAME]`` in pyproject.toml with the same keys.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping

from memlint.errors import ConfigError, UsageError
from memlint.tomlreader import load_toml_text
from memlint.units import parse_bytes

KINDS = ("gpu", "cpu", "unified")
DTYPES = ("fp64", "fp32", "tf32", "fp16", "bf16", "fp8")


@dataclass(frozen=True)
class Target:
    """A device memlint can judge a training step against.

    ``context_bytes`` is what the card (or the OS, for CPU hosts) takes before PyTorch
    allocates anything: the CUDA context, or the 1 to 1.5 GB an OS keeps. ``workspace_bytes``
    is what cuBLAS/cuDNN load on first use, which no ``torch.cuda`` counter shows.
    """

    name: str
    description: str
    kind: str
    memory_bytes: int
    compute_capability: str | None = None
    native_dtypes: frozenset[str] = frozenset({"fp32"})
    peak_flops: Mapping[str, float] = field(default_factory=dict)
    memory_bandwidth: float = 0.0
    context_bytes: int = 0
    workspace_bytes: int = 0
    cores: int | None = None
    pytorch_supported: bool = True
    bare: bool = False

    def budget_bytes(self, threshold: float) -> int:
        """The share of memory a plan may use; the peak judged against it includes context and workspace."""
        return int(self.memory_bytes * threshold)

    def with_memory(self, memory_bytes: int) -> "Target":
        return replace(self, memory_bytes=memory_bytes)

    @property
    def capability(self) -> tuple[int, int] | None:
        if not self.compute_capability:
            return None
        major, _, minor = self.compute_capability.partition(".")
        return int(major), int(minor or 0)


def _target_from_table(name: str, table: Mapping[str, Any], origin: str) -> Target:
    known = {
        "description", "kind", "memory", "compute_capability", "native_dtypes", "peak_tflops",
        "memory_bandwidth_gbs", "context", "workspace", "cores", "pytorch_supported",
    }
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"target {name!r} in {origin} has unknown keys: {', '.join(sorted(unknown))}",
                          hint=f"allowed keys: {', '.join(sorted(known))}")
    try:
        kind = str(table.get("kind", "gpu"))
        if kind not in KINDS:
            raise ConfigError(f"target {name!r} in {origin}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
        memory = table.get("memory")
        if memory is None:
            raise ConfigError(f"target {name!r} in {origin} needs a memory size, e.g. memory = \"8GiB\"")
        dtypes = table.get("native_dtypes", ["fp32"])
        if isinstance(dtypes, str) or not isinstance(dtypes, (list, tuple)):
            raise ConfigError(f"target {name!r} in {origin}: native_dtypes must be a list, e.g. [\"fp32\", \"fp16\"]")
        bad = sorted({str(d) for d in dtypes} - set(DTYPES))
        if bad:
            raise ConfigError(f"target {name!r} in {origin}: unknown native_dtypes {', '.join(bad)}",
                              hint=f"allowed: {', '.join(DTYPES)}")
        supported = table.get("pytorch_supported", True)
        if not isinstance(supported, bool):
            raise ConfigError(f"target {name!r} in {origin}: pytorch_supported must be true or false, not {supported!r}")
        return Target(
            name=name,
            description=str(table.get("description", name)),
            kind=kind,
            memory_bytes=parse_bytes(str(memory)),
            compute_capability=str(table["compute_capability"]) if "compute_capability" in table else None,
            native_dtypes=frozenset(str(d) for d in dtypes),
            peak_flops={str(k): float(v) * 1e12 for k, v in dict(table.get("peak_tflops", {})).items()},
            memory_bandwidth=float(table.get("memory_bandwidth_gbs", 0.0)) * 1e9,
            context_bytes=parse_bytes(str(table.get("context", "0"))),
            workspace_bytes=parse_bytes(str(table.get("workspace", "0"))),
            cores=int(table["cores"]) if "cores" in table else None,
            pytorch_supported=supported,
        )
    except UsageError as exc:
        raise ConfigError(f"target {name!r} in {origin}: {exc.message}", hint=exc.hint) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"target {name!r} in {origin}: {exc}") from None


@lru_cache(maxsize=1)
def builtin_targets() -> dict[str, Target]:
    text = resources.files("memlint").joinpath("data/targets.toml").read_text(encoding="utf-8")
    data = load_toml_text(text, "memlint/data/targets.toml")
    return {name: _target_from_table(name, table, "memlint's target database") for name, table in data.items()}


def all_targets(user_tables: Mapping[str, Mapping[str, Any]] | None = None, origin: str = "pyproject.toml") -> dict[str, Target]:
    targets = dict(builtin_targets())
    for name, table in (user_tables or {}).items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"[tool.memlint.targets.{name}] in {origin} must be a table")
        targets[name] = _target_from_table(name, table, origin)
    return targets


def resolve_target(spec: str, user_tables: Mapping[str, Mapping[str, Any]] | None = None) -> Target:
    """Turn ``gtx1050ti``, ``cpu:8GiB``, ``h100-80gb:40GiB`` or ``mem:4GiB`` into a Target.

    ``mem:SIZE`` is a bare capacity: no context, no workspace, nothing but the bytes.
    """
    name, _, size = spec.strip().partition(":")
    name = name.lower()
    if name == "mem":
        if not size:
            raise UsageError("the bare target needs a size", hint="write --target mem:4GiB")
        return Target(name=spec, description=f"bare capacity of {size}", kind="gpu",
                      memory_bytes=parse_bytes(size), native_dtypes=frozenset({"fp32", "fp16", "bf16"}), bare=True)
    # Names match case-insensitively: `name` is lowered above, and a user table may be [...targets.MyCard].
    targets = {key.lower(): target for key, target in all_targets(user_tables).items()}
    if name not in targets:
        close = difflib.get_close_matches(name, targets, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UsageError(f"unknown target {name!r}",
                         hint=f"{hint}`memlint targets` lists them; `mem:4GiB` is a bare capacity")
    target = targets[name]
    if size:
        target = target.with_memory(parse_bytes(size))
    elif target.memory_bytes == 0:
        raise UsageError(f"target {name!r} is a host whose RAM you must give", hint=f"write --target {name}:64GiB")
    return target
