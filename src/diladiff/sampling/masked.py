"""Masked-diffusion decoding: N_disc reverse steps on the grid 1 = t_0 > ... > t_N = 0.

At step t -> s every still-masked position draws its token from p_theta(. | x_t) (tempered,
nucleus-filtered, Gumbel-max in float64) and is revealed according to a strategy:

- "ancestral": with probability (alpha_s - alpha_t) / (1 - alpha_t), independently; this is an
  exact draw from the reverse posterior q(x_s | x_t, x_0 ~ p_theta). The last step reveals all.
- "topk": the k most confident positions (confidence = probability of the drawn token), with k
  chosen so that round(L * s) positions stay masked (k = L / N_disc when it divides).

The denoiser has no time input, so when a step reveals nothing its output is reused (exact).
New strategies register with `@register_strategy(name)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from diladiff.processes.masking import unmask_probability
from diladiff.registry import registrar

Denoiser = Callable[[torch.Tensor], torch.Tensor]  # x_t (B, L) -> log p(x_0 | x_t) (B, L, V)
STRATEGIES: dict[str, Callable] = {}
register_strategy = registrar(STRATEGIES)


@dataclass
class SamplerSettings:
    steps: int
    strategy: str = "ancestral"
    temperature: float = 1.0
    top_p: float = 1.0
    float64_gumbel: bool = True
    cache: bool = True
    # Latent stages only: N_cont (0 = the run's default) and DiLaDiff's gamma-sampling.
    cont_steps: int = 0
    gamma: float = 0.0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"disc_steps must be >= 1, got {self.steps}")
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {self.strategy!r}; choose one of {sorted(STRATEGIES)}"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class SamplerStats:
    nfe: int = 0  # network calls
    steps: int = 0


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p  # mass before this token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def gumbel_argmax(
    logits: torch.Tensor, generator: torch.Generator | None, float64: bool = True
) -> torch.Tensor:
    """A draw from softmax(logits) by argmax(logits + Gumbel noise). float64 noise avoids the
    truncation of float32 Gumbel draws, which lowers sample diversity (Zheng et al., 2024)."""
    dtype = torch.float64 if float64 else torch.float32
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=dtype)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(dtype).tiny)))
    return (logits.to(dtype) + gumbel).argmax(dim=-1)


@register_strategy("ancestral")
def reveal_ancestral(logits, masked, t, s, settings, generator):
    """Reveal each masked position with probability (alpha_s - alpha_t) / (1 - alpha_t)."""
    p = 1.0 if s <= 0 else unmask_probability(t, s)
    u = torch.rand(masked.shape, generator=generator, device=masked.device)
    reveal = masked & (u < p)
    tokens = torch.zeros_like(masked, dtype=torch.long)
    tokens[reveal] = gumbel_argmax(logits[reveal], generator, settings.float64_gumbel)
    return reveal, tokens


@register_strategy("topk")
def reveal_topk(logits, masked, t, s, settings, generator):
    """Draw a token everywhere masked; reveal the most confident until round(L * s) remain."""
    tokens = torch.zeros_like(masked, dtype=torch.long)
    drawn = gumbel_argmax(logits[masked], generator, settings.float64_gumbel)
    tokens[masked] = drawn
    conf = torch.full(masked.shape, -1.0, device=masked.device, dtype=torch.float64)
    probs = logits[masked].double().softmax(dim=-1)
    conf[masked] = probs.gather(-1, drawn.unsqueeze(-1)).squeeze(-1)
    keep_masked = round(masked.shape[1] * s)
    k = (masked.sum(dim=1) - keep_masked).clamp(min=0)
    rank = conf.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return masked & (rank < k.unsqueeze(1)), tokens


@torch.no_grad()
def sample_masked(
    denoise: Denoiser,
    batch: int,
    seq_len: int,
    mask_id: int,
    settings: SamplerSettings,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
):
    """Generate (batch, seq_len) token ids from all-masked input; returns (ids, SamplerStats)."""
    x = torch.full((batch, seq_len), mask_id, dtype=torch.long, device=device)
    grid = [1.0 - i / settings.steps for i in range(settings.steps + 1)]
    reveal_fn = STRATEGIES[settings.strategy]
    stats = SamplerStats()
    logp = None
    for i in tqdm(range(settings.steps), desc="decoding", disable=not progress, leave=False):
        t, s = grid[i], grid[i + 1]
        masked = x == mask_id
        if not masked.any():
            break
        if logp is None or not settings.cache:
            logp = denoise(x).float()
            stats.nfe += 1
        logits = top_p_filter(logp / settings.temperature, settings.top_p)
        reveal, tokens = reveal_fn(logits, masked, t, s, settings, generator)
        x = torch.where(reveal, tokens, x)
        stats.steps += 1
        if reveal.any():
            logp = None
    return x, stats
