"""Every library error is a ColabkitError and the built-in a caller would catch."""

from __future__ import annotations

import errno
import importlib
import pkgutil

import pytest

import colabkit
from colabkit import errors


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.ArgumentError, ValueError),
        (errors.MissingDependencyError, ImportError),
        (errors.PlatformError, RuntimeError),
        (errors.DeviceError, RuntimeError),
        (errors.ColabkitIOError, OSError),
        (errors.DriveError, OSError),
        (errors.InsufficientSpaceError, OSError),
        (errors.DownloadError, OSError),
        (errors.CheckpointError, OSError),
        (errors.CheckpointInUseError, OSError),
        (errors.ChecksumError, ValueError),
        (errors.UnsafeArchiveError, ValueError),
        (errors.ImageDecodeError, ValueError),
        (errors.CheckpointNotFoundError, FileNotFoundError),
        (errors.CheckpointMismatchError, ValueError),
        (errors.PathNotFoundError, FileNotFoundError),
        (errors.MagicUsageError, ValueError),
        (errors.ExportError, RuntimeError),
        (errors.ExportMismatchError, ValueError),
        (errors.TrainingError, RuntimeError),
        (errors.NonFiniteLossError, RuntimeError),
        (errors.OutOfMemoryBackoffError, RuntimeError),
    ],
)
def test_hierarchy(cls: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(cls, errors.ColabkitError)
    assert issubclass(cls, builtin)
    with pytest.raises(builtin):
        raise cls("boom")


def test_io_errors_keep_errno() -> None:
    exc = errors.InsufficientSpaceError(errno.ENOSPC, "no room")
    assert exc.errno == errno.ENOSPC
    assert "no room" in str(exc)


def test_missing_dependency_names_the_pip_command() -> None:
    exc = errors.missing_dependency("matplotlib", "plot", purpose="History.plot()")
    assert isinstance(exc, ImportError)
    assert "pip install matplotlib" in str(exc)
    assert "History.plot()" in str(exc)
    assert "'plot' extra" in str(exc)


def test_all_is_complete() -> None:
    public = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, (Exception, Warning)) and value.__module__ == errors.__name__
    }
    assert public <= set(errors.__all__)


def _all_modules() -> list[str]:
    # __main__ runs the command line when imported.
    return [
        i.name for i in pkgutil.walk_packages(colabkit.__path__, prefix="colabkit.") if i.name != "colabkit.__main__"
    ]


def test_every_exception_class_lives_in_errors() -> None:
    names = _all_modules()
    assert "colabkit.checkpoint.store" in names and "colabkit.train.loop" in names  # the walk reaches subpackages
    outside = []
    for name in names:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, (BaseException, Warning))
                and value.__module__ == name
                and name != errors.__name__
            ):
                outside.append(f"{name}.{attr}")
    assert outside == [], f"exception classes defined outside colabkit/errors.py: {outside}"


def test_moved_errors_are_still_importable_where_users_import_them() -> None:
    from colabkit import inference, session

    assert inference.ExportError is errors.ExportError
    assert inference.ExportMismatchError is errors.ExportMismatchError
    assert session.PathNotFoundError is errors.PathNotFoundError
