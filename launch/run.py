"""torchrun launcher for the trainer: one machine, or one node of a multi-node job.

    python -m launch.run --nproc 2 [--log-rank 0] [--dry-run] [--config X.toml] [--section.key=value ...]
    python -m launch.run --nnodes 4 --nproc 8 --rdzv-endpoint HOST:PORT --rdzv-id JOB ...  (per node)

It checks the config against the world size before anything starts, then runs
`python -m torch.distributed.run ... -m train ...` as a child and stays in front of it:
SIGUSR1 and SIGTERM are forwarded to the training processes themselves (SignalForwarder),
which save a checkpoint and exit 0, so torchrun exits 0 too. torchrun
ignores SIGUSR1 (its default action would kill it and orphan the workers); the workers
inherit that and install their own handler.
launch/slurm.sbatch runs this module once per node.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
RESEND_S = 10


class LaunchError(RuntimeError):
    """The launch cannot work as asked; the message says what to change."""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m launch.run", allow_abbrev=False,
        description="Run the trainer under torchrun. Arguments not listed here "
                    "(--section.key=value) are passed to the trainer.")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes on this node (default: the number of GPUs, or 1 without CUDA)")
    p.add_argument("--log-rank", default="0",
                   help="local rank whose output is shown ('all' for every rank); every rank's "
                        "output is also kept under {logging.dir}/ranks/ (default: 0)")
    p.add_argument("--config", default=None, help="trainer TOML config")
    p.add_argument("--nnodes", type=int, default=1, help="nodes in the job (default: 1)")
    p.add_argument("--node-rank", type=int, default=None,
                   help="this node's index, 0 hosts the rendezvous (default: $SLURM_NODEID)")
    p.add_argument("--rdzv-endpoint", default=None,
                   help="HOST:PORT of the c10d rendezvous on node 0 (needed when --nnodes > 1)")
    p.add_argument("--rdzv-id", default="fqtrain", help="rendezvous id, the same on every node")
    p.add_argument("--rdzv-timeout", type=int, default=300,
                   help="seconds to wait for all nodes to join before failing (default: 300)")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command and exit")
    args, rest = p.parse_known_args(argv)
    for item in rest:
        if not (item.startswith("--") and "." in item.split("=", 1)[0]):
            p.error(f"unrecognized argument '{item}': launcher options are listed above, "
                    f"trainer overrides look like --section.key=value")
    return args, rest


def default_nproc() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def check_config(config: str | None, overrides: list[str], world_size: int):
    """Load and validate the trainer config for this world size, as the trainer will."""
    from train.config import ConfigError, load_config, validate
    try:
        cfg = load_config(config, overrides)
        validate(cfg, world_size=world_size)
    except ConfigError as e:
        raise LaunchError(f"{e} (world size {world_size})") from None
    return cfg


def check_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise LaunchError(f"--rdzv-endpoint '{endpoint}': expected HOST:PORT")
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LaunchError(f"--rdzv-endpoint '{endpoint}': rendezvous host '{host}' does not "
                          f"resolve from {socket.gethostname()} ({e.strerror}); use a name or "
                          f"address of node 0 that every node can reach") from None
    return host, int(port)


def wait_for_endpoint(host: str, port: int, timeout: float) -> None:
    """On nodes other than 0: wait until node 0's rendezvous store accepts connections."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=5).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"cannot reach the rendezvous {host}:{port} from {socket.gethostname()} "
                    f"within {timeout:.0f}s ({e.strerror or e}): is node 0 running, and is the "
                    f"port open between nodes? (--rdzv-timeout sets the wait)") from None
            time.sleep(1)


def torchrun_command(nproc: int, trainer_args: list[str], *, log_rank: str = "0",
                     log_dir: str | None = None, nnodes: int = 1, node_rank: int | None = None,
                     rdzv_endpoint: str | None = None, rdzv_id: str = "fqtrain",
                     rdzv_timeout: int = 300) -> list[str]:
    """The `python -m torch.distributed.run` command line (torch 2.11 and later)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        conf = f"join_timeout={rdzv_timeout},read_timeout={min(rdzv_timeout, 60)}"
        if node_rank is not None:
            # Node 0 hosts the store whether or not its hostname matches the endpoint's name.
            conf += f",is_host={int(node_rank == 0)}"
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={rdzv_id}", f"--rdzv-conf={conf}"]
    cmd.append("--max-restarts=0")
    if log_rank != "all":
        if not log_rank.isdigit() or int(log_rank) >= nproc:
            raise LaunchError(f"--log-rank {log_rank}: expected 'all' or a local rank "
                              f"0..{nproc - 1}")
        cmd.append(f"--local-ranks-filter={log_rank}")
    if log_dir is not None:
        cmd += [f"--log-dir={log_dir}", "--tee=3"]
    return cmd + ["-m", "train", *trainer_args]


def _children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (torchrun's workers), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry))
    return found


class SignalForwarder:
    """Forwards SIGUSR1/SIGTERM to torchrun's workers (its child processes).

    Installed first thing, so a signal that comes while the launcher is still checking the
    config is kept, not fatal. A signal that arrives before the workers exist is delivered when
    they appear, and it is sent again every RESEND_S seconds until torchrun exits: a worker
    still starting up has not installed its handler yet (SIGUSR1 is ignored until then), and
    the trainer treats repeats of a stop request as one.
    """

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.pending: int | None = None
        self.delivered_at: float | None = None
        self.previous = {sig: signal.signal(sig, self._on_signal)
                         for sig in (*FORWARDED_SIGNALS, signal.SIGINT)}

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, _frame):
        self.pending, self.delivered_at = signum, None
        print(f"launch.run: {signal.Signals(signum).name}: asking the training processes to "
              f"save a checkpoint and stop", file=sys.stderr, flush=True)
        self._send()

    def _send(self):
        if self.proc is None:
            return
        workers = _children(self.proc.pid)
        for pid in workers:
            try:
                os.kill(pid, self.pending)
            except ProcessLookupError:
                pass
        if workers:
            self.delivered_at = time.monotonic()

    def run(self, cmd: list[str]) -> int:
        """Run torchrun with SIGUSR1 ignored; forward signals; return its exit status."""
        # An ignored signal stays ignored across exec (a handler would not): set it for the
        # moment of the fork rather than in a preexec_fn, which is unsafe with threads.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        try:
            self.proc = subprocess.Popen(cmd)
        finally:
            signal.signal(signal.SIGUSR1, self._on_signal)
        # Ctrl-C reaches torchrun directly (same process group); wait for it to shut down.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        while self.proc.poll() is None:
            time.sleep(0.5)
            if self.pending is not None and (self.delivered_at is None or
                                             time.monotonic() - self.delivered_at > RESEND_S):
                self._send()
        code = self.proc.returncode
        return 128 - code if code < 0 else code


def build(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """Check the request (config vs world size, rendezvous host) and build the torchrun command."""
    nproc = args.nproc if args.nproc is not None else default_nproc()
    if nproc < 1:
        raise LaunchError(f"--nproc {nproc}: must be >= 1")
    if args.nnodes < 1:
        raise LaunchError(f"--nnodes {args.nnodes}: must be >= 1")
    if args.rdzv_endpoint is not None:
        check_endpoint(args.rdzv_endpoint)
    elif args.nnodes > 1:
        raise LaunchError(f"--nnodes {args.nnodes}: needs --rdzv-endpoint HOST:PORT of node 0")
    cfg = check_config(args.config, overrides, world_size=nproc * args.nnodes)
    config = ["--config", args.config] if args.config is not None else []
    return torchrun_command(nproc, [*config, *overrides], log_rank=args.log_rank,
                            log_dir=os.path.join(cfg.logging.dir, "ranks"), nnodes=args.nnodes,
                            node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint,
                            rdzv_id=args.rdzv_id, rdzv_timeout=args.rdzv_timeout)


def main(argv: list[str] | None = None) -> int:
    forwarder = SignalForwarder()
    try:
        return _main(forwarder, sys.argv[1:] if argv is None else argv)
    finally:
        forwarder.restore()


def _main(forwarder: SignalForwarder, argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    if args.node_rank is None and args.rdzv_endpoint and os.environ.get("SLURM_NODEID"):
        args.node_rank = int(os.environ["SLURM_NODEID"])
    try:
        cmd = build(args, overrides)
        if args.dry_run:
            print(shlex.join(cmd))
            return 0
        if args.node_rank not in (None, 0):
            wait_for_endpoint(*check_endpoint(args.rdzv_endpoint), args.rdzv_timeout)
    except LaunchError as e:
        print(f"launch.run: error: {e}", file=sys.stderr)
        return 2
    if forwarder.pending is not None:  # asked to stop before anything started: done
        return 0
    print(f"launch.run: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    return forwarder.run(cmd)


if __name__ == "__main__":
    sys.exit(main())
