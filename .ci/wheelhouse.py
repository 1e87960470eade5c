"""Build a folder of wheels that installs colabkit with the internet off (Kaggle competitions).

    python .ci/wheelhouse.py [--out wheelhouse]        (what `make wheelhouse` runs)

Upload the folder as a Kaggle Dataset, then in the notebook:

    !pip install --no-index --find-links /kaggle/input/<dataset> colabkit

What goes in: colabkit's own wheel, and every requirement of colabkit except torch,
with their requirements in turn (gdown brings beautifulsoup4, requests[socks], ...).
Kaggle's TPU image (python:3.12 plus tpu/requirements.in in Kaggle/docker-python) has
no gdown and no PySocks; its GPU image (Colab's plus kaggle_requirements.txt) has them
today only because Colab's base does. Neither list promises the rest, so all of it goes
in: pip skips what the image already has, and a missing dependency of a dependency is
what makes offline installs fail. torch stays out: both images ship it (a CUDA or TPU
build matched to the machine) and colabkit's floor is below theirs, so nothing is replaced.

Only pure-Python wheels (py3-none-any) are taken, so the folder installs on any Python
colabkit supports (3.10+), on Kaggle's GPU and TPU images alike.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Shipped by Kaggle's images (and Colab's); never put in the folder.
PROVIDED = {"torch"}


def requirements(wheel: Path) -> list[str]:
    """The wheel's own requirements (no extras), minus what the platforms ship."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(name).decode()
    wanted = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        spec = line.split(":", 1)[1].strip()
        if "extra ==" in spec:
            continue
        match = re.match(r"[A-Za-z0-9._-]+", spec)
        if match and match.group(0).lower() not in PROVIDED:
            wanted.append(spec.split(";")[0].strip())
    return wanted


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="wheelhouse", help="folder to fill (emptied first)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as build:
        pip("wheel", "--quiet", "--no-deps", "--wheel-dir", build, str(ROOT))
        (wheel,) = Path(build).glob("colabkit-*.whl")
        shutil.copy2(wheel, out / wheel.name)
    wanted = requirements(out / wheel.name)
    # --platform any + --implementation py: pure-Python wheels only, good on every Python 3.10+.
    pip(
        "download",
        "--quiet",
        "--dest",
        str(out),
        "--only-binary=:all:",
        "--platform",
        "any",
        "--implementation",
        "py",
        "--python-version",
        "3.10",
        *wanted,
    )
    files = sorted(out.iterdir())
    size = sum(f.stat().st_size for f in files)
    print(f"{out}: {len(files)} wheels, {size / 1e6:.1f} MB (colabkit and {', '.join(wanted)} with their dependencies)")
    for f in files:
        print(f"  {f.name}")
    print("Upload it as a Kaggle Dataset, then: pip install --no-index --find-links /kaggle/input/<dataset> colabkit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
