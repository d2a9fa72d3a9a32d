"""FSDP2 wrapping: the device mesh, `fully_shard` per block and at the root, and the wire dtypes.

`build_mesh` makes the data-parallel mesh (1-D "dp_shard", or 2-D ("dp_replicate", "dp_shard")
for HSDP across nodes); `shard_model` shards a `Transformer` on it. The sharded parameters stay
FP32 (the master weights the optimizer steps on); `param_dtype` is the compute dtype of the
unsharded parameters; `parallel.all_gather_dtype` / `parallel.reduce_scatter_dtype` say what
travels on the wire (docs/parallel.md has the table).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from train.config import ParallelConfig

WIRE_DTYPES = ("int8", "bf16", "fp32")


def build_mesh(world_size: int, dp_replicate: int, device_type: str) -> DeviceMesh:
    """1-D ("dp_shard",) mesh, or 2-D ("dp_replicate", "dp_shard") when dp_replicate > 1 (HSDP:
    shard within a group of world_size / dp_replicate ranks, e.g. a node; replicate across)."""
    if dp_replicate < 1 or world_size % dp_replicate != 0:
        raise ValueError(f"parallel.dp_replicate={dp_replicate} must divide the world size {world_size}")
    if dp_replicate == 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(device_type, (dp_replicate, world_size // dp_replicate),
                            mesh_dim_names=("dp_replicate", "dp_shard"))


def _check(pcfg: ParallelConfig) -> None:
    for key in ("all_gather_dtype", "reduce_scatter_dtype"):
        value = getattr(pcfg, key)
        if value not in WIRE_DTYPES:
            raise ValueError(f"parallel.{key}='{value}': must be one of {', '.join(WIRE_DTYPES)}")
    if pcfg.comm_block_size <= 0:
        raise ValueError(f"parallel.comm_block_size={pcfg.comm_block_size}: must be > 0")


def shard_model(model: nn.Module, mesh: DeviceMesh, pcfg: ParallelConfig,
                param_dtype: torch.dtype, reduce_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Apply `fully_shard` to every `model.layers[i]` and to the root, in place; returns `model`."""
    _check(pcfg)
    if pcfg.reduce_scatter_dtype == "bf16":
        reduce_dtype = torch.bfloat16
    elif pcfg.reduce_scatter_dtype == "fp32":
        reduce_dtype = torch.float32
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=pcfg.reshard_after_forward)
    # The root holds embeddings, final norm and LM head; its parameters are needed again right
    # at the start of backward, so it never reshards after forward.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model
