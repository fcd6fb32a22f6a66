"""What the generic trainer, the run folders and the pipeline need from a stage.

A stage is an nn.Module whose forward(batch, generator) returns (loss, metrics): that way the
same module can be wrapped by DistributedDataParallel. It also says how to evaluate itself on
held-out batches and how to split its trainable parameters into optimizer groups.

A method is registered with `@register_stage(NAME)` and declares as data what the rest of the
project derives from the registry: its parent runs (`parents`: role -> stage kind; the role
is also the CLI flag, `--init-from` for "init_from"), the config sections it inherits from its
parent, its per-preset training changes, how the pipeline evaluates it (`eval_samplers`) and
its share of a pipeline time budget. File work (reading run folders, loading parents) lives
in runs.py: `init_from_parents` receives the loaded parent stages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from diladiff.config import STAGE_PRESET_CHANGES, Config
from diladiff.data.packing import PackedData

STAGES: dict[str, type[Stage]] = {}


def register_stage(name: str) -> Callable[[type[Stage]], type[Stage]]:
    """Class decorator: `diladiff train NAME` (and the pipeline, demo, frontier, CLI flags)
    will know the stage."""

    def wrap(cls: type[Stage]) -> type[Stage]:
        cls.kind = name
        STAGES[name] = cls
        STAGE_PRESET_CHANGES[name] = cls.preset_changes
        return cls

    return wrap


def stage_order(kinds: list[str] | None = None, optional: bool = False) -> list[str]:
    """Registered stages (or `kinds` plus their ancestors), parents before children, else
    in registration order; without `kinds`, optional stages (baselines) only if `optional`."""
    if kinds is None:
        kinds = [k for k, cls in STAGES.items() if optional or not cls.optional]
    wanted = list(kinds)
    order: list[str] = []

    def visit(kind: str, path: tuple[str, ...]) -> None:
        if kind in order:
            return
        if kind not in STAGES:
            raise KeyError(f"stage {kind!r} is not registered (needed by {path or 'the caller'})")
        if kind in path:
            raise ValueError(f"stage parents form a cycle: {' -> '.join((*path, kind))}")
        for parent in STAGES[kind].parents.values():
            visit(parent, (*path, kind))
        order.append(kind)

    for kind in wanted:
        visit(kind, ())
    return order


class Stage(nn.Module):
    kind: ClassVar[str] = ""
    # The runs a new run of this stage is built on: role -> stage kind. The role names the
    # CLI flag (--init-from for "init_from") and the key in run.json's "parents".
    parents: ClassVar[dict[str, str]] = {}
    # Config sections a new run copies from its parent run (the single parent, when any).
    inherits: ClassVar[tuple[str, ...]] = ()
    # The pipeline's evaluation rows for this stage: one dict of sample.* settings per row
    # (e.g. {"cont_steps": 200}); empty = the stage is not a generator (the auto-encoder).
    eval_samplers: ClassVar[tuple[dict, ...]] = ({},)
    # Pipeline reports this stage gets beyond generation ("recon": eval/recon_report.py).
    reports: ClassVar[tuple[str, ...]] = ()
    # How sampling.generate.sample_batch draws from it (a name in GENERATIONS there).
    generation: ClassVar[str] = "masked"
    # train.parallel=fsdp (train/sharding.py): True when the forward runs the network's blocks
    # the same number of times in the same order on every rank; then each block is its own FSDP
    # unit, gathered for its own forward and backward only. FSDP deadlocks when one rank
    # gathers a block another does not (a pass drawn per rank: the self-conditioning of LaDiff,
    # LDLM and DiLaDiff), so by default the whole stage is one unit, gathered once per forward.
    fsdp_per_block: ClassVar[bool] = False
    # An optional baseline: the pipeline trains it only when asked (--stages).
    optional: ClassVar[bool] = False
    # Share of a pipeline --budget-minutes for training this stage.
    budget_share: ClassVar[float] = 0.1
    # The demo's training steps for this stage (the built-in CPU-sized chain).
    demo_steps: ClassVar[int] = 100
    # The parallel-decoding check's training steps for this stage (check/plan.py), its whole
    # schedule: long enough for a generator to memorise the check's K rows.
    check_steps: ClassVar[int] = 1500

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__()
        self.cfg = cfg
        self.tokenizer_identity = dict(tokenizer_identity)

    @classmethod
    def preset_changes(cls, cfg: Config, preset: str) -> None:
        """What training this stage changes in the preset `preset` (learning rate, schedule
        length, warm-ups, its sampler defaults), as typed assignments to `cfg`."""

    def forward(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Training loss of one micro-batch of token rows (B, L), and metrics to log."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor], generator: torch.Generator) -> dict:
        """Metrics on held-out batches (called on the EMA weights)."""
        raise NotImplementedError

    def init_from_parents(self, parents: dict[str, Stage]) -> None:
        """Initialise a new run from its loaded parent stages (role -> stage, as declared in
        `parents`; EMA weights, on CPU); called once, not on resume."""

    def prepare(self, data: PackedData, device) -> None:
        """Anything a new run estimates from its training data before the first step (called
        once, after init_from_parents, not on resume); e.g. the latent prior's standardisation."""

    def attach(self, data: PackedData, device, tokenizer) -> None:
        """Called on every start of a training run, new or resumed (before `prepare`), with the
        run's data and tokenizer: what is not saved with the weights but read during training,
        e.g. a feature cache of `data` or the decoder tokenizer of a cross-tokenizer encoder."""

    def use_tokenizer(self, tokenizer) -> None:
        """Given the run's own tokenizer when a trained stage is loaded (runs.load_run, the hub
        loader); e.g. for an encoder that re-tokenises decoded rows."""

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
