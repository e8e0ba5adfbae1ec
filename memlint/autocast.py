"""CUDA autocast, as the GPU runs it, emulated over CPU fake tensors.

``torch.autocast("cpu")`` has a different op policy than ``torch.autocast("cuda")``: on a GPU,
layer norm, softmax, ``pow``, ``exp`` and the losses run in fp32, so their inputs are cast up
(a real copy, often saved for backward) and their outputs are fp32. The memory of a
mixed-precision step depends on exactly that, so this mode applies the CUDA policy of
aten/src/ATen/autocast_mode.cpp (``KERNEL_CUDA`` lists) at the torch-function level, inside
torch.nn.functional's composites too (memlint/function_modes.py), with autocast's cache of
weight casts (``cached_cast``: leaf tensors that require grad are cast once per autocast region).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

from memlint.function_modes import SeeThroughMode

T = torch.Tensor

# Ops that autocast runs in the lower precision (the "lower_precision_fp" policy).
LOWER_PRECISION: set[Callable] = {
    F.linear, torch.matmul, T.matmul, T.__matmul__, T.__rmatmul__, torch.mm, T.mm, torch.bmm, T.bmm,
    torch.baddbmm, T.baddbmm, torch.addmm, T.addmm, torch.addbmm, T.addbmm, torch.addmv, torch.addr, torch.mv,
    torch.einsum, torch.chain_matmul, torch.linalg.multi_dot, torch.linalg.vecdot, F.prelu,
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, torch.conv1d,
    torch.conv2d, torch.conv3d, torch.convolution, F.scaled_dot_product_attention,
}

# Ops that autocast runs in fp32 (the "fp32" policy): inputs are cast up.
FP32: set[Callable] = {
    torch.acos, torch.asin, torch.cosh, torch.erfinv, torch.exp, T.exp, torch.expm1, torch.log, T.log,
    torch.log10, torch.log2, torch.log1p, T.log1p, torch.reciprocal, T.reciprocal, torch.rsqrt, T.rsqrt,
    torch.sinh, torch.tan, torch.pow, T.pow, T.__pow__, T.__rpow__, F.softplus, F.layer_norm, torch.layer_norm,
    F.group_norm, torch.group_norm, F.cosine_similarity, F.poisson_nll_loss, F.cosine_embedding_loss,
    F.nll_loss, F.hinge_embedding_loss, F.kl_div, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.mse_loss,
    F.margin_ranking_loss, F.multilabel_margin_loss, F.soft_margin_loss, F.triplet_margin_loss,
    F.multi_margin_loss, F.binary_cross_entropy_with_logits, torch.dist, torch.cdist, torch.renorm,
    torch.logsumexp, T.logsumexp, F.cross_entropy,
    # The upsampling kernels F.interpolate calls (all its modes but "area"), in the list since PyTorch 2.1; an
    # H200's op log of DeepLabV3 under bf16 autocast casts the logits up before upsampling them.
    *(getattr(torch._C._nn, name) for name in (
        "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
        "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
        "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa")
      if hasattr(torch._C._nn, name)),
}

# Ops that run in fp32 through their dtype argument (the "fp32_set_opt_dtype" and "fp32_append_dtype"
# policies): no input copy, an fp32 output. Sums and norms among them: Swin V2's cosine attention
# (F.normalize) divides bf16 by an fp32 norm, an fp32 quotient, in the op log of an H200.
FP32_VIA_DTYPE: set[Callable] = {
    F.softmax, torch.softmax, T.softmax, F.log_softmax, torch.log_softmax, T.log_softmax, torch.cumsum,
    T.cumsum, torch.cumprod, T.cumprod, torch.prod, T.prod, torch.sum, T.sum, torch.norm, T.norm,
    torch.linalg.vector_norm, torch.linalg.matrix_norm,
}

# cuDNN's recurrent layers run in fp16 under autocast whatever its dtype, on weights copied into a
# new fp16 buffer at every call (``_cudnn_rnn_cast_reflatten`` in aten/src/ATen/cudnn/AutocastRNN.cpp).
FP16_ALWAYS: set[Callable] = {torch._VF.lstm, torch._VF.gru, torch._VF.rnn_tanh, torch._VF.rnn_relu}

# torchvision's ops with an autocast kernel (torchvision/csrc/ops/autocast/*.cpp): every floating input cast
# to fp32, and a floating output cast back to the first input's dtype (nms returns indices). Named, since
# torchvision registers them only when it is imported.
TORCHVISION_FP32 = frozenset({"torchvision::roi_align", "torchvision::roi_pool", "torchvision::ps_roi_align",
                              "torchvision::ps_roi_pool", "torchvision::deform_conv2d", "torchvision::nms"})

# Ops that cast all inputs to the widest floating type among them (the "promote" policy).
PROMOTE: set[Callable] = {torch.cat, torch.stack, torch.addcmul, torch.addcdiv, torch.index_put, torch.scatter_add}


def _eligible(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64


class CudaAutocastMode(SeeThroughMode):
    """``torch.autocast("cuda", dtype=...)`` semantics for the ops that decide memory."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(weight) -> (weight, its cast)

    def __exit__(self, *exc: Any) -> Any:
        self.cache.clear()  # autocast clears its cast cache when the outermost region exits
        return super().__exit__(*exc)

    def _cast(self, value: Any, dtype: torch.dtype, cache: bool = True) -> Any:
        if not _eligible(value) or value.dtype == dtype:
            return value
        # As ``cached_cast`` (aten/src/ATen/autocast_mode.cpp): leaves that require grad and are no views.
        # The entry holds the weight too, so its id cannot pass to another tensor while the entry lives.
        cacheable = cache and dtype == self.dtype and value.is_leaf and value.requires_grad and not value._is_view()
        if cacheable and id(value) in self.cache:
            return self.cache[id(value)][1]
        cast = value.to(dtype)
        if cacheable:
            self.cache[id(value)] = (value, cast)
        return cast

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if _op_name(func) in TORCHVISION_FP32:
            return self._in_fp32(func, args, kwargs)
        if func in LOWER_PRECISION:
            args, kwargs = tree_map(lambda v: self._cast(v, self.dtype), (args, kwargs))
        elif func in FP32:
            args, kwargs = tree_map(lambda v: self._cast(v, torch.float32), (args, kwargs))
        elif func in FP16_ALWAYS:
            args, kwargs = tree_map(lambda v: self._cast(v, torch.float16, cache=False), (args, kwargs))
        elif func in FP32_VIA_DTYPE and kwargs.get("dtype") is None and args and _eligible(args[0]):
            kwargs = {**kwargs, "dtype": torch.float32}
        elif func in PROMOTE:
            tensors = [v for v in tree_flatten((args, kwargs))[0] if _eligible(v)]
            if tensors:
                widest = max((t.dtype for t in tensors), key=lambda d: torch.finfo(d).bits)
                args, kwargs = tree_map(lambda v: self._cast(v, widest), (args, kwargs))
        return self.call(func, args, kwargs)

    def _in_fp32(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """A torchvision op as its autocast kernel runs it: on fp32 copies, its output cast back."""
        dtype = args[0].dtype if args and _eligible(args[0]) else None
        args, kwargs = tree_map(lambda v: self._cast(v, torch.float32, cache=False), (args, kwargs))
        out = self.call(func, args, kwargs)
        return out if dtype is None else tree_map(lambda v: self._cast(v, dtype, cache=False), out)


def _op_name(func: Any) -> str | None:
    """``namespace::name`` of an op packet or overload (torch.ops.torchvision.roi_align and its .default)."""
    packet = getattr(func, "_overloadpacket", func)
    return getattr(packet, "_qualified_op_name", None)
