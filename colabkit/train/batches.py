"""The batch contract every loop shares: fit, evaluate, predict, lr_find and compare_devices.

* data: a Dataset, a DataLoader, or an ``(inputs, targets)`` pair of tensors
  (:func:`as_dataset`); Datasets are batched by :data:`DEFAULT_BATCH_SIZE`.
* a batch: ``(inputs, targets)``, ``(x1, x2, ..., targets)`` (the model gets
  ``model(x1, x2, ...)``) or a dict whose ``"labels"`` / ``"target"`` / ``"y"``
  key holds the targets (the model gets the other keys as keyword arguments):
  :func:`inputs_and_targets`, :func:`call_model`.
* the loss: ``loss_fn(outputs, targets)``, by default cross-entropy for
  integer labels, explained on the first batch when it does not fit
  (:class:`LossFn`); :func:`forward` runs model and loss under autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from colabkit.errors import ArgumentError

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "LossFn",
    "as_dataset",
    "call_model",
    "check_batch_size",
    "check_loss_fn",
    "concat",
    "describe",
    "detach_to_cpu",
    "forever",
    "forward",
    "inputs_and_targets",
    "inputs_only",
    "model_mode",
    "safe_len",
    "to_channels_last",
]

#: Samples per batch when the data is a Dataset (or a tensor pair) and no batch_size is given.
DEFAULT_BATCH_SIZE = 32

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


def check_batch_size(batch_size: Any) -> int:
    """``batch_size`` checked, :data:`DEFAULT_BATCH_SIZE` for None."""
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ArgumentError(f"batch_size={batch_size!r} must be a positive integer, e.g. batch_size=64")
    return batch_size


def as_dataset(data: Any, argument: str) -> Any:
    """A DataLoader or Dataset as given; an ``(inputs, targets)`` pair of tensors as a TensorDataset.

    Raises:
        ArgumentError: ``data`` is none of these, or the pair's lengths differ.
    """
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        if data[0].shape[:1] != data[1].shape[:1]:
            raise ArgumentError(
                f"{argument}=(x, y) has {len(data[0])} inputs but {len(data[1])} targets; they must match"
            )
        return torch.utils.data.TensorDataset(*data)
    if not isinstance(data, (torch.utils.data.Dataset, torch.utils.data.IterableDataset)) and not (
        hasattr(data, "__getitem__") and hasattr(data, "__len__")
    ):
        raise ArgumentError(
            f"{argument} is a {type(data).__name__}; pass a torch Dataset or DataLoader, "
            f"e.g. {argument}=TensorDataset(x, y)"
        )
    return data


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


def forward(model: Any, inputs: Any, target: Any, loss_fn: LossFn, autocast: Any = None) -> tuple[Any, torch.Tensor]:
    """The model's outputs and the loss, under ``autocast`` (a context manager factory, e.g. fp16)."""
    with autocast() if autocast is not None else contextlib.nullcontext():
        output = call_model(model, inputs)
        return output, loss_fn(output, target)


def check_loss_fn(loss_fn: Any) -> Any:
    if loss_fn is not None and not callable(loss_fn):
        raise ArgumentError(f"loss_fn={loss_fn!r} must be callable, e.g. loss_fn=torch.nn.CrossEntropyLoss()")
    return loss_fn


class LossFn:
    """The user's loss, or cross-entropy for integer labels, with checks on its first call.

    The first call checks its inputs and its result (explaining bad labels or a loss that is
    not a differentiable scalar in words); it is the real call, so the user's loss runs
    exactly once per forward pass (a loss that counts calls or keeps statistics sees no extra one).
    """

    def __init__(self, fn: Callable[..., torch.Tensor] | None) -> None:
        self.fn = fn
        self.checked = False

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        if not self.checked:
            return self._first(output, target)
        return self._loss(output, target)

    def _loss(self, output: Any, target: Any) -> torch.Tensor:
        if self.fn is not None:
            return self.fn(output, target)
        return F.cross_entropy(output, target.long() if target.dtype != torch.long else target)

    def _first(self, output: Any, target: Any) -> torch.Tensor:
        """Explain bad labels / losses in words before they turn into an opaque error or a silent bug."""
        if self.fn is None:
            _check_cross_entropy_inputs(output, target)
        try:
            loss = self._loss(output, target)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            name = "loss_fn" if self.fn is not None else "the default cross-entropy loss"
            raise ArgumentError(
                f"{name} failed on the first batch (outputs {describe(output)}, targets {describe(target)}): "
                f"{str(exc).strip()[:300]} -- check the labels' dtype and shape, or pass a matching loss_fn"
            ) from exc
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ArgumentError(f"loss_fn returned {describe(loss)}, not a scalar; reduce it, e.g. return loss.mean()")
        if not loss.requires_grad and torch.is_grad_enabled():
            raise ArgumentError(
                "the loss does not depend on any trainable parameter (requires_grad=False); "
                "check that loss_fn uses the model's outputs and that the parameters are not frozen"
            )
        self.checked = True
        return loss


def _check_cross_entropy_inputs(output: Any, target: Any) -> None:
    if not isinstance(output, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ArgumentError(
            f"the default cross-entropy loss needs tensor outputs and labels, got {describe(output)} and "
            f"{describe(target)}; pass loss_fn=..."
        )
    if target.is_floating_point():
        raise ArgumentError(
            f"labels are {describe(target)} but loss_fn=None means cross-entropy, which needs integer class "
            "indices (torch.long); convert the labels with .long(), or for regression pass "
            "loss_fn=torch.nn.MSELoss() (binary / multi-label: torch.nn.BCEWithLogitsLoss())"
        )
    if output.dim() < 2 or target.dim() != output.dim() - 1 or target.shape[0] != output.shape[0]:
        raise ArgumentError(
            f"labels {describe(target)} do not fit outputs {describe(output)} for cross-entropy: expected one "
            "class index per sample (labels of shape [batch] for outputs [batch, classes]); "
            "pass a matching loss_fn or fix the dataset's labels"
        )
    low, high = (int(v) for v in torch.stack([target.min(), target.max()]).tolist())
    classes = output.shape[1]
    if low < 0 or high >= classes:
        raise ArgumentError(
            f"labels range from {low} to {high} but the model outputs {classes} classes "
            f"(valid labels: 0..{classes - 1}); make the last layer's size the number of classes, or relabel"
        )


@contextlib.contextmanager
def model_mode(model: torch.nn.Module, *, train: bool) -> Iterator[None]:
    """``model.train(train)`` for the block, then back to the mode it had."""
    was_training = model.training
    model.train(train)
    try:
        yield
    finally:
        model.train(was_training)


def forever(loader: Iterable[Any], argument: str = "data") -> Iterator[Any]:
    """Batches without end, starting ``loader`` over when it runs out (refusing one that gives none)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ArgumentError(f"{argument} gave no batches; pass a non-empty Dataset or DataLoader")


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
