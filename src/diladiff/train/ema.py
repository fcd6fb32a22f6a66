"""Exponential moving average of weights: ema <- d * ema + (1 - d) * theta, with the warm-up
d_k = min(d, (1 + k) / (10 + k)) so early averages are not dominated by the initialisation."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Trainable parameters are averaged (in float32); buffers (e.g. running statistics) are
    copied. Frozen parameters (a frozen auto-encoder, a distillation teacher) never change, so
    they are neither averaged nor stored: the EMA state holds the trainable parameters and the
    buffers, and `ema_weights` completes it with the model's frozen ones."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.params = {k for k, p in module.named_parameters() if p.requires_grad}
        frozen = {k for k, p in module.named_parameters() if not p.requires_grad}
        self.shadow = {
            k: v.detach().clone().float() if k in self.params else v.detach().clone()
            for k, v in module.state_dict().items()
            if k not in frozen
        }

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        state = module.state_dict()
        for k, shadow in self.shadow.items():
            if k in self.params:
                shadow.mul_(d).add_(state[k].detach().float(), alpha=1 - d)
            else:
                shadow.copy_(state[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """`state` may also hold frozen parameters (checkpoints written before they were left
        out): only this EMA's own keys are taken."""
        missing = self.shadow.keys() - state.keys()
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        self.shadow = {
            k: state[k].clone().float() if k in self.params else state[k].clone()
            for k in self.shadow
        }
        self.updates = updates

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        own = module.state_dict()
        module.load_state_dict(ema_weights(own, self.shadow, own))


def ema_weights(model_state: dict, ema_state: dict, like: dict | None = None) -> dict:
    """A full state dict from a checkpoint's EMA weights: the model's weights (frozen parts)
    overlaid with the EMA's, each in the dtype of `like` when given."""
    full = {**model_state, **ema_state}
    return full if like is None else {k: v.to(like[k].dtype) for k, v in full.items()}
