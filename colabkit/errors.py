"""Errors and warnings raised by colabkit.

Every error derives from :class:`ColabkitError` and also from the built-in
exception a caller would naturally catch, so ``except ValueError`` keeps
working for code that does not know colabkit::

    ColabkitError
    ├── ArgumentError            (ValueError)     bad argument value
    │   └── MagicUsageError                       a %%cuda line could not be parsed
    ├── MissingDependencyError   (ImportError)    optional package absent
    ├── PlatformError            (RuntimeError)   wrong runtime for the call
    ├── DeviceError              (RuntimeError)   accelerator unusable
    ├── ColabkitIOError          (OSError)        file / disk / network trouble
    │   ├── DriveError                            Drive mount or transport failure
    │   │   └── DriveLostError                    errno 107 and no remount came in time
    │   ├── InsufficientSpaceError                not enough free disk
    │   ├── DownloadError                         URL / gdown / bucket fetch failed
    │   └── CheckpointError                       checkpoint write or read failed
    │       └── CheckpointInUseError              another run holds the folder's lease
    ├── ChecksumError            (ValueError)     data does not match its hash
    ├── UnsafeArchiveError       (ValueError)     archive member rejected
    ├── ImageDecodeError         (ValueError)     image files that could not be decoded
    ├── TransformNotTranslatedError (ValueError)  a transform step with no batched equivalent
    ├── CheckpointNotFoundError  (FileNotFoundError)
    ├── PathNotFoundError        (FileNotFoundError) a path given to colabkit does not exist
    ├── CheckpointMismatchError  (ValueError)     checkpoint is for another model
    ├── ExportError              (RuntimeError)   the exporter could not translate the model
    ├── ExportMismatchError      (ValueError)     the exported model computes something else
    └── TrainingError            (RuntimeError)
        ├── NonFiniteLossError                    loss became NaN or inf
        └── OutOfMemoryBackoffError               OOM back-off ran out of room

Warnings derive from :class:`ColabkitWarning` (a ``UserWarning``).
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "CheckpointError",
    "CheckpointInUseError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "ChecksumError",
    "ColabkitError",
    "ColabkitIOError",
    "ColabkitWarning",
    "DeviceError",
    "DownloadError",
    "DriveError",
    "DriveLostError",
    "ExportError",
    "ExportMismatchError",
    "ImageDecodeError",
    "InsufficientSpaceError",
    "MagicUsageError",
    "MissingDependencyError",
    "NonFiniteLossError",
    "OutOfMemoryBackoffError",
    "PathNotFoundError",
    "PlatformError",
    "TrainingError",
    "TransformNotTranslatedError",
    "UnsafeArchiveError",
    "missing_dependency",
]


class ColabkitError(Exception):
    """Base class of every error colabkit raises on purpose."""


class ArgumentError(ColabkitError, ValueError):
    """An argument has a value colabkit cannot use."""


class MissingDependencyError(ColabkitError, ImportError):
    """An optional package is needed for this call and is not installed."""


class PlatformError(ColabkitError, RuntimeError):
    """The call needs a runtime (Colab, Kaggle, ...) other than this one."""


class DeviceError(ColabkitError, RuntimeError):
    """The requested accelerator cannot be used."""


class ColabkitIOError(ColabkitError, OSError):
    """A file, disk or network operation failed."""


class DriveError(ColabkitIOError):
    """Google Drive could not be mounted, flushed or read."""


class DriveLostError(DriveError):
    """Drive's connection was lost (errno 107) and was not remounted in time.

    Raised on a background thread, which may not remount Drive itself; its
    ``errno`` is ``ENOTCONN``. The work can be retried once Drive is remounted
    (``colabkit.mount_drive(force_remount=True)`` on the main thread).
    """


class InsufficientSpaceError(ColabkitIOError):
    """There is not enough free disk space for the operation."""


class DownloadError(ColabkitIOError):
    """A URL, Drive link or bucket object could not be fetched."""


class CheckpointError(ColabkitIOError):
    """A checkpoint could not be written or read."""


class CheckpointInUseError(CheckpointError):
    """Another run holds the checkpoint folder's lease (or took it over from this one).

    Its ``errno`` is ``EBUSY``; the message names the holder and the ways forward.
    """


class MagicUsageError(ArgumentError):
    """A notebook magic's line (``%%cuda ...``) could not be understood; the message is its usage hint."""


class ChecksumError(ColabkitError, ValueError):
    """Data does not match the checksum it was promised to have."""


class UnsafeArchiveError(ColabkitError, ValueError):
    """An archive holds a member that extraction refuses to write."""


class ImageDecodeError(ColabkitError, ValueError):
    """Image files that could not be decoded; ``failures`` lists every one as (path, reason)."""

    def __init__(self, message: str, failures: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.failures = list(failures or [])


class CheckpointNotFoundError(ColabkitError, FileNotFoundError):
    """No usable checkpoint exists where one was asked for."""


class PathNotFoundError(ColabkitError, FileNotFoundError):
    """A path given to colabkit does not exist."""


class ExportError(ColabkitError, RuntimeError):
    """The exporter could not translate the model."""


class ExportMismatchError(ColabkitError, ValueError):
    """The exported model's outputs differ from the PyTorch model's beyond the tolerance."""


class CheckpointMismatchError(ColabkitError, ValueError):
    """A checkpoint does not fit the model or optimizer it is restored into."""


class TransformNotTranslatedError(ColabkitError, ValueError):
    """A transform step (or one of its options) has no batched equivalent; the message names it.

    fit() catches it and keeps the DataLoader path, quoting the message in its start notice.
    """


class TrainingError(ColabkitError, RuntimeError):
    """Training cannot continue."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite."""


class OutOfMemoryBackoffError(TrainingError):
    """CUDA ran out of memory even with a micro-batch of one."""


class ColabkitWarning(UserWarning):
    """Base class of colabkit's warnings."""


def missing_dependency(package: str, extra: str | None = None, *, purpose: str) -> MissingDependencyError:
    """Build the error for an absent optional package, naming the pip command.

    Args:
        package: The pip name of the missing package (``"matplotlib"``).
        extra: The colabkit extra that installs it (``"plot"``), if any.
        purpose: What the caller was trying to do, for the message.
    """
    # Not "pip install colabkit[extra]": the PyPI name belongs to another project.
    hint = f" (part of colabkit's '{extra}' extra)" if extra is not None else ""
    return MissingDependencyError(
        f"{purpose} needs the optional package {package!r}{hint}, which is not installed; run: pip install {package}"
    )
