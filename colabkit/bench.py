"""How much faster is the GPU? Device comparisons and matmul throughput.

:func:`compare_devices` times training steps and inference of one model on
every usable device (CPU first, as the baseline), taking the data as
:func:`colabkit.fit` does (:mod:`colabkit.train.batches`); :func:`matmul_speed`
measures raw matrix-multiply TFLOP/s per device and dtype. Each returns a small result object that
prints as a table, renders as HTML in notebooks and draws a chart with
``.plot()``, which returns the matplotlib Figure, the same convention as
:meth:`colabkit.History.plot` (shown once as a notebook cell's result; saved with
``path=``).

Timing is honest about asynchronous devices: every measurement starts and
ends with a device synchronisation (CUDA kernels are queued, so a clock read
without ``torch.cuda.synchronize()`` times the queueing, not the work), and
warm-up steps (cuDNN autotuning, lazy allocations, first-call overheads) are
run before the clock starts. Seams for tests: :func:`clock` and
:func:`synchronize`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import html
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from colabkit import _plot, display
from colabkit import device as _device
from colabkit.errors import ArgumentError
from colabkit.train.batches import (
    LossFn,
    call_model,
    check_loss_fn,
    concat,
    forever,
    forward,
    inputs_and_targets,
    inputs_only,
    model_mode,
)
from colabkit.train.oom import batch_length, slice_batch
from colabkit.train.precision import Precision, resolve_precision
from colabkit.train.state import ordered_loader

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "DeviceComparison",
    "MatmulResult",
    "MatmulTiming",
    "PhaseTiming",
    "clock",
    "compare_devices",
    "matmul_speed",
    "synchronize",
]

Phase = Literal["train", "inference"]

#: Seconds each timed measurement aims for when ``steps="auto"``.
_AUTO_BUDGET = 1.0
_AUTO_MIN_STEPS, _AUTO_MAX_STEPS = 3, 200
#: Distinct batches kept in memory per batch size; timing cycles through them.
_POOL_BATCHES = 4

_NO_GPU = (
    "no GPU was found: only the CPU was timed. On Colab: Runtime > Change runtime type > "
    "Hardware accelerator: GPU (e.g. T4); on Kaggle: Settings > Accelerator > GPU; then rerun"
)


# -- seams ------------------------------------------------------------------------------------------
def clock() -> float:
    """The timer every measurement reads (the seam tests replace)."""
    return time.perf_counter()


def synchronize(device: torch.device) -> None:
    """Wait until every queued kernel on ``device`` has finished (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# -- shared helpers ---------------------------------------------------------------------------------
def _resolve_devices(
    devices: str | torch.device | Sequence[str | torch.device],
) -> tuple[list[torch.device], list[str]]:
    """The devices to time and notes about the ones skipped."""
    notes: list[str] = []
    if isinstance(devices, str) and devices == "all":
        # A GPU that fails colabkit's check is left out; usable_cuda_devices() warns why.
        found = [torch.device("cpu"), *_device.usable_cuda_devices()]
        if _device.backend.mps_available():
            found.append(torch.device("mps"))
        return found, notes
    requested = [devices] if isinstance(devices, (str, torch.device)) else list(devices)
    if not requested:
        raise ArgumentError("devices=[] names no device; pass 'all' or e.g. ['cpu', 'cuda']")
    chosen: list[torch.device] = []
    for item in requested:
        try:
            parsed = item if isinstance(item, torch.device) else torch.device(str(item).strip().lower())
        except RuntimeError:
            raise ArgumentError(
                f"devices={devices!r}: {item!r} is not a device; use 'all', 'cpu', 'cuda', 'cuda:1' or 'mps'"
            ) from None
        if parsed.type == "cuda":
            if parsed.index is None:
                parsed = torch.device("cuda", 0)
            usable = _device.usable_cuda_devices()
            if parsed not in usable:
                listed = ", ".join(map(str, usable)) or "none"
                notes.append(f"{parsed} skipped: it is not a usable GPU here (usable GPUs: {listed})")
                continue
        elif parsed.type == "mps":
            if not _device.backend.mps_available():
                notes.append("mps skipped: the MPS backend is not available")
                continue
        elif parsed.type != "cpu":
            raise ArgumentError(f"devices={devices!r}: {item!r} is not a device colabkit times; use cpu, cuda or mps")
        if parsed not in chosen:
            chosen.append(parsed)
    if not chosen:
        raise ArgumentError(f"devices={devices!r}: none of them can be used here ({'; '.join(notes)}); pass 'all'")
    return chosen, notes


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU, {torch.get_num_threads()} threads"


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArgumentError(f"{name}={value!r} must be a positive integer or 'auto'")
    return value


def _format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        # Text left, numbers right: columns of figures are read by their last digits.
        cells = [c.rjust(w) if _is_number(c) else c.ljust(w) for c, w in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("x%"))
    except ValueError:
        return False
    return True


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    foot = "".join(f"<p><i>{html.escape(note)}</i></p>" for note in notes)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{foot}"


# -- compare_devices --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PhaseTiming:
    """One measurement of :func:`compare_devices`.

    Attributes:
        device: ``"cpu"``, ``"cuda:0"``, ...
        device_name: What the device is, e.g. ``"Tesla T4"``.
        phase: ``"train"`` (forward, backward, optimizer step) or ``"inference"`` (forward only).
        batch_size: Samples per step.
        steps: Timed steps (after warm-up).
        seconds: Wall time of the timed steps.
        speedup: Samples per second relative to the CPU for the same phase and batch size
            (None when the CPU was not timed).
        precision: ``"fp32"``, or the autocast precision used (``"fp16"``, ``"bf16"``).
    """

    device: str
    device_name: str
    phase: Phase
    batch_size: int
    steps: int
    seconds: float
    speedup: float | None = None
    precision: str = "fp32"

    @property
    def samples_per_s(self) -> float:
        """Throughput: samples processed per second."""
        return self.batch_size * self.steps / self.seconds if self.seconds > 0 else math.inf

    @property
    def ms_per_step(self) -> float:
        """Milliseconds per step."""
        return 1000.0 * self.seconds / self.steps


@dataclasses.dataclass(frozen=True)
class DeviceComparison:
    """What :func:`compare_devices` measured: one :class:`PhaseTiming` per device, phase and batch size.

    Print it for a table, display it in a notebook for an HTML table, call :meth:`plot` for a bar chart.

    Attributes:
        timings: The measurements, CPU first.
        notes: Remarks such as "no GPU was found".
    """

    timings: tuple[PhaseTiming, ...]
    notes: tuple[str, ...] = ()

    @property
    def devices(self) -> list[str]:
        """The devices timed, in order."""
        return list(dict.fromkeys(t.device for t in self.timings))

    @property
    def gpu_found(self) -> bool:
        """Whether any accelerator (not the CPU) was timed."""
        return any(t.device != "cpu" for t in self.timings)

    def get(self, device: str, phase: Phase, batch_size: int | None = None) -> PhaseTiming:
        """The measurement for one device and phase (and batch size, if several were timed).

        Raises:
            KeyError: Nothing was measured for that combination.
        """
        for timing in self.timings:
            if timing.device == device and timing.phase == phase and batch_size in (None, timing.batch_size):
                return timing
        raise KeyError(f"no timing for device={device!r}, phase={phase!r}, batch_size={batch_size!r}")

    def speedup(self, device: str, phase: Phase = "train", batch_size: int | None = None) -> float | None:
        """How many times faster than the CPU ``device`` ran ``phase``."""
        return self.get(device, phase, batch_size).speedup

    def to_rows(self) -> list[dict[str, Any]]:
        """The table as a list of dicts (e.g. for ``pandas.DataFrame``)."""
        return [
            {
                "device": t.device,
                "device_name": t.device_name,
                "precision": t.precision,
                "phase": t.phase,
                "batch_size": t.batch_size,
                "steps": t.steps,
                "seconds": t.seconds,
                "ms_per_step": t.ms_per_step,
                "samples_per_s": t.samples_per_s,
                "speedup_vs_cpu": t.speedup,
            }
            for t in self.timings
        ]

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        headers = ["device", "phase", "batch", "steps", "seconds", "ms/step", "samples/s", "vs CPU"]
        rows = [
            [
                f"{t.device} ({t.device_name}{'' if t.precision == 'fp32' else ', ' + t.precision})",
                t.phase,
                str(t.batch_size),
                str(t.steps),
                f"{t.seconds:.3f}",
                f"{t.ms_per_step:.2f}",
                f"{t.samples_per_s:,.0f}".replace(",", ""),
                "-" if t.speedup is None else f"{t.speedup:.2f}x",
            ]
            for t in self.timings
        ]
        return headers, rows

    def __str__(self) -> str:
        headers, rows = self._cells()
        return "\n".join([_format_table(headers, rows), *self.notes])

    def _repr_html_(self) -> str:
        headers, rows = self._cells()
        return _html_table(headers, rows, self.notes)

    def plot(self, *, ax: Axes | None = None, path: str | Path | None = None) -> Figure:
        """Bar chart of samples per second, grouped by phase, one bar per device.

        Each bar is labelled with its samples per second and, for an accelerator, its speed-up
        over the CPU. The axis is linear from zero, so bar heights compare directly, unless the
        fastest bar is over 100 times the slowest (a big GPU against a CPU): then it is
        logarithmic, so the CPU's bars stay visible. Tick labels are plain numbers.

        Args:
            ax: Axes to draw on; default: a new figure.
            path: Also save the chart there (PNG, SVG, PDF by suffix).

        Returns:
            The matplotlib Figure, as :meth:`colabkit.History.plot` returns. In a notebook it is
            shown once, as the cell's result (so end the cell with this call, without ``;``);
            in a script call ``plt.show()`` or pass ``path=``. With ``ax=`` it is that Axes'
            figure, left open for you to finish.

        Raises:
            MissingDependencyError: matplotlib is not installed.
        """
        ax, created = _plot.axes(ax, "DeviceComparison.plot()")
        groups = list(dict.fromkeys((t.phase, t.batch_size) for t in self.timings))
        devices = self.devices
        width = 0.8 / max(len(devices), 1)
        for d_index, device in enumerate(devices):
            xs, heights, labels = [], [], []
            for g_index, (phase, batch_size) in enumerate(groups):
                with contextlib.suppress(KeyError):
                    timing = self.get(device, phase, batch_size)
                    xs.append(g_index + (d_index - (len(devices) - 1) / 2) * width)
                    heights.append(timing.samples_per_s)
                    label = f"{timing.samples_per_s:,.0f}/s"
                    if device != "cpu" and timing.speedup is not None:
                        label += f"\n{timing.speedup:.1f}x CPU"
                    labels.append(label)
            bars = ax.bar(xs, heights, width=width, label=device)
            ax.bar_label(bars, labels=labels, fontsize=8)
        several_sizes = len({b for _, b in groups}) > 1
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{p}\nbatch {b}" if several_sizes else p for p, b in groups])
        ax.set_ylabel("samples / second")
        _plot.bar_scale(ax, [t.samples_per_s for t in self.timings])
        ax.set_title("Training and inference throughput by device" + ("" if self.gpu_found else " (no GPU found)"))
        ax.legend()
        return _plot.finish(ax, path, created=created)


def _pool(data: Any, batch_sizes: Sequence[int] | None) -> dict[int, list[Any]]:
    """A few CPU batches per batch size, gathered before any clock starts (data loading is not timed)."""
    size = None if batch_sizes is None else max(batch_sizes)
    loader = ordered_loader(data, argument="data", batch_size=size, num_workers=0, pin_memory=False)
    if batch_sizes is None:
        batches = list(itertools.islice(loader, _POOL_BATCHES))
        if not batches:
            raise ArgumentError("data gave no batches; pass a non-empty Dataset or DataLoader")
        return {batch_length(batches[0]) or 1: batches}
    # Re-batch samples to each requested size from one pool of samples.
    needed = max(batch_sizes) * _POOL_BATCHES
    taken: list[Any] = []
    count = 0
    for batch in forever(loader):
        taken.append(batch)
        count += batch_length(batch) or 1
        if count >= needed:
            break
    samples = concat(taken)
    return {
        size: [slice_batch(samples, i * size, (i + 1) * size, count) for i in range(_POOL_BATCHES)]
        for size in batch_sizes
    }


def _time_steps(
    step: Callable[[Any], None],
    batches: Sequence[Any],
    device: torch.device,
    *,
    steps: int | None,
    warmup: int,
) -> tuple[int, float]:
    """Run warm-up steps, then time ``steps`` steps (or as many as fill the auto budget)."""
    index = 0

    def run(count: int) -> float:
        nonlocal index
        synchronize(device)
        start = clock()
        for _ in range(count):
            step(batches[index % len(batches)])
            index += 1
        synchronize(device)
        return clock() - start

    run(warmup)
    if steps is None:
        # One probe step sizes the run to the budget, so slow devices are not timed for minutes.
        probe = max(run(1), 1e-6)
        steps = int(min(max(_AUTO_BUDGET / probe, _AUTO_MIN_STEPS), _AUTO_MAX_STEPS))
    return steps, run(steps)


def compare_devices(
    model: nn.Module,
    data: Any,
    *,
    devices: str | torch.device | Sequence[str | torch.device] = "all",
    steps: int | Literal["auto"] = "auto",
    batch_sizes: Sequence[int] | Literal["auto"] = "auto",
    phases: Sequence[Phase] = ("train", "inference"),
    loss_fn: Callable[..., torch.Tensor] | Literal["auto"] = "auto",
    precision: str = "fp32",
    warmup: int | Literal["auto"] = "auto",
    progress: bool = True,
) -> DeviceComparison:
    """Time training steps and inference of ``model`` on each device, CPU first.

    Each device gets its own copy of the model (yours is not changed or moved).
    A few batches are taken from ``data`` up front and reused, so the timing is
    of compute and host-to-device copies, not of data loading. Every
    measurement runs warm-up steps first and synchronises the device before
    and after the clock.

    Args:
        model: The model to time.
        data: What :func:`colabkit.fit` takes: a Dataset or DataLoader of ``(inputs, targets)``
            batches (or dicts with a ``"labels"`` key), or an ``(inputs, targets)`` pair of tensors;
            a Dataset is batched by 32, fit()'s default.
        devices: ``"all"`` (CPU and every usable GPU), one device or a list such as ``["cpu", "cuda"]``.
        steps: Timed steps per measurement; ``"auto"`` runs about one second's worth (3 to 200).
        batch_sizes: Batch sizes to time; ``"auto"`` keeps the data's own batch size.
        phases: ``"train"`` (forward, loss, backward, SGD step) and/or ``"inference"`` (forward only).
        loss_fn: Loss for the train phase, as in :func:`colabkit.fit`; ``"auto"``: fit()'s default,
            cross-entropy for integer labels.
        precision: ``"fp32"`` (the same arithmetic everywhere: a like-for-like comparison), or
            ``"auto"`` for what :func:`colabkit.fit` would use on each device (fp16 autocast with a
            GradScaler on a T4, bf16 on newer GPUs, fp32 on the CPU), or ``"fp16"`` / ``"bf16"``.
        warmup: Untimed steps before each measurement; ``"auto"``: 2 on the CPU, 5 on GPUs.
        progress: Show a progress bar.

    Returns:
        A :class:`DeviceComparison`: print it for the table, ``.plot()`` for the chart,
        ``.speedup("cuda:0", "train")`` for one number.

    Raises:
        ArgumentError: A device, option or the data cannot be used.

    Example:
        >>> result = colabkit.compare_devices(model, train_loader)  # doctest: +SKIP
        >>> print(result)  # doctest: +SKIP
        >>> result.plot()  # doctest: +SKIP
    """
    timed_steps = None if steps == "auto" else _positive_int("steps", steps)
    if warmup != "auto" and (isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0):
        raise ArgumentError(f"warmup={warmup!r} must be a non-negative integer or 'auto'")
    sizes = None if batch_sizes == "auto" else [_positive_int("batch_sizes", b) for b in batch_sizes]
    if sizes is not None and not sizes:
        raise ArgumentError("batch_sizes=[] names no batch size; pass 'auto' or e.g. [32, 128]")
    if not phases or any(p not in ("train", "inference") for p in phases):
        raise ArgumentError(f"phases={phases!r}: use a non-empty list of 'train' and 'inference'")
    criterion = LossFn(check_loss_fn(None if loss_fn == "auto" else loss_fn))
    resolve_precision(precision, torch.device("cpu"))  # rejects an unknown name before any work
    targets, notes = _resolve_devices(devices)
    pool = _pool(data, sizes)
    if any(d.type == "cuda" for d in targets):
        # As DataLoader(pin_memory=True) in real training: page-locked batches copy asynchronously.
        pool = {size: [_pin(batch) for batch in batches] for size, batches in pool.items()}
    if not any(d.type != "cpu" for d in targets):
        notes.append(_NO_GPU)  # said once, with the table it explains (not also while timing)

    timings: list[PhaseTiming] = []
    work = [(d, p, b) for d in targets for b in pool for p in phases]
    bar = display.bar(len(work), desc="compare_devices", unit="run", enabled=progress)
    try:
        for device in targets:
            name = _device_name(device)
            policy = resolve_precision(precision, device)
            replica = copy.deepcopy(model).to(device)
            optimizer = torch.optim.SGD(replica.parameters(), lr=1e-4)
            n_warmup = (2 if device.type == "cpu" else 5) if warmup == "auto" else int(warmup)
            for batch_size, batches in pool.items():
                for phase in phases:
                    bar.note(f"{device} {phase} batch {batch_size}")
                    step = (
                        _train_step(replica, optimizer, criterion, device, policy)
                        if phase == "train"
                        else _infer_step(replica, device, policy)
                    )
                    with model_mode(replica, train=phase == "train"), _no_grad_unless(phase == "train"):
                        count, seconds = _time_steps(step, batches, device, steps=timed_steps, warmup=n_warmup)
                    timings.append(
                        PhaseTiming(str(device), name, phase, batch_size, count, seconds, precision=policy.name)
                    )
                    bar.update(1)
            del replica, optimizer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        bar.close()
    return DeviceComparison(tuple(_with_speedups(timings)), tuple(notes))


def _no_grad_unless(training: bool) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext() if training else torch.inference_mode()


def _pin(batch: Any) -> Any:
    """``batch`` in page-locked memory, as DataLoader(pin_memory=True) gives it in real training."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, Mapping):
        return {key: _pin(value) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_pin(value) for value in batch)
    return batch


def _train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, criterion: LossFn, device: torch.device, policy: Precision
) -> Callable[[Any], None]:
    scaler = policy.make_scaler()

    def step(batch: Any) -> None:
        inputs, targets = inputs_and_targets(_device.to_device(batch, device))
        _, loss = forward(model, inputs, targets, criterion, policy.autocast)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:  # fp16: scale the loss so small gradients do not underflow, as fit() does
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def _infer_step(model: nn.Module, device: torch.device, policy: Precision) -> Callable[[Any], None]:
    def step(batch: Any) -> None:
        with policy.autocast():
            call_model(model, inputs_only(_device.to_device(batch, device)))

    return step


def _with_speedups(timings: list[PhaseTiming]) -> list[PhaseTiming]:
    baseline = {(t.phase, t.batch_size): t.samples_per_s for t in timings if t.device == "cpu"}
    result = []
    for t in timings:
        base = baseline.get((t.phase, t.batch_size))
        speedup = None if base is None or not math.isfinite(base) or base <= 0 else t.samples_per_s / base
        result.append(dataclasses.replace(t, speedup=speedup))
    return result


# -- matmul_speed -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MatmulTiming:
    """One matrix-multiply measurement: ``size x size`` times ``size x size`` in ``dtype`` on ``device``.

    Attributes:
        device: ``"cpu"``, ``"cuda:0"``, ...
        device_name: What the device is.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        size: Matrix side.
        repeats: Timed multiplications.
        seconds: Wall time of the timed multiplications.
        speedup: TFLOP/s relative to the CPU in float32 at the same size (None without a CPU float32 run).
    """

    device: str
    device_name: str
    dtype: str
    size: int
    repeats: int
    seconds: float
    speedup: float | None = None

    @property
    def tflops(self) -> float:
        """Trillions of floating-point operations per second (2·n³ per multiplication)."""
        return 2.0 * self.size**3 * self.repeats / self.seconds / 1e12 if self.seconds > 0 else math.inf


@dataclasses.dataclass(frozen=True)
class MatmulResult:
    """What :func:`matmul_speed` measured. Print it, display it, or ``.plot()`` it.

    Attributes:
        timings: One :class:`MatmulTiming` per device, dtype and size.
        notes: Remarks (no GPU found, combinations skipped).
    """

    timings: tuple[MatmulTiming, ...]
    notes: tuple[str, ...] = ()

    @property
    def gpu_found(self) -> bool:
        """Whether any accelerator (not the CPU) was timed."""
        return any(t.device != "cpu" for t in self.timings)

    def get(self, device: str, dtype: str, size: int) -> MatmulTiming:
        """The measurement for one combination.

        Raises:
            KeyError: It was not measured.
        """
        for timing in self.timings:
            if (timing.device, timing.dtype, timing.size) == (device, dtype, size):
                return timing
        raise KeyError(f"no matmul timing for device={device!r}, dtype={dtype!r}, size={size!r}")

    def best(self, device: str) -> MatmulTiming:
        """The fastest measurement on ``device``.

        Raises:
            KeyError: ``device`` was not measured.
        """
        mine = [t for t in self.timings if t.device == device]
        if not mine:
            raise KeyError(f"no matmul timing for device={device!r}")
        return max(mine, key=lambda t: t.tflops)

    def to_rows(self) -> list[dict[str, Any]]:
        """The table as a list of dicts."""
        return [
            {
                "device": t.device,
                "device_name": t.device_name,
                "dtype": t.dtype,
                "size": t.size,
                "repeats": t.repeats,
                "seconds": t.seconds,
                "tflops": t.tflops,
                "speedup_vs_cpu_float32": t.speedup,
            }
            for t in self.timings
        ]

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        headers = ["device", "dtype", "size", "repeats", "seconds", "TFLOP/s", "vs CPU fp32"]
        rows = [
            [
                f"{t.device} ({t.device_name})",
                t.dtype,
                str(t.size),
                str(t.repeats),
                f"{t.seconds:.3f}",
                f"{t.tflops:.3f}",
                "-" if t.speedup is None else f"{t.speedup:.1f}x",
            ]
            for t in self.timings
        ]
        return headers, rows

    def __str__(self) -> str:
        headers, rows = self._cells()
        return "\n".join([_format_table(headers, rows), *self.notes])

    def _repr_html_(self) -> str:
        headers, rows = self._cells()
        return _html_table(headers, rows, self.notes)

    def plot(self, *, ax: Axes | None = None, path: str | Path | None = None) -> Figure:
        """Bar chart of TFLOP/s by matrix size, one bar per device and dtype.

        The axis is linear from zero unless the values span more than a factor of 100 (a GPU in
        float16 against a CPU): then it is logarithmic. Tick labels are plain numbers.

        Args:
            ax: Axes to draw on; default: a new figure.
            path: Also save the chart there.

        Returns:
            The matplotlib Figure, as :meth:`colabkit.History.plot` returns. In a notebook it is
            shown once, as the cell's result (so end the cell with this call, without ``;``);
            in a script call ``plt.show()`` or pass ``path=``. With ``ax=`` it is that Axes'
            figure, left open for you to finish.

        Raises:
            MissingDependencyError: matplotlib is not installed.
        """
        ax, created = _plot.axes(ax, "MatmulResult.plot()")
        sizes = sorted({t.size for t in self.timings})
        series = list(dict.fromkeys((t.device, t.dtype) for t in self.timings))
        width = 0.8 / max(len(series), 1)
        for s_index, (device, dtype) in enumerate(series):
            xs, heights = [], []
            for x, size in enumerate(sizes):
                with contextlib.suppress(KeyError):
                    heights.append(self.get(device, dtype, size).tflops)
                    xs.append(x + (s_index - (len(series) - 1) / 2) * width)
            ax.bar(xs, heights, width=width, label=f"{device} {dtype}")
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels([f"{n}x{n}" for n in sizes])
        ax.set_ylabel("TFLOP/s")
        _plot.bar_scale(ax, [t.tflops for t in self.timings])
        ax.set_title("Matrix multiply throughput" + ("" if self.gpu_found else " (no GPU found)"))
        ax.legend(fontsize=8)
        return _plot.finish(ax, path, created=created)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def matmul_speed(
    sizes: Sequence[int] | Literal["auto"] = "auto",
    dtypes: Sequence[str] | Literal["auto"] = "auto",
    *,
    devices: str | torch.device | Sequence[str | torch.device] = "all",
    repeats: int | Literal["auto"] = "auto",
    progress: bool = True,
) -> MatmulResult:
    """Measure matrix-multiply throughput (TFLOP/s) per device and dtype.

    The "is the GPU really N times faster?" check: square matrices of each size
    are multiplied on each device after a warm-up, with device synchronisation
    around the clock.

    Args:
        sizes: Matrix sides; ``"auto"``: 512, 1024 and 2048 (plus 4096 when a GPU is timed).
        dtypes: Any of ``"float32"``, ``"float16"``, ``"bfloat16"``; ``"auto"``: float32 on the
            CPU, float32 and float16 on GPUs (where tensor cores make half precision fast).
        devices: ``"all"``, one device or a list.
        repeats: Timed multiplications per measurement; ``"auto"`` fills about a second (3 to 200).
        progress: Show a progress bar.

    Returns:
        A :class:`MatmulResult`; ``result.best("cuda:0").tflops`` is the peak seen on the GPU.

    Raises:
        ArgumentError: A size, dtype or device cannot be used.

    Example:
        >>> print(colabkit.matmul_speed())  # doctest: +SKIP
    """
    targets, notes = _resolve_devices(devices)
    has_gpu = any(d.type != "cpu" for d in targets)
    if sizes == "auto":
        chosen_sizes = [512, 1024, 2048, 4096] if has_gpu else [512, 1024, 2048]
    else:
        chosen_sizes = [_positive_int("sizes", s) for s in sizes]
        if not chosen_sizes:
            raise ArgumentError("sizes=[] names no size; pass 'auto' or e.g. [1024, 4096]")
    if dtypes != "auto":
        unknown = [d for d in dtypes if d not in _DTYPES]
        if unknown or not dtypes:
            raise ArgumentError(f"dtypes={dtypes!r}: use some of {sorted(_DTYPES)} or 'auto'")
    timed_repeats = None if repeats == "auto" else _positive_int("repeats", repeats)
    if not has_gpu:
        notes.append(_NO_GPU)  # said once, with the table it explains (not also while timing)

    plan = []
    for device in targets:
        wanted = (["float32"] if device.type == "cpu" else ["float32", "float16"]) if dtypes == "auto" else list(dtypes)
        plan += [(device, dtype, size) for dtype in wanted for size in chosen_sizes]
    timings = []
    with display.bar(len(plan), desc="matmul_speed", unit="size", enabled=progress) as bar:
        for device, dtype, size in plan:
            bar.note(f"{device} {dtype} {size}")
            a = torch.randn(size, size, device=device).to(_DTYPES[dtype])
            b = torch.randn(size, size, device=device).to(_DTYPES[dtype])

            def step(_: Any, a: torch.Tensor = a, b: torch.Tensor = b) -> None:
                torch.mm(a, b)

            count, seconds = _time_steps(
                step, [(None, None)], device, steps=timed_repeats, warmup=1 if device.type == "cpu" else 3
            )
            timings.append(MatmulTiming(str(device), _device_name(device), dtype, size, count, seconds))
            bar.update(1)
            del a, b
    base = {t.size: t.tflops for t in timings if t.device == "cpu" and t.dtype == "float32"}
    with_speedup = tuple(
        dataclasses.replace(t, speedup=t.tflops / base[t.size] if t.size in base and base[t.size] > 0 else None)
        for t in timings
    )
    return MatmulResult(with_speedup, tuple(notes))
