"""Where am I running? The :class:`Runtime` record and its detection.

Detection reads only what a :class:`Probe` hands it (environment mapping,
path checks, the IPython getter, the clock, the GPU query), so every input can
be replaced in tests; :mod:`colabkit.testing` does exactly that. Nothing is
probed at import time.

Order matters: Kaggle's image is built on Colab's and sets
``COLAB_RELEASE_TAG``, and ``google.colab`` is importable there, so Kaggle is
checked first. Hosted Colab is told by ``/var/colab/hostname``, the file
``google.colab.drive.mount`` itself requires: Colab's local-runtime image (and
Kaggle's image run on one's own machine) sets ``COLAB_RELEASE_TAG`` and runs
Colab's kernel class without it, and there Drive cannot be mounted, so such a
runtime is plain ``jupyter`` (or ``script``) and gets the local stand-in Drive.
Kaggle's TPU image is built from ``python:3.12``, not from Colab's, and is
told by ``ISTPUVM`` / ``TPU_PROCESS_ADDRESSES``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from colabkit.errors import ArgumentError

__all__ = ["GpuInfo", "Probe", "Runtime", "current_probe", "headless", "read_mount_table", "runtime", "use_probe"]

RuntimeKind = Literal["colab", "kaggle", "jupyter", "script"]
Accelerator = Literal["cuda", "mps", "tpu", "cpu"]

SESSION_LIMITS = {"colab": timedelta(hours=12), "kaggle": timedelta(hours=12)}
KAGGLE_TPU_LIMIT = timedelta(hours=9)
#: First components of the platform paths a fake relocates (/content/..., /kaggle/...).
PLATFORM_TOPS = (("content",), ("kaggle",))
# ISTPUVM and TPU_PROCESS_ADDRESSES are what Kaggle's TPU VM image sets (its tpu/Dockerfile).
_TPU_ENV = (
    "ISTPUVM",
    "TPU_PROCESS_ADDRESSES",
    "TPU_NAME",
    "TPU_ACCELERATOR_TYPE",
    "COLAB_TPU_ADDR",
    "XRT_TPU_CONFIG",
    "TPU_WORKER_ID",
)


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    """One visible GPU.

    Attributes:
        name: Marketing name, e.g. ``"Tesla T4"``.
        memory: Total memory in bytes.
        capability: CUDA compute capability as ``(major, minor)``, e.g. ``(7, 5)``.
    """

    name: str
    memory: int
    capability: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What this process runs on. Obtain it with :func:`runtime`.

    Attributes:
        kind: ``"colab"``, ``"kaggle"``, ``"jupyter"`` or ``"script"``.
        enterprise: True on Colab Enterprise (Vertex AI), where Drive cannot be mounted.
        accelerator: ``"cuda"``, ``"mps"``, ``"tpu"`` or ``"cpu"``: what the machine offers
            (:func:`colabkit.get_device` checks it really computes).
        gpus: One :class:`GpuInfo` per visible GPU.
        data_dir: Fast local disk for datasets (``/content/data`` on Colab,
            ``/kaggle/temp`` or ``/tmp`` on Kaggle, a cache folder elsewhere).
        work_dir: Where results normally go (``/content``, ``/kaggle/working``, the cwd).
        drive_mountpoint: Where Google Drive is (or would be) mounted; off Colab the
            folder that stands in for it.
        session_start: When the runtime (container) started, if known.
        session_limit: The platform's hard session cap, or None when there is none.
        in_notebook: True inside a Jupyter/IPython kernel.
        root: Prefix of every platform path; ``/`` except under :mod:`colabkit.testing` fakes.
        headless: True on Colab when no browser tab is attached: the code was sent by
            Google's ``colab`` command line (``colab run script.py``, or ``colab exec`` with
            ``--env COLABKIT_HEADLESS=1``). Then there are no widgets, nothing can ask the
            browser for Drive authorisation, and the VM may be torn down as the script ends.
    """

    kind: RuntimeKind
    accelerator: Accelerator
    gpus: tuple[GpuInfo, ...]
    data_dir: Path
    work_dir: Path
    drive_mountpoint: Path
    session_start: datetime | None
    session_limit: timedelta | None
    in_notebook: bool
    enterprise: bool = False
    root: Path = Path("/")
    headless: bool = False

    @property
    def gpu_count(self) -> int:
        """Number of visible GPUs."""
        return len(self.gpus)

    @property
    def gpu_names(self) -> tuple[str, ...]:
        """Names of the visible GPUs."""
        return tuple(gpu.name for gpu in self.gpus)

    @property
    def gpu_memory(self) -> tuple[int, ...]:
        """Total memory of each GPU in bytes."""
        return tuple(gpu.memory for gpu in self.gpus)

    @property
    def gpu_capability(self) -> tuple[tuple[int, int], ...]:
        """Compute capability of each GPU."""
        return tuple(gpu.capability for gpu in self.gpus)

    @property
    def session_deadline(self) -> datetime | None:
        """When the platform will end the session, if both start and limit are known."""
        if self.session_start is None or self.session_limit is None:
            return None
        return self.session_start + self.session_limit

    @property
    def is_hosted(self) -> bool:
        """True on Colab or Kaggle."""
        return self.kind in ("colab", "kaggle")

    def host_path(self, path: str | os.PathLike[str]) -> Path:
        """Map a platform path such as ``/content/drive`` onto this runtime's root.

        Identity on a real machine; under a fake, paths below ``/content`` and
        ``/kaggle`` land inside the fake's folder, so code written for Colab paths
        runs unchanged in tests. Other paths (``/tmp/x``, the fake's own folder) are kept.
        """
        p = Path(path)
        if self.root == Path("/") or not p.is_absolute() or p.parts[1:2] not in PLATFORM_TOPS:
            return p  # a real machine, or an ordinary path such as /tmp/x
        return self.root.joinpath(*p.parts[1:])


def _get_ipython() -> object | None:
    # Never import IPython just to probe: only ask it if the process already loaded it.
    module = sys.modules.get("IPython")
    getter = getattr(module, "get_ipython", None)
    return getter() if callable(getter) else None


def _container_start() -> datetime | None:
    """Start of PID 1 (the container), else system boot: both err on the early side."""
    try:
        btime = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    try:
        # Field 22 of /proc/1/stat is the start time in clock ticks after boot;
        # split after the ")" because the command name may contain spaces.
        fields = Path("/proc/1/stat").read_text().rsplit(")", 1)[1].split()
        started = btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        started = btime
    return datetime.fromtimestamp(started, tz=timezone.utc)


def _nvidia_smi() -> tuple[GpuInfo, ...] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = []
    for line in out.strip().splitlines():
        try:
            name, mem, cap = (part.strip() for part in line.split(","))
            major, minor = cap.split(".")
            gpus.append(GpuInfo(name, int(float(mem)) * 1024 * 1024, (int(major), int(minor))))
        except ValueError:
            continue
    return tuple(gpus)


def _torch_gpus() -> tuple[GpuInfo, ...]:
    # Without nvidia-smi there is no NVIDIA driver worth asking about; importing
    # torch (seconds) only to learn that would slow every path question down.
    torch = sys.modules.get("torch")
    if torch is None:
        return ()
    if not torch.cuda.is_available():
        return ()
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(GpuInfo(props.name, int(props.total_memory), (props.major, props.minor)))
    return tuple(gpus)


@functools.lru_cache(maxsize=1)
def _probe_gpus() -> tuple[GpuInfo, ...]:
    # nvidia-smi first: it does not initialise CUDA in this process, which would
    # break fork-based DataLoader workers and notebook launchers later.
    found = _nvidia_smi()
    return found if found is not None else _torch_gpus()


def read_mount_table() -> str | None:
    """The text of ``/proc/mounts``, or None where it cannot be read (the default :attr:`Probe.mounts`)."""
    try:
        return Path("/proc/mounts").read_text(errors="replace")  # odd bytes in a path must not break this
    except OSError:
        return None


def _mps_available() -> bool:
    if sys.platform != "darwin":
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.backends.mps.is_available())


@dataclasses.dataclass(frozen=True)
class Probe:
    """Every input runtime detection reads; replace any of them in tests.

    Attributes:
        environ: Environment variables.
        exists: Tells whether a platform path exists (called with absolute paths like
            ``/var/colab/hostname``; already mapped onto ``root``).
        ipython: Returns the running IPython shell or None.
        now: The current time (timezone-aware).
        session_start: Returns the container start time, or None.
        gpus: Returns the visible GPUs.
        mps: Tells whether Apple's MPS backend is available.
        mounts: Returns the mount table as ``/proc/mounts`` writes it (None: unreadable);
            :mod:`colabkit.drive` reads Drive's FUSE mounts from it.
        root: Prefix for platform paths (``/content``, ``/kaggle``...).
        argv: Returns the process's ``sys.argv`` (``colab run`` sets it to the script's).
    """

    environ: Mapping[str, str] = dataclasses.field(default_factory=lambda: os.environ)
    exists: Callable[[str], bool] = os.path.exists
    ipython: Callable[[], object | None] = _get_ipython
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)
    session_start: Callable[[], datetime | None] = _container_start
    gpus: Callable[[], tuple[GpuInfo, ...]] = _probe_gpus
    mps: Callable[[], bool] = _mps_available
    mounts: Callable[[], str | None] = read_mount_table
    root: Path = Path("/")
    argv: Callable[[], Sequence[str]] = lambda: sys.argv

    def path(self, platform_path: str) -> Path:
        """``/content`` mapped onto :attr:`root`."""
        return self.root.joinpath(platform_path.lstrip("/")) if self.root != Path("/") else Path(platform_path)


_active: list[Probe] = []


@contextlib.contextmanager
def use_probe(probe: Probe) -> Iterator[Probe]:
    """Make :func:`runtime` read from ``probe`` inside the ``with`` block (nestable)."""
    _active.append(probe)
    try:
        yield probe
    finally:
        _active.remove(probe)


def current_probe() -> Probe:
    """The probe in force: the innermost :func:`use_probe`, else the real machine."""
    return _active[-1] if _active else Probe()


def _shell_kind(shell: object | None) -> str | None:
    if shell is None:
        return None
    cls = type(shell)
    where = f"{cls.__module__}.{cls.__name__}"
    if "google.colab" in where:
        return "colab"
    if "ZMQInteractiveShell" in where or "ipykernel" in where:
        return "jupyter"
    return "ipython"


def _detect_kind(probe: Probe, shell_kind: str | None) -> RuntimeKind:
    env = probe.environ
    if "KAGGLE_KERNEL_RUN_TYPE" in env or "KAGGLE_URL_BASE" in env or "KAGGLE_DATA_PROXY_URL" in env:
        return "kaggle"
    # Not COLAB_RELEASE_TAG nor Colab's shell class: the local-runtime image has both
    # and no hosted Drive (see the module docstring).
    if probe.exists(str(probe.path("/var/colab/hostname"))) or env.get("VERTEX_PRODUCT") == "COLAB_ENTERPRISE":
        return "colab"
    if shell_kind in ("jupyter", "colab"):
        return "jupyter"
    return "script"


def _headless(probe: Probe, shell_kind: str | None) -> bool:
    """Colab code sent by google-colab-cli rather than typed in a browser tab.

    ``colab run`` executes the script's text in the VM's Colab kernel after setting
    ``sys.argv = [<script name>, *args]``; a kernel the browser talks to keeps the argv
    of the launcher that started it (``.../colab_kernel_launcher.py -f <connection file>``).
    ``colab exec`` leaves argv alone, so it is told with ``--env COLABKIT_HEADLESS=1``.
    """
    flag = probe.environ.get("COLABKIT_HEADLESS", "").strip().lower()
    if flag in ("1", "true", "yes"):
        return True
    if flag in ("0", "false", "no") or shell_kind != "colab":
        return False
    argv = probe.argv()
    first = os.path.basename(argv[0]) if argv else ""
    return first.endswith(".py") and not first.endswith("_launcher.py")


def headless(*, probe: Probe | None = None) -> bool:
    """Whether this is Colab driven by google-colab-cli, no browser attached (:attr:`Runtime.headless`).

    Cheaper than :func:`runtime` (no GPU query): :mod:`colabkit.display` asks it for every screen.
    """
    probe = probe or current_probe()
    shell_kind = _shell_kind(probe.ipython())
    return _detect_kind(probe, shell_kind) == "colab" and _headless(probe, shell_kind)


def _is_tpu(probe: Probe) -> bool:
    return any(probe.environ.get(name) for name in _TPU_ENV) or probe.exists(str(probe.path("/dev/accel0")))


def _session_hours(env: Mapping[str, str]) -> timedelta | None:
    raw = env.get("COLABKIT_SESSION_HOURS")
    if raw is None or raw.strip() == "":
        return None
    try:
        hours = float(raw)
    except ValueError:
        raise ArgumentError(
            f"COLABKIT_SESSION_HOURS={raw!r} is not a number of hours; set it to e.g. 12 or 24, or unset it"
        ) from None
    if hours <= 0:
        raise ArgumentError(f"COLABKIT_SESSION_HOURS={raw!r} must be positive; set it to e.g. 12, or unset it")
    return timedelta(hours=hours)


def _user_cache(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME", str(Path.home()))) / ".cache")
    return Path(base) / "colabkit"


def _kaggle_scratch(probe: Probe) -> Path:
    temp = probe.path("/kaggle/temp")
    try:
        temp.mkdir(parents=True, exist_ok=True)
    except OSError:
        # /kaggle/temp is a convention, not a promise; /tmp is always scratch.
        return probe.path("/tmp")
    return temp


def runtime(*, probe: Probe | None = None) -> Runtime:
    """Detect the runtime this process is in.

    Args:
        probe: Inputs to read; default: the real machine, or the active
            :mod:`colabkit.testing` fake.

    Returns:
        A frozen :class:`Runtime` record.

    Raises:
        ArgumentError: ``COLABKIT_SESSION_HOURS`` is set but not a positive number.

    Example:
        >>> import colabkit
        >>> colabkit.runtime().kind in ("colab", "kaggle", "jupyter", "script")
        True
    """
    probe = probe or current_probe()
    env = probe.environ
    shell_kind = _shell_kind(probe.ipython())
    kind = _detect_kind(probe, shell_kind)
    gpus = probe.gpus()
    tpu = _is_tpu(probe)
    accelerator: Accelerator = "cuda" if gpus else "tpu" if tpu else "mps" if probe.mps() else "cpu"

    if kind == "colab":
        data_dir, work_dir, drive = probe.path("/content/data"), probe.path("/content"), probe.path("/content/drive")
    elif kind == "kaggle":
        data_dir, work_dir = _kaggle_scratch(probe), probe.path("/kaggle/working")
        drive = work_dir / "colabkit_drive"
    else:
        data_dir = _user_cache(env) / "data"
        work_dir = Path.cwd()
        drive = work_dir / "colabkit_drive"
    if env.get("COLABKIT_DATA_DIR"):
        data_dir = Path(env["COLABKIT_DATA_DIR"])
    if env.get("COLABKIT_DRIVE_DIR") and kind != "colab":
        drive = Path(env["COLABKIT_DRIVE_DIR"])

    limit = _session_hours(env)
    if limit is None and kind in SESSION_LIMITS:
        limit = KAGGLE_TPU_LIMIT if kind == "kaggle" and tpu else SESSION_LIMITS[kind]
    start = probe.session_start() if kind in SESSION_LIMITS or limit is not None else None
    if start is None and limit is not None:
        # Unknown start: count from the first time anyone asked, the least wrong guess.
        start = _first_seen(probe.now)

    return Runtime(
        kind=kind,
        accelerator=accelerator,
        gpus=gpus,
        data_dir=data_dir,
        work_dir=work_dir,
        drive_mountpoint=drive,
        session_start=start,
        session_limit=limit,
        in_notebook=shell_kind in ("colab", "jupyter"),
        enterprise=env.get("VERTEX_PRODUCT") == "COLAB_ENTERPRISE",
        root=probe.root,
        headless=kind == "colab" and _headless(probe, shell_kind),
    )


_FIRST_SEEN: dict[str, datetime] = {}


def _first_seen(now: Callable[[], datetime]) -> datetime:
    return _FIRST_SEEN.setdefault("t", now())


def monotonic() -> float:
    """The clock seam for elapsed-time measurements."""
    return time.monotonic()
