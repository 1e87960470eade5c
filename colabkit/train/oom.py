"""Out-of-memory back-off: split each batch into more, smaller micro-batches.

On a CUDA out-of-memory error the loop throws away the half-done optimizer
step (gradients, scaler state), frees memory, doubles :attr:`Backoff.chunks`
(each loaded batch is cut into that many micro-batches, i.e. the micro-batch
halves and accumulation doubles) and redoes the step. The effective batch and
the number of optimizer steps stay the same (Composer's automicrobatching,
reliability.md section 5.3). A micro-batch of one sample that still does not
fit ends in :class:`~colabkit.errors.OutOfMemoryBackoffError`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

import torch

from colabkit import _notify, versions
from colabkit import device as _device
from colabkit.errors import OutOfMemoryBackoffError

__all__ = ["Backoff", "batch_length", "is_out_of_memory", "split_batch"]

_MESSAGES = (
    "out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input",
    "DefaultCPUAllocator: can't allocate memory",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` means the device ran out of memory (by type, then by the messages torch uses)."""
    if isinstance(exc, versions.out_of_memory_error()):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc)
        return any(message in text for message in _MESSAGES)
    return False


def batch_length(batch: Any) -> int | None:
    """Number of samples in a batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, Mapping):
        values: Any = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        return None
    for value in values:
        length = batch_length(value)
        if length is not None:
            return length
    return None


def split_batch(batch: Any, chunks: int, length: int) -> list[tuple[Any, int]]:
    """Cut every per-sample part of ``batch`` into ``chunks`` pieces along dim 0.

    Returns:
        ``[(piece, samples_in_piece), ...]`` without empty pieces.
    """
    if chunks <= 1:
        return [(batch, length)]
    bounds = [length * i // chunks for i in range(chunks + 1)]
    pieces = []
    for start, stop in itertools.pairwise(bounds):
        if stop > start:
            pieces.append((slice_batch(batch, start, stop, length), stop - start))
    return pieces


def slice_batch(obj: Any, start: int, stop: int, length: int) -> Any:
    """Samples ``start:stop`` of every per-sample part of ``obj`` (parts of another length are kept whole)."""
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.dim() and obj.shape[0] == length else obj
    if isinstance(obj, Mapping):
        return type(obj)({key: slice_batch(value, start, stop, length) for key, value in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(slice_batch(value, start, stop, length) for value in obj))
    if isinstance(obj, tuple):
        return tuple(slice_batch(value, start, stop, length) for value in obj)
    if isinstance(obj, list):
        if len(obj) == length and not any(isinstance(value, torch.Tensor) for value in obj):
            return obj[start:stop]  # e.g. a list of file names, one per sample
        return [slice_batch(value, start, stop, length) for value in obj]
    return obj


@dataclasses.dataclass
class Backoff:
    """How many micro-batches each loaded batch is cut into; doubled on every OOM.

    Attributes:
        chunks: Micro-batches per loaded batch (1 = no splitting).
        enabled: Whether out-of-memory errors are caught at all.
    """

    chunks: int = 1
    enabled: bool = True

    def micro_batch(self, batch_size: int) -> int:
        return -(-batch_size // self.chunks)

    def handle(self, batch_size: int, *, step: int, quiet: bool = False) -> None:
        """Record one out-of-memory error on a batch of ``batch_size`` samples; free memory.

        Call this after leaving the ``except`` block, so the exception's
        traceback (which holds the failed step's tensors) is already gone.

        Raises:
            OutOfMemoryBackoffError: The micro-batch is already one sample.
        """
        current = self.micro_batch(batch_size)
        _device.free_memory()
        if current <= 1:
            raise OutOfMemoryBackoffError(
                f"the device ran out of memory at step {step} even with a micro-batch of 1 sample; "
                "use a smaller model or input size, precision='fp16' or 'bf16', or a GPU with more memory"
            )
        self.chunks *= 2
        message = (
            f"out of memory at step {step}: micro-batch {current} -> {self.micro_batch(batch_size)} "
            f"({self.chunks} micro-batches per batch of {batch_size}); the effective batch size is unchanged"
        )
        _notify.logger.warning(message)
        if not quiet:
            _notify.say(message)
