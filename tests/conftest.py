"""Shared fixtures: small real shard sets prepared once per test session."""

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch

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


class _ForkServer:
    """tests/fork_server.py, started at the first command: the commands run as children forked
    from one interpreter that has imported torch and Lightning (~5 s a command saved). On machines
    with CUDA, and with VAEPIPE_TEST_FORK_SERVER=0, every command is a fresh `python -m pipeline`."""

    def __init__(self):
        self.proc, self.lock = None, threading.Lock()
        # Not where CUDA is: a child forked after anything touched the CUDA driver cannot use it.
        self.enabled = os.environ.get("VAEPIPE_TEST_FORK_SERVER", "1") != "0" and not torch.cuda.is_available()
        self.tmp = Path(tempfile.mkdtemp(prefix="vaepipe-fork-"))
        self.count = 0

    def _start(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.fork_server"], cwd=ROOT, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            if json.loads(self.proc.stdout.readline() or "{}").get("ready") is not True:
                self.enabled = False
        return self.enabled

    def run(self, args: list[str], cwd, env: dict, timeout: float) -> subprocess.CompletedProcess | None:
        with self.lock:
            if not self.enabled or not self._start():
                return None
            self.count += 1
            out, err = self.tmp / f"{self.count}.out", self.tmp / f"{self.count}.err"
            self.proc.stdin.write(json.dumps({"args": args, "env": env, "cwd": str(cwd), "stdout": str(out),
                                              "stderr": str(err), "timeout": timeout}) + "\n")
            self.proc.stdin.flush()
            reply = json.loads(self.proc.stdout.readline() or '{"rc": null}')
            stdout, stderr = (p.read_text(errors="replace") if p.exists() else "" for p in (out, err))
            out.unlink(missing_ok=True), err.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pipeline", *args]
        if reply.get("timeout"):
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
        if reply.get("rc") is None:
            raise RuntimeError(f"the tests' fork server died running {args}")
        return subprocess.CompletedProcess(cmd, reply["rc"], stdout, stderr)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_fork_server = _ForkServer()


@pytest.fixture(scope="session", autouse=True)
def _close_fork_server():
    yield
    _fork_server.close()


def vaepipe(*args, cwd=None, timeout=600, check=True, env=None) -> subprocess.CompletedProcess:
    """Run the real console entry point (`python -m pipeline`) in its own process (forked from the
    tests' fork server, or a fresh interpreter); `env` adds to the environment (a value of None
    removes that variable)."""
    env = {k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}.items() if v is not None}
    args = [str(a) for a in args]
    proc = _fork_server.run(args, cwd or ROOT, env, timeout)
    if proc is None:
        proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd or ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"vaepipe {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


# Lightning's quick, CPU-friendly settings for tests that train a few steps.
FAST = ["trainer.enable_progress_bar=false", "logger.backend=csv", "data.num_workers=0"]
