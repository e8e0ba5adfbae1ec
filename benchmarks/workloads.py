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
                "mobilenet_v3_large", "mnasnet1_0", "regnet_x_800mf", "convnext_small", "swin_t", "vgg11_bn",
                "resnet152", "efficientnet_v2_s", "mobilenet_v3_small", "regnet_y_1_6gf", "maxvit_t", "vit_b_32",
                "swin_v2_t")
# torchvision models of the other tasks, by family, with the inputs and losses of benchmarks/torchvision_zoo.py.
VISION_TASKS = {"fcn_resnet50": "segmentation", "deeplabv3_mobilenet_v3_large": "segmentation",
                "lraspp_mobilenet_v3_large": "segmentation", "r3d_18": "video", "r2plus1d_18": "video",
                "mc3_18": "video", "fcos_resnet50_fpn": "detection", "retinanet_resnet50_fpn": "detection",
                "ssdlite320_mobilenet_v3_large": "detection", "fasterrcnn_mobilenet_v3_large_320_fpn": "detection"}

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
    # The seventh GPU round: encoder-decoders (the decoder reads the same ids) and multi-query attention.
    "t5-small": ("T5ForConditionalGeneration", "T5Config", {"vocab_size": 32000}, "seq2seq", 256),
    "bart-base": ("BartForConditionalGeneration", "BartConfig", {"vocab_size": 32000}, "seq2seq", 256),
    "gptbigcode-small": ("GPTBigCodeForCausalLM", "GPTBigCodeConfig",
                         {"n_embd": 512, "n_layer": 6, "n_head": 8, "vocab_size": 32000, "multi_query": True},
                         "causal", 512),
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
    labels = torch.randint(0, output.shape[1], (output.shape[0],))
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


def family_inputs(family: str, name: str) -> tuple[Callable[[int], Any], Callable[[Any, Any], torch.Tensor] | None]:
    """``(example_inputs(batch), loss_fn(output, inputs) or None)`` of a torchvision family, as a model file
    would define them: detection models take two 320 x 320 images' worth of boxes per batch entry (their
    transform scales them to 800 pixels); video models clips of 8 frames of 112 x 112 (MViT and S3D: 16 of
    224 x 224); RAFT pairs of 128 x 128 frames; the others 224 x 224 images (Inception v3: 299 x 299)."""
    if family == "detection":
        def detection_inputs(batch: int) -> tuple:
            targets = [{"boxes": torch.tensor([[10.0, 20.0, 200.0, 220.0], [50.0, 60.0, 150.0, 300.0]]),
                        "labels": torch.tensor([1, 1]), "masks": torch.zeros(2, 320, 320, dtype=torch.uint8),
                        "keypoints": torch.rand(2, 17, 3) * 300} for _ in range(batch)]
            return [torch.rand(3, 320, 320) for _ in range(batch)], targets
        return detection_inputs, lambda output, _inputs: sum(output.values())
    if family == "segmentation":
        return lambda batch: torch.rand(batch, 3, 224, 224), lambda output, _inputs: output["out"].mean()
    if family == "video":  # MViT is built for 16 frames of 224 x 224, and S3D's kernels need more than 8 of 112
        frames, side = (16, 224) if name.startswith(("mvit", "s3d")) else (8, 112)
        return lambda batch: torch.rand(batch, 3, frames, side, side), None
    if family == "optical_flow":
        return (lambda batch: (torch.rand(batch, 3, 128, 128), torch.rand(batch, 3, 128, 128)),
                lambda output, _inputs: output[-1].mean())
    side = 299 if name == "inception_v3" else 224  # Inception v3's kernels need its own image size
    return lambda batch: torch.rand(batch, 3, side, side), None


def torchvision_model(family: str, name: str) -> torch.nn.Module:
    """A torchvision model without weights (a detector's or segmenter's backbone too: nothing downloads)."""
    import torchvision

    options = {"weights_backbone": None} if family in ("detection", "segmentation") else {}
    return torchvision.models.get_model(name, weights=None, **options)


class _Checkpointed(torch.nn.Module):
    """``torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)`` around one stage."""

    def __init__(self, stage: torch.nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.stage, x, use_reentrant=False)


def _classify_loss(output: Any, _inputs: Any) -> torch.Tensor:
    return output.logits.float().mean()


class _Seq2Seq(torch.nn.Module):
    """An encoder-decoder trained on token ids, its decoder reading the same ids (teacher forcing)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> Any:
        return self.model(input_ids=ids, decoder_input_ids=ids)


def _causal_loss(output: Any, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits.flatten(0, 1).float(), ids.flatten())


def _transformer(name: str, checkpointing: bool = False) -> torch.nn.Module:
    import transformers

    model_class, config_class, overrides, _task, _seq = TRANSFORMERS[name]
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**overrides))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return _Seq2Seq(model) if TRANSFORMERS[name][3] == "seq2seq" else model


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


def call(model: torch.nn.Module, inputs: Any) -> Any:
    """The model on its inputs, as memlint calls it: a tuple is its positional arguments (a detector's images
    and targets)."""
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


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
    if model in VISION_TASKS:
        family = VISION_TASKS[model]
        inputs, loss_fn = family_inputs(family, model)
        return Spec(model, functools.partial(torchvision_model, family, model), inputs, loss_fn or _image_loss)
    task = TRANSFORMERS[model][3]
    build = functools.partial(_transformer, model, checkpointing)
    if task == "image":
        return Spec(model, build, _image_inputs, _classify_loss)
    loss = _causal_loss if task in ("causal", "seq2seq") else _classify_loss
    return Spec(model, build, functools.partial(_ids, seq or SEQUENCE[model]), loss)


def needs_torchvision(model: str) -> bool:
    return model in IMAGE_MODELS or model in VISION_TASKS


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
