"Shared pytest fixtures."
import pytest
import torch


def random_video(batch: int, frames: int = 17, size: int = 64, seed: int = 0) -> torch.Tensor:
    "A seeded random clip batch (B, T, C, H, W) in [-1, 1], the layout every encoder takes."
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, frames, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    "One precompute cache folder shared by the Stage 2 tests of a module (built on first use, then resumed)."
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def cfg_for(tmp_path, cache_dir):
    "make_config for a short Stage 2 run on the shipped toy world: `cfg_for(method='sft', steps=1)`."
    from pathlib import Path
    from sara.config import make_config, site_settings
    def make(**kw):
        params = dict(run_name="t", steps=3, batch_size=2, runs_dir=str(tmp_path / "runs"), cache_dir=cache_dir,
                      checkpoint_every=0)
        return make_config({**params, **kw}, settings=site_settings(Path(__file__).resolve().parents[1], env={}))
    return make


@pytest.fixture(scope="module")
def video2():
    return random_video(2)


@pytest.fixture(scope="module")
def video1():
    return random_video(1)


# A kernel with no SARA code in it: a loop bounded by a scalar argument, as the TRD kernels have. Some
# Triton / NumPy pairs cannot interpret it (Triton 3.6's interpreter calls int() on a 1-element array, an
# error since NumPy 2.5); the interpreter tests then skip naming the versions instead of failing on SARA code.
INTERPRETER_CANARY = r"""
import torch, triton, triton.language as tl
@triton.jit
def k(X, n, BD: tl.constexpr):
    acc = tl.zeros((BD,), dtype=tl.float32)
    for d0 in range(0, n, BD):
        acc += tl.load(X + d0 + tl.arange(0, BD))
    tl.store(X + tl.arange(0, BD), acc)
x = torch.ones(32)
k[(1,)](x, 32, BD=16)
assert x[:16].tolist() == [2.0] * 16, x
"""


@pytest.fixture(scope="session")
def triton_interpreter():
    "Environment for a child process that runs Triton kernels in the CPU interpreter; skips if it cannot."
    import os, subprocess, sys
    triton = pytest.importorskip("triton")
    import numpy
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", INTERPRETER_CANARY], env=env, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run a plain loop kernel with NumPy "
                    f"{numpy.__version__} ({last[:160]})")
    return env
