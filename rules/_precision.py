"""Where a file chooses a floating-point precision: the shared static pass of PREC001 and PREC002.

Syntax only (libcst), never torch: names resolve through the file's imports (see ``_static``).
What counts as choosing a precision for training is deliberately narrow, because a false
positive is a defect: a cast of a *model* (a receiver built from a module class or named like one:
``model``, ``self.net``, ``backbone``), the default dtype, ``autocast``, loading weights with a
``torch_dtype``, module constructors and ``nn.Parameter`` with a ``dtype``, the inputs built by
``example_inputs()``, and the precision switches of Lightning, Accelerate and HF ``TrainingArguments``.
A cast of a tensor inside ``forward`` (``x.double()`` for a numerically delicate step) is left alone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import libcst as cst

from memlint.rules._static import (
    calls_in, code, dotted_name, facts, has_star_kwargs, keyword, method_name, module_classes, position, positional,
    string_value,
)

if TYPE_CHECKING:
    from memlint.rules.base import RuleContext
    from memlint.targets import Target

DTYPE_NAMES = {
    "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.half": "fp16",
    "torch.float64": "fp64", "torch.double": "fp64",
}
DTYPE_STRINGS = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float64": "fp64", "double": "fp64"}
CAST_METHODS = {"half": "fp16", "bfloat16": "bf16", "double": "fp64"}
TENSOR_TYPES = {"DoubleTensor": "fp64", "HalfTensor": "fp16", "BFloat16Tensor": "bf16"}
AUTOCASTS = {
    "torch.autocast": None, "torch.amp.autocast": None, "torch.amp.autocast_mode.autocast": None,
    "torch.cuda.amp.autocast": "cuda", "torch.cpu.amp.autocast": "cpu",
}
# autocast's dtype when none is given (torch.get_autocast_dtype's defaults).
AUTOCAST_DEFAULT = {"cuda": "fp16", "cpu": "bf16", "mps": "fp16"}
DEVICE_KIND = {"cuda": "gpu", "cpu": "cpu", "mps": "unified"}
LIGHTNING = {"lightning.Trainer", "lightning.pytorch.Trainer", "pytorch_lightning.Trainer", "lightning.Fabric",
             "lightning.fabric.Fabric"}
LIGHTNING_PRECISION = {"bf16": "bf16", "bf16-mixed": "bf16", "bf16-true": "bf16", "16": "fp16", "16-mixed": "fp16",
                       "16-true": "fp16", "64": "fp64", "64-true": "fp64"}
HF_ARGUMENTS = {"transformers.TrainingArguments", "transformers.Seq2SeqTrainingArguments",
                "transformers.training_args.TrainingArguments"}
LOADERS = {"from_pretrained", "from_config", "from_single_file"}
# torch.nn classes that are modules (not Parameter, Buffer and their uninitialized kinds)
_MODULE_CLASS = re.compile(r"torch\.nn\.(?!Parameter$|Buffer$|Uninitialized)[A-Z]\w*$")
_MODEL_WORD = re.compile(r"(model|net|network|backbone|encoder|decoder|generator|discriminator|teacher|student|"
                         r"unet|vae|transformer|classifier)s?$", re.IGNORECASE)


@dataclass(frozen=True)
class Site:
    """One place where the file picks a precision for the model, its inputs or the whole run."""

    node: cst.CSTNode
    dtype: str          # "bf16", "fp16" or "fp64"
    kind: str           # cast, load, default, autocast, module, parameter, inputs, framework
    text: str           # the code, shortened, for the message
    device: str | None = None  # autocast's device type when written as a literal
    condition: str | None = None  # ``enabled=use_amp``: the choice holds only when that is true

    def what(self) -> str:
        """What the site does, for a message: ``casts the model to``, ``runs autocast in``..."""
        return {
            "cast": "casts the model to", "load": "loads the model in", "default": "makes every new tensor",
            "autocast": "runs the forward under autocast in", "module": "creates the layer's weights in",
            "parameter": "creates a parameter in", "inputs": "builds the inputs in",
            "framework": "trains in",
        }[self.kind]


def short(node: cst.CSTNode, limit: int = 60) -> str:
    text = " ".join(code(node).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dtype_of(expr: cst.BaseExpression, ctx: "RuleContext", *, strings: bool = False) -> str | None:
    """``bf16``/``fp16``/``fp64`` for ``torch.bfloat16``, ``T.half`` or, with ``strings``, ``"bfloat16"``."""
    qualified = facts(ctx).imports.qualify(expr)
    if qualified in DTYPE_NAMES:
        return DTYPE_NAMES[qualified]
    if strings:
        value = string_value(expr)
        if value is not None:
            return DTYPE_STRINGS.get(value.removeprefix("torch."))
    return None


def _model_names(ctx: "RuleContext") -> set[str]:
    """Names assigned a model in this file: ``net = Net()``, ``model = AutoModel.from_pretrained(...)``."""
    info = facts(ctx)
    found: set[str] = set()
    for assign in info.assigns:
        if isinstance(assign.value, cst.Call) and _is_model_call(assign.value, ctx):
            for target in assign.targets:
                dotted = dotted_name(target.target)
                if dotted:
                    found.add(dotted)
    return found


def _builds_model(call: cst.Call, ctx: "RuleContext") -> bool:
    info = facts(ctx)
    qualified = info.imports.qualify(call.func) or ""
    local = {cls.name.value for cls in module_classes(ctx)}
    name = dotted_name(call.func) or ""
    last = name.rsplit(".", 1)[-1]
    return (name in local or last in LOADERS and bool(qualified.startswith(("transformers.", "diffusers.")))
            or qualified.startswith(("torchvision.models.", "timm.create_model"))
            or bool(_MODULE_CLASS.match(qualified)))


def _is_model_call(call: cst.Call, ctx: "RuleContext") -> bool:
    """``Net()``, ``EsmModel(config)``, ``nn.Linear(...)``, ``AutoModel.from_pretrained(...)``."""
    return _builds_model(call, ctx) or bool(_MODEL_WORD.search((dotted_name(call.func) or "").rsplit(".", 1)[-1]))


def is_model(expr: cst.BaseExpression, ctx: "RuleContext") -> bool:
    """A receiver that is a model: built from a module class here, or named like one (``self.backbone``)."""
    if isinstance(expr, cst.Call):
        if _is_model_call(expr, ctx):
            return True
        inner = expr.func.value if isinstance(expr.func, cst.Attribute) else None
        return inner is not None and method_name(expr) in ("to", "cuda", "train", "eval") and is_model(inner, ctx)
    dotted = dotted_name(expr)
    if dotted is None or dotted == "self":
        return False
    names = ctx.extras.get("memlint.precision.models")
    if names is None:
        names = ctx.extras["memlint.precision.models"] = _model_names(ctx)
    if dotted in names:  # type: ignore[operator]
        return True
    return bool(_MODEL_WORD.search(dotted.rsplit(".", 1)[-1]))


def _cast(call: cst.Call, ctx: "RuleContext") -> Site | None:
    method = method_name(call)
    if method is None or not is_model(call.func.value, ctx):  # type: ignore[union-attr]
        return None
    if method in CAST_METHODS and not call.args:
        return Site(call, CAST_METHODS[method], "cast", short(call))
    if method == "to":
        dtype_arg = keyword(call, "dtype")
        candidates = [dtype_arg] if dtype_arg is not None else positional(call)[:2]
        for arg in candidates:
            dtype = dtype_of(arg.value, ctx)
            if dtype:
                return Site(call, dtype, "cast", short(call))
    return None


def _autocast(call: cst.Call, qualified: str, ctx: "RuleContext") -> Site | None:
    if has_star_kwargs(call):
        return None
    device = AUTOCASTS[qualified]
    args = positional(call)
    if device is None:  # torch.autocast(device_type, dtype=None, enabled=True, cache_enabled=None)
        device_arg = keyword(call, "device_type") or (args[0] if args else None)
        device = string_value(device_arg.value) if device_arg is not None else None
        if device is not None:
            device = device.split(":")[0]
        dtype_arg = keyword(call, "dtype") or (args[1] if len(args) > 1 else None)
        enabled = keyword(call, "enabled") or (args[2] if len(args) > 2 else None)
    else:  # torch.cuda.amp.autocast(enabled=True, dtype=torch.float16, cache_enabled=True)
        dtype_arg = keyword(call, "dtype") or (args[1] if len(args) > 1 else None)
        enabled = keyword(call, "enabled") or (args[0] if args else None)
    condition = None
    if enabled is not None:
        if isinstance(enabled.value, cst.Name) and enabled.value.value in ("False", "True"):
            if enabled.value.value == "False":
                return None
        else:
            condition = f"enabled={short(enabled.value, 30)}"
    if dtype_arg is None:
        dtype = AUTOCAST_DEFAULT.get(device or "")
    else:
        dtype = dtype_of(dtype_arg.value, ctx)
    if dtype is None or dtype == "fp64":
        return None
    return Site(call, dtype, "autocast", short(call), device, condition)


def _framework(call: cst.Call, qualified: str) -> Site | None:
    if qualified in LIGHTNING:
        arg = keyword(call, "precision")
        if arg is None:
            return None
        value = string_value(arg.value)
        if value is None and isinstance(arg.value, cst.Integer):
            value = arg.value.value
        dtype = LIGHTNING_PRECISION.get(value or "")
        return Site(call, dtype, "framework", f"{qualified.rsplit('.', 1)[-1]}(precision={code(arg.value)})") if dtype else None
    if qualified in HF_ARGUMENTS:
        for flag, dtype in (("bf16", "bf16"), ("fp16", "fp16")):
            arg = keyword(call, flag)
            if arg is not None and isinstance(arg.value, cst.Name) and arg.value.value == "True":
                return Site(call, dtype, "framework", f"{qualified.rsplit('.', 1)[-1]}({flag}=True)")
        return None
    if qualified in ("accelerate.Accelerator",):
        arg = keyword(call, "mixed_precision")
        value = string_value(arg.value) if arg is not None else None
        dtype = {"bf16": "bf16", "fp16": "fp16"}.get(value or "")
        return Site(call, dtype, "framework", f"Accelerator(mixed_precision={value!r})") if dtype else None
    return None


def _dtype_keyword(call: cst.Call, ctx: "RuleContext", *names: str) -> str | None:
    for name in names:
        arg = keyword(call, name)
        if arg is not None:
            return dtype_of(arg.value, ctx, strings=True)
    return None


def _makes_float64(expr: cst.BaseExpression, ctx: "RuleContext") -> bool:
    """An expression whose value is built in float64: ``torch.randn(3, dtype=torch.double)``, ``t.double()``."""
    for call in calls_in(expr):
        if _dtype_keyword(call, ctx, "dtype") == "fp64" or method_name(call) == "double" and not call.args:
            return True
    return False


def sites(ctx: "RuleContext") -> list[Site]:
    """Every precision choice of the file, in source order (cached per file)."""
    cached = ctx.extras.get("memlint.precision.sites")
    if cached is not None:
        return cached  # type: ignore[return-value]
    info = facts(ctx)
    found: list[Site] = []
    for call in info.calls:
        qualified = info.imports.qualify(call.func) or ""
        site: Site | None = None
        if qualified in AUTOCASTS:
            site = _autocast(call, qualified, ctx)
        elif qualified == "torch.set_default_dtype" and call.args:
            dtype = dtype_of(call.args[0].value, ctx)
            site = Site(call, dtype, "default", short(call)) if dtype else None
        elif qualified == "torch.set_default_tensor_type" and call.args:
            value = info.imports.qualify(call.args[0].value) or string_value(call.args[0].value) or ""
            dtype = TENSOR_TYPES.get(value.rsplit(".", 1)[-1]) if value.startswith("torch.") else None
            site = Site(call, dtype, "default", short(call)) if dtype else None
        elif qualified in ("torch.nn.Parameter", "torch.nn.parameter.Parameter"):
            if call.args and _makes_float64(call.args[0].value, ctx):
                site = Site(call, "fp64", "parameter", short(call))
        elif re.match(r"torch\.nn\.[A-Z]\w*$", qualified) or re.match(r"torch\.nn\.modules\.[\w.]+\.[A-Z]\w*$", qualified):
            dtype = _dtype_keyword(call, ctx, "dtype")
            site = Site(call, dtype, "module", short(call)) if dtype else None
        elif qualified:
            site = _framework(call, qualified)
        if site is None and (dotted_name(call.func) or "").rsplit(".", 1)[-1] in LOADERS:
            dtype = _dtype_keyword(call, ctx, "torch_dtype", "dtype")
            site = Site(call, dtype, "load", short(call)) if dtype else None
        if site is None and isinstance(call.func, cst.Attribute):
            site = _cast(call, ctx)
        if site is not None:
            found.append(site)
    function = info.functions.get("example_inputs")
    if function is not None:
        for call in calls_in(function.body):
            if _dtype_keyword(call, ctx, "dtype") == "fp64" or method_name(call) == "double" and not call.args:
                found.append(Site(call, "fp64", "inputs", short(call)))
    found.sort(key=lambda site: position(ctx, site.node))
    ctx.extras["memlint.precision.sites"] = found
    return found


def target_of(ctx: "RuleContext") -> "Target | None":
    """The target the rule judges: the context's, else the first configured one."""
    if ctx.target is not None:
        return ctx.target
    from memlint.targets import resolve_target

    try:
        return resolve_target(ctx.settings.targets[0], ctx.settings.user_targets)
    except Exception:  # noqa: BLE001 - a bad target is reported by the engine, not here
        return None


def applies_to(site: Site, target: "Target") -> bool:
    """An autocast for another kind of device (``autocast("cpu")`` with a GPU target) is not about the target."""
    return site.device is None or DEVICE_KIND.get(site.device) in (None, target.kind)


PRETTY = {"bf16": "bf16", "fp16": "fp16", "fp64": "fp64", "fp32": "fp32", "tf32": "tf32", "fp8": "fp8"}
NATIVE_ORDER = ("fp32", "tf32", "bf16", "fp16", "fp8", "fp64")


def native_list(target: "Target") -> str:
    return ", ".join(d for d in NATIVE_ORDER if d in target.native_dtypes) or "fp32"


def not_native_reason(dtype: str, target: "Target") -> str | None:
    """Why ``dtype`` does not run at full speed on ``target``; None when it does (or memlint cannot tell)."""
    if dtype in target.native_dtypes or target.bare:
        return None
    if target.kind == "cpu" and not target.peak_flops:
        return None  # a generic host: its CPU (AMX? AVX512-BF16?) is unknown
    capability = target.capability
    rate = ""
    if dtype in target.peak_flops and target.peak_flops.get("fp32"):
        share = target.peak_flops[dtype] / target.peak_flops["fp32"]
        rate = f" ({dtype} runs at {_fraction(share)} of fp32: {target.peak_flops[dtype] / 1e12:.3g} vs " \
               f"{target.peak_flops['fp32'] / 1e12:.3g} TFLOP/s)"
    where = f"{target.name} (compute capability {target.compute_capability})" if capability else target.name
    if dtype == "bf16":
        if target.kind == "gpu" and capability is not None and capability < (8, 0):
            return f"bf16 needs compute capability 8.0 (Ampere) or newer, and {where} emulates it in fp32{rate}"
        return f"{where} has no bf16 arithmetic in hardware{rate}"
    if dtype == "fp16":
        if target.kind == "gpu" and capability is not None and capability < (7, 0):
            return f"fp16 tensor cores start at compute capability 7.0, and {where} has none{rate}"
        return f"{where} has no fast fp16 arithmetic{rate}"
    if dtype == "fp64":
        if target.kind == "unified":
            return f"{target.name} runs PyTorch through MPS, which has no float64 at all"
        return f"{where} runs fp64 at a small fraction of its fp32 rate{rate}"
    return None


def _fraction(share: float) -> str:
    if share >= 0.5:
        return f"{share:.2g}x"
    return f"1/{round(1 / share)}"
