from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from colabkit import magics
from colabkit.magics import arch_flags, load_ipython_extension, parse_line, run_cuda_cell

REPO = Path(__file__).resolve().parents[1]


# -- option parsing and target selection (no compiler needed) --------------------------------------
def test_parse_line_accepts_values_that_start_with_a_dash() -> None:
    assert parse_line("") == ([], [])
    assert parse_line('-a "-O3 -lineinfo" -r "in.txt 10"') == (["-O3", "-lineinfo"], ["in.txt", "10"])
    assert parse_line("--flags=-O2 --args='a b' -a -DX=1") == (["-O2", "-DX=1"], ["a", "b"])
    assert parse_line("-r \"'quoted arg' 2\"") == ([], ["quoted arg", "2"])


@pytest.mark.parametrize(
    ("line", "message"),
    [("-x", "unknown option '-x'"), ("-a", "-a needs a value"), ('-a "unclosed', "check the quotes"), ("-h", "")],
)
def test_bad_lines_print_usage_and_compile_nothing(line: str, message: str) -> None:
    err = io.StringIO()
    result = run_cuda_cell(line, "int main(){}", out=io.StringIO(), err=err)
    assert not result.compiled
    assert result.command == ()
    assert message in err.getvalue()
    assert 'usage: %%cuda [-a "NVCC FLAGS"]' in err.getvalue()


@pytest.fixture
def fake_nvcc(tmp_path: Path) -> Path:
    """An 'nvcc' that logs its arguments and builds a shell script from the cell's //! lines.

    ``//! exit 3`` in a cell makes the program exit 3, ``//! fail`` makes the compile fail.
    """
    log = tmp_path / "nvcc-args.txt"
    script = tmp_path / "bin" / "nvcc"
    script.parent.mkdir()
    script.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            if [ "$1" = "--list-gpu-code" ]; then echo sm_75 sm_80 sm_86; exit 0; fi
            printf '%s\\n' "$@" > {log}
            head -n 1 cell.cu >> {log}
            if grep -q '//! fail' cell.cu; then
                echo 'cell.cu(3): error: identifier "oops" is undefined' >&2
                exit 2
            fi
            echo 'cell.cu(4): warning: variable "x" was declared but never referenced' >&2
            {{ echo '#!/bin/sh'; echo 'echo "ran with $# args: $*"'; echo 'echo "to stderr" >&2';
              sed -n 's|^//! ||p' cell.cu; }} > cell
            chmod +x cell
            """
        )
    )
    script.chmod(0o755)
    return script


def test_arch_flags_follow_the_visible_gpu(fake_nvcc: Path) -> None:
    nvcc = str(fake_nvcc)
    assert arch_flags(nvcc, [], [(7, 5)]) == (["-arch", "sm_75"], None)
    assert arch_flags(nvcc, [], []) == ([], None)
    assert arch_flags(nvcc, ["-arch=sm_80"], [(7, 5)]) == ([], None)
    assert arch_flags(nvcc, ["-gencode", "arch=compute_80,code=sm_80"], [(7, 5)]) == ([], None)
    flags, notice = arch_flags(nvcc, [], [(7, 5), (8, 6)])
    assert flags == ["-gencode=arch=compute_75,code=sm_75", "-gencode=arch=compute_86,code=sm_86"]
    assert notice is None
    flags, notice = arch_flags(nvcc, [], [(6, 0)])  # a P100 with a CUDA 13 nvcc
    assert flags == []
    assert notice is not None
    assert "cannot build for sm_60" in notice
    assert "no kernel image" in notice


def test_cell_compiles_runs_and_shows_both_streams(fake_nvcc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(magics, "_find_nvcc", lambda: str(fake_nvcc))
    monkeypatch.setattr(magics, "_gpu_capabilities", lambda: ((7, 5),))
    out, err = io.StringIO(), io.StringIO()
    result = run_cuda_cell('-a "-O3 -DN=4" -r "x \'y z\'"', "int main() { return 0; }", out=out, err=err)
    assert result.compiled
    assert result.returncode == 0
    assert out.getvalue() == "ran with 2 args: x y z\n"
    assert "to stderr\n" in err.getvalue()
    assert 'cell.cu(4): warning: variable "x"' in err.getvalue()
    logged = (fake_nvcc.parent.parent / "nvcc-args.txt").read_text().splitlines()
    assert logged[:4] == ["-arch", "sm_75", "-Wno-deprecated-gpu-targets", "-O3"]
    assert logged[-4:] == ["-o", "cell", "cell.cu", '#line 2 "cell.cu"']


def test_compile_errors_and_failing_programs_are_reported_not_raised(
    fake_nvcc: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(magics, "_find_nvcc", lambda: str(fake_nvcc))
    monkeypatch.setattr(magics, "_gpu_capabilities", lambda: ())
    err = io.StringIO()
    result = run_cuda_cell("", "int main() {\n  oops;\n} //! fail", out=io.StringIO(), err=err)
    assert not result.compiled
    assert 'cell.cu(3): error: identifier "oops"' in err.getvalue()
    assert "compilation failed (nvcc exit status 2)" in err.getvalue()
    assert "count the %%cuda line as line 1" in err.getvalue()

    err = io.StringIO()
    result = run_cuda_cell("", "//! exit 3\nint main() { cudaMalloc(0, 0); }", out=io.StringIO(), err=err)
    assert result.returncode == 3
    assert "the program exited with status 3" in err.getvalue()
    assert "no GPU is visible" in err.getvalue()

    err = io.StringIO()
    result = run_cuda_cell("", "//! kill -SEGV $$\nint main() {}", out=io.StringIO(), err=err)
    assert result.returncode is not None
    assert result.returncode < 0
    assert "killed by signal SIGSEGV" in err.getvalue()
    assert "no GPU is visible" not in err.getvalue()  # host-only code: the GPU is not the problem


def test_missing_nvcc_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(magics, "_find_nvcc", lambda: None)
    err = io.StringIO()
    result = run_cuda_cell("", "int main() {}", out=io.StringIO(), err=err)
    assert not result.compiled
    assert "nvcc, the CUDA compiler, is not on PATH" in err.getvalue()
    assert "apt-get install -y nvidia-cuda-toolkit" in err.getvalue()


def test_find_nvcc_uses_path(fake_nvcc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(fake_nvcc.parent))
    assert magics._find_nvcc() == str(fake_nvcc)


def test_load_extension_registers_both_magics() -> None:
    registered: list[tuple[Any, str, str]] = []

    class Shell:
        def register_magic_function(self, func: Any, magic_kind: str, magic_name: str) -> None:
            registered.append((func, magic_kind, magic_name))

    load_ipython_extension(Shell())
    assert [(kind, name) for _, kind, name in registered] == [("cell", "cuda"), ("line", "colabkit_info")]


def test_colabkit_info_magic_calls_info(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    info_module = importlib.import_module("colabkit.info")
    calls: list[int] = []
    monkeypatch.setattr(info_module, "info", lambda **kwargs: calls.append(1))
    magics.colabkit_info("")
    assert calls == [1]


# -- the real thing: nvcc on this machine, driven through a real IPython shell ----------------------
SHELL_SCRIPT = r'''
import sys
from IPython.core.interactiveshell import InteractiveShell

ip = InteractiveShell.instance()
ip.run_cell("%load_ext colabkit")

def cell(marker, source):
    print(f"=== {marker}", flush=True)
    result = ip.run_cell(source)
    sys.stdout.flush()
    sys.stderr.flush()
    print(f"=== {marker} ok={result.success}", flush=True)

cell("host", """%%cuda -a "-O2 -DTIMES=3" -r "alpha 'beta gamma'"
#include <cstdio>
int main(int argc, char **argv) {
    printf("x%d argc=%d last=%s\\n", TIMES, argc, argv[argc - 1]);
    fprintf(stderr, "note on stderr\\n");
    return 0;
}""")

cell("typo", """%%cuda
#include <cstdio>
int main() {
    printf("missing semicolon\\n")
    return 0;
}""")

cell("kernel", """%%cuda
#include <cstdio>
__global__ void fill(int *out) { out[threadIdx.x] = threadIdx.x * 2; }
int main() {
    int *d = nullptr;
    cudaError_t err = cudaMalloc(&d, 4 * sizeof(int));
    if (err != cudaSuccess) {
        fprintf(stderr, "CUDA error: %s\\n", cudaGetErrorString(err));
        return 1;
    }
    fill<<<1, 4>>>(d);
    int h[4];
    cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost);
    printf("h[3]=%d\\n", h[3]);
    return 0;
}""")

cell("info", "%colabkit_info")
cell("after", "print(6 * 7)")
'''


@pytest.fixture(scope="module")
def shell_output(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed here")
    home = tmp_path_factory.mktemp("ipython")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COLAB", "KAGGLE", "VERTEX"))}
    env.update(PYTHONPATH=str(REPO), IPYTHONDIR=str(home / "ipython"), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-c", SHELL_SCRIPT],
        cwd=home,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout
    sections: dict[str, str] = {}
    current = None
    for line in proc.stdout.splitlines(keepends=True):
        if line.startswith("=== "):
            current = line.split()[1]
            sections.setdefault(current, "")
        if current is not None:
            sections[current] += line
    return sections


@pytest.mark.slow
def test_real_nvcc_host_program_runs_with_flags_and_args(shell_output: dict[str, str]) -> None:
    host = shell_output["host"]
    assert "x3 argc=3 last=beta gamma" in host
    assert "note on stderr" in host
    assert "=== host ok=True" in host


@pytest.mark.slow
def test_real_nvcc_compile_error_points_into_the_cell(shell_output: dict[str, str]) -> None:
    typo = shell_output["typo"]
    # The cell's lines as the notebook numbers them: %%cuda is 1, the printf is 4, "return" is 5.
    assert 'cell.cu(5): error: expected a ";"' in typo
    assert "compilation failed" in typo
    assert "missing semicolon" not in typo.split("compilation failed")[1]


@pytest.mark.slow
def test_real_nvcc_kernel_without_gpu_reports_the_cuda_error(shell_output: dict[str, str]) -> None:
    kernel = shell_output["kernel"]
    assert "CUDA error:" in kernel
    assert "the program exited with status 1" in kernel
    assert "no GPU is visible" in kernel
    assert "Traceback" not in kernel
    assert "=== after ok=True" in shell_output["after"]
    assert "42" in shell_output["after"]


@pytest.mark.slow
def test_colabkit_info_magic_in_a_real_shell(shell_output: dict[str, str]) -> None:
    info = shell_output["info"]
    assert "runtime" in info
    assert "drive" in info
    assert "=== info ok=True" in info
