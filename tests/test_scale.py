"""A 7B and a 70B Llama, trained with Adam at batch 1 and sequence 2048, analysed in little memory.

Built from transformers configs (nothing downloads) on fake tensors: memlint never allocates
the weights. Both run at once through the real command (``tests/rss_wrapper.py``), which
reports the peak resident memory of the memlint process and of its analysis children. The
answer must match the closed form exactly: parameters and gradients are 4 bytes per parameter,
Adam keeps two more fp32 copies (``exp_avg``, ``exp_avg_sq``) and one fp32 step counter per
parameter tensor, a 4-byte tensor that occupies one 512-byte block of the caching allocator.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
GiB = 2**30
BLOCK = 512  # the caching allocator's smallest block: what a step counter occupies

LLAMAS = {
    "llama7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    "llama70b": dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=32000),
}


def closed_form(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> tuple[int, int]:
    """(parameters, parameter tensors) of LlamaForCausalLM with untied embeddings."""
    kv = hidden // heads * kv_heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden
    return layers * per_layer + 2 * vocab * hidden + hidden, layers * 9 + 3


def model_file(directory: Path, name: str, spec: dict[str, int]) -> Path:
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(f"""
        import torch
        import transformers


        def build_model():
            config = transformers.LlamaConfig(
                hidden_size={spec['hidden']}, intermediate_size={spec['intermediate']},
                num_hidden_layers={spec['layers']}, num_attention_heads={spec['heads']},
                num_key_value_heads={spec['kv_heads']}, vocab_size={spec['vocab']})
            return transformers.LlamaForCausalLM(config)


        def example_inputs(batch_size):
            return torch.randint(0, {spec['vocab']}, (batch_size, 2048))
    """).lstrip(), encoding="utf-8")
    return path


def test_closed_form_matches_the_published_sizes():
    assert closed_form(**LLAMAS["llama7b"])[0] == 6_738_415_616
    assert closed_form(**LLAMAS["llama70b"])[0] == 68_976_648_192


def test_llama_7b_and_70b_are_analysed_exactly_in_under_2_gb(tmp_path):
    pytest.importorskip("transformers")
    runs = {}
    for name, spec in LLAMAS.items():
        command = [sys.executable, str(HERE / "rss_wrapper.py"), "check", str(model_file(tmp_path, name, spec)),
                   "--batch-size", "1", "--optimizer", "adam", "--mode", "train", "--target", "h100-80gb",
                   "--timeout", "1800", "--output-format", "json"]
        runs[name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, process in runs.items():  # concurrently: the two together take as long as the 70B alone
        out, err = process.communicate(timeout=2400)
        stats = json.loads(err.strip().splitlines()[-1])
        print(f"{name}: {stats['wall_s']:.0f} s, peak RSS parent {stats['parent_rss'] / 2**20:.0f} MiB, "
              f"analysis child {stats['child_rss'] / 2**20:.0f} MiB")
        assert process.returncode == 1, err  # it does not fit an H100: MEM001/MEM002 say so
        document = json.loads(out)
        assert document["errors"] == []
        model = document["models"][0]
        parameters, tensors = closed_form(**LLAMAS[name])
        breakdown = model["breakdown"]
        assert breakdown["parameters"] == 4 * parameters
        assert breakdown["gradients"] == 4 * parameters
        assert breakdown["optimizer_state"] == 2 * 4 * parameters + tensors * BLOCK
        assert stats["parent_rss"] < 2 * GiB and stats["child_rss"] < 2 * GiB, stats
