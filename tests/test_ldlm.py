"""LDLM: gradient routing of the joint loss, the unstandardised latent, the warm-up and adaptive
time state across resume and DDP, and sampling through every latent sampler."""

import json

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from diladiff.cli import main
from diladiff.config import build_config
from diladiff.data.tokenizer import load_tokenizer, tokenizer_identity
from diladiff.methods.ldlm.stage import LDLM, ldlm_losses
from diladiff.train.checkpoint import latest_checkpoint, load_weights

SMALL = [
    "ldlm.latent_dim=8",
    "ldlm.encoder_width=16",
    "ldlm.encoder_heads=2",
    "ldlm.encoder_depth=1",
    "ldlm.hidden_decoder_depth=1",
    "ldlm.token_decoder_width=16",
    "ldlm.token_decoder_heads=2",
    "ldlm.token_decoder_depth=1",
    "prior.depth=1",
    "prior.width=16",
    "prior.heads=2",
    "ldlm.feature_stats_rows=32",
]


def make_stage(*overrides) -> LDLM:
    cfg = build_config("tiny", TINY + SMALL + list(overrides), "ldlm")
    stage = LDLM(cfg, tokenizer_identity(load_tokenizer(cfg.data.tokenizer)))
    x = torch.randint(1000, 2000, (4, cfg.data.seq_len))
    stage.feat_norm.fit([stage.features(x)])
    return stage


def grads(loss, stage: LDLM) -> dict[str, float]:
    """Gradient norm of `loss` per module (0.0 where it does not reach)."""
    modules = {
        "encoder": stage.encoder,
        "hidden_decoder": stage.hidden_decoder,
        "token_decoder": stage.token_decoder,
        "denoiser": stage.prior,
    }
    out = {}
    for name, m in modules.items():
        params = list(m.parameters())
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out[name] = sum(float(g.norm()) for g in gs if g is not None)
    return out


def terms(stage, gamma=1.0, seed=0):
    x0 = torch.randint(1000, 2000, (3, stage.seq_len), generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(seed)
    return ldlm_losses(stage, x0, gen, False, torch.tensor(gamma))


def test_each_loss_reaches_only_the_modules_of_the_routing_table():
    stage = make_stage()
    t = terms(stage, gamma=0.5)
    token, hidden, diff = (
        grads(t["token"], stage),
        grads(t["hidden"], stage),
        grads(t["diff"], stage),
    )
    # L_w: the token decoder only (stop-gradient on h_hat)
    assert token["token_decoder"] > 0
    assert token["encoder"] == token["hidden_decoder"] == token["denoiser"] == 0
    # L_h: encoder and hidden-state decoder
    assert hidden["encoder"] > 0 and hidden["hidden_decoder"] > 0
    assert hidden["token_decoder"] == hidden["denoiser"] == 0
    # L_diff: denoiser and (scaled) encoder, never the decoders
    assert diff["denoiser"] > 0 and diff["encoder"] > 0
    assert diff["hidden_decoder"] == diff["token_decoder"] == 0


def test_diffusion_gradient_reaches_the_encoder_scaled_by_gamma():
    stage = make_stage()
    enc = list(stage.encoder.parameters())
    den = list(stage.prior.parameters())

    def flat(loss, params):
        gs = torch.autograd.grad(loss, params, retain_graph=True)
        return torch.cat([g.reshape(-1) for g in gs])

    full, part, none = (terms(stage, g)["diff"] for g in (1.0, 0.3, 0.0))
    assert torch.allclose(flat(part, enc), 0.3 * flat(full, enc), rtol=1e-4, atol=1e-8)
    assert float(flat(none, enc).abs().max()) == 0.0
    # the forward value and the denoiser's gradient do not depend on gamma
    assert torch.equal(part, full)
    assert torch.allclose(flat(part, den), flat(full, den))


def test_latents_are_not_standardised_for_the_prior():
    stage = make_stage()
    assert not hasattr(stage, "prior_norm") and stage.latent_shape == (stage.seq_len, 8)
    x0 = torch.randint(1000, 2000, (2, stage.seq_len))
    z = stage.encode_clean(x0)
    assert torch.equal(stage.prior_latents(x0), z)
    assert torch.equal(stage.to_decoder_space(z), z)


def test_warmup_scale_follows_the_step():
    stage = make_stage("ldlm.encoder_warmup_steps=10")
    seen = []
    for step in (0, 5, 8, 10, 50):
        stage.on_step(step)
        seen.append(float(stage.encoder_grad_scale))
    assert seen[0] == 0.0 and seen[-2] == seen[-1] == 1.0
    assert seen[1] == pytest.approx(0.054, abs=1e-3) and seen[2] == pytest.approx(0.568, abs=1e-3)


def train(run, *overrides):
    argv = ["train", "ldlm", "--preset", "tiny", "--run-dir", str(run), *TINY, *SMALL]
    return main(argv + ["ldlm.ats_refresh_every=2", "ldlm.encoder_warmup_steps=4", *overrides])


def test_ldlm_resumes_exactly_with_its_warmup_and_adaptive_time_state(tmp_path):
    assert train(tmp_path / "a", "train.max_steps=3") == 0
    assert train(tmp_path / "a", "train.max_steps=6") == 0
    assert train(tmp_path / "b", "train.max_steps=6") == 0
    for which in ("model", "ema"):
        a = load_file(latest_checkpoint(tmp_path / "a") / f"{which}.safetensors")
        b = load_file(latest_checkpoint(tmp_path / "b") / f"{which}.safetensors")
        assert a.keys() == b.keys() and any(k.startswith("time_sampler.") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), which
    probs = a["time_sampler.probs"]  # refreshed from the losses seen: no longer uniform
    assert not torch.allclose(probs, torch.full_like(probs, 1 / len(probs)))


@pytest.mark.parametrize("sampler", ["sde_euler", "ddpm", "ode_euler"])
def test_ldlm_samples_text_with_each_latent_sampler(tmp_path_factory, sampler):
    run = tmp_path_factory.getbasetemp() / "ldlm_sampling_run"
    if not (run / "run.json").is_file():
        assert train(run, "train.max_steps=4") == 0
    out = tmp_path_factory.mktemp("s") / "samples.jsonl"
    argv = ["sample", str(run), "--out", str(out), "--cont-steps", "3"]
    assert main(argv + ["--latent-sampler", sampler]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert len(rows) == 4 and all(len(r["ids"]) == 32 for r in rows)
    assert meta["cont_nfe"] > 0 and meta["disc_nfe"] == 1  # one decoder call per batch


# --- the ablation switches: what each one must change ---------------------------------------


def batch(seq_len: int) -> torch.Tensor:
    return torch.randint(1000, 2000, (3, seq_len), generator=torch.Generator().manual_seed(9))


def flat_grads(loss, stage: LDLM) -> dict[str, torch.Tensor]:
    """The gradient of `loss` per module, flattened (zeros where it does not reach)."""
    modules = {
        "encoder": stage.encoder,
        "hidden_decoder": stage.hidden_decoder,
        "token_decoder": stage.token_decoder,
        "denoiser": stage.prior,
    }
    out = {}
    for name, m in modules.items():
        params = list(m.parameters())
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out[name] = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).reshape(-1)
                for p, g in zip(params, gs, strict=True)
            ]
        )
    return out


# recon_loss -> (the terms of the training loss, whether L_w reaches E_z and D_h)
RECON = {
    "mse": (("diff", "hidden", "token"), False),
    "ce": (("diff", "token"), True),
    "ce+mse": (("diff", "hidden", "token"), True),
}


@pytest.mark.parametrize("recon", list(RECON))
def test_recon_loss_switch_picks_the_loss_terms_and_where_the_token_loss_flows(recon):
    stage = make_stage(f"ldlm.recon_loss={recon}", "ldlm.encoder_warmup_steps=0")
    x0 = batch(stage.seq_len)
    loss, metrics = stage(x0, torch.Generator().manual_seed(3))
    # the same draws as forward: its self-conditioning coin, then ldlm_losses' own
    gen = torch.Generator().manual_seed(3)
    sc = bool(torch.rand((), generator=gen) < stage.cfg.diffusion.self_cond_prob)
    t = ldlm_losses(stage, x0, gen, sc, stage.encoder_grad_scale)
    names, token_reaches_encoder = RECON[recon]
    want = sum(t[k] for k in names)
    assert torch.allclose(loss, want, rtol=1e-6, atol=0)
    assert (
        float(t["hidden"].detach()) > 0.1
    )  # so a wrongly added (or dropped) L_h shows in the total
    got, ref = flat_grads(loss, stage), flat_grads(want, stage)
    assert all(torch.allclose(got[k], ref[k], rtol=1e-5, atol=1e-8) for k in got)
    token = grads(t["token"], stage)
    assert token["token_decoder"] > 0 and token["denoiser"] == 0
    assert (token["encoder"] > 0) == token_reaches_encoder
    assert (token["hidden_decoder"] > 0) == token_reaches_encoder


def test_encoder_warmup_switch_scales_the_diffusion_gradient_into_the_encoder():
    """The encoder's gradient of the training loss is g_h + gamma(s) g_diff: with a warm-up of
    10 steps gamma = 0 at step 0 and 1 from step 10, without one gamma = 1 from step 0. The
    loss value and the denoiser's gradient do not depend on gamma."""
    warm = make_stage("ldlm.encoder_warmup_steps=10", "ldlm.adaptive_time=false")
    none = make_stage("ldlm.encoder_warmup_steps=0", "ldlm.adaptive_time=false")
    none.load_state_dict(warm.state_dict())
    x0 = batch(warm.seq_len)

    def at_step(stage, step):
        stage.on_step(step)
        loss, _ = stage(x0, torch.Generator().manual_seed(4))
        g = flat_grads(loss, stage)
        return loss, g["encoder"], g["denoiser"], float(stage.encoder_grad_scale)

    (l0, e0, d0, gamma0), (l5, e5, d5, gamma5), (l10, e10, d10, gamma10) = (
        at_step(warm, s) for s in (0, 5, 10)
    )
    ln, en, dn, gamma_n = at_step(none, 0)
    assert gamma0 == 0.0 and 0.0 < gamma5 < 1.0 and gamma10 == gamma_n == 1.0
    g_diff = e10 - e0  # the diffusion loss's encoder gradient at gamma = 1
    assert float(g_diff.norm()) > 1e-3 * float(e10.norm())
    assert torch.allclose(e5, e0 + gamma5 * g_diff, rtol=1e-4, atol=1e-7)
    assert torch.allclose(en, e10, rtol=1e-5, atol=1e-8)  # no warm-up: full from step 0
    assert torch.equal(l0, l5) and torch.equal(l0, l10) and torch.equal(l0, ln)
    assert all(torch.allclose(d0, d, rtol=1e-5, atol=1e-8) for d in (d5, d10, dn))


@pytest.mark.parametrize("adaptive", [True, False])
def test_adaptive_time_switch_decides_where_u_comes_from(adaptive):
    """adaptive_time: u (training draws, the loss's u) from the adaptive sampler, which forward
    feeds with the losses and whose F^-1 warps the sampling grid; else u uniform, the sampler
    untouched and the grid uniform. The sampler is set to put all its mass in one bin."""
    stage = make_stage(f"ldlm.adaptive_time={str(adaptive).lower()}")
    sampler = stage.time_sampler
    probs = torch.full_like(sampler.probs, 1e-12)
    probs[37] = 1.0
    sampler.probs.copy_(probs / probs.sum())

    def in_bin(u):
        return (u >= 0.37) & (u < 0.38)

    share = in_bin(stage.sample_times(2000, torch.Generator().manual_seed(5), "cpu")).float()
    assert float(share.mean()) == 1.0 if adaptive else float(share.mean()) < 0.05
    x0 = batch(stage.seq_len)
    t = ldlm_losses(stage, x0, torch.Generator().manual_seed(7), False, torch.ones(()))
    assert bool(in_bin(t["u"]).all()) == adaptive
    before = {k: v.clone() for k, v in sampler.state_dict().items()}
    stage.train()
    stage(x0, torch.Generator().manual_seed(6))
    updated = any(not torch.equal(before[k], v) for k, v in sampler.state_dict().items())
    assert updated == adaptive
    uniform = torch.linspace(1.0, 0.0, 11, dtype=torch.float64)
    assert torch.allclose(stage.time_grid(10), uniform) != adaptive


def test_sigma_dec_switch_sets_the_decoder_input_noise():
    """h_hat = D_h(z0 + sigma_dec eps_dec), eps_dec ldlm_losses' first draw, feeds L_h and L_w:
    the ablation's sigma_dec = 1 and the default 3 give those values on the same weights."""
    stages = {sigma: make_stage(f"ldlm.sigma_dec={sigma}") for sigma in (1.0, 3.0)}
    stages[3.0].load_state_dict(stages[1.0].state_dict())
    x0 = batch(stages[1.0].seq_len)
    hidden = {}
    for sigma, stage in stages.items():
        got = ldlm_losses(stage, x0, torch.Generator().manual_seed(8), False, torch.ones(()))
        eps_dec = torch.randn(got["z0"].shape, generator=torch.Generator().manual_seed(8))
        with torch.no_grad():
            h_hat = stage.hidden_decoder(stage.encode_clean(x0) + sigma * eps_dec)
            want_h = torch.nn.functional.mse_loss(h_hat, stage.features_of(x0))
            logits = stage.token_decoder(h_hat).transpose(1, 2)
            want_w = torch.nn.functional.cross_entropy(logits, x0)
        assert torch.allclose(got["hidden"], want_h, rtol=1e-5, atol=0)
        assert torch.allclose(got["token"], want_w, rtol=1e-5, atol=0)
        hidden[sigma] = float(got["hidden"].detach())
    assert abs(hidden[1.0] - hidden[3.0]) > 1e-3 * hidden[3.0]


def test_post_trained_decoder_trains_alone_on_the_frozen_ldlm(tmp_path):
    assert train(tmp_path / "ldlm", "train.max_steps=2") == 0
    argv = ["train", "ldlm_decoder", "--preset", "tiny", "--run-dir", str(tmp_path / "dec")]
    argv += ["--init-from", str(tmp_path / "ldlm"), *TINY, "train.max_steps=3"]
    assert main(argv + ["ldlm_decoder.layers=1"]) == 0
    parent, _ = load_weights(tmp_path / "ldlm", "ema")
    child = load_file(latest_checkpoint(tmp_path / "dec") / "model.safetensors")
    assert any(k.startswith("post_decoder.") for k in child)
    shared = [k for k in parent if k in child]
    assert len(shared) == len(parent)  # every parent weight and buffer carried over ...
    assert all(torch.equal(parent[k], child[k]) for k in shared)  # ... and left frozen
    out = tmp_path / "s.jsonl"
    assert main(["sample", str(tmp_path / "dec"), "--out", str(out), "--cont-steps", "2"]) == 0
    assert len(out.read_text().splitlines()) == 4


@pytest.mark.parametrize(
    ("preset", "sigma"),
    [("tiny", 1.0), ("tiny-4x", 1.0), ("cpu", 1.0), ("small", 1.0), ("paper", 3.0)],
)
def test_small_presets_use_sigma_dec_one_and_paper_keeps_the_papers_three(preset, sigma):
    """sigma_dec = 3 collapses the latent at the tiny preset's scale (RESULTS.md: every sample
    the same); the presets below `paper` use the ablation base 1, `paper` the paper's 3."""
    assert build_config(preset, [], "ldlm").ldlm.sigma_dec == sigma
