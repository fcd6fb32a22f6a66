"""What the generic trainer needs from a stage.

A stage is an nn.Module whose forward(batch, generator) returns (loss, metrics): that way the
same module can be wrapped by DistributedDataParallel. It also says how to evaluate itself on
held-out batches and how to split its trainable parameters into optimizer groups.
"""

from __future__ import annotations

import torch
from torch import nn

from diladiff.config import Config
from diladiff.data.packing import PackedData

STAGES: dict[str, type[Stage]] = {}


def register_stage(name: str):
    def wrap(cls):
        cls.kind = name
        STAGES[name] = cls
        return cls

    return wrap


class Stage(nn.Module):
    kind: str = ""
    # A stage built on a previous run: the CLI flag naming it (e.g. "init_from" for
    # --init-from) and the config sections it inherits from that run.
    parent_key: str | None = None
    inherits: tuple[str, ...] = ()

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__()
        self.cfg = cfg
        self.tokenizer_identity = dict(tokenizer_identity)

    def forward(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Training loss of one micro-batch of token rows (B, L), and metrics to log."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor], generator: torch.Generator) -> dict:
        """Metrics on held-out batches (called on the EMA weights)."""
        raise NotImplementedError

    def init_from_parents(self, parents: dict) -> None:
        """Initialise a new run from its parent runs (called once, not on resume)."""

    def prepare(self, data: PackedData, device) -> None:
        """Anything a new run estimates from its training data before the first step (called
        once, after init_from_parents, not on resume); e.g. the latent prior's standardisation."""

    @classmethod
    def warmups(cls, cfg: Config) -> dict[str, int]:
        """Every warm-up this stage's training goes through, by config key (in steps)."""
        return {"train.warmup_steps": cfg.train.warmup_steps}

    def on_step(self, step: int) -> None:
        """Called before every optimizer step (e.g. for warm-ups inside the loss)."""

    def summary(self) -> str:
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return f"{self.kind}: {n / 1e6:.2f}M trainable parameters"

    def param_groups(self) -> list[dict]:
        """Optimizer groups; a group may carry its own 'warmup_steps'."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]
