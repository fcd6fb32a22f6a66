"""MM-DiT: a two-stream DiT over tokens x and a latent z with one joint attention (LADD).

Each stream s in {x, z} keeps its own weights (LayerNorms, adaLN modulation, qkv and output
projections, MLP, final layer); the streams meet only in the attention, one softmax over the
concatenated sequence [x; z]:

    hx = Emb(x_t),                      hz = Linear(4w -> w)(SiLU(Linear(d_in -> 4w)(z_in)))
    c  = SiLU(TimeEmb(t_z))                                           (t_z = 0 when not given)
    per block and stream: (sa, ca, ga, sm, cm, gm)_s = Linear_s(SiLU(c))     (zero at init)
        a_s = LN_s(h_s) * (1 + ca_s) + sa_s,   (q, k, v)_s = W_s a_s          (no bias)
        (q, k) <- RoPE((q, k), positions 0..n-1 for x, L..L+N_z-1 for z)  (n <= L tokens)
        o = softmax(q k^T / sqrt(d)) v  over [x; z]   (bidirectional, one softmax for both)
        h_s += ga_s * drop(W_out,s o_s)
        h_s += gm_s * drop(MLP_s(LN_s(h_s) * (1 + cm_s) + sm_s))       (GELU-tanh, x mlp_ratio)
    heads: (shift, scale)_s = Linear'_s(c);  out_s = Linear_s(LN_s(h_s) * (1 + scale) + shift)
        x -> vocab_size logits (mask id included; the caller applies SUBS),
        z -> latent_out (d_z for continuous x0-prediction, K code logits for discrete).

Follows the authors' `dlm/transformers/dit/latent_dit.py` (JointDiscreteDiTModel,
MM_DDiTBlock, use_rope_for_latents=True): no QK-norm, LayerNorms with a learned scale and no
bias, the block modulations take SiLU of the already SiLU-ed c while the final layers take c,
RoPE on q and k only (rotate-half convention, base 1e4), and the time embedding sees t itself
(sinusoid frequencies 1 .. 1e-4, no x1000). Their c = SiLU(TimeEmb_x(0) + TimeEmb_z(t_z)) never
feeds a token time, so TimeEmb_x(0) is a learned constant, which the output bias of TimeEmb_z
already provides: it is dropped here. Di-LADD ("no time input") is t_z = 0, as in the authors'
code (timesteps None -> zeros), so c is then the learned constant SiLU(TimeEmb_z(0)).

The latent stream sits at positions L..L+N_z-1 (L = seq_len, the training length) whatever the
number n of tokens given: RoPE scores depend on position differences, so the x-z offsets the
network learned are kept only if z does not move with n (the authors pad the token stream to
L for the same reason, `_sample_latents_only`).

Initialisation: init_weights (normal 0.02) for linear and embedding weights, zero for every
adaLN modulation and for the output heads (adaLN-Zero), so at init every block is the identity
on both residual streams and both heads output 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diladiff.nets.rotary import apply_rope, rope_tables
from diladiff.nets.time_embedding import TimeEmbedding
from diladiff.nets.transformer import ATTENTION_BACKENDS, MLP, attention, init_weights, modulate


def stream_positions(n_x: int, seq_len: int, num_latents: int, device=None) -> torch.Tensor:
    """RoPE positions of [x; z]: 0..n_x-1 for the n_x <= seq_len tokens, then
    seq_len..seq_len+num_latents-1 for the latent (its training positions, module docstring)."""
    return torch.cat(
        [
            torch.arange(n_x, device=device),
            torch.arange(seq_len, seq_len + num_latents, device=device),
        ]
    )


class _Stream(nn.Module):
    """One stream's weights in one block (everything but the shared attention)."""

    def __init__(self, width: int, cond_dim: int, mlp_ratio: float, qk_norm: bool, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, bias=False)
        self.norm2 = nn.LayerNorm(width, bias=False)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.mlp = MLP(width, mlp_ratio)
        head_dim = width // heads
        self.q_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()
        # SiLU again on the already SiLU-ed c, as the authors' MM_DDiTBlock ("added SiLU").
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)
        self.ada[1]._zero_init = True  # kept at zero by init_weights


class MMDiTBlock(nn.Module):
    def __init__(
        self,
        width: int,
        heads: int,
        cond_dim: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        qk_norm: bool = False,
        attention_backend: str = "sdpa",
    ):
        super().__init__()
        self.heads, self.dropout, self.backend = heads, dropout, attention_backend
        self.x = _Stream(width, cond_dim, mlp_ratio, qk_norm, heads)
        self.z = _Stream(width, cond_dim, mlp_ratio, qk_norm, heads)

    def _qkv(self, s: _Stream, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, n, _ = a.shape
        q, k, v = s.qkv(a).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return s.q_norm(q), s.k_norm(k), v

    def forward(
        self,
        hx: torch.Tensor,
        hz: torch.Tensor,
        c: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mods = [self.x.ada(c).chunk(6, dim=-1), self.z.ada(c).chunk(6, dim=-1)]
        streams, hs = (self.x, self.z), [hx, hz]
        qkv = [
            self._qkv(s, modulate(s.norm1(h), m[0], m[1]))
            for s, h, m in zip(streams, hs, mods, strict=True)
        ]
        cos, sin = rope
        q, k, v = (torch.cat([qkv[0][i], qkv[1][i]], dim=2) for i in range(3))
        o = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, self.backend)
        b, n_x = hx.shape[0], hx.shape[1]
        o = o.transpose(1, 2).reshape(b, o.shape[2], -1)
        drop = self.dropout if self.training else 0.0
        out = []
        for s, h, m, o_s in zip(streams, hs, mods, (o[:, :n_x], o[:, n_x:]), strict=True):
            _, _, ga, sm, cm, gm = m
            h = h + ga.unsqueeze(1) * F.dropout(s.out(o_s), drop)
            mlp = s.mlp(modulate(s.norm2(h), sm, cm))
            out.append(h + gm.unsqueeze(1) * F.dropout(mlp, drop))
        return out[0], out[1]


class _FinalLayer(nn.Module):
    """adaLN (shift, scale) from c (no extra SiLU, as the authors' DDitFinalLayer) and a Linear,
    both zero at init."""

    def __init__(self, width: int, out_dim: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, bias=False)
        self.ada = nn.Linear(cond_dim, 2 * width)
        self.linear = nn.Linear(width, out_dim)
        for m in (self.ada, self.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
            m._zero_init = True

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(h), shift, scale))


class MMDiT(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        num_latents: int,
        latent_in: int,
        latent_out: int,
        width: int,
        depth: int,
        heads: int,
        cond_dim: int = 128,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        attention: str = "sdpa",
        qk_norm: bool = False,
        time_scale: float = 1.0,
        rope_base: float = 1e4,
    ):
        super().__init__()
        if width % heads or (width // heads) % 2:
            raise ValueError(f"width {width} / heads {heads} must be an even integer (RoPE)")
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention backend {attention!r}; choose {ATTENTION_BACKENDS}"
            )
        self.seq_len, self.num_latents, self.latent_in = seq_len, num_latents, latent_in
        self.head_dim, self.rope_base = width // heads, rope_base
        self.token_embed = nn.Embedding(vocab_size, width)
        # An MLP rather than a Linear: the first LayerNorm would make a Linear's input scale
        # invisible to the network (the authors' reason).
        self.latent_embed = nn.Sequential(
            nn.Linear(latent_in, 4 * width), nn.SiLU(), nn.Linear(4 * width, width)
        )
        self.t_embed = TimeEmbedding(cond_dim, scale=time_scale)
        self.blocks = nn.ModuleList(
            MMDiTBlock(width, heads, cond_dim, mlp_ratio, dropout, qk_norm, attention)
            for _ in range(depth)
        )
        self.head_x = _FinalLayer(width, vocab_size, cond_dim)
        self.head_z = _FinalLayer(width, latent_out, cond_dim)
        init_weights(self)

    def forward(
        self, x_t: torch.Tensor, z_in: torch.Tensor, t_z: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token logits (B, n, vocab_size) and latent outputs (B, N_z, latent_out) from token ids
        x_t (B, n), latent inputs z_in (B, N_z, latent_in) and latent time t_z (B,) (None: 0).
        n may be below seq_len (0 included): the tokens take positions 0..n-1 and the latent
        keeps its training positions seq_len..seq_len+N_z-1 (`stream_positions`)."""
        b, n_x = x_t.shape
        if n_x > self.seq_len:
            raise ValueError(f"{n_x} tokens exceed seq_len {self.seq_len}")
        if (
            z_in.dim() != 3
            or z_in.shape[0] != b
            or z_in.shape[1:] != (self.num_latents, self.latent_in)
        ):
            want = (b, self.num_latents, self.latent_in)
            raise ValueError(f"z_in has shape {tuple(z_in.shape)}, expected {want}")
        hx = self.token_embed(x_t)
        hz = self.latent_embed(z_in.to(hx.dtype))
        if t_z is None:
            t_z = torch.zeros(b, device=hx.device, dtype=hx.dtype)
        c = F.silu(self.t_embed(t_z.to(hx.dtype)))
        cos, sin = rope_tables(
            self.seq_len + self.num_latents, self.head_dim, self.rope_base, hx.device, hx.dtype
        )
        pos = stream_positions(n_x, self.seq_len, self.num_latents, hx.device)
        rope = (cos[pos], sin[pos])
        for block in self.blocks:
            hx, hz = block(hx, hz, c, rope)
        return self.head_x(hx, c), self.head_z(hz, c)

    def parameter_count(self, blocks_only: bool = False) -> int:
        """Trainable parameters; blocks_only counts the MM-DiT blocks alone, the figure the LADD
        paper reports (width 768, 12 blocks, cond 128: 184.3M, size-matched to MDLM's DiT)."""
        module = self.blocks if blocks_only else self
        return sum(p.numel() for p in module.parameters() if p.requires_grad)
