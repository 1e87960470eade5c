"""info() on each runtime, through the fakes."""

from __future__ import annotations

import io

from colabkit.info import info, info_rows
from colabkit.testing import fake_colab, fake_kaggle


def test_info_on_colab_with_gpu() -> None:
    with fake_colab(gpu="T4"):
        rows = dict(info_rows())
        out = io.StringIO()
        info(file=out)
    assert rows["runtime"] == "colab"
    assert rows["gpu 0"].startswith("Tesla T4, 15.0 GB, compute capability 7.5")
    assert "limit 12:00:00" in rows["session"]
    text = out.getvalue()
    assert text.splitlines()[0].split() == ["runtime", "colab"]
    assert "free of" in text


def test_info_on_kaggle_two_gpus_and_enterprise() -> None:
    with fake_kaggle(gpu="T4", gpu_count=2):
        rows = dict(info_rows())
    assert rows["runtime"] == "kaggle"
    assert "gpu 1" in rows
    with fake_colab(enterprise=True):
        assert dict(info_rows())["runtime"] == "colab (Colab Enterprise)"


def test_info_without_gpu() -> None:
    rows = dict(info_rows())
    assert rows["gpu"] == "none"
    assert rows["torch"]
