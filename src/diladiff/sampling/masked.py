"""Masked-diffusion decoding: N_disc reverse steps on the grid 1 = t_0 > ... > t_N = 0.

At step t -> s a strategy picks the still-masked positions to reveal and draws their tokens
from p_theta(. | x_t) (tempered, nucleus-filtered, Gumbel-max in float64):

- "ancestral": each masked position with probability (alpha_s - alpha_t) / (1 - alpha_t),
  independently; an exact draw from the reverse posterior q(x_s | x_t, x_0 ~ p_theta). The last
  step reveals all. The coin flips do not depend on the logits, so tokens are drawn only at the
  positions revealed: over a whole sample, once per position.
- "topk": draw a token at every masked position and reveal the most confident ones
  (confidence = probability of the drawn token), with k chosen so that round(L * s) positions
  stay masked (k = L / N_disc when it divides).
- "threshold" (the paper's App. D.2): draw a token at every masked position and reveal every
  one whose confidence exceeds `sample.confidence_threshold`, at least the most confident one
  per row; the last step reveals all. N_disc is then a maximum: rows stop when done.

Two samplers run the same strategies and consume the generator identically, so they return the
same tokens for the same seed:

- "fast" (default): the transformer trunk hidden(x_t) runs once per step in which x_t changed
  and something is drawn; the vocabulary head, the softmax, top-p and the Gumbel draw run only
  on the rows drawn (revealed rows for ancestral, masked rows for top-k), in chunks of rows.
- "reference": the previous sampler, kept to measure against: full (B, L, V) SUBS log-probs
  whenever x_t changed, tempered and nucleus-filtered over all B x L x V values every step.

The denoiser has no time input, so when a step reveals nothing its trunk output (reference: its
log-probs) is reused; that is exact. New strategies register with `@register_strategy(name)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from diladiff.processes.masking import unmask_probability
from diladiff.registry import registrar
from diladiff.sampling.conditioning import canvas_start
from diladiff.stages.masked import TokenDecoder

STRATEGIES: dict[str, Callable] = {}
register_strategy = registrar(STRATEGIES)
SAMPLERS: dict[str, type] = {}
register_sampler = registrar(SAMPLERS)

# A strategy's access to the model at the current x_t: draw(sel, confidence) returns the tokens
# drawn at the positions of the (B, L) boolean `sel`, in row-major order, and with confidence
# also the tempered probability of each drawn token (float64), else None.
Draw = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]

# The fast sampler's rows per chunk on CPU: about 2^20 values (8 MB of float64 noise) keeps the
# chunk's buffers in memory that is already mapped; one (B * L, V) float64 tensor is 0.5 GB.
CHUNK_VALUES = 1 << 20


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SamplerSettings:
    """How masked-diffusion decoding runs (from the sample.* config: sampling.generate)."""

    steps: int
    strategy: str = "ancestral"
    temperature: float = 1.0
    top_p: float = 1.0
    float64_gumbel: bool = True
    cache: bool = True
    # "fast" (head on drawn rows only) or "reference" (the previous full-vocabulary sampler).
    sampler: str = "fast"
    threshold: float = 0.9  # the "threshold" strategy's confidence threshold

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"disc_steps must be >= 1, got {self.steps}")
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {self.strategy!r}; choose one of {sorted(STRATEGIES)}"
            )
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {sorted(SAMPLERS)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"confidence_threshold must be in (0, 1], got {self.threshold}")


@dataclass
class SamplerStats:
    nfe: int = 0  # trunk calls (reference: full denoiser calls)
    steps: int = 0
    head_rows: int = 0  # rows that went through the vocabulary head


# --------------------------------------------------------------------------- drawing tokens


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p  # mass before this token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sampling_logits(logp: torch.Tensor, settings: SamplerSettings) -> torch.Tensor:
    """The logits tokens are drawn from: top_p(log p_theta / T). Row-wise, so the same values
    whether computed over all (B, L) positions or over some rows."""
    return top_p_filter(logp / settings.temperature, settings.top_p)


def gumbel_argmax(
    logits: torch.Tensor, generator: torch.Generator | None, float64: bool = True
) -> torch.Tensor:
    """A draw from softmax(logits) by argmax(logits + Gumbel noise). float64 noise avoids the
    truncation of float32 Gumbel draws, which lowers sample diversity (Zheng et al., 2024)."""
    dtype = torch.float64 if float64 else torch.float32
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=dtype)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(dtype).tiny)))
    return (logits.to(dtype) + gumbel).argmax(dim=-1)


def gumbel_argmax_(u: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """gumbel_argmax with the uniforms u given, computed in place in u: the same operations in
    the same order, so the same values bit for bit, without five temporaries of u's size."""
    gumbel = u.clamp_min_(torch.finfo(u.dtype).tiny).log_().neg_().log_().neg_()
    return gumbel.add_(logits).argmax(dim=-1)  # g + l == l + g exactly


def confidence(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """softmax(logits)[token] in float64: top-k's confidence in each drawn token."""
    return logits.double().softmax(dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def draws_from_logits(logits: torch.Tensor, settings: SamplerSettings, generator) -> Draw:
    """Draw (the reference sampler's) from sampling logits of every position, (B, L, V)."""

    def draw(sel: torch.Tensor, with_confidence: bool = False):
        rows = logits[sel]
        tokens = gumbel_argmax(rows, generator, settings.float64_gumbel)
        return tokens, confidence(rows, tokens) if with_confidence else None

    return draw


def draw_rows(
    decoder: TokenDecoder,
    hidden_rows: torch.Tensor,
    settings: SamplerSettings,
    generator: torch.Generator | None,
    with_confidence: bool = False,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens drawn from the head's distribution at hidden-state rows (N, W), chunk by chunk.

    Consumes the generator as one torch.rand((N, V)) call would (CPU draws uniforms serially, so
    consecutive chunks continue one stream), hence the same tokens as `draws_from_logits`. On
    other devices the counter-based generator is only equivalent for one call: one chunk there.
    """
    n = hidden_rows.shape[0]
    device = hidden_rows.device
    tokens = torch.empty(n, dtype=torch.long, device=device)
    conf = torch.empty(n, dtype=torch.float64, device=device) if with_confidence else None
    dtype = torch.float64 if settings.float64_gumbel else torch.float32
    auto = chunk_rows is None and device.type == "cpu"
    # CPU: a first chunk of one row tells V, which sizes the rest; elsewhere: one chunk.
    rows = chunk_rows or (1 if auto else n)
    noise, start = None, 0
    while start < n:
        stop = min(n, start + rows)
        logits = sampling_logits(decoder.logits(hidden_rows[start:stop]).log_softmax(-1), settings)
        if conf is not None and dtype == torch.float64:
            logits = logits.double()  # once, for the noise and the confidence (exact)
        if noise is None or noise.shape[0] < stop - start:
            noise = torch.empty((stop - start, logits.shape[-1]), dtype=dtype, device=device)
        u = noise[: stop - start].uniform_(generator=generator)
        tokens[start:stop] = gumbel_argmax_(u, logits)
        if conf is not None:
            conf[start:stop] = confidence(logits, tokens[start:stop])
        if auto:
            rows = max(1, CHUNK_VALUES // logits.shape[-1])
        start = stop
    return tokens, conf


# --------------------------------------------------------------------------- strategies


@register_strategy("ancestral")
def reveal_ancestral(draw: Draw, masked, t, s, settings, generator):
    """Reveal each masked position with probability (alpha_s - alpha_t) / (1 - alpha_t); draw
    tokens at the revealed positions only (none revealed: the model is not needed)."""
    p = 1.0 if s <= 0 else unmask_probability(t, s)
    u = torch.rand(masked.shape, generator=generator, device=masked.device)
    reveal = masked & (u < p)
    tokens = torch.zeros_like(masked, dtype=torch.long)
    if reveal.any():
        tokens[reveal] = draw(reveal)[0]
    return reveal, tokens


@register_strategy("topk")
def reveal_topk(draw: Draw, masked, t, s, settings, generator):
    """Draw a token everywhere masked; reveal the most confident until round(L * s) remain."""
    tokens = torch.zeros_like(masked, dtype=torch.long)
    drawn, conf_drawn = draw(masked, True)
    tokens[masked] = drawn
    conf = torch.full(masked.shape, -1.0, device=masked.device, dtype=torch.float64)
    conf[masked] = conf_drawn
    keep_masked = round(masked.shape[1] * s)
    k = (masked.sum(dim=1) - keep_masked).clamp(min=0)
    rank = conf.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return masked & (rank < k.unsqueeze(1)), tokens


@register_strategy("threshold")
def reveal_threshold(draw: Draw, masked, t, s, settings, generator):
    """Draw a token everywhere masked; reveal those with confidence > settings.threshold, and
    each row's most confident one if none is; everything at the last step (s = 0)."""
    tokens = torch.zeros_like(masked, dtype=torch.long)
    drawn, conf_drawn = draw(masked, True)
    tokens[masked] = drawn
    if s <= 0:
        return masked, tokens
    conf = torch.full(masked.shape, -1.0, device=masked.device, dtype=torch.float64)
    conf[masked] = conf_drawn
    best = torch.zeros_like(masked).scatter_(1, conf.argmax(dim=1, keepdim=True), True)
    return masked & ((conf > settings.threshold) | best), tokens


# --------------------------------------------------------------------------- samplers
# A sampler gives each step a Draw at the current x_t and is told when x_t changed.


class TokenSampler:
    """What every sampler holds: the decoder, the settings, the generator and the stats."""

    def __init__(self, decoder: TokenDecoder, settings: SamplerSettings, generator, stats):
        self.decoder, self.settings, self.generator, self.stats = (
            decoder,
            settings,
            generator,
            stats,
        )


@register_sampler("reference")
class FullVocabularySampler(TokenSampler):
    """The previous sampler: log p_theta(x_0 | x_t) over all (B, L, V) whenever x_t changed (or
    every step without the cache), tempered and nucleus-filtered in full every step."""

    def __init__(self, *args):
        super().__init__(*args)
        self.logp = None

    def draws(self, x: torch.Tensor) -> Draw:
        if self.logp is None or not self.settings.cache:
            self.logp = self.decoder.log_probs(x).float()
            self.stats.nfe += 1
            self.stats.head_rows += x.numel()
        logits = sampling_logits(self.logp, self.settings)
        return draws_from_logits(logits, self.settings, self.generator)

    def changed(self) -> None:
        self.logp = None


@register_sampler("fast")
class DrawnRowsSampler(TokenSampler):
    """The trunk hidden(x_t) once per state of x_t at which something is drawn (lazily: a step
    that draws nothing runs no network); the head and the draw on the drawn rows only."""

    def __init__(self, *args):
        super().__init__(*args)
        self.hidden = None

    def draws(self, x: torch.Tensor) -> Draw:
        if not self.settings.cache:
            self.hidden = None

        def draw(sel: torch.Tensor, with_confidence: bool = False):
            if self.hidden is None:
                self.hidden = self.decoder.hidden(x)
                self.stats.nfe += 1
            rows = self.hidden[sel]
            self.stats.head_rows += rows.shape[0]
            return draw_rows(self.decoder, rows, self.settings, self.generator, with_confidence)

        return draw

    def changed(self) -> None:
        self.hidden = None


@torch.no_grad()
def sample_masked(
    decoder: TokenDecoder,
    batch: int,
    seq_len: int,
    mask_id: int,
    settings: SamplerSettings,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    canvas: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
):
    """Generate (batch, seq_len) token ids from all-masked input, or from `canvas` (seq_len,):
    given tokens and mask_id where tokens are to be generated (a prompt, a suffix, infilling);
    returns (ids, SamplerStats). Given tokens never change. With M of the L positions masked,
    the time grid runs from M / L to 0 (the masked share), so the strategies reveal the M
    positions over the N_disc steps as they reveal L from an all-masked row. `mask_id` must be
    the decoder's (kept in the signature for the callers' sake). `on_step(i, x)`, when given,
    is called after each step i = 1, 2, ... taken with the rows x (batch, seq_len) then (a
    tensor the sampler no longer changes); it only observes: the samples are the same."""
    if mask_id != decoder.mask_id:
        raise ValueError(f"mask_id {mask_id} differs from the decoder's {decoder.mask_id}")
    x, share = canvas_start(canvas, batch, seq_len, mask_id, device)
    # t * share: the linear schedule's unmask probability (t - s) / t does not change, and
    # top-k keeps round(L * s * share) = round(M * s) positions masked.
    grid = [share * (1.0 - i / settings.steps) for i in range(settings.steps + 1)]
    reveal_fn = STRATEGIES[settings.strategy]
    stats = SamplerStats()
    sampler = SAMPLERS[settings.sampler](decoder, settings, generator, stats)
    for i in tqdm(range(settings.steps), desc="decoding", disable=not progress, leave=False):
        t, s = grid[i], grid[i + 1]
        masked = x == mask_id
        if not masked.any():
            break
        reveal, tokens = reveal_fn(sampler.draws(x), masked, t, s, settings, generator)
        x = torch.where(reveal, tokens, x)
        stats.steps += 1
        if reveal.any():
            sampler.changed()
        if on_step is not None:
            on_step(stats.steps, x)
    return x, stats
