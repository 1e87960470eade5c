"""`make wheelhouse`: colabkit installs from one folder with no index, as on Kaggle with the internet off."""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _closure(name: str) -> list[md.Distribution]:
    """``name``'s installed distribution and every one it requires here, extras included."""
    seen: dict[str, md.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo: list[tuple[str, frozenset[str]]] = [(name, frozenset())]
    while todo:
        current, extras = todo.pop()
        try:
            dist = md.distribution(current)
        except md.PackageNotFoundError:
            continue  # a requirement whose marker does not apply here
        key = dist.metadata["Name"].lower().replace("_", "-")
        seen[key] = dist
        for extra in ["", *extras]:
            if (key, extra) in done:
                continue
            done.add((key, extra))
            for line in dist.requires or []:
                req = Requirement(line)
                if req.marker is None or req.marker.evaluate({"extra": extra}):
                    todo.append((req.name, frozenset(req.extras)))
    return list(seen.values())


def _provide_torch(venv: Path) -> Path:
    """Kaggle's image ships torch: link this machine's torch and its dependencies into the venv's path."""
    provided = venv.parent / "provided"
    provided.mkdir()
    for dist in _closure("torch"):
        base = Path(str(dist.locate_file("")))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = base / top
            if source.exists() and not (provided / top).exists():
                (provided / top).symlink_to(source)
    (site,) = venv.glob("lib/python*/site-packages")
    # The image's own setuptools is the one torch asks for, not the old copy venv bundles (Python < 3.12).
    for bundled in [*site.glob("setuptools*"), *site.glob("_distutils_hack"), *site.glob("distutils-precedence.pth")]:
        if bundled.is_dir():
            shutil.rmtree(bundled)
        else:
            bundled.unlink()
    (site / "kaggle-image.pth").write_text(f"{provided}\n")
    return site


@pytest.mark.slow
def test_colabkit_installs_from_the_wheelhouse_with_no_index(tmp_path: Path) -> None:
    wheels = tmp_path / "wheelhouse"
    built = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "wheelhouse.py"), "--out", str(wheels)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    names = sorted(p.name.split("-")[0].lower() for p in wheels.glob("*.whl"))
    assert {"colabkit", "gdown", "tqdm", "requests", "pysocks", "beautifulsoup4"} <= set(names)
    assert "torch" not in names  # Kaggle's own torch is never replaced
    assert all(p.name.endswith("-py3-none-any.whl") for p in wheels.iterdir())  # any Python 3.10+

    venv = tmp_path / "kaggle"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = _provide_torch(venv)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no index, no extra links, no constraints: only the folder

    def kaggle(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(python), *args], capture_output=True, text=True, timeout=600, check=False, env=env, cwd=tmp_path
        )

    done = kaggle(
        "-m", "pip", "install", "--disable-pip-version-check", "--no-index", "--find-links", str(wheels), "colabkit"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not list(site.glob("torch*")), "pip installed a torch of its own"
    check = kaggle("-c", "import colabkit, gdown, torch; print(colabkit.runtime().kind, gdown.__file__)")
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("script ") and str(site) in check.stdout  # gdown came from the folder
