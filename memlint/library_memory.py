"""Memory that CUDA libraries take from the caching allocator, which a CPU simulation never sees.

cuBLAS: PyTorch gives every (cuBLAS handle, stream) pair a workspace from the caching allocator
the first time that handle runs a matmul, and keeps it for the life of the process
(``getCurrentCUDABlasHandle`` and ``cublas_handle_stream_to_workspace`` in
aten/src/ATen/cuda/CublasHandlePool.cpp; cuBLASLt shares it). Handles are per thread, and
autograd runs CUDA backward on its own device thread (torch/csrc/autograd/engine.cpp), so a
training step that multiplies matrices in forward and in backward holds two workspaces. Their
size is CUBLAS_WORKSPACE_CONFIG's default, ":4096:8" (32 MiB) on compute capability 9.0 and
newer, ":4096:2:16:8" (8 MiB + 128 KiB) before.

Measured on an H200 (benchmarks/measurements/h200_2026-11-26.json, ``probe``): 32 MiB more
allocated after the first matmul, 32 MiB more after the first backward through a linear layer;
a training step in a fresh process peaks 64 MiB above the same step measured after a warm-up
that ran both (the calibration protocol's ``base``).

cuDNN: a convolution asks the caching allocator for a workspace for the algorithm cuDNN's
heuristics pick and gives it back before returning (``cudnn_convolution_*`` in
aten/src/ATen/native/cudnn/Conv_v8.cpp; a plan whose workspace cannot be allocated is skipped for
the next one). Its size is cuDNN's choice, not PyTorch's, so it is modelled from what was measured:
every convolution of one training step of 12 torchvision CNNs on an H200 with cuDNN 9.19
(benchmarks/measurements/h200_2026-11-26_conv_workspace.json, 1,400 calls). The kernels run on
channels-last data, and the workspace of a k x k convolution is about one copy of each operand in
that layout: forward input + weight + output (median measured/modelled 1.00 over 208 calls);
backward the same plus the input gradient, which the data pass writes before the filter pass runs
(median 0.91 over 208 calls; input + weight + output alone would be 1.25, too low on 77% of them).
A 1 x 1 convolution is a GEMM on the NCHW data: no workspace forward (85% of 427 calls took none),
input + weight + output backward (median 0.50: on the high side). Depthwise convolutions run
PyTorch's own kernels, which take none (forward all 70 calls; backward 55 of 70).

A stem convolution on RGB input has 3 channels, fewer than the multiple that tensor-core kernels
take (8 for 16-bit data, 4 for TF32: cuDNN's "Tensor Core requirements"). Forward, a small
kernel (3 x 3, 4 x 4) then runs without a workspace: 0 in all 33 such calls measured, fp32 and
bf16, batch 1 to 64. In 16-bit, the kernels that do take one (a larger forward kernel, every
backward) work on an input padded to 8 channels (h200_2026-11-26c: forward 7 x 7 and 11 x 11 equal
to padded input + weight + output within 0.1%; backward, that model over the measured workspace is
0.86-0.98 on 8 of the 9 steps, ConvNeXt's 4 x 4 stem 0.51, where the unpadded operands gave 0.43-0.95).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from memlint.ledger import OP, Ledger

CUBLAS_WORKSPACE_HOPPER = 4096 * 1024 * 8
CUBLAS_WORKSPACE_OLDER = 4096 * 1024 * 2 + 16 * 1024 * 8

# aten ops that run on cuBLAS / cuBLASLt (attention kernels and cuDNN convolutions do not).
BLAS_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "_addmm_activation", "mv", "addmv", "dot", "vdot",
                      "addr", "_scaled_mm", "_int_mm"})

# Which thread runs a phase of the simulated step on a GPU: autograd's device thread runs backward
# (and the forward recomputed by activation checkpointing inside it); the calling thread the rest.
AUTOGRAD_THREAD_PHASES = frozenset({"backward"})


def cublas_workspace_bytes(capability: tuple[int, int] | None) -> int:
    """One handle's workspace on a device of this compute capability (None: assume a current one)."""
    return CUBLAS_WORKSPACE_HOPPER if capability is None or capability >= (9, 0) else CUBLAS_WORKSPACE_OLDER


def add_cublas_workspaces(ledger: Ledger, workspace_bytes: int) -> None:
    """Allocate one workspace, never freed, for each thread of the step that multiplies matrices.

    The workspaces are allocated before the first iteration: a process keeps them from its first
    step on, so every later step (every step an inference server runs, too) starts with them. The
    ledger is changed in place, so they count in every peak, timeline and allocator replay, and
    only where the step really uses cuBLAS.
    """
    if workspace_bytes <= 0:
        return
    threads = []
    for kind, _, name in ledger.events:
        phase, _, op = name.partition("/")
        if kind == OP and op.partition(".")[0] in BLAS_OPS and (phase in AUTOGRAD_THREAD_PHASES) not in threads:
            threads.append(phase in AUTOGRAD_THREAD_PHASES)
            if len(threads) == 2:
                break
    start = ledger.iteration_marks[0] if ledger.iteration_marks else len(ledger.events)
    for on_autograd_thread in threads:
        ledger.allocate(workspace_bytes, "workspace", None, "backward" if on_autograd_thread else "forward")
        ledger.events.insert(start, ledger.events.pop())
    ledger.iteration_marks = [mark + len(threads) * (mark > start) for mark in ledger.iteration_marks]


def persistent_workspace_bytes(ledger: Ledger) -> int:
    """The library memory a ledger keeps for the whole process (the cuBLAS workspaces, not cuDNN's scratch)."""
    return sum(info.nbytes for info in ledger.storages if info.persistent_workspace)


# Channels a tensor-core convolution kernel takes a multiple of, by element size (16-bit, TF32).
TENSOR_CORE_CHANNELS = {2: 8, 4: 4}
SMALL_STEM_KERNEL_AREA = 16  # up to 4 x 4: the stems measured without a forward workspace

_CONVOLUTION = torch.ops.aten.convolution.default
_CONVOLUTION_BACKWARD = torch.ops.aten.convolution_backward.default


def cudnn_workspace_bytes(func: Any, args: tuple, out: Any) -> int:
    """The workspace a convolution op borrows while it runs on cuDNN (0 for every other op)."""
    backward = func is _CONVOLUTION_BACKWARD
    if func is _CONVOLUTION:
        data, weight, groups, result = args[0], args[1], args[8], out
    elif backward:
        result, data, weight, groups = args[0], args[1], args[2], args[9]
    else:
        return 0
    kernel_area = math.prod(weight.shape[2:])
    if (groups > 1 and groups == data.shape[1]) or (kernel_area == 1 and not backward):  # depthwise, 1 x 1 forward
        return 0
    channels, size = data.shape[1], data.element_size()
    if groups == 1 and channels % TENSOR_CORE_CHANNELS.get(size, 1):  # an RGB stem
        if kernel_area <= SMALL_STEM_KERNEL_AREA and not backward:
            return 0
        if size == 2:
            padded_input = data.numel() // channels * TENSOR_CORE_CHANNELS[size] * size
            return padded_input + (weight.numel() + result.numel()) * size
    operands = [data, weight, result] + ([data] if backward and kernel_area > 1 else [])
    return sum(t.numel() * t.element_size() for t in operands)
