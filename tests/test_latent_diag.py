"""Latent-prior diagnostics (eval/latent_diag.py) on hand-made cases."""

import numpy as np
import pytest
import torch

from diladiff.eval.latent_diag import (
    frechet_distance,
    latent_frechet_distance,
    mean_square_norm,
    memorisation,
    moment_mismatch,
    nearest_neighbour_distances,
)


def gaussian(n, d, seed, scale=1.0):
    return scale * torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).double()


def test_frechet_is_zero_for_identical_sets_and_the_squared_shift_for_a_shifted_copy():
    a = gaussian(200, 6, 0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-9)


def test_frechet_of_two_samples_of_one_gaussian_is_near_zero():
    assert frechet_distance(gaussian(20000, 4, 0), gaussian(20000, 4, 1)) < 0.01


def test_frechet_matches_the_matrix_square_root_formula():
    """The nuclear-norm form equals ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))."""
    from scipy.linalg import sqrtm

    a = gaussian(50, 5, 2) @ torch.randn(5, 5, generator=torch.Generator().manual_seed(3)).double()
    b = gaussian(70, 5, 4, scale=0.5) + 1.0
    sa, sb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    mu = (a.double().mean(0) - b.double().mean(0)).square().sum().item()
    expect = mu + np.trace(sa + sb - 2 * sqrtm(sa @ sb).real)
    assert frechet_distance(a, b) == pytest.approx(expect, rel=1e-6)
    # a scale change s: Tr(S + s^2 S - 2 s S) = (1 - s)^2 Tr S, plus the moved mean
    z = gaussian(500, 3, 5)
    expect = 4 * float(z.var(0).sum()) + float((2 * z.mean(0)).square().sum())
    assert frechet_distance(z, 3 * z) == pytest.approx(expect, rel=1e-9)


def test_frechet_works_with_more_dimensions_than_samples():
    a = gaussian(10, 64, 0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + 0.5) == pytest.approx(64 * 0.25, rel=1e-9)


def test_latent_frechet_averages_over_latent_vectors():
    z = torch.randn(300, 4, 3, generator=torch.Generator().manual_seed(0)).double()
    shifted = z.clone()
    shifted[:, 1] += 2.0  # one of four vectors shifted by ||(2, 2, 2)||^2 = 12
    assert latent_frechet_distance(z, shifted) == pytest.approx(12 / 4, rel=1e-9)
    with pytest.raises(ValueError):
        latent_frechet_distance(z, z.reshape(300, 12))


def test_moment_mismatch_by_hand():
    ref = gaussian(400, 8, 0)
    same = moment_mismatch(ref, ref)
    assert same["mean_abs_mean_diff"] == 0 and same["mean_abs_log_sd_ratio"] == 0
    moved = moment_mismatch(2 * ref + 0.3, ref)
    assert moved["mean_abs_log_sd_ratio"] == pytest.approx(np.log(2), rel=1e-9)
    expect = float((ref.double().mean(0) + 0.3).abs().mean())  # mean(2x + .3) - mean(x)
    assert moved["mean_abs_mean_diff"] == pytest.approx(expect, rel=1e-9)


def test_memorisation_ratio_small_for_copies_and_near_one_for_fresh_draws():
    train, heldout = gaussian(500, 10, 0), gaussian(100, 10, 1)
    copies = train[:100] + 1e-3 * gaussian(100, 10, 2)
    assert memorisation(copies, train, heldout)["nn_ratio"] < 0.01
    fresh = memorisation(gaussian(100, 10, 3), train, heldout)
    assert fresh["nn_ratio"] == pytest.approx(1.0, abs=0.1)
    assert fresh["nn_dist_heldout"] > 0


def test_nearest_neighbour_distances_by_hand():
    ref = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    q = torch.tensor([[0.0, 1.0], [3.0, 3.0], [6.0, 8.0]])
    assert nearest_neighbour_distances(q, ref, chunk=2).tolist() == pytest.approx([1, 1, 5])


def test_mean_square_norm_is_per_coordinate():
    assert mean_square_norm(torch.full((3, 2, 4), 2.0)) == pytest.approx(4.0)
    assert mean_square_norm(gaussian(20000, 5, 0)) == pytest.approx(1.0, abs=0.03)
