"""The accuracy judge: memlint's estimate against real GPU peaks, beside MemTracker and torchinfo.

    python benchmarks/accuracy.py [--calibration ../shared/calibration] [--only gpt2] [--source FILE] [--peers]

For every record of the calibration files (and benchmarks/measurements/*.json, where new
ground truth measured with the same protocol goes), prints measured and estimated
``peak_allocated_bytes`` (vs ``torch.cuda.max_memory_allocated()``), the relative error, and
the summary lines. With --peers, PyTorch's MemTracker (fake-tensor mode) and torchinfo's
"Estimated Total Size" run on the same records when they are installed. The inference section also
reads the single-layer records of ``gpu_measure.py``'s encoder phase (``encoder-layer-...``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workloads import OPTIMIZERS, call, encoder_layer_name, needs_torchvision, spec_for, torchvision_available  # noqa: E402

import memlint.gpu_kernels  # noqa: E402
from memlint.estimator import Workload, analyse  # noqa: E402

# Every record ran PyTorch 2.11 on the GPU (the files' env), whose memory-efficient attention kernel
# does not take grouped-query attention (2.14's does): simulate the kernels those steps ran.
memlint.gpu_kernels.EFFICIENT_ATTENTION_TAKES_GQA = False
from memlint.targets import resolve_target  # noqa: E402


def record_files(shared: list[Path], sources: str) -> Iterator[Path]:
    """The calibration files given, benchmarks/measurements, or both (``sources``), those that exist."""
    measured_here = sorted((HERE / "measurements").glob("*.json"))
    files = (shared if sources in ("all", "calibration") else []) + \
        (measured_here if sources in ("all", "measurements") else [])
    return (file for file in files if file.exists())


def records(calibration: Path, sources: str = "all") -> Iterator[dict[str, Any]]:
    """Every training-peak record, normalised to model/batch/optimizer/precision/seq/checkpointing/measured,
    with the file it came from (``source``)."""
    for file in record_files([calibration / "h200_public.json", calibration / "h200_public_more.json"], sources):
        for record in _file_records(file):
            yield {**record, "source": file.stem}


def layer_records(sources: str = "all") -> Iterator[dict[str, Any]]:
    """Inference records of single layers (the encoder phase of ``gpu_measure.py``): no training peak.
    Their base held the layer and its input, so their peak is above both."""
    for file in record_files([], sources):
        for layer in json.loads(file.read_text()).get("encoder", []):
            yield {"set": "encoder", "model": encoder_layer_name(layer), "batch": layer["batch"], "optimizer": "none",
                   "precision": "fp32", "infer": layer["peak_above_base"], "infer_includes_inputs": False,
                   "source": file.stem}


def _file_records(file: Path) -> Iterator[dict[str, Any]]:
    """One file's records, normalised (see ``records``)."""
    data = json.loads(file.read_text())
    # The calibration's inputs existed before its inference baseline; gpu_measure.py creates them
    # after it, so its infer_peak_delta holds them (the files say so).
    inputs_in_delta = data.get("infer_peak_delta_includes_inputs", False)
    for record in [*data.get("steps", []), *data.get("fresh", [])]:
        yield {"set": "fresh" if record.get("fresh_process") else "steps", "model": record["model"],
               "batch": record["batch"], "optimizer": record["optimizer"],
               "precision": "bf16-mixed" if record.get("amp") else "fp32", "measured": record["train_peak"],
               "infer": record.get("infer_peak_delta"), "infer_includes_inputs": inputs_in_delta,
               "param_bytes": record.get("param_bytes"), "buffer_bytes": record.get("buffer_bytes")}
    for record in data.get("times", []):
        yield {"set": "times", "model": record["model"], "batch": record["batch"], "optimizer": "sgd",
               "precision": "bf16-mixed" if record["amp"] != "None" else "fp32", "measured": record["train_peak"]}
    for record in data.get("ckpt", []):
        yield {"set": "ckpt", "model": record["model"], "batch": record["batch"], "optimizer": "sgd",
               "precision": "fp32", "checkpointing": True, "measured": record["train_peak"]}
    for record in data.get("seq", []):
        yield {"set": "seq", "model": record["model"], "batch": record["batch"], "optimizer": "sgd",
               "precision": "fp32", "seq": record["seq"], "measured": record["train_peak"]}
    for record in data.get("opt", []):
        amp = record.get("amp")
        yield {"set": "opt", "model": record["model"], "batch": record["batch"],
               "optimizer": record["optimizer"], "precision": "fp16-mixed" if amp else "fp32",
               "measured": record["train_peak"], **({"seq": 512} if record["model"] == "gpt2" else {})}


def estimate(record: dict[str, Any], target: str = "h200") -> int:
    """memlint's peak as the record measured it: a protocol record's base already held the cuBLAS
    workspaces (its warm-up and earlier records ran matmuls in both threads), a fresh process's did not."""
    spec = spec_for(record["model"], record.get("seq"), record.get("checkpointing", False))
    workload = Workload(name=record["model"], path="<benchmark>", line=1, build=spec.build,
                        example_inputs=spec.example_inputs, loss_fn=spec.loss_fn,
                        build_optimizer=OPTIMIZERS[record["optimizer"]] or (lambda p: None),
                        batch_size=record["batch"], input_shape=None, input_dtype="float32",
                        optimizer="none" if OPTIMIZERS[record["optimizer"]] is None else None,
                        precision=record["precision"], mode="train")
    report = analyse(workload, resolve_target(target), 1.0, find_max_batch=False)
    return report.peak_allocated_bytes - (0 if record["set"] == "fresh" else report.cublas_workspace_bytes)


def maxbatch_records(calibration: Path, sources: str = "all") -> Iterator[dict[str, Any]]:
    for file in record_files([calibration / "h200_public.json"], sources):
        for record in json.loads(file.read_text()).get("maxbatch", []):
            yield {**record, "source": file.stem}


def estimate_max_batch(record: dict[str, Any]) -> int | None:
    """memlint's largest batch under a bare capacity, as ``--target mem:4GiB --threshold 1.0``."""
    spec = spec_for(record["model"])
    workload = Workload(name=record["model"], path="<benchmark>", line=1, build=spec.build,
                        example_inputs=spec.example_inputs, loss_fn=spec.loss_fn,
                        build_optimizer=OPTIMIZERS[record["optimizer"]], batch_size=1, input_shape=None,
                        input_dtype="float32", optimizer=None, precision="fp32", mode="train")
    return analyse(workload, resolve_target(f"mem:{record['cap']}"), 1.0).max_batch_size


def memtracker_peak(record: dict[str, Any]) -> int | None:
    """PyTorch's MemTracker on fake tensors, the same three-step loop (its peak over the steps)."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        return None
    import torch

    spec = spec_for(record["model"], record.get("seq"), record.get("checkpointing", False))
    autocast = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(record["precision"])
    peak = 0
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = spec.build()
        factory = OPTIMIZERS[record["optimizer"]]
        optimizer = factory(list(model.parameters())) if factory else None
        tracker = MemTracker()
        tracker.track_external(model, *([optimizer] if optimizer else []))
        for _ in range(3):
            with tracker:
                inputs = spec.example_inputs(record["batch"])
                with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                    loss = spec.loss_fn(call(model, inputs), inputs)
                loss.backward()
                del loss
                if optimizer:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                else:
                    model.zero_grad(set_to_none=True)
            snapshot = tracker.get_tracker_snapshot("peak")
            peak = max(peak, int(max(stats["Total"] for stats in snapshot.values())))
            tracker.reset_mod_stats()
    return peak


def torchinfo_total(record: dict[str, Any]) -> int | None:
    """torchinfo's "Estimated Total Size" (a real forward on the CPU, so only for modest records)."""
    try:
        import torchinfo
    except ImportError:
        return None
    if record["batch"] * (record.get("seq") or 1) > 4096 or record["model"] in ("vgg16",) and record["batch"] > 16:
        return None
    spec = spec_for(record["model"], record.get("seq"), False)
    model = spec.build()
    inputs = spec.example_inputs(record["batch"])
    stats = torchinfo.summary(model, input_data=list(inputs) if isinstance(inputs, tuple) else [inputs], verbose=0,
                              device="cpu")
    return int(stats.total_input + stats.total_output_bytes + stats.total_param_bytes)


def selected(args: argparse.Namespace, record: dict[str, Any]) -> bool:
    """Whether ``--only`` (a model) and ``--source`` (a file) keep this record."""
    return (not args.only or record["model"] == args.only) and (not args.source or record["source"] == args.source)


def error(estimated: int | None, measured: int) -> float | None:
    return None if estimated is None else (estimated - measured) / measured


def summary(name: str, errors: list[float]) -> str:
    if not errors:
        return f"{name:<10} no records"
    absolute = [abs(e) for e in errors]
    return (f"{name:<10} records {len(errors):3d}  median |err| {statistics.median(absolute):6.1%}  "
            f"worst |err| {max(absolute):6.1%}  worst under-estimate {min(min(errors), 0):6.1%}")


def estimate_inference(record: dict[str, Any]) -> int:
    """memlint --mode infer, as the record measured it: the peak above the weights and the cuBLAS
    workspace, which exist before that forward starts, and above the inputs where they did too."""
    spec = spec_for(record["model"])
    workload = Workload(name=record["model"], path="<benchmark>", line=1, build=spec.build,
                        example_inputs=spec.example_inputs, loss_fn=spec.loss_fn, build_optimizer=None,
                        batch_size=record["batch"], input_shape=None, input_dtype="float32", optimizer="none",
                        precision=record["precision"], mode="infer")
    report = analyse(workload, resolve_target("h200"), 1.0, find_max_batch=False)
    b = report.breakdown
    inputs = 0 if record["infer_includes_inputs"] else b["inputs"]
    return report.peak_allocated_bytes - b["parameters"] - b["buffers"] - inputs - report.cublas_workspace_bytes


def print_inference(args: argparse.Namespace, have_vision: bool) -> None:
    print("\nInference (--mode infer) vs infer_peak_delta: peak of one no_grad forward above the weights")
    print(f"{'model':<20}{'batch':>6}  {'precision':<11}{'measured MB':>12}{'memlint MB':>12}{'err':>8}")
    errors, seen = [], set()
    for record in itertools.chain(records(args.calibration, args.records), layer_records(args.records)):
        key = (record["model"], record["batch"], record["precision"])
        if record.get("infer") is None or key in seen or not selected(args, record) or (
                needs_torchvision(record["model"]) and not have_vision):
            continue
        seen.add(key)
        estimated = estimate_inference(record)
        err = error(estimated, record["infer"])
        errors.append(err)
        print(f"{record['model']:<20}{record['batch']:>6}  {record['precision']:<11}{record['infer'] / 1e6:>12.1f}"
              f"{estimated / 1e6:>12.1f}{err:>+8.1%}")
    print(summary("inference", errors))


def print_max_batch(args: argparse.Namespace, have_vision: bool) -> None:
    print("\nLargest batch under a capacity (maxbatch): measured vs memlint --target mem:CAP --threshold 1.0")
    errors = []
    print(f"{'model':<20}{'cap':<7}{'measured':>9}{'memlint':>9}{'err':>8}")
    for record in maxbatch_records(args.calibration, args.records):
        if not selected(args, record) or (needs_torchvision(record["model"]) and not have_vision):
            continue
        estimated = estimate_max_batch(record)
        err = error(estimated, record["max_batch"])
        errors.append(err)
        print(f"{record['model']:<20}{record['cap']:<7}{record['max_batch']:>9}{estimated!s:>9}{err:>+8.1%}")
    print(summary("max batch", errors))


def print_training(args: argparse.Namespace, have_vision: bool) -> int:
    """The training records, memlint beside the peers; returns how many were skipped."""
    columns = ["set", "model", "batch", "optimizer", "precision", "measured GB", "memlint GB", "err"]
    if args.peers:
        columns += ["MemTracker GB", "err", "torchinfo GB", "err"]
    rows, results = [], {"memlint": [], "MemTracker": [], "torchinfo": []}
    by_source: dict[str, list[float]] = {}
    skipped = 0
    for record in records(args.calibration, args.records):
        if not selected(args, record):
            continue
        if needs_torchvision(record["model"]) and not have_vision:
            skipped += 1
            continue
        started = time.perf_counter()
        try:
            estimated = estimate(record)
        except Exception as exc:  # a refusal is a result: print it and count it
            print(f"memlint refused {record}: {exc}", file=sys.stderr)
            results["memlint"].append(float("inf"))
            continue
        seconds = time.perf_counter() - started
        err = error(estimated, record["measured"])
        label = record["model"] + (f"@{record['seq']}" if record.get("seq") else "") + \
            (" ckpt" if record.get("checkpointing") else "")
        results["memlint"].append(err)
        by_source.setdefault(record["source"], []).append(err)
        row = [record["set"], label, str(record["batch"]), record["optimizer"], record["precision"],
               f"{record['measured'] / 1e9:.3f}", f"{estimated / 1e9:.3f}", f"{err:+.1%}"]
        if args.peers:
            for peer, function in (("MemTracker", memtracker_peak), ("torchinfo", torchinfo_total)):
                try:
                    value = function(record)
                except Exception as exc:  # a peer refusing a model is a result worth printing
                    value, note = None, f"refused: {type(exc).__name__}"
                else:
                    note = "n/a" if value is None else ""
                peer_err = error(value, record["measured"])
                if peer_err is not None:
                    results[peer].append(peer_err)
                row += [f"{value / 1e9:.3f}" if value else note, f"{peer_err:+.1%}" if peer_err is not None else ""]
        rows.append(row)
        print("  ".join(row) + f"  ({seconds:.1f}s)", file=sys.stderr, flush=True)
    if args.markdown:
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for row in rows:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print()
    for name, errors in results.items():
        if name == "memlint" or args.peers:
            print(summary(name, errors))
    for source, errors in by_source.items():
        print(summary(f"memlint, {source}", errors))
    return skipped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=Path, default=HERE.parent.parent / "shared" / "calibration")
    parser.add_argument("--only", help="only records of this model")
    parser.add_argument("--source", help="only records of this file (its name without .json: h200_2026-11-27)")
    parser.add_argument("--peers", action="store_true", help="also run MemTracker and torchinfo")
    parser.add_argument("--sections", default="training,maxbatch,inference",
                        help="which comparisons to run, comma-separated: training, maxbatch, inference")
    parser.add_argument("--records", choices=("all", "calibration", "measurements"), default="all",
                        help="the shared calibration files, benchmarks/measurements, or both")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown for the README")
    args = parser.parse_args()
    have_vision = torchvision_available()
    sections = set(args.sections.split(","))
    unknown = sections - {"training", "maxbatch", "inference"}
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    skipped = print_training(args, have_vision) if "training" in sections else 0
    if "maxbatch" in sections:
        print_max_batch(args, have_vision)
    if "inference" in sections:
        print_inference(args, have_vision)
    if skipped:
        print(f"skipped {skipped} torchvision records (install torch==2.14.1 torchvision==0.29.1 to run them)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
