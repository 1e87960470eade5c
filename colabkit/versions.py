"""Which torch is installed and what it can do: the one place colabkit asks.

colabkit supports every torch from :data:`TORCH_FLOOR` on (pyproject's
``torch>=``), and Colab and Kaggle ship their own. Code that depends on a
feature newer than the floor asks a predicate here instead of comparing
versions or probing with ``hasattr`` where it needs the answer, so the
floor's differences are listed in one file and the floor CI job
(``make test-floor``) exercises every branch below.

torch is imported on the first question, never at ``import colabkit``.
"""

from __future__ import annotations

import functools
import re
from typing import Any

__all__ = [
    "SAFE_WEIGHTS_ONLY",
    "TORCH_FLOOR",
    "compile_cache_artifacts",
    "dataloader_has_in_order",
    "inductor_cache_dir",
    "onnx_export_has_dynamo",
    "out_of_memory_error",
    "parse_version",
    "torch_version",
    "torch_version_text",
    "weights_only_is_safe",
]

#: The lowest torch colabkit declares and tests (pyproject ``torch>=``; CI's floor job).
TORCH_FLOOR = (2, 3)
#: First torch release whose ``weights_only`` unpickler is fixed for CVE-2026-24747.
SAFE_WEIGHTS_ONLY = (2, 10)


def _torch() -> Any:
    import torch

    return torch


def torch_version_text() -> str:
    """The installed torch's version string, e.g. ``"2.3.1+cu121"`` (a seam: tests pretend to be older)."""
    return str(_torch().__version__)


def parse_version(text: str) -> tuple[int, int, int]:
    """``"2.3.1+cu121"`` -> ``(2, 3, 1)``; pre-releases and local tags count as their release."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        return (0, 0, 0)
    major, minor, patch = match.groups()
    return (int(major), int(minor), int(patch or 0))


def torch_version() -> tuple[int, int, int]:
    """The installed torch as ``(major, minor, patch)``."""
    return parse_version(torch_version_text())


def weights_only_is_safe() -> bool:
    """Whether ``torch.load(weights_only=True)`` is fixed for CVE-2026-24747 in this torch."""
    return torch_version()[:2] >= SAFE_WEIGHTS_ONLY


@functools.lru_cache(maxsize=1)
def out_of_memory_error() -> type[BaseException]:
    """The exception torch raises when a device runs out of memory.

    ``torch.OutOfMemoryError`` since 2.5; before that the same error lived only at
    ``torch.cuda.OutOfMemoryError`` (torch 2.3 has no top-level name).
    """
    torch = _torch()
    found = getattr(torch, "OutOfMemoryError", None)
    return found if isinstance(found, type) else torch.cuda.OutOfMemoryError


@functools.lru_cache(maxsize=1)
def onnx_export_has_dynamo() -> bool:
    """Whether ``torch.onnx.export`` takes ``dynamo=True`` (the torch.export-based exporter; torch 2.5+)."""
    import inspect

    torch = _torch()
    try:
        return "dynamo" in inspect.signature(torch.onnx.export).parameters
    except (TypeError, ValueError):
        return torch_version()[:2] >= (2, 5)


def dataloader_has_in_order() -> bool:
    """Whether ``DataLoader`` takes ``in_order`` (torch 2.6+)."""
    import inspect

    from torch.utils.data import DataLoader

    return "in_order" in inspect.signature(DataLoader.__init__).parameters


def compile_cache_artifacts() -> bool:
    """Whether ``torch.compiler`` can save and load its cache artifacts in another process (torch 2.7+)."""
    compiler = _torch().compiler
    return hasattr(compiler, "save_cache_artifacts") and hasattr(compiler, "load_cache_artifacts")


def inductor_cache_dir() -> str:
    """The folder inductor writes its compiled kernels to (its module moved in torch 2.4)."""
    import importlib

    try:
        module = importlib.import_module("torch._inductor.runtime.cache_dir_utils")
    except ImportError:  # torch 2.3
        module = importlib.import_module("torch._inductor.utils")
    return str(module.cache_dir())
