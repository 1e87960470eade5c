"""More than one GPU: DDP under ``torchrun`` and :func:`launch` from a notebook cell.

``fit()`` notices ``WORLD_SIZE > 1`` (set by ``torchrun`` and by
:func:`launch`), joins the process group (NCCL on GPUs, gloo on the CPU),
wraps the model in DistributedDataParallel and shards the data; only rank 0
saves checkpoints, writes logs and shows progress. :func:`launch` starts the
processes with torch's own elastic launcher (what ``torchrun`` uses), forking
so functions defined in a notebook work.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from colabkit.errors import ArgumentError, PlatformError

__all__ = ["DistInfo", "all_sum", "any_flags", "barrier", "broadcast_object", "gather_objects", "launch", "setup"]


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """This process's place in a distributed run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group if this process was started by torchrun or :func:`launch`.

    Args:
        device: The device fit() would use alone; a CUDA device becomes ``cuda:LOCAL_RANK``.

    Returns:
        ``(info, device)`` for this rank.
    """
    if dist.is_available() and dist.is_initialized():
        info = DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", dist.get_rank()))
    else:
        world_size = _env_int("WORLD_SIZE", 1)
        if world_size <= 1 or not dist.is_available():
            return DistInfo(), device
        info = DistInfo(_env_int("RANK", 0), world_size, _env_int("LOCAL_RANK", 0))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    if not info.enabled:
        return info, device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return info, device


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when distributed, else ``model`` itself."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _comm_device(device: torch.device) -> torch.device:
    backend = dist.get_backend()
    return device if backend == "nccl" else torch.device("cpu")


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum numbers over all ranks (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.tolist()]


def any_flags(flags: Sequence[bool], device: torch.device) -> list[bool]:
    """For each flag, whether any rank has it set (so all ranks take the same decision)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(flags)
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=_comm_device(device))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(fn: Callable[..., Any], kwargs: dict[str, Any], forked: bool, *args: Any) -> Any:
    """What each launched process runs: ``fn``, then leave the process group cleanly."""
    if forked:
        # GNU OpenMP's thread pool does not survive fork: a forked child that runs a parallel
        # CPU op with the parent's thread count can hang forever (DataLoader workers do the same).
        torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    *args: Any,
    nprocs: int | str = "auto",
    start_method: str = "auto",
    **kwargs: Any,
) -> Any:
    """Run ``fn(*args, **kwargs)`` in ``nprocs`` processes, one per GPU, as ``torchrun`` would.

    Inside, ``fit()`` finds ``WORLD_SIZE``/``RANK`` and trains with DDP. Uses torch's
    elastic launcher (``torch.distributed.launcher.api.elastic_launch``); in a
    notebook the processes are forked, so ``fn`` may be defined in the notebook, but
    nothing may have used the GPU in this process before (build the model inside ``fn``).
    Forked processes use one CPU thread each for torch's CPU operations (OpenMP's thread
    pool does not survive a fork); GPU work is unaffected.

    Args:
        fn: The training function.
        *args: Its positional arguments.
        nprocs: Processes to start; ``"auto"`` = number of visible GPUs (1 on a CPU-only machine,
            where ``fn`` then simply runs here).
        start_method: ``"auto"`` (fork where possible), ``"fork"``, ``"spawn"`` or ``"forkserver"``.
        **kwargs: Its keyword arguments.

    Returns:
        What ``fn`` returned on rank 0.

    Raises:
        ArgumentError: ``nprocs`` or ``start_method`` is invalid.
        PlatformError: CUDA was already initialised in this process and fork is the start method.

    Example:
        >>> def train():
        ...     model = make_model()
        ...     return colabkit.fit(model, train_set, epochs=3, checkpoint_dir="ckpt")
        >>> history = colabkit.launch(train)  # two processes on Kaggle's 2x T4  # doctest: +SKIP
    """
    if nprocs == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 1
    elif isinstance(nprocs, int) and not isinstance(nprocs, bool) and nprocs >= 1:
        count = nprocs
    else:
        raise ArgumentError(f"nprocs={nprocs!r} must be 'auto' or an integer >= 1, e.g. nprocs=2")
    if count == 1:
        return fn(*args, **kwargs)
    methods = ("fork", "spawn", "forkserver")
    if start_method == "auto":
        method = "fork" if os.name == "posix" and not torch.cuda.is_initialized() else "spawn"
    elif start_method in methods:
        method = start_method
    else:
        raise ArgumentError(f"start_method={start_method!r} must be 'auto' or one of {', '.join(methods)}")
    if method == "fork" and torch.cuda.is_initialized():
        raise PlatformError(
            "launch() forks worker processes, but CUDA is already initialised in this process; restart the "
            "runtime and call launch() before anything touches the GPU (create the model inside the function)"
        )
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=count,
        run_id=f"colabkit-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        max_restarts=0,
        monitor_interval=0.1,
        start_method=method,
    )
    before = set(os.environ)
    # The launcher installs its own SIGINT/SIGTERM handlers in this process and leaves them:
    # afterwards Ctrl-C in the notebook would raise its SignalException, not KeyboardInterrupt.
    handlers = _signal_handlers()
    try:
        results = elastic_launch(config, _entry)(fn, kwargs, method == "fork", *args)
    finally:
        # The launcher leaves settings for its own children (TORCHELASTIC_*) in this process's environment.
        for key in set(os.environ) - before:
            if key.startswith("TORCHELASTIC_"):
                del os.environ[key]
        _restore_signal_handlers(handlers)
    return results.get(0) if isinstance(results, dict) else results


_LAUNCHER_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")


def _signal_handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}  # handlers can only be set (and so only changed) on the main thread
    found = {}
    for name in _LAUNCHER_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            found[int(number)] = signal.getsignal(number)
    return found


def _restore_signal_handlers(handlers: dict[int, Any]) -> None:
    for number, handler in handlers.items():
        if handler is not None:
            signal.signal(number, handler)
