"""transformers architectures built from small configs, each trained for real and analysed by memlint.

Shared by the tests (tests/test_model_zoo.py, a few architectures that each found a defect) and
the benchmark (benchmarks/zoo.py, every architecture of transformers' auto mappings). For one
model type, ``measure_one`` makes the default config small (``small_config``: 2 layers, hidden
64, 4 heads, ...; where the model does not build or run so, the next of ``SHRINKS``), builds the
model for real, runs three real training steps on the CPU (foreach
Adam, memlint's default loss) with ``real_step_peak`` (tests/fuzzing.py) counting the peak of
live storages, and runs memlint's analysis of the same model on ``cpu:64GiB``. A host target
runs the CPU's own kernels, so the two must agree to the byte.

A model whose config, construction or real step fails is *skipped* (it does not run in eager
PyTorch as configured here). Of the rest, memlint answers (``ok``), *refuses* with its clear
error (a ModelError: a defect, since the real step ran), or *crashes* (any other exception).
"""
from __future__ import annotations

import traceback
from typing import Any

KINDS = {
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
}

# Config attributes made small wherever a config has them (names differ between model families).
SMALL = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "embed_dim": 64, "dim": 64, "n_embed": 64, "embedding_dim": 64,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "encoder_layers": 2,
    "decoder_layers": 2, "num_decoder_layers": 2, "num_blocks": 2,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "intermediate_size": 128, "n_inner": 128, "ffn_dim": 128, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
    "d_ff": 128, "ffn_hidden_size": 128, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "n_group": 2, "topk_group": 1,
    "rotary_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 512, "n_positions": 512,
    "image_size": 64,
}
# The widths: what "layers only" leaves at the defaults.
WIDTHS = {"hidden_size", "n_embd", "d_model", "embed_dim", "dim", "n_embed", "embedding_dim", "num_attention_heads",
          "n_head", "num_heads", "n_heads", "encoder_attention_heads", "decoder_attention_heads", "num_key_value_heads",
          "num_kv_heads", "multi_query_group_num", "intermediate_size", "n_inner", "ffn_dim", "encoder_ffn_dim",
          "decoder_ffn_dim", "d_ff", "ffn_hidden_size", "image_size", "rotary_dim"}
# Ways to make a config small, tried in order until the model builds and its real step runs: every
# size small with the head size following the width; the same with the config's own per-head sizes
# and heads per key-value head (rotary and latent-attention sizes stay consistent); only the depth,
# experts and vocabulary small.
SHRINKS = ("small", "per-head sizes kept", "layers only")
LARGEST_REAL_STEP = 150_000_000  # parameters at default widths: three real CPU steps of more take minutes here
SEQUENCE_DEFAULT, BATCH_DEFAULT = 128, 4


def small_config(model_type: str, shrink: str = "small") -> Any:
    """The model type's default config with its sizes made small (``shrink``, one of SHRINKS)."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type)
    parts = (config, getattr(config, "text_config", None), getattr(config, "vision_config", None))
    for part in {id(c): c for c in parts if c is not None}.values():  # a text config may be the config itself
        heads, kv_heads = _attribute(part, "num_attention_heads"), _attribute(part, "num_key_value_heads")
        for name, value in SMALL.items():
            if shrink == "layers only" and name in WIDTHS:
                continue
            current = _attribute(part, name)
            if isinstance(current, int) and not isinstance(current, bool) and current > value:
                _set(part, name, value)
        hidden, small_heads = _attribute(part, "hidden_size"), _attribute(part, "num_attention_heads")
        if shrink == "small" and isinstance(_attribute(part, "head_dim"), int) and small_heads and hidden:
            _set(part, "head_dim", hidden // small_heads)
        if shrink == "per-head sizes kept" and isinstance(heads, int) and isinstance(kv_heads, int) and small_heads:
            _set(part, "num_key_value_heads", max(1, small_heads * kv_heads // heads))  # the grouping kept
        vocab = _attribute(part, "vocab_size")
        for token in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
                      "mask_token_id", "unk_token_id", "decoder_start_token_id"):
            value = _attribute(part, token)
            if isinstance(value, int) and vocab and value >= vocab:  # ids inside the small vocabulary
                _set(part, token, vocab - 1 - len(token) % 3)
        _keep_each_layer_type(part)
        _stage_sizes_follow_stages(part)
    return config


def _stage_sizes_follow_stages(part: Any) -> None:
    """Per-stage lists as long as the stages left (ConvNeXt's ``num_stages`` is its ``num_hidden_layers``)."""
    stages = _attribute(part, "num_stages")
    if not isinstance(stages, int):
        return
    for name in ("hidden_sizes", "depths"):
        sizes = _attribute(part, name)
        if isinstance(sizes, (list, tuple)) and len(sizes) > stages:
            _set(part, name, type(sizes)(sizes[:stages]))


def _attribute(part: Any, name: str) -> Any:
    """The attribute, or None (also where a config refuses a global value of a per-layer attribute)."""
    try:
        return getattr(part, name, None)
    except Exception:  # noqa: BLE001 - transformers' AmbiguousGlobalPerLayerAttributeError and the like
        return None


def _set(part: Any, name: str, value: Any) -> None:
    try:
        setattr(part, name, value)
    except (AttributeError, TypeError, ValueError):  # a property computed from other sizes
        pass


def _keep_each_layer_type(part: Any) -> None:
    """Fewer layers, but one of each kind (a hybrid's linear and full attention): first of each, then in order."""
    types, layers = _attribute(part, "layer_types"), _attribute(part, "num_hidden_layers")
    if not types or not isinstance(layers, int):
        return
    kinds = list(dict.fromkeys(types))
    rest = list(types)
    for kind in kinds:
        rest.remove(kind)
    kept = (kinds + rest)[:max(layers, len(kinds))]
    if len(kept) != layers:
        _set(part, "num_hidden_layers", len(kept))
    _set(part, "layer_types", kept)


def example_inputs_for(kind: str, config: Any, sequence: int) -> Any:
    """A function of the batch size giving the model's inputs, as memlint's ``example_inputs``."""
    import torch

    if kind == "image-classification":
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", 64)
        size = size[0] if isinstance(size, (list, tuple)) else size
        channels = getattr(vision, "num_channels", 3)
        return lambda batch_size: torch.randn(batch_size, channels, size, size)
    vocab = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size", 256)
    return lambda batch_size: {"input_ids": torch.randint(0, min(vocab, 200), (batch_size, sequence))}


def measure_one(kind: str, model_type: str, batch: int, sequence: int, precision: str = "fp32",
                mode: str = "train") -> dict[str, Any]:
    """The real step and memlint's estimate for one model type (run in its own process)."""
    import torch
    import transformers
    from transformers.models.auto import modeling_auto

    from fuzzing import real_step_peak
    from memlint.errors import ModelError
    from memlint.estimator import Workload, analyse
    from memlint.step import loss_factory
    from memlint.targets import resolve_target

    class_name = getattr(modeling_auto, KINDS[kind])[model_type]
    if isinstance(class_name, (tuple, list)):  # several heads for one model type (DeiT's with a teacher): the first
        class_name = class_name[0]
    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        return {"status": "skipped", "why": f"no model class {class_name!r} in this transformers"}
    loss = loss_factory(None, model_type)
    failures = []
    for shrink in SHRINKS:  # a model that builds and runs in eager PyTorch in none of them is skipped, with why
        try:
            config = small_config(model_type, shrink)
            torch.manual_seed(0)
            parameters = sum(p.numel() for p in model_class(config).parameters())
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{shrink}: build: {_first_line(exc)}")
            continue
        if shrink == "layers only" and parameters > LARGEST_REAL_STEP:
            failures.append(f"{shrink}: {parameters / 1e6:.0f}M parameters, too large for three real CPU steps here")
            continue
        inputs = example_inputs_for(kind, config, sequence)

        def make_inputs() -> tuple[tuple, dict]:
            value = inputs(batch)
            return ((), value) if isinstance(value, dict) else ((value,), {})

        try:
            measured = real_step_peak(lambda: model_class(config), make_inputs, loss, train=mode == "train",
                                      autocast_dtype=torch.bfloat16 if precision == "bf16-mixed" else None)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{shrink}: real step: {_first_line(exc)}")
            continue
        break
    else:
        return {"status": "skipped", "why": "; ".join(failures)}
    workload = Workload(name=model_class.__name__, path=f"{model_type}.py", line=1,
                        build=lambda: model_class(config), example_inputs=inputs, loss_fn=None, build_optimizer=None,
                        batch_size=batch, input_shape=None, input_dtype="float32", optimizer="adam",
                        precision=precision, mode=mode)
    try:
        report = analyse(workload, resolve_target("cpu:64GiB"), 1.0, find_max_batch=False)
    except ModelError as exc:
        return {"status": "refused", "shrink": shrink, "measured": measured, "why": exc.message[:300]}
    except Exception as exc:  # noqa: BLE001 - a crash is what this benchmark looks for
        return {"status": "crash", "shrink": shrink, "measured": measured,
                "why": "".join(traceback.format_exception(exc)[-4:])[-800:]}
    return {"status": "ok", "shrink": shrink, "measured": measured, "estimated": report.peak_allocated_bytes}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}"
