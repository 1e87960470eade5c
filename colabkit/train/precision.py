"""Mixed-precision policy: which autocast dtype, and whether a GradScaler is needed.

``precision="auto"`` picks bf16 autocast on GPUs that run bf16 natively
(compute capability 8.0+: A100, L4, H100), fp16 with a GradScaler on older
GPUs (T4, P100, V100) and fp32 on the CPU and Apple's MPS. The GPU's
capability is read through :data:`colabkit.device.backend`, so tests can
pretend to be a T4 or an A100.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

from colabkit import device as _device
from colabkit.errors import ArgumentError

__all__ = ["PRECISIONS", "Precision", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "fp16", "bf16")

_ALIASES = {
    "32": "fp32",
    "float32": "fp32",
    "16": "fp16",
    "float16": "fp16",
    "16-mixed": "fp16",
    "bfloat16": "bf16",
    "bf16-mixed": "bf16",
}


@dataclasses.dataclass(frozen=True)
class Precision:
    """The resolved policy.

    Attributes:
        name: ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        device_type: ``"cuda"``, ``"cpu"``, ``"mps"``.
        dtype: Autocast dtype, or None for plain fp32 (no autocast at all).
        scaler: Whether a GradScaler must scale the loss (fp16 only).
    """

    name: str
    device_type: str
    dtype: torch.dtype | None
    scaler: bool

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context to run forward passes in (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for fp16, else None."""
        if not self.scaler:
            return None
        return torch.amp.GradScaler(self.device_type)


def _bf16_native(device: torch.device) -> bool:
    index = device.index if device.index is not None else 0
    major, _ = _device.backend.cuda_capability(index)
    return major >= 8


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """Turn ``precision`` ("auto", "fp32", "fp16", "bf16") into a :class:`Precision` for ``device``.

    Args:
        precision: The user's choice; a few common aliases ("16-mixed", "bfloat16") are accepted.
        device: The training device.

    Returns:
        The policy.

    Raises:
        ArgumentError: ``precision`` is unknown.

    Example:
        >>> resolve_precision("auto", torch.device("cpu")).name
        'fp32'
    """
    if not isinstance(precision, str):
        raise ArgumentError(f"precision={precision!r} must be one of {', '.join(map(repr, PRECISIONS))}")
    name = _ALIASES.get(precision.strip().lower(), precision.strip().lower())
    if name not in PRECISIONS:
        raise ArgumentError(
            f"precision={precision!r} is unknown; use one of {', '.join(map(repr, PRECISIONS))} "
            "('auto' picks bf16 or fp16 on a GPU and fp32 on the CPU)"
        )
    kind = device.type
    if name == "auto":
        # CPU autocast is slower than fp32 on most CPUs; MPS autocast is immature.
        name = "fp32" if kind != "cuda" else "bf16" if _bf16_native(device) else "fp16"
    if name == "fp32":
        return Precision("fp32", kind, None, scaler=False)
    if name == "bf16":
        return Precision("bf16", kind, torch.bfloat16, scaler=False)
    return Precision("fp16", kind, torch.float16, scaler=True)
