import json

import pytest
import torch
from conftest import TINY
from latent_fixtures import AE_SMALL, PRIOR_SMALL, train

from diladiff.cli import main
from diladiff.config import PRESETS, ConfigError, build_config, check_warmups
from diladiff.data.tokenizer import load_tokenizer, tokenizer_identity
from diladiff.demo import demo_steps
from diladiff.methods.diladiff import meanflow
from diladiff.methods.diladiff.meanflow import directional_derivative, sample_t_r
from diladiff.methods.diladiff.stage import DiLaDiff
from diladiff.processes.gaussian import angle_time_grid, velocity_from_x0, x0_from_velocity
from diladiff.runs import load_run
from diladiff.sampling.latent import LatentSettings, sample_latent
from diladiff.stages import STAGES


@pytest.fixture(scope="module")
def stage():
    cfg = build_config("tiny", [*TINY, *AE_SMALL, *PRIOR_SMALL], stage="diladiff")
    torch.manual_seed(0)
    s = DiLaDiff(cfg, tokenizer_identity(load_tokenizer("minilm-l6")))
    with torch.no_grad():  # a non-trivial teacher (its output layers start at zero)
        for p in s.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    missing, _ = s.student.load_state_dict(s.teacher.state_dict(), strict=False)
    assert all(k.startswith("dt_embed") for k in missing)
    s.ae.train().encode(torch.randint(1000, 3000, (8, 32)), train=True)  # feature statistics
    s.ae.eval()
    s.prior_norm.fit([s.ae.encode(torch.randint(1000, 3000, (16, 32)))])
    return s.eval()


def meanflow_terms(stage, z_t, t, r, v, z_sc):
    """(u, u_tgt) of the stage's MeanFlow loss (loss_terms): the student's average velocity and
    its derivative along (v, 1, 0), taken from the directional derivative the loss computes."""
    seen = {}
    real = meanflow.directional_derivative

    def spy(*args, **kwargs):
        seen["out"] = real(*args, **kwargs)
        return seen["out"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(meanflow, "directional_derivative", spy)
        _, metrics = stage.loss_terms(z_t, t, r, v, z_sc)
    u, dudt = seen["out"]
    interval = (t - r).view(-1, *([1] * (z_t.dim() - 1)))
    u_tgt = (v - stage.tangent_weight * interval * dudt).detach()
    # the loss is the error of u against this target
    mse = ((u - u_tgt) ** 2).flatten(1).mean(1).mean()
    assert torch.allclose(metrics["mse"], mse, rtol=1e-5, atol=1e-12)
    return u, u_tgt


def inputs(seed=0, batch=4):
    g = torch.Generator().manual_seed(seed)
    z_t = torch.randn(batch, 8, 64, generator=g)
    t = torch.tensor([0.9, 0.6, 0.4, 0.2])[:batch]
    r = torch.tensor([0.5, 0.6, 0.1, 0.05])[:batch]
    return z_t, t, r


def test_student_at_init_with_r_equal_t_is_the_teacher(stage):
    z_t, t, _ = inputs()
    v, z_sc = stage.teacher_velocity(z_t, t)
    u = stage.average_velocity(z_t, t, t, z_sc)
    assert torch.allclose(u, v, atol=1e-5)
    expect = velocity_from_x0(z_t, stage.teacher(z_t, t, z_sc), t, stage.cfg.diffusion.d)
    assert torch.allclose(u, expect, atol=1e-5)


@pytest.mark.parametrize(
    "dtype,eps,rtol", [(torch.float64, 1e-6, 1e-6), (torch.float32, 1e-4, 0.02)]
)
def test_jvp_target_equals_finite_differences(stage, dtype, eps, rtol):
    import copy

    s = copy.deepcopy(stage).to(dtype)
    s.cfg = copy.deepcopy(stage.cfg)
    s.cfg.meanflow.fd_eps = eps
    z_t, t, r = (x.to(dtype) for x in inputs())
    v, z_sc = s.teacher_velocity(z_t, t)
    s.cfg.meanflow.derivative = "jvp"
    u1, tgt_jvp = meanflow_terms(s, z_t, t, r, v, z_sc)
    s.cfg.meanflow.derivative = "finite_difference"
    u2, tgt_fd = meanflow_terms(s, z_t, t, r, v, z_sc)
    assert torch.allclose(u1, u2)
    tangent_jvp, tangent_fd = tgt_jvp - v, tgt_fd - v
    scale = tangent_jvp.abs().max()
    assert scale > 1e-3  # the tangent term is not trivially zero
    assert (tangent_jvp - tangent_fd).abs().max() <= rtol * scale


def test_directional_derivative_of_a_known_function():
    fn = lambda x, y: x**2 * y  # noqa: E731
    x, y = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    tx, ty = torch.tensor([1.0, 0.5]), torch.tensor([2.0, 1.0])
    exact = 2 * x * y * tx + x**2 * ty
    for method in ("jvp", "finite_difference"):
        out, d = directional_derivative(fn, (x, y), (tx, ty), method)
        assert torch.allclose(out, fn(x, y)) and torch.allclose(d, exact, atol=1e-3)


def test_with_r_equal_t_the_loss_is_flow_matching_against_the_teacher(stage):
    z_t, t, _ = inputs()
    v, z_sc = stage.teacher_velocity(z_t, t)
    u, tgt = meanflow_terms(stage, z_t, t, t, v, z_sc)
    assert torch.equal(tgt, v)
    assert torch.allclose(u, stage.average_velocity(z_t, t, t, z_sc))


def test_meanflow_loss_trains_the_student_only(stage):
    stage.train()
    stage.on_step(10_000)
    x0 = torch.randint(1000, 3000, (4, 32))
    loss, metrics = stage(x0, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None for p in stage.student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in stage.teacher.parameters())
    assert all(p.grad is None for p in stage.ae.parameters())
    stage.zero_grad()
    stage.eval()


def test_student_is_self_conditioned_on_its_own_estimate_on_half_the_examples(stage):
    """Zeros (the input of a sampling step's first pass) on ~50% of the examples; elsewhere
    X(u_eta(z_t, t, t; 0)), the clean estimate of the student's own r = t velocity. The
    teacher's target stays the self-conditioned teacher's velocity."""
    seen = {}
    terms = stage.loss_terms

    def spy(z_t, t, r, v, z_sc):
        seen.update(z_t=z_t, t=t, v=v, z_sc=z_sc)
        return terms(z_t, t, r, v, z_sc)

    stage.train()
    stage.on_step(10_000)
    stage.loss_terms = spy
    try:
        loss, _ = stage(torch.randint(1000, 3000, (256, 32)), torch.Generator().manual_seed(0))
    finally:
        del stage.loss_terms
    z_t, t, z_sc = seen["z_t"], seen["t"], seen["z_sc"]
    zero = (z_sc == 0).flatten(1).all(1)
    assert abs(zero.float().mean().item() - 0.5) < 0.1
    own = x0_from_velocity(z_t, stage.average_velocity(z_t, t, t), t, stage.cfg.diffusion.d)
    assert torch.allclose(z_sc[~zero], own[~zero], atol=1e-5)
    assert torch.allclose(seen["v"], stage.teacher_velocity(z_t, t)[0])
    loss.backward()  # the zero-input path the sampler's first pass uses gets trained
    grad = stage.student.inp.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert not seen["z_sc"].requires_grad  # stop-gradient
    stage.zero_grad()
    stage.eval()


def test_sampling_step_self_conditions_the_jump_on_the_zero_input_pass(stage):
    calls = []
    student = stage.student.forward

    def spy(z_t, t, z_sc=None, r=None):
        calls.append((z_sc, r))
        return student(z_t, t, z_sc, r)

    z_t, t, r = inputs()
    stage.student.forward = spy
    try:
        u = stage.self_conditioned_u(z_t, t, r)
    finally:
        del stage.student.forward
    (sc0, r0), (sc1, r1) = calls
    assert sc0 is None and torch.equal(r0, t) and torch.equal(r1, r)
    expect = x0_from_velocity(z_t, stage.average_velocity(z_t, t, t), t, stage.cfg.diffusion.d)
    assert torch.allclose(sc1, expect)
    assert torch.allclose(u, stage.average_velocity(z_t, t, r, expect))


def test_the_meanflow_sampler_jumps_along_the_configured_time_grid(stage):
    """meanflow.time_grid: "angle" (default) = processes.gaussian.angle_time_grid, "uniform" =
    evenly spaced in t; the sampler's jumps (t, r) follow it; an unknown name is a ConfigError."""
    jumps = []
    u = stage.self_conditioned_u

    def spy(z_t, t, r):
        jumps.append((float(t[0]), float(r[0])))
        return u(z_t, t, r)

    settings = LatentSettings("meanflow", 5)
    stage.self_conditioned_u = spy
    try:
        for name, expect in [
            ("angle", angle_time_grid(5, stage.cfg.diffusion.d)),
            ("uniform", torch.linspace(1, 0, 6, dtype=torch.float64)),
        ]:
            jumps.clear()
            stage.cfg.meanflow.time_grid = name
            sample_latent(stage, 2, settings, torch.Generator().manual_seed(0), "cpu")
            got = torch.tensor([jumps[0][0]] + [r for _, r in jumps], dtype=torch.float64)
            assert torch.allclose(got, expect, atol=1e-6), name
    finally:
        del stage.self_conditioned_u
        stage.cfg.meanflow.time_grid = "angle"
    with pytest.raises(ConfigError, match="meanflow.time_grid"):  # refused when resolved
        build_config(
            "tiny", [*TINY, *AE_SMALL, *PRIOR_SMALL, "meanflow.time_grid=even"], stage="diladiff"
        )


def test_new_students_embed_the_interval_at_scale_1_old_runs_load_as_trained():
    from diladiff.config import Config

    cfg = build_config("tiny", [], stage="diladiff")
    assert cfg.meanflow.interval_scale == 1.0 and cfg.meanflow.time_grid == "angle"
    saved = cfg.to_dict()
    del saved["meanflow"]["interval_scale"]  # a run saved before the key existed
    assert Config.from_dict(saved).meanflow.interval_scale == 1000.0


def test_t_r_sampling():
    t, r = sample_t_r(20000, -1.0, 1.0, 0.25, torch.Generator().manual_seed(0), "cpu")
    assert (t >= r).all() and ((t > 0) & (t < 1)).all()
    assert abs((t == r).float().mean() - 0.25) < 0.02
    # t is the larger of two LogitNormal(-1, 1) draws: E[logit t] = -1 + 1/sqrt(pi)
    assert abs(torch.logit(t).mean() - (-1 + 1 / torch.pi**0.5)) < 0.03
    assert abs(torch.logit(r[t != r]).mean() - (-1 - 1 / torch.pi**0.5)) < 0.03


@pytest.fixture(scope="module")
def chain(latent_chain):
    return latent_chain


def test_train_and_sample_diladiff_run(chain, tmp_path, capsys):
    run = tmp_path / "dl"
    assert train("diladiff", run, "--teacher", chain["ladiff"], "train.max_steps=3") == 0
    out = tmp_path / "s.jsonl"
    assert (
        main(
            [
                "sample",
                str(run),
                "--num-samples",
                "2",
                "--cont-steps",
                "5",
                "--disc-steps",
                "4",
                "--gamma",
                "0.2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "s.jsonl.meta.json").read_text())
    assert meta["stage"] == "diladiff" and meta["cont_nfe"] == 2 * 5  # two calls per step
    assert len(out.read_text().splitlines()) == 2
    # the student works in its teacher's prior space
    student, _ = load_run(run)
    teacher, _ = load_run(chain["ladiff"])
    assert student.prior_norm.fitted
    for k, v in teacher.prior_norm.state_dict().items():
        assert torch.equal(student.prior_norm.state_dict()[k], v)
    # The EMA file leaves out the frozen teacher and auto-encoder (they never change); the
    # loaded EMA weights take them from the model file and equal the LaDiff run's.
    from safetensors.torch import load_file

    from diladiff.train.checkpoint import latest_checkpoint

    ema = load_file(latest_checkpoint(run) / "ema.safetensors")
    frozen = {
        k
        for k, p in DiLaDiff(student.cfg, student.tokenizer_identity).named_parameters()
        if not p.requires_grad
    }
    assert {k.split(".")[0] for k in frozen} == {"teacher", "ae"} and not frozen & ema.keys()
    assert any(k.startswith("student.") for k in ema)
    for k, v in teacher.prior.state_dict().items():
        assert torch.equal(student.teacher.state_dict()[k], v)


def test_training_short_of_a_warmup_warns_and_a_schedule_short_of_one_is_an_error(
    chain, tmp_path, capsys
):
    capsys.readouterr()
    assert train("diladiff", tmp_path / "w", "--teacher", chain["ladiff"], "train.max_steps=1") == 0
    out = capsys.readouterr().out
    assert (
        "warning: train.max_steps=1 stops before the warm-up meanflow.tangent_warmup_steps" in out
    )
    run = tmp_path / "e"
    assert train("diladiff", run, "--teacher", chain["ladiff"], "train.total_steps=50") == 2
    err = capsys.readouterr().err
    assert "train.total_steps=50 is shorter than the warm-up meanflow.tangent_warmup_steps" in err
    assert not run.exists()  # refused before anything was written


def test_check_warmups():
    cfg = build_config("tiny", ["train.max_steps=80"], stage="diladiff")
    assert check_warmups(cfg.train, {"a": 50, "b": 100}) == [
        "train.max_steps=80 stops before the warm-up b=100 ends"
    ]
    assert check_warmups(cfg.train, {"a": 80}) == []
    with pytest.raises(ConfigError, match="shorter than the warm-up b=400"):
        check_warmups(cfg.train, {"a": 50, "b": 400})


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("kind", sorted(STAGES))
def test_every_preset_runs_past_its_warmups(preset, kind):
    cfg = build_config(preset, stage=kind)
    assert check_warmups(cfg.train, STAGES[kind].warmups(cfg)) == []


@pytest.mark.parametrize("kind", sorted(demo_steps()))
def test_the_demo_runs_every_stage_past_its_warmups(kind):
    cfg = build_config("tiny", demo_steps()[kind], stage=kind)
    warmups = STAGES[kind].warmups(cfg)
    assert check_warmups(cfg.train, warmups) == []
    if kind == "diladiff":
        assert cfg.train.max_steps > cfg.meanflow.tangent_warmup_steps


def test_exported_latent_run_generates_the_same_ids(chain, tmp_path):
    """A LaDiff run (frozen auto-encoder inside; its MiniLM feature model referenced by name)
    exported and loaded back: same weights, same samples for the same seed."""
    import diladiff
    from diladiff.hub import export_run

    out = export_run(chain["ladiff"], tmp_path / "exported")
    card = (out / "README.md").read_text()
    assert "frozen feature model | `minilm-l6`" in card and "autoencoder" in card
    a = diladiff.load(chain["ladiff"], device="cpu")
    b = diladiff.load(out, device="cpu")
    assert a.kind == b.kind == "ladiff"
    kw = dict(num_samples=2, disc_steps=4, cont_steps=3, seed=5)
    assert a.generate(**kw).ids == b.generate(**kw).ids


@pytest.mark.parametrize("strategy", ["ancestral", "topk"])
def test_prompts_suffixes_and_infilling_keep_the_given_tokens(chain, tmp_path, strategy):
    """MDLM, LaDiff and DiLaDiff: a prompt + suffix, or infilling [MASK] spans, generates every
    other position and never changes a given token; a reference text's latent replaces the
    prior sample (no latent steps) in the latent stages."""
    import diladiff
    from diladiff.sampling.conditioning import make_condition

    dl = tmp_path / "dl"
    assert train("diladiff", dl, "--teacher", chain["ladiff"], "train.max_steps=2") == 0
    for run in (chain["mdlm"], chain["ladiff"], dl):
        model = diladiff.load(run, device="cpu")
        tok, L, mask = model.tokenizer, model.stage.seq_len, model.stage.mask_id
        kw = dict(num_samples=3, disc_steps=4, cont_steps=2, strategy=strategy, seed=0)
        cases = [
            {"prompt": "the history of the city", "suffix": "in the north ."},
            {"infill": "the [MASK] [MASK] of the [MASK] river is long"},
        ]
        for texts in cases:
            canvas = make_condition(tok, L, mask, **texts).canvas
            given = [i for i, t in enumerate(canvas) if t != mask]
            assert 0 < len(given) < L
            out = model.generate(**kw, **texts)
            for row in out.ids:
                assert [row[i] for i in given] == [canvas[i] for i in given]
                assert mask not in row  # every other position generated
            assert out.ids == model.generate(**kw, **texts).ids  # reproducible
        if model.kind != "mdlm":
            ref = model.generate(**kw, latent_from="a river flows to the sea")
            assert ref.stats["cont_nfe"] == 0
        else:
            with pytest.raises(ConfigError, match="no latent"):
                model.generate(**kw, latent_from="a river")
    with pytest.raises(ConfigError, match="leave at least one"):
        model.generate(num_samples=1, prompt="word " * L)


@pytest.mark.parametrize("kind", ["duo", "co-ladd", "di-ladd", "ldlm"])
def test_every_method_keeps_the_given_tokens_of_prompts_suffixes_and_infills(tmp_path, kind):
    """DUO (clamped at every step), Co-LADD and Di-LADD (the token stream starts from the
    canvas; joint and sequential inference) and LDLM (a token-guided latent, its direct decode
    clamped): a prompt, a suffix, both, and infilling keep every given token across seeds and
    sampler settings; a reference text's latent (LADD and LDLM: they have an encoder) replaces
    the prior sample, DUO refuses one in one line. Through Model.generate and `sample`."""
    from dataclasses import replace

    from test_ladd import SMALL as LADD_SMALL
    from test_ldlm import SMALL as LDLM_SMALL

    import diladiff
    from diladiff.methods.ladd.sampler import INFERENCES
    from diladiff.sampling.conditioning import TokenGuidance, make_condition
    from diladiff.sampling.generate import generate

    extra = {"duo": ["duo.duality_points=257"], "ldlm": LDLM_SMALL}.get(kind, LADD_SMALL)
    run = tmp_path / kind
    argv = ["train", kind, "--preset", "tiny", "--run-dir", str(run), "train.max_steps=2"]
    assert main([*argv, *TINY, *extra]) == 0
    model = diladiff.load(run, device="cpu")
    tok, L, mask = model.tokenizer, model.stage.seq_len, model.stage.mask_id
    # the inferences the run was trained for (a shared-time Co-LADD refuses sequential)
    inferences = getattr(model.stage, "inferences", INFERENCES)
    ladd = [{"inference": i, "strategy": s} for i in inferences for s in ("ancestral", "topk")]
    settings = {
        "duo": [{"strategy": "ancestral"}, {"strategy": "greedy_tail"}],
        "ldlm": [{"latent_sampler": "sde_euler"}, {"latent_sampler": "ode_euler"}],
    }.get(kind, ladd)
    cases = [
        {"prompt": "the history of the city", "suffix": "in the north ."},
        {"prompt": "the river"},
        {"suffix": "into the sea ."},
        {"infill": "the [MASK] [MASK] of the [MASK] river is long"},
    ]
    base = model.settings(num_samples=3, disc_steps=4, cont_steps=2)
    seeds = iter(range(100))  # another seed for every generation: 16 of them, 48 rows
    for texts in cases:
        cond = make_condition(tok, L, mask, **texts)
        given = [i for i, t in enumerate(cond.canvas) if t != mask]
        assert 0 < len(given) < L
        for kw in settings * (4 // len(settings)):
            sc = replace(base, seed=next(seeds), **kw)
            out = generate(model.stage, tok, sc, progress=False, condition=cond)
            for row in out.ids:
                assert [row[i] for i in given] == [cond.canvas[i] for i in given], texts
                assert mask not in row
    kw = dict(num_samples=2, disc_steps=4, cont_steps=2, prompt="the river", seed=3)
    out = model.generate(**kw)
    head = tok("the river", add_special_tokens=False)["input_ids"]
    assert all(row[: len(head)] == head for row in out.ids)
    assert out.ids == model.generate(**kw).ids  # reproducible
    path = tmp_path / "s.jsonl"
    cli = ["sample", str(run), "--num-samples", "2", "--disc-steps", "4", "--cont-steps", "2"]
    assert main([*cli, "--suffix", "into the sea .", "--out", str(path)]) == 0
    tail = tok("into the sea .", add_special_tokens=False)["input_ids"]
    rows = [json.loads(x)["ids"] for x in path.read_text().splitlines()]
    assert len(rows) == 2 and all(r[-len(tail) :] == tail for r in rows)
    if kind == "duo":
        with pytest.raises(ConfigError, match="no latent"):
            model.generate(num_samples=1, latent_from="a river")
        return
    ref = model.generate(num_samples=2, disc_steps=4, cont_steps=2, latent_from="a river flows")
    assert ref.stats["cont_nfe"] == 0
    both = model.generate(num_samples=2, disc_steps=4, latent_from="a river", prompt="the river")
    assert all(row[: len(head)] == head for row in both.ids)
    if kind == "ldlm":  # the guidance lowers the decoder's NLL of the given tokens
        cond = make_condition(tok, L, mask, infill="the [MASK] [MASK] of the [MASK] river")
        guided = TokenGuidance(model.stage, cond.canvas_tensor())
        z = torch.randn(3, *model.stage.latent_shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert (guided.token_nll(guided.guide(z)) < guided.token_nll(z)).all()


def test_the_readme_python_example_runs(chain, tmp_path, monkeypatch):
    """The README's ```python block, run as written with runs/m and runs/dl made real."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    dl = tmp_path / "runs" / "dl"
    assert train("diladiff", dl, "--teacher", chain["ladiff"], "train.max_steps=2") == 0
    (tmp_path / "runs" / "m").symlink_to(chain["mdlm"])
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
