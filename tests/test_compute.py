"""LADD compute accounting (eval/compute.py): the per-call formula against the paper's Table 12
figures, sample totals charged at the positions a real sample runs on, iso-compute
interpolation that never extrapolates, and `diladiff compare-compute` (eval/iso_compute.py)
wired with a stand-in sweep."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import TINY
from test_ladd import SMALL as LADD_SMALL

from diladiff.cli import main
from diladiff.config import build_config
from diladiff.eval import iso_compute
from diladiff.eval.compute import (
    doubling_budgets,
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
    # sequential: the latent calls run the MM-DiT over L + N_z positions too
    # (methods/ladd/sampler.py)
    seq = ladd_sequential_gflops(8, 5, 12, 768, 128, 32)
    assert seq == pytest.approx(13 * per(12, 768, 160))
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


def test_doubling_budgets_cover_the_measured_range():
    assert doubling_budgets([3.0, 20.0, 9.0]) == [4.0, 8.0, 16.0]
    assert doubling_budgets([0.3, 1.0]) == [0.5, 1.0]
    assert doubling_budgets([]) == [] and doubling_budgets([0.0]) == []


# ---------------------------------------------------------------- charged = what runs
@pytest.fixture(scope="module")
def ladd_runs():
    """A Co-LADD (trained-for-sequential config: independent times) and a Di-LADD stage of the
    tests' tiny size, untrained (the accounting depends on the calls, not on the weights)."""
    from diladiff.data.tokenizer import load_tokenizer, tokenizer_identity
    from diladiff.stages import STAGES

    out = {}
    for kind, extra in (("co-ladd", ["ladd.independent_times=true"]), ("di-ladd", [])):
        cfg = build_config("tiny", TINY + LADD_SMALL + extra, kind)
        tok = load_tokenizer(cfg.data.tokenizer)
        out[kind] = (STAGES[kind](cfg, tokenizer_identity(tok)).eval(), tok)
    return out


@pytest.mark.parametrize("kind", ["co-ladd", "di-ladd"])
@pytest.mark.parametrize("inference", ["joint", "sequential"])
def test_charged_gflops_are_the_positions_the_sampler_runs(ladd_runs, kind, inference):
    """Record the positions (tokens + latents) of every MM-DiT call of a real sample (2 batches)
    and price each call with the per-call formula: the frontier's charge (sample_gflops, from
    the sampler's call counts) must be that sum. Sequential inference's latent steps run the
    MM-DiT over L + N_z positions, not N_z."""
    from diladiff.eval.frontier import sample_gflops
    from diladiff.sampling.generate import generate

    stage, tok = ladd_runs[kind]
    positions = []
    hook = stage.net.register_forward_pre_hook(
        lambda module, args: positions.append(args[0].shape[1] + args[1].shape[1])
    )
    sc = copy.deepcopy(stage.cfg.sample)
    sc.num_samples, sc.batch_size, sc.disc_steps = 4, 2, 3
    sc.inference, sc.cont_steps = inference, 2
    try:
        out = generate(stage, tok, sc, "cpu", progress=False)
    finally:
        hook.remove()
    batches = 2
    assert len(positions) == out.stats["disc_nfe"] == batches * (3 + 1 + 2 * (inference != "joint"))
    d = stage.network_dims()
    executed = sum(gflops_per_call(d["blocks"], d["width"], n) for n in positions) / batches
    assert sample_gflops(stage, out.stats, batches) == pytest.approx(executed, rel=1e-12)


@pytest.mark.parametrize("kind", ["mdlm", "duo"])
def test_single_transformer_samplers_are_charged_their_calls_over_l_positions(kind):
    """MDLM and DUO declare their network (SizedNetwork): the frontier charges each sample its
    denoiser calls over L positions, the calls counted by a hook on the network."""
    from diladiff.data.tokenizer import load_tokenizer, tokenizer_identity
    from diladiff.eval.frontier import sample_gflops
    from diladiff.sampling.generate import generate
    from diladiff.stages import STAGES

    cfg = build_config("tiny", TINY, kind)
    tok = load_tokenizer(cfg.data.tokenizer)
    stage = STAGES[kind](cfg, tokenizer_identity(tok)).eval()
    positions = []
    hook = stage.net.backbone.register_forward_pre_hook(
        lambda m, args: positions.append(args[0].shape[1])
    )
    sc = copy.deepcopy(stage.cfg.sample)
    sc.num_samples, sc.batch_size, sc.disc_steps, sc.cache = 4, 2, 3, False
    try:
        out = generate(stage, tok, sc, "cpu", progress=False)
    finally:
        hook.remove()
    mc, batches = cfg.model, 2
    executed = sum(gflops_per_call(mc.depth, mc.width, n) for n in positions) / batches
    assert positions and executed > 0
    assert sample_gflops(stage, out.stats, batches) == pytest.approx(executed, rel=1e-12)


# ---------------------------------------------------------------- compare-compute
def fake_run(folder, kind, *overrides):
    folder.mkdir(parents=True)
    build_config("tiny", TINY + list(overrides), kind).save(folder / "config.json")
    (folder / "run.json").write_text(json.dumps({"stage": kind}))
    return folder


@pytest.fixture
def runs(tmp_path):
    """Run folders (config and run.json only): a shared-time Co-LADD, a Di-LADD, their
    size-matched MDLM and an MDLM of the tests' TINY size (not matched)."""
    from diladiff.methods.ladd.stage import matched_mdlm

    co = fake_run(tmp_path / "co", "co-ladd", *LADD_SMALL)
    di = fake_run(tmp_path / "di", "di-ladd", *LADD_SMALL)
    m = matched_mdlm(build_config("tiny", TINY + LADD_SMALL, "co-ladd"))
    dims = [f"model.{k}={v}" for k, v in m.items()]
    matched = fake_run(tmp_path / "m", "mdlm", *dims)
    small = fake_run(tmp_path / "m_small", "mdlm")
    return {"co": co, "di": di, "mdlm": matched, "small": small, "dims": dims}


def test_compare_compute_names_the_mdlm_to_train(runs, tmp_path, capsys):
    base = ["compare-compute", str(runs["co"]), str(runs["di"]), "--out", str(tmp_path / "o")]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "diladiff train mdlm" in err and all(d in err for d in runs["dims"])
    assert main([*base, "--mdlm", str(runs["small"])]) == 2
    err = capsys.readouterr().err
    assert "not size-matched" in err and all(d in err for d in runs["dims"])
    assert main([*base, "--mdlm", str(runs["co"])]) == 2  # a LADD run is no MDLM
    assert not (tmp_path / "o").exists()


def test_compare_compute_sweeps_every_method_and_interpolates_at_the_budgets(
    runs, tmp_path, monkeypatch, capsys
):
    """A stand-in sweep whose GenPPL is 1000 - GFLOPs: at a budget inside a method's measured
    range the table reads 1000 - budget, outside it n/a. The MDLM and each LADD inference the
    run was trained for are swept (the shared-time Co-LADD skips sequential), with N_y."""
    calls = []
    rate = {"mdlm": 1.0, "co-ladd": 1.5, "di-ladd": 2.0}

    def sweep(run, points, num_samples, scorer, reference, out_dir, device, seed, bs, cache, name):
        calls.append((run.name, points, reference))
        kind = json.loads((run / "run.json").read_text())["stage"]
        rows = []
        for p in points:
            g = rate[kind] * p["disc_steps"] * (2 if p.get("inference") == "sequential" else 1)
            rows.append(
                {"run": f"{name} ({kind})", **p, "gflops_per_sample": g, "gen_ppl": 1000 - g}
                | {"entropy": 4.0, "protocol": {}}
            )
        return rows

    monkeypatch.setattr(iso_compute.frontier, "sweep_run", sweep)
    out = tmp_path / "cmp"
    argv = ["compare-compute", str(runs["co"]), str(runs["di"]), "--mdlm", str(runs["mdlm"])]
    argv += ["--disc-steps", "2,8", "--budgets", "3,10,20", "--cont-steps", "3", "--out", str(out)]
    assert main(argv) == 0
    assert [c[0] for c in calls] == ["m", "co", "di"]
    assert calls[0][1] == [{"disc_steps": 2}, {"disc_steps": 8}]
    assert calls[0][2] == str(runs["mdlm"])  # MAUVE against the MDLM's held-out split
    assert calls[1][1] == [{"inference": "joint", "disc_steps": n} for n in (2, 8)]
    assert calls[2][1] == [{"inference": "joint", "disc_steps": n} for n in (2, 8)] + [
        {"inference": "sequential", "disc_steps": n, "cont_steps": 3} for n in (2, 8)
    ]
    res = json.loads((out / "compute.json").read_text())
    assert res["size_match"]["matched"] and res["budgets"] == [3.0, 10.0, 20.0]
    assert res["skipped"] == [
        {"run": str(runs["co"]), "inference": "sequential", "trained": ["joint"]}
    ]
    table = {r["method"]: r["values"] for r in res["tables"]["gen_ppl"]}
    measured = {  # method -> its GFLOPs range
        "m (mdlm)": (2, 8),
        "co (co-ladd), joint": (3, 12),
        "di (di-ladd), joint": (4, 16),
        "di (di-ladd), sequential": (8, 32),
    }
    assert set(table) == set(measured)
    for name, (lo, hi) in measured.items():
        want = [1000 - b if lo <= b <= hi else None for b in (3, 10, 20)]
        assert table[name] == pytest.approx(want), name
    assert "entropy" in res["tables"] and "mauve" not in res["tables"]
    md = (out / "compute.md").read_text()
    assert "| di (di-ladd), sequential | n/a | 990 | 980 |" in md
    assert (out / "compute.png").read_bytes()[:4] == b"\x89PNG"
    assert "skipped: " in capsys.readouterr().out
