"""PREC001: the training precision is not one the target runs natively."""
from __future__ import annotations

from typing import Iterable

from memlint.diagnostics import Diagnostic, Severity
from memlint.rules import _precision as prec
from memlint.rules._static import position
from memlint.rules.base import Rule, RuleContext

# --precision values and what they compute in.
CONFIGURED = {"bf16-mixed": "bf16", "bf16": "bf16", "fp16-mixed": "fp16", "fp16": "fp16"}
HALF_DTYPES = {"bfloat16": "bf16", "float16": "fp16"}


def fix_for(dtype: str, target) -> str:  # noqa: ANN001 - memlint.targets.Target
    natives = target.native_dtypes
    if dtype == "bf16" and "fp16" in natives:
        return "use fp16 autocast with torch.amp.GradScaler (--precision fp16-mixed), which this target runs natively"
    if dtype == "fp64":
        return "use float32"
    return "train in fp32" + (" (TF32 is on by default for convolutions)" if "tf32" in natives else "")


class PrecisionNotNative(Rule):
    code = "PREC001"
    name = "precision-not-native"
    summary = "The training precision (bf16, fp16 or fp64) is not native on the target device"
    severity = Severity.WARNING
    also_model = True
    fix = "train in a precision the target runs natively (see `memlint targets`)"
    what = """
Finds where the run picks a precision and checks it against the target's hardware
(`native_dtypes` in `memlint targets`):

* the configured precision, `--precision bf16-mixed|bf16|fp16-mixed|fp16` (or `precision` in
  `[tool.memlint]`), once the model is analysed;
* in the code, statically (also with `--no-import`): a model cast (`model.to(torch.bfloat16)`,
  `model.half()`, `model.double()`), weights loaded with `torch_dtype=`, `torch.set_default_dtype`,
  `torch.autocast("cuda", dtype=...)` / `torch.cuda.amp.autocast()` (fp16 unless told otherwise;
  an info, not a warning, when `enabled=` is an expression such as `enabled=args.amp`),
  module constructors with `dtype=`, Lightning's `Trainer(precision=...)`, Accelerate's
  `mixed_precision=` and `TrainingArguments(bf16=True)`.

bf16 needs compute capability 8.0 (Ampere) or newer; fp16 tensor cores start at 7.0 (consumer
Pascal, 6.1, runs fp16 at 1/64 of fp32); fp64 runs at 1/32 or 1/64 of fp32 on consumer cards. The
message names the precisions the target does run natively. A tensor cast inside `forward` is
not a precision choice for training and is not reported.
"""
    why = """
Mixed precision is meant to halve activation memory *and* run faster. On a device without
hardware for the format it does neither well: bf16 on a pre-Ampere GPU is emulated through fp32
and runs slower than fp32, fp16 on a GPU without tensor cores runs at a fraction of the fp32 rate,
and a plan tuned on an A100 fails its speed assumptions on the card it actually runs on.
"""
    example = """
# memlint check train.py --target gtx1050ti
model = Net().cuda().to(torch.bfloat16)        # PREC001: bf16 needs compute capability 8.0
with torch.autocast("cuda", dtype=torch.bfloat16):
    loss = loss_fn(model(x), y)
"""
    instead = """
model = Net().cuda()                           # fp32: what a GTX 1050 Ti runs natively
loss = loss_fn(model(x), y)
"""
    VALID = (
        # fp32 throughout; tensor casts inside forward are not a training precision
        """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        scores = self.fc(x.float())
        return scores.to(torch.float16).float()

def build_model():
    return Net()

def example_inputs(batch_size):
    return torch.randn(batch_size, 16)
""",
        # autocast switched off, and autocast for the CPU when the target is a GPU
        """
import torch
from torch import nn

model = nn.Linear(8, 8)
with torch.autocast("cuda", dtype=torch.bfloat16, enabled=False):
    y = model(torch.randn(2, 8))
with torch.autocast("cpu", dtype=torch.bfloat16):
    y = model(torch.randn(2, 8))
model = model.to(torch.float32)
""",
        # float32 chosen explicitly; a plain dict is not a framework's precision switch
        """
import torch
from torch import nn

model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).float()
torch.set_default_dtype(torch.float32)
settings = dict(precision="bf16-mixed")
scores = torch.randn(4, 4).to(torch.float16).float()
""",
    )
    INVALID = (
        # a model cast to bf16 (the default target, gtx1050ti, is compute capability 6.1)
        """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x)

def build_model():
    return Net().to(torch.bfloat16)

def example_inputs(batch_size):
    return torch.randn(batch_size, 16, dtype=torch.bfloat16)
""",
        # CUDA autocast without a dtype is fp16
        """
import torch
from torch import nn

model = nn.Linear(8, 8).cuda()
with torch.cuda.amp.autocast():
    loss = model(torch.randn(2, 8, device="cuda")).sum()
""",
        # frameworks' precision switches
        """
import lightning as L
from transformers import TrainingArguments

trainer = L.Trainer(precision="bf16-mixed")
args = TrainingArguments(output_dir="out", fp16=True)
""",
        # a model loaded in half precision
        """
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("gpt2", torch_dtype=torch.float16)
""",
    )

    def check(self, ctx: RuleContext) -> Iterable[Diagnostic]:
        target = prec.target_of(ctx)
        if target is None:
            return
        for site in prec.sites(ctx):
            reason = prec.not_native_reason(site.dtype, target)
            if reason is None or not prec.applies_to(site, target):
                continue
            line, column = position(ctx, site.node)
            when = f" when {site.condition}" if site.condition else ""
            yield ctx.diagnostic(self, line, column, (
                f"`{site.text}` {site.what()} {site.dtype}{when}, which {target.name} does not run natively: "
                f"{reason}; native on {target.name}: {prec.native_list(target)}"), fix=fix_for(site.dtype, target),
                severity=Severity.INFO if site.condition else None)
        if ctx.model is not None:
            yield from self._configured(ctx, target)

    def _configured(self, ctx: RuleContext, target) -> Iterable[Diagnostic]:  # noqa: ANN001
        model = ctx.model
        assert model is not None
        dtype = CONFIGURED.get(model.precision)
        origin = f"the configured precision {model.precision}"
        if dtype is None:
            # fp32 configured: does the trace compute in half precision all the same (a cast elsewhere)?
            dtype, share = _half_parameters(model.parameter_dtypes)
            if dtype is None or any(site.dtype == dtype for site in prec.sites(ctx)):
                return
            origin = f"{model.name} is built in {dtype} ({share:.0%} of its parameter bytes)"
        reason = prec.not_native_reason(dtype, target)
        if reason is None:
            return
        yield ctx.diagnostic(self, model.line, 1, (
            f"{origin}: {dtype} is not native on {target.name}: {reason}; native on {target.name}: "
            f"{prec.native_list(target)}"), fix=fix_for(dtype, target))


def _half_parameters(parameter_dtypes: dict[str, int]) -> tuple[str | None, float]:
    """The half-precision dtype most of the parameter bytes have, when most of them have one."""
    total = sum(parameter_dtypes.values())
    if not total:
        return None, 0.0
    name = max(HALF_DTYPES, key=lambda key: parameter_dtypes.get(key, 0))
    share = parameter_dtypes.get(name, 0) / total
    return (HALF_DTYPES[name], share) if share >= 0.5 else (None, share)
