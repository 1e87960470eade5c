"""Checkpoints that survive disconnects: atomic, verified, rotated, safe to load, mirrored.

The package, one job per module:

- :mod:`~colabkit.checkpoint.store`: files, manifests, commit, rotation, safe loading,
  and :class:`CheckpointListing`, a read-only view (latest / best) for inference.
- :mod:`~colabkit.checkpoint.state`: what goes into a checkpoint and back out
  (sanitise, RAM snapshot, model unwrapping, the weights check, :func:`restore_state`).
- :mod:`~colabkit.checkpoint.mirror`: background copies to Drive and other folders.
- :mod:`~colabkit.checkpoint.registry`: the live managers, flushed at exit and by ``end_session()``.
- :mod:`~colabkit.checkpoint.lease`: one writer per folder (a lease file renewed by a heartbeat).
- :mod:`~colabkit.checkpoint.manager`: :class:`CheckpointManager`, which ties them together.

Loading always uses ``torch.load(weights_only=True)`` after checking the sha256, and
never falls back to unsafe unpickling.
"""

from __future__ import annotations

from colabkit.checkpoint.manager import CheckpointManager
from colabkit.checkpoint.registry import live_managers
from colabkit.checkpoint.state import (
    SNAPSHOT_MAX_BYTES,
    find_weights,
    load_weights,
    restore_state,
    strip_wrapper_prefixes,
    unwrap_model,
    weights_problems,
)
from colabkit.checkpoint.store import FORMAT, FORMAT_VERSION, CheckpointInfo, CheckpointListing, load_checkpoint

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SNAPSHOT_MAX_BYTES",
    "CheckpointInfo",
    "CheckpointListing",
    "CheckpointManager",
    "find_weights",
    "live_managers",
    "load_checkpoint",
    "load_weights",
    "restore_state",
    "strip_wrapper_prefixes",
    "unwrap_model",
    "weights_problems",
]
