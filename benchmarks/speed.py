"""How fast memlint is, beside torchinfo and PyTorch's MemTracker, on one machine in one run.

    python benchmarks/speed.py [--only resnet50,bert-base,llama-7b] [--no-static] [--profile] [--markdown]

For ResNet-50 at batch 64 (torchvision's, or the same network written out here when torchvision is
missing), BERT-base at batch 32 (sequence 128) and a 7B Llama-style model (hidden 4096, 32 layers,
intermediate 11008, vocabulary 32000) at batch 1, sequence 2048, each measured in a fresh process:

* ``memlint check FILE`` end to end (the command, its analysis child, import of torch, the
  largest-batch search): wall time, CPU time (user + sys of every process) and peak RSS (the
  largest process), with an empty cache;
* the same command again, the model unchanged: what a pre-commit hook costs on a commit that does
  not touch the model (answered from ``memlint.cache``, without importing torch);
* the same command, not answered from the cache, while a warm analysis server runs (``memlint
  server start``, memlint.server): the analysis is forked from a process that has imported torch
  already. Twice: the first check of a model teaches the server the installed modules it imports
  (torchvision, transformers), which the server imports while idle; the second finds them imported,
  as every later commit's would. Wall time only: the forked worker is the server's child, not the
  command's;
* memlint's analysis alone (``analyse()`` with the largest-batch search, and without it), timed
  after the imports, in a process that has imported torch and memlint already: the first analysis
  of the process, as a check runs it (its caches cold), then the same again (warm); the first in
  ``--analysis-samples`` fresh processes (5), reported as their median and range;
* torchinfo's ``summary()`` of the same model (a real forward on the CPU, imports included);
  "n/a" for the 7B, whose fp32 weights alone would allocate 27 GB;
* PyTorch's MemTracker on fake tensors (``torch.distributed._tools.mem_tracker``), the same three
  training steps memlint simulates, imports included;
* each peer's own work with its imports done (building the model and summarising or tracking it),
  beside memlint's analysis alone: the like-for-like comparison of what each tool computes, since
  every one of them imports torch first;

and ``import torch`` alone. Then the static rules (``memlint check --no-import``) over the
modelling files of the installed transformers: lines per second per core (CPU time of the one
process), and whether torch was imported (``sys.modules``). ``--profile`` prints cProfile's hot
spots of memlint's analysis of ResNet-50. The machine may be shared: CPU time is the steadier
number when other work runs beside it. Every model file is imported once before anything is
measured, so that no measured run waits on the disk.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable

RESNET_WRITTEN_OUT = '''
import torch
from torch import nn

class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)

class ResNet50(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, inplanes = [], 64
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
            stage = [Bottleneck(inplanes, planes, stride, down)]
            inplanes = planes * 4
            stage += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

def build_model():
    return ResNet50()
'''

RESNET_TORCHVISION = '''
import torch
import torchvision

def build_model():
    return torchvision.models.resnet50(weights=None)
'''

IMAGE_INPUTS = '''
def example_inputs(batch_size):
    return torch.randn(batch_size, 3, 224, 224)
'''

# The transformers models are imported the way their documentation writes it, at the top of the file:
# ``import transformers`` alone is lazy, and its first ``transformers.BertForSequenceClassification``
# imports the model's modules then (0.6 s here), which would count as analysis, not as an import.
BERT = '''
import torch
from transformers import BertConfig, BertForSequenceClassification

def build_model():
    return BertForSequenceClassification(BertConfig())

def example_inputs(batch_size):
    return torch.randint(0, 1000, (batch_size, 128))
'''

LLAMA = '''
import torch
from transformers import LlamaConfig, LlamaForCausalLM

def build_model():
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000))

def example_inputs(batch_size):
    return torch.randint(0, 1000, (batch_size, 2048))
'''

MODELS = {"resnet50": 64, "bert-base": 32, "llama-7b": 1}

# Child programs. Each prints one JSON line (the last line of stdout) with its measurements.
MEMLINT_CHECK = '''
import json, resource, sys, time
start = time.perf_counter()
from memlint.cli import main
sys.stdout = open("/dev/null", "w")
code = main(sys.argv[1:])
sys.stdout = sys.__stdout__
self, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"code": code, "rss": max(self.ru_maxrss, children.ru_maxrss) * 1024,
                  "started_a_child": children.ru_maxrss > 0, "torch_imported": "torch" in sys.modules}))
'''

ANALYSE = '''
import importlib.util, json, resource, sys, time
path, batch, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
import torch
spec = importlib.util.spec_from_file_location("model_under_test", path)
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)  # imports torchvision/transformers
from memlint.estimator import Workload, analyse
from memlint.targets import resolve_target
from memlint.fakemode import new_fake_mode
from memlint.worker import settle_imports
new_fake_mode()
settle_imports()  # as the analysis process does after its imports
def run(find_max_batch):
    workload = Workload(name="model", path=path, line=1, build=module.build_model, example_inputs=module.example_inputs,
                        loss_fn=None, build_optimizer=None, batch_size=batch, input_shape=None, input_dtype="float32",
                        optimizer="adam", precision="fp32", mode="train")
    wall, cpu = time.perf_counter(), time.process_time()
    report = analyse(workload, resolve_target("h100-80gb"), 0.8, find_max_batch=find_max_batch)
    return time.perf_counter() - wall, time.process_time() - cpu, report
result = {}
if what == "profile":
    import cProfile, pstats
    profiler = cProfile.Profile()
    profiler.enable()
    run(True)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=sys.stderr)
    stats.sort_stats("cumulative").print_stats(r"memlint", 30)
    stats.sort_stats("tottime").print_stats(25)
else:  # the first analysis of the process (as a check runs it), then the same again on warm caches
    wall, cpu, report = run(what == "search")
    result.update(wall=wall, cpu=cpu, max_batch=report.max_batch_size, peak=report.peak_device_bytes)
    result["warm_wall"] = run(what == "search")[0]
result["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(result))
'''

TORCHINFO = '''
import importlib.util, json, resource, sys, time
path, batch = sys.argv[1], int(sys.argv[2])
import torch, torchinfo
spec = importlib.util.spec_from_file_location("model_under_test", path)
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
work = time.perf_counter()  # imports done: what follows is the summary's own work, as memlint's analysis alone
model = module.build_model()
stats = torchinfo.summary(model, input_data=[module.example_inputs(batch)], verbose=0, device="cpu")
total = stats.total_input + stats.total_output_bytes + stats.total_param_bytes
print(json.dumps({"estimate": int(total), "work": time.perf_counter() - work,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
'''

MEMTRACKER = '''
import importlib.util, json, resource, sys, time
path, batch = sys.argv[1], int(sys.argv[2])
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
import torch._dynamo  # FakeTensorMode's constructor imports it: an import, left out of the work as memlint's is
spec = importlib.util.spec_from_file_location("model_under_test", path)
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
work = time.perf_counter()
with FakeTensorMode():
    model = module.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        for step in range(3):
            output = model(module.example_inputs(batch))
            output = getattr(output, "logits", output)
            output.float().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step < 2:
                tracker.reset_mod_stats()
    peak = max(stats["Total"] for stats in tracker.get_tracker_snapshot("peak").values())
print(json.dumps({"estimate": int(peak), "work": time.perf_counter() - work,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
'''

STATIC = '''
import json, resource, sys, time
files = sys.argv[1:]
wall = time.perf_counter()
from memlint.cli import main
sys.stdout = open("/dev/null", "w")
code = main(["check", "--no-import", "--timeout", "3600", *files])
sys.stdout = sys.__stdout__
usage = resource.getrusage(resource.RUSAGE_SELF)
torch_modules = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
print(json.dumps({"code": code, "wall": time.perf_counter() - wall, "cpu": usage.ru_utime + usage.ru_stime,
                  "rss": usage.ru_maxrss * 1024, "torch_imported": bool(torch_modules)}))
'''


def measure(args: list[str], timeout: float = 1800, environment: dict[str, str] | None = None) -> dict:
    """Run a child; its wall time, CPU time (it and its descendants) and the JSON it printed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env={**(environment or os.environ), "PYTHONDONTWRITEBYTECODE": "1"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(args[:4])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    result = json.loads(lines[-1])
    result["command_wall"] = wall
    result["command_cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["stderr"] = done.stderr
    return result


def median_sample(samples: list[dict]) -> dict:
    """The sample of median wall time (the lower middle one of an even count), with every sample's wall.

    One fresh process's analysis varies by a third between minutes on a shared host; its goal is
    judged on the median of several.
    """
    ordered = sorted(samples, key=lambda sample: sample["wall"])
    return {**ordered[(len(ordered) - 1) // 2], "walls": [round(sample["wall"], 2) for sample in ordered]}


def write_models(folder: Path) -> dict[str, Path]:
    have_torchvision = importlib.util.find_spec("torchvision") is not None
    resnet = (RESNET_TORCHVISION if have_torchvision else RESNET_WRITTEN_OUT) + IMAGE_INPUTS
    paths = {}
    for name, text in (("resnet50", resnet), ("bert-base", BERT), ("llama-7b", LLAMA)):
        path = folder / f"{name.replace('-', '_')}.py"
        path.write_text(textwrap.dedent(text).lstrip())
        paths[name] = path
    # As files in a repository are: not modified in the last seconds (the cache does not trust those).
    past = time.time() - 3600
    for path in (*paths.values(), folder):
        os.utime(path, (past, past))
    return paths


def import_torch_seconds(repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([PYTHON, "-c", "import torch"], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_every_import(paths: list[Path]) -> None:
    """Import each model file (and what every tool imports) once, unmeasured, so that no measured run waits on
    the disk.

    A cold page cache made the first command of a run wait for the files of torch, torchvision and
    transformers (BERT-base's check: 13.9 s of wall time for 7.8 s of CPU, the peers after it not).
    """
    program = ("import importlib.util, sys, torch._dynamo, memlint.estimator\n"
               "for path in sys.argv[1:]:\n"
               "    spec = importlib.util.spec_from_file_location('warm', path)\n"
               "    spec.loader.exec_module(importlib.util.module_from_spec(spec))")
    subprocess.run([PYTHON, "-c", program, *map(str, paths)], check=True)


def start_server() -> tuple[dict[str, str], float]:
    """A warm analysis server in a private temporary folder: the environment that reaches it, its start's wall."""
    environment = {**os.environ, "TMPDIR": tempfile.mkdtemp(prefix="mls-", dir="/tmp"), "MEMLINT_NO_CACHE": "1"}
    environment.pop("MEMLINT_NO_SERVER", None)
    start = time.perf_counter()
    subprocess.run([PYTHON, "-m", "memlint", "server", "start", "--idle-timeout", "600"], check=True,
                   env=environment, stdout=subprocess.DEVNULL)
    return environment, time.perf_counter() - start


def measure_served(command: list[str], environment: dict[str, str]) -> dict:
    """A check through the server; fails unless the server forked its analysis."""
    def analyses() -> int:
        status = subprocess.run([PYTHON, "-m", "memlint", "server", "status", "--json"], capture_output=True,
                                text=True, env=environment, check=True).stdout
        return json.loads(status)["analyses"]

    before = analyses()
    result = measure(command, environment=environment)
    if result["started_a_child"] or analyses() != before + 1:
        raise RuntimeError("a check through the server was not forked by it")
    return result


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def static_corpus() -> tuple[list[Path], int]:
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return [], 0
    root = Path(list(spec.submodule_search_locations)[0])
    files = sorted((root / "models").rglob("modeling_*.py"))
    lines = sum(len(path.read_text(encoding="utf-8", errors="replace").splitlines()) for path in files)
    return files, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(MODELS))
    parser.add_argument("--no-static", action="store_true")
    parser.add_argument("--no-peers", action="store_true", help="skip torchinfo and MemTracker")
    parser.add_argument("--profile", action="store_true", help="cProfile memlint's analysis of ResNet-50 and stop")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--analysis-samples", type=int, default=5,
                        help="fresh processes timing the analysis alone (with the search); the median is reported")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="memlint-speed-"))
    os.environ["MEMLINT_CACHE_DIR"] = str(Path(tempfile.mkdtemp(prefix="memlint-speed-cache-")))
    os.environ.pop("MEMLINT_NO_CACHE", None)
    paths = write_models(folder)
    # The children's working directory is on their sys.path, so the cache records it: a busy one (/tmp)
    # changes between two checks and no answer is kept. Run them from the quiet folder of the models.
    os.chdir(folder)
    if args.profile:
        done = subprocess.run([PYTHON, "-c", ANALYSE, str(paths["resnet50"]), "64", "profile"], capture_output=True,
                              text=True)
        print(done.stderr[-20000:])
        return 0

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; python {sys.version.split()[0]}")
    read_every_import([paths[name] for name in args.only.split(",")])
    import_torch = import_torch_seconds()
    print(f"import torch alone: {import_torch:.2f} s (median of 3)\n")
    served_environment, server_start = start_server()
    print(f"memlint server start (imports torch, torch._dynamo and memlint once): {server_start:.2f} s\n")
    rows = []
    for name in args.only.split(","):
        batch = MODELS[name]
        path = str(paths[name])
        command = [PYTHON, "-c", MEMLINT_CHECK, "check", path, "--target", "h100-80gb", "--batch-size", str(batch),
                   "--timeout", "1800", "--memory-limit", "none", "--optimizer", "adam"]
        check = measure(command)
        unchanged = measure(command)
        if unchanged["started_a_child"] or unchanged["torch_imported"]:
            raise RuntimeError(f"{name}: the second check was not answered from the cache")
        served_first = measure_served(command, served_environment)
        time.sleep(3)  # the server imports what the first check taught it while it is idle
        served = measure_served(command, served_environment)
        served["first"] = served_first["command_wall"]
        analysis = median_sample([measure([PYTHON, "-c", ANALYSE, path, str(batch), "search"])
                                  for _ in range(args.analysis_samples)])
        analysis["no_search_wall"] = measure([PYTHON, "-c", ANALYSE, path, str(batch), "no-search"])["wall"]
        torchinfo = memtracker = None
        if not args.no_peers:
            if name != "llama-7b":
                torchinfo = measure([PYTHON, "-c", TORCHINFO, path, str(batch)])
            memtracker = measure([PYTHON, "-c", MEMTRACKER, path, str(batch)])
        rows.append((name, batch, check, unchanged, served, analysis, torchinfo, memtracker))
        peers = ", ".join(f"{label} {'n/a' if result is None else format(result['command_wall'], '.1f') + ' s'}"
                          for label, result in (("torchinfo", torchinfo), ("MemTracker", memtracker)))
        print(f"{name}: memlint check {check['command_wall']:.1f} s wall, {check['command_cpu']:.1f} s CPU, "
              f"{gb(check['rss'])}; analysis {analysis['wall']:.2f} s (median of {analysis['walls']}; "
              f"{analysis['no_search_wall']:.2f} s without "
              f"the largest-batch search; {analysis['warm_wall']:.2f} s again in the same process); "
              f"unchanged {unchanged['command_wall']:.2f} s; through the server {served['first']:.2f} s, then "
              f"{served['command_wall']:.2f} s; "
              f"{peers}", file=sys.stderr)

    header = ["model", "batch", "memlint check: wall / CPU / peak RSS",
              "analysis, imports excluded: first, median [range] (no search) / again",
              "again, model unchanged: wall / peak RSS", "through a warm server: first / then",
              "torchinfo: wall / peak RSS", "MemTracker (fake): wall / peak RSS",
              "torchinfo / memlint (server; unchanged)", "MemTracker / memlint (server; unchanged)",
              "imports excluded: torchinfo / MemTracker (÷ memlint's analysis)"]
    table = []
    for name, batch, check, unchanged, served, analysis, torchinfo, memtracker in rows:
        ours = check["command_wall"]
        info = "n/a (would allocate 27 GB)" if name == "llama-7b" else "skipped" if torchinfo is None else \
            f"{torchinfo['command_wall']:.1f} s / {gb(torchinfo['rss'])}"
        tracker = "skipped" if memtracker is None else f"{memtracker['command_wall']:.1f} s / {gb(memtracker['rss'])}"
        table.append([name, str(batch), f"{ours:.1f} s / {check['command_cpu']:.1f} s / {gb(check['rss'])}",
                      f"{analysis['wall']:.2f} s [{min(analysis['walls']):.2f}-{max(analysis['walls']):.2f}] "
                      f"({analysis['no_search_wall']:.2f} s) / {analysis['warm_wall']:.2f} s",
                      f"{unchanged['command_wall']:.2f} s / {gb(unchanged['rss'])}",
                      f"{served['first']:.2f} s / {served['command_wall']:.2f} s",
                      info, tracker, _ratios(torchinfo, ours, served, unchanged),
                      _ratios(memtracker, ours, served, unchanged),
                      " / ".join(_work_ratio(peer, analysis["wall"]) for peer in (torchinfo, memtracker))])
    print_table(header, table, args.markdown)

    if not args.no_static:
        files, lines = static_corpus()
        if files:
            static = measure([PYTHON, "-c", STATIC, *map(str, files)], timeout=7200)
            print(f"\nstatic rules (memlint check --no-import) on {len(files)} transformers modeling files, "
                  f"{lines:,} lines: {static['cpu']:.1f} s CPU ({static['command_wall']:.1f} s wall, one process) = "
                  f"{lines / static['cpu']:,.0f} lines/s per core; peak RSS {gb(static['rss'])}; "
                  f"torch imported: {'yes' if static['torch_imported'] else 'no'}")
    subprocess.run([PYTHON, "-m", "memlint", "server", "stop"], env=served_environment, stdout=subprocess.DEVNULL)
    return 0


def _ratios(peer: dict | None, ours: float, served: dict, unchanged: dict) -> str:
    if peer is None:
        return "n/a"
    wall = peer["command_wall"]
    return f"{wall / ours:.1f}x ({wall / served['command_wall']:.1f}x; {wall / unchanged['command_wall']:.0f}x)"


def _work_ratio(peer: dict | None, analysis_wall: float) -> str:
    """A peer's own work (its imports done) beside memlint's analysis (its imports done, first of its process)."""
    return "n/a" if peer is None else f"{peer['work']:.1f} s ({peer['work'] / analysis_wall:.1f}x)"


def print_table(header: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(" --- " for _ in header) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    for row in rows:
        print("\n".join(f"  {h}: {cell}" for h, cell in zip(header, row)))
        print()


if __name__ == "__main__":
    raise SystemExit(main())
