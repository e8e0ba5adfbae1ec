"""Stand-ins for the CUDA kernels whose memory differs from what the CPU would run.

The simulation runs on CPU fake tensors; for a GPU target the step it predicts runs on a GPU,
where a few functions pick different kernels with different saved tensors. A TorchFunctionMode
swaps them, whatever name the user's code imported them under (for a host target the fake CPU
tensors run the CPU's own kernels, as the real step does):

* ``scaled_dot_product_attention``: on CUDA, PyTorch picks the flash or memory-efficient
  kernel (``select_sdp_backend`` in aten/src/ATen/native/transformers/cuda/sdp_utils.cpp), which
  saves the output and the log-sum-exp (fp32, ``(B, H, L)`` padded to a multiple of 32 for the
  efficient kernel, see ``_efficient_attention_forward``), never the ``L x L`` attention matrix.
  On the CPU with dropout it would fall back to the math path and materialise that matrix. Where
  no fused kernel takes the inputs, CUDA runs the math path too: grouped-query attention
  (``enable_gqa``) in fp32, which flash does not take (half precision only) and the efficient
  kernel took only from PyTorch 2.14 (the ``scaled_dot_product_attention`` docstrings of 2.13 and
  2.14; measured on an H200 with 2.11: a Llama-style model in fp32 saved one ``L x L`` matrix per
  layer, in bf16 none).
* ``dropout``: CUDA runs the fused ``native_dropout`` kernel, which saves a 1-byte bool mask;
  the CPU path (``_dropout_impl`` in Dropout.cpp) saves a mask of the input's dtype.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from memlint.function_modes import SeeThroughMode

LSE_PAD = 32  # kAlignLSE in the memory-efficient attention kernel


class _EfficientAttention(torch.autograd.Function):
    """Allocates and saves what the CUDA memory-efficient attention kernel does."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        *batch, length, _ = query.shape
        out = _kernel_output(query, value)
        lse = query.new_empty((*batch, math.ceil(length / LSE_PAD) * LSE_PAD), dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse, *(() if mask is None else (mask,)))
        ctx.has_mask = mask is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        query, key, value, out, lse, *mask = ctx.saved_tensors
        delta = lse.new_empty(lse.shape)  # the kernel's rowsum(dO * O) scratch, freed on return
        grads = (torch.empty_like(query), torch.empty_like(key), torch.empty_like(value))
        del delta
        mask_grad = torch.empty_like(mask[0]) if mask and mask[0].requires_grad else None
        return (*grads, mask_grad)


def _kernel_output(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The attention output as the CUDA kernels lay it out: ``(B, L, H, D)`` in memory, returned as
    the ``(B, H, L, D)`` view (``res.transpose(1, 2)`` in ``_scaled_dot_product_efficient_attention_cuda``
    and the flash path). So ``out.transpose(1, 2).contiguous()``, as models write it, copies nothing.
    """
    if query.dim() == 4:
        batch, heads, length, _ = query.shape
        return query.new_empty((batch, length, heads, value.shape[-1])).transpose(1, 2)
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _expand_heads(query: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention: the kernel sees keys/values repeated to the query's heads."""
    if tensor.dim() >= 3 and query.dim() >= 3 and tensor.shape[-3] != query.shape[-3]:
        return tensor.repeat_interleave(query.shape[-3] // tensor.shape[-3], dim=-3)
    return tensor


# Whether CUDA's memory-efficient attention kernel takes grouped-query attention (PyTorch >= 2.14).
EFFICIENT_ATTENTION_TAKES_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 14)


def _fused_kernel_takes(query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None,
                        enable_gqa: bool) -> bool:
    """Whether flash or the memory-efficient kernel runs these inputs on CUDA (else the math path)."""
    grouped = enable_gqa and query.dim() >= 3 and key.shape[-3] != query.shape[-3]
    flash = query.dtype in (torch.float16, torch.bfloat16) and attn_mask is None and query.shape[-1] <= 256
    return flash or not grouped or EFFICIENT_ATTENTION_TAKES_GQA


def _gpu_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False) -> torch.Tensor:
    if not _fused_kernel_takes(query, key, attn_mask, enable_gqa):
        return torch.ops.aten._scaled_dot_product_attention_math(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)[0]
    if enable_gqa:
        key, value = _expand_heads(query, key), _expand_heads(query, value)
    mask = attn_mask if attn_mask is not None and attn_mask.dtype != torch.bool else None
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (query, key, value)):
        return _kernel_output(query, value)
    return _EfficientAttention.apply(query, key, value, mask)


def _gpu_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    if not training or p == 0.0:
        return input
    return torch.ops.aten.native_dropout(input, p, True)[0]


class GpuKernelMode(SeeThroughMode):
    """Routes the functions above to their CUDA-kernel stand-ins during a simulation for a GPU target."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _gpu_sdpa(*args, **kwargs)
        if func is F.dropout or func is torch.dropout:
            return _gpu_dropout(*args, **kwargs)
        return self.call(func, args, kwargs)
