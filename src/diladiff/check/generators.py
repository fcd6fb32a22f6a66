"""The check's generators: each draws `plan.num_samples` rows at every N_disc of the grid,
summarised against the K rows (check/metrics.py) under one name. In the order sampled:

- `exact_factorised`: the MDLM sampler with the exact conditionals of the K rows (simulated);
- the chain's MDLM (check/plan.py: CHAIN);
- the chain's latent stages: the controls on its auto-encoder (`oracle`: the encoder latent of
  a random training row; `noise_latent`: z ~ N(0, I)), the exact prior of the K latents
  (`exact_prior_cont<N>`), the prior at each N_cont (`<prior>_cont<N>`) and the distilled
  prior at gamma 0 and the plan's gamma (`<distilled>_cont<N>_gamma<g>`);
- each of the plan's methods with each of its samplers (`pipeline.row_name`): a latent stage
  like the chain's (its latents drawn once, decoded at every N_disc; where they land among
  its own encoder's latents of the K rows; its own oracle `<kind>_oracle`), any other stage
  through its registered generation kind (`sampling.generate.sample_batch`).

Random streams: a generator's rows, or its latents, from one torch generator seeded
plan.seed; latents are decoded from a second one seeded plan.seed + 1, the same for every
generator and N_disc, so the N_disc axis of a latent generator is paired.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diladiff.check import metrics as M
from diladiff.check.latents import batches, exact_prior_latents, latent_landing
from diladiff.check.plan import CHAIN, CheckPlan, disc_grid
from diladiff.pipeline import row_name
from diladiff.stages import STAGES, LatentStage


@dataclass
class Sampling:
    """What every family of generators shares (the trained runs under `root`, the K rows, the
    plan) and the generators recorded so far: name -> info and one row of metrics per N_disc."""

    root: Path
    tok: object
    rows: np.ndarray
    plan: CheckPlan
    device: torch.device
    generators: dict[str, dict] = field(default_factory=dict)

    @property
    def grid(self) -> list[int]:
        """The N_disc of every generator's rows (disc_grid of L)."""
        return disc_grid(self.rows.shape[1])

    def load(self, kind: str):
        """The trained stage of `kind` (its run folder under root), on the device."""
        from diladiff.runs import load_run

        return load_run(self.root / kind, device=self.device)[0]

    def record(self, name: str, info: dict, draw: Callable, extra: Callable | None = None):
        """Generator `name`: the rows draw(n_disc) at every N_disc, summarised against the K
        rows (plus extra(rows) when given), after `info`; and one printed line."""
        summary = []
        for n_disc in self.grid:
            out = draw(n_disc)
            row = {"disc_steps": n_disc, **M.summarise(out, self.rows)}
            row.update(extra(out) if extra else {})
            summary.append(row)
        self.generators[name] = {**info, "rows": summary}
        best = max(r["validity"] for r in summary)
        print(f"[check] {name}: validity {summary[0]['validity']:.3f} at N_disc=1, best {best:.3f}")

    def decode(self, stage, z: torch.Tensor, n_disc: int, sampler=None, prior_space=False):
        """Token rows (numpy) decoded from latents z at N_disc with the plan's token draws and
        `sampler`'s, from one generator seeded plan.seed + 1; z in the decoder's space, or in
        the prior's with prior_space."""
        from diladiff.eval.oracle import decode_latents
        from diladiff.sampling.generate import sampler_settings

        plan = self.plan
        sc = plan.sample_config(stage.cfg.sample, sampler or {}, n_disc)
        settings = sampler_settings(sc, stage.seq_len)
        out = decode_latents(
            stage, self.tok, z, settings, plan.seed + 1, plan.batch_size, self.device, prior_space
        )
        return np.asarray(out.ids, dtype=np.int64)


@torch.no_grad()
def draw_tokens(stage, sc, plan: CheckPlan, device) -> np.ndarray:
    """plan.num_samples rows of `stage` by its registered generation kind with the settings
    of `sc` (sampling.generate: generation_settings, sample_batch), one generator seeded
    plan.seed, in batches of plan.batch_size."""
    from diladiff.sampling.generate import generation_settings, sample_batch

    gen = torch.Generator(device).manual_seed(plan.seed)
    settings = generation_settings(sc, stage)
    out = [
        sample_batch(stage, b, settings, gen, device)[0].cpu()
        for _, b in batches(plan.num_samples, plan.batch_size)
    ]
    return torch.cat(out).numpy()


@dataclass
class Targets:
    """The K rows' encoder latents (CPU), in the decoder's space and in the prior's."""

    ae: torch.Tensor
    prior: torch.Tensor


def encoder_targets(s: Sampling, stage) -> Targets:
    """A latent stage's encoder latents of the K rows."""
    from diladiff.eval.oracle import encoder_latents

    ae = encoder_latents(stage, s.rows, s.plan.batch_size, s.device)
    return Targets(ae, stage.to_prior_space(ae.to(s.device)).cpu())


# --------------------------------------------------------------------------- families


def exact_factorised_rows(s: Sampling) -> None:
    """The MDLM sampler with the exact conditionals of the K rows (simulated): the best any
    factorised denoiser can do at each N_disc."""
    p = s.plan

    def draw(n_disc: int) -> np.ndarray:
        return M.exact_factorised_sample(
            s.rows, p.num_samples, n_disc, p.seed, p.strategy, p.temperature
        )

    info = {"stage": None, "what": "the MDLM sampler with an exact denoiser (simulated)"}
    s.record("exact_factorised", info, draw)


def token_rows(s: Sampling, kind: str, samplers: tuple[dict, ...]) -> None:
    """A stage drawn by its generation kind, one generator per sampler (named by row_name,
    its info the sampler's settings): each N_disc draws afresh from seed plan.seed."""
    stage = s.load(kind)
    for sampler in samplers:

        def draw(n_disc: int, sampler=sampler) -> np.ndarray:
            sc = s.plan.sample_config(stage.cfg.sample, sampler, n_disc)
            return draw_tokens(stage, sc, s.plan, s.device)

        s.record(row_name(kind, sampler, None), {"stage": kind, **sampler}, draw)


def oracle_rows(s: Sampling, stage, targets: Targets, name: str) -> None:
    """The decoder given the encoder latent of a random training row (the same rows for every
    oracle), with the share of outputs equal to that row (oracle_match)."""
    pick = np.random.default_rng(s.plan.seed).integers(0, len(s.rows), size=s.plan.num_samples)
    z = targets.ae[torch.from_numpy(pick)]

    def match(out: np.ndarray) -> dict:
        return {"oracle_match": float((out == s.rows[pick]).all(1).mean())}

    info = {"stage": stage.kind, "latent": "encoder latent of a random training row"}
    s.record(name, info, lambda n: s.decode(stage, z, n), match)


def noise_latent_rows(s: Sampling, stage, targets: Targets) -> None:
    """The decoder given z ~ N(0, I) (CPU generator seeded plan.seed): a plain MDLM if the
    auto-encoder's latent dropout worked."""
    shape = (s.plan.num_samples, *targets.ae.shape[1:])
    z = torch.randn(shape, generator=torch.Generator().manual_seed(s.plan.seed))
    info = {"stage": stage.kind, "latent": "z ~ N(0, I)"}
    s.record("noise_latent", info, lambda n: s.decode(stage, z, n))


def prior_sample_rows(s: Sampling, name: str, stage, z_p, targets: Targets, info, sampler=None):
    """A generator of prior-space latents z_p, decoded at every N_disc (with `sampler`'s token
    settings); its info says where z_p lands among the targets (latent_landing)."""
    info = {"stage": stage.kind, **info, "latent": latent_landing(z_p, targets.prior)}
    s.record(name, info, lambda n: s.decode(stage, z_p, n, sampler, prior_space=True))


def learned_prior(s: Sampling, stage, cont_steps: int, gamma: float) -> torch.Tensor:
    """plan.num_samples prior-space latents of a latent stage at N_cont and gamma, from one
    generator seeded plan.seed (eval/latent_diag.py: sample_prior)."""
    from diladiff.eval.latent_diag import sample_prior

    p = s.plan
    return sample_prior(stage, p.num_samples, cont_steps, gamma, p.seed, p.batch_size, s.device)[0]


def prior_rows(s: Sampling) -> Targets:
    """The chain's prior and the controls on its frozen auto-encoder: the oracle, the noise
    latent, the exact prior of the K latents at the plan's first N_cont and the learned prior
    at each N_cont; the K rows' encoder latents, for the distilled prior's rows."""
    plan = s.plan
    prior = s.load(CHAIN.prior)
    targets = encoder_targets(s, prior)
    oracle_rows(s, prior, targets, "oracle")
    noise_latent_rows(s, prior, targets)
    cont = plan.prior_cont_steps[0]
    z_p = exact_prior_latents(prior, targets.prior, plan, s.device, cont)
    what = "the LaDiff sampler with the exact denoiser of the K latents"
    info = {"cont_steps": cont, "what": what}
    prior_sample_rows(s, f"exact_prior_cont{cont}", prior, z_p, targets, info)
    for cont in plan.prior_cont_steps:
        z_p = learned_prior(s, prior, cont, 0.0)
        name = row_name(CHAIN.prior, {"cont_steps": cont}, None)
        prior_sample_rows(s, name, prior, z_p, targets, {"cont_steps": cont})
    return targets


def distilled_rows(s: Sampling, targets: Targets) -> None:
    """The chain's distilled prior at the plan's N_cont, at gamma 0 and the plan's gamma; its
    samples' landing measured among the prior's encoder latents of the K rows."""
    distilled = s.load(CHAIN.distilled)
    cont = s.plan.distilled_cont_steps
    for gamma in (0.0, s.plan.gamma):
        z_p = learned_prior(s, distilled, cont, gamma)
        name = f"{CHAIN.distilled}_cont{cont}_gamma{gamma:g}"  # gamma 0 named too
        prior_sample_rows(s, name, distilled, z_p, targets, {"cont_steps": cont, "gamma": gamma})


def latent_method_rows(s: Sampling, kind: str) -> None:
    """A latent method, like the chain's priors: each sampler's latents (its N_cont and gamma)
    drawn once and decoded at every N_disc, where they land among the method's own encoder
    latents of the K rows, and the method's own oracle (`<kind>_oracle`)."""
    stage = s.load(kind)
    targets = encoder_targets(s, stage)
    for sampler in s.plan.method_samplers(kind):
        sc = s.plan.sample_config(stage.cfg.sample, sampler, 0)
        z_p = learned_prior(s, stage, sc.cont_steps, sc.gamma)
        name = row_name(kind, sampler, None)
        prior_sample_rows(s, name, stage, z_p, targets, dict(sampler), sampler)
    oracle_rows(s, stage, targets, f"{row_name(kind, {}, None)}_oracle")


def sample_generators(root: Path, tok, rows: np.ndarray, plan: CheckPlan, device) -> dict:
    """Every generator of the check (module docstring), trained under `root`: name -> its
    info and rows of metrics per N_disc."""
    s = Sampling(Path(root), tok, rows, plan, device)
    exact_factorised_rows(s)
    token_rows(s, CHAIN.mdlm, ({},))
    distilled_rows(s, prior_rows(s))
    for kind in plan.methods:
        if issubclass(STAGES[kind], LatentStage):
            latent_method_rows(s, kind)
        else:
            token_rows(s, kind, plan.method_samplers(kind))
    return s.generators
