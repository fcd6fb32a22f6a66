"""DUO (Sahoo et al., "The Diffusion Duality", ICML 2025): uniform-state discrete diffusion
trained through its Gaussian relaxation; a discrete baseline beside the MDLM.

Forward process (methods/duo/process.py): each token kept with probability alpha_t, else replaced
by a uniform draw over the states (every token but [MASK]); log-linear schedule
alpha_t = 1 - (1 - 1e-3) t. The denoiser x_theta(x_t, sigma_t) is the MDLM's transformer with
time conditioning on sigma_t = -log alpha_t (adaLN-Zero), a plain softmax over the states (no
SUBS: under uniform noise no position is known to be clean).

Loss: the continuous-time uniform-state ELBO (methods.duo.process.diffusion_loss), per token,
averaged. Curriculum (training steps before curriculum_end): t -> gamma_t =
gamma_min + t (gamma_max - gamma_min), a Gaussian latent w = sqrt(sigmoid(-gamma)) onehot(x_0) +
sqrt(sigmoid(gamma)) eps over the states; the network reads the tempered softmax(w / tau)
(embedded as probs @ E), the ELBO takes x_t = argmax(w), which is exactly a uniform-state
corruption with alpha(gamma) (the duality map, methods.duo.process.DualityMap), and alpha' =
alpha'(gamma) (gamma_max - gamma_min). After the curriculum: the plain discrete ELBO.
Validation always reports the discrete ELBO bound as a perplexity.

Sampling: methods/duo/sampler.py (ancestral posterior steps; "greedy_tail": argmax at the end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch

from diladiff.config import Config, Range, Satisfies, register_section
from diladiff.data.tokenizer import require_mask_id
from diladiff.methods.duo.process import (
    DualityMap,
    corrupt,
    diffusion_loss,
    gaussian_latent,
    log_linear_alpha,
    sigma_from_alpha,
)
from diladiff.nets.token_denoiser import TokenDenoiser
from diladiff.processes.masking import sample_times
from diladiff.stages.base import Stage, register_stage


def _gamma_range(_, cfg: Config) -> str | None:
    """A curriculum draws gamma in [gamma_min, gamma_max]: it needs gamma_min < gamma_max."""
    dc = cfg.duo
    if curriculum_end(cfg) > 0 and not dc.gamma_min < dc.gamma_max:
        return f"duo.gamma_min={dc.gamma_min} must be below duo.gamma_max={dc.gamma_max}"
    return None


@register_section("duo")
@dataclass
class DUOConfig:
    """DUO's curriculum (defaults: the authors' OpenWebText script, scripts/train_owt_duo.sh:
    a constant tau = 1e-3 and gamma in [-3.55, -1.85], i.e. alpha in about [0.05, 0.95])."""

    # Training steps before curriculum_end use the Gaussian relaxation, the rest the discrete
    # ELBO; -1 = half of train.total_steps (the authors' OpenWebText recipe: 500k curriculum
    # steps, then 500k discrete ones), 0 = no curriculum. The temperature stays at its start
    # value until curriculum_start, then moves to its end value by curriculum_end (as the
    # authors' code; their OpenWebText run keeps it constant).
    curriculum_start: Annotated[int, Range(ge=0)] = 0
    curriculum_end: Annotated[int, Range(ge=0, unset=-1, means="half of train.total_steps")] = -1
    gamma_min: Annotated[float, Satisfies(_gamma_range)] = -3.55
    gamma_max: float = -1.85
    # log10 of the softmax temperature tau, linear from start to end over the curriculum.
    tau_log10_start: float = -3.0
    tau_log10_end: float = -3.0
    # Grid points of the cached duality map alpha(gamma) over [gamma_min, gamma_max].
    duality_points: Annotated[int, Range(ge=2)] = 4097
    t_eps: Annotated[float, Range(gt=0, lt=1)] = 1e-3  # t ~ U[t_eps, 1], antithetic


@register_stage("duo")
class DUO(Stage):
    eval_samplers = ({"strategy": "ancestral"}, {"strategy": "greedy_tail"})
    generation = "uniform"  # methods/duo/sampler.py
    optional = True  # a baseline: the pipeline trains it only when asked (--stages duo)
    fsdp_per_block = True  # one network pass per forward, on every rank
    budget_share = 0.25
    demo_steps = 250

    @classmethod
    def preset_changes(cls, cfg: Config, preset: str) -> None:
        """The authors' recipe at `paper`: 1M steps at a constant lr 3e-4 after a 2.5k warm-up
        (the curriculum over the first half, by duo.curriculum_end = -1)."""
        tc = cfg.train
        if preset == "paper":
            tc.total_steps, tc.warmup_steps, tc.schedule = 1_000_000, 2500, "constant"

    @classmethod
    def warmups(cls, cfg: Config) -> dict[str, int]:
        """The learning-rate warm-up and the curriculum: a run stopped (train.max_steps) before
        the curriculum ends never trains on the discrete loss, so the run warns (runs.py). A
        curriculum over the whole schedule is allowed (an ablation), so it counts up to
        train.total_steps only (a longer warm-up would be refused)."""
        end = min(curriculum_end(cfg), cfg.train.total_steps)
        return {**super().warmups(cfg), "duo.curriculum_end": end}

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)
        vocab = int(tokenizer_identity["vocab_size"])
        # [MASK] is left out of the uniform states; a tokenizer without one is refused.
        self.mask_id = require_mask_id(
            tokenizer_identity, cfg.data.tokenizer, "uniform-state diffusion (stage duo)"
        )
        self.seq_len = cfg.data.seq_len
        states = torch.ones(vocab, dtype=torch.bool)
        states[self.mask_id] = False
        self.register_buffer("states", states, persistent=False)
        self.net = TokenDenoiser(cfg.model, vocab, cfg.data.seq_len, time_conditioning=True)
        self._duality: DualityMap | None = None  # built on first use (training only)
        self.step = 0  # set by on_step: the curriculum depends on it (exact resume)

    def network_dims(self) -> dict:
        """What one sampler call runs (compute accounting, stages.protocols.SizedNetwork): the
        denoiser's blocks and width over L positions, no latent."""
        mc = self.cfg.model
        return {"blocks": mc.depth, "width": mc.width, "seq_len": self.seq_len, "num_latents": 0}

    def summary(self) -> str:
        dc = self.cfg.duo
        return (
            f"{super().summary()}; uniform-state over {int(self.states.sum())} states, "
            f"curriculum over steps [0, {self.curriculum_end()}) with gamma in "
            f"[{dc.gamma_min}, {dc.gamma_max}]"
        )

    def on_step(self, step: int) -> None:
        self.step = step

    def curriculum_end(self) -> int:
        return curriculum_end(self.cfg)

    def in_curriculum(self) -> bool:
        return self.training and self.step < self.curriculum_end()

    @property
    def duality(self) -> DualityMap:
        """alpha(gamma) of the argmax of the Gaussian latent over this many states (cached)."""
        if self._duality is None:
            dc = self.cfg.duo
            num = int(self.states.sum())
            self._duality = DualityMap(num, dc.gamma_min, dc.gamma_max, dc.duality_points)
        return self._duality

    def tau(self) -> float:
        """The softmax temperature: 10^(log10 tau), linear in log10 from curriculum_start to
        the curriculum's end (the start value before)."""
        dc = self.cfg.duo
        span = max(1, self.curriculum_end() - dc.curriculum_start)
        frac = min(1.0, max(0.0, (self.step - dc.curriculum_start) / span))
        return 10.0 ** (dc.tau_log10_start + frac * (dc.tau_log10_end - dc.tau_log10_start))

    # ------------------------------------------------------------------ the denoiser
    def log_x_theta(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """log x_theta(x_t, sigma) (B, L, V) over the states (-inf elsewhere), float32; x_t as
        ids (B, L) or as distributions over the vocabulary (B, L, V)."""
        logits = self.net(x, time=sigma).float()
        return logits.masked_fill(~self.states, -math.inf).log_softmax(dim=-1)

    # ------------------------------------------------------------------ the loss
    def discrete_terms(self, x0: torch.Tensor, generator) -> torch.Tensor:
        """Per-token ELBO integrand with x_t ~ q(x_t | x_0) at t ~ U[eps, 1] (antithetic)."""
        t = sample_times(len(x0), generator, True, self.cfg.duo.t_eps, x0.device)
        alpha, dalpha = log_linear_alpha(t)
        x_t = corrupt(x0, alpha, self.states, generator)
        log_x = self.log_x_theta(x_t, sigma_from_alpha(alpha))
        return diffusion_loss(log_x, x_t, x0, alpha, dalpha, self.states)

    def curriculum_terms(self, x0: torch.Tensor, generator) -> torch.Tensor:
        """Per-token ELBO integrand through the Gaussian relaxation (module docstring)."""
        dc = self.cfg.duo
        t = sample_times(len(x0), generator, True, dc.t_eps, x0.device)
        gamma = dc.gamma_min + t * (dc.gamma_max - dc.gamma_min)
        alpha = self.duality.alpha(gamma).to(x0.device, torch.float32)
        dalpha = self.duality.dalpha_dgamma(gamma).to(x0.device, torch.float32)
        dalpha = dalpha * (dc.gamma_max - dc.gamma_min)
        w = gaussian_latent(x0, gamma, self.states, generator)
        x_t = w.argmax(dim=-1)
        soft = w.div_(self.tau()).softmax(dim=-1)  # in place: one (B, L, V) copy fewer
        log_x = self.log_x_theta(soft, sigma_from_alpha(alpha))
        return diffusion_loss(log_x, x_t, x0, alpha, dalpha, self.states)

    def forward(self, batch: torch.Tensor, generator: torch.Generator):
        if self.in_curriculum():
            per_token = self.curriculum_terms(batch, generator)
        else:
            per_token = self.discrete_terms(batch, generator)
        loss = per_token.mean()
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, batches, generator):
        """The discrete ELBO bound (nats per token) and its perplexity, on held-out rows."""
        total, n = 0.0, 0
        for x0 in batches:
            total += float(self.discrete_terms(x0, generator).mean()) * len(x0)
            n += len(x0)
        bound = total / n
        return {"val_loss": bound, "val_nll_bound": bound, "val_ppl_bound": math.exp(bound)}


def curriculum_end(cfg: Config) -> int:
    """The first training step without the curriculum (duo.curriculum_end; -1: half of
    train.total_steps)."""
    end = cfg.duo.curriculum_end
    return cfg.train.total_steps // 2 if end == -1 else end
