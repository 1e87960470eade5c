"""fit(), evaluate() and predict(): the training loop, readable top to bottom.

One optimizer step, in order: take ``grad_accum`` batches from the loader;
for each, move it to the device, cut it into micro-batches if an earlier
out-of-memory error asked for that, run forward and loss under autocast,
backward (through the GradScaler for fp16); clip, step, zero the gradients,
step a per-step scheduler. Then, at this step boundary only: callbacks,
progress (at most every 0.5 s), the stop checks (signal, callback,
``max_steps``, ``time_limit``) and the save checks. Nothing in a step reads a
value back from the GPU: losses and metrics stay on the device in a list and
are read in one go when progress, a save or the epoch's end needs them.

Resume (:mod:`colabkit.train.resume`): the checkpoint holds model, optimizer,
scheduler and scaler states, the position, the run seed, the partial epoch's
sums, the History, callback states and every RNG state. The data order of an
epoch depends only on ``(seed, epoch)`` (see :mod:`colabkit.train.state`), so
the loader skips the finished batches without loading them; the RNG states
are restored after that, right before the first new batch
(:meth:`RunState.epoch_batches <colabkit.train.runstate.RunState.epoch_batches>`, the one place
an epoch's batches come from).

Data: the loop reads a :class:`~colabkit.train.datapath.Batches` and never asks which
implementation it has. In-memory tensors (a TensorDataset, ``(x, y)``, or a plain DataLoader
over a TensorDataset) take the fast path of :mod:`colabkit.train.fastpath` (whole batches by
indexing on the same order, bitwise the DataLoader's, on the GPU when they fit); anything
else keeps the DataLoader. A notice at the start says which path runs.

The parts: :class:`~colabkit.train.runstate.RunState` (where the run stands, saved and
restored whole), :class:`~colabkit.train.cadence.Cadence` (when to read, stop and save, on
``_clock``), :class:`~colabkit.train.reporter.Reporter` (everything said to the user) and
:mod:`colabkit.train.resume` (checkpoints in and out); ``_Trainer`` conducts them.

Ending: the checkpoint manager is closed however the run ends; an error on
its way out (a NaN loss, another model's checkpoints) wins over a failure
while closing (a Drive copy), which is warned about. ``time_limit`` keeps
room for two more steps, a validation and a whole save
(:mod:`colabkit.train.budget`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from colabkit import device as _device
from colabkit import drive
from colabkit._signals import save_on_signal
from colabkit.errors import (
    ArgumentError,
    CheckpointError,
    NonFiniteLossError,
)
from colabkit.train import distributed as _dist
from colabkit.train import resume
from colabkit.train.batches import (
    LossFn,
    call_model,
    check_loss_fn,
    concat,
    detach_to_cpu,
    forward,
    inputs_and_targets,
    inputs_only,
    model_mode,
    safe_len,
    to_channels_last,
)
from colabkit.train.budget import TimeBudget
from colabkit.train.cadence import MAX_BUFFER, Cadence
from colabkit.train.callbacks import Callback, EarlyStopping, FitContext
from colabkit.train.compiling import compile_model
from colabkit.train.datapath import Batches, evaluation_batches, training_batches, validation_batches
from colabkit.train.history import History
from colabkit.train.layout import use_channels_last
from colabkit.train.metrics import Totals, check_metrics, resolve_metrics
from colabkit.train.oom import batch_length, is_out_of_memory, split_batch
from colabkit.train.optim import make_optimizer, make_scheduler
from colabkit.train.options import FitOptions, check_model, parse_duration
from colabkit.train.precision import Precision, resolve_precision
from colabkit.train.progress import Bars
from colabkit.train.reporter import Reporter, peak_memory
from colabkit.train.runstate import capture_rngs

__all__ = ["evaluate", "fit", "parse_duration", "predict"]

#: The clock every time decision reads (progress, time_limit, time-based saves): the seam tests replace.
_clock: Callable[[], float] = time.monotonic


# --------------------------------------------------------------------------- public API


def fit(
    model: torch.nn.Module,
    train: Any,
    val: Any = None,
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    optimizer: Any = None,
    lr: float = 1e-3,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    scheduler: Any = None,
    metrics: Sequence[str | Callable[..., Any]] = ("accuracy",),
    device: str | torch.device = "auto",
    precision: str = "auto",
    grad_accum: int = 1,
    clip_grad_norm: float | None = None,
    batch_size: int | None = None,
    num_workers: int | str = "auto",
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    takeover: bool = False,
    save_every: str | int = "epoch",
    keep_last: int = 2,
    monitor: str = "val_loss",
    early_stopping: int | EarlyStopping | None = None,
    time_limit: str | float | timedelta | None = None,
    callbacks: Iterable[Any] = (),
    progress: bool = True,
    hints: bool | Iterable[str] = True,
    seed: int | None = None,
    compile: bool | str = False,
    channels_last: bool | str = "auto",
) -> History:
    """Train ``model`` on ``train``; resumes by itself from ``checkpoint_dir``.

    Rerunning the same cell after a disconnect continues exactly where the
    last checkpoint left off (mid-epoch included). SIGTERM and a notebook
    interrupt save at the next step boundary and return the History so far;
    a second interrupt stops at once.

    Args:
        model: The ``torch.nn.Module`` to train (moved to ``device``).
        train: A Dataset or DataLoader of ``(inputs, targets)`` batches (or dicts with a
            ``"labels"``/``"target"``/``"y"`` key). A DataLoader keeps its options;
            colabkit swaps in a resumable sampler.
        val: Validation Dataset or DataLoader, evaluated after every epoch.
        epochs: Number of epochs.
        max_steps: Stop after this many optimizer steps in total (across resumes).
        optimizer: An optimizer for ``model``'s parameters, or a factory called with the
            parameters (e.g. ``torch.optim.SGD`` gets ``lr=lr``); default AdamW at ``lr`` (fused where torch has it).
        lr: Learning rate of the default optimizer or of a factory.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; default cross-entropy for integer labels.
        scheduler: An LR scheduler, a factory ``f(optimizer)``, or ``(scheduler, "step" | "epoch")``.
            Without the tuple, OneCycleLR, CyclicLR and LambdaLR step every optimizer step, others
            every epoch (ReduceLROnPlateau with ``monitor``).
        metrics: Names (``"accuracy"``, ``"top5_accuracy"``, ``"mae"``, ``"mse"``) or callables
            ``f(outputs, targets) -> batch mean``.
        device: ``"auto"`` (best working accelerator) or a device.
        precision: ``"auto"`` (bf16 on Ampere+, fp16 with GradScaler on T4/P100, fp32 on CPU),
            ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        grad_accum: Batches whose gradients add up before each optimizer step.
        clip_grad_norm: Clip the gradients' global norm to this value.
        batch_size: Batch size when ``train``/``val`` are Datasets (default 32, as everywhere in colabkit).
        num_workers: DataLoader workers for Datasets (``"auto"``: 0 for in-memory tensors, else up to 4).
        checkpoint_dir: Folder for checkpoints (and ``history.csv``); enables resume.
        resume: Continue from the newest valid checkpoint in ``checkpoint_dir``.
        takeover: Take ``checkpoint_dir`` over even while another run holds its lease; that
            run stops saving at its next heartbeat. Without it a second run on one folder (a
            second tab, a second runtime on the same Drive folder) is refused before training.
            A holder whose process is gone, or whose heartbeat is 5 minutes old, is taken
            over anyway.
        save_every: ``"epoch"``, a number of optimizer steps, or a duration such as ``"10min"``.
        keep_last: Checkpoints to keep (the best one by ``monitor`` is kept as well).
        monitor: Record column that ranks checkpoints and drives ReduceLROnPlateau
            (``"loss"`` is used when there is no ``val``).
        early_stopping: Patience in epochs, or an :class:`EarlyStopping`.
        time_limit: Stop cleanly, with a checkpoint, before this much time passes in this call:
            ``"2h30m"``, seconds, a timedelta, or ``"session"`` (the runtime's remaining
            session time minus 10 minutes; warns when 30 and 10 minutes are left). The
            stop leaves room for the final save, Drive copy included.
        callbacks: :class:`Callback` objects (or anything with some of its methods).
        progress: Show the table of epochs (one HTML table in a notebook, a line per epoch
            elsewhere), the live bar and notices; False prints nothing.
        hints: Say the warning signs (loss not falling, overfitting, GPU memory near full,
            waiting for data) once each, with the fix: True, False, or the names to keep
            (``"lr"``, ``"overfitting"``, ``"memory"``, ``"input"``). Given hints are kept in
            ``History.hints``. After the first epoch fit() also says when the run will finish,
            against the session's end on Colab and Kaggle.
        seed: Seed for python, numpy and torch, data order and augmentation; saved in the
            checkpoint (without it, one is derived from torch's initial seed).
        compile: Run the model through ``torch.compile``: False, True (its default mode),
            ``"reduce-overhead"`` (CUDA graphs; the default mode off CUDA) or ``"max-autotune"``.
            Full batches run compiled, a smaller last batch eagerly (no recompile). With
            ``checkpoint_dir`` the compiled artifacts are saved in its ``compile-cache/``
            folder, so a rerun in a fresh runtime skips most of the compiling.
        channels_last: Channels-last memory format for the model and 4-D inputs: ``"auto"``
            (on for models with 2-D convolutions under bf16/fp16 on CUDA), True or False.

    Rerunning with other settings: the checkpoint records what the run was trained with,
    and each setting that differs is reported and handled as follows (start over with
    ``resume=False`` or a new ``checkpoint_dir`` to train from scratch instead)::

        changed on rerun        what happens
        ----------------------  ---------------------------------------------------------------
        lr                      the new lr applies; a scheduler keeps its position, scaled to it
        weight decay, betas,    the new values apply (written into the restored optimizer)
          momentum, eps, ...
        optimizer class         the new optimizer starts with empty state; weights, position and
                                the schedule's progress resume
        scheduler class         the new scheduler starts at its beginning, at its own start lr
        scheduler settings      the checkpoint's values win (a warning says so)
        batch_size              applies; inside an epoch the position carries over in samples
        grad_accum              applies from the next optimizer step
        precision               applies; fp16's loss scale restarts unless both runs use fp16
        training set length     applies; an interrupted epoch is not an exact continuation
        model, param groups     refused: CheckpointMismatchError
        seed                    the checkpoint's seed wins

    Returns:
        The :class:`History` of all epochs, including those before a resume.

    Raises:
        ArgumentError: An argument is unusable (detected before the first step where possible).
        CheckpointInUseError: Another run writes ``checkpoint_dir`` (its lease is held); the
            message names it and the ways forward.
        CheckpointError: ``checkpoint_dir`` is a file, read-only, or its disk too full for a
            checkpoint (checked before training; the last good checkpoint stays).
        CheckpointMismatchError: ``checkpoint_dir`` holds another model's checkpoints.
        NonFiniteLossError: The loss became NaN or infinite.
        OutOfMemoryBackoffError: Out of memory even with a micro-batch of one sample.

    Example:
        >>> history = colabkit.fit(model, train_set, val_set, epochs=10,
        ...                        checkpoint_dir="/content/drive/MyDrive/run1")  # doctest: +SKIP
        >>> history.plot()  # doctest: +SKIP
    """
    check_model(model)
    options = FitOptions.of(locals(), has_val=val is not None)  # every keyword argument, checked
    return _Trainer(options, model, train, val).run()


def evaluate(
    model: torch.nn.Module,
    data: Any,
    *,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    metrics: Sequence[str | Callable[..., Any]] = ("accuracy",),
    device: str | torch.device = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    num_workers: int | str = "auto",
    progress: bool = True,
) -> dict[str, float]:
    """Loss and metrics of ``model`` on ``data``, without gradients.

    Args:
        model: The model (put in eval mode for the call, then back).
        data: A Dataset or DataLoader of ``(inputs, targets)``.
        loss_fn: As in :func:`fit`; default cross-entropy for integer labels.
        metrics: As in :func:`fit`.
        device: ``"auto"`` keeps the model where its parameters are.
        precision: As in :func:`fit`.
        batch_size: For a Dataset (default 32, as everywhere in colabkit).
        num_workers: For a Dataset.
        progress: Show a progress bar.

    Returns:
        ``{"loss": ..., "accuracy": ...}``.

    Example:
        >>> colabkit.evaluate(model, test_set)  # doctest: +SKIP
        {'loss': 0.31, 'accuracy': 0.91}
    """
    metric_fns = resolve_metrics(metrics)
    losses = LossFn(check_loss_fn(loss_fn))
    model, where, policy, loader = _prepare_eval(model, data, device, precision, batch_size, num_workers)
    with model_mode(model, train=False), Bars(progress) as bars:
        totals = _run_eval(model, loader, where, policy, losses, metric_fns, bars, desc="evaluate")
    assert totals is not None  # no stop condition given
    return totals.means("")


def predict(
    model: torch.nn.Module,
    data: Any,
    *,
    device: str | torch.device = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    num_workers: int | str = "auto",
    progress: bool = True,
) -> Any:
    """``model``'s outputs for every sample of ``data``, concatenated on the CPU.

    Batches may be inputs alone or ``(inputs, targets)`` (targets are ignored).

    Args:
        model: The model (eval mode for the call).
        data: A Dataset, DataLoader or tensor of inputs.
        device: ``"auto"`` keeps the model where its parameters are.
        precision: As in :func:`fit`.
        batch_size: For a Dataset or tensor (default 32, as everywhere in colabkit).
        num_workers: For a Dataset.
        progress: Show a progress bar.

    Returns:
        A tensor (or a tuple / dict of tensors, matching what the model returns).

    Example:
        >>> logits = colabkit.predict(model, test_set)  # doctest: +SKIP
        >>> labels = logits.argmax(1)  # doctest: +SKIP
    """
    if isinstance(data, torch.Tensor):
        data = torch.utils.data.TensorDataset(data)
    model, where, policy, loader = _prepare_eval(model, data, device, precision, batch_size, num_workers)
    outputs: list[Any] = []
    with model_mode(model, train=False), torch.no_grad(), Bars(progress) as bars:
        bars.start_eval("predict", safe_len(loader))
        for batch in loader:
            batch = _device.to_device(batch, where) if where.type != "cpu" else batch
            inputs = inputs_only(batch)
            with policy.autocast():
                out = call_model(model, inputs)
            outputs.append(detach_to_cpu(out))
            bars.eval_step()
        bars.end_eval()
    if not outputs:
        raise ArgumentError("data is empty (0 batches); nothing to predict")
    return concat(outputs)


def _prepare_eval(
    model: Any, data: Any, device: str | torch.device, precision: str, batch_size: int | None, num_workers: int | str
) -> tuple[torch.nn.Module, torch.device, Precision, Batches]:
    """evaluate() and predict(): the checked model on its device, the precision policy and the batches."""
    model = check_model(model)
    where = _model_device(model, device)
    policy = resolve_precision(precision, where)
    batches = evaluation_batches(data, argument="data", batch_size=batch_size, num_workers=num_workers, device=where)
    model.to(where)
    return model, where, policy, batches


def _model_device(model: torch.nn.Module, device: str | torch.device) -> torch.device:
    if device == "auto":
        for parameter in model.parameters():
            return parameter.device
        return _device.get_device()
    return _device.get_device(device)


def _run_eval(
    model: Any,
    loader: Any,
    where: torch.device,
    policy: Precision,
    loss_fn: LossFn,
    metrics: Sequence[tuple[str, Callable[..., Any]]],
    bars: Bars,
    stop: Callable[[], bool] | None = None,
    *,
    desc: str = "validate",
) -> Totals | None:
    """Loss and metric sums over ``loader`` without gradients (shared by evaluate() and fit()'s validation).

    Returns None when ``stop()`` turned true before the end (an interrupt during validation).
    """
    totals = Totals([name for name, _ in metrics])
    bars.start_eval(desc, safe_len(loader))
    with torch.no_grad():
        for batch in loader:
            if stop is not None and stop():
                bars.end_eval()
                return None
            batch = _device.to_device(batch, where) if where.type != "cpu" else batch
            inputs, target = inputs_and_targets(batch)
            output, loss = forward(model, inputs, target, loss_fn, policy.autocast)
            samples = batch_length(target) or 1
            totals.add(loss.detach(), samples, (0, 0, 0))
            for index, (_, fn) in enumerate(metrics):
                value, count = fn(output.detach(), target)
                totals.add_metric(index, value, count)
            if len(totals.losses) >= MAX_BUFFER:
                totals.drain()
            bars.eval_step()
    totals.drain()
    bars.end_eval()
    return totals


# --------------------------------------------------------------------------- the trainer


class _Trainer:
    """One fit() call: the conductor over its parts, read top to bottom.

    The parts, one job each: the batches (:mod:`~colabkit.train.datapath`), the run state saved
    and restored whole (:class:`~colabkit.train.runstate.RunState`), the decisions of when to
    read, stop and save (:class:`~colabkit.train.cadence.Cadence`), everything said to the user
    (:class:`~colabkit.train.reporter.Reporter`) and the checkpoints (:mod:`~colabkit.train.resume`).
    """

    def __init__(self, options: FitOptions, model: torch.nn.Module, train: Any, val: Any) -> None:
        o = self.o = options
        self.model = model
        self.dist, self.device = _dist.setup(_device.get_device(None if o.device == "auto" else o.device))
        self.policy = resolve_precision(o.precision, self.device)
        self.loss_fn = LossFn(o.loss_fn)
        self.step_callbacks = [cb for cb in o.callback_list if _overrides(cb, "on_step_end")]
        self.report = Reporter(o, clock=_clock, is_main=self.dist.is_main)
        self.cadence = Cadence(
            o,
            clock=_clock,
            quiet=self.report.quiet,
            save_guess=TimeBudget.guess_save_cost(model) if o.directory is not None else 0.0,
            vote=self._vote if self.dist.enabled else None,
        )

        # 1. Data first, so a bad dataset fails before anything is created, loaded or moved.
        #    The seed (0 here) is set once the checkpoint is known; validation order is fixed anyway.
        data: dict[str, Any] = {"batch_size": o.batch_size, "num_workers": o.num_workers, "device": self.device}
        self.train = training_batches(train, argument="train", shuffle=True, dist=self.dist, **data)
        self.val = None if val is None else validation_batches(val, dist=self.dist, **data)
        self.epoch_length = len(self.train) if self.train.has_length() else None
        if self.epoch_length == 0:
            raise ArgumentError("train gives 0 batches per epoch (batch_size larger than the dataset with drop_last?)")

        # 2. Model, optimizer, scheduler and scaler on the device; then the data is placed.
        model.to(self.device)
        self.channels_last = use_channels_last(
            o.channels_last, model=model, device=self.device, precision=self.policy.name
        )
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(o.optimizer, model, o.lr)
        self.scheduler, self.per_step_scheduler = make_scheduler(o.scheduler, self.optimizer)
        self.scaler = self.policy.make_scaler()
        self.forward_model: Any = model
        self.report.place_data(self.train, self.val)

        # 3.-5. From here a CheckpointManager may be open: an error (e.g. another model's
        #    checkpoints) closes it before propagating, so nothing is left waiting.
        self.manager = resume.open_manager(o, is_main=self.dist.is_main, model=model)
        try:
            self.state = resume.restore_run(
                o,
                self.manager,
                model=model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                train=self.train,
                precision=self.policy.name,
                dist=self.dist,
                say=self.report.say,
            )
            # 5. What runs the forward pass: DDP and/or torch.compile around the model.
            self.forward_model = _dist.wrap_model(model, self.dist, self.device)
        except BaseException:
            if self.manager is not None:
                self.manager.__exit__(*sys.exc_info())
                self.manager = None
            raise
        self.ctx = FitContext(
            model=model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            history=self.state.history,
            epochs=o.epochs,
            checkpoint_dir=o.directory,
            is_main=self.dist.is_main,
            monitored=self._monitored(),
        )
        self.report.watch_for(self.state.history, self.train)
        # 6. torch.compile around what runs the forward pass (colabkit.train.compiling), its cache by the checkpoints.
        self.compiled = compile_model(
            self.forward_model,
            o.compile,
            model=model,
            device=self.device,
            precision=self.policy.name,
            channels_last=self.channels_last,
            batch_size=self.train.batch_size,
            cache=resume.open_compile_cache(o, is_main=self.dist.is_main),
        )
        if self.compiled is not None:
            self.forward_model = self.compiled

    def _say_lines(self, message: str) -> None:
        for line in message.splitlines():
            self.report.say(line)

    def _monitored(self) -> tuple[str, ...]:
        names = ["loss", *(name for name, _ in self.o.metric_fns)]
        if self.val is not None:
            names += [f"val_{name}" for name in names]
        return (*names, "lr")

    # -- the run

    def run(self) -> History:
        o, state, report = self.o, self.state, self.report
        self.cadence.start()
        # The manager as a context: an error already propagating (a NaN loss, an interrupt) wins
        # over a failure while closing (a Drive copy that failed), which is then only warned about.
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(_dist.barrier)
            if self.manager is not None:
                if self.dist.is_main and o.directory is not None:
                    # colab run kills the kernel right after the script: the checkpoints must
                    # leave DriveFS's cache before that, whichever way fit ends.
                    drive.flush_drive_when_script_ends(o.directory)
                cleanup.enter_context(self.manager)
            if self.compiled is not None:
                cleanup.callback(self.compiled.close)
            with save_on_signal() as self.cadence.signal, report.bars:
                done = self.cadence.finished(state.pos.epoch, state.pos.step)
                if done:
                    report.say(f"training already finished (epoch {state.pos.epoch}/{o.epochs}, step {state.pos.step})")
                    state.history.stop_reason = done
                    return state.history
                report.say_data()
                self.model.train()
                for callback in o.callback_list:
                    _hook(callback, "on_fit_start", self.ctx)
                report.bars.start_fit(o.epochs, state.pos.epoch, history=state.history.records)
                stop_reason = ""
                while not stop_reason and state.pos.epoch < o.epochs:
                    stop_reason = self._train_epoch()
                stop_reason = stop_reason or "completed"
                self._save(final=True)
                state.history.stop_reason = stop_reason
                for callback in o.callback_list:
                    _hook(callback, "on_fit_end", self.ctx)
                signal = self.cadence.signal.signal
                report.stopped(stop_reason, step=state.pos.step, signal=signal, resumable=self.manager is not None)
                report.check_session()
        return state.history

    def _train_epoch(self) -> str:
        """One epoch (or its remainder after a resume). Returns a stop reason, or "" to go on."""
        o, state, pos = self.o, self.state, self.state.pos
        epoch = pos.epoch
        self.ctx.epoch, self.ctx.batch = epoch, pos.batch
        self.report.start_epoch(epoch, self.epoch_length, pos.batch)
        batches = self.report.timed(state.epoch_batches(self.train, epoch))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        state.start_epoch(self.cadence.start_epoch())
        for callback in o.callback_list:
            _hook(callback, "on_epoch_start", self.ctx)

        group: list[Any] = []
        stop_reason = ""
        for batch in batches:
            group.append(batch)
            pos.batch += 1
            if len(group) < o.grad_accum and pos.batch != self.epoch_length:
                continue
            self._step(group)
            group = []
            stop_reason = self._after_step(epoch_ends=pos.batch == self.epoch_length)
            if stop_reason:
                break
        else:
            if group:  # a loader without len() ended inside a group
                self._step(group)
                stop_reason = self._after_step(epoch_ends=True)
        if pos.batch == 0:
            raise _no_batches(epoch)
        if stop_reason and pos.batch != self.epoch_length:
            self._save()
            return stop_reason
        return self._end_epoch() or stop_reason

    # -- one optimizer step

    def _step(self, group: list[Any]) -> None:
        """One optimizer step: forward and backward over ``group`` (retried smaller after an OOM), clip, step."""
        state = self.state
        while True:
            mark = state.totals.mark()
            if self.compiled is not None:
                self.compiled.set_chunks(state.backoff.chunks)
            try:
                samples = self._accumulate(group)
                break
            except Exception as exc:
                if not is_out_of_memory(exc):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise
            # Out of memory. Outside the except block: the traceback and the tensors it holds are gone.
            self.optimizer.zero_grad(set_to_none=True)
            state.totals.rollback(mark)
            state.backoff.handle(batch_length(group[0]) or 1, step=state.pos.step + 1, quiet=self.report.quiet)

        if self.o.clip_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.o.clip_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step if the scaled gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        # Frees the gradients' memory until the next backward (CUDA graphs: zeroed in place, see compiling).
        self.optimizer.zero_grad(set_to_none=self.compiled is None or not self.compiled.keeps_grads)
        if self.per_step_scheduler:
            self.scheduler.step()
        state.pos.step += 1
        state.pos.samples += samples
        if self.compiled is not None:
            self._say_lines(self.compiled.after_step())

    def _accumulate(self, group: list[Any]) -> int:
        """Forward and backward of every batch in ``group``, in micro-batches after an OOM; returns the samples.

        Each piece's loss is weighted by its share of the group, so the gradients add up to those of
        the group's mean loss. Losses and metrics stay on the device (read later, in one go).
        """
        state = self.state
        chunks, total, last, share = state.backoff.chunks, 0, len(group) - 1, 1.0 / len(group)
        where = (state.pos.step + 1, state.pos.epoch, state.pos.batch)
        autocast = None if self.policy.dtype is None else self.policy.autocast
        for index, batch in enumerate(group):
            if self.device.type != "cpu":
                batch = _device.to_device(batch, self.device)
            inputs, target = inputs_and_targets(batch)
            if self.channels_last:
                inputs = to_channels_last(inputs)
            samples = batch_length(target) or batch_length(inputs) or 1
            pieces = [((inputs, target), samples)] if chunks == 1 else split_batch((inputs, target), chunks, samples)
            for number, ((piece_inputs, piece_target), size) in enumerate(pieces):
                # With DDP, gradients are all-reduced once, with the group's last backward.
                synced = not self.dist.enabled or (index == last and number == len(pieces) - 1)
                with contextlib.nullcontext() if synced else self.forward_model.no_sync():
                    first = not self.loss_fn.checked
                    output, loss = forward(self.forward_model, piece_inputs, piece_target, self.loss_fn, autocast)
                    if first:
                        check_metrics(self.o.metric_fns, output, piece_target)
                    weight = share * size / samples
                    scaled = loss * weight if weight != 1.0 else loss
                    # fp16: scale the loss so that small gradients do not underflow.
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                state.totals.add(loss.detach(), size, where)
                if self.o.metric_fns:
                    detached = output.detach()
                    for metric, (_, fn) in enumerate(self.o.metric_fns):
                        value, count = fn(detached, piece_target)
                        state.totals.add_metric(metric, value, count)
            total += samples
        return total

    # -- at each step boundary

    def _after_step(self, *, epoch_ends: bool) -> str:
        """Callbacks, progress, stop and save decisions after an optimizer step. Returns a stop reason."""
        # Background checkpoint copies that lost Drive (errno 107) wait for this thread to remount it.
        drive.recover_if_lost()
        state, pos = self.state, self.state.pos
        now = self.cadence.clock()
        if self.step_callbacks:
            self.ctx.step, self.ctx.batch, self.ctx.loss = pos.step, pos.batch, state.totals.losses[-1]
            for callback in self.step_callbacks:
                callback.on_step_end(self.ctx)
        if self.cadence.read_due(now, len(state.totals.losses)):
            self._drain()
            self.report.check_session()
            self.cadence.was_read(now)
            self.report.steps(pos.batch, state.totals, state.epoch_seconds(now))
        reason, save = self.cadence.after_step(now, pos.step, epoch_ends=epoch_ends, asked=self.ctx.stop_reason)
        if save:
            self._save()
        return reason

    def _drain(self) -> None:
        """Read the buffered losses and metrics from the device; a NaN or infinite loss ends the run."""
        bad = self.state.totals.drain()
        if bad is not None:
            raise _non_finite(bad, saved_step=self.cadence.saved_step, lr=self.o.lr, precision=self.policy.name)

    # -- epoch end

    def _end_epoch(self) -> str:
        o, state, pos, clock = self.o, self.state, self.state.pos, self.cadence.clock
        self._drain()
        train_totals = state.totals.summed(self._all_sum)  # this rank's sums stay as they are (saved)
        record: dict[str, Any] = {"epoch": pos.epoch, **train_totals.means("")}
        seconds = state.epoch_seconds(clock())
        waited = self.report.wait_record()
        if self.val is not None:
            started = clock()
            validation = self._validate()
            if validation is None:
                # Interrupted while validating: save as "every batch done, epoch not closed", so
                # the rerun skips straight to this epoch's validation and the History stays whole.
                self._save()
                return "interrupted"
            record.update(validation)
            self.cadence.validated(clock() - started)
        record["lr"] = float(self.optimizer.param_groups[0]["lr"])
        record["time"] = round(seconds, 3)
        record["samples_per_sec"] = round(train_totals.samples / seconds, 1) if seconds > 0 else float("nan")
        record.update(waited)
        record.update(peak_memory(self.device))
        state.history.append(record)
        self.report.end_epoch(record, state.history)
        pos.epoch += 1
        pos.batch = 0
        if self.scheduler is not None and not self.per_step_scheduler:
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(record.get(o.monitor, record["loss"]))
            else:
                self.scheduler.step()
        self.ctx.logs, self.ctx.epoch, self.ctx.step = record, pos.epoch - 1, pos.step
        for callback in o.callback_list:
            _hook(callback, "on_epoch_end", self.ctx)
        reason, save = self.cadence.after_epoch(asked=self.ctx.stop_reason, epochs_done=pos.epoch)
        self.report.write_history(state.history)
        self.report.check_session()
        if save:
            self._save(metrics=record)
        if self.compiled is not None:
            self._say_lines(self.compiled.save_cache())  # validation's graphs, compiled this epoch
        self.report.say_finish(pos, epoch_length=self.epoch_length, now=clock())
        state.new_epoch()
        return reason

    def _validate(self) -> dict[str, float] | None:
        """Validation metrics (summed over ranks), or None if a signal arrived meanwhile (single process)."""
        assert self.val is not None
        # With DDP every rank must finish the same collectives, so validation runs to its end there.
        stop = None if self.dist.enabled else (lambda: self.cadence.signal.requested)
        where, policy, bars = self.device, self.policy, self.report.bars
        with model_mode(self.model, train=False):
            totals = _run_eval(self.forward_model, self.val, where, policy, self.loss_fn, self.o.metric_fns, bars, stop)
        return None if totals is None else totals.summed(self._all_sum).means("val_")

    def _all_sum(self, values: list[float]) -> list[float]:
        return _dist.all_sum(values, self.device)

    def _vote(self, flags: list[bool]) -> list[bool]:
        return _dist.any_flags(flags, self.device)

    # -- saving

    def _save(self, *, metrics: Mapping[str, Any] | None = None, final: bool = False) -> None:
        """Checkpoint at this step boundary (rank 0 writes; every rank contributes its RNG state)."""
        state, step, clock = self.state, self.state.pos.step, self.cadence.clock
        if self.o.directory is None or step == self.cadence.saved_step or (final and step == 0):
            return
        self._drain()  # never save a model that a NaN step already spoiled
        started = clock()
        rngs = capture_rngs()
        if self.manager is not None:
            checkpoint = resume.checkpoint(
                state.state_dict(rngs=rngs, now=clock()),
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
            )
            clean = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self.manager.save(checkpoint, step=step, metrics=clean or None)
        saved_at = self.cadence.saved(step, started)
        if self.cadence.times_flush and self.manager is not None:
            # The run's end waits for the commit and the copies (Drive) as well: time them once,
            # so time_limit stops early enough for the whole save to finish before the limit.
            with contextlib.suppress(CheckpointError):  # each failure was warned about when it happened
                self.manager.wait()
            self.cadence.flushed(saved_at)


def _non_finite(where: tuple[int, int, int], *, saved_step: int, lr: float, precision: str) -> NonFiniteLossError:
    step, epoch, batch = where
    last = f"the last checkpoint (step {saved_step}) is intact" if saved_step >= 0 else "no checkpoint was saved"
    return NonFiniteLossError(
        f"the loss became NaN or infinite at optimizer step {step} (epoch {epoch + 1}, batch {batch}); {last}. "
        f"Try a lower learning rate (lr={lr:g} now), clip_grad_norm=1.0, precision='fp32' "
        f"(now {precision}), and check the inputs for NaN or extreme values"
    )


def _no_batches(epoch: int) -> ArgumentError:
    return ArgumentError(
        f"train gave no batches in epoch {epoch + 1}"
        + (
            ""
            if epoch == 0
            else " although earlier epochs had some: pass a Dataset or a DataLoader, not a generator or "
            "iterator that can be read only once"
        )
        + "; check that the dataset yields (inputs, targets) batches"
    )


def _overrides(callback: Any, name: str) -> bool:
    method = getattr(type(callback), name, None)
    return method is not None and method is not getattr(Callback, name)


def _hook(callback: Any, name: str, ctx: FitContext) -> None:
    method = getattr(callback, name, None)
    if callable(method):
        method(ctx)
