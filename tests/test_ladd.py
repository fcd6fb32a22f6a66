"""LADD: the joint and sequential samplers on a known network (reveal probabilities, call
counts, which channel moves when), and Co-LADD / Di-LADD training, resume, DDP and sampling."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from diladiff.cli import main
from diladiff.methods.ladd.sampler import JointSettings, reveal, sample_joint
from diladiff.sampling.conditioning import Condition
from diladiff.sampling.generate import GenerationSettings
from diladiff.sampling.masked import SamplerSettings
from diladiff.train.checkpoint import latest_checkpoint

V, L, NZ, DZ, MASK = 6, 8, 2, 3, 5
PROBS = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25, 0.0])  # the mask id never drawn (SUBS)


def settings(steps, strategy="ancestral", temperature=1.0):
    return SamplerSettings(steps=steps, strategy=strategy, temperature=temperature, top_p=1.0)


def test_reveal_unmasks_with_the_posterior_probability_and_draws_from_the_softmax():
    gen = torch.Generator().manual_seed(0)
    x = torch.full((4000, L), MASK)
    logits = PROBS.clamp(min=1e-9).log().expand(4000, L, V).clone()
    out = reveal(x, logits, MASK, 1.0, 0.75, settings(4), gen)  # (t - s) / t = 1/4
    revealed = out != MASK
    assert revealed.float().mean().item() == pytest.approx(0.25, abs=0.01)
    freq = torch.bincount(out[revealed], minlength=V).float() / revealed.sum()
    assert torch.allclose(freq, PROBS, atol=0.01)
    again = reveal(out, logits, MASK, 0.75, 0.0, settings(4), gen)  # s = 0: everything
    assert (again != MASK).all() and torch.equal(again[revealed], out[revealed])


class FakeNet:
    """A known network: constant token logits, a fixed clean-latent guess; records its calls."""

    def __init__(self, discrete: bool):
        self.discrete, self.calls = discrete, []

    def __call__(self, x, z_in, t_z):
        self.calls.append((x.clone(), z_in.clone(), None if t_z is None else t_z.clone()))
        logits = PROBS.clamp(min=1e-9).log().expand(*x.shape, V).clone()
        if self.discrete:
            return logits, torch.zeros(*z_in.shape[:2], 4)  # 3 codes + the mask code (id 3)
        return logits, torch.full_like(z_in, 0.5)


def fake_stage(discrete: bool):
    stage = SimpleNamespace(
        seq_len=L,
        mask_id=MASK,
        latent_shape=(NZ, DZ),
        latent_kind="discrete" if discrete else "continuous",
        cfg=SimpleNamespace(ladd=SimpleNamespace(t_eps=1e-4)),
        net=FakeNet(discrete),
    )
    if discrete:
        stage.code_mask_id = 3
        stage.vq = SimpleNamespace(embed=lambda c: torch.nn.functional.one_hot(c, 4).float())
    return stage


@pytest.mark.parametrize("discrete", [False, True])
@pytest.mark.parametrize("inference", ["joint", "sequential"])
def test_joint_and_sequential_samplers_call_the_network_as_documented(discrete, inference):
    stage = fake_stage(discrete)
    gs = GenerationSettings(settings(4), method=JointSettings(inference, latent_steps=3))
    ids, stats = sample_joint(stage, 2000, gs, torch.Generator().manual_seed(1), "cpu")
    latent = 3 if inference == "sequential" else 0
    assert stats["disc_nfe"] == 4 + 1 + latent and stats["cont_nfe"] == latent
    assert len(stage.net.calls) == stats["disc_nfe"]
    assert (ids != MASK).all()
    freq = torch.bincount(ids.flatten(), minlength=V).float() / ids.numel()
    assert torch.allclose(freq, PROBS, atol=0.01)  # every token from the model's distribution
    token_calls = stage.net.calls[latent:]
    if inference == "sequential":
        # phase A: tokens all masked while the latent moves; phase B: the latent fixed
        assert all((x == MASK).all() for x, _, _ in stage.net.calls[:latent])
        z_fixed = token_calls[0][1]
        assert all(torch.equal(z, z_fixed) for _, z, _ in token_calls)
        if not discrete:
            assert all((t == 0).all() for _, _, t in token_calls)  # a clean latent
            assert torch.allclose(z_fixed, torch.full_like(z_fixed, 0.5), atol=0.1)
        else:
            assert (z_fixed.argmax(-1) != 3).all()  # every code revealed before the tokens
    else:
        zs = [z for _, z, _ in token_calls]
        assert not torch.equal(zs[0], zs[-1])  # both channels move in the same calls
        assert (token_calls[0][0] == MASK).all() and not (token_calls[-1][0] == MASK).all()


@pytest.mark.parametrize("discrete", [False, True])
@pytest.mark.parametrize("inference", ["joint", "sequential"])
@pytest.mark.parametrize("strategy", ["ancestral", "topk"])
def test_a_canvas_keeps_its_tokens_in_every_call(discrete, inference, strategy):
    """The token stream starts from the canvas: every network call (the latent steps of
    sequential inference too) reads the given tokens, the output keeps them, and top-k reveals
    the M = 4 masked positions one per step (the token times scaled by the masked share)."""
    stage = fake_stage(discrete)
    canvas = (0, 1, MASK, MASK, MASK, MASK, 2, 3)
    given = torch.tensor(canvas) != MASK
    cond = Condition(canvas=canvas)
    gs = GenerationSettings(
        settings(4, strategy), method=JointSettings(inference, 3), condition=cond
    )
    ids, stats = sample_joint(stage, 64, gs, torch.Generator().manual_seed(1), "cpu")
    assert (ids[:, given] == torch.tensor(canvas)[given]).all() and (ids != MASK).all()
    assert all((x[:, given] == torch.tensor(canvas)[given]).all() for x, _, _ in stage.net.calls)
    latent = 3 if inference == "sequential" else 0
    masked = [int((x == MASK).sum(1).max()) for x, _, _ in stage.net.calls[latent:]]
    if strategy == "topk":
        assert masked == [4, 3, 2, 1, 0]


@pytest.mark.parametrize("discrete", [False, True])
@pytest.mark.parametrize("inference", ["joint", "sequential"])
def test_a_reference_latent_is_held_fixed_without_latent_steps(discrete, inference):
    """latent_from: the stage's reference_latent of the reference ids is the latent of every
    call (Co-LADD at t_z = 0); no latent steps in either inference."""
    stage = fake_stage(discrete)
    seen = []
    if discrete:
        ref = torch.tensor([[1, 2]])
        want = stage.vq.embed(ref)
    else:
        ref = want = torch.full((1, NZ, DZ), 0.3)
    stage.reference_latent = lambda x0: (seen.append(x0), ref)[1]
    cond = Condition(latent_ids=tuple(range(L)))
    gs = GenerationSettings(settings(4), method=JointSettings(inference, 3), condition=cond)
    ids, stats = sample_joint(stage, 8, gs, torch.Generator().manual_seed(1), "cpu")
    assert stats["cont_nfe"] == 0 and stats["disc_nfe"] == len(stage.net.calls) == 5
    assert seen[0].tolist() == [list(range(L))] and (ids != MASK).all()
    for _, z, t in stage.net.calls:
        assert torch.equal(z, want.expand_as(z))
        assert discrete or (t == 0).all()


SMALL = [
    "ladd.width=32",
    "ladd.depth=1",
    "ladd.heads=2",
    "ladd.cond_dim=16",
    "ladd.num_latents=4",
    "ladd.latent_dim=8",
    "ladd.num_codes=17",
]


def train(kind, run, *overrides):
    argv = ["train", kind, "--preset", "tiny", "--run-dir", str(run), *TINY, *SMALL]
    return main(argv + list(overrides))


@pytest.mark.parametrize("kind", ["co-ladd", "di-ladd"])
def test_ladd_resumes_exactly_and_samples_both_ways(tmp_path, kind):
    # Co-LADD samples sequentially only when trained with independent times
    extra = ["ladd.stage1_steps=3"] if kind == "di-ladd" else ["ladd.independent_times=true"]
    assert train(kind, tmp_path / "a", "train.max_steps=2", *extra) == 0
    assert train(kind, tmp_path / "a", "train.max_steps=5") == 0
    assert train(kind, tmp_path / "b", "train.max_steps=5", *extra) == 0
    for which in ("model", "ema"):
        a = load_file(latest_checkpoint(tmp_path / "a") / f"{which}.safetensors")
        b = load_file(latest_checkpoint(tmp_path / "b") / f"{which}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), which
    for inference in ("joint", "sequential"):
        out = tmp_path / f"{inference}.jsonl"
        argv = ["sample", str(tmp_path / "b"), "--out", str(out), "--disc-steps", "4"]
        assert main(argv + ["--inference", inference, "--cont-steps", "2"]) == 0
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
        assert len(rows) == 4 and all(len(r["ids"]) == 32 for r in rows)
        assert meta["inference"] == inference
        assert meta["cont_nfe"] == (2 if inference == "sequential" else 0)


def test_di_ladd_trains_the_code_channel_only_after_stage_one():
    from diladiff.config import build_config
    from diladiff.data.tokenizer import load_tokenizer, tokenizer_identity
    from diladiff.methods.ladd.stage import DiLADD

    cfg = build_config("tiny", TINY + SMALL + ["ladd.stage1_steps=10"], "di-ladd")
    stage = DiLADD(cfg, tokenizer_identity(load_tokenizer(cfg.data.tokenizer)))
    stage.train()
    stage.on_step(9)
    assert stage.lambda_z() == 0.0
    stage.on_step(10)
    assert stage.lambda_z() == 1.0
    stage.eval()
    stage.on_step(0)
    assert stage.lambda_z() == 1.0  # validation always reports the full loss


@pytest.mark.parametrize("preset", ["paper", "tiny"])
def test_matched_mdlm_has_as_many_block_parameters_as_the_mm_dit(preset):
    from diladiff.config import build_config
    from diladiff.methods.ladd.mmdit import MMDiT
    from diladiff.methods.ladd.stage import matched_mdlm
    from diladiff.nets.token_denoiser import TokenDenoiser

    cfg = build_config(preset, [], "co-ladd")
    m = matched_mdlm(cfg)
    lc = cfg.ladd
    with torch.device("meta"):
        ladd = MMDiT(8, 8, 1, 1, 1, lc.width, lc.depth, lc.heads, lc.cond_dim)
        cfg.model.depth, cfg.model.width, cfg.model.heads = m["depth"], m["width"], m["heads"]
        mdlm = TokenDenoiser(cfg.model, 8, 8)
    target = ladd.parameter_count(blocks_only=True)
    got = sum(p.numel() for p in mdlm.backbone.blocks.parameters())
    assert m["depth"] == lc.depth + 1 and abs(got - target) / target < 0.05


def test_sibling_methods_run_through_the_pipeline_beside_each_other(tmp_path, monkeypatch):
    from dataclasses import replace

    from test_ldlm import SMALL as LDLM_SMALL
    from test_plugins import SMALL_PLAN

    from diladiff import pipeline

    plan = replace(SMALL_PLAN, latent_samples=8, latent_train_rows=12)
    monkeypatch.setitem(pipeline.EVAL_PLANS, "tiny", plan)
    root = tmp_path / "pipe"
    overrides = [*TINY, *SMALL, *LDLM_SMALL, "train.max_steps=2", "ldlm.encoder_warmup_steps=2"]
    args = ["--preset", "tiny", "--run-dir", str(root), "--device", "cpu"]
    assert main(["pipeline", "--stages", "ldlm,co-ladd", *args, *overrides]) == 0
    assert not (root / "mdlm").exists()  # neither method has a parent run
    report = (root / "report.md").read_text()
    rows = ["ldlm_cont32", "ldlm_cont128", "co-ladd_joint_disc4", "co-ladd_joint_disc32"]
    assert all(f"| {row} |" in report for row in rows), report
    assert "co-ladd_sequential" not in report  # shared times: joint inference only
    bench = json.loads((root / "eval" / "bench.json").read_text())
    assert {r["stage"] for r in bench} == {"ldlm", "co-ladd"}
    latent = json.loads((root / "eval" / "latent.json").read_text())  # LDLM's prior diagnostics
    assert "ldlm" in json.dumps(latent)
