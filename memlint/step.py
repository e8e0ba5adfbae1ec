"""What one step feeds the model and how it updates it: inputs, loss and optimizer.

Mirrors the calibration protocol (shared/calibration/README.md): a loss on the model's
output, ``backward()``, ``opt.step()``, ``zero_grad(set_to_none=True)``; optimizers as
PyTorch builds them by default on a GPU (the foreach implementation).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from memlint.errors import ModelError

DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
}
TOKEN_RANGE = 1000  # integer inputs are token ids drawn in [0, 1000)
AUTOCAST = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
CAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def input_factory(batch_size: int, example_inputs: Callable[[int], Any] | None,
                  input_shape: tuple[int, ...] | None, input_dtype: str, path: str,
                  cast_to: torch.dtype | None = None) -> Callable[[], tuple[tuple, dict]]:
    """A function that makes one batch of inputs (called inside the fake mode).

    ``cast_to``: for a model cast to half precision, floating inputs are cast too, as the
    training loop of such a model must do.
    """
    make = _input_factory(batch_size, example_inputs, input_shape, input_dtype, path)
    if cast_to is None:
        return make

    def cast(value: Any) -> Any:
        return value.to(cast_to) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    def make_cast() -> tuple[tuple, dict]:
        args, kwargs = make()
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
    return make_cast


def _input_factory(batch_size: int, example_inputs: Callable[[int], Any] | None,
                   input_shape: tuple[int, ...] | None, input_dtype: str, path: str) -> Callable[[], tuple[tuple, dict]]:
    if example_inputs is not None:
        def from_user() -> tuple[tuple, dict]:
            value = example_inputs(batch_size)
            if isinstance(value, dict):
                return (), value
            if isinstance(value, (tuple, list)):
                return tuple(value), {}
            return (value,), {}
        return from_user
    if input_shape is None:
        raise ModelError("memlint does not know the model's input", path=path,
                         hint="pass --input-shape 3,224,224 (per sample), set input-shape in "
                              "[tool.memlint], or define example_inputs(batch_size) in the file")
    dtype = DTYPES[input_dtype]
    shape = (batch_size, *input_shape)

    def from_shape() -> tuple[tuple, dict]:
        if dtype.is_floating_point:
            return (torch.randn(shape, dtype=dtype),), {}
        return (torch.randint(0, TOKEN_RANGE, shape, dtype=dtype),), {}
    return from_shape


def first_float_tensor(output: Any) -> torch.Tensor | None:
    """The tensor the default loss reduces: ``.logits`` when present, else the first float tensor."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        found = first_float_tensor(value)
        if found is not None:
            return found
    return None


def loss_factory(loss_fn: Callable[[Any, Any], Any] | None, path: str) -> Callable[[Any, tuple, dict], torch.Tensor]:
    def user_loss(output: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        return loss_fn(output, kwargs if kwargs and not args else args[0] if len(args) == 1 else args)

    def default_loss(output: Any, _args: tuple, _kwargs: dict) -> torch.Tensor:
        tensor = first_float_tensor(output)
        if tensor is None:
            raise ModelError("the model's output has no floating-point tensor to take a loss of", path=path,
                             hint="define loss_fn(output, inputs) in the file")
        return tensor.mean()
    return user_loss if loss_fn is not None else default_loss


OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def optimizer_factory(name: str | None, build_optimizer: Callable[[Any], Any] | None) -> OptimizerFactory | None:
    """The flag wins over the file's ``build_optimizer``; ``none`` means no optimizer state at all.

    ``foreach=True`` because that is what PyTorch picks by default for CUDA parameters
    (``_default_to_fused_or_foreach``); it would not pick it for the fake CPU tensors we run.
    """
    if name is None and build_optimizer is not None:
        return build_optimizer
    choice = name or "adam"
    builders: dict[str, OptimizerFactory | None] = {
        "sgd": lambda params: torch.optim.SGD(params, lr=1e-3, foreach=True),
        "sgd-momentum": lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True),
        "adam": lambda params: torch.optim.Adam(params, lr=1e-4, foreach=True),
        "adamw": lambda params: torch.optim.AdamW(params, lr=1e-4, foreach=True),
        "none": None,
    }
    return builders[choice]
