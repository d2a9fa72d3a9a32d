"""FSDP2 wrapping with INT8 weight all-gathers and INT8 gradient reduce-scatters.

Entry points: `parallel.fsdp.build_mesh`, `parallel.fsdp.shard_model`, and `comm_stats()` /
`reset_comm_stats()` for the bytes parallel/'s own collectives sent. docs/parallel.md explains.
"""
from parallel.collectives import comm_stats, reset_comm_stats

__all__ = ["comm_stats", "reset_comm_stats"]
