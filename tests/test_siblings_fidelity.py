"""LDLM, LADD and DUO as their authors run them (issue 28): sequential Co-LADD only for a run
trained for it, Di-LADD's codes on their own untempered grid, an Euler-Maruyama step stable on
any time grid, LADD refusing a latent schedule it does not use, DUO warning when a run stops
inside its curriculum, LDLM's val_loss being its training loss, and the MM-DiT keeping the
latent stream's RoPE positions when the token stream is shorter."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from test_ladd import SMALL as LADD_SMALL
from test_ldlm import SMALL as LDLM_SMALL

from diladiff.cli import main
from diladiff.config import ConfigError, build_config
from diladiff.data.tokenizer import load_tokenizer, tokenizer_identity
from diladiff.methods.ladd import sampler as joint
from diladiff.methods.ldlm.adaptive_time import AdaptiveTimeSampler
from diladiff.processes.gaussian import alpha_sigma
from diladiff.sampling.generate import GenerationSettings
from diladiff.sampling.latent import euler_maruyama_sample
from diladiff.sampling.masked import SamplerSettings


def ladd_stage(kind: str, *overrides: str):
    from diladiff.methods.ladd.stage import CoLADD, DiLADD

    cfg = build_config("tiny", TINY + LADD_SMALL + list(overrides), kind)
    cls = CoLADD if kind == "co-ladd" else DiLADD
    return cls(cfg, tokenizer_identity(load_tokenizer(cfg.data.tokenizer))).eval()


# ---------------------------------------------------------------- 1. sequential Co-LADD
def test_co_ladd_sequential_inference_needs_a_network_trained_for_it():
    """Shared times (t_z = t_x) never show the MM-DiT an all-masked token stream beside a partly
    noised latent, nor a clean latent at t_z = 0 beside masked tokens: sequential inference is
    refused for such a run (one line), accepted for a run trained with independent times, and
    joint inference is accepted for both."""
    tokens = SamplerSettings(steps=2)
    gen = torch.Generator().manual_seed(0)
    shared = ladd_stage("co-ladd")
    with pytest.raises(ConfigError, match="independent_times") as err:
        gs = GenerationSettings(tokens, method=joint.JointSettings("sequential", 2))
        joint.sample_joint(shared, 2, gs, gen, "cpu")
    assert "\n" not in str(err.value)
    ids, _ = joint.sample_joint(
        shared, 2, GenerationSettings(tokens, method=joint.JointSettings()), gen, "cpu"
    )
    assert ids.shape == (2, shared.seq_len)
    independent = ladd_stage("co-ladd", "ladd.independent_times=true")
    gs = GenerationSettings(tokens, method=joint.JointSettings("sequential", 2))
    ids, stats = joint.sample_joint(independent, 2, gs, gen, "cpu")
    assert ids.shape == (2, independent.seq_len) and stats["cont_nfe"] == 2


def test_only_runs_trained_for_sequential_inference_are_evaluated_with_it():
    from diladiff.stages.base import STAGES

    inferences = lambda kind: {s.get("inference") for s in STAGES[kind].eval_samplers}  # noqa: E731
    assert inferences("co-ladd") == {"joint"}  # shared times by default [P]
    assert inferences("di-ladd") == {"joint", "sequential"}  # independent times [P]


def test_the_cli_refuses_sequential_sampling_of_a_shared_time_co_ladd_run(tmp_path, capsys):
    run = tmp_path / "co"
    argv = ["train", "co-ladd", "--preset", "tiny", "--run-dir", str(run), *TINY, *LADD_SMALL]
    assert main(argv + ["train.max_steps=1"]) == 0
    capsys.readouterr()
    out = tmp_path / "s.jsonl"
    argv = ["sample", str(run), "--out", str(out), "--disc-steps", "2", "--cont-steps", "2"]
    assert main(argv + ["--inference", "sequential"]) == 2
    # (the refusal comes from the sampler, after the progress bar has started: stderr may hold
    # its fragments too)
    errors = [
        line[line.index("error: ") :]
        for line in capsys.readouterr().err.splitlines()
        if "error: " in line
    ]
    assert len(errors) == 1 and "independent_times=true" in errors[0], errors
    assert not out.exists()


# ---------------------------------------------------------------- 2. Di-LADD's code grid
L, NZ, V, MASK, CODES = 8, 3, 6, 5, 4


class CodeNet:
    """A stub two-stream network: flat token logits, peaked code logits; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, z_in, t_z):
        self.calls += 1
        code_logits = torch.tensor([2.0, 0.0, -1.0, 0.0]).expand(*z_in.shape[:2], CODES)
        return torch.zeros(*x.shape, V), code_logits.clone()


def di_ladd_stub():
    return SimpleNamespace(
        seq_len=L,
        mask_id=MASK,
        latent_shape=(NZ, 2),
        latent_kind="discrete",
        cfg=SimpleNamespace(ladd=SimpleNamespace(t_eps=1e-4)),
        net=CodeNet(),
        code_mask_id=CODES - 1,
        vq=SimpleNamespace(embed=lambda c: F.one_hot(c, CODES).float()),
    )


def record_reveals(monkeypatch):
    seen = []
    original = joint.reveal

    def recording(x, logits, mask_id, t, s, settings, generator):
        seen.append((mask_id, t, s, settings))
        return original(x, logits, mask_id, t, s, settings, generator)

    monkeypatch.setattr(joint, "reveal", recording)
    return seen


TEMPERED = SamplerSettings(steps=6, strategy="topk", temperature=0.5, top_p=0.8)


def assert_untempered_ancestral(settings):
    assert settings.strategy == "ancestral"
    assert settings.temperature == 1.0 and settings.top_p == 1.0


@pytest.mark.parametrize("code_steps", [None, 2, 10])
def test_di_ladd_joint_reveals_codes_on_their_own_untempered_grid(monkeypatch, code_steps):
    """N = 6 token steps; the codes move on t'_k = 1 - k (1 - 1e-5) / N_z', step k from
    t'_min(k, N_z') to t'_min(k+1, N_z') (default N_z' = N_z = 3 latent positions [C]): N_z'
    reveals when N_z' <= N, else N (the rest at the noise-removal call); the token channel's
    temperature, top-p and strategy apply to the tokens alone. N + 1 network calls either way."""
    stage = di_ladd_stub()
    seen = record_reveals(monkeypatch)
    js = (
        joint.JointSettings("joint")
        if code_steps is None
        else joint.JointSettings("joint", code_steps=code_steps)
    )
    gs = GenerationSettings(TEMPERED, method=js)
    ids, stats = joint.sample_joint(stage, 4, gs, torch.Generator().manual_seed(0), "cpu")
    n, nz = TEMPERED.steps, code_steps or NZ
    assert stage.net.calls == stats["disc_nfe"] == n + 1 and stats["cont_nfe"] == 0
    ygrid = joint.time_grid(nz)
    want = [(ygrid[k], ygrid[k + 1]) for k in range(min(n, nz))]
    codes = [(t, s, st) for m, t, s, st in seen if m == CODES - 1]
    flat = lambda pairs: [v for pair in pairs for v in pair]  # noqa: E731
    assert len(codes) == len(want)
    assert flat((t, s) for t, s, _ in codes) == pytest.approx(flat(want), rel=1e-12, abs=0)
    for _, _, st in codes:
        assert_untempered_ancestral(st)
    tokens = [st for m, _, _, st in seen if m == MASK]
    assert len(tokens) == n + 1 and all(st == TEMPERED for st in tokens)
    assert (ids != MASK).all()


def test_di_ladd_sequential_reveals_codes_untempered(monkeypatch):
    stage = di_ladd_stub()
    seen = record_reveals(monkeypatch)
    gs = GenerationSettings(TEMPERED, method=joint.JointSettings("sequential", 3))
    joint.sample_joint(stage, 4, gs, torch.Generator().manual_seed(0), "cpu")
    codes = [st for m, _, _, st in seen if m == CODES - 1]
    assert len(codes) == 3
    for st in codes:
        assert_untempered_ancestral(st)


# ---------------------------------------------------------------- 3. Euler-Maruyama stability
def gaussian_denoiser(std: float, d: float):
    """E[z0 | z_t] for data z0 ~ N(0, std^2): alpha std^2 z_t / (alpha^2 std^2 + sigma^2)."""

    def x0(z_t, t, z_sc=None):
        a, s = (v.double().view(-1, 1, 1) for v in alpha_sigma(t.double(), d))
        return a * std**2 / (a**2 * std**2 + s**2) * z_t.double()

    return x0


def long_first_step_grid(steps: int) -> torch.Tensor:
    """The adaptive sampler's grid for a loss curve that saturates at u = 0.73 (the loss, and so
    the sampling density, all below it): at N = 32 its first step spans about [0.69, 1]."""
    ats = AdaptiveTimeSampler(100)
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    ats.loss_ema.copy_((u / 0.73).clamp(max=1).sqrt())
    ats.seen.fill_(True)
    ats.refresh()
    return ats.time_grid(steps)


@pytest.mark.parametrize("std", [1.0, 1.3])
def test_euler_maruyama_with_the_exact_denoiser_is_right_on_a_grid_with_a_long_first_step(std):
    """beta is clipped at beta(0.95) ~ 40, so a first step of 0.3 in u would multiply z by
    1 - beta Delta / 2 ~ -5 in one Euler step; the output (the x0-prediction at t_{N-1}) must
    still have the spread alpha std^2 / sqrt(alpha^2 std^2 + sigma^2) at t_{N-1}."""
    d, steps, n = 3.0, 32, 20000
    grid = long_first_step_grid(steps)
    assert grid[0] - grid[1] > 0.25  # the case at issue
    z, nfe = euler_maruyama_sample(
        gaussian_denoiser(std, d),
        (n, 1, 1),
        steps,
        d,
        torch.Generator().manual_seed(0),
        "cpu",
        grid,
        dtype=torch.float64,
    )
    a, s = alpha_sigma(grid[-2:-1], d)
    want = float(a * std**2 / torch.sqrt(a**2 * std**2 + s**2))
    assert nfe == steps and torch.isfinite(z).all()
    assert abs(float(z.std()) / want - 1) < 4 / math.sqrt(2 * n) + 0.03, float(z.std())


# ---------------------------------------------------------------- 6. LADD and diffusion.schedule
@pytest.mark.parametrize("kind", ["co-ladd", "di-ladd"])
def test_ladd_refuses_a_latent_schedule_it_does_not_use(kind):
    """LADD's latent runs on its own schedules (Co-LADD: VP "sqrt"; Di-LADD: masked, linear),
    so diffusion.schedule is refused when it is not the default rather than ignored."""
    with pytest.raises(ConfigError, match="diffusion.schedule") as err:
        ladd_stage(kind, "diffusion.schedule=fitted", "diffusion.fitted_tanh=0.1,0.3,8,0.5")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- 7. smaller items
def test_duo_warns_when_a_run_stops_before_its_curriculum_ends(tmp_path, capsys):
    """The curriculum ends at half of train.total_steps (1000 at tiny): stopping at 2 steps never
    reaches the discrete loss, which the run says next to its summary."""
    argv = ["train", "duo", "--preset", "tiny", "--run-dir", str(tmp_path / "d"), *TINY]
    capsys.readouterr()
    assert main(argv + ["duo.duality_points=257", "train.max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "warning: train.max_steps=2 stops before the warm-up duo.curriculum_end=1000" in out


@pytest.mark.parametrize(
    "recon",
    ["ce", "mse", "ce+mse"],
)
def test_ldlm_val_loss_is_the_training_loss(recon):
    """val_loss sums the terms the training loss sums: L_diff + L_w, plus L_h unless the ablation
    is recon_loss = ce (which trains without it)."""
    from diladiff.methods.ldlm.stage import LDLM

    cfg = build_config("tiny", TINY + LDLM_SMALL + [f"ldlm.recon_loss={recon}"], "ldlm")
    stage = LDLM(cfg, tokenizer_identity(load_tokenizer(cfg.data.tokenizer)))
    x = torch.randint(1000, 2000, (4, cfg.data.seq_len), generator=torch.Generator().manual_seed(1))
    stage.feat_norm.fit([stage.features(x)])
    out = stage.eval().evaluate([x], torch.Generator().manual_seed(2))
    want = out["val_diff"] + out["val_token_ce"]
    if recon != "ce":
        want += out["val_hidden_mse"]
    assert out["val_hidden_mse"] > 0.01  # so that a wrongly added L_h shows
    assert out["val_loss"] == pytest.approx(want, rel=1e-9)


def test_mm_dit_keeps_the_latent_positions_of_training_for_a_shorter_token_stream():
    """Training places x at RoPE positions 0..L-1 and z at L..L+N_z-1; a token stream of n < L
    tokens keeps z at L..L+N_z-1 (the x-z offsets the network learned), which the output
    recomputed block by block with those positions must match."""
    from diladiff.methods.ladd.mmdit import MMDiT
    from diladiff.nets.rotary import rope_tables

    torch.manual_seed(0)
    seq_len, nz, n = 8, 3, 5
    m = MMDiT(11, seq_len, nz, 4, 4, width=16, depth=2, heads=2, cond_dim=8, dropout=0.0)
    with torch.no_grad():
        for p in m.parameters():  # off the zero init, so every block and head acts
            p.add_(0.3 * torch.randn_like(p))
    m.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 11, (2, n), generator=g)
    z = torch.randn(2, nz, 4, generator=g)
    t = torch.rand(2, generator=g)
    with torch.no_grad():
        lx, oz = m(x, z, t)
        cos, sin = rope_tables(seq_len + nz, m.head_dim)
        rows = torch.cat([torch.arange(n), torch.arange(seq_len, seq_len + nz)])
        hx, hz = m.token_embed(x), m.latent_embed(z)
        c = F.silu(m.t_embed(t))
        for block in m.blocks:
            hx, hz = block(hx, hz, c, (cos[rows], sin[rows]))
        torch.testing.assert_close(lx, m.head_x(hx, c))
        torch.testing.assert_close(oz, m.head_z(hz, c))
