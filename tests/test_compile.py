"""fit(compile=...) on the CPU (inductor compiles C++ kernels here), its compile cache, and channels_last="auto".

Every compiling test uses the ``compile_caches`` fixture: inductor's and triton's caches in
a temporary folder shared by the session, so a graph one test compiled is a hit for the next.
All of them train the same small MLP on batches of 16, so most compile once per session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from colabkit import versions
from colabkit.checkpoint.compile_cache import CACHE_FOLDER, file_name, pack, unpack
from colabkit.errors import ArgumentError, ChecksumError
from colabkit.train.compiling import MODES, parse_compile, plan_compile
from colabkit.train.layout import check_channels_last, use_channels_last
from colabkit.train.loop import fit

ROOT = Path(__file__).resolve().parent.parent
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


class Net(torch.nn.Module):
    """A small MLP that records the batch sizes it ran eagerly (a compiled graph never runs this Python)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        self.eager: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():  # traced as False: no guard on the list
            self.eager.append(x.shape[0])
        return self.body(x)


@pytest.fixture
def graphs() -> Any:
    """torch.compile's frame counters, from zero: ``graphs["ok"]`` counts the frames compiled in the test."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # another test's graphs would serve this one's calls
    counters.clear()
    return counters["frames"]


class OomAbove(Net):
    """'Runs out of memory' on more than ``limit`` samples, outside the compiled graph (as CUDA would)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.ooms = 0

    @torch.compiler.disable
    def check(self, x: torch.Tensor) -> None:
        if x.shape[0] > self.limit:
            self.ooms += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return super().forward(x)


def data(n: int = 70) -> TensorDataset:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(n, 8, generator=generator)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


def same(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-5) -> bool:
    return all(torch.allclose(p, q, atol=atol) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# ----------------------------------------------------------------------------- choices (no compiling)


def test_compile_modes_are_checked_and_name_the_choices() -> None:
    assert [parse_compile(v) for v in MODES] == [None, "default", "default", "reduce-overhead", "max-autotune"]
    for bad in ("fast", 1, "reduce_overhead"):
        with pytest.raises(ArgumentError, match="'reduce-overhead', 'max-autotune'"):
            parse_compile(bad)
    with pytest.raises(ArgumentError, match=r"compile='fast' is not a compile mode"):
        fit(Net(), data(), compile="fast", progress=False)


def test_modes_fall_back_without_cuda_graphs_off_cuda() -> None:
    gpu = plan_compile("reduce-overhead", CUDA)
    assert (gpu.torch_mode, gpu.cuda_graphs, gpu.note) == ("reduce-overhead", True, "")
    cpu = plan_compile("reduce-overhead", CPU)
    assert (cpu.torch_mode, cpu.cuda_graphs) == (None, False) and "CUDA graphs need a CUDA GPU" in cpu.describe()
    assert plan_compile("max-autotune", CUDA).cuda_graphs
    assert plan_compile("max-autotune", CPU).torch_mode == "max-autotune-no-cudagraphs"
    assert plan_compile("default", CUDA).torch_mode is None and not plan_compile("default", CUDA).cuda_graphs


def test_channels_last_auto_decides_by_device_precision_and_model() -> None:
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten())
    mlp = torch.nn.Linear(4, 2)
    assert use_channels_last("auto", model=conv, device=CUDA, precision="bf16")
    assert use_channels_last("auto", model=conv, device=CUDA, precision="fp16")
    assert not use_channels_last("auto", model=conv, device=CUDA, precision="fp32")
    assert not use_channels_last("auto", model=conv, device=CPU, precision="bf16")
    assert not use_channels_last("auto", model=mlp, device=CUDA, precision="bf16")
    assert not use_channels_last(False, model=conv, device=CUDA, precision="bf16")
    assert use_channels_last(True, model=mlp, device=CPU, precision="fp32")
    assert check_channels_last("auto") == "auto" and check_channels_last(False) is False
    with pytest.raises(ArgumentError, match="channels_last='yes' must be one of 'auto', True, False"):
        fit(mlp, data(), channels_last="yes", progress=False)


def test_cache_files_carry_their_key_and_refuse_damage() -> None:
    key = {"torch": "2.14.1", "inputs": [[8], "float32"]}
    blob = pack(key, [b"first", b"second"], [("ab/kernel.so", b"\x7fELF"), ("ab/kernel.cpp", b"int main;")])
    assert unpack(blob) == (key, [b"first", b"second"], [("ab/kernel.so", b"\x7fELF"), ("ab/kernel.cpp", b"int main;")])
    assert file_name(key) == file_name(dict(reversed(key.items()))) != file_name({**key, "torch": "2.13"})
    flipped = bytearray(blob)
    flipped[-3] ^= 1
    with pytest.raises(ChecksumError, match="sha256"):
        unpack(bytes(flipped))
    with pytest.raises(ChecksumError):
        unpack(blob[: len(blob) // 2])
    with pytest.raises(ChecksumError, match="not a colabkit compile cache"):
        unpack(b"garbage")
    with pytest.raises(ChecksumError, match="outside the cache folder"):
        unpack(pack(key, [b""], [("../../etc/evil.so", b"x")]))


# ----------------------------------------------------------------------------- compiled training


def test_partial_batches_run_eagerly_without_a_recompile(
    compile_caches: Path, graphs: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    eager, compiled = Net(), Net()
    fit(eager, data(), data(20), epochs=2, batch_size=16, lr=0.05, seed=0, progress=False)
    history = fit(compiled, data(), data(20), epochs=2, batch_size=16, lr=0.05, seed=0, compile=True, progress=True)
    # 70 samples: 4 batches of 16 compiled, the last 6 eagerly; validation: 16 compiled, 4 eagerly.
    assert compiled.eager == [6, 4, 6, 4]  # once per epoch each; every other call ran compiled
    assert graphs["ok"] == 2  # the forward pass for training and for validation, at 16: no recompile
    assert history.stop_reason == "completed" and [r["epoch"] for r in history] == [0, 1]
    assert same(eager, compiled)
    out = capsys.readouterr().out
    assert "compile: Net forward and backward with torch.compile's default mode; first step compiled in" in out
    assert "batches of 16 run compiled" in out


def test_reduce_overhead_on_the_cpu_says_it_runs_the_default_mode(
    compile_caches: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = Net()
    history = fit(model, data(), batch_size=16, seed=0, compile="reduce-overhead", progress=True)
    assert history.stop_reason == "completed" and model.eager == [6]
    assert "CUDA graphs need a CUDA GPU, so on cpu the default mode" in capsys.readouterr().out


@pytest.mark.slow
def test_max_autotune_trains_on_the_cpu(compile_caches: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eager, model = Net(), Net()
    fit(eager, data(), batch_size=16, lr=0.05, seed=0, progress=False)
    fit(model, data(), batch_size=16, lr=0.05, seed=0, compile="max-autotune", progress=True)
    assert same(eager, model, atol=1e-4)
    assert "mode='max-autotune'; CUDA graphs need a CUDA GPU" in capsys.readouterr().out


def test_grad_accumulation_under_compile_matches_eager(compile_caches: Path) -> None:
    eager, compiled = Net(), Net()
    fit(eager, data(), batch_size=16, grad_accum=2, lr=0.05, seed=0, progress=False)
    fit(compiled, data(), batch_size=16, grad_accum=2, lr=0.05, seed=0, compile=True, progress=False)
    assert compiled.eager == [6] and same(eager, compiled)


@pytest.mark.slow
def test_oom_back_off_under_compile_compiles_the_smaller_micro_batch(compile_caches: Path) -> None:
    reference, model = Net(), OomAbove(limit=8)
    fit(reference, data(64), epochs=2, batch_size=16, lr=0.05, seed=0, progress=False)
    history = fit(model, data(64), epochs=2, batch_size=16, lr=0.05, seed=0, compile=True, progress=False)
    assert model.ooms == 1 and history.stop_reason == "completed"
    assert model.eager == []  # every micro-batch (8 after the back-off) ran compiled
    assert same(reference, model)


@pytest.mark.slow
def test_fp16_loss_scaling_under_compile(compile_caches: Path, tmp_path: Path) -> None:
    eager, compiled = Net(), Net()
    fit(eager, data(), batch_size=16, lr=0.05, seed=0, precision="fp16", progress=False)
    fit(compiled, data(), batch_size=16, lr=0.05, seed=0, precision="fp16", compile=True, checkpoint_dir=tmp_path)
    from colabkit.checkpoint import CheckpointManager

    scaler = CheckpointManager(tmp_path).load()["scaler_state_dict"]
    assert scaler and scaler["scale"] > 0  # the GradScaler scaled the compiled step's loss
    assert same(eager, compiled, atol=1e-3)


def test_exact_resume_under_compile(compile_caches: Path, tmp_path: Path) -> None:
    whole, resumed = Net(), Net()
    reference = fit(whole, data(), epochs=2, batch_size=16, lr=0.05, seed=0, compile=True, progress=False)
    first = fit(
        resumed,
        data(),
        epochs=2,
        batch_size=16,
        lr=0.05,
        seed=0,
        compile=True,
        max_steps=3,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    assert first.stop_reason == "max_steps"
    again = Net()
    history = fit(
        again, data(), epochs=2, batch_size=16, lr=0.05, seed=0, compile=True, checkpoint_dir=tmp_path, progress=False
    )
    assert history.stop_reason == "completed"
    assert again.eager.count(6) == 2  # the partial batch of each epoch, nothing repeated or skipped
    assert same(whole, again, atol=1e-6)
    assert [r["loss"] for r in history] == pytest.approx([r["loss"] for r in reference], abs=1e-6)


# ----------------------------------------------------------------------------- the compile cache


#: The compile cache needs torch.compiler's cache artifacts (torch 2.7+); the floor says it is off.
needs_cache_artifacts = pytest.mark.skipif(
    not versions.compile_cache_artifacts(), reason=f"torch {torch.__version__} cannot carry compiled artifacts"
)


def _cache_file(folder: Path) -> Path:
    files = list((folder / CACHE_FOLDER).glob("*.bin"))
    assert len(files) == 1, files
    return files[0]


@needs_cache_artifacts
def test_damaged_or_foreign_cache_is_ignored_with_a_notice(
    compile_caches: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "first"
    fit(Net(), data(), batch_size=16, seed=0, compile=True, checkpoint_dir=first, progress=True)
    assert "compile cache: saved" in capsys.readouterr().out
    made = _cache_file(first)
    key, parts, files = unpack(made.read_bytes())
    assert key["batch_size"] == 16 and key["inputs"] == [[[[8], "float32"]], {}] and key["torch"] == torch.__version__

    damaged = tmp_path / "damaged" / CACHE_FOLDER
    damaged.mkdir(parents=True)
    blob = bytearray(made.read_bytes())
    blob[-1] ^= 0xFF
    (damaged / made.name).write_bytes(bytes(blob))
    history = fit(Net(), data(), batch_size=16, seed=0, compile=True, checkpoint_dir=damaged.parent, progress=True)
    out = capsys.readouterr().out
    assert history.stop_reason == "completed"
    assert f"compile cache {damaged / made.name} is damaged" in out and "ignored, compiling afresh" in out
    assert unpack((damaged / made.name).read_bytes())[0] == key  # replaced by a good one

    foreign = tmp_path / "foreign" / CACHE_FOLDER
    foreign.mkdir(parents=True)
    other = {**key, "torch": "2.0.0", "device": "Tesla T4"}
    (foreign / file_name(other)).write_bytes(pack(other, parts, files))
    history = fit(Net(), data(), batch_size=16, seed=0, compile=True, checkpoint_dir=foreign.parent, progress=True)
    out = capsys.readouterr().out
    assert history.stop_reason == "completed"
    assert f"torch 2.0.0 (here {torch.__version__})" in out and "device Tesla T4 (here cpu)" in out
    assert "not used, compiling afresh" in out


SECOND_RUN = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch._dynamo.utils import counters
    sys.path.insert(0, {tests!r})
    from test_compile import Net, data
    from colabkit.train.loop import fit

    history = fit(Net(), data(), batch_size=16, seed=0, compile=True, checkpoint_dir={folder!r}, resume=False)
    print(json.dumps({{"stop": history.stop_reason, "hits": counters["inductor"]["fxgraph_cache_hit"],
                      "misses": counters["inductor"]["fxgraph_cache_miss"]}}))
    """
)


@pytest.mark.slow
@needs_cache_artifacts
def test_a_fresh_process_with_empty_caches_loads_the_cache_from_the_checkpoint_folder(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    folder = tmp_path / "run"
    script = SECOND_RUN.format(tests=str(ROOT / "tests"), folder=str(folder))
    outputs = []
    for number in (1, 2):  # each a fresh runtime: its own empty inductor and triton caches
        env = dict(subprocess_env)
        for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TRITON_HOME"):
            env[name] = str(tmp_path / f"process{number}" / name.lower())
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append((done.stdout, json.loads(done.stdout.strip().splitlines()[-1])))
    (first_out, first), (second_out, second) = outputs
    assert first["misses"] >= 1 and "compile cache: saved" in first_out
    assert second["stop"] == "completed" and second["hits"] >= 1 and second["misses"] == 0
    assert "compile cache: loaded" in second_out and "kernel files" in second_out
    assert os.listdir(folder / CACHE_FOLDER) == [_cache_file(folder).name]
