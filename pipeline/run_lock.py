"""One writer per run folder: `vaepipe fit` (and `submit`, while it writes) holds `.vaepipe-run.lock`.

Two fits on one run folder would interleave config.yaml, checkpoints and summary.json of two runs
(a requeue then refuses to resume). The lock is a file created exclusively (O_EXCL works on local
disks and NFS alike, where flock may be node-local) that records who holds it: host, pid, the
pid's start time, the Slurm job and its restart count. A second writer is refused at once,
naming the holder. A lock is taken over, with one line, only when its holder is provably gone:

- the same host, and that pid is not running (or is another process: its start time differs);
- the same Slurm job, restarted since (a requeued job: Slurm ended the earlier run, which a
  time-limit kill can stop before it removes its lock);
- another Slurm job that Slurm's controller says is no longer running (a job killed on another
  node: out of memory, past its kill wait).

Only the primary process locks (rank 0 of node 0): DDP ranks of the same run write nothing of
their own there. Anything else (a crashed node on shared storage) is for the user to judge: the
message names the file to remove.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from pipeline.errors import RunFolderBusy
from pipeline.outputs import process_alive

LOCK_NAME = ".vaepipe-run.lock"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # fields after the command name, which may hold spaces


def _slurm_job() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID")


def me(command: str) -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _start_time(pid), "slurm_job": _slurm_job(),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0), "command": command,
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"`vaepipe {holder.get('command', '?')}` pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"


def gone(holder: dict, now: dict) -> str | None:
    """Why the holder is provably gone (a line for the log), or None when it may still be running."""
    if holder.get("host") == now["host"] and isinstance(holder.get("pid"), int):
        started = _start_time(holder["pid"])
        if started is None and not process_alive(holder["pid"]):
            return "that process has exited"
        if started is not None and holder.get("pid_start") not in (None, started):
            return "that process has exited (its pid now belongs to another process)"
    job = holder.get("slurm_job")
    if job and job == now["slurm_job"] and isinstance(holder.get("slurm_restart"), int) and \
            holder["slurm_restart"] < now["slurm_restart"]:
        return "this is the same Slurm job, requeued since"
    if job and job != now["slurm_job"] and isinstance(job, str) and re.fullmatch(r"\d+(_\d+)?", job) and \
            slurm_job_ended(job):
        return f"Slurm says job {job} is no longer running"
    return None


def slurm_job_ended(job: str) -> bool:
    """True when Slurm's controller says the job is not pending or running (ended, or purged from
    its memory); False when it is, or when Slurm cannot be asked (no squeue, no answer): a job
    killed on another node (out of memory, past its kill wait) leaves a lock nobody else removes."""
    if shutil.which("squeue") is None:
        return False
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    if proc.returncode != 0:
        return "Invalid job id" in proc.stderr  # long gone: no longer in the controller's memory
    states = set(proc.stdout.split())
    return not states & {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
                         "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}


class RunFolderLock:
    """`with RunFolderLock(run_dir, "fit"):` holds the run folder or raises RunFolderBusy."""

    def __init__(self, run_dir: str | Path, command: str = "fit", log=print):
        self.path, self.command, self.log, self.held = Path(run_dir) / LOCK_NAME, command, log, None

    def acquire(self) -> "RunFolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = me(self.command)
        # a local guard: two takers on this host never both take over the same stale lock
        guard = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX)
            except OSError:  # a file system without flock on folders: the O_EXCL create still decides
                pass
            for _ in range(20):
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                except FileExistsError:
                    holder = self._read()
                    if holder is None:  # being written this instant by another taker (or damaged): look again
                        time.sleep(0.1)
                        continue
                    why = gone(holder, mine)
                    if why is None:
                        raise RunFolderBusy(
                            f"run folder {self.path.parent} is in use by {describe(holder)}: one writer per run "
                            f"folder (wait for it, or give this run another run.dir). If that process is certainly "
                            f"gone (a crashed node), remove {self.path}") from None
                    self.log(f"taking over {self.path} from {describe(holder)}: {why}")
                    self.path.unlink(missing_ok=True)
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(mine) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                self.held = mine
                return self
            raise RunFolderBusy(f"{self.path} exists but cannot be read as a vaepipe lock: if no vaepipe "
                                "process uses this run folder, remove it")
        finally:
            os.close(guard)

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text()[:4096])
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def release(self) -> None:
        """Remove the lock if it is still ours (a holder that was wrongly taken over keeps its own)."""
        if self.held is not None and self._read() == self.held:
            self.path.unlink(missing_ok=True)
        self.held = None

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
