"""``colabkit.info()``: a readable summary of the runtime, for the first cell of a notebook.

Only the standard library is imported at module level: ``import colabkit``
loads this module eagerly (see ``colabkit/__init__.py``).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import sys
from typing import TextIO

from colabkit.runtime import runtime

__all__ = ["info", "info_rows"]


def _gb(size: float) -> str:
    return f"{size / 1024**3:.1f} GB"


def _torch_rows() -> list[tuple[str, str]]:
    if importlib.util.find_spec("torch") is None:
        return [("torch", "not installed (pip install torch)")]
    import torch

    cuda = torch.version.cuda or "none (CPU build)"
    rows = [("torch", torch.__version__), ("CUDA (torch build)", cuda)]
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if cudnn:
        rows.append(("cuDNN", str(cudnn)))
    return rows


def _drive_mounted() -> str:
    try:
        from colabkit.drive import drive_mounted
    except ImportError:  # pragma: no cover - drive module ships with the package
        return "unknown"
    try:
        return "yes" if drive_mounted() else "no"
    except Exception as exc:  # a summary must never fail because one probe did
        return f"unknown ({exc})"


def info_rows() -> list[tuple[str, str]]:
    """The rows :func:`info` prints, as ``(label, value)`` pairs."""
    from colabkit.device import ram

    rt = runtime()
    kind = rt.kind + (" (Colab Enterprise)" if rt.enterprise else "")
    rows: list[tuple[str, str]] = [
        ("runtime", kind),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        *_torch_rows(),
        ("accelerator", rt.accelerator),
    ]
    if rt.gpus:
        for index, gpu in enumerate(rt.gpus):
            rows.append(
                (
                    f"gpu {index}",
                    f"{gpu.name}, {_gb(gpu.memory)}, compute capability {gpu.capability[0]}.{gpu.capability[1]}",
                )
            )
    else:
        rows.append(("gpu", "none"))
    memory = ram()
    rows.append(("ram", f"{_gb(memory['available'])} free of {_gb(memory['total'])}"))
    probe_dir = rt.data_dir
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    disk = shutil.disk_usage(probe_dir)
    rows.append(("data dir", f"{rt.data_dir} ({_gb(disk.free)} free)"))
    rows.append(("work dir", str(rt.work_dir)))
    rows.append(("drive", f"{rt.drive_mountpoint} (mounted: {_drive_mounted()})"))
    if rt.session_deadline is not None and rt.session_start is not None:
        rows.append(("session", f"started {rt.session_start:%Y-%m-%d %H:%M} UTC, limit {rt.session_limit}"))
    rows.append(("cpus", str(os.cpu_count())))
    return rows


def info(*, file: TextIO | None = None) -> None:
    """Print what this runtime is and has: platform, versions, GPUs, RAM, disk, Drive.

    Args:
        file: Where to print (default: standard output).

    Example:
        >>> import colabkit
        >>> colabkit.info()  # doctest: +SKIP
        runtime      colab
        ...
    """
    rows = info_rows()
    width = max(len(label) for label, _ in rows) + 2
    out = file or sys.stdout
    for label, value in rows:
        print(f"{label:<{width}}{value}", file=out)
