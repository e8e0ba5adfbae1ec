"""The rule interface: one context in, diagnostics out.

Static rules (``needs_model = False``) read only the parsed source and never import torch or
the user's code. Model rules read ``ctx.model``, the traced and simulated report.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, ClassVar, Iterable, Iterator

from memlint.diagnostics import Diagnostic, Severity

if TYPE_CHECKING:
    import libcst as cst
    from libcst.metadata import MetadataWrapper

    from memlint.report import ModelReport
    from memlint.settings import Settings
    from memlint.targets import Target


@dataclass
class RuleContext:
    """What a rule may look at for one file: its source, and when analysed, its model and target."""

    path: str
    source: str
    settings: "Settings"
    target: "Target | None" = None
    model: "ModelReport | None" = None
    extras: dict[str, object] = field(default_factory=dict)

    @cached_property
    def wrapper(self) -> "MetadataWrapper":
        """The libcst tree with position metadata, parsed once per file and shared by all rules."""
        import libcst as cst
        from libcst.metadata import MetadataWrapper

        # The tree is ours alone (parsed here), so skip the defensive deep copy: a third of the
        # time of linting a large tree went to it.
        return MetadataWrapper(cst.parse_module(self.source), unsafe_skip_copy=True)

    @property
    def module(self) -> "cst.Module":
        return self.wrapper.module

    @cached_property
    def lines(self) -> list[str]:
        return self.source.splitlines()

    def diagnostic(self, rule: "Rule", line: int, column: int, message: str, *,
                   severity: Severity | None = None, fix: str | None = None) -> Diagnostic:
        return Diagnostic(path=self.path, line=line, column=column, code=rule.code,
                          severity=severity or rule.severity, message=message,
                          fix=rule.fix if fix is None else fix)


class Rule:
    """Base class of every rule.

    Class attributes document the rule the way ``ruff rule`` does; ``VALID``/``INVALID`` are
    source snippets the test suite runs (INVALID ones must produce this rule's code). A model
    rule's examples are model files, run through the real pipeline; one may start with a
    ``# memlint check --target h200 --batch-size 8`` line giving the options it needs.

    ``also_model``: a static rule that the engine calls again for every analysed model (with
    ``ctx.model`` and that analysis's target set), so that it can judge with the trace too; for a
    file whose analysis succeeded, those findings replace the rule's static ones for that file.
    ``once_per_run``: the finding is about the run (the target, the configuration), not a file;
    the engine keeps the first of identical messages.
    """

    code: ClassVar[str]
    name: ClassVar[str]
    summary: ClassVar[str]
    what: ClassVar[str]
    why: ClassVar[str]
    example: ClassVar[str]
    instead: ClassVar[str]
    fix: ClassVar[str] = ""
    severity: ClassVar[Severity] = Severity.WARNING
    needs_model: ClassVar[bool] = False
    also_model: ClassVar[bool] = False
    once_per_run: ClassVar[bool] = False
    VALID: ClassVar[tuple[str, ...]] = ()
    INVALID: ClassVar[tuple[str, ...]] = ()

    def check(self, ctx: RuleContext) -> Iterable[Diagnostic]:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def explain(cls) -> str:
        """The ``memlint rule CODE`` text: what it does, why it matters, an example, what to use instead."""
        return (
            f"# {cls.name} ({cls.code})\n\n{cls.summary}\n\n"
            f"## What it does\n{cls.what.strip()}\n\n## Why is this bad?\n{cls.why.strip()}\n\n"
            f"## Example\n```python\n{cls.example.strip()}\n```\n\n"
            f"## Use instead\n```python\n{cls.instead.strip()}\n```\n"
        )


def _rule_modules() -> Iterator[str]:
    import memlint.rules as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "base" and not info.name.startswith("_"):
            yield f"memlint.rules.{info.name}"


@lru_cache(maxsize=1)
def all_rules() -> tuple[type[Rule], ...]:
    """Every rule class, sorted by code. Importing rule modules must stay torch-free."""
    found: list[type[Rule]] = []
    for module_name in _rule_modules():
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Rule) and value is not Rule and value.__module__ == module_name:
                found.append(value)
    return tuple(sorted(found, key=lambda rule: rule.code))


def get_rule(code: str) -> type[Rule] | None:
    return next((rule for rule in all_rules() if rule.code == code.upper()), None)
