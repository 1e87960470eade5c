"""A training script run by Google's `colab` command line (google-colab-cli), through its fake.

The fake follows the CLI's source (colabkit.testing.FakeColabCLI): the script runs as one
cell in a Colab kernel, then the kernel is killed (no atexit) and the VM's disk is gone;
only what was flushed to Drive is there for the next run.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
from pathlib import Path

import pytest

import colabkit
from colabkit import display, session
from colabkit.errors import PlatformError
from colabkit.runtime import Probe, current_probe, use_probe
from colabkit.testing import fake_colab, fake_colab_cli

TRAIN = textwrap.dedent(
    """
    #!/usr/bin/env -S colab run --gpu T4
    import sys

    import torch
    from torch.utils.data import TensorDataset

    import colabkit
    from colabkit.train.callbacks import Callback

    rt = colabkit.runtime()
    print(f"kind={rt.kind} headless={rt.headless} argv={sys.argv!r}")
    print(f"session_limit={rt.session_limit} left={colabkit.session_time_left() is not None}")
    with colabkit.keepalive():
        pass


    class Count(Callback):
        steps = 0

        def on_step_end(self, ctx):
            Count.steps += 1


    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True))
    model = torch.nn.Linear(4, 1)
    mydrive = colabkit.mount_drive()
    colabkit.fit(
        model, data, epochs=int(sys.argv[1]), batch_size=16, lr=0.01, seed=0, loss_fn=torch.nn.MSELoss(),
        checkpoint_dir=mydrive / "run1", callbacks=[Count()],
    )
    print(f"trained_steps={Count.steps}")
    """
).lstrip()


def _steps(output: str) -> int:
    found = re.findall(r"trained_steps=(\d+)", output)
    assert found, output
    return int(found[-1])


@pytest.mark.slow
def test_a_script_under_colab_run_saves_to_drive_and_the_next_run_resumes(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    with fake_colab_cli(tmp_path / "colab", gpu="T4") as cli:
        first = cli.run(script, "2", drivemount=True)
        assert first.returncode == 0, first.stderr
        assert _steps(first.stdout) == 8  # 2 epochs of 4 steps
        # Nothing of the first VM is left but Drive: the second run starts from Drive alone.
        assert sorted(p.name for p in cli.root.iterdir()) == [".fake-google-drive"]

        second = cli.run(script, "3", drivemount=True)
        assert second.returncode == 0, second.stderr
        assert _steps(second.stdout) == 4  # only the third epoch: resumed at step 8
        assert sorted(p.name for p in (cli.drive_storage / "run1").glob("step-*.json"))

    assert "kind=colab headless=True argv=['train.py', '2']" in first.stdout
    assert "left=True" in first.stdout  # the session clock runs
    assert "keepalive is not needed" in first.stdout
    assert "Drive flushed and unmounted as the script ended" in first.stdout
    assert "\r" not in first.stdout + first.stderr  # progress as log lines, never redrawn


@pytest.mark.slow
def test_without_drive_colab_run_says_how_to_mount_it(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    with fake_colab_cli(tmp_path / "colab") as cli:
        done = cli.run(script, "1")
    assert done.returncode == 1
    assert "PlatformError" in done.stderr and "colab drivemount -s NAME" in done.stderr


def test_sys_exit_and_errors_become_the_exit_status(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    with fake_colab_cli(tmp_path / "colab") as cli:
        script.write_text("import sys\nprint('hello', sys.argv[1:])\nsys.exit(3)\n")
        done = cli.run(script, "a", "--flag", env={"COLOR": "blue"})
        assert (done.returncode, done.stdout) == (3, "hello ['a', '--flag']\n")
        script.write_text(
            "import os, atexit\natexit.register(print, 'atexit ran')\nprint(os.getcwd(), os.environ['COLOR'])\n"
        )
        done = cli.run(script, env={"COLOR": "blue"})
        assert done.returncode == 0 and done.stdout.strip().endswith("/content blue")
        assert "atexit ran" not in done.stdout  # the kernel is killed, atexit never runs
        script.write_text("raise KeyError('boom')\n")
        done = cli.run(script)
        assert done.returncode == 1 and "KeyError: 'boom'" in done.stderr


def _cli_probe(argv: list[str]) -> Probe:
    return dataclasses.replace(current_probe(), argv=lambda: argv)


def test_headless_is_told_by_the_argv_colab_run_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_colab():
        assert colabkit.runtime().headless is False  # a browser notebook: the kernel launcher's argv
        with use_probe(_cli_probe(["train.py", "2"])):
            assert colabkit.runtime().headless is True
            assert colabkit.runtime().in_notebook is True  # still a kernel
    with fake_colab(environ={"COLABKIT_HEADLESS": "1"}):
        assert colabkit.runtime().headless is True  # colab exec --env COLABKIT_HEADLESS=1
    with fake_colab(notebook=False, environ={"COLABKIT_HEADLESS": "0"}):
        assert colabkit.runtime().headless is False
    with fake_colab(hosted=False, environ={"COLABKIT_HEADLESS": "1"}):
        assert colabkit.runtime().headless is False  # not hosted Colab: never


def test_headless_colab_shows_log_lines_keepalive_idles_and_drive_is_not_mounted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel_shell = type("Shell", (), {"kernel": object()})()
    monkeypatch.setitem(sys.modules, "IPython", type(sys)("IPython"))
    monkeypatch.setattr(sys.modules["IPython"], "get_ipython", lambda: kernel_shell, raising=False)
    with fake_colab(environ={"COLABKIT_HEADLESS": "1"}) as colab:
        assert display.detect() == "log"
        beat = session.keepalive(interval=0.01).start()
        assert not beat.running and "keepalive is not needed" in capsys.readouterr().out
        beat.stop()
        with pytest.raises(PlatformError, match="colab drivemount -s NAME"):
            colabkit.mount_drive()
        assert not colab.calls_to("drive.mount")  # it would wait for an authorisation nobody answers
    with fake_colab():
        assert display.detect() in ("widgets", "notebook")
