"""fit(compile=...): the model through ``torch.compile``, safe to capture, with a compile cache kept by the run.

Modes (:func:`parse_compile`, :func:`plan_compile`):

============================  ==========================================================
``compile=``                  what runs
============================  ==========================================================
``False``                     eager
``True`` / ``"default"``      ``torch.compile`` default mode: fused kernels
``"reduce-overhead"``         CUDA graphs: a whole forward / backward is one launch; on
                              a CPU or MPS device (no CUDA graphs) the default mode
``"max-autotune"``            autotuned kernels, CUDA graphs on CUDA; elsewhere without
============================  ==========================================================

The compiled model (:class:`CompiledModel`) is built with ``dynamic=False``: one graph
per batch shape. Batches of the run's full size (and the micro-batches an
out-of-memory back-off cuts them into) run compiled; any other size, such as an
epoch's last partial batch, runs the same module eagerly. Nothing is dropped or
padded, so sample counts, the data order and exact resume are those of eager
training, and a partial batch neither recompiles nor breaks a CUDA graph. Under
CUDA graphs the gradients live in buffers allocated outside the graphs and zeroed
in place (:attr:`CompiledModel.keeps_grads`), so accumulation over several
backward passes adds into memory no later graph replay overwrites.

The compile cache beside the checkpoints: :mod:`colabkit.train.compile_cache`.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from colabkit.errors import ArgumentError
from colabkit.train.oom import batch_length, split_batch

__all__ = [
    "MODES",
    "Cache",
    "CompilePlan",
    "CompiledModel",
    "cache_key",
    "compile_model",
    "parse_compile",
    "plan_compile",
]

#: The values ``fit(compile=...)`` takes.
MODES: tuple[Any, ...] = (False, True, "default", "reduce-overhead", "max-autotune")


def parse_compile(value: Any) -> str | None:
    """``fit(compile=...)`` as a mode name (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``), or None.

    Raises:
        ArgumentError: ``value`` is not one of :data:`MODES`.
    """
    if value is False or value is None:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in MODES:
        return value
    raise ArgumentError(
        f"compile={value!r} is not a compile mode; use one of "
        f"{', '.join(map(repr, MODES))} (True = torch.compile's default mode, "
        "'reduce-overhead' = CUDA graphs, 'max-autotune' = autotuned kernels)"
    )


@dataclasses.dataclass(frozen=True)
class CompilePlan:
    """How a mode is compiled on a device.

    Attributes:
        mode: The mode asked for (:func:`parse_compile`).
        torch_mode: The ``mode=`` given to ``torch.compile`` (None: its default).
        cuda_graphs: Whether CUDA graphs capture the compiled steps.
        note: Why the device changed what runs (empty when nothing changed).
    """

    mode: str
    torch_mode: str | None
    cuda_graphs: bool
    note: str = ""

    def describe(self) -> str:
        what = {
            "default": "torch.compile's default mode",
            "reduce-overhead": "mode='reduce-overhead' (CUDA graphs)",
            "max-autotune": "mode='max-autotune'" + (" with CUDA graphs" if self.cuda_graphs else ""),
        }[self.mode]
        return what + (f"; {self.note}" if self.note else "")


def plan_compile(mode: str, device: torch.device) -> CompilePlan:
    """What ``mode`` compiles to on ``device``: CUDA graphs exist only on CUDA."""
    cuda = device.type == "cuda"
    if mode == "default":
        return CompilePlan(mode, None, cuda_graphs=False)
    if mode == "reduce-overhead":
        if cuda:
            return CompilePlan(mode, "reduce-overhead", cuda_graphs=True)
        return CompilePlan(
            mode, None, cuda_graphs=False, note=f"CUDA graphs need a CUDA GPU, so on {device.type} the default mode"
        )
    if cuda:
        return CompilePlan(mode, "max-autotune", cuda_graphs=True)
    return CompilePlan(
        mode,
        "max-autotune-no-cudagraphs",
        cuda_graphs=False,
        note=f"CUDA graphs need a CUDA GPU, so on {device.type} autotuned kernels only",
    )


# --------------------------------------------------------------------------- what a compiled graph depends on


def _versions() -> dict[str, Any]:
    try:
        import triton

        triton_version: str | None = str(triton.__version__)
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


def _device_facts(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {"device": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}"}
    return {"device": device.type, "capability": platform.machine()}


def _inputs(value: Any) -> Any:
    """The inputs' structure with per-sample shapes and dtypes (the batch size is keyed separately)."""
    if isinstance(value, torch.Tensor):
        return [list(value.shape[1:]), str(value.dtype).replace("torch.", "")]
    if isinstance(value, Mapping):
        return {str(key): _inputs(item) for key, item in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_inputs(item) for item in value]
    return type(value).__name__


def cache_key(
    *,
    model: torch.nn.Module,
    inputs: Any,
    batch_size: int | None,
    plan: CompilePlan,
    precision: str,
    channels_last: bool,
    device: torch.device,
) -> dict[str, Any]:
    """What a compiled graph depends on, as primitives: a cache file serves only an equal key."""
    return {
        **_versions(),
        **_device_facts(device),
        "mode": plan.mode,
        "torch_mode": plan.torch_mode,
        "precision": precision,
        "channels_last": channels_last,
        "model": type(model).__qualname__,
        "parameters": [[name, list(p.shape), str(p.dtype), p.requires_grad] for name, p in model.named_parameters()],
        "inputs": _inputs(inputs),
        "batch_size": batch_size,
    }


class Cache(Protocol):
    """Where compiled artifacts are loaded from and saved to (``colabkit.checkpoint.compile_cache``)."""

    def load(self, key: Mapping[str, Any]) -> Any: ...

    def save(self, key: Mapping[str, Any]) -> str: ...

    def close(self) -> None: ...

    @property
    def notice(self) -> str: ...


# --------------------------------------------------------------------------- the compiled model


class CompiledModel:
    """The model through ``torch.compile``, called as the model is; off-size batches run eagerly.

    Args:
        model: What runs the forward pass (the model, or its DDP wrapper).
        plan: :func:`plan_compile`'s result.
        batch_size: Samples in a full batch (None: the first batch seen sets it).
        cache: Where compiled artifacts are loaded from and saved to (None: no cache).
        key: The cache key of the first compiled inputs and the full batch size.
        clock: The loop's clock.
    """

    def __init__(
        self,
        model: Any,
        plan: CompilePlan,
        *,
        batch_size: int | None,
        cache: Cache | None,
        key: Callable[[Any, int | None], dict[str, Any]],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.model = model
        self.plan = plan
        self.compiled = torch.compile(model, mode=plan.torch_mode, dynamic=False)
        self.batch_size = batch_size
        self.sizes: frozenset[int] = frozenset()
        self.chunks = 0
        self.cache = cache
        self._key_of = key
        self.key: dict[str, Any] | None = None
        self._clock = clock
        self.started: float | None = None  # when the first compiled call began
        self.compile_seconds: float | None = None
        self.eager_calls = 0
        self.compiled_calls = 0

    @property
    def keeps_grads(self) -> bool:
        """Whether gradients stay allocated (zeroed in place): CUDA graphs must not own them."""
        return self.plan.cuda_graphs

    def set_chunks(self, chunks: int) -> None:
        """The micro-batches a full batch is cut into (out-of-memory back-off): their sizes run compiled."""
        if chunks != self.chunks and self.batch_size is not None:
            self.chunks = chunks
            self.sizes = frozenset(size for _, size in split_batch(None, chunks, self.batch_size))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        size = batch_length((args, kwargs))
        if self.batch_size is None and size is not None:
            self.batch_size = size  # a loader of unknown batch size: its first batch is the full one
            self.set_chunks(max(self.chunks, 1))
        if size not in self.sizes:
            self.eager_calls += 1
            return self.model(*args, **kwargs)
        if self.started is None:
            self.key = self._key_of((args, kwargs), self.batch_size)
            if self.cache is not None:
                self.cache.load(self.key)
            self.started = self._clock()
        if self.plan.cuda_graphs:
            if torch.is_grad_enabled():
                _allocate_grads(self.model)
            torch.compiler.cudagraph_mark_step_begin()  # the last call's outputs were read already
        self.compiled_calls += 1
        return self.compiled(*args, **kwargs)

    def no_sync(self) -> Any:
        return self.model.no_sync()

    def after_step(self) -> str:
        """After an optimizer step: the first time a compiled step ended, what was compiled and how long it took."""
        if self.started is None or self.compile_seconds is not None:
            return ""
        self.compile_seconds = self._clock() - self.started
        parts = [
            f"compile: {type(_plain(self.model)).__name__} forward and backward with {self.plan.describe()}; "
            f"first step compiled in {self.compile_seconds:.1f} s; batches of {_sizes(self.sizes)} run compiled, "
            "others (a last partial batch) eagerly"
        ]
        if self.cache is not None:
            parts.append(self.cache.notice)
            parts.append(self.save_cache())
        return "\n".join(part for part in parts if part)

    def save_cache(self) -> str:
        """Save newly compiled artifacts (validation's graph after the first epoch, say); returns a notice."""
        if self.cache is None or self.key is None:
            return ""
        return self.cache.save(self.key)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def _plain(model: Any) -> Any:
    return getattr(model, "module", model)


def _sizes(sizes: frozenset[int]) -> str:
    return " or ".join(str(size) for size in sorted(sizes)) or "the first size seen"


def _allocate_grads(model: torch.nn.Module) -> None:
    """Zeroed ``.grad`` buffers allocated outside any CUDA graph (see :attr:`CompiledModel.keeps_grads`)."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)


def compile_model(
    forward_model: Any,
    mode: str | None,
    *,
    model: torch.nn.Module,
    device: torch.device,
    precision: str,
    channels_last: bool,
    batch_size: int | None,
    cache: Cache | None,
) -> CompiledModel | None:
    """fit()'s compiled model for ``mode`` (None: eager), with the run's compile cache (None: none)."""
    if mode is None:
        return None
    plan = plan_compile(mode, device)

    def key(inputs: Any, full_batch: int | None) -> dict[str, Any]:
        return cache_key(
            model=model,
            inputs=inputs,
            batch_size=full_batch,
            plan=plan,
            precision=precision,
            channels_last=channels_last,
            device=device,
        )

    return CompiledModel(forward_model, plan, batch_size=batch_size, cache=cache, key=key)
