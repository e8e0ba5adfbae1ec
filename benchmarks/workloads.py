"""The calibration workloads, rebuilt exactly as shared/calibration/README.md describes them.

Shared by the accuracy and speed benchmarks. torchvision models need the benchmark
environment (``pip install torch==2.14.1 torchvision==0.29.1 transformers==5.17.0``, the GPU's
transformers: model code changes between versions); transformers models only
need transformers. Nothing downloads weights: every model is built from its config.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

# torchvision models: the calibration's five, then held-out ones measured for benchmarks/measurements.
IMAGE_MODELS = ("alexnet", "vgg16", "resnet18", "resnet50", "mobilenet_v2", "densenet121", "efficientnet_b0",
                "convnext_tiny", "regnet_y_400mf", "shufflenet_v2_x1_0", "squeezenet1_0", "resnext50_32x4d",
                "vit_b_16", "resnet34", "resnet101", "wide_resnet50_2", "densenet169", "efficientnet_b1",
                "mobilenet_v3_large", "mnasnet1_0", "regnet_x_800mf", "convnext_small", "swin_t", "vgg11_bn")

# transformers models built from configs: (model class, config class, config overrides, task, sequence).
# "causal" is judged with the GPT-2 loss of the protocol, "classify" with BERT's, "image" takes 224x224 images.
TRANSFORMERS = {
    "bert-base": ("BertForSequenceClassification", "BertConfig", {}, "classify", 128),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", {}, "causal", 512),
    "llama-small": ("LlamaForCausalLM", "LlamaConfig",
                    {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 12,
                     "num_key_value_heads": 4, "vocab_size": 32000}, "causal", 512),
    "qwen2-tied": ("Qwen2ForCausalLM", "Qwen2Config",
                   {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
                    "num_key_value_heads": 2, "vocab_size": 32000, "tie_word_embeddings": True}, "causal", 512),
    "opt-125m": ("OPTForCausalLM", "OPTConfig", {}, "causal", 512),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig", {}, "classify", 128),
    "roberta-base": ("RobertaForSequenceClassification", "RobertaConfig", {}, "classify", 128),
    "vit-hf": ("ViTForImageClassification", "ViTConfig", {}, "image", None),
    "mistral-small": ("MistralForCausalLM", "MistralConfig",
                      {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
                       "num_key_value_heads": 2, "vocab_size": 32000}, "causal", 512),
    "phi-small": ("PhiForCausalLM", "PhiConfig",
                  {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 8,
                   "vocab_size": 32000}, "causal", 512),
    "bloom-small": ("BloomForCausalLM", "BloomConfig", {"hidden_size": 512, "n_layer": 6, "n_head": 8,
                                                        "vocab_size": 32000}, "causal", 512),
    "albert-base": ("AlbertForSequenceClassification", "AlbertConfig",
                    {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072}, "classify", 128),
    "electra-small": ("ElectraForSequenceClassification", "ElectraConfig", {}, "classify", 128),
    # The fifth GPU round: architectures nothing in memlint was written or checked on.
    "deberta-small": ("DebertaV2ForSequenceClassification", "DebertaV2Config",
                      {"hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 3072,
                       "vocab_size": 32000}, "classify", 128),
    "gptneox-small": ("GPTNeoXForCausalLM", "GPTNeoXConfig",
                      {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "intermediate_size": 2048,
                       "vocab_size": 32000}, "causal", 512),
    "falcon-small": ("FalconForCausalLM", "FalconConfig",
                     {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "vocab_size": 32000},
                     "causal", 512),
    "qwen3-small": ("Qwen3ForCausalLM", "Qwen3Config",
                    {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
                     "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 32000}, "causal", 512),
    "gemma2-small": ("Gemma2ForCausalLM", "Gemma2Config",
                     {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 8,
                      "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 32000}, "causal", 512),
    "stablelm-small": ("StableLmForCausalLM", "StableLmConfig",
                       {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6,
                        "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32000}, "causal", 512),
    "swin-hf": ("SwinForImageClassification", "SwinConfig", {}, "image", None),
    "convnext-hf": ("ConvNextForImageClassification", "ConvNextConfig", {}, "image", None),
    "segformer-b0": ("SegformerForImageClassification", "SegformerConfig", {}, "image", None),
    "deit-hf": ("DeiTForImageClassification", "DeiTConfig", {}, "image", None),
}
SEQUENCE = {name: entry[4] for name, entry in TRANSFORMERS.items() if entry[4]}

# Models written with torch.nn alone (cuDNN's recurrent kernels, PyTorch's fused encoder layer):
# (kind, width, layers, bidirectional, sequence).
NATIVE = {
    "lstm-lm": ("LSTM", 512, 2, False, 128),
    "gru-lm": ("GRU", 512, 2, False, 128),
    "bilstm-tagger": ("LSTM", 384, 1, True, 64),
    "torch-encoder": ("encoder", 512, 6, False, 128),
    "lstm-deep": ("LSTM", 1024, 3, False, 64),
    "bigru-tagger": ("GRU", 256, 2, True, 256),
    "rnn-tanh": ("RNN", 768, 2, False, 100),
}
VOCABULARY = 10000


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


def _classify_loss(output: Any, _inputs: Any) -> torch.Tensor:
    return output.logits.float().mean()


def _causal_loss(output: Any, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits.flatten(0, 1).float(), ids.flatten())


def _transformer(name: str, checkpointing: bool = False) -> torch.nn.Module:
    import transformers

    model_class, config_class, overrides, _task, _seq = TRANSFORMERS[name]
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**overrides))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


class _NativeModel(torch.nn.Module):
    """Token ids -> embedding -> a recurrent stack or nn.TransformerEncoder -> per-token logits."""

    def __init__(self, kind: str, width: int, layers: int, bidirectional: bool) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCABULARY, width)
        if kind == "encoder":
            layer = torch.nn.TransformerEncoderLayer(width, 8, 4 * width, batch_first=True)
            self.body: torch.nn.Module = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        else:
            self.body = getattr(torch.nn, kind)(width, width, layers, batch_first=True, bidirectional=bidirectional)
        self.head = torch.nn.Linear(width * (2 if bidirectional else 1), VOCABULARY)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.body(self.embed(ids))
        return self.head(hidden[0] if isinstance(hidden, tuple) else hidden)


class EncoderLayer(torch.nn.Module):
    """One ``nn.TransformerEncoderLayer`` as ``gpu_measure.py``'s encoder phase ran it (batch first, eval mode
    without autograd), with an all-False padding mask where ``mask``."""

    def __init__(self, width: int, heads: int, ff: int, norm_first: bool, mask: bool, batch_first: bool = True) -> None:
        super().__init__()
        self.mask = mask
        self.layer = torch.nn.TransformerEncoderLayer(width, heads, ff, batch_first=batch_first, norm_first=norm_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask:
            return self.layer(x, src_key_padding_mask=torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device))
        return self.layer(x)


# The encoder phase's records by name: "encoder-layer-<width>w-<heads>h-<ff>ff-<seq>s-<post|pre>[-mask]".
_ENCODER_LAYER = re.compile(r"encoder-layer-(\d+)w-(\d+)h-(\d+)ff-(\d+)s-(post|pre)(-mask)?$")


def encoder_layer_name(call: dict[str, Any]) -> str:
    """The workload name of one record of the encoder phase (benchmarks/measurements/*_rnn.json, ``encoder``)."""
    return (f"encoder-layer-{call['width']}w-{call['heads']}h-{call['ff']}ff-{call['seq']}s-"
            f"{'pre' if call['norm_first'] else 'post'}{'-mask' if call['mask'] else ''}")


def _encoder_layer_spec(model: str, match: re.Match) -> Spec:
    width, heads, ff, seq = (int(group) for group in match.groups()[:4])
    return Spec(model, functools.partial(EncoderLayer, width, heads, ff, match[5] == "pre", bool(match[6])),
                lambda batch: torch.randn(batch, seq, width), lambda output, _x: output.float().mean())


def _token_loss(output: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.flatten(0, 1).float(), ids.flatten())


def spec_for(model: str, seq: int | None = None, checkpointing: bool = False) -> Spec:
    layer = _ENCODER_LAYER.match(model)
    if layer:
        return _encoder_layer_spec(model, layer)
    if model in NATIVE:
        kind, width, layers, bidirectional, length = NATIVE[model]
        return Spec(model, functools.partial(_NativeModel, kind, width, layers, bidirectional),
                    functools.partial(_ids, seq or length), _token_loss)
    if model in IMAGE_MODELS:
        return Spec(model, functools.partial(_torchvision, model, checkpointing), _image_inputs, _image_loss)
    task = TRANSFORMERS[model][3]
    build = functools.partial(_transformer, model, checkpointing)
    if task == "image":
        return Spec(model, build, _image_inputs, _classify_loss)
    loss = _causal_loss if task == "causal" else _classify_loss
    return Spec(model, build, functools.partial(_ids, seq or SEQUENCE[model]), loss)


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
