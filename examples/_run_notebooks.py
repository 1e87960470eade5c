"""Execute the example notebooks offline and render them to HTML, to look at what a user sees.

    make notebooks                                   # every examples/*.ipynb -> build/notebooks/
    .venv/bin/python examples/_run_notebooks.py quickstart --out /tmp/nb

Each notebook runs top to bottom in a fresh Jupyter kernel of this Python, with
``COLABKIT_EXAMPLES_OFFLINE=1`` (as tests/test_examples.py runs them): the install cell
loads ``examples/_offline.py``, which fakes Colab or Kaggle and swaps downloads for small
stand-ins. The executed notebook (``NAME.ipynb``) and its HTML rendering (``NAME.html``,
by nbconvert) are written to the output folder, which git ignores. A cell error stops that
notebook; its partial rendering is still written, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KERNEL = "colabkit-examples"


def _kernelspec(folder: Path) -> None:
    """A kernelspec for this very Python, so no other "python3" on the machine runs the notebooks."""
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))


def run(path: Path, out: Path, *, scratch: Path) -> bool:
    """Execute one notebook offline; write ``out/NAME.ipynb`` and ``out/NAME.html``; True if no cell failed."""
    import nbclient
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(path, as_version=4)
    work = scratch / path.stem
    work.mkdir()
    os.environ["COLABKIT_OFFLINE_ROOT"] = str(work / "root")
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": str(work)}})
    ok = True
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        print(f"{path.name}: a cell failed:\n{exc}", file=sys.stderr)
        ok = False
    nbformat.write(nb, out / f"{path.stem}.ipynb")
    body, _ = HTMLExporter().from_notebook_node(nb)
    (out / f"{path.stem}.html").write_text(body, encoding="utf-8")
    print(f"{'wrote' if ok else 'FAILED, wrote'} {out / (path.stem + '.html')}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="execute examples/*.ipynb offline and render them to HTML")
    parser.add_argument("names", nargs="*", help="notebook names (default: all of examples/*.ipynb)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "notebooks", help="output folder")
    args = parser.parse_args(argv)
    paths = [HERE / f"{name}.ipynb" for name in args.names] or sorted(HERE.glob("*.ipynb"))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="colabkit-notebooks-") as tmp:
        scratch = Path(tmp)
        _kernelspec(scratch / "jupyter")
        jupyter_path = [str(scratch / "jupyter"), os.environ.get("JUPYTER_PATH", "")]
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in jupyter_path if p)
        os.environ["COLABKIT_EXAMPLES_OFFLINE"] = "1"
        pythonpath = [str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in pythonpath if p)
        results = [run(path, args.out, scratch=scratch) for path in paths]
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
