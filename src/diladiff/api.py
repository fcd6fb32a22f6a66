"""The Python API: load a trained run and generate with keyword settings.

    import diladiff
    model = diladiff.load("runs/dl")                      # any stage's run folder
    model = diladiff.load("exported/dl")                  # or `diladiff export`'s folder / hub id
    out = model.generate(num_samples=8, disc_steps=16, cont_steps=5, seed=0)
    out.texts, out.ids

Settings not given are the run's own (its sample.* config); nothing is mutated.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from diladiff.config import ConfigError, SampleConfig
from diladiff.hub import load_any
from diladiff.sampling.conditioning import make_condition
from diladiff.sampling.generate import Generation, generate
from diladiff.train.distributed import pick_device


class Model:
    """A trained stage with its tokenizer, ready to generate."""

    def __init__(self, stage, tokenizer, device: torch.device):
        self.stage, self.tokenizer, self.device = stage, tokenizer, device

    @property
    def kind(self) -> str:
        return self.stage.kind

    def settings(self, **overrides) -> SampleConfig:
        """The run's sample.* config with `overrides` (None values ignored), as a copy."""
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(given) - set(vars(self.stage.cfg.sample)))
        if unknown:
            raise ConfigError(f"unknown sampling setting(s) {unknown}")
        return replace(self.stage.cfg.sample, **given)

    @torch.no_grad()
    def generate(
        self,
        num_samples: int = 8,
        disc_steps: int | None = None,
        cont_steps: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        strategy: str | None = None,
        gamma: float | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
        prompt: str | None = None,
        suffix: str | None = None,
        infill: str | None = None,
        latent_from: str | None = None,
    ) -> Generation:
        """`num_samples` texts and their ids (reproducible from `seed`); disc_steps = N_disc
        (default: the run's, 0 = L), cont_steps = N_cont of a latent stage. `prompt` /
        `suffix`: text the samples start / end with; `infill`: a text whose [MASK] tokens are
        generated; `latent_from`: a reference text whose encoder latent replaces the prior
        sample (latent stages). Given tokens are never changed."""
        sc = self.settings(
            num_samples=num_samples,
            disc_steps=disc_steps,
            cont_steps=cont_steps,
            temperature=temperature,
            top_p=top_p,
            strategy=strategy,
            gamma=gamma,
            seed=seed,
            batch_size=batch_size or min(num_samples, self.stage.cfg.sample.batch_size),
        )
        condition = make_condition(
            self.tokenizer,
            self.stage.seq_len,
            self.stage.tokenizer_identity.get("mask_id"),
            prompt,
            suffix,
            infill,
            latent_from,
        )
        return generate(self.stage, self.tokenizer, sc, self.device, progress, condition)


def load(name_or_path: str | Path, device: str = "auto", weights: str = "ema") -> Model:
    """The trained stage of a run folder (its EMA weights by default), of a folder written by
    `diladiff export`, or of such a folder on the Hugging Face hub (by repository id), on
    `device`."""
    dev = pick_device(device)
    stage, tok = load_any(name_or_path, which=weights, device=dev)
    return Model(stage, tok, dev)
