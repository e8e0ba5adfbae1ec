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

* ``ops.json`` (phase ``ops``): every op of the steps whose records memlint under-estimates most
  (and of inference forwards), each as [op, allocated before, bytes it returned, bytes it took
  beyond them while it ran, reserved after, first tensor argument's shape and dtype]: where the
  peak lies and what is live there.
* ``rnn.json`` (phase ``rnn``): cuDNN's recurrent kernels, a seeded sweep of LSTM/GRU/RNN shapes:
  what each ``_cudnn_rnn`` call returns (its reserve for the backward among it) and takes.
* ``rnn_infer.json`` (phase ``rnn_infer``): the same for layers in eval mode without autograd.
* ``variants`` (in steps.json): activation checkpointing, other sequence lengths and other
  optimizers on held-out models (``CKPT_6``, ``SEQ_6``, ``OPT_6``), as the calibration's ``ckpt``,
  ``seq`` and ``opt`` records.
* ``encoder.json`` (phase ``encoder``): ``nn.TransformerEncoderLayer``'s fused inference path.
* ``oom.json`` (phase ``oom``): the largest-batch records memlint over-estimates, run at the
  measured and at memlint's batch under the same capacity: the allocator's state where it failed.

``--round N`` measures the N-th round of held-out models (``ROUNDS``) instead of the first: 2, models
nothing in memlint was designed on, the largest batches of ``MAXBATCH_2``; 3, models written with
torch.nn alone (cuDNN's recurrent layers, nn.TransformerEncoder) and the step times of ``TIMED_3``; 4,
recurrent models measured after cuDNN's kernels were modelled from round 3, AlexNet's step times again; 5,
ten transformers architectures; 7, torchvision classifiers, segmentation, video and detection models,
encoder-decoders and multi-query attention (``HELD_OUT_7``), and the largest batches of ``MAXBATCH_7``.
``--conv model:batch[:bf16],...`` logs the convolution workspaces of other steps, ``--ops`` the ops of other
records, ``--maxbatch model:cap,...`` the largest batches of other models, ``--oom model:cap:batch,...``
the steps under a capacity of other records.

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

from workloads import OPTIMIZERS, call, spec_for  # noqa: E402

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
# The third round: cuDNN's recurrent kernels and PyTorch's own encoder layer.
HELD_OUT_3 = [
    ("lstm-lm", (1, 16, 64), ("adam",)),
    ("gru-lm", (1, 16, 64), ("adam",)),
    ("bilstm-tagger", (1, 32, 128), ("adam",)),
    ("torch-encoder", (1, 16, 64), ("adam",)),
]
HELD_OUT_4 = [
    ("lstm-deep", (1, 16, 64), ("adam",)),
    ("bigru-tagger", (1, 16, 64), ("adam",)),
    ("rnn-tanh", (1, 16, 64), ("adam",)),
]
HELD_OUT_5 = [(name, batches, ("adam",)) for name, batches in (
    ("deberta-small", (8, 32)), ("gptneox-small", (4, 16)), ("falcon-small", (4, 16)), ("qwen3-small", (4, 16)),
    ("gemma2-small", (4, 16)), ("stablelm-small", (4, 16)), ("swin-hf", (16, 64)), ("convnext-hf", (16, 64)),
    ("segformer-b0", (16, 64)), ("deit-hf", (16, 64)))]
# The seventh round: torchvision classifiers, segmentation, video and detection models, encoder-decoders and
# multi-query attention, measured before memlint ran on them. DeepLabV3 starts at batch 2: batch norm after
# a global pool.
HELD_OUT_7 = [(name, batches, ("adam",)) for name, batches in (
    ("resnet152", (1, 16, 64)), ("efficientnet_v2_s", (1, 16, 64)), ("mobilenet_v3_small", (1, 32, 128)),
    ("regnet_y_1_6gf", (1, 16, 64)), ("maxvit_t", (1, 16, 32)), ("vit_b_32", (1, 16, 64)),
    ("swin_v2_t", (1, 16, 32)), ("fcn_resnet50", (1, 4, 8)), ("deeplabv3_mobilenet_v3_large", (2, 8, 16)),
    ("lraspp_mobilenet_v3_large", (2, 16, 32)), ("r3d_18", (1, 8, 16)), ("r2plus1d_18", (1, 4, 8)),
    ("mc3_18", (1, 8, 16)), ("fcos_resnet50_fpn", (1, 2, 4)), ("retinanet_resnet50_fpn", (1, 2, 4)),
    ("ssdlite320_mobilenet_v3_large", (2, 8, 32)), ("fasterrcnn_mobilenet_v3_large_320_fpn", (1, 2, 4)),
    ("t5-small", (1, 8, 32)), ("bart-base", (1, 8, 32)), ("gptbigcode-small", (1, 4, 16)))]
MAXBATCH_7 = [("fcn_resnet50", "4GiB"), ("r3d_18", "4GiB"), ("t5-small", "4GiB")]
TIMED_3 = [("resnet34", 128), ("swin_t", 64), ("mnasnet1_0", 128), ("mistral-small", 16), ("lstm-lm", 64),
           ("torch-encoder", 64)]
TIMED_4 = [("alexnet", 128)]
TIMED_7 = [("resnet152", 64), ("r3d_18", 16), ("t5-small", 32)]
# (model, batch, optimizer, bf16 autocast, "train" or "infer"): the records furthest below memlint.
OPS = [("alexnet", 128, "sgd", True, "train"), ("alexnet", 128, "sgd", False, "train"),
       ("mnasnet1_0", 32, "adam", True, "train"), ("mobilenet_v2", 16, "adam", True, "train"),
       ("mobilenet_v2", 64, "sgd", True, "train"), ("squeezenet1_0", 1, "sgd", False, "train"),
       ("resnet18", 1, "sgd", False, "train"), ("resnet34", 1, "sgd", False, "train"),
       ("resnet50", 16, "adam", True, "train"), ("resnet50", 1, "sgd", False, "infer"),
       ("resnet50", 16, "sgd", True, "infer"), ("phi-small", 4, "sgd", True, "infer"),
       ("vgg16", 1, "sgd", False, "infer"), ("bert-base", 1, "sgd", False, "infer")]
# (model, capacity, batches): the measured largest batch, one above it, and memlint's.
OOM = [("vgg16", "11GiB", (123, 124, 128)), ("bert-base", "11GiB", (128, 129, 132))]
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
# The sixth round's variants of held-out models, as the calibration's ckpt, seq and opt records.
CKPT_6 = [("llama-small", 8), ("qwen3-small", 8), ("deberta-small", 16), ("gptneox-small", 8)]
SEQ_6 = [("mistral-small", 4, 128), ("mistral-small", 4, 1024), ("gptneox-small", 2, 2048), ("bert-base", 8, 512)]
OPT_6 = [("qwen3-small", 4, "adamw"), ("qwen3-small", 4, "adam_fused"), ("qwen3-small", 4, "adagrad"),
         ("qwen3-small", 4, "rmsprop"), ("swin_t", 32, "adamw"), ("swin_t", 32, "sgd_noforeach")]
# Each round: its held-out models, its timed steps, its largest batches.
ROUNDS = {1: (HELD_OUT, TIMED, MAXBATCH), 2: (HELD_OUT_2, TIMED, MAXBATCH_2), 3: (HELD_OUT_3, TIMED_3, MAXBATCH),
          4: (HELD_OUT_4, TIMED_4, MAXBATCH), 5: (HELD_OUT_5, TIMED_4, MAXBATCH), 7: (HELD_OUT_7, TIMED_7, MAXBATCH_7)}


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


def _version_of(package: str) -> str | None:
    """A library's version: model code changes between versions (Gemma2's attention did)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def warm_up() -> dict[str, Any]:
    """The protocol's env step: one matmul and one conv load cuBLAS and cuDNN before any record; a
    backward through a linear layer gives autograd's thread its cuBLAS workspace too, so that every
    record's base holds both (in the first round, the first record's did not)."""
    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if CUDA else None,
                           "gpu": torch.cuda.get_device_name() if CUDA else "cpu",
                           "transformers": _version_of("transformers"), "torchvision": _version_of("torchvision")}
    with torch.device(device()):
        a = torch.randn(256, 256)
        (a @ a).sum().item()
        torch.nn.functional.conv2d(torch.randn(1, 3, 32, 32), torch.randn(8, 3, 3, 3)).sum().item()
        torch.nn.Linear(256, 256)(a).sum().backward()
    env["allocated_after_warm_up"] = allocated()
    env["reserved_after_warm_up"] = torch.cuda.memory_reserved() if CUDA else 0
    return env


def training_step(model: torch.nn.Module, spec: Any, batch: int, optimizer: Any, amp: bool) -> None:
    with torch.device(device()):
        inputs = spec.example_inputs(batch)
        with torch.autocast(device().type, dtype=torch.bfloat16, enabled=amp):
            loss = spec.loss_fn(call(model, inputs), inputs)
        loss.backward()
        del loss
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)


def measure_step(name: str, batch: int, optimizer_name: str, amp: bool = False, seq: int | None = None,
                 checkpointing: bool = False) -> dict:
    """One record with the protocol: base before the move, peak of three steps above it."""
    clean()
    spec = spec_for(name, seq, checkpointing)
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
        call(model, inputs)
    infer = peak() - weights
    record = {"model": name, "batch": batch, "optimizer": optimizer_name, "amp": amp, "params": params,
              "param_bytes": param_bytes, "buffer_bytes": buffer_bytes, "after_model": after_model,
              "train_peaks": peaks, "train_peak": max(peaks), "infer_peak_delta": infer}
    if seq:
        record["seq"] = seq
    if checkpointing:
        record["checkpointing"] = True
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
    clean()
    base = allocated()
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
    train_peak = peak() - base
    del model, optimizer
    clean()
    return {"model": name, "batch": batch, "amp": "bf16" if amp else "None", "step_s": statistics.median(seconds),
            "train_peak": train_peak}


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


def measured_call(func: Any, args: tuple, kwargs: dict) -> tuple[Any, int, int, int]:
    """Run one op: its result, allocated before it, the bytes it returned, the bytes it took beyond them."""
    before = allocated()
    reset_peak()
    result = func(*args, **kwargs)
    after = allocated()
    return result, before, after - before, peak() - after


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Every op as [name, allocated before, returned, taken beyond, reserved after, shape, dtype]."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[list] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result, before, returned, beyond = measured_call(func, args, kwargs or {})
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        self.ops.append([str(func.overloadpacket.__name__), before, returned, beyond,
                         torch.cuda.memory_reserved() if CUDA else 0,
                         list(first.shape) if first is not None else None,
                         str(first.dtype).removeprefix("torch.") if first is not None else None])
        return result

    def mark(self, label: str) -> None:
        self.ops.append([label, allocated()])


class ConvWorkspaceLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes each convolution call takes beyond what it returns: cuDNN's workspace."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
            return func(*args, **kwargs)
        result, before, returned, workspace = measured_call(func, args, kwargs)
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
                           "returned": returned, "workspace": workspace})
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


def op_log(name: str, batch: int, optimizer_name: str, amp: bool, mode: str) -> dict:
    """Every op of a record's three training steps (or its inference forward), with the protocol's base."""
    clean()
    spec = spec_for(name)
    base = allocated()
    model = spec.build().to(device())
    log = OpLog()
    if mode == "train":
        factory = OPTIMIZERS[optimizer_name]
        optimizer = factory(list(model.parameters())) if factory else None
        with log:
            for _ in range(3):
                log.mark("step")
                training_step(model.train(), spec, batch, optimizer, amp)
        del optimizer
    else:
        model.eval()
        clean()
        base = allocated()
        with torch.no_grad(), torch.device(device()), torch.autocast(device().type, torch.bfloat16, enabled=amp), log:
            call(model, spec.example_inputs(batch))
    record = {"model": name, "batch": batch, "optimizer": optimizer_name, "amp": amp, "mode": mode, "base": base,
              "peak_above_base": peak_of(log.ops) - base, "ops": log.ops}
    del model
    clean()
    return record


def peak_of(ops: list[list]) -> int:
    """The highest allocation an op log saw: an op's start plus what it returned and took beyond it."""
    return max((op[1] + op[2] + op[3] for op in ops if len(op) > 2), default=0)


def rnn_configs(count: int, seed: int = 0, inference: bool = False) -> list[dict]:
    """A seeded sweep over cuDNN's recurrent shapes, padding edges among them; ``inference``: the
    layers in eval mode without autograd, as ``--mode infer`` runs them."""
    import random

    draw = random.Random(seed)
    configs = []
    for _ in range(count):
        kind = draw.choice(("LSTM", "LSTM", "GRU", "RNN"))
        hidden = draw.choice((1, 7, 32, 100, 256, 511, 512, 1024))
        configs.append({"kind": kind, "input": draw.choice((1, 16, 300, 512)), "hidden": hidden,
                        "layers": draw.choice((1, 2, 3)), "bidirectional": draw.random() < 0.4,
                        "seq": draw.choice((1, 5, 50, 200)), "batch": draw.choice((1, 3, 16, 64)),
                        "proj": draw.choice((0, hidden // 2)) if kind == "LSTM" and hidden > 1 else 0,
                        "amp": draw.random() < 0.3, "grad": draw.random() < 0.85})
        if inference:
            configs[-1].update(grad=False, eval=True)
    return configs


def rnn_call(config: dict) -> dict:
    """One forward (and backward where grad) of a recurrent layer: every op, cuDNN's among them."""
    clean()
    kind, extra = config["kind"], {"proj_size": config["proj"]} if config["proj"] else {}
    with torch.device(device()):
        layer = getattr(torch.nn, kind)(config["input"], config["hidden"], config["layers"], batch_first=True,
                                        bidirectional=config["bidirectional"], **extra).train(not config.get("eval"))
        x = torch.randn(config["batch"], config["seq"], config["input"], requires_grad=config["grad"])
    base = allocated()
    log = OpLog()
    with torch.set_grad_enabled(config["grad"]), torch.autocast(device().type, torch.bfloat16,
                                                                 enabled=config["amp"]), log:
        out = layer(x)[0]
        if config["grad"]:
            out.float().sum().backward()
    del layer, x, out
    clean()
    # Off cuDNN (the CPU, a script test) GRU and RNN unroll into thousands of small ops: keep the layer's own.
    return {**config, "base": base, "peak_above_base": peak_of(log.ops) - base,
            "ops": [op for op in log.ops if "rnn" in op[0] or "lstm" in op[0] or "gru" in op[0]]}


ENCODER_CONFIGS = [
    {"width": 512, "heads": 8, "ff": 2048, "batch": 16, "seq": 128, "norm_first": False, "mask": False},
    {"width": 512, "heads": 8, "ff": 2048, "batch": 16, "seq": 128, "norm_first": True, "mask": False},
    {"width": 768, "heads": 12, "ff": 3072, "batch": 8, "seq": 512, "norm_first": False, "mask": False},
    {"width": 256, "heads": 4, "ff": 1024, "batch": 64, "seq": 64, "norm_first": False, "mask": True},
    {"width": 1024, "heads": 16, "ff": 4096, "batch": 4, "seq": 256, "norm_first": False, "mask": False},
]


def encoder_inference(config: dict) -> dict:
    """nn.TransformerEncoderLayer in eval without autograd: PyTorch's fused path, op by op."""
    clean()
    with torch.device(device()):
        layer = torch.nn.TransformerEncoderLayer(config["width"], config["heads"], config["ff"], batch_first=True,
                                                 norm_first=config["norm_first"]).eval()
        x = torch.randn(config["batch"], config["seq"], config["width"])
        mask = torch.zeros(config["batch"], config["seq"], dtype=torch.bool) if config["mask"] else None
        if mask is not None:
            mask[:, config["seq"] // 2:] = True
    clean()
    base = allocated()
    log = OpLog()
    with torch.no_grad(), log:
        out = layer(x, src_key_padding_mask=mask)
    record = {**config, "base": base, "peak_above_base": peak() - base, "output_nested": out.is_nested,
              "ops": log.ops}
    del layer, x, mask, out
    clean()
    return record


def oom_diagnosis(name: str, cap_name: str, batch: int) -> dict:
    """Two SGD steps at one batch under the capacity, op by op: where they fail, or their peaks."""
    cap = int(cap_name.removesuffix("GiB")) << 30
    if CUDA:
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    log, model, optimizer = OpLog(), None, None
    record: dict[str, Any] = {"model": name, "cap": cap_name, "batch": batch}
    try:
        spec, model, optimizer = ready_to_train(name)
        record["base"] = allocated()
        with log:
            for _ in range(2):
                log.mark("step")
                training_step(model, spec, batch, optimizer, False)
        record["ran"] = True
    except torch.OutOfMemoryError as exc:
        record.update(ran=False, error=str(exc)[:400])
    stats = torch.cuda.memory_stats() if CUDA else {}
    record["stats"] = {k: v for k, v in stats.items() if k.endswith(".all.peak") or k.endswith(".all.current")
                       or k in ("num_alloc_retries", "num_ooms")}
    record["ops"] = log.ops
    del model, optimizer, log
    clean()
    if CUDA:
        torch.cuda.set_per_process_memory_fraction(1.0)
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
        summary = {k: v for k, v in result.items() if k not in ("calls", "train_peaks", "ops")}
        print(f"{key} {time.perf_counter() - started:5.1f}s {summary}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny batches, a few models: test the script")
    parser.add_argument("--phases", default="probe,steps,conv,fresh,times,maxbatch")
    parser.add_argument("--round", type=int, choices=sorted(ROUNDS), default=1, help="which held-out round")
    parser.add_argument("--conv", help="conv phase jobs instead of the default ones: model:batch[:bf16],...")
    parser.add_argument("--ops", help="ops phase jobs instead of OPS: model:batch:optimizer:fp32|bf16:train|infer,...")
    parser.add_argument("--maxbatch", help="maxbatch phase jobs instead of the round's: model:cap,...")
    parser.add_argument("--oom", help="oom phase jobs instead of OOM: model:cap:batch,...")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    phases = args.phases.split(",")
    shrink: Callable[[int], int] = (lambda b: min(b, 2)) if args.quick else (lambda b: b)
    held_out, timed, caps = ROUNDS[args.round]
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
        jobs = [(time_step, (m, shrink(b), amp)) for m, b in timed[: 1 if args.quick else None] for amp in (False, True)]
        record_all(args.out, "steps.json", "step_times", jobs, data)
    if "trace" in phases:
        jobs = [(allocation_trace, (m, shrink(b), o)) for m, b, o in TRACED[: 1 if args.quick else None]]
        record_all(args.out, "traces.json", "traces", jobs, {"env": data["env"]})
    if "ops" in phases:
        chosen = [(m, int(b), o, amp == "bf16", mode) for m, b, o, amp, mode in
                  (job.split(":") for job in args.ops.split(","))] if args.ops else OPS
        jobs = [(op_log, (m, shrink(b), o, amp, mode)) for m, b, o, amp, mode in chosen[:: 5 if args.quick else 1]]
        record_all(args.out, "ops.json", "ops", jobs, {"env": data["env"]})
    if "rnn" in phases:
        configs = rnn_configs(6 if args.quick else 160)
        record_all(args.out, "rnn.json", "rnn", [(rnn_call, (c,)) for c in configs], {"env": data["env"]})
    if "rnn_infer" in phases:
        configs = rnn_configs(6 if args.quick else 80, seed=1, inference=True)
        record_all(args.out, "rnn_infer.json", "rnn_infer", [(rnn_call, (c,)) for c in configs], {"env": data["env"]})
    if "encoder" in phases:
        jobs = [(encoder_inference, (c,)) for c in ENCODER_CONFIGS[: 1 if args.quick else None]]
        record_all(args.out, "encoder.json", "encoder", jobs, {"env": data["env"]})
    if "oom" in phases:
        chosen_oom = [(m, cap, (int(b),)) for m, cap, b in (job.split(":") for job in args.oom.split(","))] \
            if args.oom else OOM
        jobs = [(oom_diagnosis, (m, cap, shrink(b))) for m, cap, batches in chosen_oom[: 1 if args.quick else None]
                for b in batches]
        record_all(args.out, "oom.json", "oom", jobs, {"env": data["env"]})
    if "variants" in phases:
        record_all(args.out, "steps.json", "ckpt", [(measure_step, (m, shrink(b), "sgd", False, None, True))
                                                    for m, b in CKPT_6[: 1 if args.quick else None]], data)
        record_all(args.out, "steps.json", "seq", [(measure_step, (m, shrink(b), "sgd", False, seq))
                                                   for m, b, seq in SEQ_6[: 1 if args.quick else None]], data)
        record_all(args.out, "steps.json", "opt", [(measure_step, (m, shrink(b), o))
                                                   for m, b, o in OPT_6[: 1 if args.quick else None]], data)
    if "maxbatch" in phases:
        chosen_caps = [tuple(job.split(":")) for job in args.maxbatch.split(",")] if args.maxbatch else caps
        jobs = [(max_batch, (m, cap, args.quick)) for m, cap in chosen_caps[: 1 if args.quick else None]]
        record_all(args.out, "steps.json", "maxbatch", jobs, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
