"""Image transforms on whole batches, with every random draw keyed by (seed, epoch, sample index).

Each op takes a batch ``(N, C, H, W)`` (uint8 or float, on any device) and
:class:`SampleKeys` (the samples' dataset indices plus the run seed and the
epoch) and returns the transformed batch. An op does for every sample what the
torchvision transform of the same name does to that one sample, given the same
drawn parameters:

* pixel moves (pad, crop, flip) and conversions are bitwise equal;
* ``Normalize`` is the same float arithmetic as torchvision's (equal in practice);
* resizing is the antialiased triangle filter PIL and torch use, written as two
  matrix products per sample (no host round trip for per-sample crop boxes): on
  float tensors it matches ``torch.nn.functional.interpolate(antialias=True)``
  to float rounding; where torchvision resizes a PIL image it is Pillow's
  fixed-point arithmetic (22-bit weights, 8-bit rounding after the horizontal
  pass, then the vertical one): bitwise equal to Pillow up to 12, while Pillow
  13, which runs the vertical pass first when the height shrinks much more than
  the width (its PR #9549), then differs by one grey level on some pixels. A
  uint8 tensor is resized the same way (torch's own uint8 kernel may also
  differ from it by one level).

The "PIL stage" of a pipeline is the part before ``ToTensor`` /
``PILToTensor`` / ``ToImage``: the batch is still uint8 ``(N, C, H, W)`` but
ops follow PIL's semantics (its grayscale formula, its rounding).

Randomness: :class:`SampleKeys` hashes ``(seed, epoch, step, draw)`` into a
key and combines it with each sample's index through a 32-bit integer hash
(murmur3's finaliser) computed in int64 tensor ops that never overflow. The
bits are the same on the CPU and on CUDA, and a sample's crop and flip depend
only on its index, so they do not change with the batch size, the device or a
resume point.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "CenterCrop",
    "Grayscale",
    "Normalize",
    "Pad",
    "Pipeline",
    "RandomCrop",
    "RandomErasing",
    "RandomFlip",
    "RandomResizedCrop",
    "Resize",
    "SampleKeys",
    "ToFloat",
    "below",
    "erase",
    "hash32",
    "resized_size",
    "uniform",
]

_M32 = 0xFFFFFFFF
_MIX = (0x7FEB352D, 0x21F0AAAD)  # odd multipliers below 2**31 (Wellons' hash-prospector family)


def hash32(x: Any) -> Any:
    """A 32-bit integer mixer (xorshift-multiply, a bijection on [0, 2**32)); Python ints or int64 tensors.

    Each product is a value below 2**32 times a constant below 2**31, so int64 never
    overflows: the same bits on every device, from ordinary tensor ops.
    """
    x = x ^ (x >> 16)
    x = (x * _MIX[0]) & _M32
    x = x ^ (x >> 15)
    x = (x * _MIX[1]) & _M32
    return x ^ (x >> 15)


def _scalar_key(*parts: int) -> int:
    state = 0x9E3779B9
    for part in parts:
        part = int(part)
        for word in (part & _M32, (part >> 32) & _M32):
            state = hash32(state ^ word)
    return int(state)


@functools.lru_cache(maxsize=512)
def _key_column(seed: int, epoch: int, step: int, count: int, device: torch.device) -> torch.Tensor:
    """The keys of an op's ``count`` draws, as a ``(count, 1)`` tensor on ``device``: made once per epoch."""
    keys = [_scalar_key(seed, epoch, step, draw) for draw in range(count)]
    return torch.tensor(keys, dtype=torch.int64).reshape(count, 1).to(device)


@dataclasses.dataclass(frozen=True)
class SampleKeys:
    """What a batch's random draws are a function of: the run seed, the epoch and each sample's index.

    Attributes:
        index: Dataset index of every sample in the batch, int64, on the batch's device.
        seed: The run seed.
        epoch: The epoch.
        step: Position of the op in its pipeline (so two ops draw independent numbers).
    """

    index: torch.Tensor
    seed: int = 0
    epoch: int = 0
    step: int = 0

    def at_step(self, step: int) -> SampleKeys:
        return dataclasses.replace(self, step=step)

    def bits(self, count: int) -> torch.Tensor:
        """``(count, N)``: 32 random bits (int64 values in [0, 2**32)) per draw and sample, in one pass."""
        column = _key_column(self.seed, self.epoch, self.step, count, self.index.device)
        return hash32(hash32((self.index & _M32) ^ column) ^ (self.index >> 32))


def uniform(bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Numbers in [0, 1) from :meth:`SampleKeys.bits` (24 bits for float32, 32 for float64: exact everywhere)."""
    if dtype == torch.float64:
        return bits.to(dtype) * 2.0**-32
    return (bits >> 8).to(dtype) * 2.0**-24


def below(bits: torch.Tensor, bound: int | torch.Tensor) -> torch.Tensor:
    """Integers in [0, bound) from :meth:`SampleKeys.bits` (``bound`` <= 2**31, an int or one per sample)."""
    return (bits * bound) >> 32


class _Constants:
    """Per-channel constants as tensors, made once per device and dtype (no host copy per batch)."""

    def __init__(self, values: Sequence[float]) -> None:
        self.values = [float(v) for v in values]
        self.made: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def on(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self.made:
            column = torch.tensor(self.values, dtype=torch.float64).to(like.dtype)
            self.made[key] = column.reshape(1, -1, 1, 1).to(like.device)
        return self.made[key]


# --------------------------------------------------------------------------- gathering pixels


def _source_index(position: torch.Tensor, size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Source row (column) of each padded position (may lie outside [0, size)), as ``np.pad`` maps them.

    Returns the in-range source index and, for ``constant``, where the position is inside the image.
    """
    if mode == "constant":
        inside = (position >= 0) & (position < size)
        return position.clamp(0, size - 1), inside
    if mode == "edge" or size == 1:
        return position.clamp(0, size - 1), None
    if mode == "reflect":  # mirror without repeating the edge: period 2 * (size - 1)
        period = 2 * (size - 1)
        folded = position.remainder(period)
        return torch.where(folded >= size, period - folded, folded), None
    period = 2 * size  # symmetric: mirror repeating the edge
    folded = position.remainder(period)
    return torch.where(folded >= size, period - 1 - folded, folded), None


def _window(
    images: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    height: int,
    width: int,
    *,
    pad: tuple[int, int],
    mode: str,
    fill: _Constants,
) -> torch.Tensor:
    """Per sample, the ``height x width`` window at ``(top, left)`` of the image padded by ``pad`` (top, left).

    One gather from the unpadded batch: the padded image is never built.
    """
    n, c, h, w = images.shape
    device = images.device
    rows_at = top[:, None] - pad[0] + torch.arange(height, device=device)  # (N, height), unpadded coordinates
    cols_at = left[:, None] - pad[1] + torch.arange(width, device=device)
    rows, rows_in = _source_index(rows_at, h, mode)
    cols, cols_in = _source_index(cols_at, w, mode)
    flat = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, 1, height * width).expand(n, c, height * width)
    out = images.reshape(n, c, h * w).gather(2, flat).reshape(n, c, height, width)
    if mode == "constant" and rows_in is not None and cols_in is not None:
        inside = (rows_in[:, :, None] & cols_in[:, None, :])[:, None]
        out = torch.where(inside, out, fill.on(images))
    return out


def _fixed(value: int, images: torch.Tensor) -> torch.Tensor:
    return torch.full((images.shape[0],), value, dtype=torch.long, device=images.device)


class Op:
    """One batched step; ``describe`` names the torchvision step it stands for."""

    def __init__(self, describe: str) -> None:
        self.description = describe

    def __call__(self, images: torch.Tensor, keys: SampleKeys) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.description


class ToFloat(Op):
    """To float: ``ToTensor`` and ``ConvertImageDtype`` divide by 255, ``ToDtype(scale=True)`` multiplies by 1/255."""

    def __init__(self, describe: str, dtype: torch.dtype = torch.float32, *, rule: str = "div") -> None:
        super().__init__(describe)
        self.dtype = dtype
        self.rule = rule

    def __call__(self, images: torch.Tensor, keys: SampleKeys) -> torch.Tensor:
        if images.is_floating_point() or self.rule == "cast":
            return images.to(self.dtype)
        if self.rule == "mul":
            return images.to(self.dtype).mul_(1.0 / 255)
        return images.to(self.dtype).div_(255)


class Normalize(Op):
    """``(x - mean) / std`` per channel, torchvision's arithmetic."""

    def __init__(self, describe: str, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(describe)
        self.mean = _Constants(mean)
        self.std = _Constants(std)

    def __call__(self, images: torch.Tensor, keys: SampleKeys) -> torch.Tensor:
        return images.sub(self.mean.on(images)).div_(self.std.on(images))


class Pad(Op):
    """Fixed padding (left, top, right, bottom) with ``constant`` fill or ``edge`` / ``reflect`` / ``symmetric``."""

    def __init__(self, describe: str, padding: Sequence[int], *, fill: Sequence[float], mode: str) -> None:
        super().__init__(describe)
        self.left, self.top, self.right, self.bottom = (int(p) for p in padding)
        self.fill = _Constants(fill)
        self.mode = mode

    def __call__(self, images: torch.Tensor, keys: SampleKeys) -> torch.Tensor:
        _, _, h, w = images.shape
        zero = _fixed(0, images)
        return _window(
            images,
            zero,
            zero,
            h + self.top + self.bottom,
            w + self.left + self.right,
            pad=(self.top, self.left),
            mode=self.mode,
            fill=self.fill,
        )


class RandomCrop(Op):
    """Pad (as ``Pad``), then a ``size`` window at a uniformly drawn position, in one gather."""

    def __init__(
        self, describe: str, size: tuple[int, int], padding: Sequence[int], *, fill: Sequence[float], mode: str
    ) -> None:
        super().__init__(describe)
        self.size = size
        self.left, self.top, self.right, self.bottom = (int(p) for p in padding)
        self.fill = _Constants(fill)
        self.mode = mode

    def params(self, shape: Sequence[int], keys: SampleKeys) -> tuple[torch.Tensor, torch.Tensor]:
        """Top and left of each sample's window in the padded image."""
        h = shape[-2] + self.top + self.bottom
        w = shape[-1] + self.left + self.right
        bits = keys.bits(2)
        return below(bits[0], h - self.size[0] + 1), below(bits[1], w - self.size[1] + 1)

    def __call__(self, images: torch.Tensor, keys: SampleKeys) -> torch.Tensor:
        top, left = self.params(images.shape, keys)
        return _window(images, top, left, *self.size, pad=(self.top, self.left), mode=self.mode, fill=self.fill)


class CenterCrop(Op):
    """torchvision's center crop: offsets ``round((H - h) / 2)``; zero padding where the crop is larger."""

    def __init__(self, describe: str, size: tuple[int, int]) -> None:
        super().__init__(describe)
        self.size = size
        self.fill = _Constants([0])

    def __call__(self, images: torch.Tensor, keys: SampleKeys) -> torch.Tensor:
        _, _, h, w = images.shape
        th, tw = self.size
        pad_top, pad_left = max(0, (th - h) // 2), max(0, (tw - w) // 2)
        padded_h, padded_w = max(h, th), max(w, tw)
        top = round((padded_h - th) / 2.0)
        left = round((padded_w - tw) / 2.0)
        return _window(
            images,
            _fixed(top, images),
            _fixed(left, images),
            th,
            tw,
            pad=(pad_top, pad_left),
            mode="constant",
            fill=self.fill,
        )


class RandomFlip(Op):
    """Flip each sample with probability ``p`` (``dim`` -1: horizontal, -2: vertical)."""

    def __init__(self, describe: str, p: float, dim: int) -> None:
        super().__init__(describe)
        self.p = p
        self.dim = dim

    def params(self, keys: SampleKeys) -> torch.Tensor:
        return uniform(keys.bits(1)[0]) < self.p

    def __call__(self, images: torch.Tensor, keys: SampleKeys) -> torch.Tensor:
        flip = self.params(keys).reshape(-1, 1, 1, 1)
        return torch.where(flip, images.flip(self.dim), images)


def resized_size(size: Sequence[int], max_size: int | None, height: int, width: int) -> tuple[int, int]:
    """Output (height, width) of torchvision's ``Resize(size, max_size=...)`` for an image of that size."""
    if len(size) == 2:
        return int(size[0]), int(size[1])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = int(size[0]), int(int(size[0]) * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _filter_weights(start: torch.Tensor, length: torch.Tensor, out: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, out, size) weights of the antialiased triangle filter resampling ``[start, start+length)`` to ``out``.

    PIL's and torch's ``antialias=True`` bilinear: the filter widens by the
    scale when shrinking, and each output's weights are normalised over the
    pixels of the crop it covers.
    """
    device = start.device
    scale = length.to(dtype) / out  # (N,)
    support = scale.clamp(min=1.0)
    center = start.to(dtype)[:, None] + (torch.arange(out, device=device, dtype=dtype) + 0.5) * scale[:, None]
    pixel = torch.arange(size, device=device, dtype=dtype) + 0.5  # pixel centres
    distance = (pixel[None, None, :] - center[:, :, None]) / support[:, None, None]
    weights = (1.0 - distance.abs()).clamp(min=0.0)
    inside = (pixel[None, :] >= start.to(dtype)[:, None]) & (pixel[None, :] < (start + length).to(dtype)[:, None])
    weights = weights * inside[:, None, :]
    return weights / weights.sum(dim=2, keepdim=True)


_PRECISION_BITS = 22  # Pillow's fixed-point weights for 8-bit images (32 - 8 - 2)


def _resample(
    images: torch.Tensor,
    box: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    size: tuple[int, int],
    *,
    as_uint8: bool,
) -> torch.Tensor:
    """Crop ``box`` (top, left, height, width per sample, or one for all) and resize it to ``size``, an axis at a time.

    uint8 images follow Pillow's ``ImagingResampleInner``: weights rounded to 22-bit fixed
    point, the horizontal pass first, each pass rounded and clipped to 8 bits (computed in
    float64, where these integer sums are exact).
    """
    top, left, height, width = box
    _, _, h, w = images.shape
    if as_uint8:
        scale = float(1 << _PRECISION_BITS)
        across = (_filter_weights(left, width, size[1], w, torch.float64) * scale + 0.5).floor()
        down = (_filter_weights(top, height, size[0], h, torch.float64) * scale + 0.5).floor()

        work = torch.matmul(images.to(torch.float64), across[:, None].transpose(-1, -2))
        work = ((work + scale / 2) / scale).floor().clamp_(0, 255)
        work = torch.matmul(down[:, None], work)
        return ((work + scale / 2) / scale).floor().clamp_(0, 255).to(torch.uint8)
    across = _filter_weights(left, width, size[1], w, images.dtype)  # (N, out_w, W)
    down = _filter_weights(top, height, size[0], h, images.dtype)  # (N, out_h, H)
    out = torch.matmul(images, across[:, None].transpose(-1, -2))  # (N, C, H, out_w)
    return torch.matmul(down[:, None], out)  # (N, C, out_h, out_w)


class Resize(Op):
    """torchvision's ``Resize`` with bilinear interpolation and antialiasing (what PIL always does)."""

    def __init__(self, describe: str, size: Sequence[int], max_size: int | None) -> None:
        super().__init__(describe)
        self.size = list(size)
        self.max_size = max_size

    def __call__(self, images: torch.Tensor, keys: SampleKeys) -> torch.Tensor:
        _, _, h, w = images.shape
        target = resized_size(self.size, self.max_size, h, w)
        if target == (h, w):
            return images
        zero = torch.zeros(1, dtype=torch.long, device=images.device)  # one box, broadcast to every sample
        box = (zero, zero, zero + h, zero + w)
        return _resample(images, box, target, as_uint8=not images.is_floating_point())


def _tries(
    area_bits: torch.Tensor,
    ratio_bits: torch.Tensor,
    area: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    fits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's ten tries at a box of random area and aspect ratio, all at once: the first that fits.

    A try is ``sqrt(area * aspect)`` by ``sqrt(area / aspect)``, rounded half to even like
    Python's ``round``. Returns those two sides of the first try ``fits(first, second)``
    accepts (0 where none does), and where one did. The uniform numbers are exact on every
    device; ``exp`` in float64 may differ between the CPU and CUDA in its last bit, so a side
    that lands exactly on a rounding boundary could differ there (RandomCrop, flips and
    erasing's coin are integer arithmetic and always agree).
    """
    target = area * (scale[0] + (scale[1] - scale[0]) * uniform(area_bits, torch.float64))
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * uniform(ratio_bits, torch.float64))
    first_side = torch.sqrt(target * aspect).round().long()
    second_side = torch.sqrt(target / aspect).round().long()
    ok = fits(first_side, second_side)
    chosen = ok.to(torch.uint8).argmax(dim=0, keepdim=True)  # the first try that fits (0 if none)
    found = ok.any(dim=0)
    return (
        torch.where(found, first_side.gather(0, chosen)[0], 0),
        torch.where(found, second_side.gather(0, chosen)[0], 0),
        found,
    )


class RandomResizedCrop(Op):
    """A crop of random area and aspect ratio (torchvision's 10 tries, then its central fallback), resized."""

    def __init__(self, describe: str, size: tuple[int, int], scale: Sequence[float], ratio: Sequence[float]) -> None:
        super().__init__(describe)
        self.size = size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def params(self, shape: Sequence[int], keys: SampleKeys) -> tuple[torch.Tensor, ...]:
        """Per sample ``(top, left, height, width)`` of the crop, drawn as ``RandomResizedCrop.get_params``."""
        height, width = int(shape[-2]), int(shape[-1])
        bits = keys.bits(22)
        box_w, box_h, found = _tries(
            bits[0:20:2],
            bits[1:20:2],
            height * width,
            self.scale,
            self.ratio,
            lambda w, h: (w > 0) & (w <= width) & (h > 0) & (h <= height),
        )
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            fallback_w, fallback_h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            fallback_w, fallback_h = round(height * max(self.ratio)), height
        else:
            fallback_w, fallback_h = width, height
        box_h = torch.where(found, box_h, fallback_h)
        box_w = torch.where(found, box_w, fallback_w)
        top = torch.where(found, below(bits[20], height - box_h + 1), (height - box_h) // 2)
        left = torch.where(found, below(bits[21], width - box_w + 1), (width - box_w) // 2)
        return top, left, box_h, box_w

    def __call__(self, images: torch.Tensor, keys: SampleKeys) -> torch.Tensor:
        box = self.params(images.shape, keys)
        return _resample(images, box, self.size, as_uint8=not images.is_floating_point())  # type: ignore[arg-type]


class Grayscale(Op):
    """RGB to luma: PIL's integer formula on the PIL stage, torchvision's float weights on tensors."""

    def __init__(self, describe: str, channels: int, *, pil: bool, v2: bool) -> None:
        super().__init__(describe)
        self.channels = channels
        self.pil = pil
        self.v2 = v2

    def __call__(self, images: torch.Tensor, keys: SampleKeys) -> torch.Tensor:
        if images.shape[1] == 1:
            luma = images if self.pil else images.clone()
        elif self.pil:  # PIL's convert("L"): (R*19595 + G*38470 + B*7471 + 0x8000) >> 16
            wide = images.to(torch.int32)
            luma = ((wide[:, 0] * 19595 + wide[:, 1] * 38470 + wide[:, 2] * 7471 + 0x8000) >> 16).to(images.dtype)
            luma = luma[:, None]
        else:
            r, g, b = images.unbind(dim=1)
            if self.v2:
                mixed = r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114)
            else:
                mixed = 0.2989 * r + 0.587 * g + 0.114 * b
            luma = mixed.to(images.dtype)[:, None]
        return luma.expand(-1, self.channels, -1, -1).contiguous() if self.channels == 3 else luma


class RandomErasing(Op):
    """With probability ``p``, a box of random area and aspect ratio set to ``value`` (torchvision's 10 tries)."""

    def __init__(
        self, describe: str, p: float, scale: Sequence[float], ratio: Sequence[float], value: Sequence[float]
    ) -> None:
        super().__init__(describe)
        self.p = p
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.value = _Constants(value)

    def params(self, shape: Sequence[int], keys: SampleKeys) -> tuple[torch.Tensor, ...]:
        """Per sample ``(erase, top, left, height, width)``, drawn as ``RandomErasing.get_params``."""
        img_h, img_w = int(shape[-2]), int(shape[-1])
        bits = keys.bits(23)
        box_h, box_w, found = _tries(
            bits[1:21:2], bits[2:21:2], img_h * img_w, self.scale, self.ratio, lambda h, w: (h < img_h) & (w < img_w)
        )
        erase_it = (uniform(bits[0]) < self.p) & found
        top = below(bits[21], img_h - box_h + 1)
        left = below(bits[22], img_w - box_w + 1)
        return erase_it, top, left, box_h, box_w

    def __call__(self, images: torch.Tensor, keys: SampleKeys) -> torch.Tensor:
        erase_it, top, left, box_h, box_w = self.params(images.shape, keys)
        return erase(images, (erase_it, top, left, box_h, box_w), self.value)


def erase(images: torch.Tensor, box: Sequence[torch.Tensor], value: _Constants) -> torch.Tensor:
    """Set, in each sample where ``box[0]`` is true, the box ``(top, left, height, width) = box[1:]`` to ``value``."""
    erase_it, top, left, box_h, box_w = box
    _, _, h, w = images.shape
    rows = torch.arange(h, device=images.device)[None, :]
    cols = torch.arange(w, device=images.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & erase_it[:, None, None])[:, None]
    return torch.where(mask, value.on(images), images)


class Pipeline:
    """Batched steps run in order: what fit() runs in place of a dataset's per-sample transform.

    :func:`~colabkit.data.images.translate.translate` makes one from a torchvision
    transform. To hand fit() your own batched pipeline exactly as written, make the
    dataset's ``transform`` a Pipeline of your own steps: each is a callable
    ``step(images, keys) -> images`` on a batch (uint8 ``(N, C, H, W)`` at the start),
    drawing its random numbers from ``keys`` (:meth:`SampleKeys.bits`, :func:`uniform`,
    :func:`below`) so a resume repeats them::

        def shift(images, keys):
            dx = below(keys.bits(1)[0], 5) - 2  # -2..2 pixels, per sample
            ...

        data = colabkit.ImageArray(x, y, transform=Pipeline([shift, normalize], source="shift, normalize"))

    Where the DataLoader path runs instead (a custom sampler, say), each sample is
    transformed as a batch of one, its keys drawn from torch's generator, which the
    DataLoader path seeds per sample.

    Args:
        steps: The steps, each ``step(images, keys) -> images``.
        source: What it does, for the start notice (default: the steps' reprs).
    """

    def __init__(
        self, steps: Sequence[Callable[[torch.Tensor, SampleKeys], torch.Tensor]], *, source: str = ""
    ) -> None:
        self.ops = list(steps)
        self.source = source or " -> ".join(repr(op) for op in self.ops)

    def __call__(self, images: Any, keys: SampleKeys | None = None) -> torch.Tensor:
        """Transform a batch ``images`` whose samples are ``keys.index``; or, without keys, one sample."""
        if keys is None:
            return self._one(images)
        for step, op in enumerate(self.ops):
            images = op(images, keys.at_step(step))
        return images

    def _one(self, sample: Any) -> torch.Tensor:
        """One PIL image or ``(H, W[, C])`` array, as a dataset's ``__getitem__`` hands it over."""
        import numpy

        pixels = torch.from_numpy(numpy.array(sample, dtype=numpy.uint8))  # a copy: PIL arrays are read-only
        pixels = pixels[:, :, None] if pixels.dim() == 2 else pixels
        key = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        batch = pixels.permute(2, 0, 1).unsqueeze(0).contiguous()
        return self(batch, SampleKeys(torch.tensor([key & _M32]), seed=key >> 32))[0]

    def __repr__(self) -> str:
        return f"Pipeline({self.source})"
