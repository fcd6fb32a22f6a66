"""The fitted time reparameterisation (`diffusion.schedule=fitted`, processes/fitted_schedule.py)
beside the tangent schedule: its map, its derivatives, its config errors, a LaDiff run with it
and the frontier's legend."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from latent_fixtures import PRIOR_SMALL, train

from diladiff.analysis.robustness import schedule_override
from diladiff.cli import main
from diladiff.config import ConfigError, build_config
from diladiff.eval.frontier import _label, run_names
from diladiff.processes.fitted_schedule import FittedSchedule
from diladiff.processes.gaussian import (
    alpha_sigma,
    alpha_sigma_derivatives,
    angle_time_grid,
    drift_rate,
    forward_transition,
    gamma_jump_time,
    log_snr,
    velocity_from_x0,
)
from diladiff.processes.tanh_fit import TanhCurve
from diladiff.runs import load_run
from diladiff.stages.latent import vp_schedule

# (a, b, c, e): the demo's near-straight fit (RESULTS.md), a steep decoder with its knee at
# s = 0.5, one with the knee far out (s = 3), one already half-way up at s = 0
FITS = [
    (0.897, 0.034, 0.155, 3.19),
    (0.5, 0.5, 5.0, 0.5),
    (0.1, 0.4, 5.0, 3.0),
    (0.2, 0.3, 3.0, -0.1),
]
T = torch.linspace(0, 1, 2001, dtype=torch.float64)


@pytest.mark.parametrize("fit", FITS)
@pytest.mark.parametrize("share", [0.1, 0.5])
def test_fitted_schedule_is_monotone_with_exact_end_points(fit, share):
    sched = FittedSchedule(*fit, angle_share=share)
    alpha, sigma = alpha_sigma(T, sched)
    assert alpha[0] == 1 and sigma[0] == 0  # t = 0: the clean latent
    assert sigma[-1] == 1 and alpha[-1] < 1e-15  # t = 1: pure noise (cos(pi / 2) = 6e-17)
    assert (alpha.diff() < 0).all() and (sigma.diff() > 0).all()
    inner = slice(1, -1)
    assert ((alpha[inner] > 0) & (alpha[inner] < 1) & (sigma[inner] > 0)).all()
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(T))


@pytest.mark.parametrize("fit", FITS)
def test_the_error_rate_along_the_schedule_is_linear_in_t_up_to_the_angle_share(fit):
    """err(s_t) = err(0) + (a + b - err(0)) (t - lambda (2 / pi) phi_t) / (1 - lambda): exactly
    (the schedule inverts T), and within lambda / (1 - lambda) of the error range of the
    straight line err(0) + t (a + b - err(0))."""
    a, b, c, e = fit
    err0, top = float(TanhCurve(*fit)(0.0)), a + b
    for share in (0.1, 0.01):
        sched = FittedSchedule(*fit, angle_share=share)
        curve = sched.curve
        phi = sched.angle(T)
        err = curve(torch.tan(phi[:-1]))  # s_t = sigma_t / alpha_t (t = 1: s infinite)
        t = T[:-1]
        exact = err0 + (top - err0) * (t - share * 2 / math.pi * phi[:-1]) / (1 - share)
        assert torch.allclose(err, exact, atol=1e-9 * (top - err0), rtol=0)
        line = err0 + t * (top - err0)
        assert (err - line).abs().max() <= share / (1 - share) * (top - err0) + 1e-12
    # a share of 1 is the uniform-angle schedule: the tangent schedule with d = 1
    uniform = FittedSchedule(*fit, angle_share=1.0)
    for x, y in zip(alpha_sigma(T, uniform), alpha_sigma(T, 1.0), strict=True):
        assert torch.allclose(x, y, atol=1e-12)


@pytest.mark.parametrize("fit", FITS)
def test_fitted_schedule_derivatives(fit):
    """phi'_t matches finite differences, stays below pi / (2 lambda) (finite at both ends);
    beta and log-SNR follow the angle."""
    sched = FittedSchedule(*fit, angle_share=0.1)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    h = 1e-6
    da, ds = alpha_sigma_derivatives(t, sched)
    up, down = alpha_sigma(t + h, sched), alpha_sigma(t - h, sched)
    assert torch.allclose(da, (up[0] - down[0]) / (2 * h), rtol=1e-5, atol=1e-7)
    assert torch.allclose(ds, (up[1] - down[1]) / (2 * h), rtol=1e-5, atol=1e-7)
    rate = sched.angle_rate(T)
    assert torch.isfinite(rate).all() and rate.max() <= math.pi / (2 * 0.1) + 1e-9
    alpha, sigma = alpha_sigma(t, sched)
    fd = -(torch.log(up[0] ** 2) - torch.log(down[0] ** 2)) / (2 * h)
    assert torch.allclose(drift_rate(t, sched), fd, rtol=1e-5)
    assert torch.allclose(log_snr(t, sched), torch.log(alpha**2 / sigma**2))


def test_fitted_schedule_forward_mode_derivative_is_exact():
    """MeanFlow's loss differentiates the velocity through the schedule with torch.func.jvp:
    the first and second t-derivatives of the angle come out right."""
    sched = FittedSchedule(0.5, 0.5, 5.0, 0.5)
    t = torch.tensor([0.05, 0.4, 0.8, 0.97], dtype=torch.float64)
    z_t, z_hat = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)

    def v(tt):
        return velocity_from_x0(z_t, z_hat, tt, sched)

    _, dv = torch.func.jvp(v, (t,), (torch.ones_like(t),))
    h = 1e-6
    assert torch.allclose(dv, (v(t + h) - v(t - h)) / (2 * h), rtol=1e-5, atol=1e-6)


def test_fitted_schedule_angle_grid_and_gamma_jump():
    sched = FittedSchedule(0.5, 0.5, 5.0, 0.5)
    grid = angle_time_grid(8, sched)
    assert grid[0] == 1 and grid[-1] == 0 and (grid.diff() < 0).all()
    alpha, _ = alpha_sigma(grid, sched)
    turned = torch.acos(alpha.clamp(-1, 1)).diff()
    assert torch.allclose(turned, turned[:1].expand_as(turned), atol=1e-9)  # equal angles
    for r, gamma in ((0.6, 0.5), (0.3, 0.9), (1.0, 0.5)):
        s = gamma_jump_time(r, gamma, sched)
        nsr = lambda u: float(sched.noise_to_signal(torch.tensor(u, dtype=torch.float64)))  # noqa: E731
        if r < 1:
            assert math.isclose(nsr(s), math.sqrt(1 - gamma**2) * nsr(r), rel_tol=1e-9)
            _, std = forward_transition(s, r, sched)  # the fresh share of the noise at r
            sigma_r = float(alpha_sigma(torch.tensor(r, dtype=torch.float64), sched)[1])
            assert math.isclose(std**2, gamma**2 * sigma_r**2, rel_tol=1e-6)
        else:
            assert s == 1.0  # from pure noise, the jump stays there
    assert gamma_jump_time(0.6, 0.0, sched) == 0.6 and gamma_jump_time(0.6, 1.0, sched) == 0.0


def _diffusion(**kw):
    cfg = build_config("tiny", [f"diffusion.{k}={v}" for k, v in kw.items()], stage="ladiff")
    return cfg.diffusion


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"schedule": "fitted"}, "needs diffusion.fitted_tanh"),
        ({"schedule": "fitted", "fitted_tanh": "0.5,0.5,5"}, "four numbers"),
        ({"schedule": "fitted", "fitted_tanh": "0.5,x,5,1"}, "four numbers"),
        ({"schedule": "fitted", "fitted_tanh": "0.5,-0.5,5,1"}, "must rise with the noise"),
        ({"schedule": "fitted", "fitted_tanh": "0.5,0.5,0,1"}, "must rise with the noise"),
        ({"schedule": "fitted", "fitted_tanh": "0.5,0.5,5,nan"}, "finite"),
        ({"schedule": "fitted", "fitted_tanh": "0.9,0.1,10,-3"}, "already at its maximum"),
        (
            {"schedule": "fitted", "fitted_tanh": "0.5,0.5,5,1", "fitted_angle_share": 0},
            "angle share must be in (0, 1]",
        ),
        ({"schedule": "cosine"}, "must be one of"),
    ],
)
def test_schedule_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("]", r"\]")) as exc:
        vp_schedule(_diffusion(**overrides))
    assert "\n" not in str(exc.value)


def test_schedules_from_config_and_the_robustness_override():
    assert vp_schedule(_diffusion(d=5)) == 5.0  # the tangent schedule: its warping d
    fake = SimpleNamespace(d=3.0)  # a config without the key (test fakes, older sections)
    assert vp_schedule(fake) == 3.0
    curve = TanhCurve(0.897, 0.034, 0.155, 3.19)
    override = schedule_override(curve)
    assert override.startswith("diffusion.schedule=fitted diffusion.fitted_tanh=")
    cfg = build_config("tiny", override.split(), stage="ladiff")
    sched = vp_schedule(cfg.diffusion)
    assert isinstance(sched, FittedSchedule)
    assert (sched.a, sched.b, sched.c, sched.e) == pytest.approx((0.897, 0.034, 0.155, 3.19))
    assert vp_schedule(cfg.diffusion) is sched  # built once per parameters


@pytest.fixture(scope="module")
def chain(latent_chain):
    return latent_chain


def test_ladiff_trains_and_samples_with_the_fitted_schedule(chain, tmp_path):
    run = tmp_path / "fitted"
    fit = ["diffusion.schedule=fitted", "diffusion.fitted_tanh=0.5,0.4,2.0,1.5"]
    assert (
        train("ladiff", run, "--autoencoder", chain["ae"], *PRIOR_SMALL, *fit, "train.max_steps=3")
        == 0
    )
    cfg = json.loads((run / "config.json").read_text())["diffusion"]
    assert cfg["schedule"] == "fitted" and cfg["fitted_tanh"] == "0.5,0.4,2.0,1.5"
    stage, _ = load_run(run)
    assert isinstance(stage.schedule, FittedSchedule) and stage.schedule.c == 2.0
    out = tmp_path / "s.jsonl"
    args = ["sample", str(run), "--num-samples", "2", "--cont-steps", "4", "--disc-steps", "4"]
    assert main([*args, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["text"] for r in rows)
    assert json.loads((tmp_path / "s.jsonl.meta.json").read_text())["cont_nfe"] == 4
    # the frontier tells the two schedules apart, and two runs named alike apart
    tangent, _ = load_run(chain["ladiff"])
    assert _label("ladiff", tangent) == "ladiff (ladiff, tangent d=10)"
    assert _label("fitted", stage) == "fitted (ladiff, fitted)"
    assert run_names(["runs/a/ladiff", "runs/b/ladiff", "runs/c"]) == [
        "a_ladiff",
        "b_ladiff",
        "c",
    ]
