"""FLOPs, bytes moved and the roofline time per step (memlint/compute.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import memlint
from memlint.blocks import top_level_blocks
from memlint.estimator import Estimator, Workload, analyse
from memlint.report import ModelReport
from memlint.targets import resolve_target


def workload(build, batch=8, *, shape=None, inputs=None, optimizer="adam", mode="train", **extra) -> Workload:
    return Workload(name="model", path="model.py", line=1, build=build, example_inputs=inputs, loss_fn=None,
                    build_optimizer=None, batch_size=batch, input_shape=shape, input_dtype="float32",
                    optimizer=optimizer, precision="fp32", mode=mode, **extra)


def run(build, batch=8, target="h100-80gb", **kwargs) -> ModelReport:
    return analyse(workload(build, batch, **kwargs), resolve_target(target), 1.0, find_max_batch=False)


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 15 * 15, 64), nn.ReLU(), nn.Linear(64, 10))


def test_flops_equal_flop_counter_mode_totals_per_layer():
    batch = 4
    report = run(conv_net, batch, shape=(3, 32, 32))
    torch.manual_seed(0)
    model = conv_net()
    with FlopCounterMode(display=False) as reference:
        model(torch.randn(batch, 3, 32, 32)).mean().backward()
    counts = reference.get_flop_counts()
    assert report.flops_per_step == reference.get_total_flops() > 0
    layers = {layer.name: layer for layer in report.layers}
    for name in ("0", "2", "5", "7"):
        expected = sum(counts.get(f"Sequential.{name}", {}).values())
        assert layers[name].flops_forward + layers[name].flops_backward == expected > 0, name
    assert layers["(model)"].flops_forward + layers["(model)"].flops_backward == report.flops_per_step


def test_one_linear_matches_the_closed_form():
    batch, fan_in, fan_out = 16, 128, 64
    report = run(lambda: nn.Sequential(nn.Linear(fan_in, fan_out)), batch, shape=(fan_in,))
    layer = next(layer for layer in report.layers if layer.name == "0")
    assert layer.flops_forward == 2 * batch * fan_in * fan_out
    # The input needs no gradient: backward computes only the weight gradient.
    assert layer.flops_backward == 2 * batch * fan_in * fan_out


def test_hidden_linear_backward_is_twice_its_forward():
    report = run(lambda: nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 16)), 8, shape=(32,))
    layer = next(layer for layer in report.layers if layer.name == "1")
    assert layer.flops_forward == 2 * 8 * 64 * 16 and layer.flops_backward == 2 * layer.flops_forward


def test_attention_flops_are_counted_through_the_gpu_kernel_stand_in():
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(64, 3 * 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 4, 16).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v)

    batch, length = 2, 128
    report = run(Attention, batch, shape=(length, 64))
    root = report.layers[0]
    linear = 2 * batch * length * 64 * 192
    attention = 4 * batch * 4 * length * length * 16  # QK^T and PV, 2 FLOPs per multiply-add
    assert root.flops_forward == linear + attention
    assert root.flops_backward > 2 * attention


class Recurrent(nn.Module):
    def __init__(self, projection: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(32, 64, num_layers=2, batch_first=True, bidirectional=True, proj_size=projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


@pytest.mark.parametrize("target, projection", [("h100-80gb", 16), ("cpu:64GiB", 0)])
def test_recurrent_flops_are_counted_on_both_kinds_of_target(target, projection):
    """cuDNN's stand-in on a GPU, oneDNN's ``mkldnn_rnn_layer`` on a host (no projections there): each weight
    matrix multiplies every step of every sample; the backward's two passes twice that."""
    batch, steps = 4, 50
    report = run(lambda: Recurrent(projection), batch, target=target, shape=(steps, 32))
    matrices = sum(w.numel() for w in Recurrent(projection).lstm.parameters() if w.dim() == 2)
    lstm = next(layer for layer in report.layers if layer.name == "lstm")
    assert lstm.flops_forward == 2 * batch * steps * matrices
    assert lstm.flops_backward == 2 * lstm.flops_forward


def test_bytes_moved_count_inputs_and_outputs_not_views():
    report = run(lambda: nn.Sequential(nn.Linear(256, 256), nn.Flatten()), 8, shape=(256,), mode="infer")
    layers = {layer.name: layer for layer in report.layers}
    weights = (256 * 256 + 256) * 4
    activations = 8 * 256 * 4
    assert layers["0"].bytes_moved == weights + 2 * activations  # x and W, b read; y written
    assert layers["1"].bytes_moved == 0  # a view


def test_counting_leaves_the_recorded_step_unchanged():
    """The counter rides along the memory simulation: it must not move a single allocation or free
    (the largest-batch search interpolates between a counted and an uncounted simulation)."""
    import transformers

    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                     intermediate_size=128, vocab_size=100)
    estimator = Estimator(workload(lambda: transformers.BertModel(config), 2,
                                   inputs=lambda b: torch.randint(0, 100, (b, 16))), resolve_target("h100-80gb"), 1.0)
    estimator.simulate(2)  # the first simulation of a fake mode records a few more metadata ops (a cold cache)
    counted = estimator.simulate(2, (estimator.scale.step_counter(),)).ledger
    plain = estimator.simulate(2).ledger
    assert counted.events == plain.events
    assert [s.nbytes for s in counted.storages] == [s.nbytes for s in plain.storages]


def test_step_time_is_monotone_in_the_batch_and_a_lower_bound_note_is_given():
    times = [run(conv_net, batch, shape=(3, 32, 32)).step_time_s for batch in (1, 8, 64, 256)]
    assert all(t is not None and t > 0 for t in times)
    assert times == sorted(times) and times[-1] > 2 * times[0]
    report = run(conv_net, 8, shape=(3, 32, 32))
    assert any("lower bound" in note for note in report.compute_notes)
    assert any("allow_tf32" in note for note in report.compute_notes)


def test_epoch_time_is_steps_times_step_time():
    report = run(conv_net, 64, shape=(3, 32, 32), epoch_size=1000)
    assert report.epoch_time_s == pytest.approx(math.ceil(1000 / 64) * report.step_time_s)
    data_parallel = run(conv_net, 64, shape=(3, 32, 32), epoch_size=1000, strategy="ddp", devices=4)
    assert data_parallel.epoch_time_s == pytest.approx(math.ceil(1000 / 256) * data_parallel.step_time_s)


def test_targets_without_rates_give_no_time():
    report = run(conv_net, 8, target="mem:4GiB", shape=(3, 32, 32))
    assert report.step_time_s is None and report.flops_per_step > 0


def test_fp32_matmul_uses_the_fp32_rate_unless_tf32_is_allowed():
    matmul = lambda: nn.Sequential(nn.Linear(4096, 4096, bias=False))  # noqa: E731
    fp32 = run(matmul, 4096, shape=(4096,), mode="infer").step_time_s
    assert fp32 == pytest.approx(2 * 4096**3 / 67e12, rel=0.05)  # compute-bound at the H100's fp32 rate
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        tf32 = run(matmul, 4096, shape=(4096,), mode="infer").step_time_s
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert tf32 < fp32 / 3


def test_blocks_are_transformer_layers_or_root_children():
    import transformers

    bert = transformers.BertModel(transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                                          intermediate_size=128, vocab_size=100))
    assert top_level_blocks(bert) == ["encoder.layer.0", "encoder.layer.1"]
    assert top_level_blocks(conv_net()) == [str(i) for i in range(8)]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(256, 1024), nn.Linear(1024, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block() for _ in range(4)])
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_checkpoint_estimate_and_checkpoint_layers():
    plain = run(_Stack, 64, shape=(256,), target="mem:8GiB")
    assert [block["name"] for block in plain.checkpoint_blocks] == [f"blocks.{i}" for i in range(4)]
    saves = sum(block["saves_bytes"] for block in plain.checkpoint_blocks)
    assert saves > 0
    checkpointed = run(_Stack, 64, shape=(256,), target="mem:8GiB", checkpoint_layers=True)
    assert checkpointed.checkpoint_layers and not checkpointed.checkpoint_blocks
    saved_plain = plain.layers[0].activation_bytes
    assert checkpointed.layers[0].activation_bytes < saved_plain
    assert saved_plain - checkpointed.layers[0].activation_bytes == pytest.approx(saves, rel=0.25)
    # Recomputation runs in backward: more backward FLOPs, the same forward.
    assert checkpointed.layers[0].flops_forward == plain.layers[0].flops_forward
    assert checkpointed.layers[0].flops_backward > plain.layers[0].flops_backward


def _report(**overrides) -> ModelReport:
    values = dict(path="m.py", name="M", target="mem:4GiB", capacity_bytes=4 << 30, threshold=0.8, batch_size=64,
                  mode="train", optimizer="adam", precision="fp32", peak_allocated_bytes=4 << 30,
                  peak_device_bytes=4 << 30, max_batch_size=32, tracer="none",
                  breakdown=dict.fromkeys(("parameters", "buffers", "gradients", "optimizer_state", "activations",
                                           "inputs", "temporaries", "workspace", "context"), 0),
                  layers=[], budget_bytes=int(3.2 * 2**30))
    values.update(overrides)
    return ModelReport(**values)


def test_mem001_help_names_checkpointing_when_it_would_fit():
    from memlint.rules.mem001_batch_over_budget import checkpointing_help

    blocks = [{"name": f"layers.{i}", "activation_bytes": 300 << 20, "input_bytes": 50 << 20,
               "saves_bytes": 250 << 20} for i in range(4)]
    helpful = checkpointing_help(_report(checkpoint_blocks=blocks))
    assert helpful and "layers.0" in helpful and "torch.utils.checkpoint" in helpful and "~1.0 GiB" in helpful
    assert checkpointing_help(_report(checkpoint_blocks=blocks[:1])) is None  # would not fit: say nothing


def test_text_output_shows_flops_and_the_lower_bound(write):
    path = write("model.py", """
        from torch import nn
        def build_model():
            return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        """)
    result = memlint("check", str(path), "--input-shape", "64", "--target", "h100-80gb", "--batch-size", "32",
                     "--epoch-size", "1000", "--select", "MEM")
    assert result.code in (0, 1), result.err
    assert "FLOPs fwd" in result.out and "FLOPs bwd" in result.out
    assert "lower bound" in result.out and "time per epoch" in result.out
