"""memlint's fake mode answers as PyTorch's FakeTensorMode does, only faster (memlint/fakemode.py)."""
from __future__ import annotations

import itertools

import pytest
import torch
from test_estimator import Lstm, small_cnn, tiny_gpt2, workload
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from memlint.estimator import analyse
from memlint.fakemode import MemlintFakeMode, new_fake_mode
from memlint.targets import resolve_target

aten = torch.ops.aten
CL = {4: torch.channels_last, 5: torch.channels_last_3d}


def _tensor(shape, dtype=torch.float32, layout="contiguous"):
    """A tensor of ``shape`` in one of the layouts a network hands to batch norm."""
    if layout == "channels_last":
        return torch.empty(shape, dtype=dtype).to(memory_format=CL[len(shape)])
    if layout == "transposed":  # dense, but neither contiguous nor channels-last
        return torch.empty((shape[0], *shape[2:], shape[1]), dtype=dtype).movedim(-1, 1)
    if layout == "sliced":  # not dense: every other sample of a larger batch
        return torch.empty((2 * shape[0], *shape[1:]), dtype=dtype)[::2]
    return torch.empty(shape, dtype=dtype)


def _described(out):
    return [None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device, t.untyped_storage().nbytes())
            for t in out]


def _run(mode, func, make_args):
    """``func`` on fakes of ``make_args()`` in ``mode``: its outputs and the running statistics' versions
    after it, or the error it raised."""
    with mode:
        args = make_args()
        try:
            out = func(*args)
        except Exception as exc:  # a single sample per channel in training: both must refuse it alike
            return type(exc).__name__, str(exc)
    stats = [a._version for a in args[3:5] if isinstance(a, torch.Tensor)] if func is aten.native_batch_norm.default \
        else []
    return _described(out), stats


BATCH_NORM_CASES = [
    (shape, layout, dtype, affine, training, stats)
    for shape, layout in [((8, 3), "contiguous"), ((4, 3, 5), "contiguous"), ((4, 3, 5), "transposed"),
                          ((2, 6, 4, 5), "contiguous"), ((2, 6, 4, 5), "channels_last"),
                          ((2, 6, 4, 5), "transposed"), ((2, 6, 4, 5), "sliced"), ((1, 6, 1, 5), "channels_last"),
                          ((2, 4, 3, 2, 5), "channels_last"), ((1, 4, 1, 1), "contiguous")]
    for dtype, affine, training, stats in itertools.product(
        (torch.float32, torch.bfloat16, torch.float16, torch.float64), (True, False), (True, False), (True, False))
    if stats or training  # eval mode needs running statistics
]


def _other_batch(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0] + 3, *shape[1:])


def _has_rule(func) -> bool:
    """Whether the mode learnt a shape-free rule for ``func`` (the ops it decomposes into learn theirs too)."""
    return any(rule is not None for key, rule in MemlintFakeMode._rules.items() if key[0] is func)


@pytest.mark.parametrize("shape,layout,dtype,affine,training,stats", BATCH_NORM_CASES)
def test_batch_norm_forward_is_laid_out_as_fake_tensor_mode_lays_it_out(shape, layout, dtype, affine, training, stats):
    channels = shape[1]
    param_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype  # autocast's mixed case

    def make_args(at=shape):
        weight = torch.empty(channels, dtype=param_dtype) if affine else None
        bias = torch.empty(channels, dtype=param_dtype) if affine else None
        running = [torch.empty(channels, dtype=param_dtype) for _ in range(2)] if stats else [None, None]
        return _tensor(at, dtype, layout), weight, bias, *running, training, 0.1, 1e-5

    expected = _run(FakeTensorMode(allow_non_fake_inputs=True), aten.native_batch_norm.default, make_args)
    MemlintFakeMode.cache_clear()
    mode = new_fake_mode()
    assert _run(mode, aten.native_batch_norm.default, make_args) == expected
    assert _run(mode, aten.native_batch_norm.default, make_args) == expected  # from the kept layouts
    assert any(mode._recipes.values()), "the shortcut was not taken"
    # At another batch size, from the rule the first shape taught (where the input is dense).
    MemlintFakeMode.cache_clear()
    _run(mode, aten.native_batch_norm.default, lambda: make_args(_other_batch(shape)))
    assert _run(mode, aten.native_batch_norm.default, make_args) == expected
    assert _has_rule(aten.native_batch_norm.default) == (layout != "sliced")


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True]])
@pytest.mark.parametrize("shape,layout,grad_layout", [((2, 6, 4, 5), "channels_last", "contiguous"),
                                                      ((2, 6, 4, 5), "contiguous", "channels_last"),
                                                      ((2, 6, 4, 5), "sliced", "transposed"),
                                                      ((4, 3, 5), "contiguous", "contiguous"),
                                                      ((8, 3), "contiguous", "contiguous")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_backward_is_laid_out_as_fake_tensor_mode_lays_it_out(mask, shape, layout, grad_layout, dtype,
                                                                          training):
    channels = shape[1]

    def make_args(at=shape):
        stats = [torch.empty(channels) for _ in range(4)]
        return (_tensor(at, dtype, grad_layout), _tensor(at, dtype, layout), torch.empty(channels), *stats,
                training, 1e-5, mask)

    expected = _run(FakeTensorMode(allow_non_fake_inputs=True), aten.native_batch_norm_backward.default, make_args)
    MemlintFakeMode.cache_clear()
    mode = new_fake_mode()
    assert _run(mode, aten.native_batch_norm_backward.default, make_args) == expected
    assert any(mode._recipes.values())
    MemlintFakeMode.cache_clear()
    _run(mode, aten.native_batch_norm_backward.default, lambda: make_args(_other_batch(shape)))
    assert _run(mode, aten.native_batch_norm_backward.default, make_args) == expected
    # The gradient must be laid out as the input (a sliced input has no rule).
    assert _has_rule(aten.native_batch_norm_backward.default) == (layout == grad_layout != "sliced")


def _pointwise_cases():
    """Pointwise ops, each with its arguments as a function of the tensor maker: same dtypes, mixed dtypes
    (promotion), a bool result, a scalar argument, and a 0-dim tensor (not of the input's layout: no rule)."""
    t = _tensor
    return [
        ("add", aten.add.Tensor, lambda at, lay: (t(at, layout=lay), t(at, layout=lay))),
        ("mul-promoted", aten.mul.Tensor, lambda at, lay: (t(at, layout=lay), t(at, torch.bfloat16, lay))),
        ("threshold_backward", aten.threshold_backward.default,
         lambda at, lay: (t(at, torch.bfloat16, lay), t(at, torch.bfloat16, lay), 0.0)),
        ("relu", aten.relu.default, lambda at, lay: (t(at, layout=lay),)),
        ("gelu", aten.gelu.default, lambda at, lay: (t(at, torch.float16, lay),)),
        ("eq", aten.eq.Tensor, lambda at, lay: (t(at, layout=lay), t(at, layout=lay))),
        ("where", aten.where.self, lambda at, lay: (t(at, torch.bool, lay), t(at, layout=lay), t(at, layout=lay))),
        ("div-scalar", aten.div.Scalar, lambda at, lay: (t(at, torch.int64, lay), 2)),
        ("add-0-dim", aten.add.Tensor, lambda at, lay: (t(at, layout=lay), torch.tensor(2.0))),
    ]


@pytest.mark.parametrize("name,func,make", _pointwise_cases(), ids=[case[0] for case in _pointwise_cases()])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("shape", [(3, 6, 4, 5), (3, 6, 1, 5), (1, 6, 4, 4)])
def test_a_pointwise_rule_lays_out_another_shape_as_fake_tensor_mode_does(monkeypatch, name, func, make, layout, shape):
    """A rule learnt at another batch size answers without FakeTensorMode, where one applies: dense tensors of
    one layout, the same dimensions of size 1 (a batch of 1 is not the batch of 4 it was learnt at)."""
    expected = _run(FakeTensorMode(allow_non_fake_inputs=True), func, lambda: make(shape, layout))
    MemlintFakeMode.cache_clear()
    mode = new_fake_mode()
    _run(mode, func, lambda: make(_other_batch(shape), layout))
    assert _has_rule(func) == (layout != "sliced" and name != "add-0-dim")
    asked = []
    dispatch = FakeTensorMode.dispatch
    monkeypatch.setattr(FakeTensorMode, "dispatch", lambda *a, **k: asked.append(a[1]) or dispatch(*a, **k))
    assert _run(mode, func, lambda: make(shape, layout)) == expected
    assert (func not in asked) == (_has_rule(func) and shape[0] > 1)


def test_a_batch_norm_the_kernels_refuse_fails_with_their_error():
    def make_args():
        return torch.empty(2, 3, 4), torch.empty(5), None, torch.empty(3), torch.empty(3), True, 0.1, 1e-5

    expected = _run(FakeTensorMode(allow_non_fake_inputs=True), aten.native_batch_norm.default, make_args)
    assert expected[0] == "RuntimeError"
    assert _run(new_fake_mode(), aten.native_batch_norm.default, make_args) == expected


@pytest.mark.parametrize("make", [lambda: torch.tensor(0.0), lambda: torch.tensor(3), lambda: torch.tensor([2.5]),
                                  lambda: torch.tensor(True), lambda: torch.tensor(1.5, dtype=torch.float64),
                                  lambda: torch.tensor([1.0, 2.0])])
def test_a_lifted_value_is_kept_as_fake_tensor_mode_keeps_it(make):
    """``torch.tensor(...)`` under the mode: the same fake tensor, value and all, read directly and from its value."""
    def described(mode: FakeTensorMode) -> tuple:
        with mode:
            tensor = make()
            value = tensor.constant
            tensor.add_(tensor)  # an update keeps the value up to date
            return (tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device, tensor.untyped_storage().nbytes(),
                    None if value is None else (value.tolist(), value.dtype, tensor.tolist(), value.tolist()))

    assert described(new_fake_mode()) == described(FakeTensorMode(allow_non_fake_inputs=True))


def test_an_in_place_foreach_update_still_refuses_lists_of_different_lengths():
    with new_fake_mode():
        params = [torch.empty(3), torch.empty(4, 5)]
        grads = [torch.empty(3), torch.empty(4, 5)]
        torch._foreach_add_(params, grads, alpha=0.1)
        assert [p.shape for p in params] == [(3,), (4, 5)]
        with pytest.raises(RuntimeError, match="same number of tensors"):
            torch._foreach_add_(params, grads[:1])


class ChannelsLastNet(nn.Module):
    """Batch norm in 1, 2 and 3 dimensions, on channels-last and sliced activations, in-place activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm2d = nn.BatchNorm2d(8)
        self.norm1d = nn.BatchNorm1d(8)
        self.norm3d = nn.BatchNorm3d(2)
        self.group = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.to(memory_format=torch.channels_last))
        x = nn.functional.relu_(self.norm2d(x))
        x = self.group(x[:, :, ::2])  # a strided slice
        x = x + self.norm3d(x.reshape(x.shape[0], 2, 4, *x.shape[2:])).flatten(1, 2)
        return self.head(self.norm1d(x.flatten(2)).mean(-1))


@pytest.mark.parametrize("build, options, target", [
    (ChannelsLastNet, dict(shape=(3, 12, 12)), "h100-80gb"),
    (ChannelsLastNet, dict(shape=(3, 12, 12), precision="bf16-mixed", optimizer="sgd-momentum"), "cpu:64GiB"),
    (ChannelsLastNet, dict(shape=(3, 12, 12), mode="infer"), "h100-80gb"),
    (lambda: Lstm(layers=2, hidden=32, dropout=0.1), dict(shape=(10, 16)), "h100-80gb"),
    (small_cnn, dict(shape=(3, 16, 16), precision="fp16-mixed"), "h100-80gb"),
    (tiny_gpt2, dict(inputs=lambda b: torch.randint(0, 500, (b, 64))), "h100-80gb"),
    (tiny_gpt2, dict(inputs=lambda b: torch.randint(0, 500, (b, 64)), precision="bf16-mixed"), "cpu:64GiB"),
])
def test_the_shortcuts_change_no_estimate(monkeypatch, build, options, target):
    """The whole analysis (the step, the largest-batch search, the layer table) as PyTorch's FakeTensorMode gives it."""
    import memlint.estimator

    def report() -> dict:
        # From a cold cache, both: FakeTensorMode's cache is shared by all its instances, and some ops
        # differ between a miss and a hit (LSTM's backward returns one bias gradient twice on a miss).
        MemlintFakeMode.cache_clear()
        return analyse(workload(build, 8, **options), resolve_target(target), 0.8).to_json(full=True)

    fast = report()
    monkeypatch.setattr(memlint.estimator, "new_fake_mode", lambda: FakeTensorMode(allow_non_fake_inputs=True))
    assert report() == fast
