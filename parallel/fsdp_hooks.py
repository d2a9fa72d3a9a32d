"""The one place that touches FSDP2's semi-private communication hooks, behind version guards.

`FSDPModule.set_custom_all_gather`, `set_custom_reduce_scatter`,
`set_force_sum_reduction_for_comms` and `set_all_reduce_hook` arrived in torch 2.9; the base
classes of custom collectives live in a private module. If either moves, only this file changes.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.distributed.fsdp import FSDPModule

MIN_TORCH = "2.9"
_HOOKS = ("set_custom_all_gather", "set_custom_reduce_scatter",
          "set_force_sum_reduction_for_comms", "set_all_reduce_hook", "set_gradient_divide_factor")

try:
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
except ImportError:  # older torch: require_comm_hooks() explains before these are used
    AllGather = ReduceScatter = object


def require_comm_hooks(setting: str) -> None:
    """Raise a clear error when this torch cannot plug custom collectives into FSDP2."""
    missing = [name for name in _HOOKS if not hasattr(FSDPModule, name)]
    if missing or AllGather is object:
        what = f"FSDPModule.{missing[0]}" if missing else "torch.distributed.fsdp._fully_shard._fsdp_api"
        raise RuntimeError(
            f"{setting} needs torch >= {MIN_TORCH} ({what} is missing in torch {torch.__version__}); "
            f"upgrade torch, or set parallel.all_gather_dtype=bf16 and parallel.reduce_scatter_dtype=fp32")


def install_all_gather(module: FSDPModule, comm: AllGather) -> None:
    module.set_custom_all_gather(comm)


def install_reduce_scatter(module: FSDPModule, comm: ReduceScatter,
                           replicate_hook: Callable[[torch.Tensor], None] | None = None,
                           divide_factor: float | None = None) -> None:
    """Custom reduce-scatter that only sums; FSDP divides afterwards (by the data-parallel size,
    or `divide_factor`). `replicate_hook` reduces the reduce-scatter output across replicas
    (HSDP done by hand, see fsdp.py) before FSDP divides it."""
    module.set_custom_reduce_scatter(comm)
    module.set_force_sum_reduction_for_comms(True)
    if replicate_hook is not None:
        module.set_all_reduce_hook(replicate_hook)
    if divide_factor is not None:
        module.set_gradient_divide_factor(divide_factor)


def shard_segments(module: FSDPModule) -> list[int] | None:
    """Padded shard sizes of the module's parameters in the order FSDP packs them into one
    rank's row of the all-gather and reduce-scatter buffers; None if FSDP's internals moved."""
    try:
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            groups = [state._fsdp_param_group] if state._fsdp_param_group is not None else []
        if len(groups) != 1:
            return None
        return [p.padded_sharded_param_size.numel() for p in groups[0].fsdp_params]
    except AttributeError:
        return None
