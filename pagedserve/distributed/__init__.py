"""Tensor parallelism over torch.distributed: the shard plan and collectives (parallel.py), the worker
ranks and the engine's side of them (workers.py)."""
