"""Measure more ground truth on a GPU with the calibration protocol (shared/calibration/README.md).

    python benchmarks/gpu_measure.py --out DIR [--device cuda] [--quick] [--phases probe,steps,...]

Writes, into DIR, one JSON file per phase, rewritten after every record so that a run cut short
still returns what it measured:

* ``probe.json``: in fresh processes, what the CUDA libraries take from the caching allocator and
  keep: ``memory_allocated()`` after the first matmul on the main thread, after the first backward
  through a linear layer (autograd runs CUDA backward on its own device thread, whose cuBLAS
  handle gets its own workspace), and after a convolution forward and backward.
* ``steps.json``: training peaks of models the calibration set does not hold (torchvision and
  transformers configs, several batch sizes, optimizers, bf16 autocast), measured exactly as the
  calibration protocol does in one process after its warm-up matmul and convolution, plus a few
  calibration records measured again as a check that this machine reproduces them; ``fresh``
  records: the same step in a fresh process with nothing warmed up (what a user's script sees).
* ``conv_workspace.json``: for every convolution of one training step of each CNN, the bytes the
  call took beyond its outputs (``max_memory_allocated()`` during the call minus
  ``memory_allocated()`` after it): cuDNN's workspace for the algorithm its heuristics chose.
* ``times``: median step time (10 steps after 3 warm-ups) in fp32 and bf16 autocast, in steps.json.
* ``maxbatch``: the largest batch that runs two SGD steps under a capacity, in steps.json.
* ``traces.json`` (phase ``trace``): the caching allocator's alloc/free events over one step.

``--second`` measures the second round of held-out models (``HELD_OUT_2``) instead of the first;
``--conv model:batch[:bf16],...`` logs the convolution workspaces of other steps.

``--device cpu --quick`` runs every code path on tiny batches without CUDA (numbers are zero), to
test the script before spending GPU time.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from workloads import OPTIMIZERS, spec_for  # noqa: E402

CUDA = torch.cuda.is_available()

# (model, batch sizes, optimizers at the middle batch, bf16 autocast record)
HELD_OUT = [
    ("densenet121", (1, 16, 64), ("adam", "none")),
    ("efficientnet_b0", (1, 16, 64), ("adam",)),
    ("convnext_tiny", (1, 16, 64), ("adam",)),
    ("regnet_y_400mf", (1, 16, 64), ("adam",)),
    ("shufflenet_v2_x1_0", (1, 32, 128), ("adam",)),
    ("squeezenet1_0", (1, 32, 128), ("adam",)),
    ("resnext50_32x4d", (1, 16, 64), ("adam",)),
    ("vit_b_16", (1, 16, 64), ("adam",)),
    ("llama-small", (1, 4, 16), ("adam", "adamw")),
    ("qwen2-tied", (1, 4, 16), ("adam",)),
    ("opt-125m", (1, 4, 16), ("adam",)),
    ("distilbert", (1, 8, 32), ("adam",)),
    ("roberta-base", (1, 8, 32), ("adam",)),
    ("vit-hf", (1, 16, 64), ("adam",)),
]
# The second round: models nothing in memlint was designed or checked on before it ran.
HELD_OUT_2 = [
    ("resnet34", (1, 32, 128), ("adam",)),
    ("resnet101", (1, 16, 64), ("adam",)),
    ("wide_resnet50_2", (1, 16, 32), ("adam",)),
    ("densenet169", (1, 16, 64), ("adam",)),
    ("efficientnet_b1", (1, 16, 64), ("adam",)),
    ("mobilenet_v3_large", (1, 32, 128), ("adam",)),
    ("mnasnet1_0", (1, 32, 128), ("adam",)),
    ("regnet_x_800mf", (1, 32, 128), ("adam",)),
    ("convnext_small", (1, 16, 32), ("adam",)),
    ("swin_t", (1, 16, 64), ("adam",)),
    ("vgg11_bn", (1, 16, 64), ("adam",)),
    ("mistral-small", (1, 4, 16), ("adam",)),
    ("phi-small", (1, 4, 16), ("adam",)),
    ("bloom-small", (1, 4, 16), ("adam",)),
    ("albert-base", (1, 8, 32), ("adam",)),
    ("electra-small", (1, 8, 32), ("adam",)),
]
MAXBATCH_2 = [("resnet34", "4GiB"), ("swin_t", "4GiB"), ("mistral-small", "4GiB"), ("densenet121", "11GiB"),
              ("llama-small", "11GiB")]
TRACED = [("vit_b_16", 16, "sgd"), ("resnet18", 1, "sgd")]
# Calibration records measured again: does this machine reproduce the file?
RECHECK = [("resnet18", 1, "sgd"), ("mobilenet_v2", 1, "sgd"), ("resnet50", 16, "sgd"), ("gpt2", 1, "sgd"),
           ("bert-base", 8, "sgd")]
FRESH = [("resnet18", 1, "sgd"), ("mobilenet_v2", 1, "sgd"), ("resnet50", 16, "sgd"), ("bert-base", 8, "sgd"),
         ("llama-small", 4, "adam"), ("densenet121", 16, "adam")]
CONV_MODELS = [("resnet18", 16), ("resnet50", 16), ("vgg16", 8), ("mobilenet_v2", 16), ("alexnet", 64),
               ("densenet121", 16), ("efficientnet_b0", 16), ("convnext_tiny", 16), ("regnet_y_400mf", 16),
               ("shufflenet_v2_x1_0", 32), ("squeezenet1_0", 32), ("resnext50_32x4d", 16), ("resnet50", 64),
               ("vgg16", 32)]
TIMED = [("densenet121", 64), ("efficientnet_b0", 64), ("convnext_tiny", 64), ("vit_b_16", 64),
         ("llama-small", 16), ("opt-125m", 16), ("roberta-base", 32)]
MAXBATCH = [("densenet121", "4GiB"), ("efficientnet_b0", "4GiB"), ("llama-small", "4GiB"), ("vit_b_16", "4GiB")]


def device() -> torch.device:
    return torch.device("cuda" if CUDA else "cpu")


def allocated() -> int:
    return torch.cuda.memory_allocated() if CUDA else 0


def peak() -> int:
    return torch.cuda.max_memory_allocated() if CUDA else 0


def reset_peak() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def clean() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def warm_up() -> dict[str, Any]:
    """The protocol's env step: one matmul and one conv load cuBLAS and cuDNN before any record; a
    backward through a linear layer gives autograd's thread its cuBLAS workspace too, so that every
    record's base holds both (in the first round, the first record's did not)."""
    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if CUDA else None,
                           "gpu": torch.cuda.get_device_name() if CUDA else "cpu"}
    with torch.device(device()):
        a = torch.randn(256, 256)
        (a @ a).sum().item()
        torch.nn.functional.conv2d(torch.randn(1, 3, 32, 32), torch.randn(8, 3, 3, 3)).sum().item()
        torch.nn.Linear(256, 256)(a).sum().backward()
    env["allocated_after_warm_up"] = allocated()
    env["reserved_after_warm_up"] = torch.cuda.memory_reserved() if CUDA else 0
    return env


def training_step(model: torch.nn.Module, spec: Any, batch: int, optimizer: Any, amp: bool,
                  scaler: Any = None) -> None:
    with torch.device(device()):
        inputs = spec.example_inputs(batch)
        with torch.autocast(device().type, dtype=torch.bfloat16, enabled=amp):
            loss = spec.loss_fn(model(inputs), inputs)
        loss.backward()
        del loss
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)


def measure_step(name: str, batch: int, optimizer_name: str, amp: bool = False, seq: int | None = None) -> dict:
    """One record with the protocol: base before the move, peak of three steps above it."""
    clean()
    spec = spec_for(name, seq)
    base = allocated()
    model = spec.build()
    params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    model.to(device()).train()
    after_model = allocated() - base
    factory = OPTIMIZERS[optimizer_name]
    optimizer = factory(list(model.parameters())) if factory else None
    peaks = []
    for _ in range(3):
        reset_peak()
        training_step(model, spec, batch, optimizer, amp)
        peaks.append(peak() - base)
    del optimizer
    model.zero_grad(set_to_none=True)
    model.eval()
    clean()
    weights = allocated()
    with torch.no_grad(), torch.device(device()), torch.autocast(device().type, torch.bfloat16, enabled=amp):
        inputs = spec.example_inputs(batch)
        model(inputs)
    infer = peak() - weights
    record = {"model": name, "batch": batch, "optimizer": optimizer_name, "amp": amp, "params": params,
              "param_bytes": param_bytes, "buffer_bytes": buffer_bytes, "after_model": after_model,
              "train_peaks": peaks, "train_peak": max(peaks), "infer_peak_delta": infer}
    if seq:
        record["seq"] = seq
    del model, inputs
    clean()
    return record


def ready_to_train(name: str, optimizer_name: str = "sgd") -> tuple[Any, torch.nn.Module, Any]:
    """The workload's spec, its model on the device in train mode, and the optimizer."""
    clean()
    spec = spec_for(name)
    model = spec.build().to(device()).train()
    return spec, model, OPTIMIZERS[optimizer_name](list(model.parameters()))


def time_step(name: str, batch: int, amp: bool) -> dict:
    spec, model, optimizer = ready_to_train(name)
    seconds = []
    for index in range(13):
        if CUDA:
            torch.cuda.synchronize()
        started = time.perf_counter()
        training_step(model, spec, batch, optimizer, amp)
        if CUDA:
            torch.cuda.synchronize()
        if index >= 3:
            seconds.append(time.perf_counter() - started)
    del model, optimizer
    clean()
    return {"model": name, "batch": batch, "amp": "bf16" if amp else "None", "step_s": statistics.median(seconds)}


def runs(name: str, batch: int, cap: int) -> bool:
    """Two SGD-momentum steps under the capacity, as the protocol's maxbatch search."""
    model = optimizer = None
    try:
        spec, model, optimizer = ready_to_train(name)
        for _ in range(2):
            training_step(model, spec, batch, optimizer, False)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del model, optimizer
        clean()


def max_batch(name: str, cap_name: str, quick: bool) -> dict:
    cap = int(cap_name.removesuffix("GiB")) << 30
    if CUDA:
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    limit = 4 if quick else 1 << 12
    low, high = 0, 1
    while high <= limit and runs(name, high, cap):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if runs(name, middle, cap) else (low, middle)
    if CUDA:
        torch.cuda.set_per_process_memory_fraction(1.0)
    return {"model": name, "cap": cap_name, "cap_bytes": cap, "optimizer": "sgd", "max_batch": low}


class ConvWorkspaceLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes each convolution call takes beyond what it returns: cuDNN's workspace."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
            return func(*args, **kwargs)
        before = allocated()
        reset_peak()
        result = func(*args, **kwargs)
        after = allocated()
        x, w = args[0], args[1]
        if func is torch.ops.aten.convolution_backward.default:
            x, w = args[1], args[2]
            stride, padding, dilation, transposed, _, groups = args[4:10]
        else:
            stride, padding, dilation, transposed, _, groups = args[3:9]
        self.calls.append({"op": "backward" if func is torch.ops.aten.convolution_backward.default else "forward",
                           "input": list(x.shape), "weight": list(w.shape), "stride": list(stride),
                           "padding": list(padding), "dilation": list(dilation), "groups": groups,
                           "dtype": str(x.dtype).removeprefix("torch."), "before": before,
                           "returned": after - before, "workspace": peak() - after})
        return result


def conv_workspaces(name: str, batch: int, amp: bool) -> dict:
    spec, model, optimizer = ready_to_train(name)
    training_step(model, spec, batch, optimizer, amp)  # warm: cuDNN's heuristics and plans cached
    log = ConvWorkspaceLog()
    with log:
        training_step(model, spec, batch, optimizer, amp)
    del model, optimizer
    clean()
    return {"model": name, "batch": batch, "amp": amp, "calls": log.calls}


def allocation_trace(name: str, batch: int, optimizer_name: str) -> dict:
    """The caching allocator's events over one step after two warm-ups, as shared/calibration/snapshots."""
    spec, model, optimizer = ready_to_train(name, optimizer_name)
    for _ in range(2):
        training_step(model, spec, batch, optimizer, False)
    clean()
    base = allocated()
    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    training_step(model, spec, batch, optimizer, False)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = [[e["action"], e["size"], [f"{f['filename'].split('/')[-1]}:{f['line']}:{f['name']}"
                                        for f in e.get("frames", [])[:4]]]
              for trace in snapshot["device_traces"] for e in trace
              if e["action"] in ("alloc", "free_completed")]
    record = {"model": name, "batch": batch, "optimizer": optimizer_name, "base": base,
              "peak_above_base": peak() - base, "events": events}
    del model, optimizer
    clean()
    return record


def probe() -> dict:
    """Run in a fresh process: what each library keeps after its first call."""
    out: dict[str, Any] = {"start": allocated()}
    with torch.device(device()):
        a = torch.randn(512, 512)
        out["tensor"] = allocated()
        (a @ a).sum().item()
        out["after_main_thread_matmul"] = allocated()
        linear = torch.nn.Linear(512, 512)
        linear(a).sum().backward()
        if CUDA:
            torch.cuda.synchronize()
        out["after_linear_backward"] = allocated()
        del linear
        conv = torch.nn.Conv2d(64, 64, 3, padding=1)
        x = torch.randn(8, 64, 56, 56, requires_grad=True)
        reset_peak()
        before = allocated()
        conv(x).sum().backward()
        out["conv_step_peak_above_before"] = peak() - before
        out["after_conv_step"] = allocated()
    out["reserved"] = torch.cuda.memory_reserved() if CUDA else 0
    return out


def fresh(name: str, batch: int, optimizer: str) -> dict:
    """The record measured in a process where nothing ran before: base is zero."""
    record = measure_step(name, batch, optimizer)
    record["fresh_process"] = True
    return record


def in_child(function: str, *args: Any) -> Any:
    """Run one function of this script in a fresh Python process and return its JSON result."""
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import gpu_measure as g; "
            f"print('RESULT' + json.dumps(g.{function}(*{args!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    raise RuntimeError(done.stderr[-2000:])


def record_all(out: Path, filename: str, key: str, jobs: list[tuple[Callable, tuple]], data: dict) -> None:
    """Run the jobs in order, saving after each; a failure is logged and the rest go on."""
    data.setdefault(key, [])
    for function, args in jobs:
        started = time.perf_counter()
        try:
            result = function(*args)
        except Exception as exc:  # one model failing must not lose the others' measurements
            result = {"job": [function.__name__, *map(str, args)], "error": f"{type(exc).__name__}: {exc}"[:500]}
            clean()
        data[key].append(result)
        (out / filename).write_text(json.dumps(data, indent=1))
        summary = {k: v for k, v in result.items() if k not in ("calls", "train_peaks")}
        print(f"{key} {time.perf_counter() - started:5.1f}s {summary}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny batches, a few models: test the script")
    parser.add_argument("--phases", default="probe,steps,conv,fresh,times,maxbatch")
    parser.add_argument("--second", action="store_true", help="the second round: other held-out models, traces")
    parser.add_argument("--conv", help="conv phase jobs instead of the default ones: model:batch[:bf16],...")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    phases = args.phases.split(",")
    shrink: Callable[[int], int] = (lambda b: min(b, 2)) if args.quick else (lambda b: b)
    held_out = HELD_OUT_2 if args.second else HELD_OUT
    held_out = held_out[::5] if args.quick else held_out
    if "probe" in phases:
        record_all(args.out, "probe.json", "probe", [(in_child, ("probe",))], {})
    # measure_step creates the inference inputs after its baseline: the delta holds them.
    data = {"infer_peak_delta_includes_inputs": True, "env": warm_up()}
    steps: list[tuple[Callable, tuple]] = []
    if "steps" in phases:
        steps += [(measure_step, (m, shrink(b), o)) for m, b, o in RECHECK[: 1 if args.quick else None]]
        for name, batches, optimizers in held_out:
            steps += [(measure_step, (name, shrink(b), "sgd")) for b in batches]
            middle = shrink(batches[1])
            steps += [(measure_step, (name, middle, o)) for o in optimizers]
            steps.append((measure_step, (name, middle, "adam", True)))
        record_all(args.out, "steps.json", "steps", steps, data)
    if "conv" in phases:
        if args.conv:
            jobs = [(conv_workspaces, (m, shrink(int(b)), amp == "bf16"))
                    for m, b, amp in (f"{job}:".split(":")[:3] for job in args.conv.split(","))]
        else:
            jobs = [(conv_workspaces, (m, shrink(b), False)) for m, b in CONV_MODELS[: 2 if args.quick else None]]
            jobs += [(conv_workspaces, ("resnet50", shrink(16), True))]
        record_all(args.out, "conv_workspace.json", "conv", jobs, {"env": data["env"]})
    if "fresh" in phases:
        jobs = [(in_child, ("fresh", m, shrink(b), o)) for m, b, o in FRESH[: 1 if args.quick else None]]
        record_all(args.out, "steps.json", "fresh", jobs, data)
    if "times" in phases:
        jobs = [(time_step, (m, shrink(b), amp)) for m, b in TIMED[: 1 if args.quick else None] for amp in (False, True)]
        record_all(args.out, "steps.json", "times", jobs, data)
    if "trace" in phases:
        jobs = [(allocation_trace, (m, shrink(b), o)) for m, b, o in TRACED[: 1 if args.quick else None]]
        record_all(args.out, "traces.json", "traces", jobs, {"env": data["env"]})
    if "maxbatch" in phases:
        caps = MAXBATCH_2 if args.second else MAXBATCH
        jobs = [(max_batch, (m, cap, args.quick)) for m, cap in caps[: 1 if args.quick else None]]
        record_all(args.out, "steps.json", "maxbatch", jobs, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
