"""Sharded checkpoints with torch.distributed.checkpoint (DCP), and the weight-file formats.

Layout: {checkpoint.dir}/step-{N:08d}/ holds

- `__{rank}_{i}.distcp` + `.metadata`: DCP shards of the FP32 master weights ("model") and the
  AdamW state ("optim"); DCP reshards them on load, so a run resumes on any number of ranks;
  with `parallel.error_feedback`, also each rank's residuals (`error_feedback.rank{R}.{module}`,
  restored on the same number of ranks only);
- `train_state.json`: step, data position (`consumed_samples`), tokens seen, LR scheduler;
- `rng-rank{R}.pt`: python, numpy, torch (and CUDA) RNG states of each rank, and its FQ layer
  state (`fq.linear.layer_state`: budget thresholds, stochastic-rounding counters);
- `config.toml`: the resolved config of the run that saved it;
- `manifest.json`, written last: size and crc32 of every other file (DCP has no checksums).

A save writes into step-N.tmp/, renames it into place only once every rank has finished and the
manifest is written, and rewrites `latest` (atomically) after that. A crash mid-save therefore
never leaves a folder that looks complete, and never touches the previous checkpoint.
`checkpoint.resume=auto` takes the checkpoint `latest` names if its files match its manifest
(sizes, then crc32), else falls back to the newest older one that does, with a warning.

Weight files (tools/convert_checkpoint.py, `checkpoint.init_from`): one consolidated torch or
safetensors file with this model's parameter names, or a Hugging Face Llama folder
(config.json + safetensors), whose q/k projections are permuted for HF's rotate-half RoPE.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
import zlib

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from fq import linear as fq_linear
from parallel.fsdp import error_feedback_state, load_error_feedback_state
from train import config as C

log = logging.getLogger("fqtrain")
STEP_RE = re.compile(r"^step-(\d{8})$")
FEEDBACK = "error_feedback"  # DCP keys of the residuals: error_feedback.rank{R}.{module}
SHARD_RE = re.compile(r"^__(\d+)_\d+\.distcp$")
MANIFEST = "manifest.json"
# FQTRAIN_FAULT=<point> makes a save exit the process at that point (crash-safety tests);
# FQTRAIN_FAULT_RANK limits it to one rank.
FAULT_POINTS = ("after_shards", "before_manifest", "before_rename", "before_latest")
FAULT_EXIT_CODE = 42
_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message names the file."""


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


def _step_of(path: str) -> int:
    return int(STEP_RE.match(os.path.basename(path)).group(1))


class Checkpointer:
    def __init__(self, cfg: C.Config, run_dir: str, rank: int, world_size: int):
        self.cfg = cfg.checkpoint
        self.model_cfg = cfg.model
        self.config_toml = C.to_toml(cfg)
        self.root = self.cfg.dir or os.path.join(run_dir, "checkpoints")
        self.rank, self.world_size = rank, world_size
        self.error_feedback = cfg.parallel.error_feedback
        self._pending = None  # an asynchronous save being written: (future, tmp, final, t0)
        self._async_group = None
        self._executor = None

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
                problem = self._check_space()
            except OSError as e:
                problem = (f"checkpoint.dir '{self.root}' is not writable ({e.strerror or e}); "
                           f"choose another checkpoint.dir")
        problem = _broadcast_object(problem)
        if problem:
            raise CheckpointError(problem)

    def _check_space(self) -> str | None:
        need = estimate_bytes(self.model_cfg, self.world_size if self.error_feedback else 0)
        free = shutil.disk_usage(self.root).free
        if free < need:
            return (f"checkpoint.dir '{self.root}' has {free / 2**30:.2f} GiB free, but one checkpoint "
                    f"of this model needs about {need / 2**30:.2f} GiB; free space or choose another "
                    f"checkpoint.dir")
        if free < need * (self.cfg.keep_latest + 1):
            log.warning(f"checkpoint.dir '{self.root}': {free / 2**30:.2f} GiB free, less than the "
                        f"{self.cfg.keep_latest + 1} x {need / 2**30:.2f} GiB that checkpoint.keep_latest="
                        f"{self.cfg.keep_latest} (plus the one being written) can take")
        return None

    def due(self, step: int, last: bool) -> bool:
        return self.cfg.interval > 0 and (step % self.cfg.interval == 0 or last)

    # ---- finding a checkpoint -----------------------------------------------------------------
    def list_steps(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        names = sorted((n for n in os.listdir(self.root) if STEP_RE.match(n)), reverse=True)
        return [os.path.join(self.root, n) for n in names]

    def latest_step(self) -> int | None:
        """The step `latest` names, or None without a readable `latest`."""
        try:
            with open(os.path.join(self.root, "latest"), encoding="utf-8") as f:
                m = STEP_RE.match(f.read().strip())
        except OSError:
            return None
        return int(m.group(1)) if m else None

    def find_resume(self) -> str | None:
        """The checkpoint to resume from (verified: sizes and crc32), or None for a fresh start."""
        mode = self.cfg.resume
        if mode == "never":
            return None
        if mode != "auto":
            problem = verify(mode) or self._verify_all_ranks(mode)
            if problem:
                raise CheckpointError(f"checkpoint.resume='{mode}': {problem}")
            return mode
        candidates = self.list_steps()
        latest = self.latest_step()
        if latest is not None:
            # Folders past `latest` were never marked complete: a crash before `latest` was
            # rewritten, or the future of a run restarted from an older checkpoint.
            newer = [p for p in candidates if _step_of(p) > latest]
            if newer and self.rank == 0:
                log.warning(f"ignoring {', '.join(os.path.basename(p) for p in newer)}: newer than "
                            f"'latest' (step-{latest:08d}); they will be overwritten as this run reaches them")
            candidates = [p for p in candidates if _step_of(p) <= latest]
        for path in candidates:
            problem = verify(path) or self._verify_all_ranks(path)
            if problem is None:
                return path
            if self.rank == 0:
                log.warning(f"checkpoint {path} is not usable ({problem}); trying an older one")
        return None

    def _verify_all_ranks(self, path: str) -> str | None:
        """Full crc32 check, the files shared out over the ranks; the first problem found."""
        t0 = time.perf_counter()
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            names = sorted(json.load(f)["files"])
        mine = names[self.rank::self.world_size]
        problems = _all_gather_object(verify(path, full=True, only=mine))
        problem = next((p for p in problems if p), None)
        if problem is None and self.rank == 0:
            log.info(f"verified {path} ({len(names)} files, crc32) in {time.perf_counter() - t0:.2f} s")
        return problem

    # ---- save / load ------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, scheduler, train_state: dict) -> str:
        """Write step-N/ (asynchronously with checkpoint.async_save: the state is copied to CPU
        memory now, written in a background thread, and finalised by `poll` or `wait`)."""
        self.wait()  # one save in flight at a time
        final = step_dir(self.root, step)
        tmp = final + ".tmp"
        t0 = time.perf_counter()
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            for name in os.listdir(self.root):  # leftovers of saves that crashed
                if name.endswith(".tmp") and STEP_RE.match(name[:-4]):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": self._untied(model_sd), "optim": optim_sd}
        # Keys of this rank only, so this rank writes them (DCP saves a plain tensor once).
        state.update({f"{FEEDBACK}.rank{self.rank}.{name}": t for name, t in error_feedback_state(model).items()})
        # Small files first: they are written synchronously and checksummed with the shards.
        torch.save({**_rng_state(), "fq": fq_linear.layer_state(model)}, os.path.join(tmp, f"rng-rank{self.rank}.pt"))
        if self.rank == 0:
            meta = {**train_state, "scheduler": scheduler.state_dict(), "world_size": self.world_size}
            _write_text(os.path.join(tmp, "train_state.json"), json.dumps(meta, indent=1))
            _write_text(os.path.join(tmp, "config.toml"), self.config_toml)
        if self.cfg.async_save:
            if self._async_group is None:
                # DCP's background thread runs collectives; they need a group of their own so
                # they never interleave with the training step's.
                self._async_group = dist.new_group(backend="gloo")
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt")
            upload = dcp.async_save(state, checkpoint_id=tmp, process_group=self._async_group)
            future = self._executor.submit(self._write_then_checksum, upload, tmp)
            self._pending = (future, tmp, final, t0)
            log.info(f"checkpoint {final}: state copied in {time.perf_counter() - t0:.2f} s, "
                     f"writing in the background")
        else:
            dcp.save(state, checkpoint_id=tmp)
            self._finalize(self._write_then_checksum(None, tmp), tmp, final, t0)
        return final

    def _untied(self, model_sd: dict) -> dict:
        """With tied embeddings `output.weight` is `tok_embeddings.weight`: store it once."""
        if self.model_cfg.tie_embeddings:
            model_sd = {k: v for k, v in model_sd.items() if k != "output.weight"}
        return model_sd

    def _write_then_checksum(self, upload, tmp: str) -> tuple[dict, float]:
        """(size and crc32 of each file this rank wrote, seconds the checksums took)."""
        if upload is not None:
            upload.result()
        _fault("after_shards", self.rank)
        t0 = time.perf_counter()
        records = {name: _file_record(os.path.join(tmp, name)) for name in self._own_files(tmp)}
        return records, time.perf_counter() - t0

    def _own_files(self, tmp: str) -> list[str]:
        """Files this rank wrote: its DCP shards and RNG file; rank 0 also the rest."""
        out = []
        for name in os.listdir(tmp):
            shard = SHARD_RE.match(name)
            if shard:
                mine = int(shard.group(1)) == self.rank
            elif name.startswith("rng-rank"):
                mine = name == f"rng-rank{self.rank}.pt"
            else:
                mine = self.rank == 0
            if mine:
                out.append(name)
        return out

    def _finalize(self, written: tuple[dict, float], tmp: str, final: str, t0: float) -> None:
        """Every rank has written its files: manifest, rename into place, `latest`, prune."""
        records, crc_seconds = written
        gathered = _all_gather_object(records)
        _fault("before_manifest", self.rank)
        if self.rank == 0:
            files = {name: rec for part in gathered for name, rec in part.items()}
            _write_text(os.path.join(tmp, MANIFEST), json.dumps(
                {"files": dict(sorted(files.items())), "world_size": self.world_size}, indent=1))
            _fsync_dir(tmp)
            _fault("before_rename", self.rank)
            if os.path.exists(final):  # an older save of the same step: replace it only now
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            _fault("before_latest", self.rank)
            _write_text(os.path.join(self.root, "latest"), os.path.basename(final) + "\n")
            self._prune(_step_of(final))
            size = sum(rec["size"] for rec in files.values())
            log.info(f"saved checkpoint {final} ({size / 2**30:.3f} GiB in "
                     f"{time.perf_counter() - t0:.2f} s, of which rank 0's crc32 {crc_seconds:.2f} s)")
        dist.barrier()

    def _prune(self, current: int) -> None:
        """Keep the newest keep_latest checkpoints up to `current` (the one just saved)."""
        older = [p for p in self.list_steps() if _step_of(p) < current]
        for old in older[self.cfg.keep_latest - 1:]:
            shutil.rmtree(old, ignore_errors=True)

    def poll(self, all_done: bool) -> None:
        """Finalise the asynchronous save once every rank's writes are done (`all_done` comes
        from an all-reduce of `busy()`, so all ranks finalise at the same step)."""
        if self._pending is not None and all_done:
            self.wait()

    def busy(self) -> bool | None:
        """None: no save in flight; True: this rank is still writing; False: its part is done."""
        return None if self._pending is None else not self._pending[0].done()

    def wait(self) -> None:
        """Block until the save in flight (if any) is written, then finalise it."""
        if self._pending is None:
            return
        future, tmp, final, t0 = self._pending
        self._pending = None
        try:
            written = future.result()
        except Exception as e:
            raise CheckpointError(f"asynchronous save to {tmp} failed: {e}") from e
        self._finalize(written, tmp, final, t0)

    def load(self, path: str, model, optimizer, scheduler) -> dict:
        t0 = time.perf_counter()
        if has_split_projections(path):
            raise CheckpointError(
                f"checkpoint {path} keeps q/k/v and gate/up as separate weights (written before fqtrain fused "
                f"them into qkv_proj and gate_up_proj), so its optimizer state cannot be resumed; start from "
                f"its weights with checkpoint.init_from='{path}' (fresh optimizer), or finish that run with "
                f"the fqtrain version that wrote it")
        with open(os.path.join(path, "train_state.json"), encoding="utf-8") as f:
            train_state = json.load(f)
        same_ranks = train_state.get("world_size") == self.world_size
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": self._untied(model_sd), "optim": optim_sd}
        # This rank's error-feedback residuals, if the checkpoint has them: their buffers are
        # allocated here from the checkpoint's metadata (the model has none before its first step).
        prefix = f"{FEEDBACK}.rank{self.rank}."
        if same_ranks and self.error_feedback:
            meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
            state.update({k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
                          if k.startswith(prefix)})
        try:
            dcp.load(state, checkpoint_id=path)
        except Exception as e:  # DCP's errors do not say which checkpoint
            raise CheckpointError(f"checkpoint {path} could not be loaded (does the model config "
                                  f"match {os.path.join(path, 'config.toml')}?): {e}") from e
        set_state_dict(model, optimizer, model_state_dict=retie(state["model"], self.model_cfg),
                       optim_state_dict=state["optim"])
        scheduler.load_state_dict(train_state.pop("scheduler"))
        if same_ranks and self.error_feedback:
            saved = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            missing = load_error_feedback_state(model, saved, next(model.parameters()).device)
            if missing and self.rank == 0:
                log.warning(f"checkpoint {path} has no error-feedback residuals for {len(missing)} module(s) "
                            f"(e.g. {missing[0]}): they start from zero, so this resume is close but not exact")
        rng_file = os.path.join(path, f"rng-rank{self.rank}.pt")
        if same_ranks:
            rank_state = torch.load(rng_file, weights_only=False)
            _set_rng_state(rank_state)
            missing = fq_linear.load_layer_state(model, rank_state.get("fq", {}))
            if missing and self.rank == 0:
                log.warning(f"checkpoint {path} has no FQ state for {len(missing)} layer(s) (e.g. {missing[0]}): "
                            f"their budget thresholds and stochastic-rounding counters start afresh")
        elif self.rank == 0:
            log.info(f"checkpoint {path} was saved by {train_state.get('world_size')} ranks, this run "
                     f"has {self.world_size}: weights and optimizer resharded; RNG states and FQ layer state "
                     f"(budget thresholds, stochastic-rounding counters)"
                     f"{', and error-feedback residuals,' if self.error_feedback else ''} are per rank and start afresh")
        if self.rank == 0:
            log.info(f"loaded checkpoint {path} in {time.perf_counter() - t0:.2f} s")
        return train_state

    def init_weights(self, path: str, model) -> None:
        """Start a fresh run from the weights of `path` (a weight file, a Hugging Face Llama
        folder, or a step-N folder, whose optimizer state is left out)."""
        t0 = time.perf_counter()
        if os.path.isfile(os.path.join(path, ".metadata")) and not has_split_projections(path):
            problem = verify(path) or self._verify_all_ranks(path)
            if problem:
                raise CheckpointError(f"checkpoint.init_from='{path}': {problem}")
            model_sd = self._untied(get_model_state_dict(model))
            try:
                dcp.load({"model": model_sd}, checkpoint_id=path)
            except Exception as e:
                raise CheckpointError(f"checkpoint.init_from='{path}': could not load its weights: {e}") from e
            set_model_state_dict(model, retie(model_sd, self.model_cfg))
        else:
            weights, _ = read_weights(path)
            check_weights(weights, model.state_dict(), f"checkpoint.init_from='{path}'")
            set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        if self.rank == 0:
            log.info(f"initialised the weights from {path} in {time.perf_counter() - t0:.2f} s")


# ---- verification ---------------------------------------------------------------------------
def verify(path: str, full: bool = False, only: list[str] | None = None) -> str | None:
    """None if `path` is a complete checkpoint, else what is wrong with it, naming the file.

    Cheap by default (every file of the manifest exists with its size); `full` also compares
    crc32, for the files in `only` (default: all)."""
    if not os.path.isdir(path):
        return f"no such directory {path}"
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        return f"missing {manifest} (the save did not complete)"
    try:
        with open(manifest, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable {manifest} ({e})"
    for name in (".metadata", "train_state.json"):
        if name not in files:
            return f"{manifest} does not list {name} (not an fqtrain checkpoint)"
    for name in (only if only is not None else sorted(files)):
        rec, file = files[name], os.path.join(path, name)
        if not os.path.isfile(file):
            return f"missing {file}"
        size = os.path.getsize(file)
        if size != rec["size"]:
            return f"{file} is {size} bytes, the manifest says {rec['size']} (truncated or overwritten)"
        if full and _crc32(file) != rec["crc32"]:
            return f"{file} fails its crc32 check (corrupted)"
    return None


def estimate_bytes(model_cfg: C.ModelConfig, feedback_ranks: int = 0) -> int:
    """Bytes of one checkpoint: FP32 weights and two AdamW moments per parameter, and with error
    feedback an FP32 residual per parameter on each of `feedback_ranks` ranks."""
    from train.model import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg)
    n = sum(p.numel() for p in model.parameters())
    return (12 + 4 * feedback_ranks) * n + (1 << 20)


# ---- weight files -------------------------------------------------------------------------
def consolidate(path: str) -> dict[str, torch.Tensor]:
    """The full FP32 model weights of a DCP step-N folder, in one process (no process group)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    problem = verify(path, full=True)
    if problem:
        raise CheckpointError(problem)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        return _load_state_dict_from_keys(keys="model", checkpoint_id=path)["model"]


def retie(weights: dict, model_cfg: C.ModelConfig) -> dict:
    """Put back the `output.weight` that a checkpoint of a tied model does not store."""
    if model_cfg.tie_embeddings and "output.weight" not in weights:
        weights = {**weights, "output.weight": weights["tok_embeddings.weight"]}
    return weights


def model_config_of(path: str) -> C.ModelConfig:
    """The model config of a step-N folder (its config.toml)."""
    return C.load_config(os.path.join(path, "config.toml")).model


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], C.ModelConfig | None]:
    """Weights with this model's names from a consolidated .pt/.safetensors file, a Hugging Face
    Llama folder, or a step-N folder; plus the model config when the source records one.
    Weights saved with q/k/v and gate/up apart come back fused."""
    weights, model_cfg = _read_weights(path)
    return fuse_projections(weights), model_cfg


def _read_weights(path: str) -> tuple[dict[str, torch.Tensor], C.ModelConfig | None]:
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, ".metadata")):
            model_cfg = model_config_of(path)
            return retie(consolidate(path), model_cfg), model_cfg
        if os.path.isfile(os.path.join(path, "config.json")):
            return read_hf(path)
        raise CheckpointError(f"'{path}' is a folder with neither .metadata (a checkpoint) nor "
                              f"config.json (a Hugging Face model)")
    if not os.path.isfile(path):
        raise CheckpointError(f"weight file '{path}' does not exist")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
        cfg = C.ModelConfig(**json.loads(meta["model_config"])) if "model_config" in meta else None
        return weights, cfg
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(blob, dict) and isinstance(blob.get("model"), dict):
        cfg = C.ModelConfig(**blob["model_config"]) if "model_config" in blob else None
        return blob["model"], cfg
    return blob, None


def write_weights(path: str, weights: dict[str, torch.Tensor], model_cfg: C.ModelConfig | None,
                  step: int | None = None) -> None:
    """One consolidated file: safetensors when `path` ends in .safetensors, else torch.save."""
    weights = {k: v.detach().contiguous() for k, v in weights.items()}
    info = {"model_config": model_cfg.__dict__ if model_cfg else None, "step": step}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        meta = {"format": "pt", "producer": "fqtrain"}
        if model_cfg:
            meta["model_config"] = json.dumps(model_cfg.__dict__)
        if step is not None:
            meta["step"] = str(step)
        save_file(_untie(weights), path, metadata=meta)
    else:
        torch.save({"model": weights, **{k: v for k, v in info.items() if v is not None}}, path)


def _untie(weights: dict) -> dict:
    """safetensors refuses tensors sharing storage (tied embeddings): give each its own copy."""
    seen, out = set(), {}
    for k, v in weights.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def check_weights(weights: dict, expected: dict, what: str) -> None:
    """Names and shapes of `weights` match the model's (`expected`), else an error naming them."""
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{what}: the weights do not fit this model: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}; set the model.* config to the source's")
    for k, v in expected.items():
        shape = tuple(v.shape)  # a DTensor's shape is the global one
        if tuple(weights[k].shape) != shape:
            raise CheckpointError(f"{what}: '{k}' has shape {tuple(weights[k].shape)}, the model's is "
                                  f"{shape}; set the model.* config to the source's")


# ---- Hugging Face Llama ---------------------------------------------------------------------
_HF_LAYER = {
    "attention.q_proj": "self_attn.q_proj", "attention.k_proj": "self_attn.k_proj",
    "attention.v_proj": "self_attn.v_proj", "attention.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj",
    "attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
}
_HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}


def _hf_name(name: str) -> str:
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = re.match(r"^layers\.(\d+)\.(.+)\.weight$", name)
    if not m or m.group(2) not in _HF_LAYER:
        raise CheckpointError(f"no Hugging Face Llama name for parameter '{name}'")
    return f"model.layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}.weight"


def _rope_permute(w: torch.Tensor, heads: int, to_hf: bool) -> torch.Tensor:
    """train/model.py rotates interleaved pairs (2i, 2i+1); HF Llama rotates (i, i + d/2).
    Reordering each head's output rows makes q.k (and so the logits) the same in both."""
    out_dim, in_dim = w.shape
    half = out_dim // heads // 2
    if to_hf:
        return w.reshape(heads, half, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)
    return w.reshape(heads, 2, half, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def to_hf(weights: dict[str, torch.Tensor], m: C.ModelConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """(HF LlamaForCausalLM state dict, config.json contents) for weights of this model."""
    out = {}
    for name, w in split_projections(weights, m).items():
        if m.tie_embeddings and name == "output.weight":
            continue  # HF ties lm_head to embed_tokens itself
        if name.endswith("q_proj.weight"):
            w = _rope_permute(w, m.n_heads, to_hf=True)
        elif name.endswith("k_proj.weight"):
            w = _rope_permute(w, m.n_kv_heads, to_hf=True)
        out[_hf_name(name)] = w.contiguous()
    hf_config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.dim, "intermediate_size": C.ffn_hidden(m),
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads, "head_dim": m.dim // m.n_heads,
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta, "rope_scaling": None,
        "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": m.init_std, "torch_dtype": "float32",
    }
    return out, hf_config


def from_hf(hf: dict[str, torch.Tensor], hf_config: dict) -> tuple[dict[str, torch.Tensor], C.ModelConfig]:
    """Inverse of `to_hf`: this model's weights and config from an HF Llama state dict."""
    rope = hf_config.get("rope_parameters") or {}
    m = C.ModelConfig(
        dim=hf_config["hidden_size"], n_layers=hf_config["num_hidden_layers"],
        n_heads=hf_config["num_attention_heads"],
        n_kv_heads=hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
        vocab_size=hf_config["vocab_size"], ffn_hidden=hf_config["intermediate_size"],
        max_seq_len=hf_config.get("max_position_embeddings", 2048),
        rope_theta=float(hf_config.get("rope_theta") or rope.get("rope_theta", 10000.0)),
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)))
    if (hf_config.get("rope_scaling") or rope.get("rope_type", "default")) not in (None, "default"):
        raise CheckpointError("Hugging Face model uses RoPE scaling, which train/model.py does not implement")
    if hf_config.get("head_dim", m.dim // m.n_heads) != m.dim // m.n_heads:
        raise CheckpointError("Hugging Face model has head_dim != hidden_size / num_attention_heads; "
                              "train/model.py cannot express it")
    names = {_hf_name(n): n for n in _split_names(m)}
    out = {}
    for hf_name, w in hf.items():
        if hf_name not in names:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            raise CheckpointError(f"unexpected Hugging Face weight '{hf_name}'")
        name = names[hf_name]
        if name.endswith("q_proj.weight"):
            w = _rope_permute(w, m.n_heads, to_hf=False)
        elif name.endswith("k_proj.weight"):
            w = _rope_permute(w, m.n_kv_heads, to_hf=False)
        out[name] = w
    out = {k: v.contiguous() for k, v in fuse_projections(out).items()}
    if m.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out, m


def _split_names(m: C.ModelConfig) -> list[str]:
    """This model's weight names with q/k/v and gate/up apart (the Hugging Face layout)."""
    from train.model import Transformer

    with torch.device("meta"):
        return list(split_projections(Transformer(m).state_dict(), m))


# ---- fused projections --------------------------------------------------------------------
# train/model.py keeps q/k/v as one weight (qkv_proj) and gate/up as another (gate_up_proj);
# Hugging Face Llama, and fqtrain checkpoints written before the fusion, keep them apart.
_FUSED = {"attention.qkv_proj": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def split_projections(weights: dict, m: C.ModelConfig) -> dict:
    """Fused weights cut into their parts (views, rows in the order train/model.py uses)."""
    hd = m.dim // m.n_heads
    rows = {"attention.qkv_proj": [m.n_heads * hd, m.n_kv_heads * hd, m.n_kv_heads * hd],
            "mlp.gate_up_proj": [C.ffn_hidden(m)] * 2}
    out = {}
    for name, w in weights.items():
        found = re.match(r"^(layers\.\d+\.)(.+)\.weight$", name)
        if found and found.group(2) in _FUSED:
            for part, piece in zip(_FUSED[found.group(2)], w.split(rows[found.group(2)])):
                out[f"{found.group(1)}{part}.weight"] = piece
        else:
            out[name] = w
    return out


def fuse_projections(weights: dict) -> dict:
    """Inverse of `split_projections`; fused weights (and anything else) pass unchanged."""
    out = dict(weights)
    for fused, parts in _FUSED.items():
        for name in [n for n in weights if n.endswith(f".{parts[0]}.weight")]:
            prefix = name[:-len(f"{parts[0]}.weight")]
            names = [f"{prefix}{p}.weight" for p in parts]
            if all(n in out for n in names):
                out[f"{prefix}{fused}.weight"] = torch.cat([out.pop(n) for n in names])
    return out


def has_split_projections(path: str) -> bool:
    """Whether the DCP checkpoint `path` stores q/k/v or gate/up as separate weights (False when
    its metadata is unreadable: `verify` and the load then name that problem)."""
    try:
        keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception:  # noqa: BLE001
        return False
    return any(k.endswith(f".{parts[0]}.weight") for k in keys for parts in _FUSED.values())


def write_hf(folder: str, weights: dict[str, torch.Tensor], m: C.ModelConfig) -> None:
    from safetensors.torch import save_file

    hf, hf_config = to_hf(weights, m)
    os.makedirs(folder, exist_ok=True)
    save_file(hf, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    _write_text(os.path.join(folder, "config.json"), json.dumps(hf_config, indent=1))


def read_hf(folder: str) -> tuple[dict[str, torch.Tensor], C.ModelConfig]:
    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        hf_config = json.load(f)
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"Hugging Face folder '{folder}' has no .safetensors files")
    hf = {}
    for name in files:
        hf.update(load_file(os.path.join(folder, name)))
    return from_hf(hf, hf_config)


# ---- helpers ------------------------------------------------------------------------------
def _fault(point: str, rank: int) -> None:
    if os.environ.get("FQTRAIN_FAULT") == point and os.environ.get("FQTRAIN_FAULT_RANK", str(rank)) == str(rank):
        logging.getLogger("fqtrain").error(f"FQTRAIN_FAULT={point}: exiting rank {rank} mid-save")
        os._exit(FAULT_EXIT_CODE)


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_record(path: str) -> dict:
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # on disk before the manifest vouches for it
    return {"size": os.path.getsize(path), "crc32": _crc32(path)}


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


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _broadcast_object(obj):
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather_object(obj) -> list:
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
