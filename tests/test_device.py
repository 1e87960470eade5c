"""Device choice through the backend seam: real fallbacks without a real GPU."""

from __future__ import annotations

import dataclasses
import inspect
import random
import threading
import warnings
from collections import OrderedDict, namedtuple
from collections.abc import Callable

import pytest
import torch

from colabkit import device as dev
from colabkit.device import get_device, memory_summary, seed_everything, to_device
from colabkit.errors import ArgumentError, ColabkitWarning
from colabkit.testing import fake_colab, fake_kaggle


class FakeBackend(dev.TorchBackend):
    def __init__(
        self,
        *,
        cuda: int = 0,
        capability: tuple[int, int] = (7, 5),
        arch: tuple[str, ...] = ("sm_75", "sm_80", "sm_86", "sm_90"),
        kernel_error: Exception | None = None,
        mps: bool = False,
    ) -> None:
        self.cuda = cuda
        self.capability = capability
        self.arch = list(arch)
        self.kernel_error = kernel_error
        self.mps = mps
        self.smoke_tested: list[str] = []

    def cuda_available(self) -> bool:
        return self.cuda > 0

    def cuda_count(self) -> int:
        return self.cuda

    def cuda_capability(self, index: int) -> tuple[int, int]:
        return self.capability

    def cuda_arch_list(self) -> list[str]:
        return self.arch

    def cuda_name(self, index: int) -> str:
        return "Tesla P100-PCIE-16GB" if self.capability == (6, 0) else "Tesla T4"

    def mps_available(self) -> bool:
        return self.mps

    def smoke_test(self, device: torch.device) -> None:
        self.smoke_tested.append(str(device))
        if self.kernel_error is not None:
            raise self.kernel_error


@pytest.fixture
def fake_backend(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeBackend]:
    def install(**kwargs: object) -> FakeBackend:
        backend = FakeBackend(**kwargs)  # type: ignore[arg-type]
        monkeypatch.setattr(dev, "backend", backend)
        return backend

    return install


def test_cpu_when_nothing_else(fake_backend) -> None:  # type: ignore[no-untyped-def]
    fake_backend()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_device() == torch.device("cpu")


def test_working_gpu_is_chosen_after_a_kernel_ran(fake_backend) -> None:  # type: ignore[no-untyped-def]
    backend = fake_backend(cuda=1)
    assert get_device() == torch.device("cuda")
    assert backend.smoke_tested == ["cuda:0"]
    get_device()
    assert backend.smoke_tested == ["cuda:0"]  # checked once per process


def test_unsupported_arch_falls_back_with_one_warning(fake_backend) -> None:  # type: ignore[no-untyped-def]
    # Kaggle's P100 (sm_60) with a torch build that dropped sm_60 kernels.
    backend = fake_backend(cuda=1, capability=(6, 0), arch=("sm_70", "sm_75", "sm_80"))
    with pytest.warns(ColabkitWarning, match=r"P100.*6\.0.*sm_70") as record:
        assert get_device() == torch.device("cpu")
    assert len(record) == 1
    assert backend.smoke_tested == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_device() == torch.device("cpu")  # said once


def test_ptx_arch_runs_on_newer_gpu() -> None:
    assert dev._arch_supported((9, 0), ["sm_80", "compute_80"])
    assert not dev._arch_supported((9, 0), ["sm_80"])
    assert dev._arch_supported((8, 6), ["sm_80"])
    assert not dev._arch_supported((6, 0), ["sm_70", "compute_70"])


def test_kernel_failure_falls_back(fake_backend) -> None:  # type: ignore[no-untyped-def]
    fake_backend(cuda=1, kernel_error=RuntimeError("CUDA error: no kernel image is available"))
    with pytest.warns(ColabkitWarning, match="no kernel image"):
        assert get_device() == torch.device("cpu")


def test_second_gpu_used_when_first_is_broken(fake_backend, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    backend = fake_backend(cuda=2)

    def smoke(device: torch.device) -> None:
        backend.smoke_tested.append(str(device))
        if device.index == 0:
            raise RuntimeError("busy")

    monkeypatch.setattr(backend, "smoke_test", smoke)
    assert get_device() == torch.device("cuda", 1)


@pytest.mark.parametrize("prefer", ["cuda", "cuda:1", "mps", torch.device("cuda", 0)])
def test_preferred_but_unavailable_falls_back(fake_backend, prefer: object) -> None:  # type: ignore[no-untyped-def]
    fake_backend()
    with pytest.warns(ColabkitWarning, match="cannot be used"):
        assert get_device(prefer) == torch.device("cpu")  # type: ignore[arg-type]


def test_preferred_gpu_index_out_of_range(fake_backend) -> None:  # type: ignore[no-untyped-def]
    fake_backend(cuda=1)
    with pytest.warns(ColabkitWarning, match=r"cuda:3 does not exist \(1 GPU"):
        assert get_device("cuda:3") == torch.device("cpu")


def test_prefer_cpu_and_mps(fake_backend) -> None:  # type: ignore[no-untyped-def]
    fake_backend(cuda=1, mps=True)
    assert get_device("cpu") == torch.device("cpu")
    assert get_device("mps") == torch.device("mps")


@pytest.mark.parametrize("bad", ["gpu", "tpu", "cuda:x", 3])
def test_unknown_prefer_lists_valid_values(bad: object) -> None:
    with pytest.raises(ArgumentError, match=r"prefer=.*'cuda', 'cuda:N', 'mps', 'cpu'") as info:
        get_device(bad)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_env_override_wins(fake_backend, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    fake_backend(cuda=1)
    with fake_colab(environ={"COLABKIT_DEVICE": "cpu"}):
        assert get_device("cuda") == torch.device("cpu")
    with fake_colab(environ={"COLABKIT_DEVICE": "quantum"}), pytest.raises(ArgumentError, match="COLABKIT_DEVICE"):
        get_device()


def test_no_gpu_on_colab_says_how_to_switch_one_on(fake_backend, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    fake_backend()
    # Advice, not a fault: a notice on stdout (plain cell output), never a warning (warnings are errors here).
    with fake_colab():
        assert get_device() == torch.device("cpu")
        assert get_device() == torch.device("cpu")
    out = capsys.readouterr().out
    assert out.count("colabkit: no GPU in this Colab runtime") == 1, out  # said once
    assert "Runtime > Change runtime type" in out
    with fake_kaggle():
        get_device()
    out = capsys.readouterr().out
    assert out.count("colabkit: no GPU in this Kaggle session") == 1 and "Settings > Accelerator" in out, out


def test_a_warning_names_the_callers_line_not_colabkits(fake_backend) -> None:  # type: ignore[no-untyped-def]
    fake_backend()
    line = inspect.currentframe().f_lineno + 2  # type: ignore[union-attr]
    with pytest.warns(ColabkitWarning, match="cannot be used") as record:
        get_device("cuda")
    (warning,) = record
    # A notebook prints "<file>:<line>: ColabkitWarning: ..." and then that line's source: the user's call.
    assert (warning.filename, warning.lineno) == (__file__, line)


def test_a_warning_with_no_caller_outside_colabkit_shows_no_library_line() -> None:
    from colabkit import _notify

    # A background thread's stack holds only threading and colabkit frames: nothing of them is shown.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        thread = threading.Thread(target=_notify.warn, args=("from a worker",))
        thread.start()
        thread.join()
    (warning,) = record
    assert warning.category is ColabkitWarning and str(warning.message) == "from a worker"
    assert warning.filename in ("sys", "<sys>")  # Python 3.12 spells it "<sys>"


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    meta: dict[str, object]
    name: str = "b"


Pair = namedtuple("Pair", ["left", "right"])


def test_to_device_moves_nested_structures() -> None:
    t = torch.ones(2)
    data = {
        "a": [t, (t, "keep")],
        "b": Batch(t, {"y": t, "n": 3}),
        "c": Pair(t, None),
        "d": OrderedDict(z=t),
        "e": 1.5,
    }
    moved = to_device(data, "meta")
    assert moved["a"][0].device.type == "meta"
    assert moved["a"][1][0].device.type == "meta" and moved["a"][1][1] == "keep"
    assert isinstance(moved["b"], Batch) and moved["b"].x.device.type == "meta"
    assert moved["b"].meta["y"].device.type == "meta" and moved["b"].meta["n"] == 3
    assert isinstance(moved["c"], Pair) and moved["c"].left.device.type == "meta" and moved["c"].right is None
    assert isinstance(moved["d"], OrderedDict) and moved["d"]["z"].device.type == "meta"
    assert moved["e"] == 1.5
    assert data["a"][0].device.type == "cpu"  # input untouched


def test_to_device_rejects_bad_non_blocking() -> None:
    with pytest.raises(ArgumentError, match="non_blocking"):
        to_device(torch.ones(1), "cpu", non_blocking="sometimes")


def test_seed_everything_reproduces() -> None:
    import numpy as np

    seed_everything(7)
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    seed_everything(7)
    second = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2])


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "42", True])
def test_seed_everything_rejects_bad_seeds(bad: object) -> None:
    with pytest.raises(ArgumentError, match="seed="):
        seed_everything(bad)  # type: ignore[arg-type]


def test_memory_summary_on_cpu() -> None:
    summary = memory_summary()
    assert summary["cpu"]["total"] > 0
    assert 0 < summary["cpu"]["available"] <= summary["cpu"]["total"]
    dev.free_memory()


def test_usable_cuda_devices_lists_only_gpus_that_compute(fake_backend, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    fake_backend()
    assert dev.usable_cuda_devices() == []
    backend = fake_backend(cuda=3)

    def smoke(device: torch.device) -> None:
        backend.smoke_tested.append(str(device))
        if device.index == 1:
            raise RuntimeError("CUDA error: busy")

    monkeypatch.setattr(backend, "smoke_test", smoke)
    with pytest.warns(ColabkitWarning, match=r"cuda:1 is left out: .*busy") as record:
        assert dev.usable_cuda_devices() == [torch.device("cuda", 0), torch.device("cuda", 2)]
    assert len(record) == 1
    assert backend.smoke_tested == ["cuda:0", "cuda:1", "cuda:2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dev.usable_cuda_devices() == [torch.device("cuda", 0), torch.device("cuda", 2)]
    assert backend.smoke_tested == ["cuda:0", "cuda:1", "cuda:2"]  # checked once per process
    # A build without the GPU's architecture: no kernel is even tried.
    dev._checked.clear()
    fake_backend(cuda=1, capability=(6, 0), arch=("sm_70",))
    with pytest.warns(ColabkitWarning, match=r"P100.*6\.0"):
        assert dev.usable_cuda_devices() == []
