"""Sources: a real HTTP server on 127.0.0.1, moto's S3 server, gdown faked through its seam."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _http_server import Server

from colabkit.data import sources
from colabkit.data.stage import stage
from colabkit.display import use_screen
from colabkit.errors import ChecksumError, DownloadError, MissingDependencyError
from colabkit.testing import FakeScreen


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


MEMBERS = {f"digits/{d}/{i}.txt": f"{d}-{i}".encode() * 200 for d in range(3) for i in range(20)}
PAYLOAD = zip_bytes(MEMBERS)


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "sleep", lambda seconds: None)


@pytest.fixture
def server() -> Iterator[Server]:
    with Server() as srv:
        yield srv


def test_http_zip_is_downloaded_and_extracted(tmp_path: Path, server: Server) -> None:
    server.files["/data/digits.zip"] = PAYLOAD
    root = stage(server.url + "/data/digits.zip", tmp_path, progress=False)
    assert root == tmp_path / "digits" / "digits"
    assert (root / "2" / "19.txt").read_bytes() == MEMBERS["digits/2/19.txt"]
    assert not (tmp_path / ".colabkit-downloads").exists()
    count = len(server.requests)
    assert stage(server.url + "/data/digits.zip", tmp_path, progress=False) == root
    assert len(server.requests) == count  # the re-run asks nothing of the network


def test_interrupted_download_resumes_with_a_range_request(tmp_path: Path, server: Server) -> None:
    server.files["/digits.zip"] = PAYLOAD
    server.cut = 1
    root = stage(server.url + "/digits.zip", tmp_path, progress=False, sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert (root / "0" / "0.txt").read_bytes() == MEMBERS["digits/0/0.txt"]
    assert server.requests[0].get("Range") is None
    assert server.requests[1]["Range"] == f"bytes={len(PAYLOAD) // 2}-"
    assert server.requests[1]["If-Range"] == '"v1"'


def test_download_resumes_across_calls(tmp_path: Path, server: Server) -> None:
    server.files["/digits.zip"] = PAYLOAD
    server.cut = 5
    with pytest.raises(DownloadError, match="partial file is kept"):
        stage(server.url + "/digits.zip", tmp_path, retries=0, progress=False)
    assert not (tmp_path / "digits").exists()
    parts = list((tmp_path / ".colabkit-downloads").glob("*.part"))
    assert [p.stat().st_size for p in parts] == [len(PAYLOAD) // 2]
    server.cut = 0
    root = stage(server.url + "/digits.zip", tmp_path, progress=False)
    assert server.requests[-1]["Range"] == f"bytes={len(PAYLOAD) // 2}-"
    assert (root / "1" / "5.txt").read_bytes() == MEMBERS["digits/1/5.txt"]
    assert not (tmp_path / ".colabkit-downloads").exists()


def test_partial_download_of_a_changed_file_is_not_spliced(tmp_path: Path, server: Server) -> None:
    server.files["/digits.zip"] = PAYLOAD
    server.cut = 5
    with pytest.raises(DownloadError):
        stage(server.url + "/digits.zip", tmp_path, retries=0, progress=False)
    new_payload = zip_bytes({"digits/new.txt": b"fresh" * 100})
    server.files["/digits.zip"] = new_payload
    server.etag = '"v2"'
    server.cut = 0
    root = stage(server.url + "/digits.zip", tmp_path, progress=False)
    assert server.requests[-1]["If-Range"] == '"v1"'  # asked to resume v1; the server sent v2 whole
    assert sorted(p.name for p in root.iterdir()) == ["new.txt"]
    assert (root / "new.txt").read_bytes() == b"fresh" * 100


def test_checksum_mismatch_deletes_the_download(
    tmp_path: Path, server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    server.files["/digits.zip"] = PAYLOAD
    with pytest.raises(ChecksumError, match=r"md5 is [0-9a-f]{32}, expected 0{32}.*copy was deleted"):
        stage(server.url + "/digits.zip", tmp_path, md5="0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []  # no partial download kept, nothing published
    assert capsys.readouterr().err == ""  # progress=False: no download bar
    with use_screen(FakeScreen("terminal")) as terminal:
        root = stage(server.url + "/digits.zip", tmp_path, md5=hashlib.md5(PAYLOAD).hexdigest(), progress=True)
    assert (root / "0" / "1.txt").read_bytes() == MEMBERS["digits/0/1.txt"]
    assert "download digits.zip" in terminal.stderr.getvalue()


def test_http_errors_are_clear(tmp_path: Path, server: Server) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        stage(server.url + "/missing.zip", tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_plain_file_url_keeps_its_name(tmp_path: Path, server: Server) -> None:
    server.files["/labels.csv"] = b"a,b\n1,2\n"
    root = stage(server.url + "/labels.csv", tmp_path, progress=False)
    assert root == tmp_path / "labels.csv"
    assert (root / "labels.csv").read_bytes() == b"a,b\n1,2\n"


# -- gdown through the seam ------------------------------------------------------------------------


class FakeGdown(types.SimpleNamespace):
    """Records calls and writes files like gdown would (signature of gdown 6.x)."""

    def __init__(self, files: dict[str, tuple[str, bytes]], error: BaseException | None = None) -> None:
        class FileURLRetrievalError(Exception):
            pass

        super().__init__(calls=[], files=files, error=error)
        self.exceptions = types.SimpleNamespace(FileURLRetrievalError=FileURLRetrievalError)
        self.FileURLRetrievalError = FileURLRetrievalError

    def download(
        self,
        url: str | None = None,
        output: str | None = None,
        quiet: bool = False,
        id: str | None = None,
        resume: bool = False,
    ) -> str:
        self.calls.append(("download", id, output, resume))
        if self.error is not None:
            raise self.error
        name, data = self.files[id or ""]
        assert output is not None and output.endswith(os.sep)
        target = Path(output) / name
        target.write_bytes(data)
        return str(target)

    def download_folder(
        self,
        url: str | None = None,
        id: str | None = None,
        output: str | None = None,
        quiet: bool = False,
        resume: bool = False,
    ) -> list[str]:
        self.calls.append(("download_folder", id, output, resume))
        if self.error is not None:
            Path(output or ".", "half.txt").write_bytes(b"partial")
            raise self.error
        written = []
        for name, data in self.files.values():
            target = Path(output or ".") / "class" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            written.append(str(target))
        return written


FILE_ID = "1AbCdEfGhIjKlMnOpQrStUvWxYz012345"


@pytest.mark.parametrize(
    "link",
    [
        FILE_ID,
        f"https://drive.google.com/file/d/{FILE_ID}/view?usp=sharing",
        f"https://drive.google.com/open?id={FILE_ID}",
        f"https://drive.google.com/uc?id={FILE_ID}&export=download",
    ],
)
def test_gdrive_file_links_go_through_gdown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, link: str) -> None:
    fake = FakeGdown({FILE_ID: ("digits.zip", PAYLOAD)})
    monkeypatch.setattr(sources, "gdown_module", lambda: fake)
    root = stage(link, tmp_path, progress=False)
    assert root == tmp_path / FILE_ID / "digits"
    assert (root / "0" / "3.txt").read_bytes() == MEMBERS["digits/0/3.txt"]
    assert fake.calls[0][0:2] == ("download", FILE_ID) and fake.calls[0][3] is True
    assert stage(link, tmp_path, progress=False) == root and len(fake.calls) == 1
    assert not (tmp_path / ".colabkit-downloads").exists()


def test_gdrive_folder_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeGdown({"a": ("a.txt", b"A"), "b": ("b.txt", b"B")})
    monkeypatch.setattr(sources, "gdown_module", lambda: fake)
    link = f"https://drive.google.com/drive/folders/{FILE_ID}?usp=sharing"
    fake.error = fake.FileURLRetrievalError("Cannot retrieve the folder information from the link")
    with pytest.raises(DownloadError, match="Anyone with the link"):
        stage(link, tmp_path, name="f", progress=False)
    assert list(tmp_path.iterdir()) == []  # the half-downloaded folder is gone
    fake.error = None
    root = stage(link, tmp_path, name="f", progress=False)
    assert root == tmp_path / "f"
    assert (root / "class" / "b.txt").read_bytes() == b"B"
    assert sorted(os.listdir(tmp_path)) == ["f"]
    assert [call[0] for call in fake.calls] == ["download_folder", "download_folder"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Too many users have viewed or downloaded this file recently. Please try again later.", "copy of the file"),
        # gdown 6 wraps the page's message and indents it with tabs.
        (
            "Failed to retrieve file url:\n\n\tToo many\n\tusers have viewed or downloaded this file recently.\n\n"
            "You may still be able to access the file from the browser",
            "too many users have viewed or downloaded this file recently .*Fix: make a copy",
        ),
        ("Cannot retrieve the public link of the file. You may need to change the permission", "Anyone with the link"),
    ],
)
def test_gdown_errors_become_clear_colabkit_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    fake = FakeGdown({})
    fake.error = fake.FileURLRetrievalError(text)
    monkeypatch.setattr(sources, "gdown_module", lambda: fake)
    with pytest.raises(DownloadError, match=message):
        stage(FILE_ID, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # no dataset folder, no empty scratch folders


def test_gdown_returning_nothing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeGdown({})
    fake.download = lambda **kwargs: None  # gdown <= 4.7.1 printed "Access denied" and returned None
    monkeypatch.setattr(sources, "gdown_module", lambda: fake)
    with pytest.raises(DownloadError, match="Anyone with the link"):
        stage(f"https://drive.google.com/file/d/{FILE_ID}/view", tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_gdown_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "gdown", None)
    with pytest.raises(MissingDependencyError, match="pip install gdown"):
        sources.gdown_module()


def test_resolve_rejects_nonsense_and_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing exists"):
        sources.resolve(str(tmp_path / "nope.zip"))
    with pytest.raises(ValueError, match="pass a path"):
        sources.resolve("")
    assert isinstance(sources.resolve("s3://bucket/key.zip"), sources.FsspecSource)
    assert isinstance(sources.resolve("https://example.com/a.zip"), sources.HttpSource)
    assert sources.parse_gdrive("https://example.com/file/d/x") is None


# -- s3:// through fsspec against moto's server ------------------------------------------------------


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import boto3
    import fsspec

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(
        fsspec.config.conf, "s3", {"client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True}
    )
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="datasets")
    client.put_object(Bucket="datasets", Key="mnist/digits.zip", Body=PAYLOAD)
    client.put_object(Bucket="datasets", Key="folder/a/x.txt", Body=b"X")
    client.put_object(Bucket="datasets", Key="folder/b.txt", Body=b"B")
    try:
        yield endpoint
    finally:
        server.stop()
        with contextlib.suppress(Exception):
            fsspec.filesystem("s3").clear_instance_cache()


def test_s3_archive_and_folder(tmp_path: Path, s3: str) -> None:
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    root = stage("s3://datasets/mnist/digits.zip", tmp_path, sha256=sha, progress=False)
    assert root == tmp_path / "digits" / "digits"
    assert (root / "2" / "7.txt").read_bytes() == MEMBERS["digits/2/7.txt"]
    folder = stage("s3://datasets/folder", tmp_path, progress=False)
    assert (folder / "a" / "x.txt").read_bytes() == b"X"
    assert (folder / "b.txt").read_bytes() == b"B"
    with pytest.raises(DownloadError, match="does not exist"):
        stage("s3://datasets/nothing.zip", tmp_path, progress=False)


def test_missing_fsspec_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "fsspec", None)
    with pytest.raises(MissingDependencyError, match="'remote' extra"):
        stage("gs://bucket/data.zip", tmp_path, progress=False)


def test_missing_bucket_backend_names_its_package(tmp_path: Path) -> None:
    pytest.importorskip("fsspec")
    if __import__("importlib").util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed")
    with pytest.raises(MissingDependencyError, match=r"pip install gcsfs.*|'gcsfs'.*'remote' extra"):
        stage("gs://bucket/data.zip", tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_file_on_any_fuse_mount_is_copied_off_before_extraction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from colabkit import _io, drive

    bucket = tmp_path / "gcs bucket"
    bucket.mkdir()
    src = bucket / "ds.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("ds/a.txt", b"a" * 1000)
    table = f"/dev/sda1 / ext4 rw 0 0\ngcsfuse {str(bucket).replace(' ', chr(92) + '040')} fuse.gcsfuse rw 0 0\n"
    monkeypatch.setattr(drive, "_mount_table", lambda: table)
    assert drive.mount_type(src) == "fuse.gcsfuse"
    assert drive.mount_type(tmp_path / "elsewhere") == "ext4"
    assert sources.is_remote_path(src) and not sources.is_remote_path(tmp_path / "local.zip")
    reads: list[int] = []
    real = _io.ops.copy_chunk
    monkeypatch.setattr(_io.ops, "copy_chunk", lambda handle, size: reads.append(size) or real(handle, size))
    root = stage(src, tmp_path / "data", progress=False)
    assert (root / "a.txt").read_bytes() == b"a" * 1000
    assert reads  # the archive was copied to local disk first, through the file-ops seam
    assert sorted(os.listdir(tmp_path / "data")) == ["ds"]  # and the copy is gone
