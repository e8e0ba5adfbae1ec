"""Memory per device under DDP, FSDP and ZeRO (memlint/distributed.py)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import memlint
from memlint.allocator import round_size
from memlint.distributed import ddp_buckets, plan_strategy, zero_closed_form
from memlint.estimator import Workload, analyse
from memlint.report import ModelReport
from memlint.targets import resolve_target

FAN = 1024
PARAM_BYTES = (FAN * 4 * FAN + 4 * FAN + 4 * FAN * FAN + FAN) * 4


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(FAN, 4 * FAN), nn.ReLU(), nn.Linear(4 * FAN, FAN))


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(256, 1024), nn.Linear(1024, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    """A transformer-shaped model: an embedding, a list of identical blocks, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(64, 256)
        self.layers = nn.ModuleList([Layer() for _ in range(6)])
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def run(build, strategy="none", devices=1, *, batch=16, shape=(FAN,), optimizer="adam") -> ModelReport:
    workload = Workload(name="model", path="model.py", line=1, build=build, example_inputs=None, loss_fn=None,
                        build_optimizer=None, batch_size=batch, input_shape=shape, input_dtype="float32",
                        optimizer=optimizer, precision="fp32", mode="train", strategy=strategy, devices=devices)
    return analyse(workload, resolve_target("mem:4GiB"), 1.0, find_max_batch=False)


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_per_device_peak_decreases_with_the_number_of_devices(strategy):
    peaks = [run(Stack, strategy, n, shape=(64,)).peak_allocated_bytes for n in (1, 2, 4, 8)]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == 4, peaks
    assert run(mlp, strategy, 4).peak_allocated_bytes < run(mlp).peak_allocated_bytes


def test_one_device_of_fsdp_is_the_single_device_step():
    assert run(mlp, "fsdp", 1).peak_allocated_bytes == run(mlp).peak_allocated_bytes


def test_zero1_shards_only_the_optimizer_state():
    single, zero1 = run(mlp).breakdown, run(mlp, "zero1", 4).breakdown
    # Adam: two fp32 states per parameter; each device keeps 1/4 of them (the step counters round up).
    assert single["optimizer_state"] == pytest.approx(2 * PARAM_BYTES, abs=8 * 512)
    assert zero1["optimizer_state"] == pytest.approx(2 * PARAM_BYTES / 4, abs=8 * 512)
    assert zero1["parameters"] == single["parameters"] == pytest.approx(PARAM_BYTES, abs=4 * 512)
    assert zero1["gradients"] == single["gradients"]
    # ZeRO paper, fp32 Adam (4 + 4 + 8 bytes per parameter): 8 psi + 8 psi / N of model states.
    psi = PARAM_BYTES // 4
    states = zero1["parameters"] + zero1["gradients"] + zero1["optimizer_state"]
    assert states == pytest.approx(zero_closed_form("zero1", psi, 4, params=4, grads=4, optimizer=8), rel=0.01)


def test_zero_stages_shard_more_state_in_turn():
    peaks = [run(Stack, name, 4, shape=(64,)).peak_allocated_bytes for name in ("none", "zero1", "zero2", "zero3")]
    assert peaks[0] > peaks[1] > peaks[2] > peaks[3], peaks


def test_ddp_is_at_least_one_device_and_adds_its_buckets():
    single, ddp = run(mlp), run(mlp, "ddp", 8)
    assert ddp.peak_allocated_bytes >= single.peak_allocated_bytes
    # The Reducer's flat buckets hold a second copy of every gradient.
    assert ddp.breakdown["gradients"] - single.breakdown["gradients"] == pytest.approx(PARAM_BYTES, rel=0.01)
    assert ddp.strategy == "ddp" and ddp.devices == 8


def test_ddp_buckets_match_torchs_assignment():
    tensors = [torch.empty(n) for n in (100, 300_000, 7_000_000, 5_000, 2_000_000, 4_000_000, 60)]
    limits = [1 << 20, 25 << 20]
    indices, _ = dist._compute_bucket_assignment_by_size(tensors, limits)
    expected = sorted(sum(tensors[i].numel() * 4 for i in bucket) for bucket in indices)
    assert sorted(ddp_buckets(tensors)) == expected


def test_fsdp_units_are_the_blocks_and_the_root_rest():
    plan = plan_strategy(Stack(), "fsdp", 4)
    assert [unit.name for unit in plan.units] == [f"layers.{i}" for i in range(6)] + [""]
    layer_bytes = (256 * 1024 + 1024 + 1024 * 256 + 256) * 4
    assert all(unit.gather_bytes == layer_bytes for unit in plan.units[:-1])
    assert plan.units[-1].gather_bytes == (64 * 256 + 256 + 256 * 10 + 10) * 4


def test_fsdp_gathers_one_block_and_prefetches_the_next():
    n = 64  # the shards are then small: what remains is the gathered blocks and the root
    report = run(Stack, "fsdp", n, shape=(64,))
    layer_bytes = (256 * 1024 + 1024 + 1024 * 256 + 256) * 4
    root_bytes = (64 * 256 + 256 + 256 * 10 + 10) * 4
    params = report.breakdown["parameters"]
    assert root_bytes + layer_bytes <= params <= root_bytes + 2 * layer_bytes + 6 * round_size(layer_bytes // n) * 4


def test_closed_forms_of_the_zero_paper():
    psi, n = 1_000_000, 8
    assert zero_closed_form("ddp", psi, n) == 16 * psi
    assert zero_closed_form("zero1", psi, n) == 4 * psi + 12 * psi / n
    assert zero_closed_form("zero2", psi, n) == 2 * psi + 14 * psi / n
    assert zero_closed_form("zero3", psi, n) == 16 * psi / n


def test_cli_strategy_flags_and_config(write, tmp_path):
    path = write("model.py", """
        from torch import nn
        def build_model():
            return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256))
        """)
    write("pyproject.toml", """
        [tool.memlint]
        strategy = "zero3"
        devices = 4
        checkpoint-layers = false
        epoch-size = 1000
        """)
    result = memlint("check", str(path), "--input-shape", "256", "--target", "h100-80gb", "--output-format", "json",
                     "--select", "MEM", cwd=tmp_path)
    assert result.code in (0, 1), result.err
    model = result.json()["models"][0]
    assert (model["strategy"], model["devices"]) == ("zero3", 4)
    assert model["epoch_time_s"] > 0 and model["flops_per_step"] > 0
    flags = memlint("check", str(path), "--input-shape", "256", "--target", "h100-80gb", "--output-format", "json",
                    "--strategy", "fsdp", "--devices", "2", "--select", "MEM", cwd=tmp_path)
    assert (flags.json()["models"][0]["strategy"], flags.json()["models"][0]["devices"]) == ("fsdp", 2)
    bad = memlint("check", str(path), "--devices", "0", cwd=tmp_path)
    assert bad.code == 2 and "--devices" in bad.err
