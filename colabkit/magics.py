"""Notebook magics: ``%%cuda`` (compile and run a CUDA C/C++ cell) and ``%colabkit_info``.

Load them with ``%load_ext colabkit``. Then::

    %%cuda -a "-O2" -r "1024"
    #include <cstdio>
    __global__ void hello() { printf("hello from thread %d\\n", threadIdx.x); }
    int main(int argc, char **argv) {
        hello<<<1, 4>>>();
        cudaError_t err = cudaDeviceSynchronize();
        if (err != cudaSuccess) { fprintf(stderr, "CUDA error: %s\\n", cudaGetErrorString(err)); return 1; }
    }

The cell is written to ``cell.cu`` in a fresh temporary folder and compiled
with ``nvcc`` for the visible GPU's architecture (``-arch sm_XY`` from its
compute capability; nvcc's own default target when no GPU is visible or
nvcc cannot build for it). Compiler messages name ``cell.cu(LINE)`` with
LINE counted as the notebook shows it (the ``%%cuda`` line is line 1). The
program's stdout and stderr appear in the cell; a failing program or compile
is reported, never raised, so one bad cell does not stop a long notebook run.

This module imports nothing from IPython: the magics are registered as plain
functions. Seams for tests: :func:`_find_nvcc`, :func:`_gpu_capabilities`.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import functools
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from colabkit.errors import MagicUsageError

__all__ = ["CudaResult", "load_ipython_extension", "run_cuda_cell"]

USAGE = """usage: %%cuda [-a "NVCC FLAGS"] [-r "PROGRAM ARGS"]

Compile this cell's CUDA C/C++ with nvcc and run it.
  -a, --flags "..."   extra nvcc flags, e.g. -a "-O3 -lineinfo" (an -arch/-gencode here replaces colabkit's)
  -r, --args "..."    arguments for the program, e.g. -r "input.txt 10"
  -h, --help          show this help
"""

NO_NVCC = (
    "%%cuda: nvcc, the CUDA compiler, is not on PATH (nor in /usr/local/cuda/bin).\n"
    "  - Colab: every runtime ships it; if PATH lost it, run: import os; "
    "os.environ['PATH'] += ':/usr/local/cuda/bin'\n"
    "  - Kaggle or Linux with apt: !apt-get install -y nvidia-cuda-toolkit\n"
    "  - conda: conda install -c nvidia cuda-nvcc\n"
    "  - anywhere else: install the CUDA Toolkit from https://developer.nvidia.com/cuda-downloads "
    "and add its bin folder to PATH\n"
)

NO_GPU_HINT = (
    "no GPU is visible to this runtime, so CUDA calls fail (as above). On Colab: Runtime > Change runtime "
    "type > a GPU; on Kaggle: Settings > Accelerator > GPU. Code that only runs on the host works without one."
)

_ARCH_FLAGS = ("-arch", "--gpu-architecture", "-gencode", "--generate-code", "-code", "--gpu-code")
_CELL_FILE = "cell.cu"
# Kernel launches or CUDA runtime calls: what fails when no GPU is visible.
_USES_CUDA = re.compile(r"<<<|\bcuda[A-Z]")
_BINARY = "cell"


@dataclasses.dataclass(frozen=True)
class CudaResult:
    """What one ``%%cuda`` cell did.

    Attributes:
        compiled: Whether nvcc succeeded.
        returncode: The program's exit status (negative: killed by that signal), or None if it did not run.
        command: The nvcc command line (empty when nvcc was not found).
    """

    compiled: bool
    returncode: int | None
    command: tuple[str, ...] = ()


# -- seams ----------------------------------------------------------------------------------------
def _find_nvcc() -> str | None:
    """Path of nvcc: on PATH, else where CUDA toolkits usually live."""
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return str(fallback) if os.access(fallback, os.X_OK) else None


def _gpu_capabilities() -> tuple[tuple[int, int], ...]:
    """Compute capabilities of the visible GPUs (from colabkit.runtime)."""
    from colabkit.runtime import runtime

    return runtime().gpu_capability


@functools.lru_cache(maxsize=8)
def _supported_codes(nvcc: str) -> frozenset[str] | None:
    """The ``sm_XY`` targets this nvcc can build, or None when it cannot say (old nvcc)."""
    try:
        listed = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    codes = frozenset(word for word in listed.stdout.split() if word.startswith("sm_"))
    return codes or None


# -- pieces ---------------------------------------------------------------------------------------
def parse_line(line: str) -> tuple[list[str], list[str]]:
    """Split the ``%%cuda`` line into (nvcc flags, program arguments).

    Values may start with a dash (``-a "-O3"``), unlike with argparse.
    """
    try:
        tokens = shlex.split(line)
    except ValueError as exc:
        raise MagicUsageError(f"cannot parse the %%cuda line ({exc}); check the quotes") from None
    flags: list[str] = []
    args: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name, eq, inline = token.partition("=")
        if name in ("-h", "--help"):
            raise MagicUsageError("")
        if name in ("-a", "--flags", "-r", "--args"):
            if eq:
                value = inline
            elif i + 1 < len(tokens):
                i += 1
                value = tokens[i]
            else:
                raise MagicUsageError(f'{name} needs a value, e.g. {name} "..."')
            (flags if name in ("-a", "--flags") else args).extend(shlex.split(value))
        else:
            raise MagicUsageError(f"unknown option {token!r}")
        i += 1
    return flags, args


def arch_flags(
    nvcc: str, user_flags: Sequence[str], capabilities: Sequence[tuple[int, int]]
) -> tuple[list[str], str | None]:
    """nvcc target flags for the visible GPUs, and a notice when falling back to nvcc's default.

    Args:
        nvcc: The compiler (asked which targets it supports).
        user_flags: Flags from ``-a``; any target flag there wins.
        capabilities: Compute capabilities of the visible GPUs.
    """
    if any(flag.split("=")[0] in _ARCH_FLAGS for flag in user_flags):
        return [], None
    wanted = sorted({f"{major}{minor}" for major, minor in capabilities})
    if not wanted:
        return [], None  # no GPU: nvcc's default target; the program can still run host code
    supported = _supported_codes(nvcc)
    usable = [cc for cc in wanted if supported is None or f"sm_{cc}" in supported]
    missing = [cc for cc in wanted if cc not in usable]
    notice = None
    if missing:
        notice = (
            f"this nvcc cannot build for sm_{', sm_'.join(missing)} (the GPU's architecture); "
            f"{'using nvcc default target' if not usable else 'building only for sm_' + ', sm_'.join(usable)}, "
            "so kernels may fail with 'no kernel image is available'"
        )
    if not usable:
        return [], notice
    if len(usable) == 1:
        return ["-arch", f"sm_{usable[0]}"], notice
    return [f"-gencode=arch=compute_{cc},code=sm_{cc}" for cc in usable], notice


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"the program was killed by signal {signal.Signals(-code).name}"
        return f"the program was killed by signal {-code}"
    return f"the program exited with status {code}"


def _stream(process: subprocess.Popen[bytes], out: TextIO, err: TextIO) -> None:
    """Copy the child's stdout and stderr to ``out`` / ``err`` as they arrive (in this thread)."""
    assert process.stdout is not None and process.stderr is not None
    sinks = {
        process.stdout.fileno(): (out, codecs.getincrementaldecoder("utf-8")(errors="replace")),
        process.stderr.fileno(): (err, codecs.getincrementaldecoder("utf-8")(errors="replace")),
    }
    with selectors.DefaultSelector() as selector:
        for fd in sinks:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            for key, _ in selector.select():
                fd = key.fd
                sink, decoder = sinks[fd]
                chunk = os.read(fd, 65536)
                if not chunk:
                    selector.unregister(fd)
                    sink.write(decoder.decode(b"", final=True))
                else:
                    sink.write(decoder.decode(chunk))
                sink.flush()


def run_cuda_cell(line: str, cell: str, *, out: TextIO | None = None, err: TextIO | None = None) -> CudaResult:
    """Compile ``cell`` with nvcc and run it: the body of ``%%cuda``.

    Args:
        line: The options after ``%%cuda`` (``-a "flags"``, ``-r "args"``).
        cell: The CUDA C/C++ source.
        out: Where the program's stdout goes (default ``sys.stdout``).
        err: Where compiler messages, the program's stderr and notices go (default ``sys.stderr``).

    Returns:
        A :class:`CudaResult`. Failures are reported on ``err``, not raised.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        flags, args = parse_line(line)
    except MagicUsageError as exc:
        if str(exc):
            err.write(f"%%cuda: {exc}\n")
        err.write(USAGE)
        return CudaResult(compiled=False, returncode=None)
    nvcc = _find_nvcc()
    if nvcc is None:
        err.write(NO_NVCC)
        return CudaResult(compiled=False, returncode=None)
    capabilities = _gpu_capabilities()
    target, notice = arch_flags(nvcc, flags, capabilities)
    if notice:
        err.write(f"%%cuda: {notice}\n")
    workdir = Path(tempfile.mkdtemp(prefix="colabkit-cuda-"))
    try:
        # "#line 2" makes messages count lines as the notebook shows the cell,
        # whose first line is the %%cuda line itself.
        (workdir / _CELL_FILE).write_text(f'#line 2 "{_CELL_FILE}"\n{cell}\n', encoding="utf-8")
        command = (nvcc, *target, "-Wno-deprecated-gpu-targets", *flags, "-o", _BINARY, _CELL_FILE)
        compiled = subprocess.run(command, cwd=workdir, capture_output=True, check=False)
        messages = (compiled.stdout + compiled.stderr).decode("utf-8", errors="replace")
        if messages:
            err.write(messages if messages.endswith("\n") else messages + "\n")
        if compiled.returncode != 0:
            err.write(
                f"%%cuda: compilation failed (nvcc exit status {compiled.returncode}); "
                f"line numbers in {_CELL_FILE}(N) count the %%cuda line as line 1\n"
            )
            err.flush()
            return CudaResult(compiled=False, returncode=None, command=command)
        # printf into a pipe is block-buffered; stdbuf keeps lines appearing as printed
        # and stdout/stderr in order, as in a terminal.
        stdbuf = shutil.which("stdbuf")
        line_buffered = [stdbuf, "-oL", "-eL"] if stdbuf else []
        with subprocess.Popen(
            [*line_buffered, str(workdir / _BINARY), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        ) as process:
            try:
                _stream(process, out, err)
                code = process.wait()
            except BaseException:
                # Interrupting the cell stops the program too.
                process.kill()
                process.wait()
                raise
        if code != 0:
            err.write(f"%%cuda: {_describe_exit(code)}\n")
            if not capabilities and _USES_CUDA.search(cell):
                err.write(f"%%cuda: {NO_GPU_HINT}\n")
        out.flush()
        err.flush()
        return CudaResult(compiled=True, returncode=code, command=command)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- IPython glue ---------------------------------------------------------------------------------
def cuda(line: str, cell: str) -> None:
    """``%%cuda``: compile this cell's CUDA C/C++ with nvcc and run it (``%%cuda -h`` for options)."""
    run_cuda_cell(line, cell)


cuda.__doc__ = (cuda.__doc__ or "") + "\n\n" + USAGE


def colabkit_info(line: str = "") -> None:
    """``%colabkit_info``: print colabkit's summary of this runtime (platform, GPU, Drive, session)."""
    from colabkit.info import info

    info()


def load_ipython_extension(ipython: Any) -> None:
    """Register ``%%cuda`` and ``%colabkit_info`` with an IPython shell (``%load_ext colabkit``).

    Args:
        ipython: The running ``InteractiveShell``.
    """
    ipython.register_magic_function(cuda, magic_kind="cell", magic_name="cuda")
    ipython.register_magic_function(colabkit_info, magic_kind="line", magic_name="colabkit_info")
