"""In-memory image datasets through fit(), evaluate() and predict(): recognised, batched, keyed, resumed exactly.

The datasets are torchvision's own classes reading files in their own formats (written by
bench/torchvision_files.py), or built the way their loaders build them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Subset, default_collate

pytest.importorskip("torchvision")
from torchvision import datasets
from torchvision import transforms as T
from torchvision.transforms import v2

from bench.torchvision_files import local_cifar10, write_cifar10, write_mnist
from colabkit.data.images.array import ImageArray
from colabkit.data.images.inmemory import in_memory_images
from colabkit.train.fastpath import TensorBatches
from colabkit.train.imagebatches import ImageBatches, for_evaluation, image_batches
from colabkit.train.loop import evaluate, fit, predict
from colabkit.train.state import ResumableBatchSampler
from tests.witness import StepLog

CPU = torch.device("cpu")
NORMALIZE = T.Compose([T.ToTensor(), T.Normalize((0.5,), (0.25,))])
GUIDE = T.Compose(
    [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize((0.49, 0.48, 0.45), (0.25,) * 3)]
)


def pixels(count: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def fashion(root: Path, count: int = 40, transform: Any = NORMALIZE) -> Any:
    write_mnist(root, "FashionMNIST", pixels(count, 28, 28), torch.arange(count) % 10)
    return datasets.FashionMNIST(str(root), download=False, transform=transform)


def cifar(root: Path, count: int = 50, transform: Any = GUIDE) -> Any:
    write_cifar10(root, pixels(count, 32, 32, 3), torch.arange(count) % 10)
    return local_cifar10(root, transform=transform)


def built(kind: type, **fields: Any) -> Any:
    """A torchvision dataset object with the fields its loader would have set (no files needed)."""
    dataset = kind.__new__(kind)
    dataset.__dict__.update({"transform": None, "target_transform": None, **fields})
    return dataset


def eval_batches(dataset: Any, size: int = 7) -> ImageBatches:
    batches = for_evaluation(dataset, batch_size=size, device=CPU)
    assert isinstance(batches, ImageBatches)
    return batches


def assert_batches_are_the_samples(dataset: Any, size: int = 7) -> None:
    """The image path's batches equal the DataLoader's batches of the dataset's own per-sample output."""
    ours = list(eval_batches(dataset, size))
    theirs = list(DataLoader(dataset, batch_size=size))
    assert len(ours) == len(theirs)
    for (x, y), (tx, ty) in zip(ours, theirs, strict=True):
        assert x.dtype == tx.dtype and torch.equal(x, tx)
        assert y.dtype == ty.dtype and torch.equal(y, ty)


# --------------------------------------------------------------------------- recognition


def test_fashion_mnist_read_from_its_files(tmp_path: Path) -> None:
    assert_batches_are_the_samples(fashion(tmp_path))


def test_cifar10_read_from_its_pickles_with_a_v2_pipeline(tmp_path: Path) -> None:
    transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.2] * 3)])
    assert_batches_are_the_samples(cifar(tmp_path, transform=transform))


@pytest.mark.parametrize("kind", [datasets.SVHN, datasets.STL10])
def test_channels_first_datasets(kind: type) -> None:
    dataset = built(
        kind, data=pixels(20, 3, 12, 10).numpy(), labels=(torch.arange(20) % 10).numpy(), transform=NORMALIZE
    )
    assert_batches_are_the_samples(dataset)


def test_qmnist_compat_labels_and_mnist_subclasses() -> None:
    data = pixels(20, 28, 28)
    targets = torch.stack([torch.arange(20) % 10, torch.arange(20)], dim=1)
    assert_batches_are_the_samples(built(datasets.QMNIST, data=data, targets=targets, compat=True, transform=NORMALIZE))
    non_compat = built(datasets.QMNIST, data=data, targets=targets, compat=False, transform=NORMALIZE)
    assert "compat=False" in str(in_memory_images(non_compat))
    for kind in (datasets.KMNIST, datasets.EMNIST, datasets.MNIST):
        assert_batches_are_the_samples(built(kind, data=data, targets=targets[:, 0], transform=NORMALIZE))


@pytest.mark.parametrize("shape", [(16, 12), (16, 12, 1), (16, 12, 3)])
def test_image_arrays_of_every_layout(shape: tuple[int, ...]) -> None:
    images = pixels(25, *shape)
    assert_batches_are_the_samples(ImageArray(images.numpy(), list(range(25)), transform=NORMALIZE))
    assert_batches_are_the_samples(ImageArray(images, torch.arange(25), transform=NORMALIZE))


def test_nested_subsets(tmp_path: Path) -> None:
    whole = fashion(tmp_path)
    inner = Subset(whole, list(range(30, 5, -1)))
    outer = Subset(inner, [3, 0, 7, 7, 20, 11])
    assert_batches_are_the_samples(outer, size=4)
    found = in_memory_images(outer)
    assert not isinstance(found, str) and found.name == "Subset of FashionMNIST"


def test_what_is_not_an_in_memory_image_dataset(tmp_path: Path) -> None:
    class Custom(datasets.FashionMNIST):
        def __getitem__(self, index: int) -> Any:
            return super().__getitem__(index)

    write_mnist(tmp_path, "Custom", pixels(10, 28, 28), torch.arange(10))
    custom = Custom(str(tmp_path), download=False, transform=NORMALIZE)
    assert "not an in-memory image dataset" in str(in_memory_images(custom))
    assert for_evaluation(custom, batch_size=4, device=CPU) is None
    labelled = fashion(tmp_path)
    labelled.target_transform = lambda y: y + 1
    # Recognised but kept on the DataLoader path: the phrase the start notice quotes.
    assert "target_transform" in str(for_evaluation(labelled, batch_size=4, device=CPU))
    loader = DataLoader(fashion(tmp_path), batch_size=4, collate_fn=lambda b: default_collate(b))
    assert "collate_fn" in str(for_evaluation(loader, batch_size=4, device=CPU))


# --------------------------------------------------------------------------- keyed randomness


def outputs_by_sample(dataset: Any, batch_size: int, epoch: int, seed: int = 11) -> dict[int, torch.Tensor]:
    sampler = ResumableBatchSampler(len(dataset), batch_size, shuffle=True, seed=seed)
    batches = image_batches(dataset, sampler, CPU)
    assert batches is not None
    out: dict[int, torch.Tensor] = {}
    for x, y in batches.epoch(epoch):
        out.update({int(label): image for label, image in zip(y, x, strict=True)})
    return out


def test_a_sample_is_augmented_alike_whatever_the_batch_size(tmp_path: Path) -> None:
    dataset = cifar(tmp_path, count=50)
    dataset.targets = list(range(50))  # the label names the sample
    by_4, by_7, by_50 = (outputs_by_sample(dataset, size, epoch=2) for size in (4, 7, 50))
    assert by_4.keys() == by_7.keys() == set(range(50))
    assert all(torch.equal(by_4[k], by_7[k]) and torch.equal(by_4[k], by_50[k]) for k in range(50))
    next_epoch = outputs_by_sample(dataset, 7, epoch=3)
    assert sum(not torch.equal(by_7[k], next_epoch[k]) for k in range(50)) > 40


def test_a_resumed_epoch_reads_only_what_is_left_and_augments_alike(tmp_path: Path) -> None:
    dataset = cifar(tmp_path, count=50)
    sampler = ResumableBatchSampler(50, 8, shuffle=True, seed=3)
    batches = image_batches(dataset, sampler, CPU)
    assert batches is not None
    whole = list(batches.epoch(1))
    rest = list(batches.epoch(1, skip=4))
    assert len(rest) == len(whole) - 4
    for (x, y), (wx, wy) in zip(rest, whole[4:], strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)


# --------------------------------------------------------------------------- through fit, evaluate, predict


def small_cnn(channels: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(channels, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(16, 10))


class Recorder(torch.nn.Module):
    """The model, noting every training batch it is given (the witness of what a run trained on)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append(x.detach().clone())
        return self.net(x)


def test_fit_takes_the_image_path_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, val = cifar(tmp_path / "a", count=40), cifar(tmp_path / "b", count=20, transform=NORMALIZE)
    fit(small_cnn(), train, val, epochs=1, batch_size=8, progress=True)
    out = capsys.readouterr().out
    assert "train on the in-memory image path (40 LocalCIFAR10 images, transformed per batch in this process; " in out
    assert "transform: RandomCrop(size=(32, 32), padding=4) -> RandomHorizontalFlip(p=0.5) -> ToTensor()" in out
    assert "val on the in-memory image path (20 LocalCIFAR10 images" in out
    loader = DataLoader(train, batch_size=8, shuffle=True, num_workers=0)
    fit(small_cnn(), loader, epochs=1, progress=True)
    assert "train on the in-memory image path" in capsys.readouterr().out
    jitter = cifar(tmp_path / "c", count=16, transform=T.Compose([T.ColorJitter(0.3), T.ToTensor()]))
    fit(small_cnn(), jitter, epochs=1, batch_size=8, num_workers=0, progress=True)
    assert "train on the DataLoader path, since the transform's step ColorJitter(" in capsys.readouterr().out


def test_fit_resumes_exactly_and_replays_nothing(tmp_path: Path) -> None:
    data = cifar(tmp_path / "data", count=44)  # 6 batches of 8 per epoch, the last one of 4
    options: dict[str, Any] = {"epochs": 2, "batch_size": 8, "seed": 4, "progress": False, "save_every": 2}
    whole = Recorder(small_cnn())
    fit(whole, data, checkpoint_dir=tmp_path / "a", **options)
    assert len(whole.seen) == 12
    first = Recorder(small_cnn())
    history = fit(first, data, checkpoint_dir=tmp_path / "b", max_steps=4, **options)
    assert history.stop_reason == "max_steps"
    second, steps = Recorder(small_cnn()), StepLog()
    fit(second, data, checkpoint_dir=tmp_path / "b", callbacks=[steps], **options)
    assert steps.span == (5, 12)  # resumed after step 4: nothing trained twice
    trained = first.seen + second.seen
    assert len(trained) == len(whole.seen)
    assert all(torch.equal(a, b) for a, b in zip(trained, whole.seen, strict=True))
    for (name, p), q in zip(whole.net.state_dict().items(), second.net.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_evaluate_and_predict_take_the_image_path(tmp_path: Path) -> None:
    data = fashion(tmp_path, count=30)
    model = small_cnn(channels=1)
    batches = for_evaluation(data, batch_size=8, device=CPU)
    assert isinstance(batches, ImageBatches) and isinstance(batches, TensorBatches)
    expected = model(torch.stack([data[i][0] for i in range(30)])).detach()
    torch.testing.assert_close(predict(model, data, batch_size=8, progress=False), expected)
    reference = evaluate(model, DataLoader(data, batch_size=8, collate_fn=lambda b: default_collate(b)), progress=False)
    assert evaluate(model, data, batch_size=8, progress=False) == pytest.approx(reference)


def test_a_users_own_batched_pipeline_runs_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    from colabkit.data.images.ops import Pipeline, SampleKeys, below

    def shift(images: torch.Tensor, keys: SampleKeys) -> torch.Tensor:
        amount = below(keys.bits(1)[0], 3)  # 0..2 pixels to the right, per sample
        return torch.stack([image.roll(int(k), dims=-1) for image, k in zip(images, amount, strict=True)])

    def to_float(images: torch.Tensor, keys: SampleKeys) -> torch.Tensor:
        return images.float() / 255

    data = ImageArray(
        pixels(24, 8, 8, 3).numpy(), [i % 10 for i in range(24)], transform=Pipeline([shift, to_float], source="mine")
    )
    fit(small_cnn(), data, epochs=1, batch_size=8, progress=True)
    assert "in-memory image path (24 ImageArray images, transformed per batch in this process; transform: mine)" in (
        capsys.readouterr().out
    )
    one = data[5][0]  # the DataLoader path: one sample, a batch of one
    assert one.shape == (3, 8, 8) and one.dtype == torch.float32
    fit(small_cnn(), DataLoader(data, batch_size=8, sampler=range(24)), epochs=1, progress=True)
    assert "DataLoader path, since the loader has a custom sampler" in capsys.readouterr().out


def test_images_bigger_than_the_memory_share_keep_the_dataloader_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from colabkit.train import imagebatches

    stored = tmp_path / "images.npy"
    array = torch.randint(0, 256, (24, 8, 8, 3), dtype=torch.uint8).numpy()
    import numpy as np

    np.save(stored, array)
    data = ImageArray(np.load(stored, mmap_mode="r"), [i % 10 for i in range(24)], transform=T.ToTensor())
    fit(small_cnn(), data, epochs=1, batch_size=8, progress=True)
    assert "in-memory image path (24 ImageArray images" in capsys.readouterr().out
    monkeypatch.setattr(imagebatches, "RAM_SHARE", 1e-9)  # as if the array were larger than the RAM
    fit(small_cnn(), data, epochs=1, batch_size=8, progress=True)
    out = capsys.readouterr().out
    assert "DataLoader path, since ImageArray's 0.0 GB of images do not fit in 0% of the available memory" in out
