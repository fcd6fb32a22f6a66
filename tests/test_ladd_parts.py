"""LADD's parts: the pooled latent encoder (pooling, clipping, L2 norm, encoder-input dropout),
the "sqrt" VP schedule and the DDIM step, the joint sampler's latent DDIM values and the times
it feeds each channel, and the code quantiser around vector-quantize-pytorch."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from diladiff.config import ConfigError
from diladiff.features import FeatureModel
from diladiff.methods.ladd import sampler as joint
from diladiff.methods.ladd.encoder import PooledLatentEncoder, input_dropout_rows, pool_latents
from diladiff.processes.gaussian import ddim_step, sqrt_alpha_sigma
from diladiff.sampling.conditioning import Condition
from diladiff.sampling.generate import GenerationSettings
from diladiff.sampling.masked import SamplerSettings

IDS = torch.tensor(
    [
        [101, 7592, 2088, 2003, 1037, 3231, 1012, 102],
        [101, 1996, 4937, 2938, 2006, 1996, 13523, 102],
    ]
)


# ---------------------------------------------------------------------------- pooling
def test_pooling_keeps_tokens_when_there_are_as_many_latents_as_tokens():
    h = torch.randn(2, 5, 3)
    assert pool_latents(h, 5) is h


def test_chunk_mean_eos_pooling_on_a_hand_made_tensor():
    h = torch.arange(8, dtype=torch.float32).view(1, 8, 1).repeat(2, 1, 2)  # h[b, l] = (l, l)
    h[1] *= 10
    # 7 prefix tokens into 3 chunks: floor(r 3 / 7) = 0,0,0,1,1,2,2; the last vector = token 7
    want = torch.tensor([1.0, 3.5, 5.5, 7.0]).view(1, 4, 1).repeat(2, 1, 2)
    want[1] *= 10
    assert torch.equal(pool_latents(h, 4), want)
    # N_z = 2: the mean of all tokens but the last, then the last; N_z = 1: the last alone
    assert torch.equal(pool_latents(h[:1], 2)[0, :, 0], torch.tensor([3.0, 7.0]))
    assert torch.equal(pool_latents(h[:1], 1)[0, :, 0], torch.tensor([7.0]))


def test_pooling_with_a_valid_mask_uses_the_last_valid_token_and_zeroes_short_rows():
    h = torch.arange(8, dtype=torch.float32).view(1, 8, 1).repeat(3, 1, 1)
    valid = torch.ones(3, 8, dtype=torch.bool)
    valid[0, 6:] = False  # right padding: valid 0..5, last = 5, prefix 0..4 -> {0,1,2}, {3,4}
    valid[1, :3] = False  # left padding: valid 3..7, last = 7, prefix 3..6 -> {3,4}, {5,6}
    valid[2, 2:] = False  # two valid tokens < N_z = 3: zeros (as the authors' code)
    out = pool_latents(h, 3, valid)[..., 0]
    assert torch.equal(out, torch.tensor([[1.0, 3.5, 5.0], [3.5, 5.5, 7.0], [0.0, 0.0, 0.0]]))


def test_pooling_refuses_more_latents_than_tokens():
    with pytest.raises(ConfigError):
        pool_latents(torch.randn(1, 4, 2), 5)


# ---------------------------------------------------------------------------- the encoder
@pytest.fixture(scope="module")
def hidden():
    return FeatureModel("minilm-l6", precision="fp32")(IDS)  # (2, 8, 384)


def encoder(num_latents, latent_dim, normalize):
    return PooledLatentEncoder(
        "minilm-l6",
        precision="fp32",
        num_latents=num_latents,
        latent_dim=latent_dim,
        normalize=normalize,
    )


def test_encoder_pools_clips_and_normalises(hidden):
    di = encoder(3, 16, normalize=False).eval()
    z = di(IDS)
    assert z.shape == (2, 3, 16) and not z.requires_grad
    assert torch.allclose(z, pool_latents(hidden, 3)[..., :16], atol=1e-5)
    co = encoder(8, 16, normalize=True).eval()
    z = co(IDS)
    assert torch.allclose(z.norm(dim=-1), torch.ones(2, 8), atol=1e-5)
    assert torch.allclose(z, F.normalize(hidden[..., :16], dim=-1), atol=1e-5)
    assert co.features.dim == 384 and co.dim == 16
    with pytest.raises(ConfigError):
        encoder(3, 385, normalize=False)


def test_input_dropout_rows_draws_p_r_then_one_coin_per_row():
    gen = torch.Generator().manual_seed(0)
    rows = input_dropout_rows(20000, 0.9, gen)
    assert rows.dtype == torch.bool and rows.float().mean().item() == pytest.approx(0.45, abs=0.015)
    again = torch.Generator().manual_seed(0)
    p_r = 0.9 * torch.rand(20000, generator=again)
    assert torch.equal(rows, torch.rand(20000, generator=again) < p_r)
    assert not input_dropout_rows(1000, 0.0, gen).any()


def test_blanking_changes_only_the_chosen_rows_and_is_off_in_eval(hidden):
    blank = torch.zeros(2, 8, dtype=torch.bool)
    blank[1, 2:5] = True  # row 1's coin came up: its positions 2..4 are masked in x_t
    for n_z in (8, 3):
        enc = encoder(n_z, 16, normalize=False).train()
        clean = enc.eval()(IDS)
        assert torch.equal(enc(IDS, blank), clean)  # eval: no blanking
        z = enc.train()(IDS, blank)
        assert torch.allclose(z[0], clean[0], atol=1e-5)
        assert (z[1] - clean[1]).abs().max() > 1e-2
        if n_z == 8:  # token-aligned: the blanked positions' latents are zeroed too
            assert (z[1, 2:5] == 0).all() and (z[1, [0, 1, 5, 6, 7]] != 0).any(-1).all()
    # the inputs: the blanked word embeddings are zero, everything else as input_ids gives
    features = FeatureModel("minilm-l6", precision="fp32")
    assert torch.allclose(features(IDS, zero_inputs=torch.zeros_like(blank)), hidden, atol=1e-5)
    seen = {}
    hook = features.encoder.embeddings.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(kwargs), with_kwargs=True
    )
    try:
        features(IDS, zero_inputs=blank)
    finally:
        hook.remove()
    word = features.encoder.get_input_embeddings()(IDS)
    fed = seen["inputs_embeds"]
    assert (fed[blank] == 0).all() and torch.equal(fed[~blank], word[~blank])


# ---------------------------------------------------------------------------- sqrt schedule, DDIM
def test_sqrt_schedule_values():
    eps = 1e-4
    t = torch.tensor([0.0, 0.19, 0.75, 1.0], dtype=torch.float64)
    a, s = sqrt_alpha_sigma(t, eps)
    want = (1 - 2 * eps) * torch.tensor([1.0, 0.9, 0.5, 0.0], dtype=torch.float64) + eps
    assert torch.allclose(a**2, want, rtol=0, atol=1e-15)
    assert torch.allclose(a**2 + s**2, torch.ones_like(t))
    a0, s0 = sqrt_alpha_sigma(0.0, eps)  # the clamp: never exactly clean nor pure noise
    assert s0.item() == pytest.approx(eps**0.5) and sqrt_alpha_sigma(1.0, eps)[
        0
    ].item() == pytest.approx(eps**0.5)
    assert torch.allclose(sqrt_alpha_sigma(t, 0.0)[0] ** 2, torch.sqrt(1 - t))


def test_ddim_step_recovers_z_hat_at_zero_and_is_exact_on_the_deterministic_path():
    gen = torch.Generator().manual_seed(0)
    z0, eps, z_hat = (torch.randn(3, 4, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    a_t, s_t = sqrt_alpha_sigma(t)
    z_t = a_t.view(-1, 1, 1) * z0 + s_t.view(-1, 1, 1) * eps
    assert torch.allclose(ddim_step(z_t, z_hat, a_t, s_t, 1.0, 0.0), z_hat)
    a_s, s_s = sqrt_alpha_sigma(t / 2)
    out = ddim_step(z_t, z0, a_t, s_t, a_s, s_s)
    assert torch.allclose(out, a_s.view(-1, 1, 1) * z0 + s_s.view(-1, 1, 1) * eps, atol=1e-12)
    one = ddim_step(z_t[:1], z0[:1], float(a_t[0]), float(s_t[0]), float(a_s[0]), float(s_s[0]))
    assert torch.allclose(one, out[:1], atol=1e-12)


# ---------------------------------------------------------------------------- the joint sampler
V, L, NZ, DZ, MASK, CODES, T_EPS = 6, 8, 2, 3, 5, 4, 1e-4


class RecordingNet:
    """A stub MM-DiT: records (x, z_in, t_z) of every call and returns flat token logits and a
    known prediction, a different random tensor per call (Co-LADD: the clean latent z_hat;
    Di-LADD: code logits)."""

    def __init__(self, batch: int, calls: int, discrete: bool):
        gen = torch.Generator().manual_seed(42)
        shape = (batch, NZ, CODES) if discrete else (batch, NZ, DZ)
        self.outs = [torch.randn(shape, generator=gen) for _ in range(calls)]
        self.calls = []

    def __call__(self, x, z_in, t_z):
        self.calls.append((x.clone(), z_in.clone(), None if t_z is None else t_z.clone()))
        return torch.zeros(*x.shape, V), self.outs[len(self.calls) - 1]


def sqrt_schedule_ddim(z, z_hat, t, s, eps=T_EPS):
    """The closed form, written out: alpha^2(t) = (1 - 2 eps) sqrt(1 - t) + eps, sigma^2 =
    1 - alpha^2, z_s = alpha_s z_hat + sigma_s (z_t - alpha_t z_hat) / sigma_t (float64)."""
    a2_t = (1 - 2 * eps) * math.sqrt(1 - t) + eps
    a2_s = (1 - 2 * eps) * math.sqrt(1 - s) + eps
    a_t, s_t, a_s, s_s = (math.sqrt(v) for v in (a2_t, 1 - a2_t, a2_s, 1 - a2_s))
    z, z_hat = z.double(), z_hat.double()
    return a_s * z_hat + s_s * (z - a_t * z_hat) / s_t


@pytest.mark.parametrize("discrete", [False, True])
@pytest.mark.parametrize("canvas", [None, (0, 1, MASK, MASK, MASK, MASK, 2, 3)])
def test_joint_sampler_feeds_the_grid_times_and_takes_closed_form_ddim_steps(
    monkeypatch, discrete, canvas
):
    """Joint inference, N = 4 steps on t_k = 1 - k (1 - 1e-5) / 4 and the noise-removal call:
    Co-LADD's network reads t_z = t_k at call k and its latent moves by DDIM from t_k to
    t_{k+1} with that call's z_hat (starting from the generator's first normal draw); Di-LADD's
    network gets no time. The token channel reveals from share t_k to share t_{k+1} (share =
    the canvas's masked share M / L, 1 without one; the latent's times are not scaled), the
    last call down to 0; Di-LADD's codes reveal on their own unscaled grid of N_z = 2 steps
    (t'_j = 1 - j (1 - 1e-5) / N_z), so in the first N_z calls only."""
    b, n = 3, 4
    net = RecordingNet(b, n + 1, discrete)
    stage = SimpleNamespace(
        seq_len=L,
        mask_id=MASK,
        latent_shape=(NZ, DZ),
        latent_kind="discrete" if discrete else "continuous",
        cfg=SimpleNamespace(ladd=SimpleNamespace(t_eps=T_EPS)),
        net=net,
    )
    if discrete:
        stage.code_mask_id = CODES - 1
        stage.vq = SimpleNamespace(embed=lambda c: F.one_hot(c, CODES).float())
    reveals = []
    original = joint.reveal

    def recording_reveal(x, logits, mask_id, t, s, settings, generator):
        out = original(x, logits, mask_id, t, s, settings, generator)
        reveals.append((mask_id, t, s, out))
        return out

    monkeypatch.setattr(joint, "reveal", recording_reveal)
    tokens = SamplerSettings(steps=n, strategy="ancestral", temperature=1.0, top_p=1.0)
    gs = GenerationSettings(
        tokens, method=joint.JointSettings("joint"), condition=Condition(canvas)
    )
    joint.sample_joint(stage, b, gs, torch.Generator().manual_seed(7), "cpu")

    grid = [1.0 - k * (1.0 - 1e-5) / n for k in range(n + 1)]
    share = 1.0 if canvas is None else 4 / L
    assert len(net.calls) == n + 1
    # the token channel's times (and Di-LADD's code channel's), call by call
    token_steps = [(MASK, share * t, share * s) for t, s in zip(grid[:-1], grid[1:], strict=True)]
    token_steps.append((MASK, share * grid[-1], 0.0))
    got = [(m, t, s) for m, t, s, _ in reveals if m == MASK]
    assert [m for m, _, _ in got] == [MASK] * (n + 1)
    assert all(
        math.isclose(t, wt, rel_tol=1e-12) and math.isclose(s, ws, rel_tol=1e-12, abs_tol=0)
        for (_, t, s), (_, wt, ws) in zip(got, token_steps, strict=True)
    )
    token_outs = [out for m, _, _, out in reveals if m == MASK]
    for k in range(n):  # each call reads the tokens the previous step revealed
        assert torch.equal(net.calls[k + 1][0], token_outs[k])
    if discrete:
        code_steps = [(m, t, s) for m, t, s, _ in reveals if m != MASK]
        code_grid = [1.0 - k * (1.0 - 1e-5) / NZ for k in range(NZ + 1)]
        assert [m for m, _, _ in code_steps] == [CODES - 1] * NZ
        assert all(
            math.isclose(t, wt, rel_tol=1e-12) and math.isclose(s, ws, rel_tol=1e-12)
            for (_, t, s), wt, ws in zip(code_steps, code_grid[:-1], code_grid[1:], strict=True)
        )
        assert all(t_z is None for _, _, t_z in net.calls)
        return
    # Co-LADD: the latent's time at each call, and its DDIM values against the closed form
    for k, (_, _, t_z) in enumerate(net.calls):
        want = torch.full((b,), grid[k], dtype=torch.float64)
        assert t_z.shape == (b,) and torch.allclose(t_z.double(), want, rtol=0, atol=1e-7)
    z_start = torch.randn((b, NZ, DZ), generator=torch.Generator().manual_seed(7))
    assert torch.equal(net.calls[0][1], z_start)
    z = z_start.double()
    for k in range(n):
        step = sqrt_schedule_ddim(net.calls[k][1], net.outs[k], grid[k], grid[k + 1])
        assert torch.allclose(net.calls[k + 1][1].double(), step, rtol=1e-5, atol=1e-6)
        z = sqrt_schedule_ddim(z, net.outs[k], grid[k], grid[k + 1])  # chained in float64
        assert torch.allclose(net.calls[k + 1][1].double(), z, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- the code quantiser
def quantiser(num_codes=9, dim=6):
    pytest.importorskip("vector_quantize_pytorch")
    from diladiff.methods.ladd.vq import CodeQuantizer

    return CodeQuantizer(dim, num_codes)


def latents(seed, shape=(4, 16, 6)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_quantiser_wraps_vector_quantize_with_the_authors_settings():
    q = quantiser()
    vq, book = q.quantizer, q.quantizer._codebook
    assert vq.use_cosine_sim and book.use_cosine_sim and vq.codebook_size == 8
    assert book.decay == 0.95 and vq.commitment_weight == 0.1 and book.threshold_ema_dead_code == 2
    assert book.kmeans_iters == 10 and not book.initted and vq.rotation_trick is False
    assert not book.use_ddp  # no process group here
    assert q.mask_id == 8 and q.num_codes == 9 and q.codebook.shape == (8, 6)
    assert set(q.state_dict()) == {
        "z_mask",
        "quantizer._codebook.initted",
        "quantizer._codebook.cluster_size",
        "quantizer._codebook.embed_avg",
        "quantizer._codebook.embed",
    }


def test_quantise_kmeans_init_codes_embed_and_loss():
    q = quantiser().train()
    assert (q.codebook == 0).all()
    z_e = latents(0)
    z_q, codes, loss = q.quantize(z_e)
    assert q.quantizer._codebook.initted  # k-means on the first call
    assert torch.allclose(q.codebook.norm(dim=-1), torch.ones(8), atol=1e-5)
    assert codes.shape == (4, 16) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() <= 7 and codes.unique().numel() > 1
    assert torch.allclose(z_q.norm(dim=-1), torch.ones(4, 16), atol=1e-5)
    u = F.normalize(z_e, dim=-1)
    assert loss.item() == pytest.approx(0.1 * ((u - z_q) ** 2).mean().item(), rel=1e-5)
    # the mask id reads z_mask (a learnable parameter, 0 at first); other codes their vectors
    with torch.no_grad():
        q.z_mask.fill_(3.0)
    masked = codes.clone()
    masked[:, :5] = q.mask_id
    v = q.embed(masked)
    assert (v[:, :5] == 3.0).all() and torch.equal(v[:, 5:], q.codebook[codes[:, 5:]])
    assert (
        torch.equal(q.embed(masked, z_q)[:, 5:], z_q[:, 5:])
        and (q.embed(masked, z_q)[:, :5] == 3).all()
    )
    v.sum().backward()
    assert q.z_mask.grad is not None and q.z_mask.grad.sum() == 4 * 5 * 6
    # eval mode: the codebook is frozen, the same loss formula is reported
    q.eval()
    before = q.codebook.clone()
    z_q2, codes2, loss2 = q.quantize(latents(1))
    assert torch.equal(q.codebook, before) and torch.equal(z_q2, q.codebook[codes2])
    u2 = F.normalize(latents(1), dim=-1)
    assert loss2.item() == pytest.approx(0.1 * ((u2 - z_q2) ** 2).mean().item(), rel=1e-6)


def test_straight_through_gradient_reaches_z_e():
    q = quantiser().train()
    z_e = latents(0).requires_grad_()
    z_q, _, _ = q.quantize(z_e)
    w = latents(5)
    (z_q * w).sum().backward()
    ref = z_e.detach().clone().requires_grad_()
    (F.normalize(ref, dim=-1) * w).sum().backward()  # identity through the normalisation
    assert torch.allclose(z_e.grad, ref.grad, atol=1e-6)


def test_state_dict_round_trip_reproduces_codes_and_updates():
    torch.manual_seed(0)
    q = quantiser().train()
    for seed in range(3):
        q.quantize(latents(seed))
    r = quantiser()
    r.load_state_dict(q.state_dict())
    r.train()
    assert r.quantizer._codebook.initted  # no second k-means
    z = latents(10)
    gen_q, gen_r = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    out_q, out_r = q.quantize(z, gen_q), r.quantize(z, gen_r)
    assert torch.equal(out_q[1], out_r[1]) and torch.equal(out_q[0], out_r[0])
    for k, v in q.state_dict().items():  # the EMA update (and any dead-code draw) agrees too
        assert torch.equal(v, r.state_dict()[k]), k


def test_a_generator_makes_the_library_draws_reproducible():
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # k-means samples from the global RNG without a generator
        q = quantiser().train()
        gen = torch.Generator().manual_seed(3)
        q.quantize(latents(0), gen)
        runs.append(q.codebook.clone())
    assert torch.equal(runs[0], runs[1])
    state = torch.get_rng_state()
    quantiser().train().quantize(latents(0), torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone


# ---------------------------------------------------------------------------- token bound
def test_token_bound_weighs_each_row_by_one_over_t_unlike_the_training_loss():
    """token_nll_bound on a hand-made stub: per row (1 / L t_b) sum over masked positions of
    -log softmax(logits without the mask id)[x0]; unmasked positions (huge logits on a wrong
    token) add nothing. The weight-1 training loss L_x on the same inputs differs."""
    from diladiff.methods.ladd.stage import LADD, token_nll_bound

    mask = 3
    logits = torch.tensor(
        [
            [[1.0, 2.0, 0.0, 9.0], [50.0, 0.0, 0.0, 0.0], [0.5, -1.0, 2.0, 9.0]],
            [[40.0, 0.0, 0.0, 0.0], [0.0, 3.0, 1.0, 9.0], [2.0, 2.0, -2.0, 9.0]],
        ]
    )
    x0 = torch.tensor([[0, 1, 2], [2, 2, 1]])
    x_t = torch.tensor([[mask, 1, mask], [2, mask, mask]])
    t = torch.tensor([0.5, 0.8])

    def nll(row, target):  # the SUBS distribution: softmax over the ids 0..2
        return -(row[target] - math.log(sum(math.exp(v) for v in row[:3])))

    lg = logits.tolist()
    want0 = (nll(lg[0][0], 0) + nll(lg[0][2], 2)) / (0.5 * 3)
    want1 = (nll(lg[1][1], 2) + nll(lg[1][2], 1)) / (0.8 * 3)
    got = token_nll_bound(logits, x0, x_t, t, mask)
    assert got.tolist() == pytest.approx([want0, want1], rel=1e-6)
    stub = SimpleNamespace(mask_id=mask)
    weight_one = float(LADD.token_loss(stub, logits, x0, x_t))
    assert weight_one == pytest.approx((want0 * 0.5 + want1 * 0.8) / 2, rel=1e-6)
    assert float(got.mean()) > 1.5 * weight_one  # 1/t >= 1.25 on every row
