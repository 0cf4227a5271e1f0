"""A throwaway one-machine SLURM cluster for tests: slurmctld and slurmd on 127.0.0.1,
configured by a slurm.conf generated into a temporary folder (no munge, nothing
global touched: clients find it through $SLURM_CONF).

In tests, use the `slurm_cluster` fixture (import it into the test module); by hand:

    python tests/slurm_cluster.py     # starts a cluster, prints the export line,
                                      # stops it on Ctrl-C or SIGTERM

Needs Debian's `slurm-wlm` (slurmctld, slurmd, sbatch, squeue, scontrol) and root
(SlurmUser is root so that jobs may run as whoever submits them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SLURM_COMMANDS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
NODE_NAME = "localnode"
PARTITION = "local"
START_TIMEOUT_S = 60


def missing_commands() -> list[str]:
    """SLURM programs that are not on PATH (or in /usr/sbin, where Debian puts the
    daemons)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [cmd for cmd in SLURM_COMMANDS if shutil.which(cmd, path=search) is None]


def _free_port() -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    """Physical memory in MB (what the node offers to jobs)."""
    with open("/proc/meminfo") as file:
        for line in file:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


def _die_with_parent() -> None:
    """In a daemon, before exec: get SIGTERM when the process that started it dies,
    however it dies (Linux prctl PR_SET_PDEATHSIG), so no daemon outlives a test run."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LocalSlurmCluster:
    """Start/stop slurmctld + slurmd with state, spool and logs under one folder."""

    def __init__(self, root: str | os.PathLike, cpus: int | None = None) -> None:
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        # the environment that clients (sbatch, squeue, ...) need
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        search = os.pathsep.join([self.env.get("PATH", ""), "/usr/sbin", "/sbin"])
        self.env["PATH"] = search

    def write_conf(self) -> None:
        """Generate slurm.conf: auth/none and cred/none (no munge), free ports, one
        node with this machine's CPUs and memory, one default partition."""
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        lines = [
            f"ClusterName=matbench-test-{os.getpid()}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            "MpiDefault=none",
            "ProctrackType=proctrack/pgid",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "ReturnToService=2",
            # keep finished jobs visible to scontrol for the test's checks
            "MinJobAge=600",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            # a requeued job waits cred_expire+1 s before it may start again
            "AuthInfo=cred_expire=5",
            "KillWait=10",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            "MailProg=/bin/true",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={NODE_NAME} NodeHostname={host} NodeAddr=127.0.0.1 "
            f"CPUs={self.cpus} RealMemory={int(_memory_mb() * 0.8)} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={NODE_NAME} Default=YES "
            "MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        # slurmd reads cgroup.conf beside slurm.conf when present; none is needed here

    def start(self) -> None:
        """Start both daemons in the foreground (-D, our children) and wait until the
        node accepts jobs."""
        self.write_conf()
        log = self.root / "log"
        for name, args in (
            ("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)]),
            ("slurmd", ["slurmd", "-D", "-N", NODE_NAME, "-f", str(self.conf)]),
        ):
            out = open(log / f"{name}.out", "w")
            self.procs[name] = subprocess.Popen(
                args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
            out.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode}:\n{self.logs()}"
                    )
            state = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout
            if state.strip().rstrip("*") in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the local SLURM node did not come up:\n{self.logs()}")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run(args, env=self.env, capture_output=True, text=True,
                              check=check, timeout=60)

    def logs(self) -> str:
        """The daemons' log files, for failure messages."""
        out = []
        for path in sorted((self.root / "log").glob("*")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    def wait_for_jobs(self, job_id: str | None = None, timeout: float = 600) -> None:
        """Block until the job (or every job) has left the queue."""
        deadline = time.monotonic() + timeout
        args = ["squeue", "-h", "-o", "%i %T"] + (["-j", job_id] if job_id else [])
        while time.monotonic() < deadline:
            result = self.run(*args, check=False)
            if result.returncode == 0 and not result.stdout.strip():
                return
            time.sleep(2)
        raise TimeoutError(f"jobs still queued after {timeout}s:\n{result.stdout}")

    def stop(self) -> None:
        """Cancel every job, let them end, then stop the daemons we started."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--full", f"--partition={PARTITION}", check=False)
                self.wait_for_jobs(timeout=30)
            except (TimeoutError, subprocess.SubprocessError, OSError):
                pass
        for name in ("slurmd", "slurmctld"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> LocalSlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalSlurmCluster]:
    """A running local cluster for the whole session; $SLURM_CONF points at it while
    it runs. Skips where SLURM is not installed, except in CI (CI=true), where that
    is a failure."""
    message = None
    if missing := missing_commands():
        message = f"SLURM not installed (missing {', '.join(missing)})"
    elif os.geteuid() != 0:
        message = "the local SLURM cluster runs its daemons as root"
    if message and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message}: CI must run the SLURM tests")
    if message:
        pytest.skip(message)
    old_conf, old_path = os.environ.get("SLURM_CONF"), os.environ["PATH"]
    with tempfile.TemporaryDirectory(prefix="slurm-") as tmp:
        with LocalSlurmCluster(tmp) as cluster:
            os.environ["SLURM_CONF"] = cluster.env["SLURM_CONF"]
            os.environ["PATH"] = cluster.env["PATH"]
            try:
                yield cluster
            finally:
                os.environ["PATH"] = old_path
                if old_conf is None:
                    os.environ.pop("SLURM_CONF", None)
                else:
                    os.environ["SLURM_CONF"] = old_conf


if __name__ == "__main__":
    # stop cleanly on SIGTERM too (background shells ignore Ctrl-C's SIGINT)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="slurm-") as tmp_dir:
        with LocalSlurmCluster(tmp_dir) as local:
            print(f"export SLURM_CONF={local.conf}\n(Ctrl-C stops the cluster)",
                  flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    sys.exit(0)
