"""compare_devices, matmul_speed and lr_find on the CPU, with a virtual clock where timing is asserted."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from colabkit import bench
from colabkit.display import use_screen
from colabkit.errors import ArgumentError, MissingDependencyError
from colabkit.testing import FakeScreen
from colabkit.train import lr_find as lrf
from colabkit.train.batches import DEFAULT_BATCH_SIZE


@pytest.fixture(autouse=True)
def _close_figures() -> Iterator[None]:
    yield
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close("all")


@pytest.fixture
def agg() -> None:
    import matplotlib

    matplotlib.use("Agg")


def _classification(n: int = 256, features: int = 8, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=generator)
    y = (x @ torch.randn(features, classes, generator=generator)).argmax(1)
    return x, y


class VirtualTime:
    """A clock that advances only when the model runs a forward pass: one unit per call."""

    def __init__(self) -> None:
        self.now = 0.0
        self.forwards = 0

    def clock(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += 1.0
        self.forwards += 1

    def attach(self, model: nn.Module) -> None:
        # A plain function, not a bound method: deepcopy shares functions, so every replica ticks this clock.
        def hook(*_: object) -> None:
            self.tick()

        model.register_forward_hook(hook)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


# -- compare_devices --------------------------------------------------------------------------------
def test_compare_devices_cpu_only_says_no_gpu_and_leaves_the_model_alone(capsys: pytest.CaptureFixture[str]) -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    result = bench.compare_devices(model, _classification(), steps=2, warmup=1, progress=False)

    assert [(t.device, t.phase) for t in result.timings] == [("cpu", "train"), ("cpu", "inference")]
    assert all(t.steps == 2 and t.batch_size == DEFAULT_BATCH_SIZE and t.seconds > 0 for t in result.timings)
    assert result.speedup("cpu", "train") == pytest.approx(1.0)
    assert not result.gpu_found
    assert any("no GPU was found" in note for note in result.notes)
    print(result)  # a notebook cell: the call, then its table
    out = capsys.readouterr().out
    assert out.count("no GPU was found") == 1, out  # with the table it explains, not also while timing
    text = str(result)
    assert "samples/s" in text and "vs CPU" in text and "no GPU was found" in text
    assert "<table>" in result._repr_html_()
    # The timing ran on copies: the caller's weights are untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compare_devices_times_only_the_timed_steps_between_synchronisations(monkeypatch: pytest.MonkeyPatch) -> None:
    virtual = VirtualTime()
    synced: list[tuple[str, float]] = []
    monkeypatch.setattr(bench, "clock", virtual.clock)
    monkeypatch.setattr(bench, "synchronize", lambda device: synced.append((str(device), virtual.now)))
    model = _model()
    virtual.attach(model)

    result = bench.compare_devices(model, _classification(), steps=5, warmup=3, progress=False)

    for timing in result.timings:
        # One virtual second per forward: warm-up steps are not counted, timed ones all are.
        assert timing.seconds == pytest.approx(5.0)
        assert timing.samples_per_s == pytest.approx(DEFAULT_BATCH_SIZE * 5 / 5.0)
    assert virtual.forwards == 2 * (3 + 5)
    # Each warm-up and timed run is bracketed by a synchronisation of the timed device.
    assert {device for device, _ in synced} == {"cpu"}
    assert len(synced) == 2 * 2 * 2


def test_compare_devices_auto_steps_fill_the_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    virtual = VirtualTime()
    monkeypatch.setattr(bench, "clock", virtual.clock)
    monkeypatch.setattr(bench, "_AUTO_BUDGET", 4.0)  # 4 virtual seconds = 4 steps of 1 s
    model = _model()
    virtual.attach(model)

    result = bench.compare_devices(model, _classification(), phases=["inference"], progress=False)

    assert result.get("cpu", "inference").steps == 4


def test_compare_devices_rebatches_to_each_requested_size() -> None:
    x, y = _classification(n=100)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)

    result = bench.compare_devices(_model(), loader, batch_sizes=[4, 32], steps=2, warmup=0, progress=False)

    assert sorted({t.batch_size for t in result.timings}) == [4, 32]
    assert result.get("cpu", "train", 32).samples_per_s > 0
    assert len(result.to_rows()) == 4


def test_compare_devices_can_time_mixed_precision() -> None:
    result = bench.compare_devices(
        _model(), _classification(), precision="bf16", steps=2, warmup=1, phases=["train"], progress=False
    )
    assert result.get("cpu", "train").precision == "bf16"
    assert "bf16)" in str(result)
    with pytest.raises(ArgumentError, match="precision='fp8' is unknown"):
        bench.compare_devices(_model(), _classification(), precision="fp8", progress=False)


def test_speedups_are_relative_to_the_cpu_for_the_same_phase_and_batch(agg: None, tmp_path: object) -> None:
    timings = [
        bench.PhaseTiming("cpu", "CPU", "train", 64, 10, 2.0),
        bench.PhaseTiming("cpu", "CPU", "inference", 64, 10, 1.0),
        bench.PhaseTiming("cuda:0", "Tesla T4", "train", 64, 10, 0.1),
        bench.PhaseTiming("cuda:0", "Tesla T4", "inference", 64, 10, 0.25),
    ]
    result = bench.DeviceComparison(tuple(bench._with_speedups(timings)))

    assert result.speedup("cuda:0", "train") == pytest.approx(20.0)
    assert result.speedup("cuda:0", "inference") == pytest.approx(4.0)
    assert result.gpu_found
    assert "20.00x" in str(result)
    from pathlib import Path

    png = Path(str(tmp_path)) / "chart" / "devices.png"
    figure = result.plot(path=png)
    assert png.read_bytes().startswith(b"\x89PNG")
    (ax,) = figure.axes
    assert [text.get_text() for text in ax.get_xticklabels()] == ["train", "inference"]
    # Bars carry their throughput, the GPU's also its speed-up; a 20x spread stays on a linear axis.
    labels = [text.get_text() for text in ax.texts]
    assert labels == ["320/s", "640/s", "6,400/s\n20.0x CPU", "2,560/s\n4.0x CPU"]
    assert ax.get_yscale() == "linear"
    assert ax.get_ylim()[0] == 0
    faster = bench.PhaseTiming("cuda:0", "A100", "train", 64, 10, 0.01)
    wide = bench.DeviceComparison(tuple(bench._with_speedups([timings[0], faster])))
    (ax,) = wide.plot().axes
    assert ax.get_yscale() == "log"  # 200x: the CPU bar stays visible
    ax.figure.canvas.draw()
    assert _tick_labels(ax) == ["1,000", "10,000", "100,000"]
    assert not any(text.get_text() for text in ax.yaxis.get_minorticklabels())


def test_device_chart_labels_millions_plainly(agg: None) -> None:
    # Millions of samples/s within a factor of 2: linear, and no "1e6" offset above the axis.
    timings = [
        bench.PhaseTiming("cuda:0", "A100", "inference", 4096, 300, 0.5),
        bench.PhaseTiming("cuda:1", "H100", "inference", 4096, 600, 0.5),
    ]
    (ax,) = bench.DeviceComparison(tuple(timings)).plot().axes
    ax.figure.canvas.draw()
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    assert ax.yaxis.get_offset_text().get_text() == ""
    labels = _tick_labels(ax)
    assert labels[0] == "0" and "5000000" in labels, labels


def _tick_labels(ax: Any) -> list[str]:
    """The y tick labels matplotlib drew in view (after canvas.draw()), each checked to be a plain number."""
    low, high = ax.get_ylim()
    ticks = zip(ax.get_yticks(), ax.get_yticklabels(), strict=True)
    labels = [text.get_text() for value, text in ticks if low <= value <= high]
    for label in labels:
        assert re.fullmatch(r"\d+(,\d{3})*(\.\d+)?", label), f"tick label {label!r} is not a plain number"
    return labels


def _matmul(device: str, dtype: str, size: int, tflops: float) -> bench.MatmulTiming:
    repeats = 10
    return bench.MatmulTiming(device, device.upper(), dtype, size, repeats, 2 * size**3 * repeats / (tflops * 1e12))


def test_matmul_chart_reads_true(agg: None) -> None:
    # The CPU at 0.127-0.157 TFLOP/s: a 20 % spread must look like 20 %, from a zero baseline.
    close = bench.MatmulResult(
        (
            _matmul("cpu", "float32", 512, 0.127),
            _matmul("cpu", "float32", 1024, 0.157),
            _matmul("cpu", "float32", 2048, 0.15),
        )
    )
    (ax,) = close.plot().axes
    ax.figure.canvas.draw()
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    assert [(round(bar.get_y(), 9), round(bar.get_height(), 3)) for bar in ax.patches] == [
        (0, 0.127),
        (0, 0.157),
        (0, 0.15),
    ]
    labels = _tick_labels(ax)
    assert labels[0] in ("0.00", "0.000") and len(labels) >= 3
    assert ax.get_title() == "Matrix multiply throughput (no GPU found)"
    # A T4 in float16 against the CPU: 400x, orders of magnitude, so a log axis, still plainly labelled.
    wide = bench.MatmulResult((close.timings[1], _matmul("cuda:0", "float16", 1024, 60.0)))
    (ax,) = wide.plot().axes
    ax.figure.canvas.draw()
    assert ax.get_yscale() == "log" and ax.get_title() == "Matrix multiply throughput"
    assert _tick_labels(ax) == ["0.1", "1", "10", "100"]
    assert not any(text.get_text() for text in ax.yaxis.get_minorticklabels())


def test_compare_devices_rejects_unusable_devices_and_bad_options() -> None:
    data = _classification()
    if not torch.cuda.is_available():
        with pytest.raises(ArgumentError, match="none of them can be used"):
            bench.compare_devices(_model(), data, devices="cuda", progress=False)
    with pytest.raises(ArgumentError, match="'tpu' is not a device"):
        bench.compare_devices(_model(), data, devices=["tpu"], progress=False)
    with pytest.raises(ArgumentError, match="steps=0"):
        bench.compare_devices(_model(), data, steps=0, progress=False)
    with pytest.raises(ArgumentError, match="phases="):
        bench.compare_devices(_model(), data, phases=["eval"], progress=False)  # type: ignore[list-item]
    with pytest.raises(ArgumentError, match="inputs but"):
        bench.compare_devices(_model(), (data[0], data[1][:3]), progress=False)
    with pytest.raises(ArgumentError, match="is empty"):
        bench.compare_devices(_model(), [], progress=False)


def test_plot_without_matplotlib_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    result = bench.DeviceComparison((bench.PhaseTiming("cpu", "CPU", "train", 8, 1, 1.0, 1.0),))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(MissingDependencyError, match="pip install matplotlib"):
        result.plot()


def test_all_devices_are_the_cpu_then_each_usable_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from colabkit import device

    gpus = [torch.device("cuda", 0), torch.device("cuda", 2)]  # cuda:1 failed device.py's check
    monkeypatch.setattr(device, "usable_cuda_devices", lambda: list(gpus))
    monkeypatch.setattr(device.backend, "mps_available", lambda: False)

    assert bench._resolve_devices("all") == ([torch.device("cpu"), *gpus], [])
    chosen, notes = bench._resolve_devices(["cpu", "cuda", "cuda:1"])
    assert chosen == [torch.device("cpu"), torch.device("cuda", 0)]  # bare "cuda" is the first GPU
    assert notes == ["cuda:1 skipped: it is not a usable GPU here (usable GPUs: cuda:0, cuda:2)"]
    monkeypatch.setattr(device, "usable_cuda_devices", lambda: [])
    with pytest.raises(ArgumentError, match=r"none of them can be used here \(cuda:0 skipped.*none\)"):
        bench._resolve_devices("cuda")


def test_plots_return_the_figure_as_history_plot_does(agg: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.pyplot as plt

    from colabkit.train.history import History

    results = [
        bench.DeviceComparison((bench.PhaseTiming("cpu", "CPU", "train", 8, 1, 1.0, 1.0),)),
        bench.MatmulResult((bench.MatmulTiming("cpu", "CPU", "float32", 64, 2, 0.5, 1.0),)),
        lrf.LRFinderResult((1e-3, 1e-2, 1e-1), (2.0, 1.0, 3.0), (2.0, 1.0, 3.0), 1e-2, 1e-2, False),
    ]
    history_figure = History([{"epoch": 0, "loss": 1.0}]).plot()
    for result in results:
        figure = result.plot()
        assert type(figure) is type(history_figure) and len(figure.axes) == 1
        assert plt.fignum_exists(figure.number)  # a script keeps it open for plt.show()
        # Drawn into the caller's Axes: their figure comes back, still open.
        mine, ax = plt.subplots()
        assert result.plot(ax=ax) is mine and plt.fignum_exists(mine.number)
    # In a notebook the returned figure is the one display: closed for the inline backend.
    with use_screen(FakeScreen("notebook")):
        for result in results:
            figure = result.plot()
            assert not plt.fignum_exists(figure.number) and len(figure.axes) == 1
    _, ax = plt.subplots()
    assert plt.fignum_exists(results[0].plot(ax=ax).number)


# -- matmul_speed -----------------------------------------------------------------------------------
def test_matmul_speed_reports_tflops_per_dtype_and_size(
    agg: None, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    result = bench.matmul_speed(sizes=[32, 64], dtypes=["float32", "bfloat16"], repeats=2, progress=False)

    assert [(t.dtype, t.size) for t in result.timings] == [
        ("float32", 32),
        ("float32", 64),
        ("bfloat16", 32),
        ("bfloat16", 64),
    ]
    fp32 = result.get("cpu", "float32", 64)
    assert fp32.tflops == pytest.approx(2 * 64**3 * 2 / fp32.seconds / 1e12)
    assert fp32.speedup == pytest.approx(1.0)
    assert result.best("cpu").tflops >= fp32.tflops
    assert "TFLOP/s" in str(result) and "no GPU was found" in str(result)
    print(result)  # a notebook cell: the call, then its table
    assert capsys.readouterr().out.count("no GPU was found") == 1
    from pathlib import Path

    png = Path(str(tmp_path)) / "matmul.png"
    result.plot(path=png)
    assert png.stat().st_size > 0


def test_matmul_speed_auto_uses_float32_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "_AUTO_BUDGET", 0.0)  # the minimum number of repeats
    result = bench.matmul_speed(sizes=[16], progress=False)
    assert [(t.device, t.dtype, t.repeats) for t in result.timings] == [("cpu", "float32", bench._AUTO_MIN_STEPS)]


def test_matmul_speed_rejects_unknown_dtypes() -> None:
    with pytest.raises(ArgumentError, match="dtypes=\\['float8'\\]"):
        bench.matmul_speed(dtypes=["float8"], progress=False)
    with pytest.raises(ArgumentError, match="sizes=-4"):
        bench.matmul_speed(sizes=[-4], progress=False)


# -- lr_find ----------------------------------------------------------------------------------------
def test_suggestion_is_where_the_loss_falls_fastest() -> None:
    lrs = [10 ** (-6 + 6 * i / 99) for i in range(100)]
    # A smooth drop centred on lr = 1e-3, then a blow-up after lr = 1e-1.
    losses = [
        2.0 - 1.5 / (1 + math.exp(-4 * (math.log10(lr) + 3))) + (50 * (lr - 0.1) if lr > 0.1 else 0.0) for lr in lrs
    ]
    suggestion, min_loss_lr = lrf._suggest(lrs, losses)
    assert 10**-3.2 < suggestion < 10**-2.8
    assert 0.05 < min_loss_lr < 0.2


def test_lr_find_sweeps_until_divergence_and_restores_model_and_optimizer(agg: None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    x, y = _classification()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # One real step first, so the optimizer has momentum buffers that must survive.
    nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
    optimizer.step()
    model.eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = {i: s["momentum_buffer"].clone() for i, s in enumerate(optimizer.state.values())}
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)

    result = lrf.lr_find(model, loader, optimizer=optimizer, start_lr=1e-5, end_lr=1e3, steps=60, progress=False)

    assert result.diverged and len(result.lrs) < 60
    assert result.lrs[0] == pytest.approx(1e-5)
    assert all(b > a for a, b in zip(result.lrs, result.lrs[1:], strict=False))
    assert 1e-5 < result.suggestion <= result.min_loss_lr
    assert float(result) == result.suggestion
    assert "suggested lr" in str(result)
    # Weights, BatchNorm statistics, mode, optimizer lr and momentum are all as before.
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert not model.training
    assert optimizer.param_groups[0]["lr"] == 0.05
    assert all(torch.equal(momentum[i], s["momentum_buffer"]) for i, s in enumerate(optimizer.state.values()))
    (ax,) = result.plot().axes
    assert ax.get_xscale() == "log"


def test_lr_find_restores_the_model_even_when_the_loss_function_fails() -> None:
    model = _model()
    model.train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    calls = 0

    def flaky_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(outputs, targets)

    with pytest.raises(RuntimeError, match="boom"):
        lrf.lr_find(model, _classification(), loss_fn=flaky_loss, start_lr=1e-5, end_lr=1e-3, progress=False)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert model.training


def test_lr_find_accepts_optimizer_factories_like_fit() -> None:
    import functools

    model = _model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    factory = functools.partial(torch.optim.SGD, momentum=0.5)  # gets lr= from the sweep
    result = lrf.lr_find(model, _classification(), optimizer=factory, steps=20, progress=False)
    assert len(result.lrs) >= 5
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_lr_find_rejects_bad_ranges() -> None:
    with pytest.raises(ArgumentError, match="0 < start_lr < end_lr"):
        lrf.lr_find(_model(), _classification(), start_lr=1.0, end_lr=0.1, progress=False)
    with pytest.raises(ArgumentError, match="steps=2 is too few"):
        lrf.lr_find(_model(), _classification(), steps=2, progress=False)
    with pytest.raises(ArgumentError, match="loss_fn=None means cross-entropy"):
        lrf.lr_find(_model(), (torch.randn(16, 8), torch.randn(16, 5)), progress=False)
