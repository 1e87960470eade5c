"""Formats told by their bytes: every archive kind, misnamed, nested, and served by a real HTTP server.

The server on 127.0.0.1 sends each kind as real servers do: plainly; gzipped on the wire
(``Content-Encoding: gzip`` over the file, as servers that ignore ``Accept-Encoding:
identity`` do); a ``.gz`` file as Apache's ``AddEncoding x-gzip .gz`` sends it (the file as
stored, ``Content-Encoding: x-gzip`` or ``gzip``); and already decoded under its ``.gz``
name, which is what a client that undoes Content-Encoding (requests under gdown, aiohttp
under fsspec, a proxy) hands over. urllib, which colabkit downloads with, undoes nothing
(http.client only reads the body as sent), so the bytes that arrive are the bytes sent.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import tarfile
import types
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _http_server import Server

from colabkit.data import sources
from colabkit.data.archive import archive_format
from colabkit.data.stage import stage
from colabkit.errors import ArgumentError, DownloadError
from colabkit.testing import fake_colab

TREE = {"ds/a.txt": b"alpha " * 300, "ds/sub/b.bin": bytes(range(256)) * 8}
CSV = b"id,label\n" + b"".join(b"%d,%d\n" % (i, i % 10) for i in range(500))


def tar_bytes(tree: dict[str, bytes] = TREE, *, v7: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in tree.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    raw = bytearray(buffer.getvalue())
    if v7:
        # A V7 header: no "ustar" magic nor the fields it introduced; only the checksum tells it is a tar.
        with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tf:
            offsets = [info.offset for info in tf.getmembers()]
        for at in offsets:
            raw[at + 257 : at + 500] = bytes(243)
            raw[at + 148 : at + 156] = b" " * 8
            raw[at + 148 : at + 156] = b"%06o\x00 " % sum(raw[at : at + 512])
    return bytes(raw)


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in TREE.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def zstd_bytes(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return bytes(zstandard.ZstdCompressor().compress(data))


def sevenzip_bytes() -> bytes:
    py7zr = pytest.importorskip("py7zr")
    buffer = io.BytesIO()
    with py7zr.SevenZipFile(buffer, "w") as archive:
        for name, data in TREE.items():
            archive.writestr(data, name)
    return buffer.getvalue()


#: kind -> (the file's usual name, how to build it, what archive_format says).
KINDS: dict[str, tuple[str, Callable[[], bytes]]] = {
    "zip": ("digits.zip", zip_bytes),
    "tar": ("digits.tar", tar_bytes),
    "tar.gz": ("digits.tar.gz", lambda: gzip.compress(tar_bytes())),
    "tar.bz2": ("digits.tar.bz2", lambda: bz2.compress(tar_bytes())),
    "tar.xz": ("digits.tar.xz", lambda: lzma.compress(tar_bytes())),
    "tar.zst": ("digits.tar.zst", lambda: zstd_bytes(tar_bytes())),
    "7z": ("digits.7z", sevenzip_bytes),
    "gz": ("table.csv.gz", lambda: gzip.compress(CSV)),
}


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.name.startswith(".colabkit")
    }


def assert_staged(root: Path, kind: str) -> None:
    if kind == "gz":
        assert files_under(root) == {"table.csv": CSV}
    else:
        assert root.name == "ds"
        assert files_under(root) == {name.removeprefix("ds/"): data for name, data in TREE.items()}


# -- archive_format ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_is_told_by_its_bytes_whatever_its_name(tmp_path: Path, kind: str) -> None:
    data = KINDS[kind][1]()
    for name in ("blob", "wrong.zip", "wrong.tar.gz", "wrong.txt"):
        path = tmp_path / name
        path.write_bytes(data)
        assert archive_format(path) == kind, name


def test_a_v7_tar_without_magic_is_told_by_its_header_checksum(tmp_path: Path) -> None:
    v7 = tar_bytes(v7=True)
    assert b"ustar" not in v7
    (tmp_path / "old").write_bytes(v7)
    (tmp_path / "old.gz").write_bytes(gzip.compress(v7))
    assert archive_format(tmp_path / "old") == "tar"
    assert archive_format(tmp_path / "old.gz") == "tar.gz"
    damaged = bytearray(v7)
    damaged[100] ^= 0x01  # one bit of the mode field: the checksum no longer adds up
    (tmp_path / "damaged").write_bytes(bytes(damaged))
    assert archive_format(tmp_path / "damaged") is None
    root = stage(tmp_path / "old.gz", tmp_path / "out", progress=False)
    assert_staged(root, "tar")


def test_layers_inside_layers_and_what_is_no_archive(tmp_path: Path) -> None:
    cases = {
        "zip-on-the-wire.zip": (gzip.compress(zip_bytes()), "zip.gz"),
        "targz-on-the-wire.tar.gz": (gzip.compress(gzip.compress(tar_bytes())), "tar.gz.gz"),
        "self-extractor.exe": (b"#!/bin/sh\nexit 0\n" * 40 + zip_bytes(), "zip"),
        "notes.txt.bz2": (bz2.compress(CSV), "bz2"),
        "notes.txt.xz": (lzma.compress(CSV), "xz"),
        "page.tar.gz": (b"<!DOCTYPE html><html><body>Sign in</body></html>", None),
        "plain.gz": (CSV, None),
        "empty.zip": (b"", None),
    }
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert archive_format(tmp_path / name) == expected, name
    assert archive_format(tmp_path) is None


# -- misnamed local files through stage() --------------------------------------------------------------


def test_misnamed_local_files_stage_as_what_they_are(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "zip-named.tar.gz").write_bytes(zip_bytes())
    (src / "targz-named.zip").write_bytes(gzip.compress(tar_bytes()))
    (src / "decoded.tar.gz").write_bytes(tar_bytes())
    for name in ("zip-named.tar.gz", "targz-named.zip", "decoded.tar.gz"):
        assert_staged(stage(src / name, tmp_path / "out", progress=False), "zip")
    (src / "readme").write_bytes(gzip.compress(CSV))
    root = stage(src / "readme", tmp_path / "out", progress=False)
    assert files_under(root) == {"readme": CSV}
    # A .gz that is no gzip (it arrived decoded) is just the file, under its name without .gz.
    (src / "table.csv.gz").write_bytes(CSV)
    assert files_under(stage(src / "table.csv.gz", tmp_path / "out", progress=False)) == {"table.csv": CSV}
    kept = stage(src / "table.csv.gz", tmp_path / "kept", extract=False, progress=False)
    assert files_under(kept) == {"table.csv.gz": CSV}


def test_formats_built_on_zip_are_copied_whole(tmp_path: Path) -> None:
    import numpy as np
    import torch

    src = tmp_path / "src"
    src.mkdir()
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(weights, src / "model.pt")
    np.savez(src / "arrays.npz", a=np.arange(4))
    assert archive_format(src / "model.pt") == "zip"  # its bytes are a zip, yet it is one file to its user
    staged = stage(src / "model.pt", tmp_path / "out", progress=False)
    assert files_under(staged) == {"model.pt": (src / "model.pt").read_bytes()}
    assert torch.equal(torch.load(staged / "model.pt", weights_only=True)["w"], weights["w"])
    assert files_under(stage(src / "arrays.npz", tmp_path / "out", progress=False)) == {
        "arrays.npz": (src / "arrays.npz").read_bytes()
    }
    opened = stage(src / "model.pt", tmp_path / "opened", extract=True, progress=False)  # asked for: extracted
    assert any(name.endswith("data.pkl") for name in files_under(opened))


def test_an_archive_name_over_other_bytes_says_what_arrived_and_the_fix(tmp_path: Path) -> None:
    page = tmp_path / "flowers.zip"
    page.write_bytes(b"<!DOCTYPE html>\n<html><head><title>Sign in - Google Accounts</title></head></html>")
    with pytest.raises(ArgumentError) as caught:
        stage(page, tmp_path / "out", progress=False)
    message = str(caught.value)
    assert str(page) in message and "HTML page" in message and "Sign in" in message
    assert "extract=False" in message
    assert not (tmp_path / "out" / "flowers").exists()
    kept = stage(page, tmp_path / "out", extract=False, progress=False)
    assert files_under(kept) == {"flowers.zip": page.read_bytes()}
    junk = tmp_path / "weights.tar.gz"
    junk.write_bytes(bytes(range(200, 256)) * 10)
    with pytest.raises(ArgumentError, match=r"weights\.tar\.gz.*first bytes are c8 c9 ca"):
        stage(junk, tmp_path / "out", progress=False)


# -- a real HTTP server -----------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[Server]:
    with Server() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "sleep", lambda seconds: None)


def _decoded(data: bytes, kind: str) -> bytes:
    outer = kind.rpartition(".")[2]
    if outer == "zst":
        return bytes(pytest.importorskip("zstandard").ZstdDecompressor().decompress(data))
    decompress: Callable[[bytes], bytes] = {"gz": gzip.decompress, "bz2": bz2.decompress, "xz": lzma.decompress}[outer]
    return decompress(data)


def _sendings(kind: str) -> list[str]:
    ways = ["plain", "gzip-on-the-wire"]
    if kind.rpartition(".")[2] in ("gz", "bz2", "xz", "zst"):
        ways.append("already-decoded")
    if kind.endswith("gz"):
        ways += ["apache-x-gzip", "apache-gzip"]
    return ways


@pytest.mark.parametrize(("kind", "sending"), [(kind, way) for kind in KINDS for way in _sendings(kind)])
def test_every_kind_stages_alike_however_the_server_sends_it(
    tmp_path: Path, server: Server, kind: str, sending: str
) -> None:
    name, build = KINDS[kind]
    data = build()
    headers = {"Content-Type": "application/octet-stream"}
    if sending == "gzip-on-the-wire":
        data = gzip.compress(data)
        headers["Content-Encoding"] = "gzip"
    elif sending == "already-decoded":
        data = _decoded(data, kind)
    elif sending.startswith("apache-"):
        # mod_mime: the type from the inner suffix, the encoding from .gz, the stored bytes as they are.
        headers = {"Content-Type": "application/x-tar" if kind == "tar.gz" else "text/csv"}
        headers["Content-Encoding"] = sending.removeprefix("apache-")
    server.files[f"/files/{name}"] = data
    server.headers[f"/files/{name}"] = headers
    root = stage(f"{server.url}/files/{name}", tmp_path, progress=False)
    assert_staged(root, kind)
    assert server.requests[-1]["Accept-Encoding"] == "identity"


def test_an_html_page_in_place_of_an_archive_names_the_url(tmp_path: Path, server: Server) -> None:
    page = b"<html><body>Too many users have viewed or downloaded this file recently</body></html>"
    server.files["/d/data.tar.gz"] = page
    server.headers["/d/data.tar.gz"] = {"Content-Type": "text/html"}
    url = f"{server.url}/d/data.tar.gz"
    with pytest.raises(ArgumentError, match=r"data\.tar\.gz.*HTML page.*Too many users.*extract=False") as caught:
        stage(url, tmp_path, progress=False)
    assert url in str(caught.value)


def test_an_encoding_that_bytes_cannot_tell_is_refused_by_name(tmp_path: Path, server: Server) -> None:
    server.files["/d/data.zip"] = zlib.compress(zip_bytes())
    server.headers["/d/data.zip"] = {"Content-Encoding": "deflate"}
    with pytest.raises(DownloadError, match=r"data\.zip.*Content-Encoding: deflate.*curl --compressed"):
        stage(f"{server.url}/d/data.zip", tmp_path, progress=False)
    assert not (tmp_path / "data").exists()


# -- Drive, a Drive link and a bucket go through the same detection ----------------------------------------


def test_drive_paths_links_and_buckets_are_told_by_their_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_colab():
        from colabkit.drive import mount_drive

        on_drive = mount_drive() / "datasets" / "digits.tar.gz"
        on_drive.parent.mkdir(parents=True)
        on_drive.write_bytes(tar_bytes())  # a decoded download saved under the server's name
        assert_staged(stage(on_drive, tmp_path / "drive", progress=False), "tar")

    def download(**options: Any) -> str:
        # gdown streams through requests, which undoes Content-Encoding: the tar arrives decoded.
        path = Path(options["output"]) / "digits.tar.gz"
        path.write_bytes(tar_bytes())
        return str(path)

    monkeypatch.setattr(sources, "gdown_module", lambda: types.SimpleNamespace(download=download))
    assert_staged(stage("1AbCdEfGhIjKlMnOpQrStUvWxYz012345", tmp_path / "link", progress=False), "tar")

    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    memory.pipe("/bucket/digits.zip", gzip.compress(tar_bytes()))
    try:
        assert_staged(stage("memory://bucket/digits.zip", tmp_path / "bucket", progress=False), "tar.gz")
    finally:
        memory.rm("/bucket", recursive=True)


def test_staging_a_misnamed_archive_leaves_no_scratch(tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(gzip.compress(zip_bytes()))
    assert_staged(stage(src, tmp_path / "out", progress=False), "zip")
    assert sorted(os.listdir(tmp_path / "out")) == ["a.bin"]
