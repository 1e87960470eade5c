"""decode_images() and stage(decode=...): an image folder decoded once into one memory-mapped uint8 array.

Real images of every awkward kind made here, compared with torchvision's own
ImageFolder + Resize; real worker processes; a real build killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
import torch

from colabkit import _io
from colabkit.data.images.array import ImageArray
from colabkit.data.images.decode import MARKER, decode_images
from colabkit.data.stage import stage
from colabkit.errors import ArgumentError, ImageDecodeError, PathNotFoundError

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

SIZE = (24, 20)  # (height, width): neither square nor any source's shape
PALETTE_WARNING = "ignore:Palette images with Transparency:UserWarning"  # torchvision's loader, not ours


def _noise(height: int, width: int, channels: int, seed: int) -> Any:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, channels)).repeat(4, 0).repeat(4, 1)
    return (smooth[:height, :width] // 2 + rng.integers(0, 128, (height, width, channels))).astype(np.uint8)


def make_images(root: Path) -> Path:
    """One class folder per family of awkward files, as users' folders hold them."""
    for name in ("a", "b", "c", "c/deeper"):
        (root / name).mkdir(parents=True, exist_ok=True)
    Image.fromarray(_noise(30, 41, 3, 1)).save(root / "a/photo.jpg", quality=90)
    Image.fromarray(_noise(50, 33, 3, 2)).save(root / "a/wide.png")
    Image.fromarray(_noise(24, 20, 3, 3)).save(root / "a/exact.png")  # already the asked size
    Image.fromarray(_noise(17, 64, 3, 4)).save(root / "a/UPPER.JPG")
    (root / "a/notes.txt").write_text("not an image: ImageFolder skips it, and so must we")
    palette = Image.fromarray(_noise(31, 29, 3, 5)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    palette.save(root / "b/palette.png", transparency=3)
    Image.fromarray(_noise(28, 35, 1, 6)[:, :, 0], mode="L").save(root / "b/gray.png")
    Image.fromarray(_noise(26, 22, 4, 7), mode="RGBA").save(root / "b/rgba.png")
    sixteen = (np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 53) % 65535
    Image.fromarray(sixteen.astype(np.uint16)).save(root / "c/sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view": torchvision's loader ignores it
    Image.fromarray(_noise(20, 44, 3, 8)).save(root / "c/rotated.jpg", exif=exif)
    Image.fromarray(_noise(33, 33, 1, 9)[:, :, 0], mode="L").save(root / "c/deeper/gray.jpg")
    return root


def torchvision_reference(root: Path, size: tuple[int, int]) -> Any:
    from torchvision import datasets, transforms

    return datasets.ImageFolder(str(root), transform=transforms.Resize(size))


class CountingOps(_io.FileOps):
    """The file-ops seam, appending one line per image read to ``log`` (shared by forked workers)."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def open(self, path: str | os.PathLike[str], mode: str) -> IO[Any]:
        if mode == "rb" and str(path).lower().endswith((".png", ".jpg")):
            fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(fd, os.fsencode(os.fspath(path)) + b"\n")
            os.close(fd)
        return super().open(path, mode)


def reads(log: Path) -> int:
    return len(log.read_bytes().splitlines()) if log.exists() else 0


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return make_images(tmp_path / "images")


@pytest.mark.filterwarnings(PALETTE_WARNING)
@pytest.mark.parametrize("workers", [1, 2])
def test_pixels_labels_and_order_equal_torchvision_imagefolder_plus_resize(
    images: Path, tmp_path: Path, workers: int
) -> None:
    decoded = decode_images(images, size=SIZE, dest=tmp_path / "out", workers=workers, chunk=2, progress=False)
    reference = torchvision_reference(images, SIZE)
    assert isinstance(decoded, ImageArray)
    assert isinstance(decoded.data, np.memmap)  # on disk, not in RAM
    assert decoded.data.shape == (len(reference), *SIZE, 3) and decoded.data.dtype == np.uint8
    assert decoded.classes == reference.classes
    for index in range(len(reference)):
        image, label = reference[index]
        path = reference.samples[index][0]
        assert np.array_equal(decoded.data[index], np.asarray(image)), path
        assert int(decoded.targets[index]) == label, path
    assert len(decoded) == 10  # notes.txt skipped; the nested folder and the upper-case .JPG taken


@pytest.mark.filterwarnings(PALETTE_WARNING)
def test_one_number_is_a_square_and_the_dataset_applies_the_users_transform(images: Path, tmp_path: Path) -> None:
    from torchvision import transforms

    decoded = decode_images(
        images, size=16, dest=tmp_path / "out", transform=transforms.ToTensor(), target_transform=lambda y: y * 10
    )
    reference = torchvision_reference(images, (16, 16))
    x, y = decoded[3]
    assert torch.equal(x, transforms.ToTensor()(reference[3][0]))
    assert y == reference[3][1] * 10


def test_every_undecodable_file_is_named_in_one_error_and_nothing_is_published(images: Path, tmp_path: Path) -> None:
    (images / "a/truncated.jpg").write_bytes((images / "a/photo.jpg").read_bytes()[:200])
    (images / "b/text.png").write_text("this is no PNG")
    out = tmp_path / "out"
    with pytest.raises(ImageDecodeError) as caught:
        decode_images(images, size=SIZE, dest=out, workers=2, chunk=2, progress=False)
    message = str(caught.value)
    assert "2 of 12 files" in message
    assert os.path.join("a", "truncated.jpg") in message and os.path.join("b", "text.png") in message
    assert sorted(name for name, _ in caught.value.failures) == [
        os.path.join("a", "truncated.jpg"),
        os.path.join("b", "text.png"),
    ]
    assert not out.exists()  # nothing half-built, nothing under the final name
    assert not any(tmp_path.glob(".out*"))  # and no partial build left to resume


@pytest.mark.filterwarnings(PALETTE_WARNING)
def test_rerun_reads_nothing_and_a_changed_size_or_source_rebuilds(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "reads.log"
    monkeypatch.setattr(_io, "ops", CountingOps(log))
    out = tmp_path / "out"
    first = decode_images(images, size=SIZE, dest=out, progress=False)
    assert reads(log) == 10
    again = decode_images(images, size=SIZE, dest=out, progress=False)
    assert reads(log) == 10  # the marker matched: no image read, no decode
    assert np.array_equal(np.asarray(again.data), np.asarray(first.data))
    marker = json.loads((out / MARKER).read_text())
    assert marker["settings"]["size"] == list(SIZE) and marker["identity"]["kind"] == "folder"
    assert marker["identity"]["path"] == str(images)

    smaller = decode_images(images, size=(8, 8), dest=out, progress=False)
    assert reads(log) == 20 and smaller.data.shape == (10, 8, 8, 3)

    Image.fromarray(_noise(9, 9, 3, 10)).save(images / "b/new.png")
    grown = decode_images(images, size=(8, 8), dest=out, progress=False)
    assert reads(log) == 31 and len(grown) == 11

    (images / "a/wide.png").unlink()
    shrunk = decode_images(images, size=(8, 8), dest=out, progress=False)
    assert reads(log) == 41 and len(shrunk) == 10

    # A file rewritten in place under its name changes no folder: overwrite=True decodes it again.
    Image.fromarray(_noise(9, 9, 3, 11)).save(images / "b/new.png")
    assert reads(log) == 41 and len(decode_images(images, size=(8, 8), dest=out, progress=False)) == 10
    rebuilt = decode_images(images, size=(8, 8), dest=out, overwrite=True, progress=False)
    assert reads(log) == 51
    new = decode_images(images, size=(8, 8), dest=tmp_path / "other", progress=False)
    assert np.array_equal(np.asarray(rebuilt.data), np.asarray(new.data))


@pytest.mark.filterwarnings(PALETTE_WARNING)
def test_stage_of_a_zip_with_decode_returns_the_decoded_dataset(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "flowers.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(images.rglob("*")):
            if path.is_file():
                zf.write(path, f"flowers/{path.relative_to(images)}")
    monkeypatch.setenv("COLABKIT_DATA_DIR", str(tmp_path / "data"))
    decoded = stage(archive, tmp_path / "staged", decode=SIZE, progress=False)
    assert isinstance(decoded, ImageArray)
    assert (tmp_path / "data" / ".colabkit-decoded").is_dir()  # the runtime's fast local data folder
    reference = torchvision_reference(tmp_path / "staged" / "flowers" / "flowers", SIZE)
    assert [np.asarray(reference[i][0]).tolist() for i in range(len(reference))] == decoded.data.tolist()

    log = tmp_path / "reads.log"
    monkeypatch.setattr(_io, "ops", CountingOps(log))
    again = stage(archive, tmp_path / "staged", decode=SIZE, progress=False)
    assert reads(log) == 0 and again.data.shape == decoded.data.shape
    marker = json.loads(next((tmp_path / "data" / ".colabkit-decoded").iterdir()).joinpath(MARKER).read_text())
    assert marker["identity"]["kind"] == "staged"  # known by the stage marker: no walk over the files


def test_fit_takes_the_decoded_dataset_and_a_dataloader_reads_it(images: Path, tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    from torchvision import transforms

    from colabkit.train.loop import fit

    decoded = decode_images(images, size=(8, 8), dest=tmp_path / "out", transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(decoded, batch_size=4, num_workers=2)
    batches = list(loader)
    assert batches[0][0].shape == (4, 3, 8, 8) and sum(len(b[1]) for b in batches) == 10
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    history = fit(model, decoded, epochs=2, batch_size=4, num_workers=2, progress=False, checkpoint_dir=None)
    assert len(history) == 2


class SlowOps(_io.FileOps):
    """Drive-like latency on every image open, recording how many reads were in flight at once."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.now = self.most = 0

    def open(self, path: str | os.PathLike[str], mode: str) -> IO[Any]:
        if mode != "rb":
            return super().open(path, mode)
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.02)
        with self.lock:
            self.now -= 1
        return super().open(path, mode)


@pytest.mark.filterwarnings(PALETTE_WARNING)
def test_files_are_read_ahead_by_threads_for_slow_storage(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowOps()
    monkeypatch.setattr(_io, "ops", slow)
    decoded = decode_images(images, size=SIZE, dest=tmp_path / "out", workers=1, read_threads=6, progress=False)
    assert slow.most == 6  # six reads waiting on the storage at once, while the decoder works
    reference = torchvision_reference(images, SIZE)
    assert all(np.array_equal(decoded.data[i], np.asarray(reference[i][0])) for i in range(len(reference)))


def test_bad_arguments_are_named(images: Path, tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match=r"size=\(0, 4\)"):
        decode_images(images, size=(0, 4))
    with pytest.raises(ArgumentError, match="chunk=0"):
        decode_images(images, size=4, chunk=0)
    with pytest.raises(ArgumentError, match="workers='many'"):
        decode_images(images, size=4, workers="many")  # type: ignore[arg-type]
    with pytest.raises(PathNotFoundError, match="not a folder"):
        decode_images(tmp_path / "missing", size=4)
    (tmp_path / "flat").mkdir()
    Image.fromarray(_noise(9, 9, 3, 1)).save(tmp_path / "flat/one.png")
    with pytest.raises(ArgumentError, match="no class folders"):
        decode_images(tmp_path / "flat", size=4)
    with pytest.raises(ArgumentError, match="inside the image folder"):
        decode_images(images, size=4, dest=images / "decoded")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken/mine.txt").write_text("the user's")
    with pytest.raises(ArgumentError, match="not written by decode_images"):
        decode_images(images, size=4, dest=tmp_path / "taken", progress=False)
    assert (tmp_path / "taken/mine.txt").read_text() == "the user's"


KILL_SCRIPT = """
import os, sys
from pathlib import Path
from tests.test_decode_images import CountingOps
from colabkit import _io
from colabkit.data.images.decode import decode_images

_io.ops = CountingOps(Path(sys.argv[3]))
data = decode_images(sys.argv[1], size=(16, 16), dest=sys.argv[2], chunk=64, workers=2, progress=False)
print("done", len(data))
"""


def test_a_build_killed_at_a_random_moment_resumes_and_decodes_at_most_one_chunk_again(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    root = tmp_path / "many"
    count = 800
    for index in range(count):
        folder = root / f"class{index % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_noise(20, 20, 3, index)).save(folder / f"{index:05d}.png")
    out, log = tmp_path / "out", tmp_path / "reads.log"
    command = [sys.executable, "-c", KILL_SCRIPT, str(root), str(out), str(log)]
    cwd = str(Path(__file__).resolve().parent.parent)
    victim = subprocess.Popen(command, env=subprocess_env, cwd=cwd, start_new_session=True)
    kill_after = random.randint(64, count - 160)  # a random moment inside the build
    deadline = time.monotonic() + 120
    while reads(log) < kill_after and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    before = reads(log)
    assert 0 < before < count, "the kill must land inside the build"
    assert not (out / MARKER).exists()  # not complete, and not looking complete

    finished = subprocess.run(command, env=subprocess_env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.split() == ["done", str(count)]
    again = reads(log) - before
    decoded_twice = before + again - count
    assert decoded_twice <= 64, f"{decoded_twice} images decoded twice (killed after {before} reads)"
    reference = decode_images(root, size=(16, 16), dest=tmp_path / "fresh", progress=False)
    assert np.array_equal(np.load(out / "images.npy", mmap_mode="r"), np.asarray(reference.data))
