import math

import torch

from diladiff.config import build_config
from diladiff.data.tokenizer import load_tokenizer, tokenizer_identity
from diladiff.methods.mdlm.stage import MDLM
from diladiff.processes.masking import subs_log_probs
from diladiff.train.distributed import weights_digest


def tiny_mdlm(**over):
    cfg = build_config(
        "tiny",
        [
            "model.depth=1",
            "model.width=32",
            "model.heads=2",
            "data.seq_len=16",
            *[f"{k}={v}" for k, v in over.items()],
        ],
    )
    torch.manual_seed(0)
    return MDLM(cfg, tokenizer_identity(load_tokenizer("minilm-l6")))


def test_subs_zeroes_the_mask_and_copies_unmasked_tokens():
    logits = torch.randn(2, 5, 8)
    x_t = torch.tensor([[7, 1, 7, 3, 7], [0, 7, 7, 7, 2]])
    logp = subs_log_probs(logits, x_t, mask_id=7)
    assert torch.isneginf(logp[..., 7]).all()
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, 5))
    keep = x_t != 7
    assert (logp[keep].argmax(-1) == x_t[keep]).all()
    assert torch.allclose(logp[keep].exp().max(-1).values, torch.ones(int(keep.sum())))


def test_loss_only_counts_masked_positions_and_uses_the_weight():
    model = tiny_mdlm()
    x0 = torch.randint(1000, 2000, (4, 16))
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    t = torch.full((4,), 0.5)
    const = model.loss(x0, t, torch.ones(4), g())
    elbo = model.loss(x0, t, 1 / t, g())
    assert torch.allclose(elbo, 2 * const)
    # Direct computation from full SUBS log-probs at the same masked input.
    from diladiff.processes.masking import mask_tokens

    x_t = mask_tokens(x0, t, model.mask_id, g())
    logp = model.log_probs(x_t)
    nll = -logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    direct = (nll * (x_t == model.mask_id)).sum() / x0.numel()
    assert torch.allclose(const, direct, atol=1e-5)


def test_loss_is_finite_and_decreases_with_training():
    model = tiny_mdlm(**{"mdlm.loss_weight": "elbo"})
    x0 = torch.randint(1000, 1010, (16, 16))  # a very predictable "language"
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        loss, _ = model(x0, torch.Generator().manual_seed(step))
        assert math.isfinite(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


def test_nll_bound_of_a_uniform_model_is_log_vocab():
    model = tiny_mdlm()
    for p in model.net.head.parameters():  # logits all equal: p = 1 / (V - 1) (mask excluded)
        torch.nn.init.zeros_(p)
    x0 = torch.randint(1000, 2000, (8, 16))
    bound = model.nll_bound(x0, torch.Generator().manual_seed(0), samples=64).item()
    # E_t[(1/t) * (#masked) * log(V-1)] / L = log(V-1) exactly in expectation.
    assert abs(bound - math.log(model.net.vocab_size - 1)) < 0.05 * math.log(model.net.vocab_size)


def test_weights_digest_detects_any_change():
    a, b = tiny_mdlm(), tiny_mdlm()
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.net.head.bias[0] += 1e-7
    assert weights_digest(a) != weights_digest(b)
