"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

Layout: {checkpoint.dir}/step-{N:08d}/ holds the DCP shards of the FP32 master weights and the
optimizer state, plus train_state.json (step, data position, scheduler), config.toml and one
rng-rank{R}.pt per rank. A save goes to step-N.tmp/ and is renamed into place only once every
rank has finished, and `latest` is rewritten (atomically) after that: a crash mid-save never
leaves a folder that looks complete, and never touches the previous checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from train import config as C

log = logging.getLogger("fqtrain")
STEP_RE = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message names the file."""


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


class Checkpointer:
    def __init__(self, cfg: C.Config, run_dir: str, rank: int, world_size: int):
        self.cfg = cfg.checkpoint
        self.config_toml = C.to_toml(cfg)
        self.root = self.cfg.dir or os.path.join(run_dir, "checkpoints")
        self.rank, self.world_size = rank, world_size

    # ---- before training --------------------------------------------------------------------
    def check_writable(self) -> None:
        """Fail before training, not at the first save, if checkpoints cannot be written."""
        if self.cfg.interval == 0:
            return
        problem = None
        if self.rank == 0:
            try:
                os.makedirs(self.root, exist_ok=True)
                probe = os.path.join(self.root, f".write-probe-{os.getpid()}")
                with open(probe, "w") as f:
                    f.write("ok")
                os.remove(probe)
            except OSError as e:
                problem = f"checkpoint.dir '{self.root}' is not writable ({e.strerror}); choose another checkpoint.dir"
        problem = _broadcast_object(problem)
        if problem:
            raise CheckpointError(problem)

    def due(self, step: int, last: bool) -> bool:
        return self.cfg.interval > 0 and (step % self.cfg.interval == 0 or last)

    # ---- finding a checkpoint -----------------------------------------------------------------
    def list_steps(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        names = sorted((n for n in os.listdir(self.root) if STEP_RE.match(n)), reverse=True)
        return [os.path.join(self.root, n) for n in names]

    def find_resume(self) -> str | None:
        mode = self.cfg.resume
        if mode == "never":
            return None
        if mode != "auto":
            problem = verify(mode)
            if problem:
                raise CheckpointError(f"checkpoint.resume='{mode}': {problem}")
            return mode
        for path in self.list_steps():
            problem = verify(path)
            if problem is None:
                return path
            log.warning(f"checkpoint {path} is not usable ({problem}); trying an older one")
        return None

    # ---- save / load ------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, scheduler, train_state: dict) -> str:
        final = step_dir(self.root, step)
        tmp = final + ".tmp"
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        torch.save(_rng_state(), os.path.join(tmp, f"rng-rank{self.rank}.pt"))
        if self.rank == 0:
            state = {**train_state, "scheduler": scheduler.state_dict(), "world_size": self.world_size}
            _write_text(os.path.join(tmp, "train_state.json"), json.dumps(state, indent=1))
            _write_text(os.path.join(tmp, "config.toml"), self.config_toml)
        dist.barrier()
        if self.rank == 0:
            if os.path.exists(final):  # an older save of the same step: replace it only now
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_text(os.path.join(self.root, "latest"), os.path.basename(final) + "\n")
            self._prune()
            log.info(f"saved checkpoint {final}")
        dist.barrier()
        return final

    def _prune(self) -> None:
        for old in self.list_steps()[self.cfg.keep_latest:]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: str, model, optimizer, scheduler) -> dict:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(state, checkpoint_id=path)
        except Exception as e:  # DCP's errors do not say which checkpoint
            raise CheckpointError(f"checkpoint {path} could not be loaded: {e}") from e
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        with open(os.path.join(path, "train_state.json"), encoding="utf-8") as f:
            train_state = json.load(f)
        scheduler.load_state_dict(train_state.pop("scheduler"))
        rng_file = os.path.join(path, f"rng-rank{self.rank}.pt")
        if train_state.get("world_size") == self.world_size and os.path.exists(rng_file):
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return train_state

    def wait(self) -> None:
        """Saves are synchronous for now; kept so the trainer has one place to wait."""


def verify(path: str) -> str | None:
    """None if `path` looks like a complete checkpoint, else what is wrong with it."""
    if not os.path.isdir(path):
        return f"no such directory {path}"
    for name in (".metadata", "train_state.json"):
        if not os.path.isfile(os.path.join(path, name)):
            return f"missing {os.path.join(path, name)}"
    return None


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _broadcast_object(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
