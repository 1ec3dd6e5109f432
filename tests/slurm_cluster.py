"""A private single-node Slurm cluster on this host, for the tests: munged, slurmctld and slurmd run as root from a
temporary folder with their own ports, munge socket, key and ``SLURM_CONF``, so they touch no system cluster.

Debian's ``slurm-wlm`` and ``munge`` are installed with apt-get when absent. The node has this host's name, 2 CPUs
and two stand-in GPUs (Slurm wants one device file per GPU: /dev/null and /dev/zero), so that jobs asking for GPUs
are scheduled; CUDA finds none in them, so their runs use the CPU and gloo. Only the daemons started here are
stopped, by their process ids, after the cluster's own jobs are cancelled.
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")
CPUS = 2

SLURM_CONF = """\
ClusterName=ncbench-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1,bf_interval=1
KillWait=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
GRES_CONF = "NodeName={host} Name=gpu File=/dev/null\nNodeName={host} Name=gpu File=/dev/zero\n"


def unavailable() -> str | None:
    """Why no cluster can be started here, or None."""
    if os.geteuid() != 0:
        return "a private Slurm cluster needs root (slurmd runs jobs as any user)"
    if not all(shutil.which(c) for c in COMMANDS) and shutil.which("apt-get") is None:
        return "slurm-wlm and munge are not installed and apt-get is not available"
    return None


def install() -> None:
    """Install Debian's slurm-wlm and munge unless their commands are already here."""
    if all(shutil.which(c) for c in COMMANDS):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], check=True, env=env, capture_output=True,
                   timeout=600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """munged + slurmctld + slurmd in ``root``; :attr:`env` points Slurm's commands at it."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {"SLURM_CONF": str(root / "slurm.conf")}
        self.daemons: list[subprocess.Popen] = []

    def start(self, timeout: float = 60) -> None:
        host = socket.gethostname().split(".")[0]
        for folder in ("state", "spool"):
            (self.root / folder).mkdir(parents=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (self.root / "slurm.conf").write_text(SLURM_CONF.format(host=host, root=self.root, cpus=CPUS,
                                                                ctld_port=_free_port(), slurmd_port=_free_port()))
        (self.root / "gres.conf").write_text(GRES_CONF.format(host=host))
        self._daemon(["munged", "--foreground", "--force", f"--socket={self.root}/munge.socket", f"--key-file={key}",
                      f"--pid-file={self.root}/munged.pid", f"--log-file={self.root}/munged.log",
                      f"--seed-file={self.root}/munged.seed"])
        self._wait(lambda: (self.root / "munge.socket").exists(), timeout, "munged")
        self._daemon(["slurmctld", "-D", "-i"])
        self._daemon(["slurmd", "-D"])
        self._wait(lambda: self.run("sinfo", "--noheader", "--format=%T").stdout.strip() == "idle", timeout,
                   "an idle node")

    def run(self, *args: str) -> subprocess.CompletedProcess:
        """A Slurm command against this cluster."""
        return subprocess.run(args, capture_output=True, text=True, timeout=60, env={**os.environ, **self.env},
                              check=False)

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop the daemons started here (last started first)."""
        if self.daemons and self.daemons[-1].poll() is None:
            self.run("scancel", f"--user={getpass.getuser()}")
            deadline = time.monotonic() + 30
            while self.run("squeue", "--noheader").stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for proc in reversed(self.daemons):
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.daemons.clear()

    def _daemon(self, argv: list[str]) -> None:
        with open(self.root / f"{argv[0]}.out", "w") as log:
            self.daemons.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                 env={**os.environ, **self.env}))

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.daemons if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log"))
                                 + sorted(self.root.glob("*.out")))
                raise RuntimeError(f"the test Slurm cluster did not reach {what} (exited: {dead or 'none'})\n{logs}")
            time.sleep(0.2)
