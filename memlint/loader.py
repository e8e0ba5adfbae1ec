"""Find the model: import the user's file and pick what to analyse.

Order (first match wins): ``--model NAME``; a zero-argument ``build_model()``; ``nn.Module``
subclasses defined in the file (not imported into it) that construct with no arguments.
The file may also define ``example_inputs(batch_size)``, ``loss_fn(output, inputs)`` and
``build_optimizer(params)``. Runs inside the analysis child process (see ``worker.py``).
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from memlint.errors import ModelError


@dataclass
class ModelEntry:
    """One thing to analyse in a file: how to build it and where it is defined."""

    name: str
    build: Callable[[], Any]
    line: int
    example_inputs: Callable[[int], Any] | None
    loss_fn: Callable[[Any, Any], Any] | None
    build_optimizer: Callable[[Any], Any] | None


def import_user_file(path: Path) -> ModuleType:
    """Import a model file as a fresh module; errors become ModelError with the user's line."""
    sys.dont_write_bytecode = True  # never leave __pycache__ in the user's tree
    folder = str(path.parent.resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module_name = f"_memlint_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelError("cannot be imported as Python", path=str(path), hint="memlint analyses .py files")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise ModelError(f"syntax error: {exc.msg}", path=str(path), line=exc.lineno,
                         hint="fix the syntax; memlint imports the file to build the model") from None
    except ModuleNotFoundError as exc:
        raise ModelError(f"importing it failed: module {exc.name!r} is not installed", path=str(path),
                         line=user_line(exc, path),
                         hint=f"install it in the environment memlint runs in (pip install {exc.name}), "
                              "or lint without importing: --no-import") from None
    except SystemExit as exc:
        raise ModelError(f"importing it called sys.exit({'' if exc.code is None else repr(exc.code)})",
                         path=str(path), line=user_line(exc, path),
                         hint="memlint imports the file to build the model; guard scripts with "
                              "`if __name__ == \"__main__\":`, or use --no-import") from None
    except BaseException as exc:  # the user's code can raise anything
        from memlint.worker import _is_allocation_failure, _out_of_memory

        if _is_allocation_failure(exc):
            raise _out_of_memory(str(path), "at import", user_line(exc, path)) from None
        raise ModelError(f"importing it raised {type(exc).__name__}: {exc}", path=str(path),
                         line=user_line(exc, path),
                         hint="memlint imports the file to build the model; guard scripts with "
                              "`if __name__ == \"__main__\":`, or use --no-import") from None
    return module


def user_line(exc: BaseException, path: Path) -> int | None:
    """The deepest traceback line that lies in the user's file."""
    target = str(path.resolve())
    line = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if str(Path(frame.f_code.co_filename).resolve()) == target:
            line = lineno
    return line


def find_models(module: ModuleType, path: Path, wanted: str | None) -> list[ModelEntry]:
    """The models of a file in the documented order; raises ModelError when there is none."""
    import torch.nn as nn

    hooks = {name: getattr(module, name, None) for name in ("example_inputs", "loss_fn", "build_optimizer")}
    hooks = {name: fn if callable(fn) else None for name, fn in hooks.items()}

    def entry(name: str, build: Callable[[], Any], obj: Any) -> ModelEntry:
        return ModelEntry(name, build, _definition_line(obj), hooks["example_inputs"], hooks["loss_fn"],
                          hooks["build_optimizer"])

    if wanted:
        obj = getattr(module, wanted, None)
        if obj is None:
            raise ModelError(f"--model {wanted}: no such name in the file", path=str(path),
                             hint="name a class or function defined in it")
        if not callable(obj):
            raise ModelError(f"--model {wanted} is not a class or function", path=str(path))
        _require_no_args(obj, wanted, path)
        return [entry(wanted, obj, obj)]
    build_model = getattr(module, "build_model", None)
    if callable(build_model):
        _require_no_args(build_model, "build_model", path)
        return [entry(_built_name(build_model), build_model, build_model)]
    classes = [obj for obj in vars(module).values()
               if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__]
    if not classes:
        try:
            empty = not path.read_text(encoding="utf-8-sig").strip()
        except (OSError, UnicodeDecodeError):
            empty = False
        raise ModelError("no model found" + (": the file is empty" if empty else
                                             " (no nn.Module subclass defined in the file, no build_model())"),
                         path=str(path),
                         hint="define an nn.Module subclass, or a zero-argument build_model(), "
                              "or pass --model NAME; or take the file out of `models` in [tool.memlint]")
    usable = [cls for cls in classes if _constructs_without_args(cls)]
    # A model class built from the others: analyse only the outermost ones.
    contained = {c for c in usable for other in usable if other is not c and _mentions(other, c)}
    chosen = [cls for cls in usable if cls not in contained] or usable
    if not chosen:
        names = ", ".join(cls.__name__ for cls in classes)
        raise ModelError(f"the model classes in the file ({names}) all need constructor arguments",
                         path=str(path), line=_definition_line(classes[0]),
                         hint="add a zero-argument build_model() that returns the model, "
                              "or give the arguments defaults")
    return [entry(cls.__name__, cls, cls) for cls in chosen]


def _built_name(build_model: Callable[[], Any]) -> str:
    annotation = inspect.signature(build_model).return_annotation
    if annotation is inspect.Signature.empty or isinstance(annotation, str):  # none, or postponed ("Net")
        return annotation.strip("'\"") if isinstance(annotation, str) and annotation.isidentifier() else \
            "build_model()"
    return getattr(annotation, "__name__", None) or "build_model()"


def _require_no_args(obj: Any, name: str, path: Path) -> None:
    target = obj.__init__ if isinstance(obj, type) else obj
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    required = [p.name for p in signature.parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.name != "self"]
    if required:
        raise ModelError(f"{name} needs arguments ({', '.join(required)}) to construct", path=str(path),
                         line=_definition_line(obj),
                         hint="add a zero-argument build_model() that returns the configured model")


def _constructs_without_args(cls: type) -> bool:
    try:
        _require_no_args(cls, cls.__name__, Path("."))
    except ModelError:
        return False
    return True


def _mentions(outer: type, inner: type) -> bool:
    try:
        return inner.__name__ in inspect.getsource(outer)
    except (OSError, TypeError):
        return False


def _definition_line(obj: Any) -> int:
    try:
        return inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        return 1
