"""The latent denoiser: a DiT over the N_z latent vectors (no diffusion knowledge here).

    out = Linear(adaLN(Backbone(Linear([z_t; z_sc]) + pos, c))),   c = emb(t) [+ emb(t - r)]

Time enters through adaLN-Zero conditioning c. The optional second time embedding (of t - r,
for MeanFlow students) has a zero-initialised output layer, so adding it changes nothing until
it is trained.
"""

from __future__ import annotations

import torch
from torch import nn

from diladiff.config import PriorConfig
from diladiff.nets.time_embedding import TimeEmbedding
from diladiff.nets.transformer import Backbone, init_weights, modulate


class LatentDenoiser(nn.Module):
    def __init__(
        self,
        num_latents: int,
        latent_dim: int,
        cfg: PriorConfig,
        attention: str = "sdpa",
        with_interval: bool = False,
        interval_scale: float = 1000.0,
    ):
        super().__init__()
        w = cfg.width
        self.inp = nn.Linear(2 * latent_dim, w)
        self.t_embed = TimeEmbedding(w)
        self.dt_embed = (
            TimeEmbedding(w, zero_out=True, scale=interval_scale) if with_interval else None
        )
        self.backbone = Backbone(
            w,
            cfg.depth,
            cfg.heads,
            num_latents,
            cfg.mlp_ratio,
            cond_dim=w,
            attention_backend=attention,
        )
        self.norm = nn.LayerNorm(w, elementwise_affine=False)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.out = nn.Linear(w, latent_dim)
        init_weights(self)
        for m in (self.final_ada[1], self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        if self.dt_embed is not None:
            self.dt_embed.reset_output()

    def forward(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        z_sc: torch.Tensor | None = None,
        r: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prediction (B, N_z, d_z) from z_t, time t (B,), self-conditioning z_sc (zeros if None)
        and, for a student, the interval start r (B,)."""
        if z_sc is None:
            z_sc = torch.zeros_like(z_t)
        c = self.t_embed(t)
        if self.dt_embed is not None:
            c = c + self.dt_embed(t - (t if r is None else r))
        h = self.backbone(self.inp(torch.cat([z_t, z_sc], dim=-1)), c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.out(modulate(self.norm(h), shift, scale))
