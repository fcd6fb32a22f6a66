import math

import pytest
import torch

from diladiff.processes.masking import reverse_posterior
from diladiff.sampling.masked import (
    SamplerSettings,
    gumbel_argmax,
    reveal_ancestral,
    sample_masked,
    top_p_filter,
)

V, MASK, L = 6, 6, 12  # tokens 0..5, mask id 6 (logit slot 6 is -inf)


def make_denoiser(seed=0):
    """A fixed random 'network' over a vocabulary of 7 (mask included) that depends on x."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V + 1, L, V + 1, generator=g)
    calls = {"n": 0}

    def denoise(x):
        calls["n"] += 1
        logits = table[x, torch.arange(x.shape[1])] + 0.3 * (x != MASK).sum(
            1, keepdim=True
        ).unsqueeze(-1)
        logits[..., MASK] = -math.inf
        return logits.log_softmax(-1)

    return denoise, calls


def test_ancestral_step_matches_the_reverse_posterior():
    probs = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0])
    logits = probs.log().expand(200_000, 1, V + 1).clone()
    masked = torch.ones(200_000, 1, dtype=torch.bool)
    settings = SamplerSettings(steps=4)
    reveal, tokens = reveal_ancestral(
        logits, masked, 0.75, 0.5, settings, torch.Generator().manual_seed(0)
    )
    outcome = torch.where(reveal, tokens, torch.full_like(tokens, V)).ravel()
    freq = torch.bincount(outcome, minlength=V + 1).double() / outcome.numel()
    expected = reverse_posterior(probs[:V].double(), 0.75, 0.5)
    assert torch.allclose(freq, expected, atol=4e-3)


@pytest.mark.parametrize("strategy", ["ancestral", "topk"])
def test_no_mask_remains_and_revealed_tokens_never_change(strategy):
    denoise, _ = make_denoiser()
    history = []

    def recording(x):
        history.append(x.clone())
        return denoise(x)

    settings = SamplerSettings(steps=5, strategy=strategy, cache=False)
    x, stats = sample_masked(recording, 16, L, MASK, settings, torch.Generator().manual_seed(1))
    assert (x != MASK).all() and x.max() < V
    history.append(x)
    for before, after in zip(history, history[1:], strict=False):
        fixed = before != MASK
        assert torch.equal(after[fixed], before[fixed])


def test_cached_and_uncached_sampling_are_identical_and_cache_saves_calls():
    denoise, calls = make_denoiser()
    out = {}
    for cache in (True, False):
        calls["n"] = 0
        settings = SamplerSettings(steps=48, cache=cache)
        x, stats = sample_masked(denoise, 2, L, MASK, settings, torch.Generator().manual_seed(7))
        out[cache] = (x, stats.nfe, calls["n"])
    assert torch.equal(out[True][0], out[False][0])
    assert out[True][1] == out[True][2] < out[False][2]


def test_topk_unmasks_exactly_k_per_step():
    denoise, _ = make_denoiser()
    masks = []

    def recording(x):
        masks.append((x == MASK).sum(1))
        return denoise(x)

    settings = SamplerSettings(steps=4, strategy="topk", cache=False)
    x, _ = sample_masked(recording, 3, L, MASK, settings, torch.Generator().manual_seed(0))
    masks.append((x == MASK).sum(1))
    revealed = [(a - b).tolist() for a, b in zip(masks, masks[1:], strict=False)]
    assert revealed == [[L // 4] * 3] * 4


def test_topk_reveals_the_most_confident_positions():
    logits = torch.full((1, 4, V + 1), -math.inf)
    logits[0, :, 0] = 0.0  # certain at every position ...
    logits[0, 1, :V] = 0.0  # ... except position 1 (uniform)
    settings = SamplerSettings(steps=4, strategy="topk")
    from diladiff.sampling.masked import reveal_topk

    masked = torch.ones(1, 4, dtype=torch.bool)
    reveal, _ = reveal_topk(logits, masked, 1.0, 0.25, settings, torch.Generator().manual_seed(0))
    assert reveal.tolist() == [[True, False, True, True]]


def test_same_seed_same_samples_different_seed_different_samples():
    denoise, _ = make_denoiser()
    s = SamplerSettings(steps=6)
    a, _ = sample_masked(denoise, 8, L, MASK, s, torch.Generator().manual_seed(3))
    b, _ = sample_masked(denoise, 8, L, MASK, s, torch.Generator().manual_seed(3))
    c, _ = sample_masked(denoise, 8, L, MASK, s, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_p_keeps_the_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = top_p_filter(logits, 0.7).isfinite().tolist()
    assert kept == [[True, True, False, False]]
    assert top_p_filter(logits, 0.01).isfinite().sum() == 1


def test_gumbel_argmax_draws_from_the_softmax():
    p = torch.tensor([0.7, 0.2, 0.1])
    draws = gumbel_argmax(p.log().expand(100_000, 3), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).double() / 100_000
    assert torch.allclose(freq, p.double(), atol=5e-3)


def test_near_zero_temperature_samples_the_mode_whatever_the_seed():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(L, V + 1, generator=g)
    table[:, MASK] = -math.inf

    def denoise(x):  # independent of x: the per-position mode is the only sample at T -> 0
        return table.log_softmax(-1).expand(x.shape[0], L, V + 1)

    cold = SamplerSettings(steps=4, temperature=1e-4)
    for seed in range(3):
        x, _ = sample_masked(denoise, 5, L, MASK, cold, torch.Generator().manual_seed(seed))
        assert torch.equal(x, table.argmax(-1).expand(5, L))


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown strategy"):
        SamplerSettings(steps=4, strategy="nope")
    with pytest.raises(ValueError, match="temperature"):
        SamplerSettings(steps=4, temperature=0)
