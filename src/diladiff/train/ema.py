"""Exponential moving average of weights: ema <- d * ema + (1 - d) * theta, with the warm-up
d_k = min(d, (1 + k) / (10 + k)) so early averages are not dominated by the initialisation."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Parameters are averaged (in float32); buffers (e.g. running statistics) are copied."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.params = {k for k, _ in module.named_parameters()}
        self.shadow = {
            k: v.detach().clone().float() if k in self.params else v.detach().clone()
            for k, v in module.state_dict().items()
        }

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in module.state_dict().items():
            if k in self.params:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.shadow = {
            k: v.clone().float() if k in self.params else v.clone() for k, v in state.items()
        }
        self.updates = updates

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict(
            {k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()}
        )
