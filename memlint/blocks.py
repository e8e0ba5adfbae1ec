"""The model's top-level blocks: what FSDP shards as units and what activation checkpointing wraps.

One definition serves ``--strategy fsdp`` (each block is all-gathered as one unit),
``--checkpoint-layers`` (each block runs under non-reentrant ``torch.utils.checkpoint``) and the
per-block "checkpointing saves X" estimate, so the three always talk about the same blocks.
"""
from __future__ import annotations

import contextlib
import functools
from collections import Counter
from typing import Any, Iterator

import torch
from torch import nn


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_composite(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def top_level_blocks(model: nn.Module) -> list[str]:
    """Names of the model's top-level blocks, in definition order.

    The repeated blocks: children of an ``nn.ModuleList``/``nn.Sequential`` that holds two or more
    composite modules of one class (transformer layers, ResNet bottlenecks, MobileNet's inverted
    residuals), outermost first, when together they hold at least half of the parameters. Otherwise
    the root's children (looking through a root that only wraps one child): AlexNet's and VGG's
    ``features``, ``avgpool``, ``classifier``.
    """
    found: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            counts = Counter(type(child) for child in module.children() if _is_composite(child))
            repeated = {kind for kind, count in counts.items() if count >= 2}
            if repeated:
                for name, child in module.named_children():
                    full = f"{prefix}{name}"
                    if type(child) in repeated:
                        found.append(full)
                    else:
                        visit(f"{full}.", child)
                return
        for name, child in module.named_children():
            visit(f"{prefix}{name}.", child)

    visit("", model)
    modules = dict(model.named_modules())
    total = _parameter_count(model)
    covered = sum(_parameter_count(modules[name]) for name in found)
    if found and 2 * covered >= total:
        return found
    prefix, root = "", model
    while True:
        children = list(root.named_children())
        if len(children) != 1:
            break
        prefix, root = f"{prefix}{children[0][0]}.", children[0][1]
    return [f"{prefix}{name}" for name, _ in root.named_children()]


def parameter_owners(model: nn.Module) -> dict[int, str]:
    """``id(parameter)`` to the first module that holds it (tied weights belong to their first owner)."""
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), name)
    return owners


def within(name: str, block: str) -> bool:
    """Whether module ``name`` is ``block`` or inside it ("" is the root and contains everything)."""
    return not block or name == block or name.startswith(block + ".")


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def checkpointing(model: nn.Module, blocks: list[str]) -> Iterator[None]:
    """Run each block's forward under non-reentrant ``torch.utils.checkpoint`` (``--checkpoint-layers``).

    The block's ``forward`` is replaced on the instance for the duration, so module hooks still
    run around the block and the model is left as it was.
    """
    modules = dict(model.named_modules())
    patched = []
    for name in blocks:
        module = modules[name]
        original = module.__dict__.get("forward")
        module.forward = functools.partial(_checkpointed, module.forward)  # type: ignore[method-assign]
        patched.append((module, original))
    try:
        yield
    finally:
        for module, original in patched:
            if original is None:
                del module.forward
            else:
                module.forward = original  # type: ignore[method-assign]
