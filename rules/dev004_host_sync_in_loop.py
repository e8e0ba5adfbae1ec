"""DEV004: ``.item()``/``.cpu()``/``.numpy()``/``.tolist()``/``print(loss)`` on every step of a loader loop."""
from __future__ import annotations

from typing import Iterator

import libcst as cst

from memlint.diagnostics import Diagnostic, Severity
from memlint.rules._static import (
    TENSOR, FileFacts, LoaderLoop, LoopFlow, calls_in, code, dotted_name, facts, is_sync_call,
    iter_small, method_name, modulo_guarded_nodes, names_in, position, shorten, target_names, tensor_kind, value_root,
)
from memlint.rules.base import Rule, RuleContext

_SCALAR_CALLS = frozenset({"float", "int", "bool", "len", "str", "round", "abs", "sum", "max", "min"})
_LOSS_WORDS = ("loss", "criterion")


def _receiver_chain_syncs(expr: cst.BaseExpression) -> bool:
    """Does the receiver chain already hold a sync (``x.cpu().numpy()``: report the ``.cpu()`` only)?"""
    for _ in range(32):
        if isinstance(expr, cst.Call):
            if is_sync_call(expr):
                return True
            if not isinstance(expr.func, cst.Attribute):
                return False
            expr = expr.func.value
        elif isinstance(expr, (cst.Attribute, cst.Subscript)):
            expr = expr.value
        else:
            return False
    return False


def _tensor_names(loop: LoaderLoop, info: FileFacts, models: set[str]) -> set[str]:
    """Names bound in the loop to device tensors: model outputs, losses, torch results, sums of them."""
    tensors: set[str] = set()
    for small in iter_small(loop.node.body):
        if isinstance(small, cst.Assign):
            targets = [n for t in small.targets for n in target_names(t.target)]
        elif isinstance(small, (cst.AnnAssign, cst.AugAssign)) and small.value is not None:
            targets = target_names(small.target)
        else:
            continue
        value = small.value
        calls = calls_in(value)
        scalar = any(is_sync_call(c) for c in calls) or (
            isinstance(value, cst.Call) and isinstance(value.func, cst.Name) and value.func.value in _SCALAR_CALLS)
        tensorish = not scalar and (
            any(dotted_name(c.func) in models
                or any(word in (dotted_name(c.func) or "").lower() for word in _LOSS_WORDS) for c in calls)
            or bool(names_in(value) & tensors)
            or tensor_kind(value, info.imports, {name: TENSOR for name in tensors}) == TENSOR)
        if tensorish:
            tensors.update(targets)
        elif not isinstance(small, cst.AugAssign) or scalar:
            tensors.difference_update(targets)
    return tensors


class HostSyncInLoop(Rule):
    code = "DEV004"
    name = "host-sync-in-loop"
    summary = "`.item()`, `.cpu()`, `.numpy()`, `.tolist()` or `print(loss)` on every step of a loader loop"
    severity = Severity.INFO
    fix = "Accumulate on the device (`total += loss.detach()`) and read it every N steps or once per epoch."
    what = """
Checks, inside loops over a data loader in files that use an accelerator, for `.item()`, `.cpu()`,
`.numpy()` and `.tolist()` calls and for `print(...)` of tensors (model outputs, losses and what is
computed from them): each one copies a value to the host and makes the CPU wait for the GPU to finish
all queued work, on every step.

Calls inside a block guarded by a modulo test (`if step % 100 == 0:`) are the deliberate "log every N
steps" pattern and are not reported, nor are those under `if i == 0:` on the `enumerate` counter (one
step only); neither are calls on batch tensors the loop never moves to the
device (they are on the CPU already).
"""
    why = """
CUDA runs asynchronously: while the GPU works through step N, the Python loop can already prepare step
N+1. A host synchronisation drains that queue, so the CPU-side work of every step (data loading,
Python overhead, kernel launches) is no longer hidden behind GPU work. For small and medium models the
difference is often 10-30% of the step time; `print(loss)` does the same, and formats a string too.
"""
    example = """
for step, (x, y) in enumerate(train_loader):
    loss = criterion(model(x.cuda()), y.cuda())
    loss.backward()
    optimizer.step()
    running_loss += loss.item()
"""
    instead = """
running_loss = torch.zeros((), device="cuda")
for step, (x, y) in enumerate(train_loader):
    loss = criterion(model(x.cuda()), y.cuda())
    loss.backward()
    optimizer.step()
    running_loss += loss.detach()
    if step % 100 == 0:
        print(f"step {step}: loss {running_loss.item() / (step + 1):.4f}")
"""
    VALID = (
        # modulo-guarded logging: deliberate
        """
import torch
model = Net().cuda()
for step, (x, y) in enumerate(train_loader):
    loss = criterion(model(x.cuda()), y.cuda())
    running += loss.detach()
    if step % 100 == 0:
        print(f"step {step}: {running.item() / (step + 1)}")
    if (step + 1) % args.log_every == 0 and rank == 0:
        print(loss)
        logger.info(loss.cpu().numpy())
""",
        # no accelerator anywhere in the file: nothing to synchronise with
        """
import torch
for x, y in train_loader:
    loss = criterion(model(x), y)
    total += loss.item()
""",
        # .tolist() on the CPU batch itself, and print of plain numbers
        """
import torch
model = Net().to("cuda")
for ids, labels in loader:
    names = ids.tolist()
    out = model(ids.to("cuda"))
    print(len(names), epoch)
""",
        # not a loop over a loader
        """
import torch
model = Net().cuda()
for epoch in range(10):
    print(loss.item())
""",
    )
    INVALID = (
        """
import torch
device = "cuda"
for x, y in train_loader:
    x, y = x.to(device), y.to(device)
    loss = criterion(model(x), y)
    total += loss.item()
""",
        # the else branch of a modulo guard runs on most steps
        """
import torch
model = Net().cuda()
for i, batch in enumerate(loader):
    loss = model(**{k: v.cuda() for k, v in batch.items()}).loss
    if i % 50 == 0:
        pass
    else:
        history.append(loss.cpu())
""",
        # print of a loss tensor, and .numpy() after .cpu() (reported once, at .cpu())
        """
import torch
model = Net().cuda()
for x, y in val_loader:
    x = x.cuda()
    logits = model(x)
    loss = criterion(logits, y.cuda())
    print("loss", loss)
    preds.append(logits.argmax(1).cpu().numpy())
""",
        # .tolist() of predictions
        """
import torch
model = Net().to(torch.device("cuda:0"))
for batch in test_dataloader:
    out = model(batch.to("cuda:0"))
    predictions.extend(out.argmax(-1).tolist())
""",
    )

    def check(self, ctx: RuleContext) -> Iterator[Diagnostic]:
        info = facts(ctx)
        if not info.imports.imports_module("torch") or not info.loader_loops():
            return
        models = info.moved_modules()
        if info.accelerator() is None and not models:
            return
        seen: set[int] = set()
        for loop in info.loader_loops():
            body = loop.node.body
            guarded = modulo_guarded_nodes(body, loop.index)
            flow = LoopFlow(loop, info.imports, models)
            tensors: set[str] | None = None
            for call in calls_in(body):
                if id(call) in seen:
                    continue
                seen.add(id(call))
                if id(call) in guarded:
                    continue
                if is_sync_call(call):
                    receiver = call.func.value  # type: ignore[union-attr]
                    if _receiver_chain_syncs(receiver) or dotted_name(receiver) in models:
                        continue
                    if value_root(receiver) in flow.on_host:
                        continue  # a batch tensor still on the CPU: no device to wait for
                    yield self._sync(ctx, call, loop)
                elif isinstance(call.func, cst.Name) and call.func.value == "print":
                    if any(is_sync_call(c) for c in calls_in(call) if c is not call):
                        continue  # the .item() inside is reported itself
                    if tensors is None:
                        tensors = _tensor_names(loop, info, set(models))
                    printed = sorted(names_in(call) & tensors)
                    if printed:
                        yield self._print(ctx, call, printed, loop)

    def _sync(self, ctx: RuleContext, call: cst.Call, loop: LoaderLoop) -> Diagnostic:
        line, column = position(ctx, call)
        name = method_name(call)
        receiver = shorten(code(call.func.value), 40)  # type: ignore[union-attr]
        if name == "item":
            advice = ("keep running sums on the device (`total += loss.detach()`) and call .item() every N "
                      "steps, inside `if step % N == 0:`")
        else:
            advice = ("collect the tensors on the device and copy them once after the loop (torch.cat(...)"
                      f".{name}()), or do it every N steps")
        return ctx.diagnostic(
            self, line, column,
            f"`{receiver}.{name}()` in the loop over `{loop.loader_text}` copies to the host and waits for the "
            f"device to finish, every step; {advice}")

    def _print(self, ctx: RuleContext, call: cst.Call, printed: list[str], loop: LoaderLoop) -> Diagnostic:
        line, column = position(ctx, call)
        names = ", ".join(f"`{name}`" for name in printed)
        return ctx.diagnostic(
            self, line, column,
            f"`print` of tensor {names} in the loop over `{loop.loader_text}` copies it to the host and waits "
            f"for the device, every step; print every N steps (inside `if step % N == 0:`)")
