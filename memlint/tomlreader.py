"""TOML reading with tomllib (3.11+) or tomli, turning syntax errors into ConfigError."""
from __future__ import annotations

import sys
from typing import Any

from memlint.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


def load_toml_text(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin} is not valid TOML: {exc}", path=origin,
                          hint="fix the syntax; `python -c \"import tomllib\"` reads the same format") from None
