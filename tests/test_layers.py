"""Each kind of layer PyTorch ships, and the usual ways of building models from them, trained on a host:
memlint's estimate equals a real CPU step, to the byte.

A host target runs the CPU's own kernels, so any difference is a place where memlint's fake tensors
and the real kernels part: a meta kernel that leaves out a buffer (oneDNN's LSTM workspace), an
output computed whatever its mask says (grid_sample's grid gradient), a model built by
``copy.deepcopy`` (nn.TransformerEncoder), a constructor that compares values (an orthogonal
parametrization), a hook that keeps PyTorch off its fused inference path. Each case is a layer
between a random input and a linear head, trained by Adam for three steps or run for inference
(``real_step_peak`` in tests/fuzzing.py).
"""
from __future__ import annotations

from typing import Any, Callable

import copy

import pytest
import torch
import torch.nn.functional as F
from fuzzing import real_step_peak
from test_estimator import workload
from torch import nn
from torch.nn.utils import parametrizations

from memlint.estimator import analyse
from memlint.targets import resolve_target


class Probe(nn.Module):
    """``layer`` (or ``apply(layer, x)``), then a linear head on the flattened result."""

    def __init__(self, layer: nn.Module, sample: torch.Tensor, apply: Callable | None = None) -> None:
        super().__init__()
        self.layer, self.apply_layer = layer, apply
        with torch.no_grad():
            width = self._body(sample)[0].numel()
        self.head = nn.Linear(width, 1)

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        y = self.apply_layer(self.layer, x) if self.apply_layer else self.layer(x)
        return (y[0] if isinstance(y, tuple) else y).flatten(1).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._body(x))


def tokens(batch: int) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, 12))


def conv(*layers: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), *layers)


class TiedEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(1000, 16)
        self.out = nn.Linear(16, 1000, bias=False)
        self.out.weight = self.embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.embedding(x))


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.relu(self.linear(x)))


class ScaledByBuffer(nn.Module):
    """A buffer with real values (``torch.full``), which the fake mode keeps as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.register_buffer("scale", torch.full((16,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


def deep_copies(block: nn.Module, times: int) -> nn.Module:
    return nn.Sequential(*(copy.deepcopy(block) for _ in range(times)))


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...] | Callable[[int], torch.Tensor], Any]] = {
    "conv1d": (lambda: nn.Conv1d(8, 16, 5, padding=2), (8, 50), None),
    "conv3d": (lambda: nn.Conv3d(3, 8, 3), (3, 8, 10, 10), None),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), (8, 12, 12), None),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(8, 4, 3, stride=2), (8, 20), None),
    "depthwise": (lambda: nn.Conv2d(16, 16, 3, groups=16, padding=1), (16, 20, 20), None),
    "dilated": (lambda: nn.Conv2d(4, 8, 3, dilation=2), (4, 20, 20), None),
    "max_pool_indices": (lambda: nn.MaxPool2d(2, return_indices=True), (4, 16, 16), None),
    "max_pool3d": (lambda: nn.MaxPool3d(2), (2, 8, 8, 8), None),
    "avg_pool1d": (lambda: nn.AvgPool1d(3), (4, 30), None),
    "adaptive_max": (lambda: nn.AdaptiveMaxPool2d(3), (4, 13, 13), None),
    "lp_pool": (lambda: nn.LPPool2d(2, 2), (4, 12, 12), None),
    "upsample_nearest": (lambda: conv(nn.Upsample(scale_factor=2)), (3, 10, 10), None),
    "upsample_bilinear": (lambda: conv(nn.Upsample(scale_factor=2, mode="bilinear")), (3, 10, 10), None),
    "upsample_bicubic": (lambda: conv(nn.Upsample(scale_factor=2, mode="bicubic")), (3, 10, 10), None),
    "pixel_shuffle": (lambda: nn.Sequential(nn.Conv2d(4, 16, 1), nn.PixelShuffle(2)), (4, 8, 8), None),
    "channel_shuffle": (lambda: nn.Sequential(nn.Conv2d(4, 8, 1), nn.ChannelShuffle(2)), (4, 8, 8), None),
    "instance_norm": (lambda: conv(nn.InstanceNorm2d(8, affine=True)), (3, 12, 12), None),
    "instance_norm_tracked": (lambda: conv(nn.InstanceNorm2d(8, track_running_stats=True)), (3, 12, 12), None),
    "layer_norm_2d": (lambda: conv(nn.LayerNorm([8, 10, 10])), (3, 12, 12), None),
    "rms_norm": (lambda: nn.Sequential(nn.Linear(32, 32), nn.RMSNorm(32)), (10, 32), None),
    "local_response_norm": (lambda: conv(nn.LocalResponseNorm(3)), (3, 12, 12), None),
    "embedding": (lambda: nn.Embedding(1000, 32), tokens, None),
    "embedding_bag": (lambda: nn.EmbeddingBag(1000, 32, mode="mean"), tokens, None),
    "embedding_bag_max": (lambda: nn.EmbeddingBag(1000, 32, mode="max"), tokens, None),
    "prelu": (lambda: nn.Sequential(nn.Linear(32, 32), nn.PReLU()), (32,), None),
    "activations": (lambda: nn.Sequential(nn.Linear(32, 32), nn.ELU(), nn.Linear(32, 32), nn.SELU(), nn.Mish(),
                                          nn.Hardswish(), nn.Softplus()), (32,), None),
    "glu": (lambda: nn.Sequential(nn.Linear(32, 64), nn.GLU()), (32,), None),
    "softmax": (lambda: nn.Sequential(nn.Linear(32, 32), nn.Softmax(-1), nn.Linear(32, 32), nn.LogSoftmax(-1)),
                (32,), None),
    "dropout2d": (lambda: conv(nn.Dropout2d(0.3), nn.AlphaDropout(0.2)), (3, 12, 12), None),
    "rnn": (lambda: nn.RNN(16, 24, batch_first=True), (9, 16), None),
    "gru": (lambda: nn.GRU(16, 24, num_layers=2, batch_first=True, bidirectional=True), (9, 16), None),
    "lstm": (lambda: nn.LSTM(16, 24, num_layers=2, batch_first=True, bidirectional=True), (9, 16), None),
    "lstm_projected": (lambda: nn.LSTM(16, 24, batch_first=True, proj_size=8), (9, 16), None),
    "lstm_cell": (lambda: nn.LSTMCell(16, 24), (16,), None),
    "gru_cell": (lambda: nn.GRUCell(16, 24), (16,), None),
    "transformer_encoder": (lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True),
                                                          2, enable_nested_tensor=False), (10, 32), None),
    "transformer_encoder_layer": (lambda: nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=True,
                                                                     activation="gelu"), (10, 32), None),
    "transformer_decoder_layer": (lambda: nn.TransformerDecoderLayer(32, 4, 64, batch_first=True), (10, 32),
                                  lambda layer, x: layer(x, x)),
    "multihead_attention": (lambda: nn.MultiheadAttention(32, 4, batch_first=True), (10, 32),
                            lambda layer, x: layer(x, x, x, need_weights=False)[0]),
    "transformer": (lambda: nn.Transformer(32, 4, 1, 1, 64, batch_first=True), (10, 32), lambda layer, x: layer(x, x)),
    "bilinear": (lambda: nn.Bilinear(16, 16, 8), (16,), lambda layer, x: layer(x, x)),
    "unfold": (lambda: nn.Unfold(3), (3, 10, 10), None),
    "cosine_similarity": (lambda: nn.Linear(16, 16), (16,),
                          lambda layer, x: F.cosine_similarity(layer(x), x).unsqueeze(1)),
    "cdist": (lambda: nn.Linear(16, 16), (5, 16), lambda layer, x: torch.cdist(layer(x), x)),
    "einsum": (lambda: nn.Linear(16, 16), (5, 16), lambda layer, x: torch.einsum("bij,bkj->bik", layer(x), x)),
    "sort": (lambda: nn.Linear(16, 16), (16,), lambda layer, x: torch.sort(layer(x).cumsum(-1), -1)[0]),
    "topk": (lambda: nn.Linear(16, 16), (16,), lambda layer, x: torch.topk(layer(x), 4, -1)[0]),
    "interpolate_area": (lambda: nn.Conv2d(3, 4, 1), (3, 12, 12),
                         lambda layer, x: F.interpolate(layer(x), size=(5, 5), mode="area")),
    "grid_sample": (lambda: nn.Conv2d(3, 4, 1), (3, 12, 12),
                    lambda layer, x: F.grid_sample(layer(x), torch.zeros(x.shape[0], 6, 6, 2), align_corners=False)),
    "reflection_pad": (lambda: nn.Conv2d(3, 4, 3), (3, 12, 12),
                       lambda layer, x: layer(F.pad(x, (2, 2, 2, 2), mode="reflect"))),
    # ways of building a model
    "deep_copied_blocks": (lambda: deep_copies(nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16)), 3), (16,), None),
    "deep_copied_batch_norm": (lambda: deep_copies(conv(nn.BatchNorm2d(8), nn.ReLU()), 1), (3, 12, 12), None),
    "shallow_copied_layer": (lambda: (lambda layer: nn.Sequential(layer, copy.copy(layer)))(nn.Linear(16, 16)),
                             (16,), None),
    "tied_weights": (TiedEmbedding, tokens, None),
    "called_twice": (CalledTwice, (16,), None),
    "buffer_with_values": (ScaledByBuffer, (16,), None),
    "weight_norm": (lambda: parametrizations.weight_norm(nn.Linear(16, 16)), (16,), None),
    "weight_norm_hooks": (lambda: nn.utils.weight_norm(nn.Linear(16, 16)), (16,), None),
    "spectral_norm": (lambda: parametrizations.spectral_norm(nn.Linear(16, 16)), (16,), None),
    "orthogonal": (lambda: parametrizations.orthogonal(nn.Linear(16, 16)), (16,), None),
}
BATCH = 4


@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_layer_on_a_host_is_estimated_to_the_byte(name, mode):
    """Trained (three Adam steps), or run for inference (one forward in eval mode without autograd, where
    PyTorch takes fused paths: a transformer layer's ``_transformer_encoder_layer_fwd``)."""
    make_layer, inputs, apply = CASES[name]
    make_inputs = inputs if callable(inputs) else lambda batch: torch.randn(batch, *inputs)
    sample = make_inputs(2)

    def build() -> nn.Module:
        return Probe(make_layer(), sample, apply)

    report = analyse(workload(build, BATCH, inputs=make_inputs, mode=mode), resolve_target("cpu:64GiB"), 1.0,
                     find_max_batch=False)
    measured = real_step_peak(build, lambda: ((make_inputs(BATCH),), {}), lambda output, _args, _kwargs: output.mean(),
                              train=mode == "train")
    assert report.peak_allocated_bytes == measured
