"""Measure the real peak memory of a training step on the CPU, independently of memlint.

Run as a script in a fresh process: it resets the kernel's peak-RSS counter (VmHWM, via
/proc/self/clear_refs) after torch is warmed up, builds the model with real weights, runs
three SGD-momentum steps, and prints the peak RSS above that baseline. glibc is told to
serve every allocation of 64 KiB or more with mmap and to give it back on free
(MALLOC_MMAP_THRESHOLD_), so RSS follows what tensors really hold.

    python measure_cpu_step.py MODEL_FILE BATCH
"""
import importlib.util
import sys


def vm(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> None:
    import torch

    path, batch = sys.argv[1], int(sys.argv[2])
    spec = importlib.util.spec_from_file_location("measured_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.set_num_threads(1)
    warm = module.build_model()  # load every kernel once so that the baseline holds their code
    loss = warm(module.example_inputs(1)).mean()
    loss.backward()
    del warm, loss
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    baseline = vm("VmRSS")
    model = module.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    for _ in range(3):
        inputs = module.example_inputs(batch)  # held until the step ends, as `for x in loader:` holds it
        loss = model(inputs).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss, inputs
    print(vm("VmHWM") - baseline)


if __name__ == "__main__":
    main()
