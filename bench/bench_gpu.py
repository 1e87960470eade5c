"""GPU benchmark: fit() against the hand-written AMP loop of the Colab guides, on CIFAR-shaped tensors.

Data: 50,000 synthetic 3x32x32 float32 images (614 MB) with 10-class labels, in memory.
Model: torchvision's ResNet-18 adapted to 32x32 inputs (first convolution 3x3 with stride 1,
no max-pool, as CIFAR versions do), SGD with momentum, batch 128, fp16 autocast with a
GradScaler in all three runs, measured one after the other in this one process:

1. ``hand-written``: the loop the guides teach. ``DataLoader(TensorDataset(x, y),
   batch_size=128, shuffle=True, num_workers=2)``, ``.to(device)`` per batch, autocast and
   GradScaler, ``running_loss += loss.item()`` every step.
2. ``fit (DataLoader)``: ``colabkit.fit`` with the same model, optimizer and batch size on a
   map-style Dataset (one sample per ``__getitem__``, so the DataLoader path runs, 2 workers),
   progress bar on, a checkpoint every epoch.
3. ``fit (fast path)``: the same, given the TensorDataset itself (the in-memory fast path).

Then the augmented rows (issue 18), on a CIFAR-shaped uint8 dataset (an ``ImageArray`` of
50,000 3x32x32 images) with the Colab guide's transform ``RandomCrop(32, padding=4)``,
``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize(...)``:

4. ``augmented, hand-written``: the guides' loop over ``DataLoader(dataset, batch_size=128,
   shuffle=True, num_workers=2)``: two workers transform each PIL image.
5. ``augmented, fit defaults``: ``fit(model, dataset, batch_size=128)`` with its defaults
   (precision, fused AdamW): the in-memory image path moves the uint8 set to the GPU once and
   runs the translated transform on whole batches there.
6. ``augmented, efficio GPULoader``: efficio 0.1.1's ``GPULoader.from_torchvision`` with its own
   ``gpu_augment`` RandomCrop / flip / Normalize, in the guides' loop (skipped when efficio is
   not importable: ``pip install efficio==0.1.1``).
7. ``un-augmented, on the GPU``: the eager ceiling: float tensors already on the GPU, randperm
   slicing, fp16 + GradScaler, no per-step sync.

Targets: (5) >= 1.5x (4)'s images/s, >= (6)'s, and within 10 % of (7)'s.

Each run trains ``--epochs`` epochs (default 2); the first is warm-up (kernels, allocator,
workers). The timed epoch runs from the end of the previous epoch to the end of the last one,
so it includes everything between (iterator and worker start, the checkpoint's blocking part).
Reported per run: images/s, epoch time, peak GPU memory (``max_memory_allocated``) and the
ratio to the hand-written loop. Targets: fit (DataLoader) epoch time <= 1.0x the hand-written
loop's; fit (fast path) >= 2x its images/s.

Without a GPU it says so and exits 0. ``--cpu-smoke`` runs all three on the CPU with 16 samples
of 3x8x8 and fp32 to check the script itself works (the numbers then mean nothing).

Compiled training and memory format (``compile_runs``, issue 19), on the fast path with fit's
defaults (bf16 or fp16 as the GPU does best, channels_last "auto"), the same SGD and batch:

4. ``fit eager``: no compiling; 5. ``fit reduce-overhead``: ``compile="reduce-overhead"`` (CUDA
   graphs), its last epoch timed, so compiling is not in it. Target: >= 2.5x fit eager's images/s.
6. ``fit channels_last=False``: eager with channels-last off, against 4 where "auto" turned it on.
7. Rerun compile time: ``compile="reduce-overhead"`` in two fresh processes on one
   ``checkpoint_dir``, each with new, empty inductor and triton cache folders (a fresh runtime
   after a disconnect); the second loads the compile cache the first saved. Compile time is the
   first compiled step's wall time from fit's notice. Target: second / first <= 0.3.

Run: ``python bench/bench_gpu.py [--json numbers.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, TensorDataset  # noqa: E402

from colabkit.train.callbacks import Callback, FitContext  # noqa: E402
from colabkit.train.loop import fit  # noqa: E402

SAMPLES, BATCH, CLASSES = 50_000, 128, 10
TARGET_LOADER_RATIO = 1.0  # fit (DataLoader) epoch time / hand-written epoch time, at most
TARGET_FAST_SPEEDUP = 2.0  # fit (fast path) images/s / hand-written images/s, at least
TARGET_GRAPH_SPEEDUP = 2.5  # fit reduce-overhead images/s / fit eager images/s, at least
TARGET_RERUN_COMPILE = 0.3  # a fresh process's compile time with the cache / without, at most
COMPILED_IN = re.compile(r"first step compiled in ([0-9.]+) s")
TARGET_AUGMENTED_SPEEDUP = 1.5  # augmented: fit defaults images/s / hand-written images/s, at least
TARGET_CEILING_GAP = 0.10  # augmented fit's images/s within this share of the un-augmented on-GPU loop's


def resnet18_cifar() -> torch.nn.Module:
    """torchvision's ResNet-18 for 32x32 inputs: a 3x3 stride-1 stem and no max-pool keep the 32x32 map."""
    try:
        from torchvision.models import resnet18
    except ImportError:
        sys.exit("bench_gpu needs torchvision: pip install torchvision")
    torch.manual_seed(0)
    model = resnet18(num_classes=CLASSES)
    model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()  # type: ignore[assignment]
    return model


def make_data(samples: int, side: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 3, side, side, generator=generator)
    y = torch.randint(0, CLASSES, (samples,), generator=generator)
    return x, y


class ImageSet(Dataset):  # type: ignore[type-arg]
    """A user's own Dataset class over the same tensors: one sample per call, as folder datasets are read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_written(x: torch.Tensor, y: torch.Tensor, *, device: torch.device, epochs: int, batch: int) -> list[float]:
    """The guides' loop over a TensorDataset. Returns the time at the end of each epoch."""
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, num_workers=2)
    return guides_loop(loader, device=device, epochs=epochs)


def guides_loop(loader: Any, *, device: torch.device, epochs: int) -> list[float]:
    """The guides' loop, written as they write it. Returns the time at the end of each epoch."""
    model = resnet18_cifar().to(device)
    optimizer = make_optimizer(model)
    criterion = torch.nn.CrossEntropyLoss()
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    ends = []
    for _ in range(epochs):
        model.train()
        running_loss = 0.0
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                outputs = model(inputs)
                loss = criterion(outputs, labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            running_loss += loss.item()
        sync(device)
        ends.append(time.perf_counter())
    return ends


class EpochEnds(Callback):
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ends: list[float] = []

    def on_epoch_end(self, ctx: FitContext) -> None:
        sync(self.device)
        self.ends.append(time.perf_counter())


def with_fit(data: Any, *, device: torch.device, epochs: int, batch: int) -> list[float]:
    model = resnet18_cifar().to(device)
    ends = EpochEnds(device)
    quiet = contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO())
    with tempfile.TemporaryDirectory() as folder, quiet[0], quiet[1]:
        fit(
            model,
            data,
            epochs=epochs,
            batch_size=batch,
            optimizer=make_optimizer(model),
            device=device,
            precision="fp16" if device.type == "cuda" else "fp32",
            num_workers=2,
            metrics=(),
            checkpoint_dir=folder,
            progress=True,
            callbacks=[ends],
        )
    return ends.ends


# -- augmented: uint8 images with the guide's per-sample transform

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def augmented_dataset(samples: int, side: int) -> Any:
    """An ImageArray of uint8 (N, side, side, 3) images with the Colab guide's transform."""
    from torchvision import transforms

    from colabkit.data.images.array import ImageArray

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (samples, side, side, 3), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, CLASSES, (samples,), generator=generator)
    guide = transforms.Compose(
        [
            transforms.RandomCrop(side, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    return ImageArray(images.numpy(), labels.tolist(), transform=guide)


def augmented_hand_written(dataset: Any, *, device: torch.device, epochs: int, batch: int) -> list[float]:
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=2)
    return guides_loop(loader, device=device, epochs=epochs)


def augmented_fit_defaults(dataset: Any, *, device: torch.device, epochs: int, batch: int) -> list[float]:
    model = resnet18_cifar().to(device)
    ends = EpochEnds(device)
    quiet = contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO())
    with tempfile.TemporaryDirectory() as folder, quiet[0], quiet[1]:
        fit(model, dataset, epochs=epochs, batch_size=batch, checkpoint_dir=folder, progress=True, callbacks=[ends])
    return ends.ends


def augmented_efficio(dataset: Any, *, device: torch.device, epochs: int, batch: int) -> list[float]:
    from efficio import GPULoader
    from efficio.speed import gpu_augment

    side = int(dataset.data.shape[1])
    augment = gpu_augment.Compose(
        [gpu_augment.RandomCrop(side, padding=4), gpu_augment.RandomHorizontalFlip(), gpu_augment.Normalize(MEAN, STD)]
    )
    loader = GPULoader.from_torchvision(dataset, batch_size=batch, transform=augment, device=device)
    return guides_loop(loader, device=device, epochs=epochs)


def on_device_ceiling(
    x: torch.Tensor, y: torch.Tensor, *, device: torch.device, epochs: int, batch: int
) -> list[float]:
    """Float tensors already on the device, randperm slicing, no per-step sync: the eager ceiling."""
    model = resnet18_cifar().to(device)
    optimizer = make_optimizer(model)
    criterion = torch.nn.CrossEntropyLoss()
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    x, y = x.to(device), y.to(device)
    ends = []
    for _ in range(epochs):
        model.train()
        running = torch.zeros((), device=device)
        order = torch.randperm(len(x), device=device)
        for start in range(0, len(x), batch):
            index = order[start : start + batch]
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                loss = criterion(model(x[index]), y[index])
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            running += loss.detach()
        _ = running.item()
        sync(device)
        ends.append(time.perf_counter())
    return ends


def augmented_runs(x: torch.Tensor, y: torch.Tensor, common: dict[str, Any], samples: int) -> dict[str, Any]:
    """Rows 4-7 and their targets."""
    device = common["device"]
    dataset = augmented_dataset(samples, int(x.shape[-1]))
    runners: dict[str, Callable[[], list[float]]] = {
        "augmented, hand-written": lambda: augmented_hand_written(dataset, **common),
        "augmented, fit defaults": lambda: augmented_fit_defaults(dataset, **common),
    }
    if importlib.util.find_spec("efficio") is not None and device.type == "cuda":
        runners["augmented, efficio GPULoader"] = lambda: augmented_efficio(dataset, **common)
    else:
        print("  augmented, efficio GPULoader: skipped (pip install efficio==0.1.1; needs a GPU)", flush=True)
    runners["un-augmented, on the GPU"] = lambda: on_device_ceiling(x, y, **common)
    runs = {name: measure(name, run, device, samples) for name, run in runners.items()}
    base = runs["augmented, hand-written"]
    for numbers in runs.values():
        numbers["time_ratio"] = round(numbers["epoch_s"] / base["epoch_s"], 3)
        numbers["speedup"] = round(numbers["images_per_s"] / base["images_per_s"], 3)
    ours = runs["augmented, fit defaults"]["images_per_s"]
    targets = {
        f"augmented fit speedup >= {TARGET_AUGMENTED_SPEEDUP}": runs["augmented, fit defaults"]["speedup"]
        >= TARGET_AUGMENTED_SPEEDUP,
        f"augmented fit within {TARGET_CEILING_GAP:.0%} of the un-augmented ceiling": ours
        >= (1 - TARGET_CEILING_GAP) * runs["un-augmented, on the GPU"]["images_per_s"],
    }
    if "augmented, efficio GPULoader" in runs:
        targets["augmented fit >= efficio GPULoader"] = ours >= runs["augmented, efficio GPULoader"]["images_per_s"]
    return {"runs": runs, "targets": targets}


def print_table(runs: dict[str, Any]) -> None:
    print(f"  {'run':30s} {'images/s':>10s} {'s/epoch':>8s} {'peak MiB':>9s} {'time ratio':>10s} {'speedup':>8s}")
    for run_name, n in runs.items():
        print(
            f"  {run_name:30s} {n['images_per_s']:10.0f} {n['epoch_s']:8.2f} {n['peak_mib']:9.0f} "
            f"{n['time_ratio']:10.3f} {n['speedup']:8.2f}"
        )


def measure(name: str, run: Callable[[], list[float]], device: torch.device, samples: int) -> dict[str, Any]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    ends = run()
    total = time.perf_counter() - start
    epoch = ends[-1] - ends[-2] if len(ends) > 1 else ends[-1] - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    print(f"  {name}: {epoch:.2f} s/epoch", flush=True)
    return {
        "epoch_s": round(epoch, 4),
        "images_per_s": round(samples / epoch, 1),
        "peak_mib": round(peak / 2**20, 1),
        "total_s": round(total, 2),
    }


def fit_defaults(
    x: torch.Tensor, y: torch.Tensor, *, device: torch.device, epochs: int, batch: int, **options: Any
) -> list[float]:
    """fit on the fast path with its defaults (precision, channels_last "auto") and ``options``."""
    model = resnet18_cifar().to(device)
    ends = EpochEnds(device)
    quiet = contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO())
    with quiet[0], quiet[1]:
        fit(
            model,
            TensorDataset(x, y),
            epochs=epochs,
            batch_size=batch,
            optimizer=make_optimizer(model),
            device=device,
            metrics=(),
            progress=True,
            callbacks=[ends],
            **options,
        )
    return ends.ends


def compile_child(folder: Path, samples: int, side: int, mode: str) -> None:
    """One fresh process's compiled fit (run 7); fit's notices go to stdout."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y = make_data(samples, side)
    model = resnet18_cifar()
    fit(
        model,
        TensorDataset(x, y),
        batch_size=min(BATCH, samples),
        optimizer=make_optimizer(model),
        device=device,
        metrics=(),
        compile=mode,
        checkpoint_dir=folder,
        resume=False,
    )


def rerun_compile(samples: int, side: int, mode: str) -> dict[str, Any]:
    """Compile seconds of two fresh processes with empty compile caches, the second with the cache (run 7)."""
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        for number in (1, 2):
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TRITON_HOME"):
                env[name] = str(Path(tmp, f"process{number}", name.lower()))
            command = [
                sys.executable,
                __file__,
                "--compile-child",
                str(Path(tmp, "run")),
                str(samples),
                str(side),
                mode,
            ]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            found = COMPILED_IN.search(done.stdout)
            if done.returncode != 0 or found is None:
                return {"error": f"process {number} failed: {done.stdout[-500:]} {done.stderr[-1500:]}"}
            seconds.append(float(found.group(1)))
            print(f"  rerun compile, process {number}: {seconds[-1]:.1f} s", flush=True)
    return {"first_s": seconds[0], "second_s": seconds[1], "ratio": round(seconds[1] / seconds[0], 3)}


def compile_runs(
    x: torch.Tensor, y: torch.Tensor, *, device: torch.device, epochs: int, batch: int, side: int
) -> dict[str, Any]:
    """Runs 4-7: compiled training against eager, channels_last on and off, the rerun's compile time."""
    common = {"device": device, "epochs": epochs, "batch": batch}
    samples = len(x)
    mode = "reduce-overhead"
    runs = {
        "fit eager": measure("fit eager", lambda: fit_defaults(x, y, **common), device, samples),
        f"fit {mode}": measure(f"fit {mode}", lambda: fit_defaults(x, y, compile=mode, **common), device, samples),
        "fit channels_last=False": measure(
            "fit channels_last=False", lambda: fit_defaults(x, y, channels_last=False, **common), device, samples
        ),
    }
    eager = runs["fit eager"]["images_per_s"]
    for numbers in runs.values():
        numbers["vs_eager"] = round(numbers["images_per_s"] / eager, 3)
    rerun = rerun_compile(min(samples, 4 * batch), side, mode)
    checks = {
        f"fit {mode} vs eager >= {TARGET_GRAPH_SPEEDUP}": runs[f"fit {mode}"]["vs_eager"] >= TARGET_GRAPH_SPEEDUP,
        f"rerun compile time ratio <= {TARGET_RERUN_COMPILE}": rerun.get("ratio", 99.0) <= TARGET_RERUN_COMPILE,
    }
    print(f"  {'run':26s} {'images/s':>10s} {'vs eager':>9s}")
    for name, n in runs.items():
        print(f"  {name:26s} {n['images_per_s']:10.0f} {n['vs_eager']:9.2f}")
    print(f"  rerun compile: {rerun}")
    for check, ok in checks.items():
        print(f"  target {check}: {'met' if ok else 'NOT met'}")
    return {"runs": runs, "rerun": rerun, "targets": checks}


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--compile-child":
        compile_child(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is timed (default 2)")
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--cpu-smoke", action="store_true", help="check the script on the CPU with a few samples")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the compiled-training runs (4-7)")
    args = parser.parse_args()
    if args.cpu_smoke:
        # 8x8 images: the same code paths at a sixteenth of the compute, so the test suite can afford it.
        device, samples, batch, side = torch.device("cpu"), min(args.samples, 16), 8, 8
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("bench_gpu: no GPU is present (torch.cuda.is_available() is False); nothing was measured")
        return 0
    else:
        device, samples, batch, side = torch.device("cuda"), args.samples, BATCH, 32
    x, y = make_data(samples, side)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    print(
        f"bench_gpu: ResNet-18 (32x32 stem), {samples:,} images 3x{side}x{side}, batch {batch}, "
        f"{'fp16 + GradScaler' if device.type == 'cuda' else 'fp32'}, {args.epochs} epochs per run, on {name}",
        flush=True,
    )
    common = {"device": device, "epochs": args.epochs, "batch": batch}
    runs = {
        "hand-written": measure("hand-written", lambda: hand_written(x, y, **common), device, samples),
        "fit (DataLoader)": measure("fit (DataLoader)", lambda: with_fit(ImageSet(x, y), **common), device, samples),
        "fit (fast path)": measure("fit (fast path)", lambda: with_fit(TensorDataset(x, y), **common), device, samples),
    }
    base = runs["hand-written"]
    for numbers in runs.values():
        numbers["time_ratio"] = round(numbers["epoch_s"] / base["epoch_s"], 3)
        numbers["speedup"] = round(numbers["images_per_s"] / base["images_per_s"], 3)
    print_table(runs)
    checks = {
        f"fit (DataLoader) time ratio <= {TARGET_LOADER_RATIO}": runs["fit (DataLoader)"]["time_ratio"]
        <= TARGET_LOADER_RATIO,
        f"fit (fast path) speedup >= {TARGET_FAST_SPEEDUP}": runs["fit (fast path)"]["speedup"] >= TARGET_FAST_SPEEDUP,
    }
    for check, ok in checks.items():
        print(f"  target {check}: {'met' if ok else 'NOT met'}")
    compiled = None
    if not args.skip_compile and not args.cpu_smoke:  # compiling on the CPU takes minutes: GPU only
        compiled = compile_runs(x, y, side=side, **common)
    augmented = augmented_runs(x, y, common, samples)
    print_table(augmented["runs"])
    for check, ok in augmented["targets"].items():
        print(f"  target {check}: {'met' if ok else 'NOT met'}")
    if args.json is not None:
        report = {
            "device": name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "samples": samples,
            "batch": batch,
            "epochs": args.epochs,
            "smoke": args.cpu_smoke,
            "runs": runs,
            "targets": checks,
            "compile": compiled,
            "augmented": augmented,
        }
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
