"""A private Slurm cluster on localhost for the tests: munged, slurmctld and two slurmd "nodes"
(n1, n2) on one host, all state under one folder, every daemon stopped by pid at the end.
Known to work as root with Debian's slurm-wlm (../shared/spec/ENVIRONMENT.md)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")
CRED_LIFETIME_S = 120  # Slurm's default credential lifetime (AuthInfo cred_expire, not set here)


def missing() -> str | None:
    """Why a cluster cannot start here, or None."""
    absent = [b for b in BINARIES if shutil.which(b) is None]
    if absent:
        return f"Slurm/munge not installed ({', '.join(absent)}): apt-get install slurmctld slurmd slurm-client munge"
    if os.geteuid() != 0:
        return "the private Slurm cluster needs root (SlurmUser=root)"
    if not Path("/etc/munge/munge.key").is_file() and shutil.which("mungekey") is None:
        return "no munge key and no mungekey to make one"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, folder: Path, cpus: int = 2):
        self.dir = Path(folder)
        self.cpus = cpus
        self.pids: list[int] = []
        self.released: set = set()  # (job, restart count) already released (release_requeued)
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "SlurmCluster":
        d = self.dir
        (d / "munge").mkdir(parents=True, exist_ok=True)
        (d / "state").mkdir(exist_ok=True)
        os.chmod(d / "munge", 0o755)
        key = d / "munge" / "munge.key"
        if Path("/etc/munge/munge.key").is_file():
            shutil.copy("/etc/munge/munge.key", key)
        else:
            subprocess.run(["mungekey", "-c", "-k", str(key)], check=True)
        os.chmod(key, 0o600)
        sock = d / "munge" / "munge.socket.2"
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={sock}",
                        f"--pid-file={d / 'munge' / 'munged.pid'}", f"--log-file={d / 'munge' / 'munged.log'}",
                        f"--seed-file={d / 'munge' / 'munged.seed'}"], check=True)
        self.pids.append(self._pid(d / "munge" / "munged.pid"))
        ports = [_free_port() for _ in range(3)]
        self.conf.write_text("\n".join([
            "ClusterName=vaepipe-test", "SlurmctldHost=localhost", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={ports[0]}", "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}",
            f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool-%n'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}", f"SlurmdLogFile={d / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "ReturnToService=2", "MinJobAge=600", "KillWait=10",
            # the cluster's own account of each job, printed when a test's job does not end as expected:
            # debug logs and one completion record per run of a job (a requeued job has several)
            "SlurmctldDebug=debug", "SlurmdDebug=debug", "JobCompType=jobcomp/filetxt", f"JobCompLoc={d / 'jobcomp.txt'}",
            f"NodeName=n1 NodeHostname=n1 NodeAddr=127.0.0.1 Port={ports[1]} CPUs={self.cpus}",
            f"NodeName=n2 NodeHostname=n2 NodeAddr=127.0.0.1 Port={ports[2]} CPUs={self.cpus}",
            "PartitionName=multi Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP", ""]))
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        self.pids.append(self._pid(d / "slurmctld.pid"))
        for node in ("n1", "n2"):
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", node], check=True, env=self.env)
            self.pids.append(self._pid(d / f"slurmd-{node}.pid"))
        deadline = time.time() + 30
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.split()
            if out and all(s == "idle" for s in out) and len(out) >= 1:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes did not become idle: {self.run('sinfo', check=False).stdout}")

    def stop(self) -> None:
        self.run("scontrol", "shutdown", check=False)
        time.sleep(1)
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        for pid in self.pids:
            while time.time() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    @staticmethod
    def _pid(path: Path) -> int:
        deadline = time.time() + 10
        while not (path.is_file() and path.read_text().strip()):
            if time.time() > deadline:
                raise RuntimeError(f"no pid file {path}")
            time.sleep(0.1)
        return int(path.read_text().split()[0])

    # --- use --------------------------------------------------------------------------------------

    def run(self, *cmd, check=True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, check=check)

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def account(self, job_id: str, lines: int = 40) -> str:
        """What Slurm itself says about a job: state, reason, exit code and restarts, one completion
        record per run (JobCompType=jobcomp/filetxt), and the daemons' last log lines naming it."""
        base = job_id.split("_")[0]
        named = re.compile(rf"(JobId={base}\b|job[ _]?{base}\b|StepId={base}\b|\b{base}_\d|\[{base}\.(batch|\d))", re.I)
        parts = [f"--- scontrol show job {job_id} ---", self.run("scontrol", "show", "job", job_id, check=False).stdout.strip()
                 or "(slurmctld no longer knows the job)"]
        comp = self.dir / "jobcomp.txt"
        records = [ln for ln in comp.read_text(errors="replace").splitlines() if f"JobId={base} " in ln] \
            if comp.is_file() else []
        parts += ["--- completion records (jobcomp) ---", *(records or ["(none)"])]
        for log in [self.dir / "slurmctld.log", *sorted(self.dir.glob("slurmd-*.log"))]:
            text = log.read_text(errors="replace").splitlines() if log.is_file() else []
            parts += [f"--- {log.name}: last {lines} lines naming job {base} ---",
                      *([ln for ln in text if named.search(ln)][-lines:] or ["(none)"])]
        return "\n".join(parts)

    def release_requeued(self, job_id: str, info: dict) -> None:
        """Start a requeued job without Slurm's hold, but never in the second of its requeue.

        Slurm holds a requeued job for the credential lifetime + 1 s (begin time = the moment its
        cleanup finished + 121 s) because slurmd revoked the job's credential at the requeue, to
        the second: a launch whose new credential is stamped in that same second is refused
        ("Job N already killed, do not launch batch job") and slurmctld ends the job FAILED 1:0
        without running it ("Killing non-startable batch JobId=N: Job credential revoked").
        Releasing with StartTime=now right after the requeue did exactly that on a fast machine
        (issue 30). The earliest safe start is the second after the cleanup: EligibleTime - 120 s."""
        key = (job_id, info.get("Restarts"))
        if key in self.released:  # once per requeue: the begin time set here is not Slurm's any more
            return
        eligible = info.get("EligibleTime", "")
        try:
            safe = time.mktime(time.strptime(eligible, "%Y-%m-%dT%H:%M:%S")) - CRED_LIFETIME_S
        except ValueError:  # no begin time shown: Slurm's own hold still applies
            return
        start = "now" if time.time() >= safe else time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(safe))
        self.run("scontrol", "update", f"JobId={job_id}", f"StartTime={start}", check=False)
        self.released.add(key)

    def wait(self, job_id: str, timeout: float = 300, release_requeued: bool = True, poll: float = 1.0) -> dict:
        """Until the job completes or fails; a requeued job (held ~120 s by Slurm) is released as
        early as is safe (release_requeued)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            if release_requeued and state == "PENDING" and int(info.get("Restarts", "0")) > 0:
                self.release_requeued(job_id, info)
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s\n"
                           + self.account(job_id))


def explain(cluster: "SlurmCluster", job_id: str, output: str = "", lines: int = 40) -> str:
    """A failed assertion's message: the job's output (tail), then the cluster's account of the job
    (`scontrol show job`, its completion records, the daemons' last log lines that name it)."""
    return "\n".join([f"--- job {job_id}: output (tail) ---", output[-3000:], cluster.account(job_id, lines)])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
