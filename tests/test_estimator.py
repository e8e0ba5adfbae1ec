"""The estimator on real models built in the tests and from transformers configs (no downloads)."""
from __future__ import annotations

import collections
import random

import pytest
import torch
from torch import nn

import memlint.estimator
from memlint.allocator import OutOfMemory, fits_without_replay, replay_allocator, round_size
from memlint.estimator import Estimator, Workload, analyse
from memlint.ledger import Ledger, interpolated_sizes
from memlint.targets import resolve_target


def workload(build, batch=8, *, inputs=None, shape=None, dtype="float32", optimizer="adam", precision="fp32",
             mode="train", loss=None) -> Workload:
    return Workload(name="model", path="model.py", line=1, build=build, example_inputs=inputs, loss_fn=loss,
                    build_optimizer=None, batch_size=batch, input_shape=shape, input_dtype=dtype,
                    optimizer=optimizer, precision=precision, mode=mode)


def estimated_and_real_on_host(model, batch: int, shape: tuple[int, ...], precision: str = "fp32"):
    """memlint's report on a host target and the peak of real CPU steps of the same model (to the byte, as
    a host runs the CPU's own kernels): random inputs of ``shape`` per sample, the output's mean as loss."""
    from fuzzing import real_step_peak

    report = analyse(workload(model, batch=batch, shape=shape, precision=precision), resolve_target("cpu:64GiB"), 1.0,
                     find_max_batch=False)
    measured = real_step_peak(model, lambda: ((torch.randn(batch, *shape),), {}),
                              lambda output, _args, _kwargs: output.mean(),
                              autocast_dtype=torch.bfloat16 if precision == "bf16-mixed" else None)
    return report, measured


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 10))


PARAM_BYTES = (512 * 1024 + 1024 + 1024 * 10 + 10) * 4


def test_model_state_matches_closed_form_with_adam():
    report = analyse(workload(mlp, shape=(512,)), resolve_target("mem:1GiB"), 1.0, find_max_batch=False)
    b = report.breakdown
    assert b["parameters"] == sum(round_size(n * 4) for n in (512 * 1024, 1024, 1024 * 10, 10))
    assert b["optimizer_state"] >= 2 * PARAM_BYTES  # exp_avg and exp_avg_sq (+ step counters)
    assert report.peak_allocated_bytes >= 3 * PARAM_BYTES


@pytest.mark.parametrize("optimizer, state_tensors", [("none", 0), ("sgd", 0), ("sgd-momentum", 1), ("adam", 2)])
def test_optimizer_state_scales_with_the_optimizer(optimizer, state_tensors):
    report = analyse(workload(mlp, shape=(512,), optimizer=optimizer), resolve_target("mem:1GiB"), 1.0,
                     find_max_batch=False)
    state = report.breakdown["optimizer_state"]
    assert state_tensors * PARAM_BYTES <= state <= state_tensors * PARAM_BYTES + 64 * 1024


def test_activations_grow_linearly_with_the_batch():
    small = analyse(workload(mlp, batch=64, shape=(512,)), resolve_target("mem:1GiB"), 1.0, find_max_batch=False)
    large = analyse(workload(mlp, batch=128, shape=(512,)), resolve_target("mem:1GiB"), 1.0, find_max_batch=False)
    assert large.breakdown["activations"] == pytest.approx(2 * small.breakdown["activations"], rel=0.02)


def test_max_batch_fits_and_the_next_does_not():
    target = resolve_target("mem:256MiB")
    estimator = Estimator(workload(mlp, shape=(512,)), target, 1.0)
    best = analyse(workload(mlp, shape=(512,)), target, 1.0).max_batch_size
    assert best is not None and best > 8
    assert estimator.evaluate(best).fits and not estimator.evaluate(best + 1).fits


def test_bounds_decide_a_probe_only_as_the_allocator_replay_would():
    """``fits_without_replay`` answers None or the verdict of the capped replay, on random steps of small, large and
    huge requests (some of them elastic kernel scratch), at their own sizes and at other sizes."""
    rng = random.Random(5)
    decided: collections.Counter = collections.Counter()
    for trial in range(400):
        ledger, live = Ledger(), []
        for _ in range(rng.randint(1, 60)):
            if live and rng.random() < 0.4:
                ledger.free(live.pop(rng.randrange(len(live))))
            else:
                size = rng.choice([rng.randint(1, 1 << 20), rng.randint(1 << 20, 12 << 20),
                                   rng.randint(12 << 20, 200 << 20)])
                live.append(ledger.allocate(size, "activations", None, "forward", elastic=rng.random() < 0.1))
        sizes = None if trial % 2 else [rng.randint(0, 2 * info.nbytes) for info in ledger.storages]
        cap = rng.randint(2 << 20, 600 << 20)
        try:
            replay_allocator(ledger, cap_bytes=cap, sizes=sizes)
            fits = True
        except OutOfMemory:
            fits = False
        verdict = fits_without_replay(ledger, cap, sizes)
        assert verdict in (None, fits)
        decided[verdict] += 1
    assert min(decided[True], decided[False], decided[None]) > 40


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


@pytest.mark.parametrize("build, shape, target", [(mlp, (512,), "mem:128MiB"), (mlp, (512,), "mem:4GiB"),
                                                  (small_cnn, (3, 64, 64), "gtx1050ti")])
def test_the_largest_batch_is_the_one_that_replaying_every_probe_finds(monkeypatch, build, shape, target):
    def search() -> int | None:
        return analyse(workload(build, shape=shape), resolve_target(target), 0.8).max_batch_size

    found = search()
    monkeypatch.setattr(memlint.estimator, "fits_without_replay", lambda *args: None)
    assert found is not None and found == search()


def test_inference_mode_saves_nothing_for_backward():
    report = analyse(workload(mlp, shape=(512,), mode="infer"), resolve_target("mem:1GiB"), 1.0,
                     find_max_batch=False)
    assert report.breakdown["activations"] == 0 and report.breakdown["gradients"] == 0


class DataDependent(nn.Module):
    """Stochastic depth and a data-dependent selection: both need values fake tensors lack."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(1).item() < 0.9:
            x = self.body(x)
        kept = x[torch.nonzero(x.sum(-1) > 0).squeeze(-1)]
        return kept.relu()


def test_data_dependent_ops_are_assumed_and_reported():
    report = analyse(workload(DataDependent, shape=(64,)), resolve_target("mem:1GiB"), 1.0, find_max_batch=False)
    assert report.peak_allocated_bytes > 0
    assert any(".item()" in note for note in report.assumptions)
    assert any("nonzero" in note for note in report.assumptions)
    assert report.tracer == "aten ops"


class Checkpointed(nn.Module):
    def __init__(self, checkpoint: bool = True) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
                                    for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpoint else block(x)
        return x


def test_activation_checkpointing_is_modelled():
    def run(checkpoint: bool):
        return analyse(workload(lambda: Checkpointed(checkpoint), batch=2048, shape=(256,), optimizer="sgd"),
                       resolve_target("mem:4GiB"), 1.0, find_max_batch=False)

    plain, saved = run(False), run(True)
    # Per block only the input is kept instead of both Linear inputs and the GELU input.
    assert saved.layers[0].activation_bytes < plain.layers[0].activation_bytes / 2
    assert saved.peak_allocated_bytes < 0.7 * plain.peak_allocated_bytes


def test_gpt2_from_config_uses_gpu_attention_and_its_aten_ops():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=256, vocab_size=1000)
    report = analyse(workload(lambda: transformers.GPT2LMHeadModel(config), batch=4,
                              inputs=lambda b: torch.randint(0, 1000, (b, 256))),
                     resolve_target("h100-80gb"), 0.8, find_max_batch=False)
    assert report.tracer == "aten ops"
    # Each op is the module's that runs it: the layers' output shapes come from the trace.
    shapes = {layer.name: layer.output_shape for layer in report.layers}
    assert shapes["transformer.h.0"] == [[4, 256, 128]] and shapes["lm_head"] == [[4, 256, 1000]]
    # The L x L attention matrix (4 x 4 heads x 256 x 256 x 4 B = 4 MiB per layer) is never saved:
    # the GPU kernel keeps only the log-sum-exp.
    attention_matrix = 4 * 4 * 256 * 256 * 4
    assert report.breakdown["activations"] < 2 * 20 * attention_matrix


def test_bf16_mixed_precision_keeps_fp32_weights_and_halves_activations():
    fp32 = analyse(workload(mlp, batch=512, shape=(512,)), resolve_target("a100-80gb"), 0.8, find_max_batch=False)
    mixed = analyse(workload(mlp, batch=512, shape=(512,), precision="bf16-mixed"), resolve_target("a100-80gb"),
                    0.8, find_max_batch=False)
    assert mixed.breakdown["parameters"] == fp32.breakdown["parameters"]
    # Saved: ReLU's output (halved in bf16) and the first Linear's input, which in fp32 is the batch
    # itself (counted under `inputs`) and under autocast its bf16 copy (an activation): 0.75 exactly.
    assert mixed.breakdown["activations"] <= 0.75 * fp32.breakdown["activations"]


class NormalisedConvNet(nn.Module):
    """Ops from each of autocast's lists: convolution and linear (bf16), layer norm and softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16 * 8 * 8)
        self.head = nn.Linear(16 * 8 * 8, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x).relu().flatten(1))
        return self.head(y).softmax(-1)


class NormalisedTokens(nn.Module):
    """Layer and group norm over many tokens: their saved statistics and gradients are kilobytes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.norm = nn.LayerNorm(64)
        self.groups = nn.GroupNorm(8, 64)
        self.batch = nn.BatchNorm1d(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.embed(x)).transpose(1, 2)
        return self.batch(self.groups(y).relu())


@pytest.mark.parametrize("model, shape", [(NormalisedConvNet, (3, 8, 8)), (NormalisedTokens, (128, 16))])
def test_a_host_target_runs_the_cpus_autocast_policy(model, shape):
    """bf16-mixed on a CPU target is torch.autocast("cpu"): the estimate equals a real CPU step's peak."""
    report, measured = estimated_and_real_on_host(model, 16, shape, precision="bf16-mixed")
    assert report.peak_allocated_bytes == measured


NORMS = {  # op: (inputs from a half-precision tensor and parameters (or None), the op's call)
    "layer_norm": lambda x, w, b: torch.ops.aten.native_layer_norm(x, [x.shape[-1]], w, b, 1e-5),
    "group_norm": lambda x, w, b: torch.ops.aten.native_group_norm(x, w, b, x.shape[0], x.shape[1], x.shape[2], 4,
                                                                   1e-5),
    "batch_norm": lambda x, w, b: torch.ops.aten.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5),
}


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("params", [torch.float32, torch.bfloat16, None])
def test_normalisation_outputs_have_the_cpu_kernels_dtypes(norm, params):
    """Saved statistics and input gradients of the norms, simulated for a host, as the CPU kernels make them
    (the meta kernels give bf16 statistics for fp32 weights, and group norm an fp32 input gradient)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memlint.simulate import Assumptions, ValueAssumingMode

    def step(mode_stack):
        x = torch.randn(4, 8, 32, dtype=torch.bfloat16, requires_grad=True)
        w = b = None if params is None else torch.ones(8 if norm != "layer_norm" else 32, dtype=params)
        with mode_stack():
            x = x.detach().requires_grad_()
            outputs = NORMS[norm](x, w, b)
            outputs[0].float().sum().backward()
            return [t.dtype for t in outputs if isinstance(t, torch.Tensor)] + [x.grad.dtype]

    import contextlib

    @contextlib.contextmanager
    def simulated():
        with FakeTensorMode(allow_non_fake_inputs=True), ValueAssumingMode(Assumptions(), kernels="cpu"):
            yield

    assert step(simulated) == step(contextlib.nullcontext)


def test_tied_weights_are_counted_once():
    def tied() -> nn.Module:
        embedding = nn.Embedding(1000, 64)
        head = nn.Linear(64, 1000, bias=False)
        head.weight = embedding.weight
        return nn.Sequential(embedding, head)

    report = analyse(workload(tied, inputs=lambda b: torch.randint(0, 1000, (b, 16))), resolve_target("mem:1GiB"),
                     1.0, find_max_batch=False)
    assert report.breakdown["parameters"] == round_size(1000 * 64 * 4)
    assert report.breakdown["gradients"] <= round_size(1000 * 64 * 4)


class NormalisedDataDependent(DataDependent):
    """Batch norm (its buffers change in place every step) after the data-dependent ops."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class CachesOnFirstForward(nn.Module):
    """Keeps a table its first forward makes (as a position cache is built): the second forward finds more."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64))
        self.table: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            self.table = torch.ones(4096, 64)
        return self.body(x) + self.table[: x.shape[0]]


def checkpointed_normalised() -> nn.Module:
    return nn.Sequential(NormalisedDataDependent(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))


@pytest.mark.parametrize("build, shape, optimizer, strategy, checkpoint, copies", [
    (NormalisedDataDependent, (64,), "adam", "none", False, "forward and backward"),
    (NormalisedDataDependent, (64,), "adam", "fsdp", False, "forward and backward"),
    (checkpointed_normalised, (64,), "sgd-momentum", "zero2", True, "forward and backward"),
    # cuDNN's LSTM backward makes the weights' gradients views of one storage
    (lambda: Lstm(layers=2), (12, 16), "adamw", "none", False, "forward and backward"),
    (NormalisedDataDependent, (64,), "sgd", "none", False, "whole iterations"),  # SGD keeps no state
    (CachesOnFirstForward, (64,), "adam", "none", False, "from the third iteration"),
])
def test_a_copied_iteration_records_what_simulating_it_would(monkeypatch, build, shape, optimizer, strategy,
                                                             checkpoint, copies):
    """An iteration is copied, whole or up to its optimizer step, where the one before shows how
    (memlint/simulate.py): the ledger, the strategy's unit marks, the FLOP counts and the assumptions
    must equal a full simulation's. The copies are counted, so that each case takes the path it names."""
    import memlint.simulate

    estimator = Estimator(Workload(name="model", path="model.py", line=1, build=build, example_inputs=None,
                                   loss_fn=None, build_optimizer=None, batch_size=8, input_shape=shape,
                                   input_dtype="float32", optimizer=optimizer, precision="fp32", mode="train",
                                   strategy=strategy, devices=2, checkpoint_layers=checkpoint),
                          resolve_target("h100-80gb"), 1.0)
    estimator.simulate(8)  # the first simulation of a fake mode records a few more metadata ops (a cold cache)
    made = {"forward and backward": 0, "whole iterations": 0}

    def counted(name, function):
        def call(*args, **kwargs):
            made[name] += 1
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(memlint.simulate, "_copy_forward_backward",
                        counted("forward and backward", memlint.simulate._copy_forward_backward))
    monkeypatch.setattr(memlint.simulate, "_repeat_last_iteration",
                        counted("whole iterations", memlint.simulate._repeat_last_iteration))
    iterations = estimator.plan(8).iterations

    def simulate() -> tuple:
        counter = estimator.scale.step_counter()
        result = estimator.simulate(8, (counter,))
        return (result.ledger.events, result.ledger.storages, result.ledger.iteration_marks, result.assumptions,
                result.activation_bytes_by_module, counter.total_flops, counter.total_bytes, counter.forward,
                counter.backward, counter.moved, counter.seconds)

    copied = simulate()
    assert made == {"forward and backward": int(copies == "forward and backward"), "whole iterations": 1}
    assert len(copied[2]) == iterations == 3
    monkeypatch.setattr(memlint.simulate, "FIRST_COPIED", iterations + 1)
    assert copied == simulate()
    assert made == {"forward and backward": int(copies == "forward and backward"), "whole iterations": 1}


@pytest.mark.parametrize("batch, answer_simulated", [(8, False), (2000, True), (6000, True)])
def test_the_answer_is_simulated_where_that_can_change_its_verdict(monkeypatch, batch, answer_simulated):
    """The largest batch is evaluated again with a simulation at it only where that simulation would
    take part in its interpolation (an answer between or below the simulated sizes, not beyond them)."""
    def search() -> tuple:
        estimator = Estimator(workload(mlp, batch, shape=(512,)), resolve_target("mem:128MiB"), 1.0)
        estimator.simulated_ledger(batch)
        answer = estimator.max_batch_size()
        return answer, estimator.evaluations[answer].reserved, answer in estimator.simulated

    answer, reserved, simulated = search()
    monkeypatch.setattr(Estimator, "_interpolated_regardless", lambda self, batch_size: False)
    assert simulated == answer_simulated and (answer, reserved) == search()[:2]


class PairwiseLogits(nn.Module):
    """A contrastive head: every sample's projection against every other's, so the loss's logits and their
    gradients grow with the square of the batch (``cube=True``: every triple of samples, the cube)."""

    def __init__(self, cube: bool = False) -> None:
        super().__init__()
        self.projection = nn.Linear(64, 32)
        self.cube = cube

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.projection(x)
        logits = features @ features.T
        return logits[:, :, None] - logits[:, None, :] if self.cube else logits


def contrastive_loss(logits: torch.Tensor, _batch) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(1), torch.arange(logits.shape[0]))


def pairwise_search(batch: int, cube: bool, every_size: bool) -> tuple[int | None, Estimator]:
    """The largest batch of a PairwiseLogits model on 128 MiB, the step simulated at ``batch``; with
    ``every_size``, every probe of the search simulated (no interpolation)."""
    estimator = Estimator(workload(lambda: PairwiseLogits(cube), batch, shape=(64,), loss=contrastive_loss),
                          resolve_target("mem:128MiB"), 0.8)
    estimator.simulated_ledger(batch)
    estimator.simulate_every_size = every_size
    return estimator.max_batch_size(), estimator


@pytest.mark.parametrize("batch", [16, 64, 3000])
def test_a_batch_by_batch_product_is_searched_on_a_parabola(batch):
    """A line through two simulated batch sizes passes under a quadratic size beyond them: the search
    answered 18,016 from a step at batch 64 where 1,321 is the largest that fits, and a different answer
    for each batch size asked. Through a third simulation the sizes are exact, and so is the answer,
    with four simulations where simulating every probe takes twenty."""
    exact, _ = pairwise_search(64, cube=False, every_size=True)
    answer, estimator = pairwise_search(batch, cube=False, every_size=False)
    assert answer == exact == 1321
    assert estimator.curve is not None and not estimator.simulate_every_size and len(estimator.simulated) == 4


def test_a_size_the_parabola_misses_makes_the_search_simulate_every_probe():
    """Sizes of a higher degree (every triple of the batch): the simulation at the parabola's answer is not
    what it predicted, and the search runs again with every probe simulated."""
    exact, _ = pairwise_search(64, cube=True, every_size=True)
    answer, estimator = pairwise_search(64, cube=True, every_size=False)
    assert answer == exact and answer is not None and estimator.simulate_every_size


@pytest.mark.parametrize("build, shape, target", [(mlp, (512,), "mem:128MiB"), (small_cnn, (3, 64, 64), "gtx1050ti")])
def test_sizes_affine_in_the_batch_take_no_third_simulation(build, shape, target):
    estimator = Estimator(workload(build, shape=shape), resolve_target(target), 0.8)
    estimator.simulated_ledger(8)
    assert estimator.max_batch_size() is not None
    assert estimator.curve is None and not estimator.simulate_every_size and sorted(estimator.simulated) == [8, 16]


@pytest.mark.parametrize("degree", [1, 2])
def test_interpolated_sizes_are_exact_on_their_polynomial_and_round_up(degree):
    def ledger(batch: int) -> Ledger:
        made = Ledger()
        for constant, linear, square in [(4096, 0, 0), (0, 512, 0), (100, 3, 0), (0, 0, 4), (7, 5, 2)]:
            made.allocate(constant + linear * batch + square * batch * batch * (degree == 2), "activations", None,
                          "forward")
        return made

    points = [(ledger(batch), batch) for batch in (8, 16, 32)[:degree + 1]]
    for batch in (1, 9, 24, 100, 5000):
        assert interpolated_sizes(points, batch) == [info.nbytes for info in ledger(batch).storages]
    uneven = [Ledger(), Ledger()]
    for made, nbytes in zip(uneven, (1024, 1537)):
        made.allocate(nbytes, "activations", None, "forward")
    assert interpolated_sizes([(uneven[0], 2), (uneven[1], 4)], 3) == [1281]  # 1,280.5, rounded up


class Lstm(nn.Module):
    """An LSTM over (sequence, 16) samples: trained through oneDNN on a CPU, which keeps a workspace per layer."""

    def __init__(self, layers: int = 1, bidirectional: bool = False, bias: bool = True, batch_first: bool = True,
                 hidden: int = 24, dropout: float = 0.0) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.lstm = nn.LSTM(16, hidden, num_layers=layers, bias=bias, batch_first=batch_first,
                            bidirectional=bidirectional, dropout=dropout)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x if self.batch_first else x.transpose(0, 1))[0])


@pytest.mark.parametrize("options, precision, batch, steps", [
    (dict(), "fp32", 4, 9),
    # 4 x 64 gates: rows of 256 elements, which oneDNN pads against 4K aliasing
    (dict(layers=3, bidirectional=True, bias=False, batch_first=False, hidden=64, dropout=0.1), "fp32", 4, 9),
    (dict(hidden=192), "fp32", 16, 40),
    (dict(layers=2, bidirectional=True), "bf16-mixed", 4, 9),
])
def test_an_lstm_on_a_host_holds_onednns_workspace(options, precision, batch, steps):
    """The meta kernel of oneDNN's LSTM returns an empty workspace; a real CPU step keeps one per layer
    and direction for the backward (memlint/onednn.py): without it these estimates were 12% to 67% low."""
    report, measured = estimated_and_real_on_host(lambda: Lstm(**options), batch, (steps, 16), precision)
    assert report.peak_allocated_bytes == measured


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.1),
                         nn.Conv2d(16, 16, 3, stride=2), nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


def tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64,
                                                                vocab_size=500))


def allocations(ledger) -> tuple:
    from memlint.ledger import OP
    return [event for event in ledger.events if event[0] != OP], ledger.storages, ledger.iteration_marks


class SparseEmbedding(nn.Module):
    """A recommender's embedding with sparse gradients: a gradient is a sparse tensor (indices and values)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(5000, 64, sparse=True)
        self.head = nn.Linear(64, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(ids).mean(1))


def token_ids(batch: int) -> torch.Tensor:
    return torch.randint(0, 5000, (batch, 20))


@pytest.mark.parametrize("optimizer, momentum", [("sgd", 0.0), ("sgd-momentum", 0.9)])
def test_sparse_gradients_are_estimated_as_a_real_step_holds_them(optimizer, momentum):
    """A sparse gradient has no storage of its own, and fake tensors clone it empty: memlint had refused it."""
    from fuzzing import real_step_peak

    report = analyse(workload(SparseEmbedding, 32, inputs=token_ids, optimizer=optimizer),
                     resolve_target("cpu:64GiB"), 1.0, find_max_batch=False)
    measured = real_step_peak(SparseEmbedding, lambda: ((token_ids(32),), {}),
                              lambda output, _args, _kwargs: output.mean(),
                              optimizer_factory=lambda params: torch.optim.SGD(params, lr=1e-3, momentum=momentum,
                                                                               foreach=True))
    assert report.breakdown["gradients"] >= round_size(32 * 20 * 64 * 4)  # the values: a row per id looked up
    assert report.peak_allocated_bytes == measured


@pytest.mark.parametrize("build, options", [
    (NormalisedDataDependent, dict(shape=(64,))),
    (SparseEmbedding, dict(inputs=token_ids, optimizer="sgd")),
    (small_cnn, dict(shape=(3, 16, 16), precision="bf16-mixed", optimizer="sgd-momentum")),
    (tiny_gpt2, dict(inputs=lambda b: torch.randint(0, 500, (b, 64)))),
])
def test_a_ledger_from_the_first_iteration_equals_a_simulation_of_all(build, options):
    """The largest-batch search's second batch size simulates one iteration, not three (memlint/ledger.py)."""
    estimator = Estimator(workload(build, 8, **options), resolve_target("h100-80gb"), 1.0)
    estimator.simulated_ledger(8)
    estimator.simulate(24)  # the first simulation at a batch size records a few more metadata ops (a cold cache)
    derived = estimator._from_first_iteration(24)
    assert derived is not None and allocations(derived) == allocations(estimator.simulate(24).ledger)


class OddStepsDiffer(nn.Module):
    """Every other forward computes more: a step's later iterations do not repeat its first one."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 64)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.linear(x)
        return y * y.sigmoid() if self.calls % 2 else y


def test_a_step_whose_iterations_differ_is_simulated_whole():
    estimator = Estimator(workload(OddStepsDiffer, 8, shape=(64,)), resolve_target("h100-80gb"), 1.0)
    estimator.simulated_ledger(8)
    assert estimator._from_first_iteration(24) is None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lazy_modules_are_analysed_as_the_modules_they_become(precision):
    """nn.LazyLinear and friends take their shapes from the first forward; on fake tensors too."""
    def lazy() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 16, 3), nn.LazyBatchNorm2d(), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))

    def explicit() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                             nn.Linear(16 * 14 * 14, 10))

    def estimate(build) -> tuple:
        report = analyse(workload(build, 32, shape=(3, 16, 16), precision=precision), resolve_target("gtx1050ti"), 0.8)
        return report.peak_allocated_bytes, report.max_batch_size, report.breakdown

    assert estimate(lazy) == estimate(explicit)
    assert estimate(lazy)[2]["parameters"] > 16 * 14 * 14 * 10 * (2 if precision == "bf16" else 4)


class WidthFromTensorArithmetic(nn.Module):
    """A size computed with torch ops on Python numbers (as Longformer counts its chunks): known, not assumed."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.div(x.shape[-1], 16, rounding_mode="trunc") + 1  # a fake tensor that keeps its value, 5
        return self.linear(x).repeat(1, int(parts)).sigmoid()


def test_a_value_computed_from_python_numbers_is_not_assumed():
    report, measured = estimated_and_real_on_host(WidthFromTensorArithmetic, 32, (64,))
    assert report.peak_allocated_bytes == measured
    assert not any(".item()" in note for note in report.assumptions)


class LayerDropStack(nn.Module):
    """LayerDrop as OPT and BART write it: skip a layer ``if torch.rand([]) < self.layerdrop``."""

    def __init__(self, layerdrop: float) -> None:
        super().__init__()
        self.layerdrop = layerdrop
        self.layers = nn.ModuleList(nn.Linear(256, 256) for _ in range(4))
        self.head = nn.Linear(256, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.training and torch.rand([]) < self.layerdrop:
                continue
            x = layer(x).relu()
        return self.head(x)


@pytest.mark.parametrize("layerdrop", [0.0, 1.0])
def test_a_random_draw_compared_outside_its_range_is_known(layerdrop):
    """``rand`` draws from [0, 1): below 0.0 never, below 1.0 always. Assumed True, every layer was skipped
    at 0.0 (OPT-125m came out 40% low); now the real step's layers run, or are all skipped, as they are."""
    report, measured = estimated_and_real_on_host(lambda: LayerDropStack(layerdrop), 64, (256,))
    assert report.peak_allocated_bytes == measured
    assert not any("bool tensor" in note for note in report.assumptions)


class BranchOnRareValues(nn.Module):
    """A branch only outliers take, which these shapes cannot take (as Longformer's global attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.abs() > 1e6).any():  # never with real data
            x = x.view(-1, 7)
        return self.linear(x).relu()


def test_a_branch_that_fails_when_assumed_taken_is_assumed_not_taken():
    report, measured = estimated_and_real_on_host(BranchOnRareValues, 8, (64,))
    assert report.peak_allocated_bytes == measured
    assert any("bool tensor: assumed False" in note for note in report.assumptions)


class LoopedExperts(nn.Module):
    """A mixture of experts dispatched as Mixtral's code did before transformers 5: a loop over the
    experts hit, each taking ``torch.where(expert_mask[e])`` of the tokens."""

    def __init__(self, hidden: int = 64, experts: int = 8, top_k: int = 2) -> None:
        super().__init__()
        self.top_k, self.count = top_k, experts
        self.embed = nn.Linear(16, hidden)
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 256), nn.GELU(), nn.Linear(256, hidden))
                                     for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(0, 1)
        weights, chosen = torch.topk(self.router(x).softmax(-1), self.top_k, dim=-1)
        out = torch.zeros_like(x)
        mask = nn.functional.one_hot(chosen, num_classes=self.count).permute(2, 1, 0)
        for expert in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
            slot, token = torch.where(mask[expert].squeeze(0))
            out.index_add_(0, token, self.experts[expert](x[token]) * weights[token, slot, None])
        return out


def test_a_loop_over_experts_gives_each_expert_its_share_of_the_tokens():
    """nonzero of a one-hot routing mask: tokens x top-k / experts rows each (memlint/values.py), not every
    token for every expert (the bound, +400% here); the expert indices are computed, not assumed."""
    report, measured = estimated_and_real_on_host(LoopedExperts, 8, (128, 16))
    assert abs(report.peak_allocated_bytes - measured) / measured < 0.005
    assert any("one-hot selection" in note for note in report.assumptions)
    assert not any(".item()" in note for note in report.assumptions)


class SizedByKnownValues(nn.Module):
    """A size read with .item() from values that do not depend on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        repeats = int((torch.arange(4) * 3).max().item())  # 9
        return self.layer(x).repeat(1, repeats).tanh()


def test_a_value_computed_from_known_values_is_not_assumed():
    report, measured = estimated_and_real_on_host(SizedByKnownValues, 64, (32,))
    assert report.peak_allocated_bytes == measured
    assert not any(".item()" in note for note in report.assumptions)


class TinyDetector(nn.Module):
    """The data-dependent steps of a two-stage detector (torchvision's Faster R-CNN) in plain torch: the
    ground-truth boxes are checked with ``.any()`` and read with ``.tolist()``; anchors are tagged with their
    feature level (``torch.full``, ``cat``), selected by score and visited per level present
    (``torch.unique``), and per class of a flat index (``index % classes``); a sampler marks 64 positives and 192 negatives in ``zeros_like`` masks and takes them
    with ``torch.where(positive | negative)``; a mask indexes and is assigned through."""

    LEVELS = (6000, 1500, 400)

    def __init__(self) -> None:
        super().__init__()
        self.score = nn.Linear(8, 1)
        self.head = nn.Linear(8, 32)
        self.levels_visited: list[int] = []
        self.labels_visited: list[int] = []

    def forward(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        if (boxes[:, 2:] <= boxes[:, :2]).any():
            raise ValueError(f"degenerate box {boxes[0].tolist()}")
        levels = torch.cat([torch.full((n,), level, dtype=torch.long) for level, n in enumerate(self.LEVELS)])
        top = self.score(features).squeeze(-1).topk(1000).indices
        for level in torch.unique(levels[top]):
            self.levels_visited.append(int(level))
        for label in torch.unique(top % 4):  # a class from a flat index, as RetinaNet's
            self.labels_visited.append(int(label))
        proposals = features[top]
        positive, negative = torch.where(proposals[:, 0] > 0)[0], torch.where(proposals[:, 0] <= 0)[0]
        masks = []
        for candidates, count in ((positive, 64), (negative, 192)):
            mask = torch.zeros_like(top, dtype=torch.uint8)
            mask[candidates[torch.randperm(candidates.numel())[:count]]] = 1
            masks.append(mask)
        sampled = proposals[torch.where(masks[0] | masks[1])[0]]
        out = self.head(sampled)
        keep = out[:, 0] > 0
        target = torch.zeros_like(out)
        target[keep, out[keep].argmax(-1)] = 1.0
        return (out - target).square()


def test_a_detectors_data_dependent_steps_use_the_values_they_can_know():
    built: list[TinyDetector] = []

    def build() -> TinyDetector:
        built.append(TinyDetector())
        return built[-1]

    def inputs(batch: int) -> tuple:
        boxes = torch.tensor([[10.0, 20.0, 200.0, 220.0], [50.0, 60.0, 150.0, 300.0]])
        return torch.randn(sum(TinyDetector.LEVELS), 8), boxes

    report = analyse(workload(build, batch=1, inputs=inputs), resolve_target("cpu:8GiB"), 1.0, find_max_batch=False)
    assert not any(".item()" in note for note in report.assumptions)  # the boxes' values are the real ones
    head = next(layer for layer in report.layers if layer.name == "head")
    assert head.flops_forward == 2 * 256 * 8 * 32  # the 64 + 192 sampled proposals, not all 1000
    visited = built[-1]
    assert visited.levels_visited == [0, 1, 2] * (len(visited.levels_visited) // 3)  # each level, not each anchor
    assert visited.labels_visited == [0, 1, 2, 3] * (len(visited.levels_visited) // 3)
    notes = " ".join(report.assumptions)
    assert "holds few values" in notes and "a mask set at sampled indices" in notes
    assert "indexing with a boolean mask: assumed every element selected" in notes


class UniqueOfUnknownValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        classes = torch.unique(x.argmax(-1))  # which classes occur depends on the data: every element distinct
        return self.layer(x)[:, None, :] * classes[None, :, None]


def test_unique_of_unknown_values_assumes_every_element_distinct():
    report = analyse(workload(UniqueOfUnknownValues, batch=8, shape=(16,)), resolve_target("cpu:8GiB"), 1.0,
                     find_max_batch=False)
    assert any("_unique2.default: assumed every element distinct" in note for note in report.assumptions)


class PerSampleLoop(nn.Module):
    """Its ops depend on the batch size: a layer applied to each sample in turn, as a detector treats its images."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.layer(sample).relu() for sample in x])


def test_a_step_whose_ops_follow_the_batch_tries_a_one_iteration_probe_once(monkeypatch):
    """The search's probes cannot come from one iteration of such a step (ledger.from_first_iteration): after the
    first that fails to line up, each probe is simulated once, not twice."""
    iterations: list = []
    simulate = Estimator.simulate

    def counting(self, batch_size, *args, **kwargs):
        iterations.append(kwargs.get("iterations"))
        return simulate(self, batch_size, *args, **kwargs)

    monkeypatch.setattr(Estimator, "simulate", counting)
    report = analyse(workload(PerSampleLoop, batch=4, shape=(2048, 256)), resolve_target("mem:256MiB"), 1.0)
    found = report.max_batch_size
    assert found is not None and iterations.count(1) == 1 and len(iterations) > 5
