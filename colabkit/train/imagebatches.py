"""The in-memory image path: uint8 images cut into batches by indexing, transformed a whole batch at a time.

For an in-memory image dataset (torchvision's MNIST family, CIFAR, SVHN, STL10,
an :class:`~colabkit.data.images.array.ImageArray`, or a Subset of one; see
:mod:`colabkit.data.images.inmemory`) whose transform translates into batched
ops (:mod:`colabkit.data.images.translate`), fit(), evaluate(), predict() and
validation skip the DataLoader: batch ``k`` of an epoch is the uint8 images at
the ``k``-th slice of the resumable sampler's order (exactly the samples the
DataLoader path would read), run through the translated pipeline where the
images live, with every random draw keyed by ``(seed, epoch, sample index)``.

It is :class:`~colabkit.train.fastpath.TensorBatches` over three tensors
(uint8 images, labels, each sample's index) plus the pipeline, so it inherits
the placement: on CUDA the uint8 set moves to the GPU once when it fits in
:data:`~colabkit.train.fastpath.DEVICE_MEMORY_SHARE` of the free memory, else
batches are gathered into pinned host memory and transformed on the GPU; on the
CPU the ops run in the training process. A resume starts at batch ``k`` by
slicing the order and the keys do not depend on where it starts: nothing is
replayed and every sample gets the crop and flip it would have got.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from colabkit import device as device_module
from colabkit.data.images.inmemory import InMemoryImages, in_memory_images
from colabkit.data.images.ops import Pipeline, SampleKeys
from colabkit.data.images.translate import translate
from colabkit.errors import TransformNotTranslatedError
from colabkit.train.batches import as_dataset
from colabkit.train.fastpath import TensorBatches, loader_reason
from colabkit.train.state import ResumableBatchSampler, ResumableLoader

__all__ = ["RAM_SHARE", "ImageBatches", "for_evaluation", "for_training", "image_batches"]

#: The images are copied into memory (uint8, channels first) only when they take at most this share
#: of the RAM available; a bigger array (a memory-mapped decode_images() folder) keeps the DataLoader path.
RAM_SHARE = 0.5


def _parts(data: Any, *, ordered: bool) -> tuple[InMemoryImages, Pipeline] | str | None:
    """The images and the translated pipeline; a phrase when the images are recognised but cannot take
    this path; None when ``data`` is not an in-memory image dataset at all."""
    loader = data if isinstance(data, DataLoader) else None
    dataset = data.dataset if loader is not None else data
    found = in_memory_images(dataset)
    if isinstance(found, str):
        return None
    if loader is not None:
        reason = loader_reason(loader, ordered=ordered)
        if reason is not None:
            return reason
    size = len(found) * math.prod(found.sample_shape)
    room = device_module.ram()["available"] * RAM_SHARE
    if room and size > room:
        return (
            f"{found.name}'s {size / 2**30:.1f} GB of images do not fit in {RAM_SHARE:.0%} of the available memory "
            "(the DataLoader path reads them from their array a batch at a time)"
        )
    if found.target_transform is not None:
        return f"{found.name}'s target_transform {found.target_transform!r} runs per sample"
    try:
        pipeline = translate(found.transform, found.sample_shape)
    except TransformNotTranslatedError as exc:
        return str(exc)
    return found, pipeline


class ImageBatches(TensorBatches):
    """Batches of an in-memory image dataset, transformed a batch at a time: TensorBatches' interface.

    Args:
        images: What :func:`~colabkit.data.images.inmemory.in_memory_images` found.
        pipeline: The batched transform.
        sampler: The resumable sampler whose order the batches follow.
        device: The device the model runs on.
        dataset: The dataset as the user gave it.
    """

    def __init__(
        self,
        images: InMemoryImages,
        pipeline: Pipeline,
        sampler: ResumableBatchSampler,
        device: torch.device,
        *,
        dataset: Any,
    ) -> None:
        pixels, labels = (t.cpu() for t in images.rows())  # placed from the host, like TensorBatches' tensors
        super().__init__((pixels, labels, torch.arange(len(labels))), sampler, device)
        self.dataset = dataset
        self.pipeline = pipeline
        self.name = images.name

    def describe(self) -> str:
        """For the progress notice: the path, where the images are, and the transform translated."""
        samples = f"{len(self.tensors[1]):,} {self.name} images"
        where = {
            "device": f"{samples} on {self.device}, transformed there",
            "pinned": f"{samples} in pinned host memory, transformed on {self.device} per batch",
            "host": f"{samples}, transformed per batch in this process",
            None: samples,
        }[self.placement]
        return f"in-memory image path ({where}; transform: {self.pipeline.source})"

    def epoch(self, epoch: int, *, skip: int = 0) -> Iterator[list[torch.Tensor]]:
        """The transformed batches of ``epoch``, starting after ``skip`` batches (none of those is read)."""
        return self._transformed(super().epoch(epoch, skip=skip), epoch)

    def _transformed(self, batches: Iterator[list[torch.Tensor]], epoch: int) -> Iterator[list[torch.Tensor]]:
        seed = self.batch_sampler.seed
        for pixels, labels, index in batches:
            # Full precision whatever the loop's autocast: the ops are torchvision's arithmetic.
            with torch.autocast(device_type=pixels.device.type, enabled=False):
                images = self.pipeline(pixels, SampleKeys(index, seed=seed, epoch=epoch))
            yield [images, labels]


def for_training(
    data: Any, resumable: ResumableLoader, device: torch.device, *, argument: str = "train"
) -> ImageBatches | str | None:
    """The in-memory image path for fit()'s training data, following ``resumable``'s sampler.

    Returns:
        The batches; a phrase when ``data`` is an in-memory image dataset that keeps the
        DataLoader path (the start notice says why); None when it is not one at all.
    """
    data = as_dataset(data, argument)
    sampler = resumable.batch_sampler
    if isinstance(sampler, ResumableBatchSampler):
        return image_batches(data, sampler, device)
    parts = _parts(data, ordered=False)  # a loader's own sampler: say so when the images are known
    return parts if isinstance(parts, str) else None


def image_batches(data: Any, sampler: ResumableBatchSampler, device: torch.device) -> ImageBatches | str | None:
    """The image path of ``data`` (a dataset or DataLoader) following ``sampler``; as :func:`for_training`."""
    parts = _parts(data, ordered=False)
    if parts is None or isinstance(parts, str):
        return parts
    images, pipeline = parts
    return ImageBatches(images, pipeline, sampler, device, dataset=_dataset(data))


def for_evaluation(
    data: Any, *, batch_size: int, device: torch.device, argument: str = "data"
) -> ImageBatches | str | None:
    """The in-memory image path in dataset order (evaluate, predict, validation); as :func:`for_training`.

    A DataLoader keeps its own batch size and ``drop_last``; a dataset takes ``batch_size``.
    """
    data = as_dataset(data, argument)
    parts = _parts(data, ordered=True)
    if parts is None or isinstance(parts, str):
        return parts
    images, pipeline = parts
    size, drop_last = (data.batch_size, data.drop_last) if isinstance(data, DataLoader) else (batch_size, False)
    assert size is not None  # a DataLoader without batch_size keeps the DataLoader path
    sampler = ResumableBatchSampler(len(images), size, shuffle=False, drop_last=drop_last)
    return ImageBatches(images, pipeline, sampler, device, dataset=_dataset(data))


def _dataset(data: Any) -> Any:
    return data.dataset if isinstance(data, DataLoader) else data
