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
(``_Trainer._epoch_batches``, the one place an epoch's batches come from).

Data: in-memory tensors (a TensorDataset, ``(x, y)``, or a plain DataLoader over a
TensorDataset) take the fast path of :mod:`colabkit.train.fastpath` (whole batches
by indexing on the same order, bitwise the DataLoader's, on the GPU when they fit);
anything else keeps the DataLoader. A notice at the start says which path runs.

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from colabkit import _io, _notify, drive
from colabkit import device as _device
from colabkit._signals import SignalFlag, save_on_signal
from colabkit.errors import (
    ArgumentError,
    CheckpointError,
    NonFiniteLossError,
)
from colabkit.runtime import runtime
from colabkit.session import SessionWatch
from colabkit.train import distributed as _dist
from colabkit.train import resume
from colabkit.train.batches import (
    LossFn,
    call_model,
    check_batch_size,
    check_loss_fn,
    concat,
    describe,
    detach_to_cpu,
    forward,
    inputs_and_targets,
    inputs_only,
    model_mode,
    safe_len,
    to_channels_last,
)
from colabkit.train.budget import TimeBudget
from colabkit.train.callbacks import Callback, EarlyStopping, FitContext
from colabkit.train.fastpath import TensorBatches, for_evaluation, for_training, path_notice
from colabkit.train.hints import DATA_WAIT, Advisor, EpochClock, FinishEstimate, RunFacts
from colabkit.train.history import History
from colabkit.train.metrics import Totals, resolve_metrics
from colabkit.train.oom import Backoff, batch_length, is_out_of_memory, split_batch
from colabkit.train.optim import make_optimizer, make_scheduler
from colabkit.train.options import FitOptions, check_model, parse_duration
from colabkit.train.precision import Precision, resolve_precision
from colabkit.train.progress import MEMORY_KEYS, REFRESH_SECONDS, Bars
from colabkit.train.state import TrainPosition, make_resumable, ordered_loader

__all__ = ["evaluate", "fit", "parse_duration", "predict"]

#: The clock every time decision reads (progress, time_limit, time-based saves): the seam tests replace.
_clock: Callable[[], float] = time.monotonic

#: Without a progress bar, losses are still checked for NaN this often.
QUIET_CHECK_SECONDS = 2.0
#: Buffered per-step values before they are summed on the device (bounds memory, no read).
MAX_BUFFER = 512
#: With DDP, ranks agree on signals / time limits every this many optimizer steps.
AGREE_EVERY = 8


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
    compile: bool = False,
    channels_last: bool = False,
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
        compile: Run the model through ``torch.compile``.
        channels_last: Use channels-last memory format for the model and 4-D inputs.

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
        totals = _run_eval(model, loader, where, policy, losses, metric_fns, bars, "evaluate")
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
) -> tuple[torch.nn.Module, torch.device, Precision, Any]:
    """evaluate() and predict(): the checked model on its device, the precision policy and the loader."""
    model = check_model(model)
    where = _model_device(model, device)
    policy = resolve_precision(precision, where)
    loader = ordered_loader(
        data, argument="data", batch_size=batch_size, num_workers=num_workers, pin_memory=where.type == "cuda"
    )
    model.to(where)
    fast = for_evaluation(data, batch_size=check_batch_size(batch_size), device=where)
    return model, where, policy, loader if fast is None else fast


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
    desc: str,
    stop: Callable[[], bool] | None = None,
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
    """One fit() call: set up, resume, train epoch by epoch, save, report."""

    def __init__(self, options: FitOptions, model: torch.nn.Module, train: Any, val: Any) -> None:
        o = self.o = options
        self.model = model
        self.dist, self.device = _dist.setup(_device.get_device(None if o.device == "auto" else o.device))
        self.is_main = self.dist.is_main
        self.policy = resolve_precision(o.precision, self.device)
        self.quiet = not (o.progress and self.is_main)
        self.loss_fn = LossFn(o.loss_fn)
        self.metric_names = [name for name, _ in o.metric_fns]
        self.step_callbacks = [cb for cb in o.callback_list if _overrides(cb, "on_step_end")]

        # Where the run stands: a resume replaces these (see _resume), every save writes them.
        self.pos = TrainPosition()
        self.history = History()
        self.seed = 0  # the run seed, known once the checkpoint is (see _resume)
        self.backoff = Backoff()
        self.totals = Totals(self.metric_names)  # this epoch's sums so far, on the device
        self.elapsed_before = 0.0  # seconds of this epoch spent before the resume
        self.pending_rng: Any = None  # RNG states to restore right before the first new batch
        self.epoch_rng: Any = None  # RNG states at the epoch's start (for a sampler drawing from them)
        self.saved_step = -1

        # Stop and save decisions: the budget, what is checked after every step, what the epoch's end does.
        self.budget = TimeBudget(
            o.time_limit_seconds, TimeBudget.guess_save_cost(model) if o.directory is not None else 0.0
        )
        # Whether some stop or save condition must be looked at after every step (else only
        # at an epoch's end, a signal or a callback's request): keeps the usual step cheap.
        self.check_every_step = (
            o.time_limit_seconds is not None
            or o.save_seconds is not None
            or o.save_steps is not None
            or o.max_steps is not None
            or self.dist.enabled
        )
        self.stop_after_epoch = ""
        self.save_after_epoch = False
        self.last_save_time = self.epoch_start = self.next_read = 0.0
        self.watch = SessionWatch() if o.session_time and self.is_main else None  # 30 / 10 minutes left
        self.signal_flag = SignalFlag()  # save_on_signal's flag while run() runs
        self.bars = Bars(not self.quiet)  # the table of epochs and the live bar
        self.epoch_clock = EpochClock(_clock)  # the wait for batches, the epochs' wall time
        self.finish = None if self.quiet else _finish_estimate(o)  # the finish against the session's end

        # 1. Data first, so a bad dataset fails before anything is created, loaded or moved.
        #    The seed (0 here) is set once the checkpoint is known; validation order is fixed anyway.
        self.train = self._loader(train, "train", shuffle=True)
        self.val = None if val is None else self._val_loader(val)
        self.epoch_length = len(self.train) if self.train.has_length() else None
        if self.epoch_length == 0:
            raise ArgumentError("train gives 0 batches per epoch (batch_size larger than the dataset with drop_last?)")

        # 2. Model, optimizer, scheduler and scaler on the device.
        model.to(self.device)
        if o.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(o.optimizer, model, o.lr)
        self.scheduler, self.per_step_scheduler = make_scheduler(o.scheduler, self.optimizer)
        self.scaler = self.policy.make_scaler()
        self.forward_model: Any = model
        self.data_notice = self._data_notice(train, val)

        # 3.-5. From here a CheckpointManager may be open: an error (e.g. another model's
        #    checkpoints) closes it before propagating, so nothing is left waiting.
        # This call's recipe, saved with every checkpoint (a rerun compares against it).
        self.recipe = resume.describe_run(
            model=model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            train=self.train,
            grad_accum=o.grad_accum,
            precision=self.policy.name,
        )
        self.manager = resume.open_manager(o, is_main=self.is_main, model=model)
        try:
            self._resume()
            # 5. What runs the forward pass: DDP and/or torch.compile around the model.
            self.forward_model = _dist.wrap_model(model, self.dist, self.device)
            if o.compile:
                self.forward_model = torch.compile(self.forward_model)
        except BaseException:
            if self.manager is not None:
                self.manager.__exit__(*sys.exc_info())
                self.manager = None
            raise
        self.ctx = FitContext(
            model=model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            history=self.history,
            epochs=o.epochs,
            checkpoint_dir=o.directory,
            is_main=self.is_main,
            monitored=self._monitored(),
        )
        # Warning signs, once each: not those a resumed run's History says were given already.
        size: int | None
        if isinstance(self.train, TensorBatches):
            size, workers = self.train.batch_sampler.batch_size, 0  # indexed in this process
        else:
            loader = self.train.loader
            size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)  # colabkit's own sampler
            workers = loader.num_workers
        self.advisor = Advisor(
            o.hint_names,
            given=[str(hint.get("name")) for hint in self.history.hints],
            facts=RunFacts(batch_size=size, grad_accum=o.grad_accum, num_workers=workers),
        )

    def _loader(self, data: Any, argument: str, *, shuffle: bool) -> Any:
        """The resumable batches of ``data``: the in-memory fast path for tensors, else a DataLoader."""
        loader = make_resumable(
            data,
            argument=argument,
            batch_size=self.o.batch_size,
            shuffle=shuffle,
            num_workers=self.o.num_workers,
            pin_memory=self.device.type == "cuda",
            seed=0,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        fast = for_training(data, loader, self.device, argument=argument)
        return loader if fast is None else fast

    def _val_loader(self, val: Any) -> Any:
        if self.dist.enabled and not isinstance(val, torch.utils.data.DataLoader):
            # Each rank validates its share; the sums are added up across ranks.
            shard = self._loader(val, "val", shuffle=False)
            return shard if isinstance(shard, TensorBatches) else shard.loader
        loader = ordered_loader(
            val,
            argument="val",
            batch_size=self.o.batch_size,
            num_workers=self.o.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        fast = for_evaluation(val, batch_size=check_batch_size(self.o.batch_size), device=self.device, argument="val")
        return loader if fast is None else fast

    def _data_notice(self, train: Any, val: Any) -> str:
        """Which path the data takes (the tensors are placed now, with the model already on the device)."""
        for batches in (self.train, self.val):
            if isinstance(batches, TensorBatches):
                batches.place()
        notice = f"data: train on the {path_notice(train, self.train, self.device)}"
        if val is not None:
            notice += f", val on the {path_notice(val, self.val, self.device, ordered=True)}"
        return notice

    def _resume(self) -> None:
        """3. The newest valid checkpoint, checked and restored; 4. the run seed."""
        o = self.o
        checkpoint, path = resume.find_checkpoint(o, self.manager)
        fit_state = checkpoint.get("fit", {})
        if checkpoint:
            self._say(f"resuming from {path}")
            resume.check_compatible(checkpoint, self.model, o.directory)
            self.recipe = resume.restore_weights(
                checkpoint,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                directory=o.directory,
                recipe=self.recipe,
                is_main=self.is_main,
            )
            if not fit_state:
                self._say("the checkpoint was not written by fit(): starting at epoch 1 from its weights")
        if fit_state:
            saved = resume.read_fit_state(
                fit_state,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                epoch_length=self.epoch_length,
                grad_accum=o.grad_accum,
                batch_size=self.recipe.get("batch_size"),
            )
            self.pos, self.history, self.backoff.chunks = saved.position, saved.history, saved.chunks
            self.totals.load_state_dict(saved.totals)
            self.elapsed_before = saved.epoch_seconds
            self.pending_rng, self.epoch_rng = saved.rng, saved.epoch_rng
            if self.backoff.chunks > 1:
                self._say(
                    f"resuming with {self.backoff.chunks} micro-batches per batch (after an earlier out-of-memory)"
                )
            resume.restore_callbacks(o.callback_list, saved.callbacks)
            # 4. Seed: the checkpoint's, else the argument's, else derived from torch's initial seed.
            self.seed = saved.seed
            if o.seed is not None and o.seed != self.seed:
                self._say(f"resuming with the checkpoint's seed {self.seed} (seed={o.seed} applies to new runs)")
        elif o.seed is not None:
            self.seed = _device.seed_everything(o.seed)
        else:
            self.seed = int(_dist.broadcast_object(torch.initial_seed() % 2**32))
        self.train.set_seed(self.seed)

    def _monitored(self) -> tuple[str, ...]:
        names = ["loss", *self.metric_names]
        if self.val is not None:
            names += [f"val_{name}" for name in names]
        return (*names, "lr")

    def _say(self, message: str) -> None:
        _notify.logger.info(message)
        if not self.quiet:
            _notify.say(message)

    # -- the run

    def run(self) -> History:
        o = self.o
        now = _clock()
        self.budget.start(now)
        self.last_save_time = now
        stop_reason = ""
        # The manager as a context: an error already propagating (a NaN loss, an interrupt) wins
        # over a failure while closing (a Drive copy that failed), which is then only warned about.
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(_dist.barrier)
            if self.manager is not None:
                if self.is_main and o.directory is not None:
                    # colab run kills the kernel right after the script: the checkpoints must
                    # leave DriveFS's cache before that, whichever way fit ends.
                    drive.flush_drive_when_script_ends(o.directory)
                cleanup.enter_context(self.manager)
            with save_on_signal() as self.signal_flag, self.bars:
                if self._finished():
                    self._say(f"training already finished (epoch {self.pos.epoch}/{o.epochs}, step {self.pos.step})")
                    self.history.stop_reason = self._done_reason()
                    return self.history
                self._say(self.data_notice)
                self.model.train()
                for callback in o.callback_list:
                    _hook(callback, "on_fit_start", self.ctx)
                self.bars.start_fit(o.epochs, self.pos.epoch, history=self.history.records)
                while not stop_reason and self.pos.epoch < o.epochs:
                    stop_reason = self._train_epoch()
                stop_reason = stop_reason or "completed"
                self._save(final=True)
                self.history.stop_reason = stop_reason
                for callback in o.callback_list:
                    _hook(callback, "on_fit_end", self.ctx)
                if stop_reason == "interrupted":
                    self._say(
                        f"stopped by {self.signal_flag.signal} at step {self.pos.step}; "
                        + ("checkpoint saved, rerun to continue" if self.manager else "returning the history so far")
                    )
                elif stop_reason == "time_limit":
                    self._say(f"time_limit reached at step {self.pos.step}; checkpoint saved, rerun to continue")
                self._check_session()
        return self.history

    def _check_session(self) -> None:
        if self.watch is not None:
            for message in self.watch.check():
                _notify.warn(message, stacklevel=2)

    def _finished(self) -> bool:
        done_steps = self.o.max_steps is not None and self.pos.step >= self.o.max_steps
        return self.pos.epoch >= self.o.epochs or done_steps

    def _done_reason(self) -> str:
        return "max_steps" if self.o.max_steps is not None and self.pos.step >= self.o.max_steps else "completed"

    def _epoch_batches(self, epoch: int) -> Iterator[Any]:
        """This epoch's batches from where the run stands: the one place an epoch's data comes from."""
        resumed_inside = self.pos.batch > 0
        if self.train.needs_epoch_rng:
            if resumed_inside and self.epoch_rng is not None:
                resume.restore_rng(self.epoch_rng)  # the unknown sampler draws this epoch's order again
            self.epoch_rng = resume.capture_rngs()
        iterator = self.train.epoch(epoch, skip=self.pos.batch)
        if self.pending_rng is not None:
            resume.restore_rng(self.pending_rng)  # after skipping, right before the first new batch
            self.pending_rng = None
        return iterator

    def _train_epoch(self) -> str:
        """One epoch (or its remainder after a resume). Returns a stop reason, or "" to go on."""
        o, pos = self.o, self.pos
        epoch = pos.epoch
        self.ctx.epoch, self.ctx.batch = epoch, pos.batch
        if not pos.batch:
            self.totals = Totals(self.metric_names)
            self.elapsed_before = 0.0
        self.epoch_clock.start(whole=not pos.batch)
        batches = self.epoch_clock.timed(self._epoch_batches(epoch))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.epoch_start = _clock()
        self.budget.epoch_started(self.epoch_start)
        self.next_read = self.epoch_start + (REFRESH_SECONDS if not self.quiet else QUIET_CHECK_SECONDS)
        self.bars.start_epoch(epoch, o.epochs, self.epoch_length, pos.batch)
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
            raise ArgumentError(
                f"train gave no batches in epoch {epoch + 1}"
                + (
                    ""
                    if epoch == 0
                    else " although earlier epochs had some: pass a Dataset or a DataLoader, not a generator or "
                    "iterator that can be read only once"
                )
                + "; check that the dataset yields (inputs, targets) batches"
            )
        if stop_reason and pos.batch != self.epoch_length:
            self._save()
            return stop_reason
        return self._end_epoch() or stop_reason

    # -- one optimizer step

    def _step(self, group: list[Any]) -> None:
        """One optimizer step: forward and backward over ``group`` (retried smaller after an OOM), clip, step."""
        while True:
            mark = self.totals.mark()
            try:
                samples = self._accumulate(group)
                break
            except Exception as exc:
                if not is_out_of_memory(exc):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise
            # Out of memory. Outside the except block: the traceback and the tensors it holds are gone.
            self.optimizer.zero_grad(set_to_none=True)
            self.totals.rollback(mark)
            self.backoff.handle(batch_length(group[0]) or 1, step=self.pos.step + 1, quiet=self.quiet)

        if self.o.clip_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.o.clip_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step if the scaled gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # frees the gradients' memory until the next backward
        if self.per_step_scheduler:
            self.scheduler.step()
        self.pos.step += 1
        self.pos.samples += samples

    def _accumulate(self, group: list[Any]) -> int:
        """Forward and backward of every batch in ``group``, in micro-batches after an OOM; returns the samples.

        Each piece's loss is weighted by its share of the group, so the gradients add up to those of
        the group's mean loss. Losses and metrics stay on the device (read later, in one go).
        """
        chunks, total, last, share = self.backoff.chunks, 0, len(group) - 1, 1.0 / len(group)
        where = (self.pos.step + 1, self.pos.epoch, self.pos.batch)
        for index, batch in enumerate(group):
            if self.device.type != "cpu":
                batch = _device.to_device(batch, self.device)
            inputs, target = inputs_and_targets(batch)
            if self.o.channels_last:
                inputs = to_channels_last(inputs)
            samples = batch_length(target) or batch_length(inputs) or 1
            pieces = [((inputs, target), samples)] if chunks == 1 else split_batch((inputs, target), chunks, samples)
            for number, ((piece_inputs, piece_target), size) in enumerate(pieces):
                # With DDP, gradients are all-reduced once, with the group's last backward.
                synced = not self.dist.enabled or (index == last and number == len(pieces) - 1)
                with contextlib.nullcontext() if synced else self.forward_model.no_sync():
                    first = not self.loss_fn.checked
                    output, loss = forward(self.forward_model, piece_inputs, piece_target, self.loss_fn, self.autocast)
                    if first:
                        self._check_metrics(output, piece_target)
                    weight = share * size / samples
                    scaled = loss * weight if weight != 1.0 else loss
                    # fp16: scale the loss so that small gradients do not underflow.
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                self.totals.add(loss.detach(), size, where)
                if self.o.metric_fns:
                    detached = output.detach()
                    for metric, (_, fn) in enumerate(self.o.metric_fns):
                        value, count = fn(detached, piece_target)
                        self.totals.add_metric(metric, value, count)
            total += samples
        return total

    @property
    def autocast(self) -> Callable[[], Any] | None:
        return None if self.policy.dtype is None else self.policy.autocast

    def _check_metrics(self, output: Any, target: Any) -> None:
        for name, fn in self.o.metric_fns:
            try:
                fn(output.detach(), target)
            except Exception as exc:
                raise ArgumentError(
                    f"metric {name!r} cannot be computed for outputs {describe(output)} and targets "
                    f"{describe(target)} ({str(exc).strip()[:200]}); choose metrics that fit the task, "
                    "e.g. metrics=() or metrics=('mae',) for regression"
                ) from exc

    # -- at each step boundary

    def _after_step(self, *, epoch_ends: bool) -> str:
        """Callbacks, progress, stop and save decisions after an optimizer step. Returns a stop reason."""
        # Background checkpoint copies that lost Drive (errno 107) wait for this thread to remount it.
        drive.recover_if_lost()
        pos = self.pos
        now = _clock()
        if self.step_callbacks:
            self.ctx.step, self.ctx.batch, self.ctx.loss = pos.step, pos.batch, self.totals.losses[-1]
            for callback in self.step_callbacks:
                callback.on_step_end(self.ctx)
        if now >= self.next_read or len(self.totals.losses) >= MAX_BUFFER:
            self._read(now)
        if not (epoch_ends or self.check_every_step or self.signal_flag.requested or self.ctx.stop_requested):
            return ""  # the usual step: nothing to decide
        return self._decide(now, epoch_ends=epoch_ends)

    def _decide(self, now: float, *, epoch_ends: bool) -> str:
        """Stop and save decisions at a step boundary. Returns a stop reason, or ""."""
        o, pos = self.o, self.pos
        # Local wishes first; with DDP all ranks must agree, so they vote every few steps.
        reason = ""
        if self.signal_flag.requested:
            reason = "interrupted"
        elif self.ctx.stop_requested:
            reason = self.ctx.stop_reason
        elif self.budget.expired(now):
            reason = "time_limit"
        timed_save = o.save_seconds is not None and now - self.last_save_time >= o.save_seconds
        if self.dist.enabled:
            if pos.step % AGREE_EVERY and not epoch_ends:
                reason, timed_save = "", False
            else:
                stop, timed_save = _dist.any_flags([bool(reason), timed_save], self.device)
                reason = (reason or "interrupted") if stop else ""
        if o.max_steps is not None and pos.step >= o.max_steps:
            reason = reason or "max_steps"

        save_due = (o.save_steps is not None and pos.step % o.save_steps == 0) or timed_save
        if epoch_ends:
            # The epoch's end saves (after validation) instead: one checkpoint, with the epoch's metrics.
            self.stop_after_epoch = reason
            self.save_after_epoch = save_due
        elif save_due and not reason:
            self._save()
        self.budget.step_ended(now)
        return reason

    def _read(self, now: float) -> None:
        """Read buffered losses and metrics from the device: NaN check, progress."""
        bad = self.totals.drain()
        if bad is not None:
            self._non_finite(bad)
        self._check_session()
        self.next_read = now + (REFRESH_SECONDS if not self.quiet else QUIET_CHECK_SECONDS)
        if not self.quiet:
            means = self.totals.means("")
            seconds = self.elapsed_before + now - self.epoch_start
            postfix = {key: value for key, value in means.items() if not math.isnan(value)}
            if seconds > 0:
                postfix["samples/s"] = self.totals.samples / seconds
            self.bars.steps(self.pos.batch, postfix)

    def _non_finite(self, where: tuple[int, int, int]) -> None:
        step, epoch, batch = where
        last = (
            f"the last checkpoint (step {self.saved_step}) is intact"
            if self.saved_step >= 0
            else "no checkpoint was saved"
        )
        raise NonFiniteLossError(
            f"the loss became NaN or infinite at optimizer step {step} (epoch {epoch + 1}, batch {batch}); {last}. "
            f"Try a lower learning rate (lr={self.o.lr:g} now), clip_grad_norm=1.0, precision='fp32' "
            f"(now {self.policy.name}), and check the inputs for NaN or extreme values"
        )

    # -- epoch end

    def _end_epoch(self) -> str:
        o, pos = self.o, self.pos
        bad = self.totals.drain()
        if bad is not None:
            self._non_finite(bad)
        train_totals = self.totals.summed(self._all_sum)  # this rank's sums stay as they are (saved)
        record: dict[str, Any] = {"epoch": pos.epoch, **train_totals.means("")}
        seconds = self.elapsed_before + _clock() - self.epoch_start
        waited = self.epoch_clock.wait_share()
        if self.val is not None:
            started = _clock()
            validation = self._validate()
            if validation is None:
                # Interrupted while validating: save as "every batch done, epoch not closed", so
                # the rerun skips straight to this epoch's validation and the History stays whole.
                self._save()
                return "interrupted"
            record.update(validation)
            self.budget.val_cost = _clock() - started
        record["lr"] = float(self.optimizer.param_groups[0]["lr"])
        record["time"] = round(seconds, 3)
        record["samples_per_sec"] = round(train_totals.samples / seconds, 1) if seconds > 0 else float("nan")
        if waited is not None:
            record[DATA_WAIT] = waited
        record.update(_peak_memory(self.device))
        self.history.append(record)
        self.bars.end_epoch(record)
        for hint in self.advisor.check(self.history.records):
            self.history.hints.append(hint.state_dict())  # saved with the History: not repeated after a resume
            self.bars.note(hint.name, f"hint: {hint.message}")
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
        reason = self.stop_after_epoch or self.ctx.stop_reason
        if self.dist.enabled:
            reason = (reason or "callback") if _dist.any_flags([bool(reason)], self.device)[0] else ""
        if self.is_main and o.directory is not None:
            self._write_history(o.directory / "history.csv")
        self._check_session()
        if o.save_epoch or self.save_after_epoch or reason or pos.epoch >= o.epochs:
            self._save(metrics=record)
        self.stop_after_epoch, self.save_after_epoch = "", False
        self._say_finish()
        self.totals = Totals(self.metric_names)
        self.elapsed_before = 0.0
        return reason

    def _say_finish(self) -> None:
        """After each epoch, validated and saved: when the run will end, against the session's end."""
        self.epoch_clock.end()
        if self.finish is None:
            return
        o, pos = self.o, self.pos
        left: float = o.epochs - pos.epoch
        if o.max_steps is not None and self.epoch_length:
            left = min(left, (o.max_steps - pos.step) * o.grad_accum / self.epoch_length)
        message = self.finish.check(
            epochs_left=left, seconds_per_epoch=self.epoch_clock.seconds_per_epoch(), now=_clock()
        )
        if message:
            self.bars.note("finish", message)

    def _write_history(self, path: Path) -> None:
        """history.csv beside the checkpoints; on Drive a lost connection (errno 107) is remounted here."""

        def write() -> None:
            # On Drive the folder may not exist yet: the mirror creates it with its first copy, in the background.
            path.parent.mkdir(parents=True, exist_ok=True)
            self.history.to_csv(path)

        try:
            drive.drive_retry(write)
        except OSError as exc:
            if not _io.is_transient(exc):
                raise
            # The checkpoints hold the history too; a flaky Drive must not end the run.
            _notify.warn(f"could not write {path} ({exc}); the checkpoints keep the history, training goes on")

    def _validate(self) -> dict[str, float] | None:
        """Validation metrics (summed over ranks), or None if a signal arrived meanwhile (single process)."""
        # With DDP every rank must finish the same collectives, so validation runs to its end there.
        stop = None if self.dist.enabled else (lambda: self.signal_flag.requested)
        with model_mode(self.model, train=False):
            totals = _run_eval(
                self.forward_model,
                self.val,
                self.device,
                self.policy,
                self.loss_fn,
                self.o.metric_fns,
                self.bars,
                "validate",
                stop,
            )
        if totals is None:
            return None
        return totals.summed(self._all_sum).means("val_")

    def _all_sum(self, values: list[float]) -> list[float]:
        return _dist.all_sum(values, self.device)

    # -- saving

    def _save(self, *, metrics: Mapping[str, Any] | None = None, final: bool = False) -> None:
        """Checkpoint at this step boundary (rank 0 writes; every rank contributes its RNG state)."""
        pos = self.pos
        if self.o.directory is None or pos.step == self.saved_step or (final and pos.step == 0):
            return
        bad = self.totals.drain()  # never save a model that a NaN step already spoiled
        if bad is not None:
            self._non_finite(bad)
        started = _clock()
        rngs = resume.capture_rngs()
        if self.manager is not None:
            state = resume.state_to_save(
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                position=pos,
                seed=self.seed,
                chunks=self.backoff.chunks,
                grad_accum=self.o.grad_accum,
                epoch_length=self.epoch_length,
                world_size=self.dist.world_size,
                rngs=rngs,
                epoch_rng=self.epoch_rng if self.train.needs_epoch_rng and pos.batch else None,
                totals=self.totals.state_dict(),
                epoch_seconds=self.elapsed_before + (_clock() - self.epoch_start if pos.batch else 0.0),
                history=self.history,
                callbacks=self.o.callback_list,
                recipe=self.recipe,
            )
            clean = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self.manager.save(state, step=pos.step, metrics=clean or None)
        self.saved_step = pos.step
        self.last_save_time = _clock()
        self.budget.saved(self.last_save_time - started)
        if self.budget.times_flush and self.manager is not None:
            # The run's end waits for the commit and the copies (Drive) as well: time them once,
            # so time_limit stops early enough for the whole save to finish before the limit.
            with contextlib.suppress(CheckpointError):  # each failure was warned about when it happened
                self.manager.wait()
            self.budget.flushed(_clock() - self.last_save_time)


def _finish_estimate(o: FitOptions) -> FinishEstimate:
    return FinishEstimate(
        platform={"colab": "Colab", "kaggle": "Kaggle"}.get(runtime().kind, ""),
        stops_at_session_end=o.session_time,
        resumable=o.directory is not None,
    )


def _peak_memory(device: torch.device) -> dict[str, float]:
    """This epoch's peak GPU memory and the device's total, in GB (CUDA only).

    The caching allocator keeps these numbers on the host: reading them does not wait for the GPU.
    Reserved, not allocated, memory: what the process holds, as nvidia-smi and Colab show it.
    """
    if device.type != "cuda":
        return {}
    total = torch.cuda.get_device_properties(device).total_memory
    return {
        MEMORY_KEYS[0]: round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
        MEMORY_KEYS[1]: round(total / 2**30, 2),
    }


def _overrides(callback: Any, name: str) -> bool:
    method = getattr(type(callback), name, None)
    return method is not None and method is not getattr(Callback, name)


def _hook(callback: Any, name: str, ctx: FitContext) -> None:
    method = getattr(callback, name, None)
    if callable(method):
        method(ctx)
