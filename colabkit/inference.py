"""After training: load the best checkpoint, predict on image files, export for deployment.

:func:`load_for_inference` puts a checkpoint's weights into a model in eval
mode (the best checkpoint of a folder, else the latest; plain ``torch.save``
files of the common tutorial layouts work too). :func:`predict_images` gives
top-k classes with confidences for image files or PIL images.
:func:`export` writes ONNX or TorchScript and checks the exported model
computes what the PyTorch model computes.

Loading never unpickles arbitrary objects (``weights_only=True``, no fallback).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, overload

import torch
from torch import nn

from colabkit import _io, _notify, versions
from colabkit import device as _device
from colabkit.errors import (
    ArgumentError,
    CheckpointError,
    CheckpointNotFoundError,
    ExportError,
    ExportMismatchError,
    MissingDependencyError,
    missing_dependency,
)

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["ExportError", "ExportMismatchError", "Prediction", "export", "load_for_inference", "predict_images"]

# -- load_for_inference -----------------------------------------------------------------------------
#: Metrics ``monitor="auto"`` looks for in checkpoint manifests, in order of preference.
_AUTO_MONITORS = ("val_loss", "val_accuracy", "val_acc", "loss")


def _pick_from_folder(folder: Path, monitor: str | None) -> Path:
    """The best checkpoint of a CheckpointManager folder by ``monitor``, else the latest one (read only)."""
    from colabkit.checkpoint import CheckpointListing
    from colabkit.train.history import metric_mode

    listing = CheckpointListing(folder)
    infos = listing.checkpoints()  # valid ones only, oldest first
    if not infos:
        raise CheckpointNotFoundError(
            f"load_for_inference: {folder} holds no complete checkpoint; train with "
            f"fit(..., checkpoint_dir={str(folder)!r}) first, or pass the path of a checkpoint file"
        )
    recorded = sorted({name for info in infos for name in info.metrics})
    if monitor == "auto":
        monitor = next((name for name in _AUTO_MONITORS if name in recorded), None)
    # Ties go to the newer checkpoint: it trained longer for the same score.
    chosen = listing.latest() if monitor is None else listing.best(monitor, metric_mode(monitor))
    if chosen is None:
        raise ArgumentError(
            f"load_for_inference(monitor={monitor!r}): no checkpoint in {folder} recorded that metric; "
            f"recorded: {recorded}; pass monitor=None for the latest"
        )
    return chosen.path


def load_for_inference(
    checkpoint_or_dir: str | os.PathLike[str],
    model: nn.Module,
    *,
    device: str | torch.device = "auto",
    monitor: str | None = "auto",
) -> nn.Module:
    """Load trained weights into ``model``, move it to ``device`` and switch it to eval mode.

    Args:
        checkpoint_or_dir: A checkpoint folder written by :class:`colabkit.CheckpointManager`
            (or ``fit(checkpoint_dir=...)``): its best checkpoint is used, else its latest.
            Or one file saved with ``torch.save``: a bare ``state_dict`` or a dict holding it
            under ``"model_state_dict"``, ``"state_dict"`` or ``"model"`` (the tutorial layouts).
        model: A model of the same architecture; its weights are replaced.
        device: ``"auto"`` (:func:`colabkit.get_device`), ``"cpu"``, ``"cuda"``, ...
        monitor: For a folder, the metric that makes a checkpoint "best" (lower is better for
            losses and errors, higher otherwise); ``"auto"``: ``val_loss``, else ``val_accuracy``,
            else ``loss``, whichever the checkpoints recorded; None: the latest checkpoint.

    Returns:
        ``model`` itself, on ``device``, in eval mode.

    Raises:
        CheckpointNotFoundError: Nothing exists at the path, or the folder holds no checkpoint.
        CheckpointMismatchError: The weights do not fit ``model`` (names the missing and unexpected keys).
        CheckpointError: The file cannot be read as a weights-only checkpoint.

    Example:
        >>> model = colabkit.load_for_inference(dirs.checkpoints, Net())  # doctest: +SKIP
    """
    from colabkit.checkpoint import find_weights, load_checkpoint, load_weights

    source = Path(checkpoint_or_dir).expanduser()
    target = _device.get_device() if device == "auto" else _device.get_device(device)
    if source.is_dir():
        source = _pick_from_folder(source, monitor)
    if not source.is_file():
        raise CheckpointNotFoundError(
            f"load_for_inference: {str(checkpoint_or_dir)!r} does not exist; pass a checkpoint folder "
            "(e.g. project_dirs(...).checkpoints) or a file saved with torch.save"
        )
    # Hash-checked against its manifest when it has one; weights_only, never unsafe unpickling.
    state = load_checkpoint(source, map_location="cpu")
    found = find_weights(state)
    if found is None:
        raise CheckpointError(
            f"load_for_inference: {source} holds no model weights colabkit recognises (found {sorted(state)[:8]}); "
            f"save {{'model_state_dict': model.state_dict()}} or a bare model.state_dict()"
        )
    load_weights(
        model,  # DDP / torch.compile wrappers: loaded into the plain model
        found[1],
        what=f"load_for_inference: the weights in {source}",
        fix="build the model with the same architecture and settings as in training",
    )
    return model.to(target).eval()


# -- predict_images ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Prediction:
    """Top-k classes of one image.

    Attributes:
        source: The file path, or ``"<PIL image #i>"``.
        labels: Class names, most likely first.
        indices: Class indices, in the same order.
        confidences: Softmax probabilities, in the same order.
    """

    source: str
    labels: tuple[str, ...]
    indices: tuple[int, ...]
    confidences: tuple[float, ...]

    @property
    def label(self) -> str:
        """The most likely class."""
        return self.labels[0]

    @property
    def confidence(self) -> float:
        """Probability of the most likely class."""
        return self.confidences[0]

    def __str__(self) -> str:
        ranked = ", ".join(f"{label} {p:.1%}" for label, p in zip(self.labels, self.confidences, strict=True))
        return f"{self.source}: {ranked}"


ImageInput = Union[str, os.PathLike[str], "Image"]  # PIL is optional: the name exists for type checkers only


def _open_image(item: Any, index: int, mode: str | None) -> tuple[str, Any]:
    try:
        from PIL import Image
    except ImportError:
        raise missing_dependency("pillow", "vision", purpose="predict_images()") from None
    if isinstance(item, (str, os.PathLike)):
        path = Path(item).expanduser()
        if not path.is_file():
            raise ArgumentError(f"predict_images: image file {str(item)!r} does not exist")
        try:
            with Image.open(path) as opened:
                image = opened.convert(mode) if mode else opened.copy()
        except OSError as exc:
            raise ArgumentError(f"predict_images: {str(item)!r} is not an image PIL can read ({exc})") from exc
        return str(item), image
    if isinstance(item, Image.Image):
        return f"<PIL image #{index}>", item.convert(mode) if mode else item
    raise ArgumentError(f"predict_images: item {index} is a {type(item).__name__}; pass image file paths or PIL images")


@overload
def predict_images(  # type: ignore[overload-overlap]  # a str is also a Sequence; it means one file
    model: nn.Module,
    paths_or_pil: ImageInput,
    transform: Callable[[Any], torch.Tensor],
    classes: Sequence[str] | None = None,
    *,
    topk: int = 5,
    mode: str | None = "RGB",
    device: str | torch.device = "auto",
    batch_size: int = 64,
) -> Prediction: ...


@overload
def predict_images(
    model: nn.Module,
    paths_or_pil: Sequence[ImageInput],
    transform: Callable[[Any], torch.Tensor],
    classes: Sequence[str] | None = None,
    *,
    topk: int = 5,
    mode: str | None = "RGB",
    device: str | torch.device = "auto",
    batch_size: int = 64,
) -> list[Prediction]: ...


def predict_images(
    model: nn.Module,
    paths_or_pil: ImageInput | Sequence[ImageInput],
    transform: Callable[[Any], torch.Tensor],
    classes: Sequence[str] | None = None,
    *,
    topk: int = 5,
    mode: str | None = "RGB",
    device: str | torch.device = "auto",
    batch_size: int = 64,
) -> Prediction | list[Prediction]:
    """Classify image files (or PIL images): the top-k classes with their confidences.

    Args:
        model: A classifier returning one logit per class (put in eval mode for the call).
        paths_or_pil: One image (path or PIL image) or a list of them.
        transform: What turned training images into tensors, minus random augmentation
            (e.g. the validation transform).
        classes: Class names in index order (``dataset.classes``); None labels by index.
        topk: How many classes to report per image (capped at the number of classes).
        mode: PIL mode images are converted to before ``transform``: ``"RGB"``, ``"L"`` for
            grayscale models, or None to keep each image's own mode.
        device: ``"auto"``: where the model's parameters are.
        batch_size: Images per forward pass.

    Returns:
        A :class:`Prediction` for one image, a list of them for a list.

    Raises:
        ArgumentError: A file is missing or unreadable, ``topk`` is not positive, or
            ``classes`` has fewer names than the model has outputs.
        MissingDependencyError: Pillow is not installed.

    Example:
        >>> print(colabkit.predict_images(model, "cat.jpg", val_transform, train_set.classes))  # doctest: +SKIP
        cat.jpg: cat 91.0%, dog 6.2%, ...
    """
    single = isinstance(paths_or_pil, (str, os.PathLike)) or not isinstance(paths_or_pil, Sequence)
    items: list[Any] = [paths_or_pil] if single else list(paths_or_pil)  # type: ignore[arg-type]
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ArgumentError(f"predict_images(topk={topk!r}): give a positive integer such as 5")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ArgumentError(f"predict_images(batch_size={batch_size!r}): give a positive integer such as 64")
    if device == "auto":
        first = next(iter(model.parameters()), None)
        target = first.device if first is not None else torch.device("cpu")
    else:
        target = _device.get_device(device)

    predictions: list[Prediction] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            opened = [_open_image(item, start + i, mode) for i, item in enumerate(items[start : start + batch_size])]
            batch = torch.stack([transform(image) for _, image in opened]).to(target)
            with torch.inference_mode():
                logits = model(batch)
            probabilities = torch.softmax(logits.float(), dim=-1).cpu()
            n_classes = probabilities.shape[-1]
            if classes is not None and len(classes) < n_classes:
                raise ArgumentError(
                    f"predict_images: the model has {n_classes} outputs but classes has {len(classes)} names; "
                    "pass the training dataset's classes (e.g. train_set.classes)"
                )
            values, indices = probabilities.topk(min(topk, n_classes), dim=-1)
            for (source, _), row_p, row_i in zip(opened, values.tolist(), indices.tolist(), strict=True):
                labels = tuple(classes[i] if classes is not None else str(i) for i in row_i)
                predictions.append(Prediction(source, labels, tuple(row_i), tuple(row_p)))
    finally:
        model.train(was_training)
    return predictions[0] if single else predictions


# -- export -----------------------------------------------------------------------------------------
ExportFormat = Literal["onnx", "torchscript"]


def _require_onnx() -> None:
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(
            f"export(format='onnx') needs {' and '.join(repr(m) for m in missing)}, which torch.onnx uses to "
            f"write the file and {'is' if len(missing) == 1 else 'are'} not installed; run: pip install onnx "
            "onnxscript (add onnxruntime to check the exported model's outputs), or use format='torchscript'"
        )


def _as_tuple(example_input: Any) -> tuple[Any, ...]:
    return example_input if isinstance(example_input, tuple) else (example_input,)


def _outputs(value: Any) -> list[torch.Tensor]:
    """Every tensor in a model output, flattened in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _outputs(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _outputs(v)]
    return []


def _compare(expected: Any, actual: Sequence[Any], *, rtol: float, atol: float, what: str) -> float:
    reference = [t.detach().float().cpu() for t in _outputs(expected)]
    got = [torch.as_tensor(a).float().cpu() for a in actual]
    if len(reference) != len(got):
        raise ExportMismatchError(f"{what} returns {len(got)} outputs, the PyTorch model {len(reference)}")
    worst = 0.0
    for index, (ref, out) in enumerate(zip(reference, got, strict=True)):
        if ref.shape != out.shape:
            raise ExportMismatchError(
                f"{what} output {index} has shape {tuple(out.shape)}, the PyTorch model's {tuple(ref.shape)}"
            )
        worst = max(worst, float((ref - out).abs().max()) if ref.numel() else 0.0)
        if not torch.allclose(ref, out, rtol=rtol, atol=atol):
            raise ExportMismatchError(
                f"{what} output {index} differs from the PyTorch model's by up to {worst:.3g} "
                f"(rtol={rtol}, atol={atol}); the model may use an operation the exporter translates "
                "differently, or behave differently in eval mode"
            )
    return worst


def _publish(staging: Path, target: Path) -> None:
    """Move the checked files from ``staging`` next to ``target``: companions first, ``target`` last.

    Renames inside one filesystem are atomic, so ``target`` is either the old file or the new
    complete one; an ONNX weights file (``.data``) is in place before the model that names it.
    """
    names = sorted(os.listdir(staging), key=lambda name: name == target.name)
    for name in names:
        with open(staging / name, "rb") as handle:
            _io.ops.fsync(handle.fileno())
        os.replace(staging / name, target.parent / name)
    _io.fsync_dir(target.parent)


def _export_onnx(model: nn.Module, args: tuple[Any, ...], path: Path, *, dynamic_batch: bool) -> None:
    if not versions.onnx_export_has_dynamo():
        _export_onnx_traced(model, args, path, dynamic_batch=dynamic_batch)
        return
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about internal decompositions
        torch.onnx.export(
            model,
            args,
            path,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            # ONNX's protobuf cannot hold more than 2 GB; only then split the weights out.
            external_data=n_bytes > 1_800_000_000,
            verbose=False,
        )


def _export_onnx_traced(model: nn.Module, args: tuple[Any, ...], path: Path, *, dynamic_batch: bool) -> None:
    """torch before 2.5: the TorchScript-based exporter, the batch axis named dynamic by input position."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    names = [f"input_{i}" for i in range(len(tensors))]
    dynamic_axes = {name: {0: "batch"} for name, a in zip(names, tensors, strict=True) if a.dim() > 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values in the graph
        torch.onnx.export(
            model,
            args,
            str(path),
            input_names=names,
            dynamic_axes=dynamic_axes if dynamic_batch else None,
            verbose=False,
        )


def _check_onnx(path: Path, args: tuple[Any, ...], expected: Any, *, rtol: float, atol: float) -> float | None:
    try:
        import onnxruntime
    except ImportError:
        _notify.say_once(
            "export-no-onnxruntime",
            "export: onnxruntime is not installed, so the ONNX file's outputs were not compared with "
            "PyTorch's; pip install onnxruntime to have them checked",
        )
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {
        spec.name: arg.detach().cpu().numpy()
        for spec, arg in zip(session.get_inputs(), [a for a in args if isinstance(a, torch.Tensor)], strict=False)
    }
    return _compare(expected, session.run(None, feeds), rtol=rtol, atol=atol, what=f"the ONNX model {path.name}")


def _export_torchscript(model: nn.Module, args: tuple[Any, ...], path: Path) -> Any:
    with warnings.catch_warnings():
        # torch marks TorchScript deprecated in favour of torch.export; tracing still works and
        # remains the format that loads without Python (LibTorch, older serving stacks).
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, args, check_trace=False)
        torch.jit.save(traced, str(path))
        return torch.jit.load(str(path), map_location="cpu")


def export(
    model: nn.Module,
    example_input: Any,
    path: str | os.PathLike[str],
    *,
    format: ExportFormat | Literal["auto"] = "auto",
    dynamic_batch: bool = True,
    check: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> Path:
    """Export ``model`` to ONNX or TorchScript and check the file computes the same outputs.

    The model is exported in eval mode on the CPU (a copy; yours stays where it is).
    With ``check=True`` the exported file is loaded back (ONNX through onnxruntime,
    when installed) and its outputs on ``example_input`` must match the PyTorch
    model's within ``rtol`` / ``atol``. The file appears only once complete.

    Args:
        model: The trained model.
        example_input: One input batch (a tensor, or a tuple of positional inputs).
        path: Where to write, e.g. ``dirs.models / "model.onnx"``.
        format: ``"onnx"``, ``"torchscript"``, or ``"auto"``: by the suffix
            (``.onnx``; ``.pt`` / ``.ts`` / ``.torchscript`` mean TorchScript).
        dynamic_batch: Let the ONNX model accept any batch size (TorchScript traces are
            shape-generic for most models anyway).
        check: Compare the exported model's outputs with PyTorch's.
        rtol: Relative tolerance of the check.
        atol: Absolute tolerance of the check.

    Returns:
        The written file's path.

    Raises:
        MissingDependencyError: ONNX export without the ``onnx`` / ``onnxscript`` packages
            (the message has the pip command).
        ExportError: The exporter cannot translate the model (the message suggests the other format).
        ExportMismatchError: The exported model's outputs differ beyond the tolerance; nothing is written.
        ArgumentError: Unknown format or suffix.

    Example:
        >>> colabkit.export(model, torch.randn(1, 3, 32, 32), dirs.models / "resnet.onnx")  # doctest: +SKIP
    """
    target = Path(path).expanduser()
    if format == "auto":
        suffix = target.suffix.lower()
        if suffix == ".onnx":
            chosen: ExportFormat = "onnx"
        elif suffix in (".pt", ".pth", ".ts", ".torchscript", ".jit"):
            chosen = "torchscript"
        else:
            raise ArgumentError(
                f"export(path={str(path)!r}): cannot tell the format from the suffix {suffix!r}; "
                "name the file *.onnx or *.pt, or pass format='onnx' or format='torchscript'"
            )
    elif format in ("onnx", "torchscript"):
        chosen = format
    else:
        raise ArgumentError(f"export(format={format!r}): use 'onnx', 'torchscript' or 'auto'")
    if target.is_dir():
        raise ArgumentError(f"export(path={str(path)!r}) is a folder; give a file name such as model.{chosen}")
    target.parent.mkdir(parents=True, exist_ok=True)

    if chosen == "onnx":
        _require_onnx()  # before any work, so a missing package costs nothing

    # A CPU copy in eval mode: exporting must not move or change the caller's model.
    cpu_model = copy.deepcopy(model).cpu().eval()
    args = tuple(_device.to_device(a, "cpu") for a in _as_tuple(example_input))
    with torch.inference_mode():
        expected = cpu_model(*args)
    # Written and checked in a hidden folder beside the target; only a file that passed appears.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}{_io.TEMP_MARK}") as tmp:
        staged = Path(tmp) / target.name
        try:
            if chosen == "onnx":
                _export_onnx(cpu_model, args, staged, dynamic_batch=dynamic_batch)
            else:
                loaded = _export_torchscript(cpu_model, args, staged)
        except Exception as exc:
            other = "torchscript" if chosen == "onnx" else "onnx"
            raise ExportError(
                f"export(format={chosen!r}) could not translate {type(model).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}; "
                f"try format={other!r}, or export a model without data-dependent Python control flow"
            ) from exc
        if check and chosen == "onnx":
            _check_onnx(staged, args, expected, rtol=rtol, atol=atol)
        elif check:
            with torch.inference_mode():
                actual = loaded(*args)
            _compare(expected, _outputs(actual), rtol=rtol, atol=atol, what=f"the TorchScript model {target.name}")
        _publish(Path(tmp), target)
    return target
