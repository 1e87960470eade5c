"""History: columns, best(), CSV, plot, state round trip."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from colabkit.display import use_screen
from colabkit.errors import ArgumentError, MissingDependencyError
from colabkit.testing import FakeScreen
from colabkit.train.history import History, metric_mode

RECORDS = [
    {"epoch": 0, "loss": 0.9, "accuracy": 0.5, "val_loss": 0.8, "val_accuracy": 0.55, "lr": 0.1},
    {"epoch": 1, "loss": 0.6, "accuracy": 0.7, "val_loss": 0.5, "val_accuracy": 0.75, "lr": 0.1},
    {"epoch": 2, "loss": 0.4, "accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.78, "lr": 0.05},
]


def test_columns_and_records() -> None:
    history = History(RECORDS, stop_reason="completed")
    assert len(history) == 3 and history[-1]["epoch"] == 2
    assert history["val_loss"] == [0.8, 0.5, 0.6]
    assert history.history["lr"] == [0.1, 0.1, 0.05]
    assert history.keys() == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr"]
    with pytest.raises(KeyError, match="'f1' is not in this History"):
        history["f1"]
    assert "3 epochs" in repr(history) and "stop_reason='completed'" in repr(history)


def test_best_picks_min_for_losses_and_max_for_scores() -> None:
    history = History(RECORDS)
    assert history.best()["epoch"] == 1  # val_loss
    assert history.best("val_accuracy")["epoch"] == 2
    assert history.best("val_accuracy", mode="min")["epoch"] == 0
    assert metric_mode("val_mae") == "min" and metric_mode("val_f1") == "max"
    with pytest.raises(ArgumentError, match=r"monitor='val_f1' is not recorded.*val_accuracy"):
        history.best("val_f1")
    with pytest.raises(ArgumentError, match="mode='up'"):
        history.best("loss", mode="up")
    with pytest.raises(ArgumentError, match="no epoch finished yet"):
        History().best()


def test_to_csv_text_and_file(tmp_path: Path) -> None:
    history = History([*RECORDS, {"epoch": 3, "loss": 0.3, "extra": 1}])
    text = history.to_csv(tmp_path / "h.csv")
    assert (tmp_path / "h.csv").read_text() == text
    lines = text.splitlines()
    assert lines[0] == "epoch,loss,accuracy,val_loss,val_accuracy,lr,extra"
    assert lines[4] == "3,0.3,,,,,1"


def test_state_round_trip() -> None:
    history = History(RECORDS, stop_reason="time_limit")
    again = History.from_state_dict(history.state_dict())
    assert again.records == history.records and again.stop_reason == "time_limit"
    again.append({"epoch": 3, "loss": 0.1})
    assert len(history) == 3  # copies, not shared


def test_plot_draws_train_and_val_curves() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = History(RECORDS).plot()
    try:
        titles = [ax.get_title() for ax in figure.axes]
        assert titles == ["loss", "accuracy"]
        labels = [line.get_label() for line in figure.axes[0].get_lines()]
        assert labels == ["train", "val"]
        assert list(figure.axes[0].get_lines()[1].get_ydata()) == [0.8, 0.5, 0.6]
        with pytest.raises(ArgumentError, match="f1 not recorded"):
            History(RECORDS).plot(["f1"])
    finally:
        plt.close("all")


def test_plot_ticks_epochs_at_whole_numbers() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def epoch_ticks(history: History) -> list[str]:
        figure = history.plot()
        figure.canvas.draw()
        axes = figure.axes
        assert all(ax.get_xlabel() == "epoch" for ax in axes)
        low, high = axes[0].get_xlim()
        labels = {
            tuple(
                text.get_text()
                for value, text in zip(ax.get_xticks(), ax.get_xticklabels(), strict=True)
                if low <= value <= high
            )
            for ax in axes
        }
        assert len(labels) == 1  # every panel alike
        return list(labels.pop())

    try:
        # One epoch: a single tick "1", not 0.96 0.98 1.00 1.02 1.04.
        assert epoch_ticks(History([{"epoch": 0, "loss": 2.31, "val_loss": 2.32}])) == ["1"]
        assert epoch_ticks(History(RECORDS)) == ["1", "2", "3"]
        many = History([{"epoch": e, "loss": 1 / (e + 1)} for e in range(30)])
        ticks = epoch_ticks(many)
        assert 3 <= len(ticks) <= 11 and all(tick.isdigit() for tick in ticks), ticks
    finally:
        plt.close("all")


def test_plot_in_a_notebook_is_shown_once(monkeypatch: pytest.MonkeyPatch) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.close("all")
    figure = History(RECORDS).plot()
    assert plt.fignum_exists(figure.number)  # a script keeps it for plt.show()
    plt.close("all")
    with use_screen(FakeScreen("notebook")):
        figure = History(RECORDS).plot()
    assert not plt.fignum_exists(figure.number) and len(figure.axes) == 2  # only the returned figure displays


def test_plot_without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(MissingDependencyError, match="pip install matplotlib"):
        History(RECORDS).plot()
