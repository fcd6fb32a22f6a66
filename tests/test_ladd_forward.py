"""Co-LADD's and Di-LADD's training forward on a tiny MM-DiT, with the network's inputs and
outputs recorded: latent dropout, shared or independent latent times, and the latent loss
weight (the total is L_x + lambda_z L_z (+ L_VQ), the terms recomputed from what the network
saw and returned)."""

import copy

import pytest
import torch
from conftest import TINY
from test_ladd import SMALL as LADD_SMALL

from diladiff.config import build_config
from diladiff.data.tokenizer import load_tokenizer, tokenizer_identity
from diladiff.methods.ladd import stage as ladd
from diladiff.methods.ladd.stage import CoLADD, DiLADD
from diladiff.processes.gaussian import sqrt_alpha_sigma
from diladiff.processes.masking import mask_tokens, subs_logits

# No network dropout (its draws come from the global RNG) and no encoder-input dropout, so that
# z0 is the encoder's latent of the clean rows and forward's draws can be replayed.
SMALL = [*LADD_SMALL, "ladd.dropout=0.0", "ladd.input_dropout_max=0.0"]
B = 16


def make(kind: str, *overrides: str):
    cfg = build_config("tiny", TINY + SMALL + list(overrides), kind)
    cls = CoLADD if kind == "co-ladd" else DiLADD
    stage = cls(cfg, tokenizer_identity(load_tokenizer(cfg.data.tokenizer))).train()
    # The MM-DiT's zero-initialised gates and heads would make its outputs constant (z_hat = 0,
    # flat logits), so that a loss over the wrong rows or positions could still match: random
    # values make the outputs depend on the inputs.
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in stage.net.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return stage


def rows(stage) -> torch.Tensor:
    return torch.randint(1000, 2000, (B, stage.seq_len), generator=torch.Generator().manual_seed(0))


def run(stage, x0, seed: int):
    """forward on x0 with a generator seeded `seed`: (loss, metrics, the network's inputs
    (x_t, z_in, t_z) and outputs (token logits, latent output))."""
    seen = {}

    def hook(module, args, out):
        seen["args"], seen["out"] = args, out

    handle = stage.net.register_forward_hook(hook)
    try:
        loss, metrics = stage(x0, torch.Generator().manual_seed(seed))
    finally:
        handle.remove()
    return loss, metrics, seen["args"], seen["out"]


def co_ladd_draws(stage, x0, seed: int):
    """Co-LADD.forward's draws replayed in its documented order: t, the token mask, [t_z], eps,
    the latent-dropout coins (no input-dropout coins with input_dropout_max = 0)."""
    lc = stage.cfg.ladd
    g = torch.Generator().manual_seed(seed)
    t = stage.times(B, g, x0.device)
    x_t = mask_tokens(x0, t, stage.mask_id, g)
    t_z = stage.times(B, g, x0.device) if lc.independent_times else t
    eps = torch.randn((B, *stage.latent_shape), generator=g)
    drop = torch.rand(B, generator=g) < lc.latent_dropout
    return t, x_t, t_z, eps, drop


def token_loss(logits, x0, x_t, mask_id):
    """L_x = (1 / B L) sum over masked positions of -log p_SUBS(x0)."""
    sel = x_t == mask_id
    logp = subs_logits(logits[sel].detach().clone(), mask_id).log_softmax(-1)
    return -logp.gather(-1, x0[sel].unsqueeze(-1)).sum() / x0.numel()


# ---------------------------------------------------------------------------- Co-LADD
def test_co_ladd_latent_dropout_zeroes_the_dropped_rows_and_leaves_them_out_of_the_loss():
    """Training: the rows whose coin falls below p_tau read z_t = 0 and are left out of L_z =
    mean over kept rows of (z_hat - z0)^2; the others read a_t z0 + s_t eps. Eval: no dropout."""
    stage = make("co-ladd", "ladd.latent_dropout=0.5")
    x0 = rows(stage)
    _, metrics, (x_t, z_t, t_z), (_, z_hat) = run(stage, x0, seed=1)
    t, want_x_t, want_t_z, eps, drop = co_ladd_draws(stage, x0, seed=1)
    assert 0 < int(drop.sum()) < B  # both kinds of rows in the batch
    assert torch.equal(x_t, want_x_t) and torch.equal(t_z, want_t_z)
    with torch.no_grad():
        z0 = stage.encoder(x0)
    a, s = sqrt_alpha_sigma(t_z, stage.cfg.ladd.t_eps)
    noisy = a.view(-1, 1, 1) * z0 + s.view(-1, 1, 1) * eps
    assert (z_t[drop] == 0).all()
    assert torch.allclose(z_t[~drop], noisy[~drop], rtol=1e-5, atol=1e-6)
    kept = ((z_hat[~drop].detach() - z0[~drop]) ** 2).mean()
    assert torch.allclose(metrics["loss_z"], kept, rtol=1e-5, atol=0)
    all_rows = ((z_hat.detach() - z0 * (~drop).view(-1, 1, 1)) ** 2).mean()
    assert not torch.allclose(metrics["loss_z"], all_rows, rtol=1e-3, atol=0)
    # eval: the same draws, no row dropped
    stage.eval()
    _, metrics, (_, z_t, _), (_, z_hat) = run(stage, x0, seed=1)
    assert torch.allclose(z_t, noisy, rtol=1e-5, atol=1e-6)
    assert torch.allclose(metrics["loss_z"], ((z_hat - z0) ** 2).mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("independent", [False, True])
def test_co_ladd_latent_time_is_the_token_time_unless_independent(independent):
    """ladd.independent_times = false: the network's t_z and the latent's noise level are the
    token channel's t; true: a second draw t_z, different from t, sets both."""
    stage = make("co-ladd", f"ladd.independent_times={str(independent).lower()}")
    x0 = rows(stage)
    _, _, (x_t, z_t, t_z), _ = run(stage, x0, seed=2)
    t, want_x_t, want_t_z, eps, drop = co_ladd_draws(stage, x0, seed=2)
    assert torch.equal(x_t, want_x_t)  # the tokens masked at t
    assert torch.equal(t_z, want_t_z)
    if independent:
        assert ((t_z - t).abs() > 1e-3).all()
    else:
        assert torch.equal(t_z, t)
    with torch.no_grad():
        z0 = stage.encoder(x0)
    a, s = sqrt_alpha_sigma(want_t_z, stage.cfg.ladd.t_eps)
    noisy = (a.view(-1, 1, 1) * z0 + s.view(-1, 1, 1) * eps) * (~drop).view(-1, 1, 1)
    assert torch.allclose(z_t, noisy, rtol=1e-5, atol=1e-6)


def test_co_ladd_total_is_token_loss_plus_lambda_z_times_latent_loss():
    """L = L_x + lambda_z L_z with both terms recomputed from the network's inputs and outputs;
    changing lambda_z (same weights, same draws) changes the total by exactly the change in
    lambda_z times L_z and leaves both terms alone."""
    one = make("co-ladd", "ladd.lambda_z=1.0")
    other = make("co-ladd", "ladd.lambda_z=2.5")
    other.load_state_dict(one.state_dict())
    x0 = rows(one)
    loss1, m1, (x_t, _, _), (logits, z_hat) = run(one, x0, seed=3)
    loss2, m2, _, _ = run(other, x0, seed=3)
    *_, drop = co_ladd_draws(one, x0, seed=3)
    with torch.no_grad():
        z0 = one.encoder(x0)
    want_x = token_loss(logits, x0, x_t, one.mask_id)
    want_z = ((z_hat[~drop].detach() - z0[~drop]) ** 2).mean()
    assert torch.allclose(m1["loss_x"], want_x, rtol=1e-5, atol=0)
    assert torch.allclose(m1["loss_z"], want_z, rtol=1e-5, atol=0)
    assert torch.allclose(loss1, want_x + 1.0 * want_z, rtol=1e-5, atol=0)
    assert torch.equal(m1["loss_x"], m2["loss_x"]) and torch.equal(m1["loss_z"], m2["loss_z"])
    assert torch.allclose(loss2, m2["loss_x"] + 2.5 * m2["loss_z"], rtol=1e-6, atol=0)
    assert torch.allclose(loss2 - loss1, 1.5 * m1["loss_z"], rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------- Di-LADD
def test_di_ladd_masks_the_codes_at_their_own_time(monkeypatch):
    """Di-LADD draws t_z independently of t_x: the second mask_tokens call (the codes) gets a
    different time, and its masked codes are the ones the network reads as the mask vector."""
    stage = make("di-ladd")
    calls = []

    def recording(x0, t, mask_id, generator=None):
        out = mask_tokens(x0, t, mask_id, generator)
        calls.append((t.clone(), mask_id, out))
        return out

    monkeypatch.setattr(ladd, "mask_tokens", recording)
    with torch.no_grad():
        stage.vq.z_mask.fill_(7.0)  # the mask code's vector, told apart from unit codebook rows
    x0 = rows(stage)
    _, _, (x_t, z_in, t_z), _ = run(stage, x0, seed=4)
    (t_x, tok_mask, tok_out), (t_c, code_mask, codes_t) = calls
    assert tok_mask == stage.mask_id and code_mask == stage.code_mask_id
    assert torch.equal(x_t, tok_out) and t_z is None
    assert ((t_c - t_x).abs() > 1e-3).all()
    masked = codes_t == stage.code_mask_id
    assert masked.any() and (~masked).any()
    assert (z_in[masked] == 7.0).all() and (z_in[~masked] != 7.0).all()


@pytest.mark.parametrize("step", [0, 10])
def test_di_ladd_total_is_token_loss_plus_lambda_z_times_code_loss_plus_vq(step):
    """L = L_x + lambda_z L_z + L_VQ, lambda_z = 0 before ladd.stage1_steps (here 5); from the
    same VQ state and draws, changing lambda_z changes the total by exactly that change times L_z
    (and not at all during stage one)."""
    one = make("di-ladd", "ladd.lambda_z=1.0", "ladd.stage1_steps=5")
    other = make("di-ladd", "ladd.lambda_z=3.0", "ladd.stage1_steps=5")
    one.on_step(step)
    other.on_step(step)
    state = copy.deepcopy(one.state_dict())  # before the VQ's k-means and EMA update
    other.load_state_dict(state)
    x0 = rows(one)
    loss1, m1, (x_t, _, _), (logits, logits_z) = run(one, x0, seed=5)
    loss2, m2, _, _ = run(other, x0, seed=5)
    for k in ("loss_x", "loss_z", "vq_loss"):
        assert torch.equal(m1[k], m2[k]), k
    assert torch.allclose(m1["loss_x"], token_loss(logits, x0, x_t, one.mask_id), rtol=1e-5)
    assert float(m1["loss_z"]) > 0.1 and float(m1["vq_loss"]) > 0
    w1, w2 = (1.0, 3.0) if step >= 5 else (0.0, 0.0)
    for loss, m, w in ((loss1, m1, w1), (loss2, m2, w2)):
        assert torch.allclose(loss, m["loss_x"] + w * m["loss_z"] + m["vq_loss"], rtol=1e-6)
    assert torch.allclose(loss2 - loss1, (w2 - w1) * m1["loss_z"], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- token bound
@pytest.mark.parametrize("kind", ["co-ladd", "di-ladd"])
def test_held_out_forward_reports_the_one_over_t_token_bound(kind):
    """Eval mode: forward adds token_nll_bound, recomputed from the network's inputs and logits
    with the token channel's own time (Co-LADD with independent times: t, not t_z; Di-LADD:
    t_x, the first draw) as the per-row weight 1/t; it differs from the weight-1 loss_x. In
    training mode the metric is absent (the training path is unchanged). evaluate reports it
    and its exp as val_token_nll_bound and val_token_ppl_bound."""
    import math

    extra = ["ladd.independent_times=true"] if kind == "co-ladd" else []
    stage = make(kind, *extra)
    x0 = rows(stage)
    _, train_metrics, _, _ = run(stage, x0, seed=6)
    assert "token_nll_bound" not in train_metrics
    stage.eval()
    _, metrics, (x_t, _, _), (logits, _) = run(stage, x0, seed=6)
    t = stage.times(B, torch.Generator().manual_seed(6), x0.device)  # forward's first draw
    sel = x_t == stage.mask_id
    logp = subs_logits(logits.detach().clone(), stage.mask_id).log_softmax(-1)
    nll = -logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1) * sel
    want = (nll.sum(1) / (t * stage.seq_len)).mean()
    assert torch.allclose(metrics["token_nll_bound"], want, rtol=1e-5)
    assert torch.allclose(metrics["loss_x"], nll.sum() / x0.numel(), rtol=1e-5)
    assert float(metrics["token_nll_bound"]) > 1.05 * float(metrics["loss_x"])
    val = stage.evaluate([x0], torch.Generator().manual_seed(6))
    assert val["val_token_nll_bound"] == pytest.approx(float(want), rel=1e-5)
    assert val["val_token_ppl_bound"] == pytest.approx(math.exp(float(want)), rel=1e-5)
