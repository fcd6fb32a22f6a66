"""LADD compute accounting (eval/compute.py): the per-call formula against the paper's Table 12
figures, sample totals, and iso-compute interpolation that never extrapolates."""

from __future__ import annotations

import pytest

from diladiff.eval.compute import (
    gflops_per_call,
    interpolate_at_budget,
    ladd_joint_gflops,
    ladd_sequential_gflops,
    mdlm_gflops,
    network_calls,
)

# (blocks, width, L_eff, per-step GFLOPs as printed in the paper)
PAPER = [
    pytest.param(13, 1024, 128, 21.37, id="LM1B-MDLM"),
    pytest.param(12, 768, 128 + 128, 22.95, id="LM1B-LADD-128"),
    pytest.param(12, 768, 128 + 32, 14.06, id="LM1B-LADD-32"),
    pytest.param(13, 1024, 512, 90.73, id="OWT-MDLM"),
    pytest.param(12, 768, 512 + 64, 55.04, id="OWT-LADD-64"),
    pytest.param(12, 768, 512 + 16, 49.98, id="OWT-LADD-16"),
]


@pytest.mark.parametrize(("blocks", "width", "l_eff", "paper"), PAPER)
def test_per_call_formula_reproduces_the_paper(blocks, width, l_eff, paper):
    assert round(gflops_per_call(blocks, width, l_eff), 2) == paper


def test_sample_totals():
    per = gflops_per_call
    assert network_calls(8) == 9 and network_calls(8, noise_removal=False) == 8
    assert mdlm_gflops(9, 13, 1024, 128) == pytest.approx(9 * per(13, 1024, 128))
    assert ladd_joint_gflops(9, 12, 768, 128, 32) == pytest.approx(9 * per(12, 768, 160))
    seq = ladd_sequential_gflops(8, 5, 12, 768, 128, 32)
    assert seq == pytest.approx(8 * per(12, 768, 32) + 5 * per(12, 768, 160))
    assert ladd_sequential_gflops(0, 5, 12, 768, 128, 32) == ladd_joint_gflops(5, 12, 768, 128, 32)
    with pytest.raises(ValueError):
        network_calls(-1)


def test_interpolation_inside_and_outside_the_measured_range():
    points = [(400.0, 10.0), (100.0, 40.0), (200.0, 20.0)]  # any order
    got = interpolate_at_budget(points, [50, 100, 150, 200, 300, 400, 401])
    assert got == [None, 40.0, 30.0, 20.0, 15.0, 10.0, None]
    assert interpolate_at_budget([], [1.0]) == [None]
    assert interpolate_at_budget([(5.0, 1.0)], [5.0, 6.0]) == [1.0, None]
    with pytest.raises(ValueError):
        interpolate_at_budget([(1.0, 2.0), (1.0, 3.0)], [1.0])
