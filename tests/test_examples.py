"""Every example notebook runs top to bottom in a real Jupyter kernel, offline, under a faked platform.

The kernel is this virtualenv's Python (a kernelspec written to a temporary
JUPYTER_PATH, so no system-wide "python3" kernel can be picked by mistake).
``COLABKIT_EXAMPLES_OFFLINE=1`` makes each notebook's install cell skip pip and
load ``examples/_offline.py`` instead: it fakes Colab or Kaggle and replaces
downloads with small generated stand-ins. Any cell error fails the test.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
KERNEL = "colabkit-tests"  # the kernelspec of conftest.kernel_dir


def _load_builder() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_build_notebooks", EXAMPLES / "_build_notebooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _texts(output: Any) -> str:
    """What one output shows as text: a stream's text, an error's traceback, a display's text/plain."""
    data = output.get("data", {})
    parts = [str(output.get("text", "")), *map(str, output.get("traceback", [])), str(data.get("text/plain", ""))]
    return "\n".join(part for part in parts if part)


def _outputs(nb: Any) -> str:
    return "\n".join(_texts(output) for cell in nb.cells for output in cell.get("outputs", []))


def test_there_are_four_notebooks_and_they_match_their_generator() -> None:
    assert [p.stem for p in NOTEBOOKS] == [
        "cifar10_resnet",
        "fashion_mnist_cpu_vs_gpu",
        "kaggle_two_gpus",
        "quickstart",
    ]
    builder = _load_builder()
    for path in NOTEBOOKS:
        assert path.read_text() == builder.render(path.stem), f"{path.name} is stale: run examples/_build_notebooks.py"  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_opens_in_colab_and_installs_colabkit_first(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    badge = f"https://colab.research.google.com/github/colabkit/colabkit/blob/main/examples/{path.name}"
    assert nb.cells[0].cell_type == "markdown" and badge in nb.cells[0].source
    assert f"({badge})" in (ROOT / "README.md").read_text(), f"README.md lacks the Open in Colab badge of {path.name}"
    install = nb.cells[1]
    assert install.cell_type == "code"
    assert "!pip install -q git+https://github.com/colabkit/colabkit" in install.source
    assert 'os.environ.get("COLABKIT_EXAMPLES_OFFLINE") == "1"' in install.source


def test_quickstart_is_under_fifteen_lines_of_user_code() -> None:
    nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"][1:]  # after the install cell
    lines = [ln for c in code_cells for ln in c.source.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert len(lines) < 15, lines


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(
    path: Path, tmp_path: Path, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("COLABKIT_EXAMPLES_OFFLINE", "1")
    monkeypatch.setenv("COLABKIT_OFFLINE_ROOT", str(root))
    paths = [str(ROOT), str(EXAMPLES), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL, timeout=240, resources={"metadata": {"path": str(tmp_path)}}
    )

    client.execute()  # raises CellExecutionError, naming the cell, on any error

    out = _outputs(nb)
    assert "[offline stand-in] offline mode" in out
    # Each .plot() ending a cell shows its figure exactly once (History and bench plots close
    # the figure they return, so a trailing ";" would hide it and a stray draw would double it).
    for cell in nb.cells:
        if cell.cell_type == "code" and ".plot()" in cell.source:
            images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
            assert len(images) == 1, (cell.source, [o.get("output_type") for o in cell.outputs])
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        # Nothing shows colabkit's own files or source lines (a warning names the user's line), and
        # each notice is said once per cell.
        text = "\n".join(_texts(output) for output in cell.outputs)
        assert f"{ROOT / 'colabkit'}{os.sep}" not in text and "_gpu_hint" not in text, (cell.source, text)
        for said in ("no GPU was found", "no GPU in this", "is not in-memory tensors"):
            assert text.count(said) <= 1, (said, cell.source, text)
    drive = root / "platform" / "content" / "drive" / "MyDrive"
    if path.stem == "quickstart":
        assert "resuming from" in out  # the second fit() call continued the first
        assert any((drive / "quickstart" / "checkpoints").glob("step-*.json"))
    elif path.stem == "cifar10_resnet":
        assert (drive / "cifar10-resnet" / "models" / "resnet18_cifar10.onnx").is_file()
        assert "| true label:" in out
    elif path.stem == "fashion_mnist_cpu_vs_gpu":
        assert "TFLOP/s" in out and "samples/s" in out
        if not torch.cuda.is_available():
            assert "no GPU was found" in out
    elif path.stem == "kaggle_two_gpus":
        assert re.search(r"runtime\s+kaggle", out)  # colabkit.info() saw the (faked) Kaggle runtime
        working = root / "platform" / "kaggle" / "working"
        assert any(working.rglob("fashion-mnist-ddp/checkpoints/step-*.json"))
