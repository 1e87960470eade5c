"""The test harness on a real GPU: torch's and triton's own warnings pass, colabkit's still fail.

pyproject.toml turns warnings into errors and then shows (never fails on) those attributed to
torch's and triton's own modules, such as the DeprecationWarning torch 2.11's inductor raises
when it imports torch.utils.mkldnn. This runs pytest on a small test file with the project's
configuration, in a child process, and reads which tests passed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASES = textwrap.dedent(
    '''
    import warnings

    from colabkit import _notify


    def warn_from(module: str, category: type[Warning]) -> None:
        """Raise a warning from code that lives in ``module`` (as torch's own code would)."""
        code = compile("import warnings\\nwarnings.warn('x is deprecated', category)\\n", module, "exec")
        exec(code, {"__name__": module, "category": category})


    def test_torch_internal_deprecation() -> None:
        warn_from("torch.utils.mkldnn", DeprecationWarning)


    def test_triton_internal_warning() -> None:
        warn_from("triton.runtime.cache", UserWarning)


    def test_colabkit_warning() -> None:
        _notify.warn("colabkit says something is wrong")


    def test_deprecation_in_colabkit_code() -> None:
        warn_from("colabkit.train.loop", DeprecationWarning)


    def test_a_module_that_only_starts_like_torch() -> None:
        warn_from("torchish", DeprecationWarning)
    '''
)


def test_third_party_warnings_pass_and_colabkit_warnings_fail(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    (tmp_path / "test_cases.py").write_text(CASES)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(tmp_path),
            "-p",
            "no:cacheprovider",
            "-rA",
            str(tmp_path / "test_cases.py"),
        ],
        cwd=tmp_path,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = done.stdout.splitlines()
    outcome = {line.split("::")[-1].split()[0]: line.split()[0] for line in lines if "test_cases.py::" in line}
    assert outcome == {
        "test_torch_internal_deprecation": "PASSED",
        "test_triton_internal_warning": "PASSED",
        "test_colabkit_warning": "FAILED",
        "test_deprecation_in_colabkit_code": "FAILED",
        "test_a_module_that_only_starts_like_torch": "FAILED",
    }, done.stdout[-3000:]
