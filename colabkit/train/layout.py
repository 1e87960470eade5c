"""fit(channels_last=...): the memory format of the model and its 4-D inputs.

Channels-last (NHWC) lets cuDNN's tensor-core convolutions skip the layout
transposes they need for NCHW. It pays for 2-D convolutions under bf16 / fp16 on
CUDA (+12 % on ResNet-18 at batch 128 on an H200, issue 19); on the CPU, under
fp32 or without convolutions it buys nothing or costs, so ``"auto"`` leaves it off.
"""

from __future__ import annotations

from typing import Any

import torch

from colabkit.errors import ArgumentError

__all__ = ["CHOICES", "check_channels_last", "has_conv2d", "use_channels_last"]

CHOICES: tuple[Any, ...] = ("auto", True, False)


def check_channels_last(value: Any) -> bool | str:
    """``channels_last`` checked: ``"auto"``, True or False.

    Raises:
        ArgumentError: Anything else.
    """
    if isinstance(value, bool):
        return value
    if value == "auto":
        return "auto"
    raise ArgumentError(
        f"channels_last={value!r} must be one of {', '.join(map(repr, CHOICES))} "
        "('auto': on for 2-D convolutions under bf16/fp16 on CUDA)"
    )


def has_conv2d(model: torch.nn.Module) -> bool:
    return any(isinstance(module, torch.nn.Conv2d) for module in model.modules())


def use_channels_last(setting: bool | str, *, model: torch.nn.Module, device: torch.device, precision: str) -> bool:
    """Whether the run uses channels-last: ``setting`` when it is True or False, else the rule above.

    Example:
        >>> use_channels_last("auto", model=torch.nn.Conv2d(3, 8, 3), device=torch.device("cpu"), precision="fp32")
        False
    """
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" and precision in ("bf16", "fp16") and has_conv2d(model)
