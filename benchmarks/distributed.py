"""Per-device memory under FSDP and ZeRO: memlint against PyTorch's FSDPMemTracker and the ZeRO paper.

    python benchmarks/distributed.py [--models gpt2,bert-base] [--devices 2,8] [--markdown]

1. **FSDP vs FSDPMemTracker.** ``torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker`` runs
   the real FSDP2 (``fully_shard`` on each top-level block, memlint/blocks.py, then on the root) on
   fake tensors with a fake process group of N ranks (``FakeStore`` +
   ``dist.init_process_group("fake")``), three Adam steps, and reports its peak by category;
   memlint runs ``--strategy fsdp --devices N`` on the same model and step. Dropout is set to 0 in
   both, so that the CPU kernels the tracker runs save what the CUDA kernels memlint models save.
2. **Model states vs the ZeRO paper.** For each strategy at N devices: memlint's largest live
   parameters + gradients + optimizer state of one device during the step, against DeepSpeed's
   closed forms (Rajbhandari et al., 2020) for fp32 Adam (4 + 4 + 8 bytes per parameter) and, for
   reference, the mixed-precision Adam the paper tabulates (2 + 2 + 12).

Runs in the benchmark environment (transformers; torch >= 2.6 for FSDP2 and its tracker).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from memlint.allocator import round_size  # noqa: E402
from memlint.blocks import top_level_blocks  # noqa: E402
from memlint.distributed import zero_closed_form  # noqa: E402
from memlint.estimator import Estimator, Workload, analyse  # noqa: E402
from memlint.targets import resolve_target  # noqa: E402

BATCH = {"gpt2": 4, "bert-base": 16}
SEQ = {"gpt2": 512, "bert-base": 128}
GIB = 2**30


def build(name: str) -> torch.nn.Module:
    import transformers

    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return transformers.BertForSequenceClassification(
        transformers.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def inputs(name: str, batch: int) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, SEQ[name]))


def loss_fn(name: str, output: Any, ids: torch.Tensor) -> torch.Tensor:
    if name == "gpt2":
        return F.cross_entropy(output.logits.flatten(0, 1).float(), ids.flatten())
    return output.logits.float().mean()


def workload(name: str, strategy: str, devices: int) -> Workload:
    return Workload(name=name, path="<benchmark>", line=1, build=lambda: build(name),
                    example_inputs=lambda b: inputs(name, b), loss_fn=lambda o, x: loss_fn(name, o, x),
                    build_optimizer=None, batch_size=BATCH[name], input_shape=None, input_dtype="float32",
                    optimizer="adam", precision="fp32", mode="train", strategy=strategy, devices=devices)


def memlint_fsdp(name: str, devices: int) -> dict[str, float]:
    report = analyse(workload(name, "fsdp", devices), resolve_target("mem:1000GiB"), 1.0, find_max_batch=False)
    b = report.breakdown
    return {"total": report.peak_allocated_bytes - report.overhead_bytes, "params": b["parameters"],
            "grads": b["gradients"], "optimizer": b["optimizer_state"], "activations": b["activations"],
            "other": b["temporaries"] + b["inputs"] + b["buffers"]}


def tracker_fsdp(name: str, devices: int) -> dict[str, float] | None:
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    try:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return None
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=0, world_size=devices, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (devices,))
        with FakeTensorMode():
            model = build(name)
            modules = dict(model.named_modules())
            for block in top_level_blocks(model):
                fully_shard(modules[block], mesh=mesh)
            fully_shard(model, mesh=mesh)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)
            ids = inputs(name, BATCH[name])
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs((ids,))
            with tracker:
                for step in range(3):
                    loss_fn(name, model(ids), ids).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if step < 2:
                        tracker.reset_mod_stats()  # the tracker follows one iteration at a time
            peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    finally:
        dist.destroy_process_group()
    by_name = {getattr(key, "value", key): value for key, value in peak.items()}
    return {"total": by_name["Total"], "params": by_name["Sharded Param"] + by_name["Unsharded Param"],
            "grads": by_name["Sharded Grad"] + by_name["Unsharded Grad"], "optimizer": by_name["OptState"],
            "activations": by_name["Activation"],
            "other": by_name["Temp"] + by_name["All Gather"] + by_name["Reduce Scatter"] + by_name["Inputs"]
            + by_name["Buffer"]}


def model_states(name: str, strategy: str, devices: int) -> int:
    """memlint's largest live parameters + gradients + optimizer state of one device during the step."""
    estimator = Estimator(workload(name, strategy, devices), resolve_target("mem:1000GiB"), 1.0)
    ledger = estimator.simulate(BATCH[name]).ledger
    best = 0

    def on_op(_index: int, _name: str, live: dict[str, int]) -> None:
        nonlocal best
        best = max(best, live["parameters"] + live["gradients"] + live["optimizer_state"])

    ledger.replay(round_size, start=ledger.iteration_marks[-1], on_op=on_op)
    return best


def table(header: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(" --- " if i < 2 else " ---: " for i in range(len(header))) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,bert-base")
    parser.add_argument("--devices", default="2,8")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    models = args.models.split(",")
    counts = [int(n) for n in args.devices.split(",")]

    print("FSDP (fully_shard per top-level block + root), fp32 Adam, peak per device in GiB: memlint / FSDPMemTracker\n")
    header = ["model", "N", "total", "params", "grads", "optimizer state", "activations", "other", "seconds"]
    rows = []
    for name in models:
        for n in counts:
            started = time.perf_counter()
            ours = memlint_fsdp(name, n)
            middle = time.perf_counter()
            theirs = tracker_fsdp(name, n)
            done = time.perf_counter()
            cells = [f"{ours[k] / GIB:.2f} / {theirs[k] / GIB:.2f}" if theirs else f"{ours[k] / GIB:.2f} / n/a"
                     for k in ("total", "params", "grads", "optimizer", "activations", "other")]
            rows.append([f"{name} b{BATCH[name]}", str(n), *cells, f"{middle - started:.0f} / {done - middle:.0f}"])
    table(header, rows, args.markdown)

    n = max(counts)
    print(f"\nModel states per device (parameters + gradients + optimizer state) at N = {n}, GiB: memlint's largest "
          "during the step vs the ZeRO paper's closed forms\n")
    header = ["model", "strategy", "memlint", "closed form, fp32 Adam 4+4+8", "ratio",
              "closed form, mixed-precision Adam 2+2+12"]
    rows = []
    for name in models:
        psi = sum(p.numel() for p in {id(p): p for p in build(name).parameters()}.values())
        for strategy in ("ddp", "zero1", "zero2", "zero3", "fsdp"):
            ours = model_states(name, strategy, n)
            fp32 = zero_closed_form(strategy, psi, n, params=4, grads=4, optimizer=8)
            mixed = zero_closed_form(strategy, psi, n)
            rows.append([f"{name} ({psi / 1e6:.0f}M)", strategy, f"{ours / GIB:.3f}", f"{fp32 / GIB:.3f}",
                         f"{ours / fp32:.2f}", f"{mixed / GIB:.3f}"])
    table(header, rows, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
