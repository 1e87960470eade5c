"""fit()'s table of epochs and live bar on a fake notebook cell, terminal and log."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from typing import Any

from colabkit.testing import FakeScreen
from colabkit.train.progress import Bars, EpochTable


def _record(epoch: int, **extra: Any) -> dict[str, Any]:
    loss = 1.0 / (epoch + 1)
    record = {
        "epoch": epoch,
        "loss": loss,
        "accuracy": 0.5 + 0.1 * epoch,
        "val_loss": loss + 0.05,
        "val_accuracy": 0.45 + 0.1 * epoch,
        "lr": 1e-3,
        "time": 92.0,
        "samples_per_sec": 11490.0,
        "data_wait": 0.01,
    }
    record.update(extra)
    return record


def _fit(screen: FakeScreen, *, earlier: int = 0, epochs: int = 3) -> Bars:
    """What fit() calls, in its order, for the epochs after ``earlier`` resumed ones."""
    bars = Bars(True, screen=screen)
    bars.start_fit(epochs, earlier, history=[_record(e) for e in range(earlier)])
    for epoch in range(earlier, epochs):
        bars.start_epoch(epoch, epochs, 10, 0)
        bars.steps(5, {"loss": 0.5, "accuracy": 0.75, "samples/s": 1234.0})
        bars.start_eval("validate", 3)
        for _ in range(3):
            bars.eval_step()
        bars.end_eval()
        bars.end_epoch(_record(epoch))
    bars.note("finish", "the run finishes in about 7 min")
    bars.close()
    return bars


def _rows(html: str) -> list[list[str]]:
    body = html.split("<tbody>")[1].split("</tbody>")[0]
    return [re.findall(r"<td>(.*?)</td>", row) for row in body.split("</tr>") if row]


def test_notebook_shows_one_table_updated_in_place_above_one_live_bar() -> None:
    screen = FakeScreen("notebook")
    _fit(screen)
    table, live = screen.outputs  # exactly two outputs: the table, then the bar (validation included)
    html = table.current["text/html"]
    headers = re.findall(r"<th>(.*?)</th>", html)
    assert headers == [
        "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "time", "samples/s"
    ]  # fmt: skip
    rows = _rows(html)
    assert [row[0] for row in rows] == ["1/3", "2/3", "3/3"]
    assert rows[1] == ["2/3", "0.5000", "0.6000", "0.5500", "0.5500", "0.001", "1m 32s", "11.5k"]
    assert "the run finishes in about 7 min" in html  # notes sit under the table, in the same output
    assert len(table.versions) == 1 + 3 + 1  # created, a row per epoch, the note
    bar_texts = [v["text/plain"] for v in live.versions]
    assert any(t.startswith("epoch 2/3 validate:") for t in bar_texts)  # validation runs in the epoch's bar
    assert bar_texts[-1] == ""  # the live bar goes when fit ends; the table stays
    everything = [v for out in screen.outputs for bundle in out.versions for v in bundle.values()]
    assert not any("\x1b[" in text for text in everything)
    assert screen.lines == []


def test_a_resumed_run_starts_with_the_earlier_epochs() -> None:
    screen = FakeScreen("notebook")
    _fit(screen, earlier=2, epochs=4)
    first = screen.outputs[0].versions[0]["text/html"]
    assert [row[0] for row in _rows(first)] == ["1/4", "2/4"]  # shown before the first new step
    assert [row[0] for row in _rows(screen.outputs[0].current["text/html"])] == ["1/4", "2/4", "3/4", "4/4"]

    log = FakeScreen("log")
    _fit(log, earlier=2, epochs=4)
    assert [line.split("  ")[0] for line in log.lines] == [
        "epoch 1/4", "epoch 2/4", "epoch 3/4", "epoch 4/4", "colabkit: the run finishes in about 7 min"
    ]  # fmt: skip


def test_terminal_and_log_print_one_plain_line_per_epoch() -> None:
    for kind in ("terminal", "log"):
        screen = FakeScreen(kind)  # type: ignore[arg-type]
        _fit(screen)
        assert screen.outputs == []
        assert screen.lines[:3] == [
            f"epoch {e + 1}/3  loss {1 / (e + 1):.4f}  accuracy {0.5 + 0.1 * e:.4f}  val_loss {1 / (e + 1) + 0.05:.4f}"
            f"  val_accuracy {0.45 + 0.1 * e:.4f}  lr 0.001  time 1m 32s  11.5k samples/s"
            for e in range(3)
        ]
        assert screen.lines[3] == "colabkit: the run finishes in about 7 min"
    assert "\x1b[" not in FakeScreen("log").stderr.getvalue()


def test_gpu_memory_column_and_a_note_that_changes_replaces_the_old_one() -> None:
    table = EpochTable(2, [_record(0, peak_gpu_gb=4.2, gpu_total_gb=15.0)])
    table.notes["finish"] = "first"
    table.notes["finish"] = "second"
    assert "GPU memory" in table._repr_html_() and "4.2/15.0 GB" in table._repr_html_()
    assert table.line(table.records[0]).endswith("11.5k samples/s  GPU 4.2/15.0 GB")
    assert repr(table).splitlines()[-1] == "second" and "first" not in repr(table)


def test_evaluate_alone_gets_its_own_bar_that_goes_away() -> None:
    screen = FakeScreen("notebook")
    with Bars(True, screen=screen) as bars:
        bars.start_eval("evaluate", 4)
        for _ in range(4):
            bars.eval_step()
        bars.end_eval()
    (live,) = screen.outputs
    assert live.versions[0]["text/plain"].startswith("evaluate:")
    assert live.current["text/plain"] == ""


def test_disabled_shows_nothing() -> None:
    screen = FakeScreen("notebook")
    bars = Bars(False, screen=screen)
    bars.start_fit(2, 0)
    bars.start_epoch(0, 2, 4, 0)
    bars.end_epoch(_record(0))
    bars.note("lr", "hint")
    bars.close()
    assert screen.outputs == [] and screen.lines == []


def test_a_script_without_a_tty_prints_one_line_per_epoch(subprocess_env: dict[str, str]) -> None:
    code = textwrap.dedent(
        """
        import torch
        from torch.utils.data import TensorDataset
        import colabkit
        torch.manual_seed(0)
        x = torch.randn(64, 4)
        data = TensorDataset(x, (x[:, 0] > 0).long())
        colabkit.fit(torch.nn.Linear(4, 2), data, data, epochs=3, batch_size=8, seed=0)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env, timeout=240, check=True
    )
    lines = result.stdout.splitlines()
    assert [line.split("  ")[0] for line in lines if line.startswith("epoch")] == [
        "epoch 1/3",
        "epoch 2/3",
        "epoch 3/3",
    ]
    assert all(" val_loss " in line for line in lines if line.startswith("epoch"))
    assert "\r" not in result.stdout + result.stderr and "\x1b[" not in result.stdout + result.stderr
