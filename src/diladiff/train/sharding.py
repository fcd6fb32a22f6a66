"""train.parallel=fsdp: torch's FSDP2 (torch.distributed.fsdp.fully_shard) for the trainer.

What is sharded: with `per_block` (a stage's `fsdp_per_block`: its forward runs the blocks the
same way on every rank), every element of an nn.ModuleList that holds trainable parameters (the
transformer, MM-DiT and Perceiver blocks) is its own FSDP unit, gathered only for its own
forward and backward; then the stage itself (the module whose forward the trainer calls), so
every other trainable parameter (embeddings, heads, cross-attention, mask vectors) is gathered
for the stage's forward. Without `per_block` the stage is the only unit: its trainable
parameters are gathered once per forward (whatever passes the forward runs, on any rank) and
resharded after the backward. Frozen parameters (a frozen auto-encoder, a distillation teacher, a
frozen embedding table) are FSDP's `ignored_params`: replicated plain tensors, never gathered
or reduced, so a frozen module works as in a single process. Buffers are never sharded; their
owners keep them equal across ranks (as under DDP). The feature model is no registered
submodule at all (features.py).

Parameters, gradients and AdamW state of the trainable parts are sharded (dim 0) across the
ranks; gradients are reduce-scattered on the last micro-batch of a step only
(`set_requires_gradient_sync`, the counterpart of DDP's no_sync). With bf16 precision the
gathered parameters and the computation are bf16, gradients are reduced in fp32 and the
sharded master weights stay fp32 (MixedPrecisionPolicy).

Checkpoints hold full (unsharded) tensors in the single-process layout: the plain module's
state dict, the optimizer state keyed by parameter index as torch.optim writes it, the EMA of
the full tensors. So one checkpoint resumes under fsdp, ddp or a single process alike.

torch.distributed.{fsdp,tensor,checkpoint} are imported when first used: a ddp or
single-process run does not pay for them at start-up.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _full_options(cpu_offload: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def is_sharded(t) -> bool:
    """Whether `t` is a DTensor (without importing torch.distributed.tensor)."""
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does when it wraps a module)."""
    for t in [*module.parameters(), *module.buffers()]:
        data = t.data.view(torch.uint8) if t.dtype == torch.bool else t.data
        dist.broadcast(data, src=0)


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The per-block FSDP units: elements of an nn.ModuleList with a trainable parameter,
    innermost first (fully_shard goes bottom-up)."""
    units = [
        child
        for m in module.modules()
        if isinstance(m, nn.ModuleList)
        for child in m
        if any(p.requires_grad for p in child.parameters())
    ]
    return units[::-1]


def shard(
    module: nn.Module, device: torch.device, world: int, bf16: bool, per_block: bool = True
) -> None:
    """fully_shard `module` in place (per block if `per_block`, then the root); frozen
    parameters are left out (replicated). Every rank starts from rank 0's weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    broadcast_module(module)
    mesh = init_device_mesh(device.type, (world,))
    frozen = {p for p in module.parameters() if not p.requires_grad}
    mp = (
        # cast_forward_inputs=False: a block's input keeps its dtype (the fp32 residual stream
        # of the autocast path); autocast casts what enters matmuls.
        MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
        if bf16
        else MixedPrecisionPolicy()
    )
    for unit in shard_units(module) if per_block else []:
        fully_shard(unit, mesh=mesh, mp_policy=mp, ignored_params=frozen)
    fully_shard(module, mesh=mesh, mp_policy=mp, ignored_params=frozen)


def describe(module: nn.Module) -> dict:
    """For the log: FSDP units, and trainable parameters in all and held by this rank."""
    from torch.distributed.fsdp import FSDPModule

    trainable = [p for p in module.parameters() if p.requires_grad]
    return {
        "fsdp_units": sum(isinstance(m, FSDPModule) for m in module.modules()),
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_params_local": sum(
            (p.to_local() if is_sharded(p) else p).numel() for p in trainable
        ),
    }


# ---------------------------------------------------------------------- full tensors


def full_tensors(state: dict[str, torch.Tensor], is_main: bool) -> dict[str, torch.Tensor]:
    """`state` with every DTensor gathered, one tensor at a time, to a CPU tensor on the main
    rank (a collective: every rank calls it with the same keys; {} on the other ranks)."""
    out = {}
    for k in sorted(state):
        v = state[k]
        full = v.full_tensor() if is_sharded(v) else v
        if is_main:
            out[k] = full.detach().cpu()
    return out if is_main else {}


def distribute_like(
    full: dict[str, torch.Tensor], like: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The full tensors `full` cut as `like`'s DTensors are (each rank keeps its own shard of
    its own full copy, no communication); plain entries are returned as they are."""
    from torch.distributed.tensor import distribute_tensor

    out = dict(full)
    for k, v in like.items():
        if is_sharded(v) and k in full:
            out[k] = distribute_tensor(
                full[k].to(v.device), v.device_mesh, v.placements, src_data_rank=None
            )
    return out


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full model state dict on CPU, on rank 0 ({} elsewhere; collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full (single-process layout) state dict into the sharded model; every rank
    passes the same full state. Through the module's own load_state_dict (strict, its load
    hooks included: a checkpoint older than a key still loads as in a single process), each
    sharded entry cut to this rank's shard first."""
    model.load_state_dict(distribute_like(state, model.state_dict()))


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The full optimizer state on rank 0 ({} elsewhere; collective), keyed by parameter index
    as a single-process torch.optim state_dict() is."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, opt, options=_full_options())
    if not osd:
        return {}
    index = {name: i for i, name in enumerate(n for g in osd["param_groups"] for n in g["params"])}
    return {
        "state": {index[k]: v for k, v in osd["state"].items()},
        "param_groups": [
            {**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]
        ],
    }


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a single-process optimizer state_dict (keyed by parameter index) into the
    optimizer of the sharded model; every rank passes the same full state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model, opt)
    osd = {
        "state": {names[i]: v for i, v in state["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, opt, osd, options=_full_options(cpu_offload=False))
    # The hyper-parameters exactly as saved (set_optimizer_state_dict turns tuples into lists).
    for group, saved in zip(opt.param_groups, state["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over sharded gradients: the total norm of the full
    gradient (the shards' partial norms reduced across ranks), then the clip."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if is_sharded(norm):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
