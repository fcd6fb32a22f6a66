"""The parallel-decoding check: its metrics on hand-made cases, and its corpus."""

import json

import numpy as np
import pytest

from diladiff.check import metrics as M
from diladiff.check.plan import disc_grid
from diladiff.check.report import verdict

TARGETS = np.array([[1, 2, 3, 4], [1, 2, 3, 5], [7, 7, 7, 7]])


def test_validity_coverage_and_tv_of_a_hand_made_sample():
    samples = np.array(
        [
            [1, 2, 3, 4],  # row 0
            [1, 2, 3, 4],  # row 0 again
            [7, 7, 7, 7],  # row 2
            [1, 2, 3, 6],  # invalid: one token off rows 0 and 1
        ]
    )
    m = M.match_targets(samples, TARGETS)
    assert m.tolist() == [0, 0, 2, -1]
    assert M.validity(m) == 0.75
    assert M.coverage(m, 3) == pytest.approx(2 / 3)
    # empirical: row0 1/2, row1 0, row2 1/4, invalid 1/4; uniform 1/3 each
    expected = 0.5 * (abs(0.5 - 1 / 3) + abs(0 - 1 / 3) + abs(0.25 - 1 / 3) + 0.25)
    assert M.tv_to_uniform(m, 3) == pytest.approx(expected)
    assert M.token_error(samples, TARGETS) == pytest.approx((0 + 0 + 0 + 1) / 4 / 4)


def test_tv_is_zero_for_exactly_uniform_and_one_for_all_invalid():
    exact = np.repeat(TARGETS, 5, axis=0)
    assert M.tv_to_uniform(M.match_targets(exact, TARGETS), 3) == pytest.approx(0.0)
    junk = np.full((6, 4), 9)
    m = M.match_targets(junk, TARGETS)
    assert M.validity(m) == 0 and M.coverage(m, 3) == 0
    assert M.tv_to_uniform(m, 3) == pytest.approx(1.0)
    assert M.token_error(junk, TARGETS) == 1.0


def test_perfect_sampler_tv_shrinks_with_the_sample_count():
    small, _ = M.perfect_sampler_tv(64, 256, trials=100)
    large, _ = M.perfect_sampler_tv(16384, 256, trials=20)
    # with N << K most rows are never drawn: TV ~ 1 - N/K-ish; with N >> K it goes to 0
    assert small > 0.7 and large < 0.1
    # the expected TV of a multinomial sample, checked against the exact value for K = 2
    # (N = 2: TV = 1/2 with probability 1/2, else 0)
    mean, _ = M.perfect_sampler_tv(2, 2, trials=4000)
    assert mean == pytest.approx(0.25, abs=0.03)


def test_targets_must_be_distinct():
    with pytest.raises(ValueError):
        M.match_targets(TARGETS, np.vstack([TARGETS, TARGETS[:1]]))


def test_disc_grid_is_the_issue_grid():
    assert disc_grid(64) == [1, 2, 4, 8, 16, 32, 64]
    assert disc_grid(16) == [1, 2, 4, 8, 16]


def test_methods_are_checked_against_the_registry():
    from diladiff.check.plan import CheckPlan, parse_methods, parse_steps
    from diladiff.config import ConfigError

    assert parse_methods(" duo, ldlm,duo ") == ("duo", "ldlm")
    assert parse_steps("mdlm=5, duo=7") == {"mdlm": 5, "duo": 7}
    # an unknown name, a stage of the chain itself, a stage that generates nothing
    for bad in ("nope", "ladiff", "autoencoder"):
        with pytest.raises(ConfigError, match=f"'{bad}' is not a method") as err:
            parse_methods(f"duo,{bad}")
        assert "\n" not in str(err.value) and "co-ladd" in str(err.value)
        with pytest.raises(ConfigError):
            CheckPlan(methods=(bad,))
    with pytest.raises(ConfigError, match="expected STAGE=N"):
        parse_steps("mdlm=many")
    # steps only for the stages the check trains: a method's once it is asked for
    with pytest.raises(ConfigError, match="trains no stage 'duo'"):
        CheckPlan(steps={"duo": 5}).check_steps()
    plan = CheckPlan(steps={"duo": 5}, methods=("duo",))
    plan.check_steps()
    assert plan.stage_steps()["duo"] == 5


def test_a_registered_method_is_trained_with_its_ancestors_and_its_check_steps(monkeypatch):
    """Nothing in the check names a method: a stage registered by a plug-in is a method too,
    trained after its parents for its own `check_steps` unless the plan's steps say otherwise,
    and sampled with its own `eval_samplers` unless the plan's samplers say otherwise."""
    from diladiff.check.plan import CHAIN, CheckPlan, method_choices
    from diladiff.stages import STAGES, MaskedDiffusionStage

    class Plugin(MaskedDiffusionStage):
        kind = "plugin-check"
        parents = {"base": "duo"}
        eval_samplers = ({"strategy": "topk"},)
        optional = True
        check_steps = 7

    monkeypatch.setitem(STAGES, Plugin.kind, Plugin)
    assert Plugin.kind in method_choices() and CHAIN.prior not in method_choices()
    plan = CheckPlan(methods=(Plugin.kind,), steps={"mdlm": 11})
    assert plan.kinds() == [*CHAIN.kinds(), "duo", Plugin.kind]
    overrides = plan.stage_overrides()
    assert overrides[Plugin.kind] == ["train.max_steps=7", "train.total_steps=7"]
    assert overrides["duo"][0] == f"train.max_steps={STAGES['duo'].check_steps}"
    assert overrides["mdlm"][0] == "train.max_steps=11"
    assert plan.method_samplers(Plugin.kind) == Plugin.eval_samplers
    sweep = ({"strategy": "ancestral"}, {"strategy": "topk", "temperature": 0.5})
    assert (
        CheckPlan(methods=(Plugin.kind,), samplers={Plugin.kind: sweep}).method_samplers(
            Plugin.kind
        )
        == sweep
    )


def test_a_sampler_overrides_the_plans_token_draws():
    from diladiff.check.plan import CheckPlan
    from diladiff.config import SampleConfig

    base = SampleConfig(cont_steps=128, gamma=0.3, top_p=0.9)
    plan = CheckPlan(strategy="topk", temperature=0.5)
    own = plan.sample_config(base, {}, 4)
    assert (own.strategy, own.temperature, own.top_p, own.disc_steps) == ("topk", 0.5, 1.0, 4)
    assert (own.cont_steps, own.gamma) == (128, 0.0)  # the run's N_cont; gamma only if asked
    duo = plan.sample_config(base, {"strategy": "greedy_tail", "temperature": 2.0}, 1)
    assert (duo.strategy, duo.temperature, duo.disc_steps) == ("greedy_tail", 2.0, 1)
    latent = plan.sample_config(base, {"cont_steps": 5, "gamma": 0.2}, 16)
    assert (latent.cont_steps, latent.gamma, latent.strategy) == (5, 0.2, "topk")


def test_corpus_packs_back_into_exactly_its_rows(tmp_path):
    from diladiff.check.corpus import build_corpus, training_config, write_corpus
    from diladiff.config import build_config
    from diladiff.data.packing import prepare_data
    from diladiff.data.tokenizer import load_tokenizer, separator_id

    tok = load_tokenizer("minilm-l6")
    texts, rows = build_corpus("wiki-vital", tok, 12, 16)
    assert rows.shape == (12, 16) and len({r.tobytes() for r in rows}) == 12
    assert (rows[:, -1] == separator_id(tok)).all()
    corpus = write_corpus(tmp_path, texts, rows, heldout=3)
    overrides = training_config(["data.seq_len=16", "data.source=austen"], corpus, 3)
    cfg = build_config("tiny", overrides)
    assert cfg.data.source == str(corpus)  # the user's source is the origin, not the training data
    data = prepare_data(cfg.data, tok, progress=False)
    assert np.array_equal(np.asarray(data.train), rows)
    assert np.array_equal(np.asarray(data.val), rows[:3])


def test_corpus_too_small_is_a_clear_error(tmp_path):
    from conftest import write_jsonl

    from diladiff.check.corpus import build_corpus
    from diladiff.data.tokenizer import load_tokenizer
    from diladiff.errors import DataError

    src = write_jsonl(tmp_path / "few.jsonl", ["a short text", "another one that is short"])
    with pytest.raises(DataError, match="only 0 documents"):
        build_corpus(str(src), load_tokenizer("minilm-l6"), 4, 32)


def test_exact_factorised_sampler_is_valid_one_token_at_a_time_and_mixes_rows_in_one_step():
    rng = np.random.default_rng(0)
    targets = np.unique(rng.integers(0, 5, size=(40, 6)), axis=0)
    k = len(targets)
    # N_disc = 1 reveals every position at once from the marginals: mostly invalid
    one = M.summarise(M.exact_factorised_sample(targets, 400, 1, seed=1), targets)
    # very many steps reveal one token at a time, but for the 15 pairs of positions that
    # land in the same of the 2000 steps (probability 15 / 2000 per row): nearly always valid
    many = M.exact_factorised_sample(targets, 400, 2000, seed=1)
    assert one["validity"] < 0.3
    assert M.validity(M.match_targets(many, targets)) >= 0.97
    # ... and uniform over the rows: its TV is that of a perfect sampler
    tv = M.tv_to_uniform(M.match_targets(many, targets), k)
    mean, std = M.perfect_sampler_tv(400, k, trials=200, seed=2)
    assert abs(tv - mean) < 4 * std


def test_exact_factorised_topk_is_exact_one_token_per_step_and_temperature_sharpens():
    rng = np.random.default_rng(0)
    targets = np.unique(rng.integers(0, 5, size=(40, 6)), axis=0)
    k, length = targets.shape
    # top-k reveals exactly one position per step at N_disc = L (ancestral reveals a random
    # number): with exact conditionals every row is valid ...
    topk = M.exact_factorised_sample(targets, 400, length, seed=1, strategy="topk")
    anc = M.exact_factorised_sample(targets, 400, length, seed=1, strategy="ancestral")
    assert M.validity(M.match_targets(topk, targets)) == 1.0
    assert M.validity(M.match_targets(anc, targets)) < 0.9
    # ... but not uniform: the position revealed is chosen by the confidence of the token
    # drawn there, which favours rows whose tokens are common
    mean, std = M.perfect_sampler_tv(400, k, trials=200, seed=2)
    assert M.tv_to_uniform(M.match_targets(topk, targets), k) > mean + 4 * std
    # a near-zero temperature turns every exact conditional into its mode (ties stay random)
    cold = M.exact_factorised_sample(targets, 50, 1, seed=1, temperature=1e-3)
    for j in range(length):
        counts = np.bincount(targets[:, j], minlength=5)
        assert (counts[cold[:, j]] == counts.max()).all()
    with pytest.raises(ValueError):
        M.exact_factorised_sample(targets, 1, 1, strategy="greedy")


def test_euler_sampler_with_the_exact_denoiser_lands_on_the_targets():
    import torch

    from diladiff.check.latents import exact_prior_x0, latent_landing
    from diladiff.sampling.latent import euler_ode_sample

    gen = torch.Generator().manual_seed(0)
    targets = torch.randn(6, 2, 4, generator=gen)
    x0_fn = exact_prior_x0(targets, d=10.0)
    # t = 1 is pure noise: the exact prediction is the mean of the targets
    z1 = torch.randn(3, 2, 4, generator=gen)
    assert torch.allclose(x0_fn(z1, torch.ones(3)), targets.mean(0).expand(3, 2, 4), atol=1e-5)
    z, _ = euler_ode_sample(x0_fn, (64, 2, 4), 200, 10.0, gen)
    land = latent_landing(z, targets)
    assert land["nn_ratio_median"] < 0.05 and land["targets_nearest"] == 6
    # a learned prior that predicts the mean everywhere lands between the targets
    z_mean, _ = euler_ode_sample(
        lambda z, t, sc=None: targets.mean(0).expand_as(z), (64, 2, 4), 200, 10.0, gen
    )
    assert latent_landing(z_mean, targets)["nn_ratio_median"] > 0.3


# A few-minute check: K = 16 rows of L = 16 tokens, small networks. The prior is trained only
# briefly; the assertions are about the decoder and the sampling path, through the exact
# denoiser of the K latents (`exact_prior`), the controls and the exact-factorised ceiling.
SLOW_OVERRIDES = [
    "data.seq_len=16",
    "model.depth=2",
    "model.width=64",
    "model.heads=2",
    "autoencoder.latent_dim=64",
    "autoencoder.perceiver_heads=2",
    "autoencoder.num_latents=4",
    "prior.depth=1",
    "prior.width=64",
    "prior.heads=2",
    "train.warmup_steps=20",
    "autoencoder.encoder_warmup_steps=20",
    "autoencoder.decoder_warmup_steps=50",
    "meanflow.tangent_warmup_steps=20",
    "diffusion.latent_stats_rows=0",
    "train.progress=false",
    # live fp32 features, as when the margins below were measured (the cache rounds to fp16)
    "autoencoder.feature_cache=false",
]


CHECK_GENERATORS = {
    "mdlm",
    "oracle",
    "noise_latent",
    "exact_factorised",
    "exact_prior_cont200",
    "ladiff_cont200",
    "ladiff_cont5",
    "diladiff_cont5_gamma0",
    "diladiff_cont5_gamma0.2",
}


@pytest.mark.slow
@pytest.mark.e2e
def test_parallel_decoding_check_end_to_end(tmp_path):
    from diladiff.cli import main

    root = tmp_path / "check"
    argv = ["check", "parallel-decoding", "--run-dir", str(root), "--num-sequences", "16"]
    steps = "mdlm=300,autoencoder=1500,ladiff=2000,diladiff=30"
    argv += ["--num-samples", "128", "--steps", steps]
    code = main(argv + SLOW_OVERRIDES)
    result = json.loads((root / "check.json").read_text())
    assert code == (0 if result["verdict"]["diagnosis"] == "every link passes" else 1)
    assert (root / "check.png").stat().st_size > 0 and "## Validity" in (
        root / "check.md"
    ).read_text()
    g = result["generators"]
    assert set(g) >= CHECK_GENERATORS
    val = {name: {r["disc_steps"]: r["validity"] for r in gen["rows"]} for name, gen in g.items()}
    assert result["disc_steps"] == [1, 2, 4, 8, 16]
    # the factorised posterior cannot reveal a whole row in one or two steps, even when exact
    assert val["exact_factorised"][1] == 0 and val["exact_factorised"][2] < 0.1
    assert val["mdlm"][2] < 0.1
    # given the latent of the row (oracle) or an exact prior sample, it can: the mechanism
    assert val["oracle"][2] >= val["mdlm"][2] + 0.3
    assert val["exact_prior_cont200"][2] >= val["mdlm"][2] + 0.3
    # the exact prior's samples sit on the K latents; the controls do not read the row
    assert g["exact_prior_cont200"]["latent"]["nn_ratio_median"] < 0.05
    assert val["noise_latent"][2] < 0.1

    # The paper's confidence-based (top-k) unmasking, same trained stages (sampling only):
    # results beside the ancestral ones, one token per step exact for an exact MDLM, and the
    # decoder given the row's latent reproduces it when 2 steps reveal 8 tokens each.
    assert main(argv + ["--strategy", "topk"] + SLOW_OVERRIDES) in (0, 1)
    assert (root / "check.json").read_text() == json.dumps(result, indent=2) + "\n"
    topk = json.loads((root / "check_topk_t1.json").read_text())
    assert topk["sampler"].startswith("topk, temperature 1")
    tv = {
        n: {r["disc_steps"]: r["validity"] for r in gen["rows"]}
        for n, gen in topk["generators"].items()
    }
    assert tv["exact_factorised"][16] == 1.0 and tv["exact_factorised"][2] == 0
    match = {r["disc_steps"]: r["oracle_match"] for r in topk["generators"]["oracle"]["rows"]}
    assert match[2] >= 0.9
    assert tv["exact_prior_cont200"][2] >= 0.9 and tv["mdlm"][2] < 0.1
    # The learned prior (2,000 steps) carries the mechanism: two steps of 8 tokens give whole
    # rows (0.85 when measured), where the MDLM gives none.
    assert tv["ladiff_cont200"][2] >= tv["mdlm"][2] + 0.3


def test_parallel_decoding_check_wiring_on_a_briefly_trained_chain(tmp_path):
    """The fast twin of the end-to-end check: the same files on a chain trained a few steps
    (no margin is expected of it), with two registered methods beside it (one drawn by its
    generation kind with its own strategies, one latent), ancestral then top-k from the same
    trained stages."""
    from diladiff.check.parallel_decoding import run_check
    from diladiff.check.plan import CheckPlan
    from diladiff.config import ConfigError
    from diladiff.pipeline import row_name
    from diladiff.stages import STAGES

    root = tmp_path / "check"
    methods = ("duo", "ldlm")
    steps = {k: 3 for k in ("mdlm", "autoencoder", "ladiff", "diladiff", *methods)}
    warmups = ["train.warmup_steps=1", "autoencoder.encoder_warmup_steps=1"]
    warmups += ["autoencoder.decoder_warmup_steps=1", "meanflow.tangent_warmup_steps=1"]
    warmups += ["ldlm.encoder_warmup_steps=1"]

    def check(strategy: str) -> dict:
        plan = CheckPlan(num_samples=8, steps=dict(steps), strategy=strategy)
        return run_check(root, "tiny", SLOW_OVERRIDES + warmups, 16, plan=plan, methods=methods)

    with pytest.raises(ConfigError, match="trains no stage 'duo', 'ldlm'"):
        run_check(root, "tiny", [], 16, plan=CheckPlan(steps=dict(steps)))
    assert not root.exists() or not any(root.iterdir())  # refused before any work

    result = check("ancestral")
    assert result == json.loads((root / "check.json").read_text())
    assert (root / "check.png").stat().st_size > 0
    md = (root / "check.md").read_text()
    assert "## Validity" in md
    assert result["disc_steps"] == [1, 2, 4, 8, 16]
    assert result["steps"] == steps
    assert all((root / kind / "COMPLETE").is_file() for kind in steps)
    g = result["generators"]
    # every sampler the methods' stages declare, named as the pipeline names its rows
    method_rows = {row_name(k, s, None) for k in methods for s in STAGES[k].eval_samplers}
    assert {"duo_ancestral", "duo_greedy_tail", "ldlm_cont32"} <= method_rows
    assert set(g) == CHECK_GENERATORS | method_rows | {"ldlm_oracle"}
    for name, gen in g.items():
        assert [r["disc_steps"] for r in gen["rows"]] == [1, 2, 4, 8, 16], name
        assert all(0.0 <= r["validity"] <= 1.0 for r in gen["rows"]), name
    assert (g["duo_greedy_tail"]["stage"], g["duo_greedy_tail"]["strategy"]) == (
        "duo",
        "greedy_tail",
    )
    # a latent method: where its samples land among its own encoder's latents, its own oracle
    assert g["ldlm_cont32"]["cont_steps"] == 32 and "nn_ratio_median" in g["ldlm_cont32"]["latent"]
    assert all("oracle_match" in r for r in g["ldlm_oracle"]["rows"])
    assert "| ldlm_oracle |" in md.split("## Oracle")[1]
    # the exact prior needs no training: its samples sit on the K latents already
    assert g["exact_prior_cont200"]["latent"]["nn_ratio_median"] < 0.05

    topk = check("topk")
    assert (root / "check.json").read_text() == json.dumps(result, indent=2) + "\n"
    assert topk == json.loads((root / "check_topk_t1.json").read_text())
    assert topk["sampler"].startswith("topk, temperature 1")
    assert set(topk["generators"]) == set(g)
    tv = {r["disc_steps"]: r["validity"] for r in topk["generators"]["exact_factorised"]["rows"]}
    assert tv[16] == 1.0 and tv[2] == 0
    # a method's own strategies win over the plan's: its rows are the same samples
    for name in ("duo_ancestral", "duo_greedy_tail"):
        assert topk["generators"][name] == g[name]


def _gen(validity: list[float], coverage: list[float], cont: int | None = None, match=None):
    rows = [
        {"disc_steps": n, "validity": v, "coverage": c, "oracle_match": m}
        for n, v, c, m in zip([1, 2, 4, 8, 16], validity, coverage, match or validity, strict=True)
    ]
    return {"rows": rows, **({"cont_steps": cont} if cont else {})}


def test_verdict_judges_ladiff_at_its_teacher_sampler_and_blames_the_distillation():
    good, bad = [0.95] * 5, [0.1, 0.5, 0.9, 0.95, 0.97]
    full = [1.0] * 5
    gens = {
        "exact_factorised": _gen([0, 0, 0.1, 0.4, 1.0], full),
        "mdlm": _gen([0, 0, 0.1, 0.5, 0.95], full),
        "oracle": _gen(good, full),
        "exact_prior_cont200": _gen(good, full, 200),
        "ladiff_cont200": _gen(good, full, 200),
        "ladiff_cont5": _gen(bad, full, 5),  # a few Euler steps of the teacher: expected to fail
        "diladiff_cont5_gamma0": _gen(bad, full, 5),
    }
    v = verdict(gens, 16)
    assert v["mdlm_valid_at_L"] and v["mdlm_drops_by_L8"] and v["ladiff_cont200_valid_at_1_2"]
    assert not v["ladiff_cont5_valid_at_1_2"]
    assert v["diagnosis"].startswith("LaDiff works (ladiff_cont200) but DiLaDiff does not")
    gens["diladiff_cont5_gamma0"] = _gen(good, full, 5)
    assert verdict(gens, 16)["diagnosis"] == "every link passes"
    gens["diladiff_cont5_gamma0"] = _gen(good, [0.5] * 5, 5)  # valid but collapsed onto few rows
    assert "distillation" in verdict(gens, 16)["diagnosis"]
    gens["ladiff_cont200"] = _gen(bad, full, 200)
    assert verdict(gens, 16)["diagnosis"].endswith("LaDiff does not (ladiff_cont200): the prior")
