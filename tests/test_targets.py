"""The target-device database (memlint/data/targets.toml) as memlint.targets reads it."""
from __future__ import annotations

import pytest

from memlint.errors import ConfigError, UsageError
from memlint.targets import DTYPES, KINDS, Target, all_targets, builtin_targets, resolve_target

GIB = 2**30
MIB = 2**20

REQUIRED = (
    "gtx1050ti", "gtx1080ti", "quadro-p6000", "tesla-k40", "xeon-e5-2620v4", "xeon-platinum-8180", "cpu",
    "t4", "v100-16gb", "v100-32gb", "a10g", "l4", "a100-40gb", "a100-80gb", "h100-80gb", "h200",
    "rtx2080ti", "rtx3060", "rtx3090", "rtx4090", "apple-m2",
)
HOSTS = ("xeon-e5-2620v4", "xeon-platinum-8180", "cpu", "apple-m2")  # size given by the user


def _gpus() -> dict[str, Target]:
    return {name: t for name, t in builtin_targets().items() if t.kind == "gpu"}


# --- the database itself ----------------------------------------------------------------------------

def test_every_required_target_loads() -> None:
    targets = builtin_targets()
    missing = set(REQUIRED) - set(targets)
    assert not missing, f"missing targets: {sorted(missing)}"
    for name in REQUIRED:
        target = targets[name]
        assert isinstance(target, Target)
        assert target.name == name
        assert target.kind in KINDS
        assert target.description and target.description != name
        assert target.native_dtypes <= set(DTYPES)
        assert "fp32" in target.native_dtypes
        assert not target.bare


@pytest.mark.parametrize("name, size", [
    ("gtx1050ti", 4 * GIB),
    ("gtx1080ti", 11 * GIB),
    ("quadro-p6000", 24 * GIB),
    ("tesla-k40", 12 * GIB),
    ("t4", 16 * GIB),
    ("v100-16gb", 16 * GIB),
    ("v100-32gb", 32 * GIB),
    ("a100-40gb", 40 * GIB),
    ("a100-80gb", 80 * GIB),
    ("h100-80gb", 80 * GIB),
    ("rtx4090", 24 * GIB),
])
def test_memory_sizes(name: str, size: int) -> None:
    assert builtin_targets()[name].memory_bytes == size


def test_h200_memory_is_at_least_what_cuda_reports() -> None:
    # cudaMemGetInfo total on the H200 the context/workspace figures were measured on.
    measured_total = 150_109_880_320
    memory = builtin_targets()["h200"].memory_bytes
    assert measured_total <= memory <= measured_total * 1.01


@pytest.mark.parametrize("name", HOSTS)
def test_hosts_have_no_builtin_size_and_keep_the_os_share(name: str) -> None:
    target = builtin_targets()[name]
    assert target.memory_bytes == 0
    assert target.workspace_bytes == 0
    assert target.compute_capability is None
    assert target.context_bytes >= GIB


def test_cpu_hosts() -> None:
    targets = builtin_targets()
    assert targets["xeon-e5-2620v4"].cores == 8
    assert targets["xeon-platinum-8180"].cores == 28
    assert targets["cpu"].cores is None
    for name in ("xeon-e5-2620v4", "xeon-platinum-8180", "cpu"):
        assert targets[name].kind == "cpu"
        assert targets[name].context_bytes == int(1.25 * GIB)
        assert targets[name].native_dtypes == {"fp32", "fp64"}
    assert targets["xeon-e5-2620v4"].peak_flops["fp32"] == pytest.approx(8 * 2.1e9 * 32, rel=0.01)
    assert targets["xeon-platinum-8180"].peak_flops["fp32"] == pytest.approx(28 * 1.7e9 * 64, rel=0.01)


def test_apple_m2_is_unified() -> None:
    m2 = builtin_targets()["apple-m2"]
    assert m2.kind == "unified"
    assert m2.native_dtypes == {"fp32", "fp16", "bf16"}
    assert m2.context_bytes == 2 * GIB


def test_every_gpu_has_capability_context_workspace_and_throughput() -> None:
    for name, gpu in _gpus().items():
        assert gpu.capability is not None, name
        assert gpu.memory_bytes > 0, name
        assert 250 * MIB <= gpu.context_bytes <= 600 * MIB, name
        assert gpu.workspace_bytes == 76 * MIB, name
        assert gpu.cores is None, name
        assert gpu.memory_bandwidth > 0, name
        for dtype in gpu.native_dtypes:
            assert gpu.peak_flops.get(dtype, 0) > 0, f"{name}: native {dtype} has no peak"


def test_measured_context_and_workspace_on_current_datacenter_gpus() -> None:
    targets = builtin_targets()
    for name in ("h200", "h100-80gb", "a100-80gb", "l4"):
        assert targets[name].context_bytes == 527 * MIB
        assert targets[name].workspace_bytes == 79_691_776  # the H200 measurement, exactly 76 MiB


def test_bf16_and_tf32_native_exactly_from_capability_8_0() -> None:
    for name, gpu in _gpus().items():
        ampere_or_newer = gpu.capability >= (8, 0)
        assert ("bf16" in gpu.native_dtypes) == ampere_or_newer, name
        assert ("tf32" in gpu.native_dtypes) == ampere_or_newer, name


def test_fp8_native_exactly_from_capability_8_9() -> None:
    for name, gpu in _gpus().items():
        assert ("fp8" in gpu.native_dtypes) == (gpu.capability >= (8, 9)), name


def test_fp16_not_native_on_consumer_pascal_or_kepler() -> None:
    targets = builtin_targets()
    for name in ("gtx1050ti", "gtx1080ti", "quadro-p6000", "tesla-k40"):
        assert "fp16" not in targets[name].native_dtypes, name
    for name in ("t4", "v100-16gb", "rtx2080ti", "a100-40gb", "h100-80gb"):
        assert "fp16" in targets[name].native_dtypes, name


def test_fp64_native_only_at_a_third_of_fp32_or_better() -> None:
    for name, target in builtin_targets().items():
        peaks = target.peak_flops
        if "fp32" not in peaks:  # the generic `cpu` host publishes no throughput
            continue
        if "fp64" in target.native_dtypes:
            assert peaks["fp64"] >= peaks["fp32"] / 3 * 0.99, name
        elif "fp64" in peaks:
            assert peaks["fp64"] < peaks["fp32"] / 3, name
    assert {n for n, t in _gpus().items() if "fp64" in t.native_dtypes} == {
        "tesla-k40", "v100-16gb", "v100-32gb", "a100-40gb", "a100-80gb", "h100-80gb", "h200"}


def test_only_the_k40_is_unsupported_by_pytorch() -> None:
    unsupported = {name for name, t in builtin_targets().items() if not t.pytorch_supported}
    assert unsupported == {"tesla-k40"}


def test_datasheet_throughput_spot_checks() -> None:
    targets = builtin_targets()
    assert targets["gtx1050ti"].peak_flops["fp32"] == pytest.approx(2.1e12, rel=0.03)
    assert targets["tesla-k40"].peak_flops["fp64"] == pytest.approx(1.43e12)
    assert targets["a100-40gb"].peak_flops["bf16"] == pytest.approx(312e12)
    assert targets["h100-80gb"].peak_flops["fp16"] == pytest.approx(989.4e12)
    assert targets["h200"].peak_flops == targets["h100-80gb"].peak_flops
    assert targets["v100-16gb"].peak_flops == targets["v100-32gb"].peak_flops
    assert targets["h200"].memory_bandwidth == pytest.approx(4.8e12)
    assert targets["gtx1050ti"].memory_bandwidth == pytest.approx(112e9)


# --- resolve_target ----------------------------------------------------------------------------------

def test_resolve_named_gpu() -> None:
    target = resolve_target("gtx1050ti")
    assert target.name == "gtx1050ti"
    assert target.memory_bytes == 4 * GIB
    assert target.compute_capability == "6.1"
    assert target.capability == (6, 1)
    assert not target.bare


def test_resolve_is_case_insensitive_and_strips() -> None:
    assert resolve_target("  GTX1050Ti ") == resolve_target("gtx1050ti")


def test_resolve_cpu_with_size() -> None:
    target = resolve_target("cpu:8GiB")
    assert target.kind == "cpu"
    assert target.memory_bytes == 8 * GIB
    assert target.context_bytes == int(1.25 * GIB)


def test_resolve_gpu_with_size_override() -> None:
    target = resolve_target("h100-80gb:40GiB")
    assert target.memory_bytes == 40 * GIB
    assert target.context_bytes == resolve_target("h100-80gb").context_bytes


@pytest.mark.parametrize("name", HOSTS)
def test_host_without_size_asks_for_one(name: str) -> None:
    with pytest.raises(UsageError) as info:
        resolve_target(name)
    assert "RAM" in info.value.message
    assert f"{name}:" in info.value.hint


def test_xeon_with_size() -> None:
    target = resolve_target("xeon-e5-2620v4:64GiB")
    assert target.memory_bytes == 64 * GIB
    assert target.cores == 8


def test_bare_capacity() -> None:
    target = resolve_target("mem:4GiB")
    assert target.bare
    assert target.memory_bytes == 4 * GIB
    assert target.context_bytes == 0
    assert target.workspace_bytes == 0
    assert target.budget_bytes(0.5) == 2 * GIB


def test_bare_capacity_needs_a_size() -> None:
    with pytest.raises(UsageError):
        resolve_target("mem")


def test_unknown_target_suggests_close_name() -> None:
    with pytest.raises(UsageError) as info:
        resolve_target("gtx1050")
    assert "gtx1050" in info.value.message
    assert "gtx1050ti" in info.value.hint


def test_bad_size_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        resolve_target("cpu:lots")


def test_budget_bytes() -> None:
    # Target.budget_bytes is the threshold's share of the card; the peak judged against it is the
    # one that already includes context and workspace (see Target.budget_bytes's docstring).
    target = resolve_target("gtx1050ti")
    assert target.budget_bytes(0.8) == int(0.8 * 4 * GIB)
    assert target.context_bytes == 300 * MIB
    assert target.workspace_bytes == 76 * MIB
    # What a training step itself may allocate on a 1050 Ti at 80 %:
    step_room = target.budget_bytes(0.8) - target.context_bytes - target.workspace_bytes
    assert step_room == int(0.8 * 4 * GIB) - 300 * MIB - 76 * MIB


# --- user tables ---------------------------------------------------------------------------------------

LAB_CARD = {
    "description": "NVIDIA RTX A6000",
    "kind": "gpu",
    "memory": "48GiB",
    "compute_capability": "8.6",
    "native_dtypes": ["fp32", "tf32", "fp16", "bf16"],
    "peak_tflops": {"fp32": 38.7, "bf16": 154.8},
    "memory_bandwidth_gbs": 768,
    "context": "527MiB",
    "workspace": "76MiB",
}


def test_user_table_adds_a_device() -> None:
    targets = all_targets({"lab-a6000": LAB_CARD})
    assert set(REQUIRED) <= set(targets)
    card = targets["lab-a6000"]
    assert card.memory_bytes == 48 * GIB
    assert card.capability == (8, 6)
    assert card.peak_flops["bf16"] == pytest.approx(154.8e12)
    assert card.memory_bandwidth == pytest.approx(768e9)
    assert resolve_target("lab-a6000", {"lab-a6000": LAB_CARD}) == card
    assert "lab-a6000" not in builtin_targets()  # the cached built-ins stay untouched


def test_user_table_with_upper_case_name_resolves() -> None:
    user = {"LabCard": {"memory": "8GiB"}}
    assert resolve_target("LabCard", user).memory_bytes == 8 * GIB
    assert resolve_target("labcard", user).memory_bytes == 8 * GIB


def test_user_table_defaults() -> None:
    card = all_targets({"tiny": {"memory": "2GiB"}})["tiny"]
    assert card.kind == "gpu"
    assert card.native_dtypes == {"fp32"}
    assert card.context_bytes == 0 and card.workspace_bytes == 0
    assert card.pytorch_supported


def test_user_table_overrides_a_builtin() -> None:
    targets = all_targets({"t4": {"memory": "15GiB", "description": "T4 with ECC on"}})
    assert targets["t4"].memory_bytes == 15 * GIB
    assert builtin_targets()["t4"].memory_bytes == 16 * GIB


@pytest.mark.parametrize("table, words", [
    ({"memory": "8GiB", "vram": "8GiB"}, "unknown keys: vram"),
    ({"description": "no size"}, "needs a memory size"),
    ({"memory": "eight gigs"}, "cannot read"),
    ({"memory": "8GiB", "kind": "tpu"}, "kind must be one of"),
    ({"memory": "8GiB", "native_dtypes": "fp16"}, "must be a list"),
    ({"memory": "8GiB", "native_dtypes": ["fp32", "float16"]}, "float16"),
    ({"memory": "8GiB", "pytorch_supported": "false"}, "pytorch_supported"),
    ({"memory": "8GiB", "cores": "many"}, "mycard"),
])
def test_bad_user_table_is_a_config_error(table: dict, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        all_targets({"mycard": table}, origin="pyproject.toml")
    assert words in info.value.message
    assert "pyproject.toml" in info.value.message


def test_user_table_that_is_not_a_table() -> None:
    with pytest.raises(ConfigError):
        all_targets({"mycard": "8GiB"})  # type: ignore[dict-item]
