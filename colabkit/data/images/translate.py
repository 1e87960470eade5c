"""A torchvision transform (v1 or v2, ``Compose`` nested or not) turned into batched ops, or the reason why not.

:func:`translate` walks the steps in order, keeping track of what a sample
would be at each point: a PIL image (what torchvision's datasets hand their
transform), a uint8 tensor or a float tensor, and its ``(C, H, W)``. Every step
it knows becomes an op of :mod:`colabkit.data.images.ops` with the semantics
torchvision gives that step on that kind of input; a step it does not know, an
option it does not support, or a pipeline that would fail per sample (Normalize
on a PIL image) gives the reason instead, naming the step, and fit() keeps the
DataLoader path.

Supported: ToTensor, PILToTensor, ToImage, ToDtype, ConvertImageDtype,
Normalize, Pad, RandomCrop, CenterCrop, RandomHorizontalFlip,
RandomVerticalFlip, Resize and RandomResizedCrop (bilinear, antialiased),
RandomErasing (a fixed value) and Grayscale.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

from colabkit.data.images import ops
from colabkit.errors import MissingDependencyError, TransformNotTranslatedError

__all__ = ["translate"]


@dataclasses.dataclass
class _Sample:
    """What one sample is at a point of the pipeline."""

    stage: str  # "pil", "uint8" or "float"
    channels: int
    height: int
    width: int
    dtype: torch.dtype = torch.uint8

    @property
    def pil(self) -> bool:
        return self.stage == "pil"


def _torchvision() -> tuple[Any, Any]:
    try:
        from torchvision import transforms
        from torchvision.transforms import v2
    except ImportError:
        raise MissingDependencyError("translating a transform needs torchvision: pip install torchvision") from None
    return transforms, v2


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, numbers.Number):
        return int(size), int(size)  # type: ignore[call-overload]
    size = list(size)
    return (int(size[0]), int(size[0])) if len(size) == 1 else (int(size[0]), int(size[1]))


def _padding(padding: Any) -> tuple[int, int, int, int]:
    """torchvision's padding forms as (left, top, right, bottom)."""
    if padding is None:
        return 0, 0, 0, 0
    if isinstance(padding, numbers.Number):
        p = int(padding)  # type: ignore[call-overload]
        return p, p, p, p
    values = [int(v) for v in padding]
    if len(values) == 1:
        return values[0], values[0], values[0], values[0]
    if len(values) == 2:
        return values[0], values[1], values[0], values[1]
    return values[0], values[1], values[2], values[3]


def _fill(step: Any, fill: Any, sample: _Sample) -> list[float]:
    if isinstance(fill, dict):
        raise TransformNotTranslatedError(f"{step!r}: a fill per input type")
    if fill is None:
        return [0.0]
    values: list[Any] = [fill] if isinstance(fill, numbers.Number) else list(fill)
    if sample.stage != "float" and any(float(v) != int(v) for v in values):
        raise TransformNotTranslatedError(f"{step!r}: a fractional fill on uint8 pixels")
    if len(values) not in (1, sample.channels):
        raise TransformNotTranslatedError(f"{step!r}: fill has {len(values)} values for {sample.channels} channels")
    return [float(v) for v in values]


def _bilinear(step: Any, sample: _Sample) -> None:
    mode = step.interpolation  # an InterpolationMode, its value (v2 keeps "bilinear") or PIL's 2
    if getattr(mode, "value", mode) not in ("bilinear", 2):
        raise TransformNotTranslatedError(f"{step!r}: only bilinear interpolation is batched")
    if not sample.pil and step.antialias is False:
        raise TransformNotTranslatedError(f"{step!r}: antialias=False (only antialiased resizing is batched)")


def _to_tensor(step: Any, sample: _Sample) -> list[Any]:
    if not sample.pil:
        raise TransformNotTranslatedError(f"{step!r} after the sample is already a tensor")
    sample.stage, sample.dtype = "float", torch.float32
    return [ops.ToFloat(repr(step), torch.float32, rule="div")]


def _pil_to_tensor(step: Any, sample: _Sample) -> list[Any]:
    if not sample.pil:
        raise TransformNotTranslatedError(f"{step!r} after the sample is already a tensor")
    sample.stage = "uint8"
    return []


def _to_image(step: Any, sample: _Sample) -> list[Any]:
    if sample.pil:
        sample.stage = "uint8"
    return []


def _to_float(step: Any, sample: _Sample, dtype: Any, *, rule: str) -> list[Any]:
    if not isinstance(dtype, torch.dtype):
        raise TransformNotTranslatedError(f"{step!r}: a dtype per input type")
    if not dtype.is_floating_point:
        if sample.stage == "uint8" and dtype == torch.uint8:
            return []
        raise TransformNotTranslatedError(f"{step!r}: conversion to {dtype}")
    if sample.stage == "float" and dtype != sample.dtype and rule != "cast":
        rule = "cast"  # float to float: the values are kept
    sample.stage, sample.dtype = "float", dtype
    return [ops.ToFloat(repr(step), dtype, rule=rule)]


def _convert_image_dtype(step: Any, sample: _Sample) -> list[Any]:
    if sample.pil:
        raise TransformNotTranslatedError(f"{step!r} on a PIL image (it needs a tensor)")
    return _to_float(step, sample, step.dtype, rule="div")


def _to_dtype(step: Any, sample: _Sample) -> list[Any]:
    if sample.pil:
        return []  # v2 ToDtype passes PIL images through unchanged
    return _to_float(step, sample, step.dtype, rule="mul" if step.scale else "cast")


def _normalize(step: Any, sample: _Sample) -> list[Any]:
    if sample.stage != "float":
        raise TransformNotTranslatedError(
            f"{step!r} on a {'PIL image' if sample.pil else 'uint8 tensor'} (it needs floats)"
        )
    mean, std = list(step.mean), list(step.std)
    for name, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, sample.channels):
            raise TransformNotTranslatedError(
                f"{step!r}: {name} has {len(values)} values for {sample.channels} channels"
            )
    if any(float(s) == 0 for s in std):
        raise TransformNotTranslatedError(f"{step!r}: a std of 0")
    return [ops.Normalize(repr(step), mean, std)]


def _pad_mode(step: Any, mode: str, sample: _Sample) -> str:
    if mode not in ("constant", "edge", "reflect", "symmetric"):
        raise TransformNotTranslatedError(f"{step!r}: padding_mode={mode!r}")
    fill = step.fill
    if mode != "constant" and not sample.pil and not isinstance(fill, (int, float)) and fill is not None:
        raise TransformNotTranslatedError(
            f"{step!r}: a fill per channel with padding_mode={mode!r} (torchvision refuses it on tensors)"
        )
    return mode


def _pad(step: Any, sample: _Sample) -> list[Any]:
    padding = _padding(step.padding)
    if min(padding) < 0:
        raise TransformNotTranslatedError(f"{step!r}: negative padding")
    mode = _pad_mode(step, step.padding_mode, sample)
    op = ops.Pad(repr(step), padding, fill=_fill(step, step.fill, sample), mode=mode)
    sample.height += padding[1] + padding[3]
    sample.width += padding[0] + padding[2]
    return [op]


def _random_crop(step: Any, sample: _Sample) -> list[Any]:
    _, v2 = _torchvision()
    size = _pair(step.size)
    if isinstance(step, v2.RandomCrop) and step.padding is not None:
        left, right, top, bottom = step.padding  # v2 keeps its padding as (left, right, top, bottom)
        padding = (int(left), int(top), int(right), int(bottom))
    else:
        padding = _padding(step.padding)
    if min(padding) < 0:
        raise TransformNotTranslatedError(f"{step!r}: negative padding")
    mode = _pad_mode(step, step.padding_mode, sample)
    fill = _fill(step, step.fill, sample)
    height = sample.height + padding[1] + padding[3]
    width = sample.width + padding[0] + padding[2]
    extra_h = max(0, size[0] - height) if step.pad_if_needed else 0
    extra_w = max(0, size[1] - width) if step.pad_if_needed else 0
    if height + 2 * extra_h < size[0] or width + 2 * extra_w < size[1]:
        raise TransformNotTranslatedError(f"{step!r}: the crop is larger than the {sample.height}x{sample.width} image")
    out: list[Any] = []
    extra = (extra_w, extra_h, extra_w, extra_h)
    if isinstance(step, v2.RandomCrop):  # v2 pads once with the sum
        padding = tuple(p + e for p, e in zip(padding, extra, strict=True))  # type: ignore[assignment]
    elif any(extra) and any(padding):  # v1 pads twice: with padding, then as needed (differs for reflect)
        out.append(ops.Pad(repr(step), padding, fill=fill, mode=mode))
        padding = extra
    elif any(extra):
        padding = extra
    out.append(ops.RandomCrop(repr(step), size, padding, fill=fill, mode=mode))
    sample.height, sample.width = size
    return out


def _center_crop(step: Any, sample: _Sample) -> list[Any]:
    size = _pair(step.size)
    sample.height, sample.width = size
    return [ops.CenterCrop(repr(step), size)]


def _flip(dim: int) -> Callable[[Any, _Sample], list[Any]]:
    def handler(step: Any, sample: _Sample) -> list[Any]:
        return [ops.RandomFlip(repr(step), float(step.p), dim)]

    return handler


def _resize(step: Any, sample: _Sample) -> list[Any]:
    _bilinear(step, sample)
    if step.size is None:
        raise TransformNotTranslatedError(f"{step!r}: size=None")
    size = [step.size] if isinstance(step.size, int) else list(step.size)
    if len(size) == 2 and step.max_size is not None:
        raise TransformNotTranslatedError(f"{step!r}: max_size with a (height, width) size (torchvision refuses it)")
    sample.height, sample.width = ops.resized_size(size, step.max_size, sample.height, sample.width)
    return [ops.Resize(repr(step), size, step.max_size)]


def _random_resized_crop(step: Any, sample: _Sample) -> list[Any]:
    _bilinear(step, sample)
    size = _pair(step.size)
    sample.height, sample.width = size
    return [ops.RandomResizedCrop(repr(step), size, step.scale, step.ratio)]


def _random_erasing(step: Any, sample: _Sample) -> list[Any]:
    if sample.pil:
        raise TransformNotTranslatedError(f"{step!r} on a PIL image (it needs a tensor)")
    value = step.value
    if value is None or isinstance(value, str):
        raise TransformNotTranslatedError(f"{step!r}: value='random' (only a fixed value is batched)")
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) not in (1, sample.channels):
        raise TransformNotTranslatedError(f"{step!r}: value has {len(values)} entries for {sample.channels} channels")
    return [ops.RandomErasing(repr(step), float(step.p), step.scale, step.ratio, values)]


def _grayscale(step: Any, sample: _Sample) -> list[Any]:
    _, v2 = _torchvision()
    if sample.channels not in (1, 3):
        raise TransformNotTranslatedError(f"{step!r} on {sample.channels} channels")
    channels = int(step.num_output_channels)
    op = ops.Grayscale(repr(step), channels, pil=sample.pil, v2=isinstance(step, v2.Transform))
    sample.channels = channels
    return [op]


def _handlers() -> dict[type, Callable[[Any, _Sample], list[Any]]]:
    t1, v2 = _torchvision()
    table: dict[type, Callable[[Any, _Sample], list[Any]]] = {
        t1.ToTensor: _to_tensor,
        v2.ToTensor: _to_tensor,
        t1.PILToTensor: _pil_to_tensor,
        v2.PILToTensor: _pil_to_tensor,
        v2.ToImage: _to_image,
        t1.ConvertImageDtype: _convert_image_dtype,
        v2.ConvertImageDtype: _convert_image_dtype,
        v2.ToDtype: _to_dtype,
    }
    for module in (t1, v2):
        table[module.Normalize] = _normalize
        table[module.Pad] = _pad
        table[module.RandomCrop] = _random_crop
        table[module.CenterCrop] = _center_crop
        table[module.RandomHorizontalFlip] = _flip(-1)
        table[module.RandomVerticalFlip] = _flip(-2)
        table[module.Resize] = _resize
        table[module.RandomResizedCrop] = _random_resized_crop
        table[module.RandomErasing] = _random_erasing
        table[module.Grayscale] = _grayscale
    return table


def _steps(transform: Any) -> list[Any]:
    t1, v2 = _torchvision()
    if type(transform) in (t1.Compose, v2.Compose):
        return [step for inner in transform.transforms for step in _steps(inner)]
    return [transform]


def translate(transform: Any, shape: Sequence[int]) -> ops.Pipeline:
    """The batched pipeline doing what ``transform`` does to each PIL image of ``shape`` ``(C, H, W)``.

    Args:
        transform: A torchvision transform (v1 or v2; ``Compose`` nests), or a
            :class:`~colabkit.data.images.ops.Pipeline`, used as it is.
        shape: One sample's ``(channels, height, width)``, as the dataset stores it.

    Returns:
        The pipeline; it takes uint8 ``(N, C, H, W)`` batches and returns what
        ``default_collate`` would make of the per-sample outputs.

    Raises:
        TransformNotTranslatedError: A step (or an option of it) has no batched version; the message names it.
    """
    if isinstance(transform, ops.Pipeline):
        return transform
    if transform is None:
        raise TransformNotTranslatedError(
            "the dataset has no transform (its samples are PIL images, which do not batch)"
        )
    table = _handlers()
    channels, height, width = (int(s) for s in shape)
    sample = _Sample("pil", channels, height, width)
    built: list[Any] = []
    steps = _steps(transform)
    for step in steps:
        handler = table.get(type(step))
        if handler is None:
            raise TransformNotTranslatedError(f"the transform's step {step!r} has no batched version")
        built.extend(handler(step, sample))
    if sample.pil:
        raise TransformNotTranslatedError("the transform ends on a PIL image (add ToTensor() or PILToTensor())")
    return ops.Pipeline(built, source=" -> ".join(repr(step) for step in steps))
