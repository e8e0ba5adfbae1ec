"""The calibration workloads, rebuilt exactly as shared/calibration/README.md describes them.

Shared by the accuracy and speed benchmarks. torchvision models need the benchmark
environment (``pip install torch==2.14.1 torchvision==0.29.1``); transformers models only
need transformers. Nothing downloads weights: every model is built from its config.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

IMAGE_MODELS = ("alexnet", "vgg16", "resnet18", "resnet50", "mobilenet_v2")
SEQUENCE = {"bert-base": 128, "gpt2": 512}


@dataclass
class Spec:
    """One workload: how to build the model and its inputs, and the loss of the protocol."""

    model: str
    build: Callable[[], torch.nn.Module]
    example_inputs: Callable[[int], Any]
    loss_fn: Callable[[Any, Any], torch.Tensor]


def _image_inputs(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224)


def _image_loss(output: torch.Tensor, _inputs: Any) -> torch.Tensor:
    labels = torch.randint(0, 1000, (output.shape[0],))
    return F.cross_entropy(output, labels)


def _ids(seq: int, batch: int) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, seq))


def _bert_loss(output: Any, _inputs: Any) -> torch.Tensor:
    return output.logits.float().mean()


def _gpt2_loss(output: Any, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits.flatten(0, 1).float(), ids.flatten())


def _torchvision(name: str, checkpoint_stages: bool = False) -> torch.nn.Module:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    if checkpoint_stages:
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            setattr(model, stage, _Checkpointed(getattr(model, stage)))
    return model


class _Checkpointed(torch.nn.Module):
    """``torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)`` around one stage."""

    def __init__(self, stage: torch.nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.stage, x, use_reentrant=False)


def _transformer(name: str, checkpointing: bool = False) -> torch.nn.Module:
    import transformers

    if name == "bert-base":
        model = transformers.BertForSequenceClassification(transformers.BertConfig())
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def spec_for(model: str, seq: int | None = None, checkpointing: bool = False) -> Spec:
    if model in IMAGE_MODELS:
        return Spec(model, functools.partial(_torchvision, model, checkpointing), _image_inputs, _image_loss)
    length = seq or SEQUENCE[model]
    loss = _bert_loss if model == "bert-base" else _gpt2_loss
    return Spec(model, functools.partial(_transformer, model, checkpointing), functools.partial(_ids, length), loss)


def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


# The optimizers of the calibration protocol, by the names its records use.
OPTIMIZERS: dict[str, Callable[[list], torch.optim.Optimizer] | None] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, foreach=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-4, foreach=True),
    "none": None,
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-4, foreach=True),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-4, fused=True),
    "sgd_noforeach": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, foreach=False),
    "adagrad": lambda p: torch.optim.Adagrad(p, foreach=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, foreach=True),
    "sgd_plain": lambda p: torch.optim.SGD(p, lr=1e-3, foreach=True),
}
