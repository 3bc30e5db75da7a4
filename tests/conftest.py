"""Shared fixtures: small real shard sets prepared once per test session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.shards import prepare

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"reference data {SHARED_DATA} absent")


@pytest.fixture(scope="session")
def sprites_root(tmp_path_factory) -> Path:
    """Procedural sprites, 640/128/128 samples in shards of 128: several shards per split."""
    root = tmp_path_factory.mktemp("sprites")
    prepare("sprites", root, seed=0, sizes={"train": 640, "val": 128, "test": 128}, shard_samples=128,
            log=lambda *_: None)
    return root


def vaepipe(*args, cwd=None, timeout=600, check=True, env=None) -> subprocess.CompletedProcess:
    """Run the real console entry point (`python -m pipeline`) in a subprocess; `env` adds to the
    environment (a value of None removes that variable)."""
    env = {k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}.items() if v is not None}
    proc = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"vaepipe {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


# Lightning's quick, CPU-friendly settings for tests that train a few steps.
FAST = ["trainer.enable_progress_bar=false", "logger.backend=csv", "data.num_workers=0"]
