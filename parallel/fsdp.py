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

from parallel.collectives import Bf16AllGather, Int8AllGather, Int8ReduceScatter, Int8ReplicaAllReduce
from parallel.fsdp_hooks import install_all_gather, install_reduce_scatter, require_comm_hooks, shard_segments
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
    """Apply `fully_shard` to every `model.layers[i]` and to the root, in place, and install the
    collectives `pcfg` asks for; returns `model`.

    param_dtype: dtype of the unsharded parameters (compute); the sharded ones stay as built
    (FP32 masters). reduce_dtype: gradient reduction dtype when reduce_scatter_dtype is int8
    (the INT8 quantizer reads it; FP32 is the intended value).
    """
    _check(pcfg)
    int8_gather = pcfg.all_gather_dtype == "int8"
    int8_reduce = pcfg.reduce_scatter_dtype == "int8"
    # bf16 on the wire with fp32 compute needs a cast around the all-gather; fp32 on the wire
    # with bf16 compute is FSDP's default bf16 all-gather, bitwise the same as gathering fp32
    # and casting afterwards.
    cast_gather = pcfg.all_gather_dtype == "bf16" and param_dtype != torch.bfloat16
    if int8_gather or int8_reduce or cast_gather:
        key = "parallel.all_gather_dtype" if (int8_gather or cast_gather) else "parallel.reduce_scatter_dtype"
        require_comm_hooks(f"{key}='{getattr(pcfg, key.split('.')[1])}'")
    if pcfg.reduce_scatter_dtype == "bf16":
        reduce_dtype = torch.bfloat16
    elif pcfg.reduce_scatter_dtype == "fp32":
        reduce_dtype = torch.float32

    # HSDP: FSDP's own cross-replica all-reduce cannot be replaced, so with INT8 gradients the
    # model is sharded on the "dp_shard" sub-mesh and the replicas are summed by an INT8
    # all-reduce hook instead (docs/parallel.md, "Many nodes").
    shard_mesh, replica_group = mesh, None
    if mesh.ndim == 2 and int8_reduce:
        shard_mesh, replica_group = mesh["dp_shard"], mesh.get_group("dp_replicate")

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    modules = list(model.layers)
    for block in modules:
        fully_shard(block, mesh=shard_mesh, mp_policy=mp, reshard_after_forward=pcfg.reshard_after_forward)
    # The root holds embeddings, final norm and LM head; its parameters are needed again right
    # at the start of backward, so it never reshards after forward.
    fully_shard(model, mesh=shard_mesh, mp_policy=mp, reshard_after_forward=False)
    modules.append(model)

    block = pcfg.comm_block_size
    for module in modules:
        segments = shard_segments(module)
        if int8_gather:
            install_all_gather(module, Int8AllGather(block, segments))
        elif cast_gather:
            install_all_gather(module, Bf16AllGather())
        if int8_reduce:
            hook = None
            if replica_group is not None:
                hook = Int8ReplicaAllReduce(replica_group, block, pcfg.stochastic_rounding, segments)
            reduce_scatter = Int8ReduceScatter(block, pcfg.stochastic_rounding, pcfg.error_feedback, segments)
            install_reduce_scatter(module, reduce_scatter, replicate_hook=hook,
                                   divide_factor=float(mesh.size()) if hook is not None else None)
            module.int8_reduce_scatter = reduce_scatter  # for error_feedback_state
    return model


def _feedback(model: nn.Module):
    for name, module in model.named_modules():
        rs = getattr(module, "int8_reduce_scatter", None)
        if rs is not None and rs.error_feedback:
            yield name or "root", rs


def error_feedback_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's error-feedback residuals (parallel.error_feedback) by FSDP module name ("root"
    for the root): what its INT8 reduce-scatters have not delivered yet. A module has one from
    its first reduce-scatter on; empty without error feedback."""
    return {name: rs.residual for name, rs in _feedback(model) if rs.residual is not None}


def load_error_feedback_state(model: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> list[str]:
    """Put back the residuals `error_feedback_state` gave on the same number of ranks; returns
    the modules that have none in `state` (they start from zero)."""
    missing = []
    for name, rs in _feedback(model):
        if name in state:
            rs.residual = state[name].to(device=device, dtype=torch.float32)
        else:
            missing.append(name)
    return missing
