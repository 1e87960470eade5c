"""What only a real GPU can show: AMP, a real CUDA out-of-memory, exact resume on CUDA, and the GPU helpers.

Every test here carries the ``cuda`` marker and is skipped without a usable CUDA
GPU, so CI (no GPU) stays green; ``make gpu-check`` runs them on one GPU and
writes a report. Run them alone with ``pytest -m cuda tests/test_cuda.py``.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset, get_worker_info

from colabkit.train.callbacks import Callback, FitContext


def _usable_gpu() -> bool:
    if not torch.cuda.is_available():
        return False
    from colabkit.device import usable_cuda_devices

    return bool(usable_cuda_devices())


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _usable_gpu(), reason="needs a usable CUDA GPU (none is present)"),
]

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda")
MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _clean_gpu() -> Iterator[None]:
    yield
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def separable(n: int = 512, features: int = 16) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, features, generator=generator)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


class Probe(torch.nn.Module):
    """An MLP that remembers the dtypes of its outputs and the batch sizes it saw."""

    def __init__(self, features: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(features, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
        self.dtypes: set[torch.dtype] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        self.dtypes.add(out.dtype)
        return out


class Steps(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, ctx: FitContext) -> None:
        self.steps += 1


def _loss_fell(history: Any) -> bool:
    return history[-1]["loss"] < 0.8 * history[0]["loss"]


# ----------------------------------------------------------------------------- device and precision


def test_get_device_picks_cuda() -> None:
    import colabkit

    device = colabkit.get_device()
    assert device.type == "cuda"
    assert colabkit.get_device("cuda").type == "cuda"


def test_auto_precision_picks_bf16_on_ampere_and_newer_and_the_loss_falls() -> None:
    from colabkit.train.loop import fit
    from colabkit.train.precision import resolve_precision

    major, _ = torch.cuda.get_device_capability()
    expected = "bf16" if major >= 8 else "fp16"
    assert resolve_precision("auto", CUDA).name == expected
    model = Probe()
    history = fit(model, separable(), epochs=4, batch_size=32, lr=1e-2, seed=0, progress=False)
    assert next(model.parameters()).device.type == "cuda"
    assert model.dtypes == {torch.bfloat16 if expected == "bf16" else torch.float16}  # autocast really ran
    assert _loss_fell(history), [r["loss"] for r in history]


def test_fp16_when_asked_uses_a_grad_scaler_and_the_loss_falls(tmp_path: Path) -> None:
    from colabkit.checkpoint import CheckpointManager
    from colabkit.train.loop import fit

    model = Probe()
    history = fit(
        model, separable(), epochs=4, batch_size=32, lr=1e-2, seed=0, precision="fp16",
        checkpoint_dir=tmp_path, progress=False,
    )  # fmt: skip
    assert model.dtypes == {torch.float16}
    assert _loss_fell(history), [r["loss"] for r in history]
    with CheckpointManager(tmp_path) as manager:
        state = manager.load()
    scaler = state["scaler_state_dict"]  # the GradScaler existed and was saved for resume
    assert float(scaler["scale"]) > 0 and int(scaler["_growth_tracker"]) >= 0


# ----------------------------------------------------------------------------- a real out-of-memory


class Wide(torch.nn.Module):
    """Activation memory grows with the batch (about 12 MiB per sample), weights stay small."""

    HIDDEN = 2**20

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(4, self.HIDDEN)
        self.down = torch.nn.Linear(self.HIDDEN, 2)
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down(torch.relu(self.up(x)))
        self.sizes.append(x.shape[0])
        return out


def _peak_bytes(model: torch.nn.Module, batch: int) -> int:
    x = torch.randn(batch, 4, device=CUDA)
    y = torch.zeros(batch, dtype=torch.long, device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def test_a_real_cuda_oom_halves_the_micro_batch_and_keeps_the_steps(capsys: pytest.CaptureFixture[str]) -> None:
    from colabkit.train.loop import fit

    batch = 64
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(4 * batch, 4, generator=generator)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    options: dict[str, Any] = {
        "epochs": 2, "batch_size": batch, "optimizer": torch.optim.SGD, "lr": 0.1, "seed": 0,
        "precision": "fp32", "device": "cuda", "metrics": (),
    }  # fmt: skip

    reference = Wide().to(CUDA)
    fit(reference, data, progress=False, **options)

    model = Wide().to(CUDA)
    # Measured, not assumed: a quarter batch must fit under the cap, half a batch must not.
    per_sample = (_peak_bytes(model, 16) - _peak_bytes(model, 8)) / 8
    fixed = _peak_bytes(model, 8) - 8 * per_sample
    model.sizes.clear()
    cap = torch.cuda.memory_allocated() + fixed + 0.375 * batch * per_sample + 32 * MiB
    total = torch.cuda.get_device_properties(0).total_memory
    steps = Steps()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        history = fit(model, data, progress=True, callbacks=[steps], **options)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    out = capsys.readouterr().out
    assert "out of memory at step 1: micro-batch 64 -> 32" in out, out
    assert history.stop_reason == "completed"
    assert steps.steps == 2 * 4  # the optimizer-step count is unchanged
    assert max(model.sizes[-4:]) <= batch // 2  # the micro-batch stayed small after the back-off
    for a, b in zip(reference.parameters(), model.parameters(), strict=True):
        # Same effective batch: only the summation order of the micro-batches differs.
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- exact resume on CUDA


def _cuda_worker(out: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(ROOT / "tests" / "_cuda_worker.py"), str(out), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)


@pytest.mark.parametrize("data", ["fast", "loader"])
def test_exact_resume_on_cuda_after_sigkill(tmp_path: Path, subprocess_env: dict[str, str], data: str) -> None:
    env = {**subprocess_env, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONUNBUFFERED": "1"}
    common = ["--data", data]
    reference = _cuda_worker(tmp_path / "ref.pt", env, "--dir", str(tmp_path / "a"), *common)
    assert reference.returncode == 0, reference.stderr
    killed = _cuda_worker(
        tmp_path / "res.pt", env, "--dir", str(tmp_path / "b"), *common, "--kill-at", "8", "--after-save", "5"
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "res.pt").exists()
    resumed = _cuda_worker(tmp_path / "res.pt", env, "--dir", str(tmp_path / "b"), *common)
    assert resumed.returncode == 0, resumed.stderr
    # Witnesses that it resumed rather than started over: the notice, and the first step it took.
    assert "resuming from" in resumed.stdout, resumed.stdout
    assert (tmp_path / "res.pt.first_step").read_text() == "6"
    assert (tmp_path / "ref.pt.first_step").read_text() == "1"
    ref, res = torch.load(tmp_path / "ref.pt", weights_only=True), torch.load(tmp_path / "res.pt", weights_only=True)
    for name, value in ref.items():
        assert torch.equal(value, res[name]), name


def test_fit_on_the_fast_path_equals_the_dataloader_path_on_cuda(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    env = {**subprocess_env, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONUNBUFFERED": "1"}
    fast = _cuda_worker(tmp_path / "fast.pt", env, "--dir", str(tmp_path / "a"), "--data", "fast")
    plain = _cuda_worker(tmp_path / "plain.pt", env, "--dir", str(tmp_path / "b"), "--data", "plain")
    assert fast.returncode == 0 and plain.returncode == 0, fast.stderr + plain.stderr
    assert "train on the in-memory fast path (96 samples on cuda" in fast.stdout, fast.stdout
    assert "train on the DataLoader path" in plain.stdout, plain.stdout
    a, b = torch.load(tmp_path / "fast.pt", weights_only=True), torch.load(tmp_path / "plain.pt", weights_only=True)
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


# ----------------------------------------------------------------------------- loaders and model options


class WorkerTagged(Dataset):  # type: ignore[type-arg]
    """Each sample says which DataLoader worker made it."""

    def __init__(self) -> None:
        self.data = separable(128)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        info = get_worker_info()
        x, y = self.data[index]
        return x, torch.tensor(-1 if info is None else info.id), y


class SeesWorkers(Probe):
    def __init__(self) -> None:
        super().__init__()
        self.workers: set[int] = set()

    def forward(self, x: torch.Tensor, worker: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        self.workers.update(worker.tolist())
        assert x.device.type == "cuda"
        return super().forward(x)


def test_dataloader_workers_after_cuda_is_initialised() -> None:
    from colabkit.train.loop import fit

    torch.zeros(1, device=CUDA)  # CUDA is up before the workers start (fork)
    assert torch.cuda.is_initialized()
    model = SeesWorkers()
    history = fit(model, WorkerTagged(), epochs=2, batch_size=16, num_workers=2, seed=0, progress=False)
    assert history.stop_reason == "completed"
    assert model.workers == {0, 1}


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.head = torch.nn.Linear(16, 2)
        self.channels_last_inputs: set[bool] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self.channels_last_inputs.add(x.is_contiguous(memory_format=torch.channels_last))
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def images(n: int = 256) -> TensorDataset:
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(n, 3, 16, 16, generator=generator)
    return TensorDataset(x, (x[:, 0].mean(dim=(1, 2)) > 0).long())


def test_channels_last_trains() -> None:
    from colabkit.train.loop import fit

    model = SmallCNN()
    history = fit(model, images(), epochs=4, batch_size=32, lr=3e-2, seed=0, channels_last=True, progress=False)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.channels_last_inputs == {True}
    assert _loss_fell(history), [r["loss"] for r in history]


def test_compile_trains(compile_caches: Path) -> None:
    pytest.importorskip("triton", reason="torch.compile on CUDA needs triton")
    from torch._dynamo.utils import counters

    from colabkit.train.loop import fit

    torch._dynamo.reset()
    counters.clear()
    model = SmallCNN()
    history = fit(model, images(), epochs=3, batch_size=32, lr=3e-2, seed=0, compile=True, progress=False)
    assert counters["stats"]["unique_graphs"] >= 1  # the forward pass really went through the compiler
    assert _loss_fell(history), [r["loss"] for r in history]


def test_reduce_overhead_with_accumulation_and_a_partial_batch_matches_eager(compile_caches: Path) -> None:
    """CUDA graphs: gradients accumulate in stable buffers, the last partial batch runs eagerly."""
    pytest.importorskip("triton", reason="torch.compile on CUDA needs triton")
    from colabkit.train.loop import fit

    eager, graphed = SmallCNN(), SmallCNN()
    options = {"epochs": 2, "batch_size": 32, "grad_accum": 2, "lr": 3e-2, "seed": 0, "precision": "fp32"}
    fit(eager, images(240), **options, progress=False)
    history = fit(graphed, images(240), **options, compile="reduce-overhead", progress=False)
    assert history.stop_reason == "completed"
    for a, b in zip(eager.parameters(), graphed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_channels_last_is_on_by_default_for_convolutions_under_bf16() -> None:
    from colabkit.train.loop import fit

    model = SmallCNN()
    fit(model, images(64), batch_size=32, precision="bf16", seed=0, progress=False)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.channels_last_inputs == {True}
    off = SmallCNN()
    fit(off, images(64), batch_size=32, precision="bf16", seed=0, channels_last=False, progress=False)
    assert off.channels_last_inputs == {False}


# ----------------------------------------------------------------------------- GPU helpers


def test_compare_devices_and_matmul_speed_report_the_gpu() -> None:
    import colabkit

    name = torch.cuda.get_device_name(0)
    data = separable(256)
    result = colabkit.compare_devices(
        Probe(), (data.tensors[0], data.tensors[1]), devices="all", steps=3, warmup=1, progress=False
    )
    assert result.gpu_found and "cuda:0" in result.devices
    timing = result.get("cuda:0", "train")
    assert timing.device_name == name and timing.samples_per_s > 0
    assert result.speedup("cuda:0", "train") is not None
    assert name in str(result)
    speed = colabkit.matmul_speed(sizes=[2048], dtypes=["float32", "float16"], repeats=5, progress=False)
    best = speed.best("cuda:0")
    assert best.device_name == name
    assert best.tflops > speed.best("cpu").tflops  # a GPU that is slower than the CPU is not working


def _nvcc() -> str | None:
    from colabkit import magics

    return magics._find_nvcc()  # the lookup %%cuda itself uses


def test_cuda_magic_runs_a_kernel_that_prints() -> None:
    if _nvcc() is None:
        pytest.skip("nvcc is not installed")
    from colabkit.magics import run_cuda_cell

    cell = r"""
#include <cstdio>
__global__ void hello(int *sum) { printf("hello from thread %d\n", threadIdx.x); atomicAdd(sum, threadIdx.x); }
int main() {
    int *sum; cudaMallocManaged(&sum, sizeof(int)); *sum = 0;
    hello<<<1, 4>>>(sum);
    cudaError_t err = cudaDeviceSynchronize();
    if (err != cudaSuccess) { fprintf(stderr, "CUDA error: %s\n", cudaGetErrorString(err)); return 1; }
    printf("sum %d\n", *sum);
    return 0;
}
"""
    out, err = io.StringIO(), io.StringIO()
    result = run_cuda_cell("", cell, out=out, err=err)
    assert result.compiled and result.returncode == 0, err.getvalue()
    printed = out.getvalue()
    assert all(f"hello from thread {i}" in printed for i in range(4)), printed
    assert "sum 6" in printed  # the kernel computed on the GPU, not just printed
    major, minor = torch.cuda.get_device_capability()
    assert f"sm_{major}{minor}" in " ".join(result.command) or "compute_" in " ".join(result.command)


def test_memory_summary_and_free_memory() -> None:
    import colabkit

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    block = torch.empty(256 * MiB, dtype=torch.uint8, device=CUDA)
    summary = colabkit.memory_summary()["cuda:0"]
    assert summary["allocated"] >= 256 * MiB
    assert summary["reserved"] >= summary["allocated"]
    assert summary["peak"] >= 256 * MiB
    assert summary["total"] == torch.cuda.get_device_properties(0).total_memory
    reserved = summary["reserved"]
    del block
    colabkit.free_memory()
    after = colabkit.memory_summary()["cuda:0"]
    assert after["reserved"] <= reserved - 256 * MiB  # the cache went back to the driver
    assert after["peak"] < 256 * MiB  # and the peak was reset


# ----------------------------------------------------------------------------- the in-memory fast path


def _reference_batches(data: TensorDataset, batch_size: int, seed: int, epoch: int) -> list[list[torch.Tensor]]:
    from colabkit.train.state import make_resumable

    loader = make_resumable(
        data, argument="train", batch_size=batch_size, shuffle=True, num_workers=0, pin_memory=False, seed=seed
    )
    return list(loader.epoch(epoch))


@pytest.mark.parametrize("share", [None, 0.0], ids=["on-device", "pinned-copies"])
def test_fast_path_on_cuda_matches_and_keeps_data_where_planned(monkeypatch: pytest.MonkeyPatch, share: Any) -> None:
    from colabkit.train import fastpath
    from colabkit.train.state import make_resumable

    if share is not None:
        monkeypatch.setattr(fastpath, "DEVICE_MEMORY_SHARE", share)
    generator = torch.Generator().manual_seed(8)
    data = TensorDataset(torch.randn(1000, 3, 8, 8, generator=generator), torch.randint(0, 10, (1000,)))
    loader = make_resumable(data, argument="train", batch_size=64, shuffle=True, num_workers=0, pin_memory=True, seed=4)
    fast = fastpath.for_training(data, loader, CUDA)
    assert fast is not None
    for epoch, skip in ((0, 0), (1, 3)):
        got = list(fast.epoch(epoch, skip=skip))  # all kept: a reused staging buffer must not change them
        torch.cuda.synchronize()
        want = _reference_batches(data, 64, 4, epoch)[skip:]
        assert len(got) == len(want)
        for have, expected in zip(got, want, strict=True):
            for a, b in zip(have, expected, strict=True):
                assert a.device.type == "cuda"
                assert torch.equal(a.cpu(), b)
    assert fast.placement == ("device" if share is None else "pinned")
    if share is None:
        assert fast.describe().endswith(f"on {CUDA})")
    else:
        assert "pinned host memory" in fast.describe()


def _cifar_like(count: int) -> Any:
    from torchvision import transforms as T

    from colabkit.data.images.array import ImageArray

    generator = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, generator=generator)
    guide = T.Compose(
        [
            T.RandomCrop(32, padding=4, padding_mode="reflect"),
            T.RandomHorizontalFlip(),
            T.RandomResizedCrop(24, scale=(0.3, 1.0)),
            T.ToTensor(),
            T.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26)),
            T.RandomErasing(p=0.5, value=(0.1, 0.2, 0.3)),
        ]
    )
    return ImageArray(images.numpy(), list(range(count)), transform=guide)


def test_image_ops_draw_and_move_the_same_on_cuda_as_on_the_cpu() -> None:
    from colabkit.data.images.inmemory import in_memory_images
    from colabkit.data.images.ops import SampleKeys
    from colabkit.data.images.translate import translate

    found = in_memory_images(_cifar_like(64))
    assert not isinstance(found, str)
    images, _ = found.rows()
    pipeline = translate(found.transform, found.sample_shape)
    index = torch.arange(64)
    cpu = pipeline(images, SampleKeys(index, seed=9, epoch=2))
    cuda = pipeline(images.to(CUDA), SampleKeys(index.to(CUDA), seed=9, epoch=2))
    crop_cpu = pipeline.ops[0].params(images.shape, SampleKeys(index, seed=9, epoch=2).at_step(0))
    crop_cuda = pipeline.ops[0].params(images.shape, SampleKeys(index.to(CUDA), seed=9, epoch=2).at_step(0))
    assert all(torch.equal(a, b.cpu()) for a, b in zip(crop_cpu, crop_cuda, strict=True))  # bitwise draws
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-5, rtol=0)  # resizing: float rounding only


@pytest.mark.parametrize("share", [None, 0.0], ids=["on-device", "pinned-copies"])
def test_image_path_on_cuda_places_the_uint8_set_and_matches_the_cpu(
    monkeypatch: pytest.MonkeyPatch, share: Any
) -> None:
    from colabkit.train import fastpath
    from colabkit.train.imagebatches import image_batches
    from colabkit.train.state import ResumableBatchSampler

    if share is not None:
        monkeypatch.setattr(fastpath, "DEVICE_MEMORY_SHARE", share)
    data = _cifar_like(300)
    on_gpu = image_batches(data, ResumableBatchSampler(300, 64, shuffle=True, seed=3), CUDA)
    on_cpu = image_batches(data, ResumableBatchSampler(300, 64, shuffle=True, seed=3), torch.device("cpu"))
    assert on_gpu is not None and on_cpu is not None
    got = list(on_gpu.epoch(1, skip=1))
    torch.cuda.synchronize()
    want = list(on_cpu.epoch(1, skip=1))
    assert len(got) == len(want) == 4
    for (x, y), (wx, wy) in zip(got, want, strict=True):
        assert x.device.type == "cuda" and torch.equal(y.cpu(), wy)
        torch.testing.assert_close(x.cpu(), wx, atol=1e-5, rtol=0)
    assert on_gpu.placement == ("device" if share is None else "pinned")
    assert ("on cuda" if share is None else "pinned host memory") in on_gpu.describe()


def test_fit_on_the_image_path_on_cuda_says_where(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from colabkit.train.loop import fit

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    fit(model, _cifar_like(256), epochs=1, batch_size=64, checkpoint_dir=tmp_path, progress=True)
    assert "train on the in-memory image path (256 ImageArray images on cuda" in capsys.readouterr().out
