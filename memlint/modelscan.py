"""Does a file define a model? A static look (libcst, no import), to decide what to analyse.

``memlint check a.py b.py`` (and the pre-commit hook, which names every changed file) lints
every named file, but imports and analyses only those that define something to analyse, so a
changed test helper or script is never executed. A file defines a model when, at module level,
it has:

- a ``build_model`` function, or the name given with ``--model`` (defined or imported), or
- a class whose base is named like a PyTorch module (``nn.Module``, ``torch.nn.Module``,
  ``Module``, ``LightningModule``, ``PreTrainedModel``, ``nn.Sequential``, ...: a last
  name component ending in ``Module``, ``Model`` or ``Sequential``), or one of the file's
  own classes that does.

A model class deriving from a base imported from elsewhere under another name is not seen:
list the file under ``models`` in ``[tool.memlint]`` (configured files are always analysed),
or pass ``--model NAME``.
"""
from __future__ import annotations

import libcst as cst

_MODULE_SUFFIXES = ("Module", "Model", "Sequential")


def _last_name(node: cst.BaseExpression) -> str | None:
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        return node.attr.value
    if isinstance(node, cst.Subscript):  # Generic[...]-style bases
        return _last_name(node.value)
    if isinstance(node, cst.Call):  # a base built by a call: look at what is called
        return _last_name(node.func)
    return None


def _statements(module: cst.Module):
    """Module-level statements, looking into ``if``/``try`` blocks (guarded imports, feature checks)."""
    def walk(statements):
        for statement in statements:
            yield statement
            if isinstance(statement, (cst.If, cst.Try, cst.Else, cst.Finally, cst.ExceptHandler)):
                yield from walk(statement.body.body)
            if isinstance(statement, cst.If) and statement.orelse is not None:
                yield from walk([statement.orelse])
            if isinstance(statement, cst.Try):
                yield from walk([*statement.handlers, *(b for b in (statement.orelse, statement.finalbody) if b)])

    yield from walk(module.body)


def _defined_names(statement: cst.CSTNode) -> set[str]:
    names: set[str] = set()
    if isinstance(statement, (cst.FunctionDef, cst.ClassDef)):
        names.add(statement.name.value)
    elif isinstance(statement, cst.SimpleStatementLine):
        for small in statement.body:
            if isinstance(small, (cst.Import, cst.ImportFrom)) and not isinstance(small.names, cst.ImportStar):
                for alias in small.names:
                    bound = alias.asname.name if alias.asname else alias.name
                    if isinstance(bound, cst.Name):
                        names.add(bound.value)
                    elif isinstance(bound, cst.Attribute):  # import a.b binds a
                        root: cst.BaseExpression = bound
                        while isinstance(root, cst.Attribute):
                            root = root.value
                        if isinstance(root, cst.Name):
                            names.add(root.value)
            elif isinstance(small, (cst.Assign, cst.AnnAssign)):
                targets = [t.target for t in small.targets] if isinstance(small, cst.Assign) else [small.target]
                names.update(t.value for t in targets if isinstance(t, cst.Name))
    return names


def defines_model(module: cst.Module, wanted: str | None = None) -> bool:
    """True when the file has something memlint would analyse (see the module docstring)."""
    model_classes: set[str] = set()
    for statement in _statements(module):
        names = _defined_names(statement)
        if wanted and wanted in names:
            return True
        if isinstance(statement, cst.FunctionDef) and statement.name.value == "build_model":
            return True
        if isinstance(statement, cst.ClassDef):
            for base in statement.bases:
                name = _last_name(base.value)
                if name and (name.endswith(_MODULE_SUFFIXES) or name in model_classes):
                    model_classes.add(statement.name.value)
                    break
    return bool(model_classes) and not wanted
