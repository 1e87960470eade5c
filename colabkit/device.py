"""Which accelerator really works, moving data to it, seeding and memory.

A GPU counts only if a tiny kernel really runs on it and its compute
capability is one this torch build ships kernels for: Kaggle's P100 image
reports ``torch.cuda.is_available()`` and then fails on the first operation
("no kernel image is available"). All hardware queries go through
:data:`backend`, a :class:`TorchBackend`, so tests can stand in any GPU.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import random
from collections.abc import Mapping
from typing import Any, TypeVar

import torch

from colabkit import _notify
from colabkit.errors import ArgumentError
from colabkit.runtime import runtime

__all__ = [
    "TorchBackend",
    "backend",
    "free_memory",
    "get_device",
    "memory_summary",
    "seed_everything",
    "to_device",
    "usable_cuda_devices",
]

T = TypeVar("T")

_VALID = "'cuda', 'cuda:N', 'mps', 'cpu' or a torch.device"


class TorchBackend:
    """The hardware questions device selection asks: the seam tests replace."""

    def cuda_available(self) -> bool:
        return bool(torch.cuda.is_available())

    def cuda_count(self) -> int:
        return int(torch.cuda.device_count())

    def cuda_capability(self, index: int) -> tuple[int, int]:
        major, minor = torch.cuda.get_device_capability(index)
        return int(major), int(minor)

    def cuda_arch_list(self) -> list[str]:
        return list(torch.cuda.get_arch_list())

    def cuda_name(self, index: int) -> str:
        return str(torch.cuda.get_device_name(index))

    def mps_available(self) -> bool:
        return bool(torch.backends.mps.is_available())

    def smoke_test(self, device: torch.device) -> None:
        """Run a tiny kernel on ``device``; raises if it cannot compute."""
        x = torch.arange(8, dtype=torch.float32, device=device)
        result = float((x * 2).sum().item())
        if result != 56.0:
            raise RuntimeError(f"wrong result {result} from a test kernel")


backend = TorchBackend()

_checked: dict[str, str | None] = {}  # device string -> None if usable, else the reason


def _arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    if not arch_list:
        return True  # unknown build: let the smoke test decide
    cap = capability[0] * 10 + capability[1]
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        if not number.isdigit():
            continue
        # sm_XY runs on exactly major X (same or newer minor); compute_XY is PTX, JIT-able on newer GPUs.
        value = int(number)
        if kind == "sm" and value // 10 == cap // 10 and value <= cap:
            return True
        if kind == "compute" and value <= cap:
            return True
    return False


def _cuda_problem(index: int) -> str | None:
    """None if ``cuda:index`` computes, else why not (cached per process)."""
    key = f"cuda:{index}"
    if key in _checked:
        return _checked[key]
    problem: str | None = None
    try:
        capability = backend.cuda_capability(index)
        arch_list = backend.cuda_arch_list()
        if not _arch_supported(capability, arch_list):
            name = backend.cuda_name(index)
            problem = (
                f"{name} has compute capability {capability[0]}.{capability[1]}, but this torch build only ships "
                f"kernels for {', '.join(arch_list)}; pick another GPU type (T4 or L4) or install a torch build "
                "that supports it"
            )
        else:
            backend.smoke_test(torch.device(key))
    except Exception as exc:  # any failure means "not usable"; the reason goes in the warning
        problem = f"a test kernel failed on {key}: {exc}"
    _checked[key] = problem
    return problem


def _parse(prefer: str | torch.device, *, argument: str) -> torch.device:
    if isinstance(prefer, torch.device):
        device = prefer
    elif isinstance(prefer, str):
        try:
            device = torch.device(prefer.strip().lower())
        except RuntimeError:
            raise ArgumentError(f"{argument}={prefer!r} is not a device; use {_VALID}") from None
    else:
        raise ArgumentError(f"{argument}={prefer!r} is not a device; use {_VALID}")
    if device.type not in ("cuda", "mps", "cpu"):
        raise ArgumentError(f"{argument}={prefer!r} is not a device colabkit supports; use {_VALID}")
    return device


def _gpu_hint() -> None:
    # Advice, not a fault: a notice (plain output), not a warning (a red box in a notebook).
    rt = runtime()
    if rt.kind == "colab":
        _notify.say_once(
            "no-gpu-colab",
            "no GPU in this Colab runtime: training will run on the CPU. "
            "Switch one on with Runtime > Change runtime type > Hardware accelerator: GPU (e.g. T4), then rerun.",
        )
    elif rt.kind == "kaggle":
        _notify.say_once(
            "no-gpu-kaggle",
            "no GPU in this Kaggle session: training will run on the CPU. "
            "Switch one on in the notebook's Settings > Accelerator (GPU T4 x2 or P100), then rerun.",
        )


def _usable_cuda(device: torch.device) -> str | None:
    if not backend.cuda_available():
        return "torch.cuda.is_available() is False"
    index = device.index if device.index is not None else 0
    count = backend.cuda_count()
    if index >= count:
        return f"cuda:{index} does not exist ({count} GPU(s) visible)"
    return _cuda_problem(index)


def usable_cuda_devices() -> list[torch.device]:
    """Every visible CUDA device that really computes, in index order.

    Each GPU passes the same checks as in :func:`get_device` (its compute capability
    is in this torch build, and a tiny kernel runs on it; checked once per process).
    A GPU that fails is left out with one warning saying why.

    Returns:
        ``[cuda:0, cuda:1, ...]``; empty without a usable GPU.

    Example:
        >>> import colabkit.device
        >>> devices = colabkit.device.usable_cuda_devices()  # [] on a CPU-only machine
    """
    if not backend.cuda_available():
        return []
    usable = []
    for index in range(backend.cuda_count()):
        problem = _cuda_problem(index)
        if problem is None:
            usable.append(torch.device("cuda", index))
        else:
            _notify.warn_once(f"unusable:cuda:{index}", f"cuda:{index} is left out: {problem}")
    return usable


def get_device(prefer: str | torch.device | None = None) -> torch.device:
    """Return the best device that really computes.

    Order: ``COLABKIT_DEVICE`` (environment), then ``prefer``, then cuda > mps > cpu.
    A GPU that cannot run a tiny kernel (or whose compute capability this torch
    build lacks) is skipped with one warning saying why. On Colab or Kaggle
    without a GPU, a warning says once how to switch one on.

    Args:
        prefer: ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"cpu"`` or a :class:`torch.device`.

    Returns:
        The :class:`torch.device` to use.

    Raises:
        ArgumentError: ``prefer`` (or ``COLABKIT_DEVICE``) is not a known device.

    Example:
        >>> import colabkit
        >>> colabkit.get_device("cpu")
        device(type='cpu')
    """
    override = runtime_env().get("COLABKIT_DEVICE")
    if override:
        requested: torch.device | None = _parse(override, argument="COLABKIT_DEVICE")
    elif prefer is not None:
        requested = _parse(prefer, argument="prefer")
    else:
        requested = None

    if requested is not None:
        if requested.type == "cpu":
            return requested
        problem = (
            _usable_cuda(requested)
            if requested.type == "cuda"
            else (None if backend.mps_available() else "the MPS backend is not available")
        )
        if problem is None:
            return requested
        _notify.warn_once(
            f"fallback:{requested}", f"{requested} was asked for but cannot be used ({problem}); using cpu"
        )
        _gpu_hint()
        return torch.device("cpu")

    if backend.cuda_available():
        problems = []
        for index in range(backend.cuda_count()):
            problem = _cuda_problem(index)
            if problem is None:
                return torch.device("cuda", index) if index else torch.device("cuda")
            problems.append(problem)
        _notify.warn_once("fallback:cuda", f"CUDA is present but unusable ({'; '.join(problems)}); using cpu")
        return torch.device("cpu")
    if backend.mps_available():
        return torch.device("mps")
    _gpu_hint()
    return torch.device("cpu")


def runtime_env() -> Mapping[str, str]:
    """The environment seen by detection (the active fake's, or the real one)."""
    from colabkit.runtime import current_probe

    return current_probe().environ


def to_device(obj: T, device: str | torch.device, *, non_blocking: bool | str = "auto") -> T:
    """Move every tensor inside ``obj`` to ``device``, keeping the structure.

    Handles dicts (and other mappings), lists, tuples, namedtuples, sets and
    dataclass instances, nested to any depth; everything else is returned as is.

    Args:
        obj: A tensor or a structure holding tensors.
        device: Target device.
        non_blocking: ``"auto"`` copies asynchronously when the target is CUDA
            (worth it with pinned memory); or force True / False.

    Returns:
        The same structure with tensors on ``device`` (new containers; the input is not modified).
    """
    target = torch.device(device) if isinstance(device, str) else device
    if non_blocking == "auto":
        asynchronous = target.type == "cuda"
    elif isinstance(non_blocking, bool):
        asynchronous = non_blocking
    else:
        raise ArgumentError(f"non_blocking={non_blocking!r} must be 'auto', True or False")
    moved: T = _move(obj, target, asynchronous)
    return moved


def _move(obj: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        moved = {key: _move(value, device, non_blocking) for key, value in obj.items()}
        kind: Any = type(obj)
        try:
            return kind(moved)  # keeps OrderedDict and other dict subclasses
        except TypeError:
            return moved
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_move(value, device, non_blocking) for value in obj))
    if isinstance(obj, (list, tuple, set, frozenset)):
        return type(obj)(_move(value, device, non_blocking) for value in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {
            field.name: _move(getattr(obj, field.name), device, non_blocking)
            for field in dataclasses.fields(obj)
            if field.init
        }
        return dataclasses.replace(obj, **changes)
    return obj


def seed_everything(seed: int, *, deterministic: bool = False) -> int:
    """Seed python, numpy (if installed), torch and every CUDA device.

    Args:
        seed: The seed, a non-negative integer below 2**32.
        deterministic: Also ask torch for deterministic algorithms (slower; some
            operations then raise instead of running nondeterministically) and set
            ``CUBLAS_WORKSPACE_CONFIG`` as CUDA requires for that.

    Returns:
        The seed, so ``seed = seed_everything(42)`` reads naturally.

    Raises:
        ArgumentError: ``seed`` is not an integer in range.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ArgumentError(f"seed={seed!r} must be an integer between 0 and 2**32 - 1, e.g. seed=42")
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return seed


def memory_summary() -> dict[str, dict[str, int]]:
    """Memory per device in bytes.

    Returns:
        ``{"cuda:0": {"allocated", "reserved", "peak", "total"}, ...}`` for each GPU, and
        ``{"cpu": {"total", "available", "used"}}`` for RAM.
    """
    summary: dict[str, dict[str, int]] = {}
    if backend.cuda_available():
        for index in range(backend.cuda_count()):
            summary[f"cuda:{index}"] = {
                "allocated": int(torch.cuda.memory_allocated(index)),
                "reserved": int(torch.cuda.memory_reserved(index)),
                "peak": int(torch.cuda.max_memory_allocated(index)),
                "total": int(torch.cuda.get_device_properties(index).total_memory),
            }
    summary["cpu"] = ram()
    return summary


def ram() -> dict[str, int]:
    """Total, available and used RAM in bytes, from /proc/meminfo (zeros where unreadable)."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                fields[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {"total": 0, "available": 0, "used": 0}
    total = fields.get("MemTotal", 0)
    available = fields.get("MemAvailable", fields.get("MemFree", 0))
    return {"total": total, "available": available, "used": total - available}


def free_memory() -> None:
    """Collect garbage and return cached CUDA memory to the driver (after an OOM, or between runs)."""
    gc.collect()
    if backend.cuda_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
