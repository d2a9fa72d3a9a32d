"""A throwaway single-node SLURM cluster on localhost, for tests: munged, slurmctld and slurmd,
started as root with every file (config, key, sockets, state, logs) in one directory and
stopped by PID. Debian's `slurm-wlm` and `munge` packages provide the daemons.

    cluster = LocalSlurm(tmpdir); cluster.start()
    job = cluster.sbatch(["launch/slurm.sbatch", ...], cwd=workdir)
    cluster.wait_state(job, {"COMPLETED"}, timeout=300)
    cluster.stop()
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY"}


class ClusterError(RuntimeError):
    """The cluster did not come up, or a job did not reach the expected state in time."""


def cannot_run_reason() -> str | None:
    """Why this machine cannot host the cluster, or None when it can."""
    if os.geteuid() != 0:
        return "the SLURM test starts munged/slurmctld/slurmd as root; run as root"
    if not all(shutil.which(d) for d in DAEMONS) and not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and there is no apt-get to install them"
    return None


def install_packages(timeout: float = 600) -> float:
    """apt-get install slurm-wlm and munge when a daemon is missing; returns seconds spent."""
    if all(shutil.which(d) for d in DAEMONS):
        return 0.0
    start = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-2000:]}"
                               f"\n{res.stderr[-2000:]}")
    missing = [d for d in DAEMONS if not shutil.which(d)]
    if missing:
        raise ClusterError(f"apt-get installed {PACKAGES} but {missing} are not on PATH")
    return time.monotonic() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, diagnose=lambda: "", interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}\n{diagnose()}")
        time.sleep(interval)


class LocalSlurm:
    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- bring-up -----------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        try:
            self._write_files()
            self._start_munged(timeout)
            self._start_slurm(timeout)
        except BaseException:
            self.stop()
            raise

    def _write_files(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(self.root / sub, 0o700)
        os.chmod(self.root, 0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        plugstack = self.root / "plugstack.conf"
        plugstack.write_text("")
        r = self.root
        self.conf.write_text(f"""\
ClusterName=fqtrain-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
PlugStackConfig={plugstack}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
ReturnToService=2
JobRequeue=1
MinJobAge=86400
KillWait=30
SlurmctldTimeout=60
SlurmdTimeout=60
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc

    def _alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def _start_munged(self, timeout: float) -> None:
        m = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force",
                               f"--socket={self.munge_socket}", f"--key-file={m}/munge.key",
                               f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                               f"--seed-file={m}/munged.seed"])
        _wait(lambda: self.munge_socket.exists() or not self._alive("munged"), timeout,
              "munged's socket", self.diagnose)
        if not self._alive("munged"):
            raise ClusterError(f"munged exited at start\n{self.diagnose()}")

    def _start_slurm(self, timeout: float) -> None:
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])

        def idle():
            for name in ("slurmctld", "slurmd"):
                if not self._alive(name):
                    raise ClusterError(f"{name} exited at start\n{self.diagnose()}")
            out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            return out.strip() == "idle"
        _wait(idle, timeout, f"node {self.node} to be idle", self.diagnose)

    # -- use ----------------------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, timeout: float = 30) -> str:
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def sbatch(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
        res = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, capture_output=True,
                             text=True, timeout=30, env={**self.env, **(env or {})})
        if res.returncode != 0:
            raise ClusterError(f"sbatch {' '.join(args)} failed: {res.stderr.strip()}")
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_state(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        """Wait until the job is in one of `states`; a final state that is not wanted fails."""
        def reached():
            info = self.job(job_id)
            state = info.get("JobState")
            if state in states:
                return info
            if state in FINAL_STATES:
                raise ClusterError(f"job {job_id} ended {state}, expected {sorted(states)}\n"
                                   f"{self.diagnose(job_id)}")
            return None
        return _wait(reached, timeout, f"job {job_id} to reach {sorted(states)}",
                     lambda: self.diagnose(job_id))

    def diagnose(self, job_id: int | None = None) -> str:
        parts = []
        if job_id is not None:
            info = self.job(job_id)
            parts.append(f"scontrol show job {job_id}: {info}")
            out = info.get("StdOut")
            if out and os.path.exists(out):
                parts.append(f"--- {out} (tail) ---\n" + Path(out).read_text()[-6000:])
        for log in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if log.exists():
                parts.append(f"--- {log} (tail) ---\n" + log.read_text(errors="replace")[-1500:])
        return "\n".join(parts)

    # -- tear-down ----------------------------------------------------------------------------
    def stop(self, timeout: float = 40) -> None:
        """Cancel the jobs and let them drain, then stop the daemons this object started, by PID."""
        if self._alive("slurmctld") and self._alive("slurmd"):
            self.run(["scancel", "--quiet", "--user=root"], check=False)
            try:
                _wait(lambda: not self.run(["squeue", "-h", "-t", "R,CG,CF"], check=False).strip(),
                      timeout, "cancelled jobs to end")
            except ClusterError:
                pass  # stopping the daemons anyway; slurmstepd ends its job's processes
        for name in reversed(DAEMONS):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
