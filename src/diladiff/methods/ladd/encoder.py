"""LADD's frozen latent encoder (`PooledLatentEncoder`, docs/methods/ladd.md#latent-encoder):
H = a frozen feature model's last hidden layer on x0 (B, L, H), pooled to N_z vectors, clipped to
the first d_z dimensions (Matryoshka), optionally L2-normalised per vector (Co-LADD):

    N_z = L:  z^j = H_j                                        (token-aligned)
    N_z < L:  "adaptive_chunk_mean_eos": the valid tokens but the last, of ranks
              r = 0..L'-1 (L' = L_valid - 1), go to chunk floor(r (N_z - 1) / L');
              z^j = mean of chunk j (j < N_z - 1),  z^{N_z - 1} = H at the last valid token
    z0 = normalize(clip_{d_z}(z))  (Co-LADD)   or   clip_{d_z}(z)  (Di-LADD)

Encoder-input dropout (training only; `input_dropout_rows`): p_r ~ U[0, p_max] per row, then
one Bernoulli(p_r) coin per row; a row whose coin is 1 has the input embedding of every
position masked in x_t zeroed (and, token-aligned, the same latent vectors zeroed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diladiff.config import ConfigError
from diladiff.features import FeatureModel

__all__ = ["PooledLatentEncoder", "input_dropout_rows", "pool_latents"]


def pool_latents(
    h: torch.Tensor, num_latents: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """LADD's pooling of hidden states h (B, L, H) to (B, N_z, H) (module docstring):
    N_z = L keeps the tokens; N_z < L is "adaptive_chunk_mean_eos" (N_z - 1 chunk means of the
    valid tokens but the last, then the last valid token's state). valid (B, L) bool, default
    all (then the last token is position L - 1). As the authors' code, a row with fewer than
    N_z valid tokens pools to zeros. N_z = 1 is the last valid token alone."""
    b, l, d = h.shape
    if num_latents == l:
        return h
    if not 1 <= num_latents < l:
        raise ConfigError(f"cannot pool {l} positions to {num_latents} latent vectors")
    if valid is None:
        valid = torch.ones(b, l, dtype=torch.bool, device=h.device)
    valid = valid.bool()
    ranks = valid.long().cumsum(1) - 1  # rank among the row's valid tokens
    lengths = valid.sum(1)
    last = valid & (ranks == (lengths - 1).unsqueeze(1))
    n = num_latents - 1
    pos = torch.arange(b, device=h.device)
    last_state = h[pos, last.long().argmax(1)].unsqueeze(1)  # (B, 1, H)
    if n == 0:
        pooled = last_state
    else:
        # Prefix tokens have ranks 0..L'-1 (all before the last valid one): chunk
        # floor(r n / L'), in [0, n-1]; the clamp only keeps the zero-weight others in range.
        prefix = (valid & ~last).to(h.dtype)
        bins = (ranks.clamp(min=0) * n) // (lengths - 1).clamp(min=1).unsqueeze(1)
        bins = bins.clamp(0, n - 1)
        sums = h.new_zeros(b, n, d).scatter_add_(
            1, bins.unsqueeze(-1).expand(-1, -1, d), h * prefix.unsqueeze(-1)
        )
        counts = h.new_zeros(b, n).scatter_add_(1, bins, prefix)
        pooled = torch.cat([sums / counts.clamp(min=1).unsqueeze(-1), last_state], dim=1)
    return pooled.masked_fill((lengths < num_latents).view(b, 1, 1), 0.0)


def input_dropout_rows(
    batch: int,
    p_max: float = 0.9,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """LADD's encoder-input dropout coins (the authors' code): p_r ~ U[0, p_max] per row, then
    one Bernoulli(p_r) coin per row; (B,) bool, True where the row's masked positions get their
    encoder input blanked (P(True) = p_max / 2). Draws two (B,) uniforms from `generator`."""
    p_r = p_max * torch.rand(batch, generator=generator, device=device)
    return torch.rand(batch, generator=generator, device=device) < p_r


class PooledLatentEncoder(nn.Module):
    """LADD's frozen latent encoder: z0 (B, N_z, d_z) of token rows (module docstring).

        enc = PooledLatentEncoder("minilm-l6", num_latents=4, latent_dim=32, normalize=True)
        z0 = enc(x0)                                   # (B, 4, 32), unit vectors, no gradients
        rows = input_dropout_rows(B, 0.9, gen, x0.device)
        z0 = enc(x0, blank=(x_t == mask_id) & rows[:, None])   # training: p_r blanking

    No parameters or buffers of its own (the encoder stays out of state_dict, as FeatureModel's).
    """

    def __init__(
        self,
        name: str,
        layer: int = -1,
        precision: str = "auto",
        *,
        num_latents: int,
        latent_dim: int,
        normalize: bool,
    ):
        super().__init__()
        self.features = FeatureModel(name, layer, precision)
        if num_latents < 1 or not 1 <= latent_dim <= self.features.dim:
            raise ConfigError(
                f"the LADD latent needs num_latents >= 1 and 1 <= latent_dim <= "
                f"{self.features.dim} (the width of {name!r}), got {num_latents} x {latent_dim}"
            )
        self.num_latents, self.dim, self.normalize = num_latents, latent_dim, normalize

    @torch.no_grad()
    def forward(
        self,
        ids: torch.Tensor,
        blank: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z0 of ids (B, L). blank (B, L) bool: positions whose encoder input embedding is zeroed
        (the rows picked by input_dropout_rows, at the positions masked in x_t); applied in
        training mode only. valid (B, L) bool: the attention mask (default all)."""
        if not self.training or blank is None or not blank.any():
            blank = None
        h = self.features(ids, zero_inputs=blank, valid=valid)
        z = pool_latents(h, self.num_latents, valid)[..., : self.dim]
        if self.normalize:
            z = F.normalize(z, dim=-1)
        if blank is not None and self.num_latents == ids.shape[1]:
            # Token-aligned: a blanked position's latent would still be the encoder's
            # contextual guess of its token; the authors' code zeroes those latents too.
            z = z.masked_fill(blank.unsqueeze(-1), 0.0)
        return z
