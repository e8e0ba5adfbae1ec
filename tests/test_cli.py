"""The command end to end, through a subprocess, as users and CI run it."""
from __future__ import annotations

from conftest import REPO, memlint

ALEXNET = str(REPO / "examples" / "alexnet.py")

JSON_MODEL_KEYS = {"path", "name", "target", "capacity_bytes", "threshold", "batch_size", "mode", "optimizer",
                   "precision", "peak_allocated_bytes", "peak_device_bytes", "max_batch_size", "tracer", "breakdown",
                   "layers"}
BREAKDOWN_KEYS = {"parameters", "buffers", "gradients", "optimizer_state", "activations", "inputs", "temporaries",
                  "workspace", "context"}


def test_alexnet_over_budget_reports_mem001_at_the_dataloader_line(write):
    path = write("alexnet.py", open(ALEXNET).read().replace("batch_size=128,", "batch_size=2048,"))
    run = memlint("check", str(path), "--target", "gtx1050ti", "--optimizer", "sgd-momentum")
    assert run.code == 1, run.err
    line = next(line for line in run.out.splitlines() if " MEM001 " in line)
    source_line = int(line.split(":")[1])
    assert "DataLoader(" in path.read_text().splitlines()[source_line - 1]
    assert "at batch size 2048" in line
    assert "The largest batch size that fits is" in line
    assert "gtx1050ti" in line and "over 80%" in line
    assert "AlexNet" in run.out and "features.0" in run.out  # the per-layer table
    assert "does NOT fit" in run.out


def test_json_contract():
    run = memlint("check", ALEXNET, "--target", "gtx1050ti", "--batch-size", "128", "--output-format", "json")
    assert run.code in (0, 1), run.err
    document = run.json()
    assert document["version"] == 1
    model = document["models"][0]
    assert JSON_MODEL_KEYS <= set(model)
    assert set(model["breakdown"]) == BREAKDOWN_KEYS
    assert model["peak_device_bytes"] >= model["peak_allocated_bytes"] > 0
    assert model["tracer"] == "torch.fx.symbolic_trace"
    layer = next(layer for layer in model["layers"] if layer["name"] == "features.0")
    assert layer["type"] == "Conv2d" and layer["output_shape"] == [[128, 64, 55, 55]]
    assert layer["source"].endswith("alexnet.py:16")
    for diagnostic in document["diagnostics"]:
        assert {"path", "line", "column", "code", "severity", "message"} <= set(diagnostic)


def test_batch_size_is_read_from_the_dataloader_literal():
    run = memlint("check", ALEXNET, "--target", "h100-80gb", "--output-format", "json")
    assert run.json()["models"][0]["batch_size"] == 128


def test_the_largest_batch_size_fits_and_is_consistent_across_runs():
    first = memlint("check", ALEXNET, "--target", "gtx1050ti", "--batch-size", "128", "--output-format", "json")
    best = first.json()["models"][0]["max_batch_size"]
    at_best = memlint("check", ALEXNET, "--target", "gtx1050ti", "--batch-size", str(best), "--select", "MEM001")
    above = memlint("check", ALEXNET, "--target", "gtx1050ti", "--batch-size", str(best + 1), "--select", "MEM001")
    assert at_best.code == 0, at_best.out
    assert above.code == 1 and "MEM001" in above.out


def test_noqa_suppresses_a_finding(write):
    source = open(ALEXNET).read().replace("batch_size=128, shuffle=True", "batch_size=4096, shuffle=True")
    plain = write("plain/alexnet.py", source)
    silenced = write("silenced/alexnet.py", source.replace(
        "batch_size=4096, shuffle=True, num_workers=4, pin_memory=True)",
        "batch_size=4096, shuffle=True, num_workers=4, pin_memory=True)  # noqa: MEM001"))
    assert "MEM001" in memlint("check", str(plain), "--target", "gtx1050ti").out
    run = memlint("check", str(silenced), "--target", "gtx1050ti", "--select", "MEM001")
    assert "MEM001" not in run.out and run.code == 0


def test_config_file_sets_target_and_batch(write, tmp_path):
    write("pyproject.toml", """
        [tool.memlint]
        target = "mem:64MiB"
        batch-size = 4
        input-shape = [64]
        optimizer = "sgd"
        threshold = 1.0
    """)
    write("model.py", """
        from torch import nn

        class Tiny(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = nn.Linear(64, 64)

            def forward(self, x):
                return self.layer(x)
    """)
    run = memlint("check", "model.py", "--output-format", "json", cwd=tmp_path)
    model = run.json()["models"][0]
    assert (model["target"], model["batch_size"], model["optimizer"], model["threshold"]) == ("mem:64MiB", 4, "sgd",
                                                                                             1.0)
    # The command line wins over the file.
    run = memlint("check", "model.py", "--batch-size", "8", "--output-format", "json", cwd=tmp_path)
    assert run.json()["models"][0]["batch_size"] == 8


def test_unknown_target_suggests_the_closest_name():
    run = memlint("check", ALEXNET, "--target", "gtx1050")
    assert run.code == 2
    assert "unknown target 'gtx1050'" in run.err and "gtx1050ti" in run.err
    assert "Traceback" not in run.err


def test_select_and_ignore_by_prefix():
    over = ("check", ALEXNET, "--target", "gtx1050ti", "--batch-size", "2048")
    assert memlint(*over, "--select", "MEM", "--ignore", "MEM00").code == 0
    assert memlint(*over, "--select", "MEM00").code == 1


def test_targets_and_rule_commands():
    targets = memlint("targets")
    assert targets.code == 0
    for name in ("gtx1050ti", "gtx1080ti", "quadro-p6000", "tesla-k40", "xeon-e5-2620v4", "xeon-platinum-8180", "h200"):
        assert name in targets.out
    rule = memlint("rule", "MEM001")
    assert rule.code == 0 and "## Why is this bad?" in rule.out and "## Use instead" in rule.out
    listing = memlint("rule", "--all")
    assert "MEM001" in listing.out and "MEM003" in listing.out
