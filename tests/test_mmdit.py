"""The LADD MM-DiT (methods/ladd/mmdit.py): two streams with their own weights that meet in one
joint attention, RoPE over [x; z], adaLN-Zero at init, and both attention backends agreeing."""

from __future__ import annotations

import pytest
import torch

from diladiff.methods.ladd.mmdit import MMDiT
from diladiff.nets.rotary import apply_rope, rope_tables

V, L, NZ, D_IN = 11, 6, 3, 5


def tiny(latent_out: int = D_IN, attention: str = "sdpa", seed: int = 0, **kw) -> MMDiT:
    torch.manual_seed(seed)
    return MMDiT(
        V,
        L,
        NZ,
        D_IN,
        latent_out,
        width=16,
        depth=2,
        heads=2,
        cond_dim=8,
        attention=attention,
        **kw,
    )


def perturbed(model: MMDiT, seed: int = 1) -> MMDiT:
    """Every weight moved off its init (the zero adaLN and heads included), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def inputs(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (2, L), generator=g)
    z = torch.randn(2, NZ, D_IN, generator=g)
    t = torch.rand(2, generator=g)
    return x, z, t


def test_streams_keep_separate_parameters():
    m = tiny()
    x_mods = [m.token_embed, m.head_x, *(b.x for b in m.blocks)]
    z_mods = [m.latent_embed, m.head_z, *(b.z for b in m.blocks)]
    x_ids = {id(p) for mod in x_mods for p in mod.parameters()}
    z_ids = {id(p) for mod in z_mods for p in mod.parameters()}
    assert x_ids and z_ids and not x_ids & z_ids
    ptrs = lambda mods: {p.data_ptr() for mod in mods for p in mod.parameters()}  # noqa: E731
    assert not ptrs(x_mods) & ptrs(z_mods)  # no tied storage either
    # Within the blocks the two streams are the same architecture, each its own copy.
    n_x = sum(p.numel() for b in m.blocks for p in b.x.parameters())
    n_z = sum(p.numel() for b in m.blocks for p in b.z.parameters())
    assert n_x == n_z == m.parameter_count(blocks_only=True) // 2
    # Everything is in one stream or the other, except the shared time embedding.
    n_t = sum(p.numel() for p in m.t_embed.parameters())
    n_streams = sum(p.numel() for mod in x_mods + z_mods for p in mod.parameters())
    assert n_streams + n_t == m.parameter_count()


def test_paper_size_is_184m_in_the_blocks():
    with torch.device("meta"):  # no memory, no init cost
        m = MMDiT(151_670, 128, 32, 32, 32, width=768, depth=12, heads=12, cond_dim=128)
    # 2 streams x 12 blocks x (12 w^2 + biases + LN + adaLN 128 -> 6w): the paper's "184M".
    assert m.parameter_count(blocks_only=True) == 184_264_704


def test_streams_attend_jointly():
    m = perturbed(tiny())
    x, z, t = inputs()
    with torch.no_grad():
        lx, oz = m(x, z, t)
        z2 = z.clone()
        z2[:, -1] += 1.0  # change one latent vector only
        lx2, _ = m(x, z2, t)
        x2 = x.clone()
        x2[:, 0] = (x2[:, 0] + 1) % V  # change one token only
        _, oz2 = m(x2, z, t)
    # Every token's logits see the latent change, every latent output the token change.
    assert (lx2 - lx).abs().amax(dim=-1).min() > 1e-4
    assert (oz2 - oz).abs().amax(dim=-1).min() > 1e-4


@pytest.mark.parametrize("latent_out", [D_IN, 7])  # continuous x0 (d_z) | discrete (K logits)
def test_shapes(latent_out):
    m = tiny(latent_out).eval()
    x, z, t = inputs()
    lx, oz = m(x, z, t)
    assert lx.shape == (2, L, V) and oz.shape == (2, NZ, latent_out)
    lx, oz = m(x[:, :4], z, None)  # fewer tokens, no latent time
    assert lx.shape == (2, 4, V) and oz.shape == (2, NZ, latent_out)
    with pytest.raises(ValueError):
        m(torch.zeros(2, L + 1, dtype=torch.long), z, t)
    with pytest.raises(ValueError):
        m(x, z[:, :2], t)


def test_no_latent_time_is_time_zero():
    m = perturbed(tiny())
    x, z, _ = inputs()
    with torch.no_grad():
        a, b = m(x, z, None), m(x, z, torch.zeros(2))
    torch.testing.assert_close(a, b)


def test_rope_scores_depend_on_offset_only():
    d = 8
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(d, generator=g), torch.randn(d, generator=g)
    cos, sin = rope_tables(20, d)
    rq = apply_rope(q.expand(20, d), cos, sin)
    rk = apply_rope(k.expand(20, d), cos, sin)
    scores = rq @ rk.T  # scores[p, r] = <R_p q, R_r k>
    for p, r in [(0, 3), (5, 1), (7, 7)]:
        for shift in (1, 4, 9):
            torch.testing.assert_close(scores[p + shift, r + shift], scores[p, r])
    assert not torch.allclose(scores[0, 3], scores[0, 4])  # ... and do depend on it
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(20))  # rotations


def test_adaln_zero_blocks_are_identity_at_init():
    m = tiny()
    x, z, t = inputs()
    hx, hz = m.token_embed(x), m.latent_embed(z)
    c = torch.nn.functional.silu(m.t_embed(t))
    rope = rope_tables(L + NZ, m.head_dim)
    for mode in (True, False):  # gates are 0, so dropout cannot matter either
        m.train(mode)
        for block in m.blocks:
            ox, oz = block(hx, hz, c, rope)
            assert torch.equal(ox, hx) and torch.equal(oz, hz)
    lx, oz = m(x, z, t)
    assert not lx.any() and not oz.any()  # zero heads


def test_math_and_sdpa_backends_agree():
    a = perturbed(tiny(attention="sdpa"))
    b = tiny(attention="math").eval()
    b.load_state_dict(a.state_dict())
    x, z, t = inputs()
    with torch.no_grad():
        for u, v in zip(a(x, z, t), b(x, z, t), strict=True):
            torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)
