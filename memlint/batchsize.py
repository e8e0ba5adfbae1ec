"""Find where the batch size is written in the user's code, so MEM001 can point at it.

Looks for a ``batch_size=<int>`` literal in a ``DataLoader(...)`` call, then an argparse
``add_argument("--batch-size", default=<int>)``. Static (libcst), no import of the code.
"""
from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider


@dataclass(frozen=True)
class BatchSizeSite:
    value: int
    line: int
    column: int
    how: str


def _int_value(node: cst.BaseExpression) -> int | None:
    if isinstance(node, cst.Integer):
        try:
            return int(node.evaluated_value)
        except ValueError:
            return None
    return None


class _Finder(cst.CSTVisitor):
    METADATA_DEPENDENCIES = (PositionProvider,)

    def __init__(self) -> None:
        self.sites: list[BatchSizeSite] = []

    def visit_Call(self, node: cst.Call) -> None:
        name = _callee_name(node.func)
        if name == "DataLoader":
            for arg in node.args:
                if arg.keyword is not None and arg.keyword.value == "batch_size":
                    self._add(arg.value, "DataLoader(batch_size=...)")
        elif name == "add_argument" and node.args and isinstance(node.args[0].value, cst.SimpleString):
            flag = node.args[0].value.evaluated_value  # type: ignore[union-attr]
            if isinstance(flag, str) and flag.lstrip("-").replace("-", "_") in ("batch_size", "bs", "batch"):
                for arg in node.args:
                    if arg.keyword is not None and arg.keyword.value == "default":
                        self._add(arg.value, f"argparse default of {flag}")

    def _add(self, value: cst.BaseExpression, how: str) -> None:
        number = _int_value(value)
        if number is not None and number > 0:
            position = self.get_metadata(PositionProvider, value).start
            self.sites.append(BatchSizeSite(number, position.line, position.column + 1, how))


def _callee_name(func: cst.BaseExpression) -> str | None:
    if isinstance(func, cst.Name):
        return func.value
    if isinstance(func, cst.Attribute):
        return func.attr.value
    return None


def find_batch_size(wrapper: MetadataWrapper) -> BatchSizeSite | None:
    """The first DataLoader literal, else the first argparse default, else None."""
    finder = _Finder()
    wrapper.visit(finder)
    loaders = [s for s in finder.sites if s.how.startswith("DataLoader")]
    return (loaders or finder.sites or [None])[0]
