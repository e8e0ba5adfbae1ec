"""Settings: ``[tool.memlint]`` from the nearest pyproject.toml, overridden by the command line."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from memlint.errors import ConfigError
from memlint.tomlreader import load_toml_text

OPTIMIZERS = ("sgd", "sgd-momentum", "adam", "adamw", "none")
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16", "fp16")
MODES = ("train", "infer")
INPUT_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32")
STRATEGIES = ("none", "ddp", "fsdp", "zero1", "zero2", "zero3")


@dataclass(frozen=True)
class Settings:
    """Everything that shapes one run. Defaults are what a user gets with no configuration."""

    targets: tuple[str, ...] = ("gtx1050ti",)
    batch_size: int | None = None
    input_shape: tuple[int, ...] | None = None
    input_dtype: str = "float32"
    optimizer: str | None = None
    precision: str = "fp32"
    mode: str = "train"
    threshold: float = 0.8
    select: tuple[str, ...] = ("ALL",)
    ignore: tuple[str, ...] = ()
    per_file_ignores: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    models: tuple[str, ...] = ()
    model: str | None = None
    timeout: float = 60.0
    memory_limit: str | None = None
    depth: int = 3
    strategy: str = "none"
    devices: int = 1
    epoch_size: int | None = None
    checkpoint_layers: bool = False
    no_import: bool = False
    cache: bool = True
    user_targets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    config_path: str | None = None

    def merged(self, **overrides: Any) -> "Settings":
        """A copy where every override that is not None wins."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def parse_shape(text: str | list[int] | tuple[int, ...], origin: str = "--input-shape") -> tuple[int, ...]:
    """``3,224,224`` or ``[3, 224, 224]`` to a tuple of positive ints (the batch dimension is added later)."""
    parts = text if isinstance(text, (list, tuple)) else [p for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: cannot read {text!r} as a shape", hint="write it like 3,224,224 (per sample)") from None
    if not shape or any(d <= 0 for d in shape):
        raise ConfigError(f"{origin}: a shape needs positive sizes, got {text!r}", hint="write it like 3,224,224")
    return shape


def find_pyproject(start: Path) -> Path | None:
    """The nearest pyproject.toml at or above ``start`` that has a [tool.memlint] table, else the nearest one."""
    start = start.resolve()
    directory = start if start.is_dir() else start.parent
    nearest = None
    for folder in (directory, *directory.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            nearest = nearest or candidate
            try:
                if "[tool.memlint" in candidate.read_text(encoding="utf-8", errors="replace"):
                    return candidate
            except OSError:
                continue
    return nearest


_TYPES: dict[str, tuple[type, ...]] = {
    "target": (str,), "targets": (list,), "batch-size": (int,), "input-shape": (list, str),
    "input-dtype": (str,), "optimizer": (str,), "precision": (str,), "mode": (str,),
    "threshold": (float, int), "select": (list,), "ignore": (list,), "per-file-ignores": (dict,),
    "models": (list,), "timeout": (float, int), "memory-limit": (str,), "depth": (int,),
    "strategy": (str,), "devices": (int,), "epoch-size": (int,), "checkpoint-layers": (bool,),
    "cache": (bool,),
}
_CHOICES = {"optimizer": OPTIMIZERS, "precision": PRECISIONS, "mode": MODES, "input-dtype": INPUT_DTYPES,
            "strategy": STRATEGIES}


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table",
               bool: "a boolean"}
_EXAMPLES = {"target": '"gtx1050ti"', "targets": '["gtx1050ti", "a100-80gb"]', "batch-size": "128",
             "input-shape": "[3, 224, 224]", "input-dtype": '"float32"', "optimizer": '"adam"', "precision": '"fp32"',
             "mode": '"train"', "threshold": "0.8", "select": '["ALL"]', "ignore": '["DEV004"]',
             "per-file-ignores": '{ "tests/*" = ["DEV"] }', "models": '["models/*.py"]', "timeout": "120",
             "memory-limit": '"8GiB"', "depth": "3", "devices": "8", "epoch-size": "50000",
             "checkpoint-layers": "true", "cache": "false"}


def _key_line(text: str, key: str) -> int | None:
    """The line of ``key = ...`` in the file's [tool.memlint] table (for messages); None when not found."""
    inside = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("["):
            inside = line.replace(" ", "").startswith("[tool.memlint")
            if key == "memlint" and inside:
                return number
            continue
        if inside and re.match(rf'["\']?{re.escape(key)}["\']?\s*=', line):
            return number
    return None


def load_settings(pyproject: Path | None) -> Settings:
    """Read ``[tool.memlint]``; every wrong key or type is a ConfigError naming the file."""
    if pyproject is None:
        return Settings()
    origin = str(pyproject)
    try:
        text = pyproject.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {origin}: {exc}", path=origin) from None
    tool = load_toml_text(text, origin).get("tool", {})
    table = tool.get("memlint", {}) if isinstance(tool, dict) else {}
    if not isinstance(table, dict):
        raise ConfigError("[tool.memlint] must be a table", path=origin, line=_key_line(text, "memlint"))
    user_targets = table.pop("targets", None) if isinstance(table.get("targets"), dict) else None
    values: dict[str, Any] = {}
    for key, value in table.items():
        line = _key_line(text, key)
        if key not in _TYPES:
            raise ConfigError(f"unknown key {key!r} in [tool.memlint]", path=origin, line=line,
                              hint=f"known keys: {', '.join(sorted(_TYPES))}")
        if (isinstance(value, bool) and bool not in _TYPES[key]) or not isinstance(value, _TYPES[key]):
            wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in _TYPES[key])
            raise ConfigError(f"[tool.memlint] {key} must be {wanted}, not {_TYPE_NAMES.get(type(value), type(value).__name__)} "
                              f"({value!r})", path=origin, line=line,
                              hint=f"for example: {key} = {_EXAMPLES.get(key, '...')}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"[tool.memlint] {key} = {value!r} is not one of {', '.join(_CHOICES[key])}", path=origin,
                              line=line)
        if key in ("timeout", "batch-size", "devices", "epoch-size") and value <= 0:
            raise ConfigError(f"[tool.memlint] {key} must be positive, not {value}", path=origin, line=line,
                              hint=f"for example: {key} = {_EXAMPLES.get(key, '1')}")
        values[key] = value
    return Settings(**_settings_kwargs(values, origin), user_targets=user_targets or {}, config_path=origin)


def _settings_kwargs(values: dict[str, Any], origin: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    names = {f.name for f in fields(Settings)}
    for key, value in values.items():
        name = key.replace("-", "_")
        if key == "target":
            kwargs["targets"] = (value,)
        elif key == "input-shape":
            kwargs["input_shape"] = parse_shape(value, f"[tool.memlint] input-shape in {origin}")
        elif key == "per-file-ignores":
            kwargs["per_file_ignores"] = {str(k): tuple(_str_list(v, key, origin)) for k, v in value.items()}
        elif key in ("targets", "select", "ignore", "models"):
            kwargs[name] = tuple(_str_list(value, key, origin))
        elif key == "threshold":
            if not 0 < float(value) <= 1:
                raise ConfigError(f"[tool.memlint] threshold must be in (0, 1], not {value}", path=origin)
            kwargs[name] = float(value)
        elif name in names:
            kwargs[name] = value
    return kwargs


def _str_list(value: Any, key: str, origin: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"[tool.memlint] {key} must be a list of strings", path=origin)
    return value
