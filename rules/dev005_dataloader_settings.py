"""DEV005: a DataLoader feeding an accelerator from the main process, unpinned, or with more workers than cores."""
from __future__ import annotations

from typing import Iterator

import libcst as cst

from memlint.diagnostics import Diagnostic, Severity
from memlint.rules._static import facts, has_star_kwargs, keyword, position, positional
from memlint.rules.base import Rule, RuleContext

# DataLoader(dataset, batch_size, shuffle, sampler, batch_sampler, num_workers, collate_fn, pin_memory, ...)
_POSITION = {"num_workers": 5, "pin_memory": 7}
_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 2}


def _argument(call: cst.Call, name: str) -> cst.BaseExpression | None:
    found = keyword(call, name)
    if found is not None:
        return found.value
    args = positional(call)
    index = _POSITION[name]
    return args[index].value if len(args) > index else None


def _int_literal(expr: cst.BaseExpression | None) -> int | None:
    if isinstance(expr, cst.Integer):
        return int(expr.evaluated_value)
    return None


def _is_name(expr: cst.BaseExpression | None, value: str) -> bool:
    return isinstance(expr, cst.Name) and expr.value == value


class DataLoaderSettings(Rule):
    code = "DEV005"
    name = "dataloader-settings"
    summary = "DataLoader feeding an accelerator loads in the main process, without pinned memory, or with more workers than cores"
    severity = Severity.WARNING
    fix = "DataLoader(..., num_workers=<a few, at most the cores>, pin_memory=True)"
    what = """
Checks `torch.utils.data.DataLoader(...)` calls (imported any way) in files that use an accelerator
(`.cuda()`, a `"cuda"` string, `torch.device("cuda...")`) for:

* `num_workers` absent or `0`: batches are loaded and collated in the training process (warning);
* `pin_memory` absent or `False`: host-to-device copies go through pageable memory and cannot
  overlap with compute (info on its own);
* `num_workers=<literal>` larger than the cores of the training host (checked in every file), when the
  target says how many it has (`cores`, e.g. `--target xeon-e5-2620v4:64GiB`); the machine running
  the linter need not be the one that trains, so its own core count is never used.

Arguments passed through `**kwargs`, or as expressions (`num_workers=args.workers`), are trusted.
One diagnostic per call lists every problem.
"""
    why = """
With `num_workers=0` the GPU idles while the Python process decodes, augments and collates the next
batch; worker processes prepare batches while the GPU computes. Pinned (page-locked) host memory lets
`.to(device, non_blocking=True)` copy asynchronously, overlapping the transfer with compute. But
workers are processes: more workers than the hardware has cores (its channels) buys nothing - they
compete for the same cores, and each holds its own copy of the dataset object and prefetched
batches in RAM.
"""
    example = """
train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
model = Net().cuda()
"""
    instead = """
train_loader = DataLoader(train_set, batch_size=64, shuffle=True, num_workers=4, pin_memory=True,
                          persistent_workers=True)
model = Net().cuda()
"""
    VALID = (
        """
import torch
from torch.utils.data import DataLoader
model = Net().cuda()
loader = DataLoader(ds, batch_size=64, num_workers=2, pin_memory=True)
""",
        # values the linter cannot read, and **kwargs, are trusted
        """
import torch
from torch.utils.data import DataLoader
device = torch.device("cuda")
loader = DataLoader(ds, batch_size=64, num_workers=args.workers, pin_memory=use_cuda)
other = DataLoader(ds, **loader_kwargs)
""",
        # no accelerator in the file: a CPU script may load in process
        """
from torch.utils.data import DataLoader
loader = DataLoader(ds, batch_size=8)
""",
        # a DataLoader that is not torch's
        """
import torch
from mylib import DataLoader
model = Net().cuda()
loader = DataLoader(ds)
""",
        # positional num_workers and pin_memory
        """
import torch.utils.data as tud
x = y.cuda()
loader = tud.DataLoader(ds, 32, True, None, None, 1, None, True)
""",
    )
    INVALID = (
        """
import torch
from torch.utils.data import DataLoader
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
""",
        # imported as a module alias; num_workers=0 spelled out
        """
import torch
import torch.utils.data as data
model = Net().cuda()
loader = data.DataLoader(ds, batch_size=64, num_workers=0, pin_memory=True)
""",
        # pin_memory=False only
        """
import torch
model = Net().to("cuda:0")
loader = torch.utils.data.DataLoader(ds, num_workers=2, pin_memory=False)
""",
        # a DDP script: the model moves to a local rank, the loader has no workers
        """
from torch.utils.data import DataLoader
model = Net().to(local_rank)
loader = DataLoader(ds, batch_size=32, pin_memory=True)
""",
    )

    def check(self, ctx: RuleContext) -> Iterator[Diagnostic]:
        info = facts(ctx)
        calls = info.dataloader_calls()
        if not calls:
            return
        accelerator = info.accelerator()
        for call in calls:
            problems: list[tuple[Severity, str]] = []
            workers = _argument(call, "num_workers")
            pin = _argument(call, "pin_memory")
            opaque = has_star_kwargs(call)
            if accelerator is not None and not opaque:
                if workers is None or _int_literal(workers) == 0:
                    spelled = "absent, so 0" if workers is None else "0"
                    problems.append((Severity.WARNING,
                                     f"num_workers is {spelled}: batches are loaded in the training process "
                                     f"while the GPU waits"))
                if pin is None or _is_name(pin, "False"):
                    spelled = "absent" if pin is None else "False"
                    problems.append((Severity.INFO,
                                     f"pin_memory is {spelled}: host-to-device copies cannot overlap with compute"))
            count = _int_literal(workers)
            if count:
                cores, whose, severity = self._cores(ctx)
                if cores and count > cores:
                    problems.append((severity,
                                     f"num_workers={count} is more than the {cores} cores of {whose}: more workers "
                                     f"than the hardware has cores buys nothing, each costs RAM"))
            if not problems:
                continue
            severity = max((s for s, _ in problems), key=_RANK.__getitem__)
            line, column = position(ctx, call)
            where = ""
            if accelerator is not None and any("GPU" in text or "host-to-device" in text for _, text in problems):
                where = f" (this file uses an accelerator: {accelerator[1]} on line {position(ctx, accelerator[0])[0]})"
            yield ctx.diagnostic(self, line, column,
                                 f"DataLoader: {'; '.join(text for _, text in problems)}{where}",
                                 severity=severity, fix=self._fix(ctx))

    def _cores(self, ctx: RuleContext) -> tuple[int | None, str, Severity]:
        """The training host's cores, known only from the target: the machine running the linter
        (a laptop, a CI runner) says nothing about it, and its answer would differ from run to run."""
        target = ctx.target
        if target is not None and getattr(target, "cores", None):
            return target.cores, f"target `{target.name}` (its `cores`)", Severity.WARNING
        return None, "", Severity.INFO

    def _fix(self, ctx: RuleContext) -> str:
        cores, _, _ = self._cores(ctx)
        workers = max(1, min(8, (cores or 2) // 2)) if cores else 4
        return f"DataLoader(..., num_workers={workers}, pin_memory=True, persistent_workers=True)"
