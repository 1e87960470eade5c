"""fit() in a real Jupyter kernel: one table that stays, no escape codes, with and without ipywidgets."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
KERNEL = "colabkit-tests"  # the kernelspec of conftest.kernel_dir

FIT = """
import json, torch
from torch.utils.data import TensorDataset
import colabkit
torch.manual_seed(0)
x = torch.randn(256, 8)
y = (x[:, 0] + x[:, 1] > 0).long()
history = colabkit.fit(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)),
                       TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:]),
                       epochs=3, batch_size=16, lr=0.01, seed=0)
"""


def _run(cells: list[str], tmp_path: Path, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    resources = {"metadata": {"path": str(tmp_path)}}
    nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=240, resources=resources).execute()
    return nb


def _texts(output: dict[str, Any]) -> list[str]:
    texts = [output.get("text", "")]
    texts += [value if isinstance(value, str) else json.dumps(value) for value in output.get("data", {}).values()]
    return texts


TOOLS = """
from pathlib import Path
colabkit.lr_find(torch.nn.Linear(8, 2), TensorDataset(x, y), steps=20)
colabkit.compare_devices(torch.nn.Linear(8, 2), TensorDataset(x, y), steps=3, batch_sizes=[16])
folder = Path("tools").resolve()  # the kernel runs in the test's tmp_path
(folder / "set").mkdir(parents=True)
for i in range(50):
    (folder / "set" / f"{i}.txt").write_text(str(i))
colabkit.stage(colabkit.make_archive(folder / "set", folder / "set.zip"), folder / "staged")
"""


@pytest.mark.slow
@pytest.mark.parametrize("widgets", [True, False], ids=["ipywidgets", "no-ipywidgets"])
def test_fit_in_a_kernel_shows_one_table_with_a_row_per_epoch_and_no_escape_codes(
    widgets: bool, tmp_path: Path, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if widgets:
        pytest.importorskip("ipywidgets")
    block = "" if widgets else "import sys; sys.modules['ipywidgets'] = None  # as if not installed"
    check = "print(json.dumps(history.records)); from colabkit import display; print('kind', display.detect())"
    nb = _run([block, FIT, check, TOOLS], tmp_path, kernel_dir, monkeypatch)

    fit_outputs = nb.cells[1].outputs
    for cell in nb.cells:  # fit, and lr_find, compare_devices, make_archive and stage too
        for output in cell.outputs:
            for text in _texts(output):
                assert "\x1b[" not in text and "\r" not in text, output
    tool_bars = [o for o in nb.cells[3].outputs if o.get("output_type") == "display_data"]
    if widgets:
        shown = " ".join(o["data"]["text/plain"] for o in tool_bars)
        assert all(name in shown for name in ("lr_find", "compare_devices", "pack set", "extract set.zip"))
    else:
        # Each tool's bar was one output replaced in place, emptied when done (leave=False).
        assert [o["data"]["text/plain"] for o in tool_bars] == [""] * 4
    tables = [o for o in fit_outputs if "colabkit-epochs" in o.get("data", {}).get("text/html", "")]
    assert len(tables) == 1, [o.get("output_type") for o in fit_outputs]  # one output, updated in place
    html = tables[0]["data"]["text/html"]
    body = html.split("<tbody>")[1].split("</tbody>")[0]
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in body.split("</tr>") if row]
    headers = re.findall(r"<th>(.*?)</th>", html)

    last = nb.cells[2].outputs[0]["text"].splitlines()
    records = json.loads(last[0])
    assert last[1] == f"kind {'widgets' if widgets else 'notebook'}"
    assert len(rows) == 3 == len(records)
    for row, record in zip(rows, records, strict=True):
        cells = dict(zip(headers, row, strict=True))
        assert cells["epoch"] == f"{record['epoch'] + 1}/3"
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert cells[key] == f"{record[key]:.4f}"
    if not widgets:
        # No text bar on stderr: the live bars are outputs replaced in place, gone at the end.
        for cell in (nb.cells[1], nb.cells[3]):
            assert not [o for o in cell.outputs if o.get("output_type") == "stream" and o.get("name") == "stderr"]
