"""Batched image ops against torchvision itself, sample by sample, with the same drawn parameters.

Each test translates a torchvision pipeline, runs it on a batch, then runs torchvision's own
transform on every sample (a PIL image, as torchvision's datasets hand it over) with the
parameters colabkit drew for that sample fed to torchvision's random draws.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("torchvision")
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from colabkit.data.images import ops
from colabkit.data.images.translate import translate
from colabkit.errors import TransformNotTranslatedError

N = 6


def batch(channels: int = 3, height: int = 20, width: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (N, channels, height, width), dtype=torch.uint8, generator=generator)


def pil(image: torch.Tensor) -> Image.Image:
    if image.shape[0] == 1:
        return Image.fromarray(image[0].numpy())
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def keys(seed: int = 3, epoch: int = 0, index: torch.Tensor | None = None) -> ops.SampleKeys:
    return ops.SampleKeys(torch.arange(N) if index is None else index, seed=seed, epoch=epoch)


@contextlib.contextmanager
def drawn(monkeypatch: pytest.MonkeyPatch, randint: list[int], rand: list[float]) -> Iterator[None]:
    """torch.randint / torch.rand give these values, in order (torchvision's draws for one sample)."""
    ints, floats = list(randint), list(rand)

    def fake_randint(*args: Any, size: Any = (1,), **kwargs: Any) -> torch.Tensor:
        return torch.tensor(ints.pop(0)).reshape(size)

    def fake_rand(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.tensor([floats.pop(0)])

    with monkeypatch.context() as patch:
        patch.setattr(torch, "randint", fake_randint)
        patch.setattr(torch, "rand", fake_rand)
        yield
    assert not ints and not floats, "torchvision drew fewer numbers than expected"


def run(transform: Any, images: torch.Tensor, key: ops.SampleKeys | None = None) -> tuple[torch.Tensor, Any]:
    pipeline = translate(transform, images.shape[1:])
    return pipeline(images, key or keys()), pipeline


def reference(transform: Any, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch, draws: Any = None) -> torch.Tensor:
    outputs = []
    for k in range(N):
        randint, rand = draws(k) if draws else ([], [])
        with drawn(monkeypatch, randint, rand):
            outputs.append(torch.as_tensor(transform(pil(images[k]))))
    return torch.stack(outputs)


# --------------------------------------------------------------------------- conversions


@pytest.mark.parametrize(
    "transform",
    [
        T.ToTensor(),
        T.PILToTensor(),
        T.Compose([T.PILToTensor(), T.ConvertImageDtype(torch.float32)]),
        T.Compose([T.PILToTensor(), T.ConvertImageDtype(torch.float64)]),
        v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]),
        v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32)]),
        v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.PILToTensor()]),  # ToDtype passes PIL through
        T.Compose([T.ToTensor(), T.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))]),
        v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5], [0.3])]),
    ],
    ids=repr,
)
def test_conversions_and_normalize_are_bitwise_torchvision(transform: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    images = batch()
    ours, _ = run(transform, images)
    theirs = reference(transform, images, monkeypatch)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_grayscale_images_become_one_channel() -> None:
    images = batch(channels=1)
    ours, _ = run(T.ToTensor(), images)
    assert ours.shape == (N, 1, 20, 24)
    assert torch.equal(ours, torch.stack([T.ToTensor()(pil(image)) for image in images]))


# --------------------------------------------------------------------------- padding and crops


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect", "symmetric"])
@pytest.mark.parametrize("stage", ["pil", "tensor"])
@pytest.mark.parametrize("module", [T, v2], ids=["v1", "v2"])
def test_pad(module: Any, mode: str, stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    images = batch()
    fill = (10, 20, 30) if stage == "pil" or (module is v2 and mode == "constant") else 7
    pad = module.Pad((3, 1, 5, 2), fill=fill, padding_mode=mode)
    steps = [pad, module.PILToTensor()] if stage == "pil" else [module.PILToTensor(), pad]
    transform = module.Compose(steps)
    ours, _ = run(transform, images)
    assert torch.equal(ours, reference(transform, images, monkeypatch))


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect", "symmetric"])
def test_random_crop_with_padding(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    images = batch()
    transform = T.Compose([T.RandomCrop((16, 18), padding=4, fill=9, padding_mode=mode), T.PILToTensor()])
    ours, pipeline = run(transform, images)
    top, left = pipeline.ops[0].params(images.shape, keys().at_step(0))
    assert len(set(top.tolist())) > 1 and len(set(left.tolist())) > 1  # really random
    theirs = reference(transform, images, monkeypatch, lambda k: ([int(top[k]), int(left[k])], []))
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("module", [T, v2], ids=["v1", "v2"])
def test_random_crop_pad_if_needed(module: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # v1 pads twice (padding, then what is still missing); v2 pads once with the sum: different for reflect.
    images = batch(height=10, width=12)
    crop = module.RandomCrop((30, 20), padding=(2, 3), pad_if_needed=True, padding_mode="reflect")
    transform = module.Compose([crop, module.PILToTensor()])
    ours, pipeline = run(transform, images)
    top, left = pipeline.ops[-1].params(
        ours.shape[:1] + pipeline_input(pipeline, images).shape[1:], keys().at_step(len(pipeline.ops) - 1)
    )
    theirs = reference(transform, images, monkeypatch, lambda k: ([int(top[k]), int(left[k])], []))
    assert ours.shape == (N, 3, 30, 20) and torch.equal(ours, theirs)


def pipeline_input(pipeline: Any, images: torch.Tensor) -> torch.Tensor:
    """What the pipeline's last op receives."""
    for step, op in enumerate(pipeline.ops[:-1]):
        images = op(images, keys().at_step(step))
    return images


@pytest.mark.parametrize("size", [(10, 11), (20, 24), (25, 30), (25, 11), 13])
@pytest.mark.parametrize("module", [T, v2], ids=["v1", "v2"])
def test_center_crop(module: Any, size: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    images = batch()
    transform = module.Compose([module.CenterCrop(size), module.PILToTensor()])
    ours, _ = run(transform, images)
    assert torch.equal(ours, reference(transform, images, monkeypatch))


@pytest.mark.parametrize("module", [T, v2], ids=["v1", "v2"])
def test_flips(module: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    images = batch()
    transform = module.Compose([module.RandomHorizontalFlip(), module.RandomVerticalFlip(p=0.7), module.PILToTensor()])
    ours, pipeline = run(transform, images)
    across = pipeline.ops[0].params(keys().at_step(0))
    down = pipeline.ops[1].params(keys().at_step(1))
    assert 0 < int(across.sum()) < N or 0 < int(down.sum()) < N
    theirs = reference(
        transform, images, monkeypatch, lambda k: ([], [0.0 if across[k] else 0.99, 0.0 if down[k] else 0.99])
    )
    assert torch.equal(ours, theirs)


# --------------------------------------------------------------------------- resizing


def assert_like_pillow(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Pillow's fixed-point resampling: equal but where Pillow 13 runs the vertical pass first (one grey level)."""
    assert ours.shape == theirs.shape
    difference = (ours.int() - theirs.int()).abs()
    assert int(difference.max()) <= 1 and float((difference > 0).float().mean()) < 0.3


@pytest.mark.parametrize("size", [10, (12, 9), 31, (40, 50), (40, 10)])
def test_resize_is_bitwise_pillow_when_the_horizontal_pass_comes_first(size: Any) -> None:
    # Sizes where every Pillow resizes horizontally first: no width growth with a height shrink.
    images = batch()
    transform = T.Compose([T.Resize(size), T.PILToTensor()])
    ours, _ = run(transform, images)
    assert torch.equal(ours, torch.stack([transform(pil(image)) for image in images]))


@pytest.mark.parametrize("size", [10, (12, 9), 31, (40, 50), (17, 100), (40, 10)])
@pytest.mark.parametrize("stage", ["pil", "uint8"])
def test_resize_on_pil_images_as_pillow_does(size: Any, stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    images = batch()
    steps = [T.Resize(size), T.PILToTensor()]
    transform = T.Compose(steps if stage == "pil" else steps[::-1])
    ours, _ = run(transform, images)
    assert_like_pillow(ours, reference(transform, images, monkeypatch))


@pytest.mark.parametrize(("size", "max_size"), [(10, None), (15, 16), ((12, 9), None), ((40, 50), None)])
def test_resize_on_float_tensors_to_float_rounding(size: Any, max_size: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    images = batch()
    transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Resize(size, max_size=max_size)])
    ours, _ = run(transform, images)
    theirs = reference(transform, images, monkeypatch)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=0)


@pytest.mark.parametrize("stage", ["pil", "float"])
def test_random_resized_crop(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    images = batch(height=30, width=40)
    crop = T.RandomResizedCrop((16, 20), scale=(0.2, 1.0))
    steps = [crop, T.PILToTensor()] if stage == "pil" else [T.ToTensor(), crop]
    transform = T.Compose(steps)
    ours, pipeline = run(transform, images)
    position = 0 if stage == "pil" else 1
    box = pipeline.ops[position].params(images.shape, keys().at_step(position))
    boxes = [tuple(int(part[k]) for part in box) for k in range(N)]
    assert len(set(boxes)) == N
    theirs = []
    for k in range(N):
        monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(lambda *a, k=k: boxes[k]))
        theirs.append(transform(pil(images[k])))
    expected = torch.stack(theirs)
    if stage == "pil":
        assert_like_pillow(ours, expected)
    else:
        torch.testing.assert_close(ours, expected, atol=2e-6, rtol=0)


def test_random_resized_crop_params_follow_torchvision_rules() -> None:
    crop = ops.RandomResizedCrop("rrc", (8, 8), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    top, left, height, width = crop.params((3, 30, 40), ops.SampleKeys(torch.arange(2000)))
    assert bool(((height > 0) & (top + height <= 30) & (width > 0) & (left + width <= 40)).all())
    area = (height * width).double() / (30 * 40)
    assert float(area.min()) > 0.07 and float(area.max()) <= 1.0
    assert 0.3 < float(area.mean()) < 0.7  # uniform area in [0.08, 1] (clipped where it does not fit)


# --------------------------------------------------------------------------- erasing and grayscale


@pytest.mark.parametrize("value", [0, (0.1, 0.5, 0.9)])
def test_random_erasing(value: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    images = batch()
    erasing = T.RandomErasing(p=0.6, scale=(0.05, 0.3), value=value)
    transform = T.Compose([T.ToTensor(), erasing])
    ours, pipeline = run(transform, images)
    erase_it, top, left, height, width = pipeline.ops[1].params(images.shape, keys().at_step(1))
    assert 0 < int(erase_it.sum()) < N
    theirs = []
    for k in range(N):
        values = torch.tensor([float(v) for v in (value if isinstance(value, tuple) else (value,))])[:, None, None]
        params = (int(top[k]), int(left[k]), int(height[k]), int(width[k]), values)
        monkeypatch.setattr(T.RandomErasing, "get_params", staticmethod(lambda *a, params=params, **kw: params))
        with drawn(monkeypatch, [], [0.0 if erase_it[k] else 0.99]):
            theirs.append(transform(pil(images[k])))
    assert torch.equal(ours, torch.stack(theirs))


@pytest.mark.parametrize(
    "transform",
    [
        T.Compose([T.Grayscale(), T.PILToTensor()]),
        T.Compose([T.Grayscale(num_output_channels=3), T.PILToTensor()]),
        T.Compose([T.PILToTensor(), T.Grayscale()]),
        T.Compose([T.ToTensor(), T.Grayscale(num_output_channels=3)]),
        v2.Compose([v2.ToImage(), v2.Grayscale()]),
        v2.Compose([v2.Grayscale(num_output_channels=3), v2.ToImage()]),
        v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Grayscale()]),
    ],
    ids=repr,
)
def test_grayscale(transform: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    images = batch()
    ours, _ = run(transform, images)
    assert torch.equal(ours, reference(transform, images, monkeypatch))


def test_grayscale_of_a_grayscale_image_to_three_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    images = batch(channels=1)
    transform = T.Compose([T.Grayscale(3), T.PILToTensor()])
    ours, _ = run(transform, images)
    assert ours.shape[1] == 3 and torch.equal(ours, reference(transform, images, monkeypatch))


# --------------------------------------------------------------------------- the guide's pipeline, keys


GUIDE = T.Compose(
    [
        T.RandomCrop(32, padding=4),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    ]
)


def test_the_guides_cifar_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    images = batch(height=32, width=32)
    ours, pipeline = run(GUIDE, images)
    top, left = pipeline.ops[0].params(images.shape, keys().at_step(0))
    flip = pipeline.ops[1].params(keys().at_step(1))
    theirs = reference(GUIDE, images, monkeypatch, lambda k: ([int(top[k]), int(left[k])], [0.0 if flip[k] else 0.99]))
    assert torch.equal(ours, theirs)


def test_a_sample_gets_the_same_draws_whatever_its_batch() -> None:
    images = batch(height=32, width=32)
    pipeline = translate(GUIDE, images.shape[1:])
    whole = pipeline(images, keys())
    # The same samples cut into other batches, in another order, give the same outputs.
    order = torch.tensor([4, 1, 5, 0, 3, 2])
    for size in (1, 2, 4):
        parts = [pipeline(images[order[s : s + size]], keys(index=order[s : s + size])) for s in range(0, N, size)]
        assert torch.equal(torch.cat(parts), whole[order])
    other_epoch = pipeline(images, keys(epoch=1))
    other_seed = pipeline(images, keys(seed=4))
    assert not torch.equal(other_epoch, whole) and not torch.equal(other_seed, whole)


def plain_hash32(x: int) -> int:
    """The same mixer with Python's unbounded integers."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) % 2**32
    x ^= x >> 15
    x = (x * 0x21F0AAAD) % 2**32
    return x ^ (x >> 15)


def test_keyed_bits_are_integer_arithmetic_that_never_overflows() -> None:
    # int64 tensor products give the exact 32-bit results: the same on every device.
    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    assert ops.hash32(torch.tensor(values)).tolist() == [plain_hash32(v) for v in values]
    bits = ops.SampleKeys(torch.tensor([0, 1, 2, 2**40 + 2]), seed=7, epoch=3).bits(3)
    assert bits.shape == (3, 4) and bool(((bits >= 0) & (bits < 2**32)).all())
    assert len(set(bits.flatten().tolist())) == 12  # draws, samples, and indices past 2**32 differ
    again = ops.SampleKeys(torch.tensor([2]), seed=7, epoch=3).bits(3)
    assert again[:, 0].tolist() == bits[:, 2].tolist()
    numbers = ops.uniform(ops.SampleKeys(torch.arange(20000)).bits(1)[0])
    assert 0.49 < float(numbers.mean()) < 0.51 and float(numbers.min()) >= 0 and float(numbers.max()) < 1
    assert sorted(set(ops.below(ops.SampleKeys(torch.arange(1000)).bits(1)[0], 7).tolist())) == list(range(7))


# --------------------------------------------------------------------------- what is not translated


@pytest.mark.parametrize(
    ("transform", "named"),
    [
        (T.Compose([T.ColorJitter(0.4), T.ToTensor()]), "ColorJitter"),
        (T.Compose([T.Lambda(lambda x: x), T.ToTensor()]), "Lambda"),
        (T.Compose([T.Normalize((0.5,), (0.5,)), T.ToTensor()]), "Normalize"),
        (T.Compose([T.RandomCrop(8)]), "ends on a PIL image"),
        (T.Compose([T.Resize(8, interpolation=T.InterpolationMode.NEAREST), T.ToTensor()]), "bilinear"),
        (T.Compose([T.ToTensor(), T.RandomErasing(value="random")]), "value='random'"),
        (T.Compose([T.RandomCrop(64), T.ToTensor()]), "larger than"),
        (T.Compose([T.ToTensor(), T.Resize(8, antialias=False)]), "antialias=False"),
        (v2.Compose([v2.ToImage(), v2.Pad(2, fill=(1, 2, 3), padding_mode="edge")]), "fill per channel"),
        (None, "no transform"),
    ],
)
def test_untranslatable_steps_are_named(transform: Any, named: str) -> None:
    with pytest.raises(TransformNotTranslatedError, match=named.replace("(", r"\(").replace(")", r"\)")):
        translate(transform, (3, 20, 24))


def test_a_pipeline_is_used_as_written() -> None:
    pipeline = ops.Pipeline([ops.ToFloat("to float"), ops.Normalize("norm", [0.5], [0.25])])
    assert translate(pipeline, (3, 4, 4)) is pipeline
    images = batch()
    assert torch.equal(pipeline(images, keys()), (images.float() / 255 - 0.5) / 0.25)
