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

Resume: the checkpoint holds model, optimizer, scheduler and scaler states,
the position (epoch, batches done in the epoch, optimizer steps), the run
seed, the partial epoch's sums, the History, callback states and every RNG
state. The data order of an epoch depends only on ``(seed, epoch)`` (see
:mod:`colabkit.train.state`), so the loader skips the finished batches
without loading them; the RNG states are restored after that, right before
the first new batch.

Ending: the checkpoint manager is closed however the run ends; an error on
its way out (a NaN loss, another model's checkpoints) wins over a failure
while closing (a Drive copy), which is warned about. ``time_limit`` keeps
room for two more steps, a validation and a whole save: RAM copy, commit and
copies, as timed at the first save of the run (estimated from the model's
size before that).
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

from colabkit import _notify
from colabkit import device as _device
from colabkit.errors import (
    ArgumentError,
    CheckpointError,
    CheckpointMismatchError,
    ColabkitError,
    NonFiniteLossError,
)
from colabkit.train import distributed as _dist
from colabkit.train.batches import (
    call_model,
    concat,
    describe,
    detach_to_cpu,
    inputs_and_targets,
    inputs_only,
    safe_len,
    to_channels_last,
)
from colabkit.train.callbacks import Callback, EarlyStopping, FitContext
from colabkit.train.hints import DATA_WAIT, Advisor, EpochClock, FinishEstimate, RunFacts
from colabkit.train.history import History, metric_mode
from colabkit.train.metrics import LossFn, Totals, resolve_metrics
from colabkit.train.oom import Backoff, batch_length, is_out_of_memory, split_batch
from colabkit.train.optim import make_optimizer, make_scheduler
from colabkit.train.options import FitOptions, check_loss_fn, check_model, is_int, parse_duration
from colabkit.train.precision import Precision, resolve_precision
from colabkit.train.progress import MEMORY_KEYS, REFRESH_SECONDS, Bars
from colabkit.train.state import TrainPosition, make_resumable, resolve_workers

__all__ = ["evaluate", "fit", "parse_duration", "predict"]

#: The clock every time decision reads (progress, time_limit, time-based saves): the seam tests replace.
_clock: Callable[[], float] = time.monotonic

#: Without a progress bar, losses are still checked for NaN this often.
QUIET_CHECK_SECONDS = 2.0
#: Buffered per-step values before they are summed on the device (bounds memory, no read).
MAX_BUFFER = 512
#: With DDP, ranks agree on signals / time limits every this many optimizer steps.
AGREE_EVERY = 8
#: Write speed assumed for a checkpoint (Drive) until a save has been timed.
SLOW_WRITE_BYTES_PER_SECOND = 20e6

_CHECKPOINT_VERSION = 1


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
            parameters (e.g. ``torch.optim.SGD`` gets ``lr=lr``); default AdamW at ``lr``.
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
        batch_size: Batch size when ``train``/``val`` are Datasets (default 32).
        num_workers: DataLoader workers for Datasets (``"auto"``: 0 for in-memory tensors, else up to 4).
        checkpoint_dir: Folder for checkpoints (and ``history.csv``); enables resume.
        resume: Continue from the newest valid checkpoint in ``checkpoint_dir``.
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
        progress: Show the table of epochs, the live bar and notices; False prints nothing.
        hints: Say the warning signs (loss not falling, overfitting, GPU memory near full,
            waiting for data) once each, with the fix: True, False, or the names to keep
            (``"lr"``, ``"overfitting"``, ``"memory"``, ``"input"``). Given hints are kept
            in ``History.hints``.
        seed: Seed for python, numpy and torch, data order and augmentation; saved in the
            checkpoint (without it, one is derived from torch's initial seed).
        compile: Run the model through ``torch.compile``.
        channels_last: Use channels-last memory format for the model and 4-D inputs.

    Returns:
        The :class:`History` of all epochs, including those before a resume.

    Raises:
        ArgumentError: An argument is unusable (detected before the first step where possible).
        CheckpointMismatchError: ``checkpoint_dir`` holds another model's checkpoints.
        NonFiniteLossError: The loss became NaN or infinite.
        OutOfMemoryBackoffError: Out of memory even with a micro-batch of one sample.

    Example:
        >>> history = colabkit.fit(model, train_set, val_set, epochs=10,
        ...                        checkpoint_dir="/content/drive/MyDrive/run1")  # doctest: +SKIP
        >>> history.plot()  # doctest: +SKIP
    """
    options = FitOptions.check(
        model=model,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        loss_fn=loss_fn,
        metrics=metrics,
        grad_accum=grad_accum,
        clip_grad_norm=clip_grad_norm,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        save_every=save_every,
        keep_last=keep_last,
        monitor=monitor,
        early_stopping=early_stopping,
        time_limit=time_limit,
        callbacks=callbacks,
        progress=progress,
        hints=hints,
        seed=seed,
        compile=compile,
        channels_last=channels_last,
        has_val=val is not None,
    )
    trainer = _Trainer(
        options,
        model=model,
        train=train,
        val=val,
        optimizer=optimizer,
        scheduler=scheduler,
        device=device,
        precision=precision,
        batch_size=batch_size,
        num_workers=num_workers,
    )
    return trainer.run()


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
        batch_size: For a Dataset (default 32).
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
    with _eval_mode(model), Bars(progress) as bars:
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
        batch_size: For a Dataset or tensor (default 32).
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
    with _eval_mode(model), torch.no_grad(), Bars(progress) as bars:
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
    loader = _eval_loader(data, batch_size=batch_size, num_workers=num_workers, argument="data", where=where)
    model.to(where)
    return model, where, policy, loader


def _model_device(model: torch.nn.Module, device: str | torch.device) -> torch.device:
    if device == "auto":
        for parameter in model.parameters():
            return parameter.device
        return _device.get_device()
    return _device.get_device(device)


def _eval_loader(
    data: Any, *, batch_size: int | None, num_workers: int | str, argument: str, where: torch.device
) -> Any:
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    if not isinstance(data, (torch.utils.data.Dataset, torch.utils.data.IterableDataset)) and not (
        hasattr(data, "__getitem__") and hasattr(data, "__len__")
    ):
        raise ArgumentError(f"{argument} is a {type(data).__name__}; pass a torch Dataset or DataLoader")
    map_style = isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset)
    if map_style and len(data) == 0:
        raise ArgumentError(f"{argument} is empty (0 samples); check the dataset's path or filtering")
    size = 32 if batch_size is None else batch_size
    if not is_int(size) or size < 1:
        raise ArgumentError(f"batch_size={batch_size!r} must be a positive integer")
    return torch.utils.data.DataLoader(
        data,
        batch_size=size,
        shuffle=False,
        num_workers=resolve_workers(num_workers, data),
        pin_memory=where.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # do not draw worker seeds from the global RNG
    )


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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
            with policy.autocast():
                output = call_model(model, inputs)
                if not loss_fn.checked:
                    loss_fn.check(output, target)
                loss = loss_fn(output, target)
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

    def __init__(
        self,
        options: FitOptions,
        *,
        model: torch.nn.Module,
        train: Any,
        val: Any,
        optimizer: Any,
        scheduler: Any,
        device: str | torch.device,
        precision: str,
        batch_size: int | None,
        num_workers: int | str,
    ) -> None:
        self.o = options
        self.model = model
        chosen = _device.get_device(None if device == "auto" else device)
        self.dist, self.device = _dist.setup(chosen)
        self.is_main = self.dist.is_main
        self.policy = resolve_precision(precision, self.device)
        self.quiet = not (options.progress and self.is_main)
        self.loss_fn = LossFn(options.loss_fn)
        self.metric_fns = options.metrics
        self.metric_names = [name for name, _ in options.metrics]
        self.history = History()
        self.pos = TrainPosition()
        self.backoff = Backoff()
        self.totals = Totals(self.metric_names)
        self.manager: Any = None
        self._saved_step = -1
        self._epoch_rng: Any = None

        # 1. Data first, so a bad dataset fails before anything is created, loaded or moved.
        #    The run seed is only known after looking for a checkpoint; it is filled in at step 4.
        self.train = self._resumable(train, "train", batch_size, num_workers, shuffle=True)
        self.val = None if val is None else self._val_loader(val, batch_size, num_workers)
        self.epoch_length = len(self.train) if self.train.has_length() else None
        if self.epoch_length == 0:
            raise ArgumentError("train gives 0 batches per epoch (batch_size larger than the dataset with drop_last?)")

        # 2. Model, optimizer, scheduler and scaler on the device.
        model.to(self.device)
        if options.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(optimizer, model, options.lr)
        self.scheduler, self.per_step_scheduler = make_scheduler(scheduler, self.optimizer)
        self.scaler = self.policy.make_scaler()

        # 3.-5. From here a CheckpointManager may be open: an error (e.g. another model's
        #    checkpoints) closes it before propagating, so nothing is left waiting.
        try:
            self._setup_run(options, model)
        except BaseException:
            if self.manager is not None:
                self.manager.__exit__(*sys.exc_info())
                self.manager = None
            raise

    def _setup_run(self, options: FitOptions, model: torch.nn.Module) -> None:
        """Resume (steps 3-4), wrap the model (5) and restore callback states."""
        # 3. The newest valid checkpoint (rank 0 looks, every rank reads it): checked, then restored.
        checkpoint = self._find_checkpoint()
        fit_state = checkpoint.get("fit", {}) if checkpoint else {}
        if checkpoint:
            self._check_compatible(checkpoint)
            self._restore(checkpoint, fit_state)

        # 4. Seed: the checkpoint's, else the argument's, else derived from torch's initial seed.
        if fit_state:
            self.seed = int(fit_state["seed"])
            if options.seed is not None and options.seed != self.seed:
                self._say(f"resuming with the checkpoint's seed {self.seed} (seed={options.seed} applies to new runs)")
        elif options.seed is not None:
            self.seed = _device.seed_everything(options.seed)
        else:
            self.seed = int(_dist.broadcast_object(torch.initial_seed() % 2**32))
        self.train.set_seed(self.seed)

        # 5. What runs the forward pass: DDP and/or torch.compile around the model.
        self.forward_model: Any = _dist.wrap_model(model, self.dist, self.device)
        if options.compile:
            self.forward_model = torch.compile(self.forward_model)

        self.ctx = FitContext(
            model=model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            history=self.history,
            epochs=options.epochs,
            checkpoint_dir=options.checkpoint_dir,
            is_main=self.is_main,
            monitored=self._monitored(),
        )
        self.step_callbacks = [cb for cb in options.callbacks if _overrides(cb, "on_step_end")]
        self._ddp = self.dist.enabled
        self._on_accelerator = self.device.type != "cpu"
        if fit_state:
            for callback, state in zip(options.callbacks, fit_state.get("callbacks", []), strict=False):
                loader = getattr(callback, "load_state_dict", None)
                if callable(loader) and state:
                    loader(state)

    # -- setup helpers

    def _say(self, message: str) -> None:
        _notify.logger.info(message)
        if not self.quiet:
            _notify.say(message)

    def _find_checkpoint(self) -> dict[str, Any]:
        o = self.o
        if o.checkpoint_dir is None:
            return {}
        from colabkit.checkpoint import CheckpointManager

        if self.is_main:
            self.manager = CheckpointManager(
                o.checkpoint_dir,
                keep_last=o.keep_last,
                keep_best=1,
                monitor=o.monitor,
                mode=metric_mode(o.monitor),  # type: ignore[arg-type]
            )
        _dist.barrier()  # rank 0 has cleaned up leftovers before anyone reads
        if not o.resume:
            return {}
        latest = self.manager.latest() if self.is_main else None
        path = _dist.broadcast_object(None if latest is None else str(latest))
        if path is None:
            return {}
        if self.is_main:
            checkpoint = self.manager.load(path)
        else:
            from colabkit.checkpoint import load_checkpoint

            checkpoint = load_checkpoint(path)
        self._say(f"resuming from {path}")
        return checkpoint

    def _check_compatible(self, checkpoint: Mapping[str, Any]) -> None:
        saved = checkpoint.get("model_state_dict")
        if not isinstance(saved, Mapping):
            raise CheckpointMismatchError(
                f"checkpoint_dir={str(self.o.checkpoint_dir)!r} holds a checkpoint that fit() did not write "
                "(no model_state_dict); use another checkpoint_dir or resume=False"
            )
        own = self.model.state_dict()
        problems = []
        for key, value in own.items():
            other = saved.get(key)
            if other is None:
                problems.append(f"{key!r} is missing")
            elif isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor) and value.shape != other.shape:
                problems.append(f"{key!r} is {list(other.shape)} there but {list(value.shape)} here")
        extra = [key for key in saved if key not in own]
        if extra:
            problems.append(f"{len(extra)} unknown entries such as {extra[0]!r}")
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint_dir={str(self.o.checkpoint_dir)!r} holds checkpoints of another model "
                f"({'; '.join(problems[:3])}); pass a new checkpoint_dir for this model, or resume=False to "
                "start over (old checkpoints there are then rotated away)"
            )

    def _restore(self, checkpoint: dict[str, Any], fit_state: Mapping[str, Any]) -> None:
        from colabkit.checkpoint import restore_state

        try:
            restore_state(
                checkpoint, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler
            )
        except CheckpointMismatchError as exc:
            raise CheckpointMismatchError(
                f"checkpoint_dir={str(self.o.checkpoint_dir)!r}: {exc}; pass a new checkpoint_dir or resume=False"
            ) from exc
        if not fit_state:
            self._say("the checkpoint was not written by fit(): starting at epoch 1 from its weights")
            return
        self.pos = TrainPosition.from_state_dict(fit_state["position"])
        self.history = History.from_state_dict(fit_state.get("history", {}))
        self.history.stop_reason = ""
        self.backoff.chunks = int(fit_state.get("chunks", 1))
        self.totals.load_state_dict(fit_state["totals"])
        self._elapsed_before = float(fit_state.get("epoch_seconds", 0.0))
        rngs = fit_state.get("rng", [])
        rank = self.dist.rank
        if len(rngs) != self.dist.world_size:
            _notify.warn(
                f"the checkpoint was written by {len(rngs)} process(es), this run has {self.dist.world_size}; "
                "training continues, but random numbers will not repeat exactly"
            )
        self._pending_rng = rngs[min(rank, len(rngs) - 1)] if rngs else None
        epoch_rngs = fit_state.get("epoch_rng") or []
        self._epoch_rng = epoch_rngs[min(rank, len(epoch_rngs) - 1)] if epoch_rngs else None
        saved_length = int(fit_state.get("epoch_length", -1))
        length = -1 if self.epoch_length is None else self.epoch_length
        if self.pos.batch and saved_length != length:
            _notify.warn(
                f"the checkpoint was saved with {saved_length} batches per epoch, this run has {length} "
                f"(dataset or batch_size changed?); continuing at batch {self.pos.batch}, but not exactly as before"
            )
        if int(fit_state.get("grad_accum", self.o.grad_accum)) != self.o.grad_accum:
            _notify.warn(
                f"grad_accum was {fit_state['grad_accum']} when the checkpoint was saved and is {self.o.grad_accum} "
                "now; the effective batch size changes from here on"
            )
        if self.backoff.chunks > 1:
            self._say(f"resuming with {self.backoff.chunks} micro-batches per batch (after an earlier out-of-memory)")

    def _resumable(
        self, data: Any, argument: str, batch_size: int | None, num_workers: int | str, *, shuffle: bool
    ) -> Any:
        # The seed is filled in once the checkpoint is known (validation order is fixed anyway).
        return make_resumable(
            data,
            argument=argument,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            seed=0,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )

    def _val_loader(self, val: Any, batch_size: int | None, num_workers: int | str) -> Any:
        if self.dist.enabled and not isinstance(val, torch.utils.data.DataLoader):
            # Each rank validates its share; the sums are added up across ranks.
            return self._resumable(val, "val", batch_size, num_workers, shuffle=False).loader
        return _eval_loader(val, batch_size=batch_size, num_workers=num_workers, argument="val", where=self.device)

    def _monitored(self) -> tuple[str, ...]:
        names = ["loss", *self.metric_names]
        if self.val is not None:
            names += [f"val_{name}" for name in names]
        return (*names, "lr")

    # -- the run

    _pending_rng: Any = None
    _elapsed_before = 0.0

    def run(self) -> History:
        o = self.o
        from colabkit._signals import save_on_signal

        self._start = _clock()
        self._deadline = None if o.time_limit is None else self._start + o.time_limit
        self._last_save_time = self._start
        # Seconds a save costs until close() is done with it; measured at each save (see _save).
        self._save_cost = self._guess_save_cost() if o.checkpoint_dir is not None else 0.0
        self._step_cost = 0.0
        self._val_cost = 0.0
        # Whether some stop or save condition must be looked at after every step (else only
        # at an epoch's end, a signal or a callback's request): keeps the usual step cheap.
        self._check_every_step = (
            self._deadline is not None
            or o.save_seconds is not None
            or o.save_steps is not None
            or o.max_steps is not None
            or self.dist.enabled
        )
        self._flush_cost: float | None = None  # commit + copies after a save, measured once (time_limit only)
        self._watch = self._session_watch()
        self.advisor = Advisor(o.hints, given=[str(h.get("name")) for h in self.history.hints], facts=self._run_facts())
        self.finish = self._finish_estimate()
        self.epoch_clock = EpochClock(_clock)
        stop_reason = ""
        # The manager as a context: an error already propagating (a NaN loss, an interrupt) wins
        # over a failure while closing (a Drive copy that failed), which is then only warned about.
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(_dist.barrier)
            if self.manager is not None:
                cleanup.enter_context(self.manager)
            with save_on_signal() as signal_flag, Bars(not self.quiet) as bars:
                self.signal_flag = signal_flag
                self.bars = bars
                if self._finished():
                    self._say(f"training already finished (epoch {self.pos.epoch}/{o.epochs}, step {self.pos.step})")
                    self.history.stop_reason = self._done_reason()
                    return self.history
                self.model.train()
                for callback in o.callbacks:
                    _hook(callback, "on_fit_start", self.ctx)
                bars.start_fit(o.epochs, self.pos.epoch, history=self.history.records)
                while not stop_reason and self.pos.epoch < o.epochs:
                    stop_reason = self._train_epoch()
                stop_reason = stop_reason or "completed"
                self._save(final=True)
                self.history.stop_reason = stop_reason
                for callback in o.callbacks:
                    _hook(callback, "on_fit_end", self.ctx)
                if stop_reason == "interrupted":
                    self._say(
                        f"stopped by {signal_flag.signal} at step {self.pos.step}; "
                        + ("checkpoint saved, rerun to continue" if self.manager else "returning the history so far")
                    )
                elif stop_reason == "time_limit":
                    self._say(f"time_limit reached at step {self.pos.step}; checkpoint saved, rerun to continue")
                self._check_session()
        return self.history

    def _run_facts(self) -> RunFacts:
        loader = self.train.loader
        return RunFacts(batch_size=loader.batch_size, grad_accum=self.o.grad_accum, num_workers=loader.num_workers)

    def _finish_estimate(self) -> FinishEstimate | None:
        """The finish against the session's end (rank 0, with progress on)."""
        if self.quiet:
            return None
        from colabkit.runtime import runtime

        return FinishEstimate(
            platform={"colab": "Colab", "kaggle": "Kaggle"}.get(runtime().kind, ""),
            stops_at_session_end=self.o.session_time,
            resumable=self.o.checkpoint_dir is not None,
        )

    def _guess_save_cost(self) -> float:
        """Before the first save is timed: a few seconds plus writing model and optimizer state slowly."""
        model_bytes = sum(
            t.numel() * t.element_size() for t in self.model.state_dict().values() if isinstance(t, torch.Tensor)
        )
        return 5.0 + 3 * model_bytes / SLOW_WRITE_BYTES_PER_SECOND

    def _session_watch(self) -> Any:
        """time_limit="session": the 30- and 10-minute warnings (rank 0 only)."""
        if not (self.o.session_time and self.is_main):
            return None
        from colabkit.session import SessionWatch

        return SessionWatch()

    def _check_session(self) -> None:
        if self._watch is not None:
            for message in self._watch.check():
                _notify.warn(message, stacklevel=2)

    def _finished(self) -> bool:
        done_epochs = self.pos.epoch >= self.o.epochs
        done_steps = self.o.max_steps is not None and self.pos.step >= self.o.max_steps
        return done_epochs or done_steps

    def _done_reason(self) -> str:
        return "max_steps" if self.o.max_steps is not None and self.pos.step >= self.o.max_steps else "completed"

    def _train_epoch(self) -> str:
        """One epoch (or its remainder after a resume). Returns a stop reason, or "" to go on."""
        o, pos = self.o, self.pos
        epoch = pos.epoch
        self.ctx.epoch, self.ctx.batch = epoch, pos.batch
        resumed_inside = pos.batch > 0
        if self.train.needs_epoch_rng:
            from colabkit.checkpoint import capture_rng_state, restore_rng_state

            if resumed_inside and self._epoch_rng is not None:
                restore_rng_state(self._epoch_rng)  # the unknown sampler draws this epoch's order again
            self._epoch_rng = _dist.gather_objects(capture_rng_state())
        iterator = self.train.epoch(epoch, skip=pos.batch)
        if self._pending_rng is not None:
            from colabkit.checkpoint import restore_rng_state

            restore_rng_state(self._pending_rng)  # after skipping, right before the first new batch
            self._pending_rng = None
        if not resumed_inside:
            self.totals = Totals(self.metric_names)
            self._elapsed_before = 0.0
        self._epoch_start = self._last_step_end = _clock()
        self.epoch_clock.start(whole=not resumed_inside)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._next_read = self._epoch_start + (REFRESH_SECONDS if not self.quiet else QUIET_CHECK_SECONDS)
        self.bars.start_epoch(epoch, o.epochs, self.epoch_length, pos.batch)
        for callback in o.callbacks:
            _hook(callback, "on_epoch_start", self.ctx)

        accum = o.grad_accum
        length = self.epoch_length
        group: list[Any] = []
        stop_reason = ""
        for batch in self.epoch_clock.timed(iterator):
            group.append(batch)
            pos.batch += 1
            if len(group) < accum and pos.batch != length:
                continue
            self._optimizer_step(group)
            group = []
            stop_reason = self._after_step(epoch_ends=pos.batch == length)
            if stop_reason:
                break
        else:
            if group:  # a loader without len() ended inside a group
                self._optimizer_step(group)
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
        if stop_reason and pos.batch != length:
            self._save()
            return stop_reason
        return self._end_epoch() or stop_reason

    # -- one optimizer step

    def _optimizer_step(self, group: list[Any]) -> None:
        """Forward and backward over ``group``'s batches, then one optimizer step; retried smaller on OOM."""
        while True:
            mark = self.totals.mark()
            failed_size = 0
            try:
                samples = self._accumulate(group)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise
                failed_size = batch_length(group[0]) or 1
            if not failed_size:
                break
            # Outside the except block: the traceback and the tensors it holds are gone.
            self.optimizer.zero_grad(set_to_none=True)
            self.totals.rollback(mark)
            self.backoff.handle(failed_size, step=self.pos.step + 1, quiet=self.quiet)

        if self.o.clip_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.o.clip_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.per_step_scheduler:
            self.scheduler.step()
        self.pos.step += 1
        self.pos.samples += samples

    def _accumulate(self, group: list[Any]) -> int:
        """Forward and backward of every batch in ``group``; returns the number of samples."""
        if len(group) == 1 and self.backoff.chunks == 1 and not self._ddp:
            return self._single_batch(group[0])
        model, pos = self.forward_model, self.pos
        total = 0
        chunks = self.backoff.chunks
        scale_group = 1.0 / len(group)
        where = (pos.step + 1, pos.epoch, pos.batch)
        last = len(group) - 1
        for index, batch in enumerate(group):
            inputs, target, samples = self._prepare(batch)
            pieces = [((inputs, target), samples)] if chunks == 1 else split_batch((inputs, target), chunks, samples)
            for number, ((piece_inputs, piece_target), size) in enumerate(pieces):
                weight = scale_group * size / samples
                if self._ddp and not (index == last and number == len(pieces) - 1):
                    with model.no_sync():  # gradients are all-reduced once, with the group's last backward
                        output, loss = self._forward_backward(model, piece_inputs, piece_target, weight)
                else:
                    output, loss = self._forward_backward(model, piece_inputs, piece_target, weight)
                self._record(output, loss, piece_target, size, where)
            total += samples
        return total

    def _single_batch(self, batch: Any) -> int:
        """The usual step (one batch, no back-off, one process): :meth:`_accumulate` without the splitting."""
        inputs, target, samples = self._prepare(batch)
        output, loss = self._forward_backward(self.forward_model, inputs, target, 1.0)
        pos = self.pos
        self._record(output, loss, target, samples, (pos.step + 1, pos.epoch, pos.batch))
        return samples

    def _prepare(self, batch: Any) -> tuple[Any, Any, int]:
        """(inputs, targets, samples) of a batch, on the device and in the model's memory format."""
        if self._on_accelerator:
            batch = _device.to_device(batch, self.device)
        inputs, target = inputs_and_targets(batch)
        if self.o.channels_last:
            inputs = to_channels_last(inputs)
        return inputs, target, batch_length(target) or batch_length(inputs) or 1

    def _record(self, output: Any, loss: torch.Tensor, target: Any, samples: int, where: tuple[int, int, int]) -> None:
        """Keep the micro-batch's loss and metric terms on the device (read later, in one go)."""
        totals = self.totals
        totals.add(loss.detach(), samples, where)
        if self.metric_fns:
            detached = output.detach()
            for index, (_, fn) in enumerate(self.metric_fns):
                value, count = fn(detached, target)
                totals.add_metric(index, value, count)

    def _forward_backward(self, model: Any, inputs: Any, target: Any, weight: float) -> tuple[Any, torch.Tensor]:
        """Forward and loss under autocast (fp16/bf16), then backward of ``loss * weight``."""
        if self.policy.dtype is None:
            output = call_model(model, inputs)
        else:
            with self.policy.autocast():
                output = call_model(model, inputs)
        if not self.loss_fn.checked:
            self._first_batch_checks(output, target)
        if self.policy.dtype is None:
            loss = self.loss_fn(output, target)
        else:
            with self.policy.autocast():
                loss = self.loss_fn(output, target)
        scaled = loss * weight if weight != 1.0 else loss
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()
        return output, loss

    def _first_batch_checks(self, output: Any, target: Any) -> None:
        try:
            self.loss_fn.check(output, target)
            for name, fn in self.metric_fns:
                try:
                    fn(output.detach(), target)
                except Exception as exc:
                    raise ArgumentError(
                        f"metric {name!r} cannot be computed for outputs {describe(output)} and targets "
                        f"{describe(target)} ({str(exc).strip()[:200]}); choose metrics that fit the task, "
                        "e.g. metrics=() or metrics=('mae',) for regression"
                    ) from exc
        except ColabkitError:
            self.optimizer.zero_grad(set_to_none=True)
            raise

    # -- at each step boundary

    def _after_step(self, *, epoch_ends: bool) -> str:
        """Callbacks, progress, stop and save decisions after an optimizer step. Returns a stop reason."""
        pos = self.pos
        now = _clock()
        if self.step_callbacks:
            self.ctx.step, self.ctx.batch, self.ctx.loss = pos.step, pos.batch, self.totals.losses[-1]
            for callback in self.step_callbacks:
                callback.on_step_end(self.ctx)
        if now >= self._next_read or len(self.totals.losses) >= MAX_BUFFER:
            self._read(now)
        if not (epoch_ends or self._check_every_step or self.signal_flag.requested or self.ctx.stop_requested):
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
        elif self._deadline is not None and now + self._reserve() >= self._deadline:
            reason = "time_limit"
        timed_save = o.save_seconds is not None and now - self._last_save_time >= o.save_seconds
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
            self._stop_after_epoch = reason
            self._save_after_epoch = save_due
        elif save_due and not reason:
            self._save()
        # A slowly decaying maximum of the step time: what the next step may cost.
        self._step_cost = max(self._step_cost * 0.9, now - self._last_step_end)
        self._last_step_end = now
        return reason

    _stop_after_epoch = ""
    _save_after_epoch = False

    def _reserve(self) -> float:
        """Seconds to keep free before time_limit: two more steps, a validation and a save, with margin."""
        return 2 * self._step_cost + 1.5 * self._save_cost + self._val_cost

    def _read(self, now: float) -> None:
        """Read buffered losses and metrics from the device: NaN check, progress."""
        bad = self.totals.drain()
        if bad is not None:
            self._non_finite(bad)
        if self._watch is not None:
            self._check_session()
        interval = REFRESH_SECONDS if not self.quiet else QUIET_CHECK_SECONDS
        self._next_read = now + interval
        if not self.quiet:
            means = self.totals.means("")
            seconds = self._elapsed_before + now - self._epoch_start
            postfix = {key: value for key, value in means.items() if not math.isnan(value)}
            if seconds > 0:
                postfix["samples/s"] = self.totals.samples / seconds
            self.bars.steps(self.pos.batch, postfix)

    def _non_finite(self, where: tuple[int, int, int]) -> None:
        step, epoch, batch = where
        last = (
            f"the last checkpoint (step {self._saved_step}) is intact"
            if self._saved_step >= 0
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
        seconds = self._elapsed_before + _clock() - self._epoch_start
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
            self._val_cost = _clock() - started
        record["lr"] = float(self.optimizer.param_groups[0]["lr"])
        record["time"] = round(seconds, 3)
        record["samples_per_sec"] = round(train_totals.samples / seconds, 1) if seconds > 0 else float("nan")
        if waited is not None:
            record[DATA_WAIT] = waited
        if self.device.type == "cuda":
            # Allocator statistics kept on the host: reading them does not wait for the GPU.
            total = torch.cuda.get_device_properties(self.device).total_memory
            record[MEMORY_KEYS[0]] = round(torch.cuda.max_memory_reserved(self.device) / 2**30, 2)
            record[MEMORY_KEYS[1]] = round(total / 2**30, 2)
        self.history.append(record)
        self.bars.end_epoch(record)
        for hint in self.advisor.check(self.history.records):
            self.history.hints.append(hint.state_dict())
            self.bars.note(hint.name, f"hint: {hint.message}")
        pos.epoch += 1
        pos.batch = 0
        if self.scheduler is not None and not self.per_step_scheduler:
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(record.get(o.monitor, record["loss"]))
            else:
                self.scheduler.step()
        self.ctx.logs, self.ctx.epoch, self.ctx.step = record, pos.epoch - 1, pos.step
        for callback in o.callbacks:
            _hook(callback, "on_epoch_end", self.ctx)
        reason = self._stop_after_epoch or self.ctx.stop_reason
        if self.dist.enabled:
            reason = (reason or "callback") if _dist.any_flags([bool(reason)], self.device)[0] else ""
        if self.is_main and o.checkpoint_dir is not None:
            self.history.to_csv(o.checkpoint_dir / "history.csv")
        self._check_session()
        if o.save_epoch or self._save_after_epoch or reason or pos.epoch >= o.epochs:
            self._save(metrics=record)
        self._stop_after_epoch, self._save_after_epoch = "", False
        self._say_finish()
        self.totals = Totals(self.metric_names)
        self._elapsed_before = 0.0
        return reason

    def _say_finish(self) -> None:
        """After each whole epoch of this run: when the run ends, against the session's end."""
        self.epoch_clock.end()
        if self.finish is None:
            return
        o, pos = self.o, self.pos
        left: float = o.epochs - pos.epoch
        if o.max_steps is not None and self.epoch_length:
            steps_per_epoch = self.epoch_length / o.grad_accum
            left = min(left, (o.max_steps - pos.step) / steps_per_epoch)
        seconds = self.epoch_clock.seconds_per_epoch()
        message = self.finish.check(epochs_left=left, seconds_per_epoch=seconds, now=_clock())
        if message:
            self.bars.note("finish", message)

    def _validate(self) -> dict[str, float] | None:
        """Validation metrics (summed over ranks), or None if a signal arrived meanwhile (single process)."""
        # With DDP every rank must finish the same collectives, so validation runs to its end there.
        stop = None if self.dist.enabled else (lambda: self.signal_flag.requested)
        with _eval_mode(self.model):
            totals = _run_eval(
                self.forward_model,
                self.val,
                self.device,
                self.policy,
                self.loss_fn,
                self.metric_fns,
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
        if self.o.checkpoint_dir is None or self.pos.step == self._saved_step:
            return
        if final and self.pos.step == 0:
            return
        from colabkit.checkpoint import capture_rng_state

        bad = self.totals.drain()  # never save a model that a NaN step already spoiled
        if bad is not None:
            self._non_finite(bad)
        started = _clock()
        rngs = _dist.gather_objects(capture_rng_state())
        if self.is_main:
            state = self._state(rngs)
            clean = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self.manager.save(state, step=self.pos.step, metrics=clean or None)
        self._saved_step = self.pos.step
        self._last_save_time = _clock()
        self._save_cost = self._last_save_time - started
        if self._deadline is not None and self.manager is not None and self._flush_cost is None:
            # The run's end waits for the commit and the copies (Drive) as well: time them once,
            # so time_limit stops early enough for the whole save to finish before the limit.
            with contextlib.suppress(CheckpointError):  # each failure was warned about when it happened
                self.manager.wait()
            self._flush_cost = _clock() - self._last_save_time
        if self._flush_cost is not None:
            self._save_cost += self._flush_cost

    def _state(self, rngs: list[Any]) -> dict[str, Any]:
        seconds = self._elapsed_before + (_clock() - self._epoch_start if self.pos.batch else 0.0)
        fit_state = {
            "version": _CHECKPOINT_VERSION,
            "position": self.pos.state_dict(),
            "seed": self.seed,
            "chunks": self.backoff.chunks,
            "grad_accum": self.o.grad_accum,
            "epoch_length": -1 if self.epoch_length is None else self.epoch_length,
            "world_size": self.dist.world_size,
            "rng": rngs,
            "epoch_rng": self._epoch_rng if self.train.needs_epoch_rng and self.pos.batch else None,
            "totals": self.totals.state_dict(),
            "epoch_seconds": seconds,
            "history": self.history.state_dict(),
            "callbacks": [_callback_state(cb) for cb in self.o.callbacks],
        }
        state: dict[str, Any] = {
            "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "epoch": self.pos.epoch,
            "fit": fit_state,
        }
        if self.scheduler is not None:
            state["scheduler_state_dict"] = self.scheduler.state_dict()
        if self.scaler is not None:
            state["scaler_state_dict"] = self.scaler.state_dict()
        return state


def _overrides(callback: Any, name: str) -> bool:
    method = getattr(type(callback), name, None)
    return method is not None and method is not getattr(Callback, name)


def _hook(callback: Any, name: str, ctx: FitContext) -> None:
    method = getattr(callback, name, None)
    if callable(method):
        method(ctx)


def _callback_state(callback: Any) -> dict[str, Any]:
    method = getattr(callback, "state_dict", None)
    return dict(method()) if callable(method) else {}
