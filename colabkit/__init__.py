"""colabkit: fast, disconnect-proof GPU training in Colab and Kaggle notebooks.

Public names load on first use (PEP 562), so ``import colabkit`` is cheap and
imports neither torch nor anything platform-specific.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Two public functions share their module's name. Importing them eagerly (both
# modules are stdlib-only and cheap) makes `colabkit.runtime` / `colabkit.info`
# the functions for good: a submodule import sets the package attribute only
# the first time, which happens right here.
from colabkit.info import info
from colabkit.runtime import Runtime, runtime

# name -> module that defines it. The keys are the public API (see DESIGN.md).
_LAZY: dict[str, str] = {
    "ColabkitError": "colabkit.errors",
    "Runtime": "colabkit.runtime",
    "runtime": "colabkit.runtime",
    "info": "colabkit.info",
    "get_device": "colabkit.device",
    "to_device": "colabkit.device",
    "seed_everything": "colabkit.device",
    "memory_summary": "colabkit.device",
    "free_memory": "colabkit.device",
    "mount_drive": "colabkit.drive",
    "flush_drive": "colabkit.drive",
    "project_dirs": "colabkit.drive",
    "stage": "colabkit.data.stage",
    "make_archive": "colabkit.data.archive",
    "CheckpointManager": "colabkit.checkpoint",
    "save_on_signal": "colabkit._signals",
    "keepalive": "colabkit.session",
    "session_time_left": "colabkit.session",
    "end_session": "colabkit.session",
    "download": "colabkit.session",
    "compare_devices": "colabkit.bench",
    "matmul_speed": "colabkit.bench",
    "lr_find": "colabkit.train.lr_find",
    "load_for_inference": "colabkit.inference",
    "predict_images": "colabkit.inference",
    "export": "colabkit.inference",
    "fit": "colabkit.train.loop",
    "evaluate": "colabkit.train.loop",
    "predict": "colabkit.train.loop",
    "History": "colabkit.train.history",
    "Callback": "colabkit.train.callbacks",
    "EarlyStopping": "colabkit.train.callbacks",
    "CSVLogger": "colabkit.train.callbacks",
    "launch": "colabkit.train.distributed",
    "ImageArray": "colabkit.data.images.array",
    "decode_images": "colabkit.data.images.decode",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from colabkit._signals import save_on_signal
    from colabkit.bench import compare_devices, matmul_speed
    from colabkit.checkpoint import CheckpointManager
    from colabkit.data.archive import make_archive
    from colabkit.data.images.array import ImageArray
    from colabkit.data.images.decode import decode_images
    from colabkit.data.stage import stage
    from colabkit.device import free_memory, get_device, memory_summary, seed_everything, to_device
    from colabkit.drive import flush_drive, mount_drive, project_dirs
    from colabkit.errors import ColabkitError
    from colabkit.inference import export, load_for_inference, predict_images
    from colabkit.session import download, end_session, keepalive, session_time_left
    from colabkit.train.callbacks import Callback, CSVLogger, EarlyStopping
    from colabkit.train.distributed import launch
    from colabkit.train.history import History
    from colabkit.train.loop import evaluate, fit, predict
    from colabkit.train.lr_find import lr_find


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'colabkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext colabkit``: register the notebook magics (``%%cuda`` and friends)."""
    from colabkit.magics import load_ipython_extension as load

    load(ipython)
