"""TOML reading with tomllib (3.11+) or tomli, turning syntax errors into ConfigError."""
from __future__ import annotations

import re
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
        match = re.search(r"\s*\(at line (\d+), column (\d+)\)\s*$", str(exc))
        reason = str(exc)[:match.start()] if match else str(exc)
        raise ConfigError(f"not valid TOML: {reason}{f' (column {match.group(2)})' if match else ''}", path=origin,
                          line=int(match.group(1)) if match else None,
                          hint="fix the syntax (memlint reads it with Python's tomllib); `python -c \"import "
                               "tomllib; tomllib.load(open('pyproject.toml', 'rb'))\"` shows the same error") from None
