"""Where an estimate parts from a GPU step: memlint's live bytes beside a GPU op log, op by op.

    python benchmarks/op_compare.py MODEL BATCH OPTIMIZER fp32|bf16 train|infer [--ops conv,mm]

Reads the op logs of ``gpu_measure.py --phases ops`` (benchmarks/measurements/*_ops.json: every op
of three training steps, or one inference forward, with the bytes allocated before it, what it
returned and what it took beyond that), simulates the same record with memlint, and lines the two
up at the ops both runs have in the same order (convolutions and matrix products by default), in
the last step: the GPU's live bytes above its base, memlint's, their difference, and what each op
returned. A difference that appears between two anchors and stays is a tensor one side keeps and
the other does not; one that comes and goes is a workspace or a temporary. This is how the held
batch (README, Accuracy, item 16) and the linear layer's in-place bias (item 18) were found.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workloads import OPTIMIZERS, spec_for  # noqa: E402

from memlint.allocator import round_size  # noqa: E402
from memlint.estimator import Estimator, Workload  # noqa: E402
from memlint.ledger import ALLOC, OP, Ledger  # noqa: E402
from memlint.targets import resolve_target  # noqa: E402

ANCHORS = "convolution,convolution_backward,addmm,mm"


def gpu_record(model: str, batch: int, amp: bool, mode: str) -> dict:
    for file in sorted((HERE / "measurements").glob("*_ops.json")):
        for record in json.loads(file.read_text()).get("ops", []):
            if (record["model"], record["batch"], record["amp"], record["mode"]) == (model, batch, amp, mode):
                return record
    raise SystemExit(f"no op log of {model} at batch {batch} ({mode}, {'bf16' if amp else 'fp32'}) in measurements/")


def memlint_ops(ledger: Ledger, start: int) -> list[tuple[str, int, int]]:
    """(op, live bytes before it, bytes it allocated) for every op marker from event ``start``."""
    ops: list[list] = []
    live = 0
    for index, (kind, sid, name) in enumerate(ledger.events):
        if kind == OP:
            if index >= start:
                ops.append([name.partition("/")[2].split(".")[0], live, 0])
            continue
        size = round_size(ledger.storages[sid].nbytes)
        live += size if kind == ALLOC else -size
        if kind == ALLOC and ops:
            ops[-1][2] += size
    return [tuple(op) for op in ops]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("batch", type=int)
    parser.add_argument("optimizer", choices=sorted(OPTIMIZERS))
    parser.add_argument("precision", choices=("fp32", "bf16"))
    parser.add_argument("mode", choices=("train", "infer"))
    parser.add_argument("--ops", default=ANCHORS, help="the ops to line up, comma-separated")
    args = parser.parse_args()
    anchors = set(args.ops.split(","))
    record = gpu_record(args.model, args.batch, args.precision == "bf16", args.mode)
    ops = record["ops"]
    steps = [i for i, op in enumerate(ops) if op[0] == "step"]
    gpu = [(op[0], op[1] - record["base"], op[2], op[3]) for op in ops[steps[-1] + 1 if steps else 0:]
           if len(op) > 2 and op[0] in anchors]

    spec = spec_for(args.model)
    workload = Workload(name=args.model, path="<benchmark>", line=1, build=spec.build,
                        example_inputs=spec.example_inputs, loss_fn=spec.loss_fn,
                        build_optimizer=OPTIMIZERS[args.optimizer] or (lambda p: None), batch_size=args.batch,
                        input_shape=None, input_dtype="float32",
                        optimizer="none" if OPTIMIZERS[args.optimizer] is None else None,
                        precision="bf16-mixed" if args.precision == "bf16" else "fp32", mode=args.mode)
    estimator = Estimator(workload, resolve_target("h200"), 1.0)
    ledger = estimator.simulate(args.batch).ledger
    start = ledger.iteration_marks[-1] if args.mode == "train" else 0
    simulated = [op for op in memlint_ops(ledger, start) if op[0] in anchors]

    print(f"{args.model} b{args.batch} {args.optimizer} {args.precision} {args.mode}: GPU peak above base "
          f"{record['peak_above_base'] / 1e6:.1f} MB; {len(gpu)} GPU and {len(simulated)} simulated anchors")
    print(f"{'#':>4} {'GPU op':<22}{'memlint op':<22}{'GPU live MB':>12}{'memlint MB':>12}{'diff MB':>9}"
          f"{'GPU ret':>9}{'ml ret':>9}{'GPU beyond':>11}")
    offset = None
    for number, (ours, theirs) in enumerate(zip(simulated, gpu)):
        offset = ours[1] - theirs[1] if offset is None else offset  # align the first anchor: the base differs
        live = ours[1] - offset
        print(f"{number:>4} {theirs[0][:21]:<22}{ours[0][:21]:<22}{theirs[1] / 1e6:>12.1f}{live / 1e6:>12.1f}"
              f"{(live - theirs[1]) / 1e6:>+9.1f}{theirs[2] / 1e6:>9.1f}{ours[2] / 1e6:>9.1f}{theirs[3] / 1e6:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
