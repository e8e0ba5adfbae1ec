"""The static rules against their own VALID/INVALID snippets, their tricky edge cases, and torch-freedom."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from memlint.diagnostics import Severity
from memlint.rules.base import RuleContext, all_rules, get_rule
from memlint.settings import Settings
from memlint.targets import Target

STATIC_RULES = [rule for rule in all_rules() if not rule.needs_model]


def run_rule(code: str, source: str, target: Target | None = None):
    rule = get_rule(code)
    assert rule is not None, code
    ctx = RuleContext(path="example.py", source=textwrap.dedent(source), settings=Settings(), target=target)
    return list(rule().check(ctx))


def _cases(kind: str):
    for rule in STATIC_RULES:
        for index, snippet in enumerate(getattr(rule, kind)):
            yield pytest.param(rule, index, snippet, id=f"{rule.code}-{kind.lower()}-{index}")


@pytest.mark.parametrize(("rule", "index", "snippet"), list(_cases("VALID")))
def test_valid_snippet_is_silent(rule, index, snippet):
    ctx = RuleContext(path="example.py", source=snippet, settings=Settings())
    found = list(rule().check(ctx))
    assert found == [], "\n".join(f"{d.line}:{d.column} {d.code} {d.message}" for d in found)


@pytest.mark.parametrize(("rule", "index", "snippet"), list(_cases("INVALID")))
def test_invalid_snippet_is_reported(rule, index, snippet):
    ctx = RuleContext(path="example.py", source=snippet, settings=Settings())
    found = list(rule().check(ctx))
    assert any(d.code == rule.code for d in found), f"{rule.code} INVALID[{index}] produced nothing"
    for d in found:
        assert d.line >= 1 and d.column >= 1
        assert d.path == "example.py"


def test_static_rules_exist_and_are_documented():
    codes = [rule.code for rule in STATIC_RULES]
    assert {"DEV001", "DEV002", "DEV003", "DEV004", "DEV005"} <= set(codes)
    assert len(codes) == len(set(codes))
    for rule in STATIC_RULES:
        for text in (rule.name, rule.summary, rule.what, rule.why, rule.example, rule.instead):
            assert text.strip(), rule.code
        assert rule.VALID and rule.INVALID, rule.code
        assert "## Why is this bad?" in rule.explain()
    for code in ("DEV001", "DEV002", "DEV003", "DEV004", "DEV005"):
        rule = get_rule(code)
        assert len(rule.VALID) >= 4 and len(rule.INVALID) >= 4, code


# --- torch stays out ------------------------------------------------------------------------------

def test_static_rules_do_not_import_torch():
    """Importing every rule module, and running every static rule, in a fresh interpreter loads no torch,
    nor ``libcst.matchers`` (its import alone took 0.15 to 0.37 s of every check, a cached one included)."""
    script = textwrap.dedent("""
        import sys
        from memlint.rules.base import RuleContext, all_rules
        from memlint.settings import Settings
        import memlint.rules._static
        import memlint.engine  # the command's own imports (batchsize, cache, reporters)
        source = '''
        import torch
        from torch import nn
        from torch.utils.data import DataLoader
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.mask = torch.ones(3)
            def forward(self, x):
                return x + torch.zeros(3)
        model = Net().cuda()
        loader = DataLoader(ds)
        for x, y in loader:
            loss = model(x).sum()
            print(loss.item())
        '''
        for rule in all_rules():
            if not rule.needs_model:
                list(rule().check(RuleContext(path="t.py", source=source, settings=Settings())))
        leaked = sorted(name for name in sys.modules
                        if name == "torch" or name.startswith("torch.") or name == "libcst.matchers")
        print("LEAKED" if leaked else "CLEAN", leaked[:5])
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("CLEAN"), result.stdout


# --- DEV001 -----------------------------------------------------------------------------------------

def test_dev001_resolves_module_alias_and_from_import_alias():
    found = run_rule("DEV001", """
        import torch as T
        from torch import zeros as z, nn

        class Net(nn.Module):
            def forward(self, x):
                a = T.ones(4)
                return x + a + z(4)
    """)
    assert [(d.line, d.column, d.severity) for d in found] == [(7, 13, Severity.WARNING), (8, 24, Severity.WARNING)]
    assert "device=x.device" in found[0].fix


def test_dev001_immediate_move_is_a_softer_info():
    found = run_rule("DEV001", """
        import torch
        from torch import nn

        class Net(nn.Module):
            def forward(self, x):
                return x + torch.zeros(3).to(x.device)
    """)
    assert len(found) == 1
    (d,) = found
    assert d.code == "DEV001" and d.severity is Severity.INFO
    assert "create it on the device directly: torch.zeros(3, device=x.device)" in d.message
    assert d.fix == "torch.zeros(3, device=x.device)"


def test_dev001_cuda_and_chained_moves_are_info_with_the_move_dtype():
    found = run_rule("DEV001", """
        import torch
        from torch import nn

        class Net(nn.Module):
            def forward(self, x):
                a = torch.arange(5).unsqueeze(0).cuda()
                b = torch.randn(2, 3).to(device=x.device, dtype=x.dtype)
                return a, b
    """)
    assert [d.severity for d in found] == [Severity.INFO, Severity.INFO]
    assert 'torch.arange(5, device="cuda")' in found[0].message
    assert found[1].fix == "torch.randn(2, 3, dtype=x.dtype, device=x.device)"


def test_dev001_dtype_only_to_is_not_a_move():
    found = run_rule("DEV001", """
        import torch
        from torch import nn

        class Net(nn.Module):
            def forward(self, x):
                return x * torch.tensor([1.0, 2.0]).to(torch.float16)
    """)
    assert [d.severity for d in found] == [Severity.WARNING]


def test_dev001_moved_later_returned_and_index_only_are_info():
    found = run_rule("DEV001", """
        import torch
        from torch import nn

        class Net(nn.Module):
            def forward(self, x):
                pos = torch.arange(x.size(1))
                pos = pos[None].expand(x.size(0), -1).to(x.device)
                rows = torch.arange(x.size(0))
                picked = x[rows, x.argmax(-1)]
                return self.table(x.size(1)) + pos + picked

            def table(self, n):
                return torch.ones(n, n)
    """)
    assert [(d.line, d.severity) for d in found] == [
        (7, Severity.INFO), (9, Severity.INFO), (14, Severity.INFO)]
    assert "copied to the device later" in found[0].message
    assert "CPU indices" in found[1].message
    assert "returns" in found[2].message and "Net.table (called from forward)" in found[2].message


def test_dev001_scalars_and_host_side_tensors_are_silent():
    found = run_rule("DEV001", """
        import torch
        from torch import nn

        class Encoder(nn.Module):
            def forward(self, x):
                for layer in self.layers:
                    if self.training and torch.rand([]) < self.layerdrop:
                        continue
                    x = layer(x) * torch.tensor(x.size(-1) ** -0.5)
                shape = torch.tensor(x.shape).tolist()
                if torch.jit.is_tracing():
                    x = x + torch.tensor(self.sizes).min()
                return x
    """)
    assert found == []


# --- DEV002 -----------------------------------------------------------------------------------------

def test_dev002_name_registered_by_a_base_class_is_a_buffer():
    found = run_rule("DEV002", """
        import torch
        from torch import nn

        class _NormBase(nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

        class _LazyNorm(_NormBase):
            def __init__(self):
                super().__init__()
                self.num_batches_tracked = torch.tensor(0, dtype=torch.long)
    """)
    assert found == []


def test_dev002_points_at_the_attribute():
    found = run_rule("DEV002", """
        import torch
        import torch.nn as nn

        class Attn(nn.Module):
            def __init__(self, n):
                super().__init__()
                mask = torch.ones(n, n)
                self.mask = torch.tril(mask)
    """)
    assert [(d.line, d.column, d.severity) for d in found] == [(9, 9, Severity.WARNING)]
    assert 'register_buffer("mask", torch.tril(mask), persistent=False)' in found[0].fix


# --- DEV003 -----------------------------------------------------------------------------------------

def test_dev003_points_at_the_model_call_and_names_the_move():
    found = run_rule("DEV003", """
        import torch
        model = Net().to("cuda")
        for step, batch in enumerate(train_loader):
            inputs, labels = batch
            loss = criterion(model(inputs), labels)
    """)
    assert [(d.line, d.column) for d in found] == [(6, 22)]
    assert "`inputs` from `train_loader`" in found[0].message and "line 3" in found[0].message


def test_dev003_wrappers_that_place_batches_silence_it():
    for wrapper in ("model = torch.nn.parallel.DistributedDataParallel(Net().cuda())",
                    "from accelerate import Accelerator\nmodel = Net().cuda()"):
        assert run_rule("DEV003", f"""
import torch
{wrapper}
for x, y in train_loader:
    out = model(x)
""") == []


# --- DEV004 -----------------------------------------------------------------------------------------

_LOOP = """
import torch
model = Net().cuda()
for step, (x, y) in enumerate(train_loader):
    x, y = x.cuda(), y.cuda()
    loss = criterion(model(x), y)
{body}
"""


def test_dev004_modulo_guarded_item_is_silent():
    body = "    if step % 100 == 0:\n        print(f'{step}: {loss.item():.3f}')\n        print(loss)"
    assert run_rule("DEV004", _LOOP.format(body=body)) == []


def test_dev004_unguarded_item_is_info_and_first_step_only_is_silent():
    found = run_rule("DEV004", _LOOP.format(body="    total += loss.item()\n    if step == 0:\n        first = loss.item()"))
    assert [(d.line, d.severity) for d in found] == [(7, Severity.INFO)]
    assert "every step" in found[0].message


def test_dev004_else_of_a_modulo_guard_is_reported():
    body = "    if step % 10 == 0:\n        pass\n    else:\n        history.append(loss.cpu())"
    found = run_rule("DEV004", _LOOP.format(body=body))
    assert [d.line for d in found] == [10]


def test_dev004_cpu_then_numpy_is_reported_once_and_cpu_batches_are_silent():
    found = run_rule("DEV004", """
        import torch
        model = Net().to("cuda")
        for ids, labels in val_loader:
            out = model(ids.to("cuda"))
            preds.append(out.argmax(-1).cpu().numpy())
            seen.extend(labels.tolist())
    """)
    assert [(d.line, "cpu()" in d.message) for d in found] == [(6, True)]


# --- DEV005 -----------------------------------------------------------------------------------------

def test_dev005_lists_every_problem_in_one_diagnostic():
    found = run_rule("DEV005", """
        import torch
        from torch.utils.data import DataLoader
        model = Net().cuda()
        loader = DataLoader(ds, batch_size=32)
    """)
    assert len(found) == 1
    assert found[0].severity is Severity.WARNING
    assert "num_workers is absent" in found[0].message and "pin_memory is absent" in found[0].message


def test_dev005_counts_cores_of_the_target_when_it_has_them():
    target = Target(name="jetson-nano", description="", kind="unified", memory_bytes=4 << 30, cores=4)
    found = run_rule("DEV005", """
        from torch.utils.data import DataLoader
        loader = DataLoader(ds, num_workers=8, pin_memory=True)
    """, target=target)
    assert len(found) == 1 and found[0].severity is Severity.WARNING
    assert "the 4 cores of target `jetson-nano`" in found[0].message


def test_dev005_never_uses_the_linting_machines_cores():
    found = run_rule("DEV005", """
        from torch.utils.data import DataLoader
        loader = DataLoader(ds, num_workers=4096, pin_memory=True)
    """)
    assert found == []


def test_dev001_indices_computed_from_sizes_are_info_but_mixing_with_inputs_warns():
    found = run_rule("DEV001", """
        import torch
        from torch import nn

        class RelPos(nn.Module):
            def forward(self, x, q_size, k_size):
                q = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
                k = torch.arange(k_size)[None, :]
                rel = (q - k) + (k_size - 1)
                shifted = torch.arange(q_size) + x
                return self.table[rel.long()] + shifted
    """)
    assert [(d.line, d.severity) for d in found] == [
        (7, Severity.INFO), (8, Severity.INFO), (10, Severity.WARNING)]


POSITION_SOURCES = {
    "decorators, comments and a header": '''\
# a header comment
"""Docstring."""
import torch; import torch.nn as nn  # two statements on one line


# a comment before a decorated class
@dataclass
# a comment between decorators
@other(
    1,
)
class Net(nn.Module):
    def forward(self, x):
        return torch.zeros(3) + x; y = torch.ones(2)

if __name__ == "__main__":
    @staticmethod
    def nested(): return torch.arange(4)
''',
    "windows newlines": "import torch\r\n\r\n\r\ndef f(x):\r\n    return torch.zeros(2, device='cpu')\r\n",
    "a trailing comment and no final newline": "import torch\nx = torch.ones(1)\n# the end",
}


@pytest.mark.parametrize("name", POSITION_SOURCES)
def test_positions_from_a_statement_alone_are_those_of_the_whole_module(name):
    """``position`` generates only the top-level statement that holds a node; every node must start where
    libcst's PositionProvider, which generates the whole module, says it does."""
    import libcst as cst
    from libcst.metadata import PositionProvider

    from memlint.rules._static import _Positions, position, walk

    source = POSITION_SOURCES[name]
    ctx = RuleContext(path="example.py", source=source, settings=Settings())
    whole = ctx.wrapper.resolve(PositionProvider)
    nodes = walk(ctx.module, (cst.Call, cst.Name, cst.Attribute, cst.SimpleString, cst.Decorator), stop=())
    placer = _Positions(ctx.module, source)
    assert nodes and all(placer.start(node) is not None for node in nodes)  # no fallback needed here
    assert [position(ctx, node) for node in nodes] == [(whole[n].start.line, whole[n].start.column + 1) for n in nodes]


def test_a_statement_the_two_parsers_disagree_on_is_placed_by_the_whole_module():
    """Python's ``ast`` cannot place statements it cannot parse: ``position`` then asks the whole module."""
    import libcst as cst

    from memlint.rules._static import _Positions, position, walk

    source = "import torch\nx = torch.ones(1)\n"
    ctx = RuleContext(path="example.py", source=source, settings=Settings())
    call = walk(ctx.module, cst.Call)[0]
    assert _Positions(ctx.module, "this is not python (\n").start(call) is None
    assert position(ctx, call) == (2, 5)


@pytest.mark.parametrize("source, expected", [
    ("loader = DataLoader(ds, batch_size=32)\nparser.add_argument('--batch-size', default=8)\n",
     (32, 1, "DataLoader(batch_size=...)")),
    ("import argparse\np = argparse.ArgumentParser()\np.add_argument('--bs', type=int, default=16)\n",
     (16, 3, "argparse default of --bs")),
    ("p.add_argument(FLAG, default=16)\nloader = DataLoader(ds, batch_size=n)\n", None),  # nothing literal to point at
])
def test_the_batch_size_site_is_the_dataloader_literal_else_the_argparse_default(source, expected):
    """Where MEM001 points: the first ``DataLoader(batch_size=<int>)``, else ``add_argument("--batch-size", default=<int>)``."""
    import libcst as cst
    from libcst.metadata import MetadataWrapper

    from memlint.batchsize import find_batch_size

    site = find_batch_size(MetadataWrapper(cst.parse_module(source)))
    assert (None if site is None else (site.value, site.line, site.how)) == expected
