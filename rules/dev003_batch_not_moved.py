"""DEV003: the model is moved to the GPU but the batches from the data loader are not."""
from __future__ import annotations

from typing import Iterator

import libcst as cst

from memlint.diagnostics import Diagnostic
from memlint.rules._static import (
    FileFacts, LoopFlow, call_name, calls_in, code, device_text, dotted_name, facts, is_moveish_call, keyword,
    method_name, position, shorten, value_root, walk,
)
from memlint.rules.base import Rule, RuleContext

# Wrappers and frameworks that put the batch on the device themselves.
_AUTO_PLACEMENT_CALLS = frozenset({"DataParallel", "DistributedDataParallel", "FullyShardedDataParallel", "DDP",
                                   "FSDP", "prepare", "setup_dataloaders", "prepare_data_loader"})
_AUTO_PLACEMENT_MODULES = ("accelerate", "lightning", "pytorch_lightning", "lightning_fabric", "ignite",
                           "deepspeed", "composer", "transformers.trainer")


def _places_batches_itself(info: FileFacts) -> bool:
    """DataParallel/DDP scatter CPU inputs, Accelerate/Lightning move batches, and a collate_fn or
    Dataset.__getitem__ that moves tensors hands out batches already on the device."""
    if any(info.imports.imports_module(name) for name in _AUTO_PLACEMENT_MODULES):
        return True
    for call in info.calls:
        if call_name(call) in _AUTO_PLACEMENT_CALLS:
            return True
        collate = keyword(call, "collate_fn")
        if collate is not None:
            target = collate.value
            if isinstance(target, cst.Name) and target.value in info.functions:
                target = info.functions[target.value]
            if any(is_moveish_call(c, info.imports) for c in calls_in(target, stop=(cst.ClassDef,))):
                return True
    getitem = [f for cls in info.classes for f in walk(cls, cst.FunctionDef, stop=(cst.ClassDef,))
               if f.name.value in ("__getitem__", "__iter__", "__next__", "__getitems__")]
    return any(is_moveish_call(c, info.imports) for f in getitem for c in calls_in(f))


def _string_index(subscript: cst.Subscript) -> bool:
    """``batch["input_ids"]``: the batch is a mapping."""
    element = subscript.slice[0].slice if len(subscript.slice) == 1 else None
    return isinstance(element, cst.Index) and isinstance(element.value, (cst.SimpleString, cst.ConcatenatedString))


class BatchNotMoved(Rule):
    code = "DEV003"
    name = "batch-not-moved"
    summary = "Batch from the data loader is passed to a GPU model without being moved"
    what = """
Checks for loops over a data loader (`for x, y in train_loader:`, `for step, batch in
enumerate(tqdm(loader)):`, or a loop over a variable assigned a `DataLoader(...)`) in a file that moves
the model to an accelerator (`model.cuda()`, `model.to(device)`, `model = Net().to("cuda")`), where a
loop variable, or something unpacked or indexed out of it, is passed to that model without ever being
moved (`x = x.to(device)`, `x.cuda()`, `to_device(batch, device)`, a dict comprehension of `.to()`
calls, ...).

The rule stays silent when something else may move the batch: a `DataParallel`/DDP/FSDP wrapper,
Accelerate, Lightning, a `collate_fn` or `Dataset.__getitem__` that moves tensors, or the batch being
handed to any other function first.
"""
    why = """
A `DataLoader` yields CPU tensors (pinned ones at best). A model moved to the GPU expects its inputs on
the GPU, so the first step fails with "Expected all tensors to be on the same device" - or, when the
script falls back to the CPU on a laptop, it runs fine until the day it meets a GPU.
"""
    example = """
model = Net().to(device)
for x, y in train_loader:
    loss = criterion(model(x), y)
"""
    instead = """
model = Net().to(device)
for x, y in train_loader:
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    loss = criterion(model(x), y)
"""
    VALID = (
        # moved in the loop, in every usual spelling
        """
import torch
device = torch.device("cuda")
model = Net().to(device)
for x, y in train_loader:
    x, y = x.to(device), y.to(device)
    out = model(x)
for images, labels in val_loader:
    images = images.cuda(non_blocking=True)
    out = model(images)
for batch in test_loader:
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model(**batch)
for batch in test_loader:
    batch = to_device(batch, device)
    out = model(**batch)
""",
        # the model stays on the CPU, or only changes dtype
        """
import torch
model = Net().to(torch.float64)
for x, y in train_loader:
    out = model(x)
""",
        # DataParallel scatters CPU inputs itself
        """
import torch
from torch import nn
model = nn.DataParallel(Net()).cuda()
for x, y in train_loader:
    out = model(x)
""",
        # the batch goes through another function first: it may move it
        """
import torch
model = Net().cuda()
for x, y in train_loader:
    x = preprocess(x)
    out = model(x)
for batch in loader:
    augment(batch)
    out = model(batch)
""",
        # not a loop over a loader
        """
import torch
model = Net().cuda()
for x in samples:
    out = model(x)
""",
        # a collate_fn that moves the batch
        """
import torch
from torch.utils.data import DataLoader

def collate(items):
    return torch.stack(items).cuda()

model = Net().cuda()
train_loader = DataLoader(ds, batch_size=8, collate_fn=collate)
for x in train_loader:
    out = model(x)
""",
    )
    INVALID = (
        """
import torch
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
model = Net().to(device)
for x, y in train_loader:
    loss = criterion(model(x), y)
""",
        # enumerate(tqdm(...)) unwrapped, the enumerate index is not the batch
        """
import torch
from tqdm import tqdm

def train(model, train_loader, optimizer):
    model.cuda()
    for step, (images, labels) in enumerate(tqdm(train_loader)):
        logits = model(images)
        optimizer.step()
""",
        # a dict batch, unpacked with **
        """
import torch
model = AutoModel.from_pretrained("bert").to("cuda")
for batch in dataloader:
    outputs = model(**batch)
""",
        # unpacked from the batch first
        """
import torch
from torch.utils.data import DataLoader
dl = DataLoader(ds, batch_size=32)
model = Net()
model.to(device)
for batch in dl:
    inputs, labels = batch
    out = model(inputs)
""",
        # a trainer class
        """
import torch

class Trainer:
    def __init__(self, model):
        self.model = model.cuda()

    def fit(self):
        for batch in self.train_loader:
            out = self.model(batch["input_ids"], attention_mask=batch["attention_mask"])
""",
    )

    def check(self, ctx: RuleContext) -> Iterator[Diagnostic]:
        info = facts(ctx)
        if not info.imports.imports_module("torch"):
            return
        models = info.moved_modules()
        if not models or not info.loader_loops() or _places_batches_itself(info):
            return
        for loop in info.loader_loops():
            model_calls = [call for call in calls_in(loop.node.body) if dotted_name(call.func) in models]
            if not model_calls:
                continue
            flow = LoopFlow(loop, info.imports, models)
            for call in model_calls:
                stale: list[str] = []
                mappings: set[str] = set()
                for arg in call.args:
                    root = value_root(arg.value)
                    if root not in flow.unmoved:
                        continue
                    if root not in stale:
                        stale.append(root)
                    if arg.star == "**" or (isinstance(arg.value, cst.Subscript)
                                            and isinstance(arg.value.value, cst.Name)
                                            and _string_index(arg.value)):
                        mappings.add(root)
                if stale:
                    yield self._diagnose(ctx, call, stale, mappings, loop.loader_text,
                                         models[dotted_name(call.func)])

    def _diagnose(self, ctx: RuleContext, call: cst.Call, stale: list[str], mappings: set[str], loader: str,
                  move: cst.Call) -> Diagnostic:
        line, column = position(ctx, call)
        model = dotted_name(call.func)
        move_line, _ = position(ctx, move)
        device = device_text(move, facts(ctx).imports)
        moving = "cuda(non_blocking=True)" if method_name(move) == "cuda" else f"to({device}, non_blocking=True)"
        fix = ", ".join(f"{{k: v.{moving} for k, v in {name}.items()}}" if name in mappings else f"{name}.{moving}"
                        for name in stale)
        fix = f"{', '.join(stale)} = {fix}"
        names = ", ".join(f"`{name}`" for name in stale)
        return ctx.diagnostic(
            self, line, column,
            f"{names} from `{loader}` {'is' if len(stale) == 1 else 'are'} passed to `{model}` without being "
            f"moved to the device, but `{model}` is (`{shorten(code(move), 60)}`, line {move_line}): "
            f"a device mismatch on the GPU; move the batch first: {fix}",
            fix=fix)
