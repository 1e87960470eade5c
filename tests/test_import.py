"""`import colabkit` is cheap and has no side effects; the public surface is exactly the designed one."""

from __future__ import annotations

import json
import subprocess
import sys

import colabkit

# The names DESIGN.md lists, plus the few helpers the issues add (memory_summary, free_memory,
# save_on_signal, end_session, download, lr_find, inference and export, callbacks, launch, ImageArray).
DESIGNED = {
    "ColabkitError",
    "Runtime",
    "free_memory",
    "get_device",
    "info",
    "memory_summary",
    "runtime",
    "seed_everything",
    "to_device",
    "mount_drive",
    "flush_drive",
    "project_dirs",
    "stage",
    "make_archive",
    "CheckpointManager",
    "save_on_signal",
    "keepalive",
    "session_time_left",
    "end_session",
    "download",
    "compare_devices",
    "matmul_speed",
    "lr_find",
    "load_for_inference",
    "predict_images",
    "export",
    "fit",
    "evaluate",
    "predict",
    "History",
    "Callback",
    "EarlyStopping",
    "CSVLogger",
    "launch",
    "ImageArray",
    "decode_images",
}


def test_all_is_the_designed_api() -> None:
    assert set(colabkit.__all__) == DESIGNED
    assert colabkit.__all__ == sorted(colabkit.__all__)


def test_every_public_name_resolves() -> None:
    for name in colabkit.__all__:
        assert getattr(colabkit, name) is not None, name
    assert callable(colabkit.runtime) and callable(colabkit.info)


def test_import_has_no_side_effects(subprocess_env: dict[str, str]) -> None:
    probe = """
import json, logging, sys, threading
before_threads = threading.active_count()
import colabkit
print(json.dumps({
    "torch": "torch" in sys.modules,
    "colab": any(m.startswith("google.colab") for m in sys.modules),
    "ipython": "IPython" in sys.modules,
    "tqdm": "tqdm" in sys.modules,
    "threads": threading.active_count() - before_threads,
    "handlers": len(logging.getLogger("colabkit").handlers),
    "runtime_is_function": callable(colabkit.runtime) and not isinstance(colabkit.runtime, type(sys)),
}))
"""
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=subprocess_env
    ).stdout
    facts = json.loads(out)
    assert facts == {
        "torch": False,
        "colab": False,
        "ipython": False,
        "tqdm": False,
        "threads": 0,
        "handlers": 0,
        "runtime_is_function": True,
    }


def test_runtime_stays_a_function_after_submodule_imports(subprocess_env: dict[str, str]) -> None:
    code = "import colabkit.runtime, colabkit.info, colabkit.device; import colabkit; print(colabkit.runtime().kind)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=subprocess_env)
    assert out.stdout.strip() in ("script", "jupyter", "colab", "kaggle")


def test_unknown_attribute() -> None:
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        colabkit.nope  # noqa: B018


def test_only_train_resume_uses_checkpoint_code() -> None:
    """The loop reaches checkpoints through train/resume.py alone (one seam for resuming)."""
    import ast
    from pathlib import Path

    train = Path(colabkit.__file__).parent / "train"
    users = set()
    for path in sorted(train.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            if any(name == "colabkit.checkpoint" or name.startswith("colabkit.checkpoint.") for name in names):
                users.add(path.name)
    assert users == {"resume.py"}
