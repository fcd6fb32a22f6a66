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
from diladiff.sampling.conditioning import canvas_mask_id, make_condition
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
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
        prompt: str | None = None,
        suffix: str | None = None,
        infill: str | None = None,
        latent_from: str | None = None,
        **settings,
    ) -> Generation:
        """`num_samples` texts and their ids (reproducible from `seed`). `settings`: any
        sampling setting, by its sample.* key (diladiff.config.SampleConfig, the one definition
        `diladiff sample`'s options come from; unset or None: the run's own), e.g.
        disc_steps = N_disc (0 = L), cont_steps = N_cont of a latent stage, strategy,
        temperature, top_p, gamma, latent_sampler, time_grid, inference (LADD). `prompt` /
        `suffix`: text the samples start / end with; `infill`: a text whose [MASK] tokens are
        generated; `latent_from`: a reference text whose encoder latent replaces the prior
        sample (the stages with an encoder: LaDiff, DiLaDiff, LDLM, LADD). Every method takes
        a prompt, a suffix and infilling; given tokens are never changed."""
        sc = self.settings(
            **settings,
            num_samples=num_samples,
            seed=seed,
            batch_size=batch_size or min(num_samples, self.stage.cfg.sample.batch_size),
        )
        condition = make_condition(
            self.tokenizer,
            self.stage.seq_len,
            canvas_mask_id(self.stage),
            prompt,
            suffix,
            infill,
            latent_from,
        )
        return generate(self.stage, self.tokenizer, sc, self.device, progress, condition)

    @torch.no_grad()
    def score(self, texts: list[str], mc_samples: int = 128, seed: int = 0) -> dict:
        """An upper bound on the perplexity of `texts` (the eval-recon estimator, eval/recon.py):
        the texts are tokenised and packed as training data is (each followed by the
        separator) into rows of L tokens (a last partial row is dropped), and the
        discrete-ratio bound on -log p(row) is estimated with `mc_samples` draws per row.
        Masked-diffusion stages (MDLM); for the auto-encoder the bound is conditional on the
        encoder's latent of the text (`conditional: True`), not a bound on p(text)."""
        from diladiff.data.tokenizer import separator_id
        from diladiff.eval.recon import discrete_ratio_bound, stage_denoiser

        if self.stage.generation != "masked":
            raise ConfigError(
                f"score is defined for masked-diffusion stages; a {self.kind} run has no "
                "likelihood bound here yet"
            )
        sep, L = separator_id(self.tokenizer), self.stage.seq_len
        stream = []
        for text in texts:
            stream += self.tokenizer(text, add_special_tokens=False)["input_ids"] + [sep]
        if len(stream) < L:
            raise ConfigError(f"the texts hold {len(stream)} tokens; one row needs L = {L}")
        rows = torch.tensor(stream[: len(stream) // L * L]).view(-1, L).to(self.device)
        gen = torch.Generator(self.device).manual_seed(seed)
        log_probs, condition = stage_denoiser(self.stage)
        out = discrete_ratio_bound(
            log_probs, rows, self.stage.mask_id, mc_samples, gen, condition=condition
        )
        return {**out, "tokens": rows.numel(), "conditional": condition is not None}


def load(name_or_path: str | Path, device: str = "auto", weights: str = "ema") -> Model:
    """The trained stage of a run folder (its EMA weights by default), of a folder written by
    `diladiff export`, or of such a folder on the Hugging Face hub (by repository id), on
    `device`."""
    dev = pick_device(device)
    stage, tok = load_any(name_or_path, which=weights, device=dev)
    return Model(stage, tok, dev)
