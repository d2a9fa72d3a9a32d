"""DeepSpeed ZeRO-3 (ZeRO++ on CUDA): the second engine, `parallel.engine = "deepspeed"`.

The same model, data order, LR schedule, clipping and metrics as the FSDP path; DeepSpeed owns
the sharding, the gradient accumulation (it divides the loss by the accumulation steps and
steps optimizer and schedule at the boundary) and the checkpoint format. DeepSpeed is an
optional install (`pip install -e ".[deepspeed]"`): it is imported only when this engine is
chosen. docs/deepspeed.md explains the choices and the differences from the FSDP path.
"""
from __future__ import annotations

import logging
import os
import re
import warnings

import torch
import torch.distributed as dist

from train import config as C
from train.checkpoint import STEP_RE, Checkpointer, CheckpointError, _write_text, step_dir

log = logging.getLogger("fqtrain")
INSTALL_HINT = "pip install -e '.[deepspeed]'"
CLIENT_STATE_KEY = "fqtrain"


def require_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise C.ConfigError(f"parallel.engine='deepspeed' but DeepSpeed is not installed ({e}); "
                            f"run {INSTALL_HINT}, or use parallel.engine=fsdp") from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def wire_int8(cfg: C.Config, world_size: int) -> tuple[bool, bool]:
    """(quantized weights, quantized gradients) for ZeRO++; as on FSDP, a world of one has no
    wire, so INT8 there means nothing."""
    p = cfg.parallel
    if world_size == 1:
        return False, False
    return p.all_gather_dtype == "int8", p.reduce_scatter_dtype == "int8"


def check_config(cfg: C.Config, world_size: int, device_type: str) -> None:
    """What DeepSpeed cannot do here, as a ConfigError before any work starts."""
    require_deepspeed()
    p = cfg.parallel
    q_weights, q_grads = wire_int8(cfg, world_size)
    if device_type != "cuda" and (q_weights or q_grads):
        keys = [f"parallel.{k}='int8'" for k, on in
                (("all_gather_dtype", q_weights), ("reduce_scatter_dtype", q_grads)) if on]
        raise C.ConfigError(
            f"{' and '.join(keys)} with parallel.engine='deepspeed' means ZeRO++ quantized "
            f"{'weights' if q_weights else 'gradients'}{' and gradients' if q_weights and q_grads else ''}, "
            f"whose quantizer op DeepSpeed builds for CUDA only; on {device_type} pass "
            f"--parallel.all_gather_dtype=fp32 --parallel.reduce_scatter_dtype=fp32 "
            f"(plain ZeRO-3), or use parallel.engine=fsdp (INT8 on every device)")
    unsupported = [(key, bad) for key, bad in (
        ("parallel.dp_replicate", p.dp_replicate != 1),
        ("parallel.stochastic_rounding", p.stochastic_rounding),
        ("parallel.error_feedback", p.error_feedback),
        ("train.compile", cfg.train.compile),
        ("checkpoint.async_save", cfg.checkpoint.async_save),
        ("checkpoint.init_from", bool(cfg.checkpoint.init_from)),
    ) if bad]
    if unsupported:
        key = unsupported[0][0]
        section, name = key.split(".")
        default = getattr(getattr(C.Config(), section), name)
        if isinstance(default, bool):
            default = str(default).lower()
        elif default == "":
            default = "''"
        why = " (the shipped GPU configs turn it on)" if key == "train.compile" else ""
        raise C.ConfigError(f"{key}={getattr(getattr(cfg, section), name)!r} is not supported with "
                            f"parallel.engine='deepspeed'{why}; set --{key}={default} or use "
                            f"parallel.engine=fsdp")


def deepspeed_config(cfg: C.Config, world_size: int, compute_dtype: torch.dtype) -> dict:
    t, p = cfg.train, cfg.parallel
    q_weights, q_grads = wire_int8(cfg, world_size)
    accum = t.global_batch_size // (t.micro_batch_size * world_size)
    out = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": compute_dtype == torch.bfloat16},
        "zero_optimization": {
            "stage": 3,
            # FSDP shards every parameter; so does this (DeepSpeed's default keeps parameters
            # under 1e5 elements whole on every rank, which would leave the debug model unsharded).
            "stage3_param_persistence_threshold": 0,
            "zero_quantized_weights": q_weights,
            "zero_quantized_gradients": q_grads,
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if not q_grads and p.reduce_scatter_dtype in ("bf16", "fp32"):
        out["communication_data_type"] = p.reduce_scatter_dtype
    return out


def jit_arch_list(value: str) -> str:
    """TORCH_CUDA_ARCH_LIST in the form DeepSpeed's JIT op builder parses: it reads each entry's
    major.minor as integers, so architecture suffixes go ('9.0a' -> '9.0'; '+PTX' stays)."""
    entries = []
    for cc in re.split(r"[;, ]+", value.strip()):
        m = re.fullmatch(r"(\d+)\.(\d+)[a-z]*(\+PTX)?", cc)
        entry = f"{m.group(1)}.{m.group(2)}{m.group(3) or ''}" if m else cc
        if entry and entry not in entries:
            entries.append(entry)
    return ";".join(entries)


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: C.Config,
               world_size: int, compute_dtype: torch.dtype):
    """Wrap model, optimizer (the project's AdamW groups) and LR schedule in a DeepSpeed engine;
    returns (engine, its optimizer, its scheduler). DeepSpeed steps the scheduler itself."""
    deepspeed = require_deepspeed()
    # DeepSpeed asserts LOCAL_RANK is set; a plain `python -m train` (world of one) has none.
    os.environ.setdefault("LOCAL_RANK", "0")
    # ZeRO++ JIT-builds its quantizer op; images that set TORCH_CUDA_ARCH_LIST=9.0a (the torch
    # 2.11 CUDA image does) make that build fail with "invalid literal for int(): '0a'".
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    fixed = jit_arch_list(arch)
    if arch and fixed != arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = fixed
        log.info(f"TORCH_CUDA_ARCH_LIST={arch!r} -> {fixed!r} for DeepSpeed's op builder")
    # ZeRO-3 calls two collectives that torch deprecates, and the warnings repeat every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            r"is deprecated", category=FutureWarning)
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size, compute_dtype), dist_init_required=False)
    return engine, ds_optimizer, ds_scheduler


class DeepSpeedCheckpointer(Checkpointer):
    """The Checkpointer interface over DeepSpeed's own save/load.

    Layout: {checkpoint.dir}/step-{N:08d}/ as DeepSpeed writes it (per-rank ZeRO partitions of
    the FP32 weights and optimizer state, the LR scheduler, our train state as client state),
    plus `config.toml`; `latest` as on the FSDP path (atomic, written once every rank's files
    are). No manifest or crc32: the two engines' checkpoints do not load into each other."""

    def save(self, step: int, model, optimizer, scheduler, train_state: dict) -> str:
        final = step_dir(self.root, step)
        # DeepSpeed's own `latest` is written by rank 0 before the other ranks are known to have
        # finished; ours, written after DeepSpeed's closing barrier, names only complete saves.
        model.save_checkpoint(self.root, tag=os.path.basename(final), save_latest=False,
                              client_state={CLIENT_STATE_KEY: {**train_state, "world_size": self.world_size}})
        if self.rank == 0:
            _write_text(os.path.join(final, "config.toml"), self.config_toml)
            _write_text(os.path.join(self.root, "latest"), os.path.basename(final) + "\n")
            self._prune(step)
            log.info(f"saved checkpoint {final} (DeepSpeed)")
        dist.barrier()
        return final

    def find_resume(self) -> str | None:
        resume = self.cfg.resume
        if resume == "never":
            return None
        if resume != "auto":
            if not (os.path.isdir(resume) and STEP_RE.match(os.path.basename(resume.rstrip("/")))):
                raise CheckpointError(f"checkpoint.resume='{resume}': not a step-NNNNNNNN folder; "
                                      f"use auto, never, or a folder under {self.root}")
            return resume.rstrip("/")
        latest = self.latest_step()
        if latest is None:
            return None
        path = step_dir(self.root, latest)
        if not os.path.isdir(path):
            raise CheckpointError(f"{os.path.join(self.root, 'latest')} names step-{latest:08d}, "
                                  f"which is missing; pass checkpoint.resume=<a step folder> or never")
        return path

    def load(self, path: str, model, optimizer, scheduler) -> dict:
        loaded, client = model.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
        if loaded is None or CLIENT_STATE_KEY not in (client or {}):
            raise CheckpointError(f"checkpoint {path} could not be loaded by DeepSpeed (was it saved "
                                  f"with parallel.engine=deepspeed and the same number of ranks?)")
        # As on the FSDP path, the schedule's shape comes from the config (train.steps may
        # grow): the restored optimizer holds the old schedule's learning rate until the next
        # scheduler step, so set this step's now.
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        return dict(client[CLIENT_STATE_KEY])
