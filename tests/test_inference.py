"""load_for_inference, predict_images and export with real files, real PNGs and real exported models."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from colabkit import _io, inference
from colabkit.checkpoint import CheckpointManager, live_managers
from colabkit.errors import (
    ArgumentError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    MissingDependencyError,
)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- load_for_inference -----------------------------------------------------------------------------
def test_loads_the_tutorial_format_into_an_eval_model(tmp_path: Path) -> None:
    trained = _net(1)
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "model_state_dict": trained.state_dict(), "loss": 0.1}, path)
    model = _net(2)
    assert model.training and not _same_weights(model, trained)

    loaded = inference.load_for_inference(path, model, device="cpu")

    assert loaded is model and not model.training
    assert _same_weights(model, trained)


def test_loads_bare_and_wrapped_state_dicts(tmp_path: Path) -> None:
    trained = _net(1)
    bare = tmp_path / "bare.pth"
    torch.save(trained.state_dict(), bare)
    assert _same_weights(inference.load_for_inference(bare, _net(2), device="cpu"), trained)

    # Saved from DataParallel / DDP: every key starts with "module.".
    wrapped = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, wrapped)
    assert _same_weights(inference.load_for_inference(wrapped, _net(2), device="cpu"), trained)


def test_a_checkpoint_folder_gives_its_best_checkpoint(tmp_path: Path) -> None:
    nets = {step: _net(step) for step in (1, 2, 3)}
    with CheckpointManager(tmp_path / "ckpt", keep_last=None) as manager:
        for step, val_loss in ((1, 0.5), (2, 0.2), (3, 0.4)):
            state = {"model_state_dict": nets[step].state_dict(), "epoch": step}
            manager.save(state, step=step, metrics={"val_loss": val_loss, "val_accuracy": 1 - val_loss})

    assert _same_weights(inference.load_for_inference(tmp_path / "ckpt", _net(9), device="cpu"), nets[2])
    latest = inference.load_for_inference(tmp_path / "ckpt", _net(9), device="cpu", monitor=None)
    assert _same_weights(latest, nets[3])
    by_accuracy = inference.load_for_inference(tmp_path / "ckpt", _net(9), device="cpu", monitor="val_accuracy")
    assert _same_weights(by_accuracy, nets[2])
    with pytest.raises(ArgumentError, match=r"monitor='f1'.*recorded: \['val_accuracy', 'val_loss'\]"):
        inference.load_for_inference(tmp_path / "ckpt", _net(9), device="cpu", monitor="f1")


def test_reading_a_folder_changes_nothing_in_it(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=None) as manager:
        manager.save({"model_state_dict": _net(1).state_dict()}, step=1, metrics={"val_loss": 0.1})
    # Leftovers a CheckpointManager would clean up at start: an old unreferenced data file
    # and the temporary of a writer that is gone (pid 2**22 + 1 is never a live process here).
    orphan = tmp_path / "step-000000007-0123abcd.pt"
    orphan.write_bytes(b"half")
    os.utime(orphan, (1, 1))
    temp = tmp_path / f".step-000000008-0123abcd.pt{_io.TEMP_MARK}{2**22 + 1}-x"
    temp.write_bytes(b"half")
    before = sorted(p.name for p in tmp_path.iterdir())
    live = len(live_managers())
    assert _same_weights(inference.load_for_inference(tmp_path, _net(9), device="cpu"), _net(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert len(live_managers()) == live  # nothing registered for the exit flush


def test_a_folder_without_metrics_gives_the_latest(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=None) as manager:
        for step in (1, 2):
            manager.save({"model_state_dict": _net(step).state_dict()}, step=step)
    assert _same_weights(inference.load_for_inference(tmp_path, _net(9), device="cpu"), _net(2))


def test_missing_and_mismatched_checkpoints_are_explained(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        inference.load_for_inference(tmp_path / "nope.pt", _net(), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="holds no complete checkpoint"):
        inference.load_for_inference(tmp_path / "empty", _net(), device="cpu")

    path = tmp_path / "other.pt"
    torch.save({"model_state_dict": {"head.weight": torch.zeros(2, 4)}}, path)
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        CheckpointMismatchError,
        match=r"missing keys \['0\.bias', '0\.weight', '1\.bias'.*unexpected keys \['head\.weight'\]",
    ):
        inference.load_for_inference(path, model, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    shapes = tmp_path / "shapes.pt"
    torch.save({"model_state_dict": {k: v[:1] if v.dim() else v for k, v in _net().state_dict().items()}}, shapes)
    with pytest.raises(CheckpointMismatchError, match="size mismatch"):
        inference.load_for_inference(shapes, _net(), device="cpu")


def test_a_pickled_module_is_refused_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(_net(), path)  # pickles the class: unsafe to load
    with pytest.raises(CheckpointError, match="refused to load"):
        inference.load_for_inference(path, _net(), device="cpu")


# -- predict_images ---------------------------------------------------------------------------------
class Brightness(nn.Module):
    """Three classes by mean brightness: dark, medium, bright."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3))
        return torch.stack([-20 * mean, -20 * (mean - 0.5).abs(), 20 * mean - 15], dim=1)


def _to_tensor(image: object) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _png(path: Path, value: int) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8), (value, value, value)).save(path)
    return path


def test_predict_images_ranks_classes_for_files_and_pil_images(tmp_path: Path) -> None:
    from PIL import Image

    dark, bright = _png(tmp_path / "dark.png", 10), _png(tmp_path / "bright.png", 250)
    classes = ["dark", "medium", "bright"]
    model = Brightness()

    results = inference.predict_images(model, [dark, str(bright)], _to_tensor, classes, topk=2, device="cpu")

    assert [r.label for r in results] == ["dark", "bright"]
    assert results[0].source == str(dark)
    assert all(len(r.labels) == 2 and r.confidences[0] >= r.confidences[1] > 0 for r in results)
    assert results[1].confidence > 0.9
    assert str(results[0]).startswith(f"{dark}: dark ")

    single = inference.predict_images(model, Image.new("RGB", (8, 8), (128, 128, 128)), _to_tensor, classes)
    assert isinstance(single, inference.Prediction)
    assert single.label == "medium" and single.source == "<PIL image #0>"
    assert single.indices[0] == 1 and len(single.labels) == 3  # topk=5 capped at 3 classes
    assert model.training  # mode restored


def test_predict_images_explains_bad_input(tmp_path: Path) -> None:
    model = Brightness()
    with pytest.raises(ArgumentError, match="does not exist"):
        inference.predict_images(model, tmp_path / "missing.png", _to_tensor, ["a", "b", "c"])
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ArgumentError, match="not an image PIL can read"):
        inference.predict_images(model, tmp_path / "notes.png", _to_tensor, ["a", "b", "c"])
    with pytest.raises(ArgumentError, match="3 outputs but classes has 2 names"):
        inference.predict_images(model, _png(tmp_path / "x.png", 9), _to_tensor, ["a", "b"])
    with pytest.raises(ArgumentError, match="topk=0"):
        inference.predict_images(model, _png(tmp_path / "y.png", 9), _to_tensor, None, topk=0)


# -- export -----------------------------------------------------------------------------------------
def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".colabkit-tmp-" in p.name]


def test_torchscript_export_matches_pytorch(tmp_path: Path) -> None:
    model = _net(3)
    model.train()
    example = torch.randn(2, 1, 4, 4)

    path = inference.export(model, example, tmp_path / "out" / "net.pt")

    assert path == tmp_path / "out" / "net.pt" and path.is_file()
    assert model.training  # the caller's model is untouched
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks TorchScript deprecated; loading works
        loaded = torch.jit.load(str(path))
    other = torch.randn(5, 1, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(other), model.eval()(other), rtol=1e-4, atol=1e-5)
    assert _leftovers(path.parent) == []


class Noisy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


def test_an_export_that_computes_something_else_is_not_published(tmp_path: Path) -> None:
    with pytest.raises(inference.ExportMismatchError, match="differs from the PyTorch model's"):
        inference.export(Noisy(), torch.zeros(2, 3), tmp_path / "noisy.pt")
    assert list(tmp_path.iterdir()) == []


class Chatty(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, object]:
        return {"logits": x * 2, "note": "not a tensor"}


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # torch printing the failing value mid-trace
def test_a_model_the_exporter_cannot_translate_gets_a_hint_and_no_file(tmp_path: Path) -> None:
    with pytest.raises(inference.ExportError, match=r"could not translate Chatty.*try format='onnx'"):
        inference.export(Chatty(), torch.zeros(2, 3), tmp_path / "chatty.pt")
    assert list(tmp_path.iterdir()) == []


def test_export_needs_a_known_format(tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match=r"cannot tell the format from the suffix '\.bin'"):
        inference.export(_net(), torch.randn(1, 1, 4, 4), tmp_path / "model.bin")
    with pytest.raises(ArgumentError, match="format='tflite'"):
        inference.export(_net(), torch.randn(1, 1, 4, 4), tmp_path / "model.bin", format="tflite")  # type: ignore[arg-type]


def test_onnx_export_without_onnx_names_the_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    with pytest.raises(MissingDependencyError, match=r"needs 'onnxscript'.*pip install onnx onnxscript"):
        inference.export(_net(), torch.randn(1, 1, 4, 4), tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_onnx_export_matches_pytorch_for_any_batch_size(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _net(4).eval()

    path = inference.export(model, torch.randn(2, 1, 4, 4), tmp_path / "net.onnx")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]  # one self-contained file
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = torch.randn(7, 1, 4, 4)
    (out,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(batch), rtol=1e-4, atol=1e-5)
