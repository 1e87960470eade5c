"""Offline stand-ins for the example notebooks (the repository's tests use them).

Every notebook's first cell installs colabkit, unless ``COLABKIT_EXAMPLES_OFFLINE=1``
is set; then it calls :func:`install` instead, which, for the rest of the
kernel's life:

* pretends to be on Colab or Kaggle (:mod:`colabkit.testing` fakes: ``mount_drive()``
  gets a fake Drive, platform paths live under a temporary folder, or under
  ``COLABKIT_OFFLINE_ROOT`` when set);
* replaces downloads with small generated stand-ins of the same layout:
  ``torchvision.datasets.CIFAR10`` / ``FashionMNIST`` / ``MNIST`` become
  ``FakeData``-like datasets of a few hundred random images with the real class
  names, the PyTorch tutorial's ``hymenoptera_data.zip`` URL given to
  ``colabkit.stage`` becomes a generated zip of JPEGs, and pretrained torchvision
  weights become a random initialisation.

The code in the notebooks stays the code a user runs; only what the downloads
return changes. Nothing here is needed on Colab or Kaggle.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Samples per split of the dataset stand-ins (small, so notebooks run in seconds on a CPU).
TRAIN_SIZE = int(os.environ.get("COLABKIT_OFFLINE_TRAIN_SIZE", "128"))
TEST_SIZE = int(os.environ.get("COLABKIT_OFFLINE_TEST_SIZE", "64"))

HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_CLASSES = [
    f"{i} - {name}"
    for i, name in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
]

_stack = contextlib.ExitStack()
_installed = False


def _say(message: str) -> None:
    print(f"[offline stand-in] {message}", flush=True)


def _vision_stand_in(name: str, classes: list[str], shape: tuple[int, int, int], scale: float = 1.0) -> type:
    """A dataset class with torchvision's constructor that serves random images."""
    import numpy as np
    import torch
    from PIL import Image

    class StandIn(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __init__(
            self,
            root: str | os.PathLike[str],
            train: bool = True,
            transform: Callable[[Any], Any] | None = None,
            target_transform: Callable[[Any], Any] | None = None,
            download: bool = False,
        ) -> None:
            self.root = Path(root).expanduser()
            self.root.mkdir(parents=True, exist_ok=True)
            self.train = train
            self.transform = transform
            self.target_transform = target_transform
            self.classes = list(classes)
            self.class_to_idx = {c: i for i, c in enumerate(classes)}
            size = max(1, int((TRAIN_SIZE if train else TEST_SIZE) * scale))
            generator = np.random.default_rng(1 if train else 2)
            self.targets = generator.integers(0, len(classes), size).tolist()
            channels, height, width = shape
            self.data = generator.integers(0, 256, (size, height, width, channels), dtype=np.uint8)
            if channels == 1:
                self.data = self.data[..., 0]
            _say(f"{name}(train={train}): {size} random {height}x{width} images instead of the download")

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, index: int) -> tuple[Any, Any]:
            image: Any = Image.fromarray(self.data[index])
            target: Any = self.targets[index]
            if self.transform is not None:
                image = self.transform(image)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return image, target

    StandIn.__name__ = StandIn.__qualname__ = name
    return StandIn


def _hymenoptera_zip(folder: Path) -> Path:
    """The tutorial's ants-vs-bees zip layout, with a few generated JPEGs per class."""
    import numpy as np
    from PIL import Image

    out = folder / "hymenoptera_data.zip"
    if out.exists():
        return out
    generator = np.random.default_rng(0)
    tint = {"ants": (150, 60, 40), "bees": (220, 190, 40)}
    with zipfile.ZipFile(out, "w") as archive:
        for split, count in (("train", 2), ("val", 1)):  # a ResNet-18 at 224x224 is slow on a CPU
            for label, colour in tint.items():
                for index in range(count):
                    noise = generator.integers(-40, 40, (48, 64, 3))
                    pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                    path = folder / f"{label}{index}.jpg"
                    Image.fromarray(pixels).save(path, quality=85)
                    archive.write(path, f"hymenoptera_data/{split}/{label}/{label}_{split}_{index}.jpg")
                    path.unlink()
    return out


def _patch_stage(scratch: Path) -> None:
    import colabkit

    real_stage = colabkit.stage

    @functools.wraps(real_stage)
    def stage(source: Any, *args: Any, **kwargs: Any) -> Any:
        if str(source) == HYMENOPTERA_URL:
            source = _hymenoptera_zip(scratch)
            _say(f"stage({HYMENOPTERA_URL!r}) reads the generated {source.name} instead")
        return real_stage(source, *args, **kwargs)

    colabkit.stage = stage  # type: ignore[attr-defined]


def _patch_torchvision() -> None:
    try:
        import torchvision
    except ImportError:
        return
    # CIFAR-10 feeds a ResNet-18 in its notebook: half as many images keeps the CPU run short.
    stand_ins = {
        "CIFAR10": (CIFAR10_CLASSES, (3, 32, 32), 0.5),
        "FashionMNIST": (FASHION_CLASSES, (1, 28, 28), 1.0),
        "MNIST": (MNIST_CLASSES, (1, 28, 28), 1.0),
    }
    for name, (classes, shape, scale) in stand_ins.items():
        setattr(torchvision.datasets, name, _vision_stand_in(name, classes, shape, scale))

    def without_weights(builder: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(builder)
        def build(*args: Any, weights: Any = None, **kwargs: Any) -> Any:
            if weights is not None:
                _say(f"{builder.__name__}(weights={weights!r}): random initialisation instead of the download")
            return builder(*args, weights=None, **kwargs)

        return build

    for name in ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "efficientnet_b0"):
        setattr(torchvision.models, name, without_weights(getattr(torchvision.models, name)))


def install(platform: str | None = "colab") -> Path:
    """Switch this kernel to offline stand-ins (idempotent).

    Args:
        platform: ``"colab"`` or ``"kaggle"`` to fake that runtime, None for none.

    Returns:
        The folder that stands for ``/`` of the faked platform (or the scratch folder).
    """
    global _installed
    root = Path(os.environ.get("COLABKIT_OFFLINE_ROOT") or tempfile.mkdtemp(prefix="colabkit-offline-"))
    if _installed:
        return root
    root.mkdir(parents=True, exist_ok=True)
    scratch = root / "offline-downloads"
    scratch.mkdir(exist_ok=True)
    if platform is not None:
        from colabkit import testing

        # The Colab fake puts a stand-in "google" package in sys.modules; import the real
        # google.* namespace packages (protobuf, which onnx needs) before it can hide them.
        with contextlib.suppress(ImportError):
            import google.protobuf  # noqa: F401

        fake = testing.fake_colab if platform == "colab" else testing.fake_kaggle
        _stack.enter_context(fake(root / "platform"))
        atexit.register(_stack.close)
    _patch_torchvision()
    _patch_stage(scratch)
    _installed = True
    _say(f"offline mode: {platform or 'no'} platform faked under {root}; downloads replaced by small stand-ins")
    return root
