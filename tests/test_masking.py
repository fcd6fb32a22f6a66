import torch

from diladiff.processes.masking import (
    elbo_weight,
    mask_exactly,
    mask_tokens,
    reverse_posterior,
    sample_times,
    unmask_probability,
)


def test_antithetic_times_cover_the_unit_interval_evenly():
    g = torch.Generator().manual_seed(0)
    t = sample_times(8, g, antithetic=True, eps=0.0)
    gaps = t.sort().values.diff()
    assert torch.allclose(gaps, torch.full_like(gaps, 1 / 8), atol=1e-6)
    assert ((t >= 0) & (t <= 1)).all()
    assert (sample_times(1000, g, eps=0.01) >= 0.01).all()


def test_mask_rate_equals_one_minus_alpha():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 50, (4, 20000), generator=g)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    x_t = mask_tokens(x0, t, mask_id=99, generator=g)
    rate = (x_t == 99).float().mean(dim=1)
    assert torch.allclose(rate, t, atol=0.015)
    assert torch.equal(x_t[x_t != 99], x0[x_t != 99])  # unmasked tokens are clean


def test_mask_exactly_masks_the_requested_count():
    x0 = torch.randint(0, 50, (5, 32))
    counts = torch.tensor([1, 5, 16, 31, 32])
    x_t = mask_exactly(x0, counts, 99, torch.Generator().manual_seed(0))
    assert (x_t == 99).sum(dim=1).tolist() == counts.tolist()


def test_elbo_weight_and_unmask_probability_for_linear_schedule():
    t = torch.tensor([0.25, 0.5, 1.0])
    assert torch.allclose(elbo_weight(t), 1 / t)
    assert abs(unmask_probability(0.8, 0.6) - 0.25) < 1e-12
    assert unmask_probability(0.5, 0.0) == 1.0


def test_reverse_posterior_is_a_distribution():
    probs = torch.rand(3, 7, 11).softmax(-1)
    for t, s in [(1.0, 0.9), (0.5, 0.25), (0.1, 0.0)]:
        post = reverse_posterior(probs, t, s)
        assert post.shape == (3, 7, 12)
        assert torch.allclose(post.sum(-1), torch.ones(3, 7), atol=1e-6)
        assert (post >= 0).all()
        assert torch.allclose(post[..., -1], torch.full((3, 7), s / t))
