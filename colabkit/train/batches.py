"""What a batch looks like: (inputs, targets) pairs or dicts, calling the model, gathering outputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from colabkit.errors import ArgumentError

__all__ = [
    "call_model",
    "concat",
    "describe",
    "detach_to_cpu",
    "inputs_and_targets",
    "inputs_only",
    "safe_len",
    "to_channels_last",
]

TARGET_KEYS = ("labels", "label", "targets", "target", "y")


def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def inputs_and_targets(batch: Any) -> tuple[Any, Any]:
    """(inputs, targets) of a training batch."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return (batch[0] if len(batch) == 2 else tuple(batch[:-1])), batch[-1]
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch:
                return {k: v for k, v in batch.items() if k != key}, batch[key]
        raise ArgumentError(
            f"a batch is a dict with keys {sorted(batch)} but none of {', '.join(TARGET_KEYS)} holds the targets; "
            "name the label key 'labels' or pass a dataset of (inputs, targets)"
        )
    raise ArgumentError(
        f"a batch is {describe(batch)}; training and evaluation need (inputs, targets) pairs "
        "(or dicts with a 'labels' key)"
    )


def inputs_only(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return batch[0]
        return inputs_and_targets(batch)[0]
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in TARGET_KEYS}
    return batch


def call_model(model: Any, inputs: Any) -> Any:
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def to_channels_last(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
        return inputs.contiguous(memory_format=torch.channels_last)
    if isinstance(inputs, tuple):
        return tuple(to_channels_last(x) for x in inputs)
    return inputs


def detach_to_cpu(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().to("cpu")
    if isinstance(out, Mapping):
        return {k: detach_to_cpu(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(detach_to_cpu(v) for v in out)
    return out


def concat(outputs: list[Any]) -> Any:
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, Mapping):
        return {k: concat([o[k] for o in outputs]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat([o[i] for o in outputs]) for i in range(len(first)))
    return outputs


def safe_len(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
