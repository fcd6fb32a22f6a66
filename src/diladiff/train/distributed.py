"""Process-group set-up for torchrun (DDP over NCCL on GPUs, gloo on CPUs) and replica checks.

torchrun --nproc_per_node=8 -m diladiff train mdlm ...          # one node
torchrun --nnodes=2 --node_rank=R --rdzv-endpoint=HOST:PORT ...  # several nodes
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diladiff.config import ConfigError


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        return (
            torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        )
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but CUDA is not available here")
    return device


def setup(device_spec: str = "auto") -> DistEnv:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def all_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world
    return value


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in name order (identical replicas, identical digest).
    A sharded (FSDP2) parameter is gathered first (a collective: every rank calls this), so the
    digest is the full model's; the ranks' replicated buffers and frozen parameters still have
    to agree for the digests to."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        if hasattr(p, "full_tensor"):  # a DTensor
            p = p.full_tensor()
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def replica_digests(module: torch.nn.Module, env: DistEnv) -> list[str]:
    """The weights digest of every process (rank order); all equal when DDP stayed in sync."""
    digest = weights_digest(module)
    if not env.enabled:
        return [digest]
    out: list[str] = [""] * env.world
    dist.all_gather_object(out, digest)
    return out
