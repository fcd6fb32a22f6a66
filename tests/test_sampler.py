import json
import math

import pytest
import torch
from conftest import TINY
from torch import nn

from diladiff.processes.masking import reverse_posterior
from diladiff.sampling.masked import (
    SamplerSettings,
    TokenDecoder,
    draw_rows,
    draws_from_logits,
    gumbel_argmax,
    gumbel_argmax_,
    reveal_ancestral,
    reveal_threshold,
    reveal_topk,
    sample_masked,
    sampling_logits,
    top_p_filter,
)

V, MASK, L, W = 6, 6, 12, 5  # tokens 0..5, mask id 6 (its logit is set to -inf), width 5


def make_decoder(seed=0, latent=None, dtype=torch.float64):
    """A fixed random 'network' over a vocabulary of 7 (mask included): hidden states depend on
    every token of x (and on a per-row latent (B, W) when given), the head is a linear map."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V + 1, L, W, generator=g, dtype=dtype)
    proj = torch.randn(W, V + 1, generator=g, dtype=dtype)
    calls = {"hidden": 0, "head_rows": 0, "states": []}

    def hidden(x):
        calls["hidden"] += 1
        calls["states"].append(x.clone())
        h = table[x, torch.arange(x.shape[1])]
        h = h + 0.3 * (x != MASK).sum(1, keepdim=True).unsqueeze(-1).to(dtype)
        return h if latent is None else h + latent.unsqueeze(1)

    def head(rows):
        calls["head_rows"] += rows[..., 0].numel()
        return rows @ proj

    return TokenDecoder(hidden, head, MASK), calls


def sample(decoder, batch=16, seed=1, **settings):
    settings = SamplerSettings(**{"steps": 5, **settings})
    return sample_masked(decoder, batch, L, MASK, settings, torch.Generator().manual_seed(seed))


SETTINGS = [
    {"strategy": "ancestral"},
    {"strategy": "ancestral", "temperature": 0.7, "top_p": 0.8},
    {"strategy": "ancestral", "steps": 40},  # many steps reveal nothing: the cache's case
    {"strategy": "ancestral", "float64_gumbel": False, "cache": False},
    {"strategy": "topk"},
    {"strategy": "topk", "temperature": 1.3, "top_p": 0.9},
    {"strategy": "topk", "steps": 3},  # L / N_disc not an integer
    {"strategy": "threshold"},
    {"strategy": "threshold", "threshold": 0.3, "temperature": 0.5},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("latent", [False, True], ids=["plain", "latent"])
def test_fast_and_reference_give_identical_samples(settings, latent):
    z = torch.randn(16, W, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out = {}
    for sampler in ("reference", "fast"):
        decoder, calls = make_decoder(latent=z if latent else None)
        x, stats = sample(decoder, sampler=sampler, **settings)
        out[sampler] = (x, stats, calls)
    (ref, ref_stats, _), (fast, fast_stats, fast_calls) = out["reference"], out["fast"]
    assert (ref != MASK).all() and torch.equal(fast, ref)
    assert fast_stats.steps == ref_stats.steps
    assert fast_stats.nfe <= ref_stats.nfe and fast_stats.nfe == fast_calls["hidden"]
    assert fast_stats.head_rows == fast_calls["head_rows"] < ref_stats.head_rows
    if latent:  # the latent is used: another latent gives other samples
        other, _ = sample(make_decoder(latent=-z)[0], **settings)
        assert not torch.equal(other, fast)


def test_fast_ancestral_runs_the_head_once_per_position():
    decoder, calls = make_decoder()
    x, stats = sample(decoder, batch=16, steps=4)
    assert stats.head_rows == calls["head_rows"] == 16 * L
    # top-k draws at every masked position of every step: L + 3L/4 + L/2 + L/4 rows per sequence
    decoder, calls = make_decoder()
    _, stats = sample(decoder, batch=16, steps=4, strategy="topk")
    assert stats.head_rows == 16 * (L + 9 + 6 + 3)


def test_nfe_counts():
    # reference without cache: one network call per step taken (decoding stops early once
    # nothing is masked); with the cache, one per changed x_t
    decoder, calls = make_decoder()
    _, ref = sample(decoder, batch=2, steps=48, sampler="reference", cache=False)
    assert ref.nfe == ref.steps > 24
    decoder, calls = make_decoder()
    _, cached = sample(decoder, batch=2, steps=48, sampler="reference")
    states = calls["states"]
    assert cached.nfe == len(states) < 48
    assert all(not torch.equal(a, b) for a, b in zip(states, states[1:], strict=False))
    # fast: the trunk only at states where something is drawn, never twice on one state
    decoder, calls = make_decoder()
    x, fast = sample(decoder, batch=2, steps=48)
    assert fast.nfe == calls["hidden"] <= cached.nfe
    assert len({tuple(s.ravel().tolist()) for s in calls["states"]}) == fast.nfe
    # top-k reveals at every step (k >= 1), so the trunk runs every step
    decoder, calls = make_decoder()
    _, topk = sample(decoder, batch=2, steps=6, strategy="topk")
    assert topk.nfe == topk.steps == 6


@pytest.mark.parametrize("sampler", ["fast", "reference"])
@pytest.mark.parametrize("strategy", ["ancestral", "topk", "threshold"])
def test_no_mask_remains_and_revealed_tokens_never_change(strategy, sampler):
    decoder, calls = make_decoder()
    x, stats = sample(decoder, strategy=strategy, sampler=sampler, cache=False)
    assert (x != MASK).all() and x.max() < V
    history = [*calls["states"], x]
    assert len(history) >= 3
    for before, after in zip(history, history[1:], strict=False):
        fixed = before != MASK
        assert torch.equal(after[fixed], before[fixed])


@pytest.mark.parametrize("sampler", ["fast", "reference"])
@pytest.mark.parametrize("strategy", ["ancestral", "topk", "threshold"])
def test_cached_and_uncached_sampling_are_identical(strategy, sampler):
    """48 steps for L = 12: most steps reveal nothing (top-k: k = 0), so x_t often repeats."""
    out = {}
    for cache in (True, False):
        decoder, calls = make_decoder()
        x, stats = sample(
            decoder, batch=2, steps=48, cache=cache, sampler=sampler, strategy=strategy
        )
        out[cache] = (x, stats.nfe)
    assert torch.equal(out[True][0], out[False][0])
    if strategy == "threshold" or (sampler == "fast" and strategy == "ancestral"):
        # fast ancestral draws (and runs the trunk) only at steps that reveal, which then change
        # x_t; threshold reveals at least one token per row every step: each state is seen once,
        # with or without the cache
        assert out[True][1] == out[False][1]
    else:
        assert out[True][1] < out[False][1]


@pytest.mark.parametrize("float64", [True, False])
def test_chunked_draws_continue_one_stream(float64):
    """draw_rows' chunks consume the generator as the reference's single draw does."""
    decoder, _ = make_decoder()
    rows = torch.randn(37, W, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    settings = SamplerSettings(steps=1, float64_gumbel=float64, temperature=0.9, top_p=0.95)
    logits = sampling_logits(decoder.logits(rows).log_softmax(-1), settings)
    sel = torch.ones(37, dtype=torch.bool)
    want, want_conf = draws_from_logits(logits, settings, torch.Generator().manual_seed(5))(
        sel, True
    )
    for chunk in (1, 4, 36, None):
        got, conf = draw_rows(
            decoder, rows, settings, torch.Generator().manual_seed(5), True, chunk_rows=chunk
        )
        assert torch.equal(got, want) and torch.equal(conf, want_conf)


def test_in_place_gumbel_equals_the_reference_gumbel():
    logits = torch.randn(50, 300).log_softmax(-1)
    want = gumbel_argmax(logits, torch.Generator().manual_seed(0))
    u = torch.rand(50, 300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(gumbel_argmax_(u, logits), want)


# ------------------------------------------------------------------ real stages (float64)


def _tiny_identity():
    from diladiff.data.tokenizer import load_tokenizer, tokenizer_identity

    return tokenizer_identity(load_tokenizer("minilm-l6"))


class _StubFeatures(nn.Module):
    """Stands in for the frozen BERT (only the encoder reads it): no weights to load."""

    dim = 16

    def __init__(self, name, layer=-1, precision="auto"):
        super().__init__()
        self.name = name

    def tokenizer_identity(self):
        return _tiny_identity()


def _stage(kind, monkeypatch):
    from diladiff.config import build_config
    from diladiff.methods.autoencoder.stage import Autoencoder
    from diladiff.methods.mdlm.stage import MDLM

    extra = ["data.seq_len=16", "autoencoder.latent_dim=8", "autoencoder.num_latents=4"]
    cfg = build_config("tiny", [*TINY, *extra], stage="autoencoder")
    torch.manual_seed(0)
    if kind == "mdlm":
        stage = MDLM(cfg, _tiny_identity())
    else:
        monkeypatch.setattr("diladiff.methods.autoencoder.stage.FeatureModel", _StubFeatures)
        stage = Autoencoder(cfg, _tiny_identity())
        with torch.no_grad():  # wake the zero-initialised cross-attention outputs
            for p in stage.cross.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return stage.double().eval()


@pytest.mark.parametrize("strategy", ["ancestral", "topk", "threshold"])
@pytest.mark.parametrize("kind", ["mdlm", "autoencoder"])
def test_real_stages_give_identical_samples_in_float64(kind, strategy, monkeypatch):
    stage = _stage(kind, monkeypatch)
    z = None
    if kind == "autoencoder":
        z = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = {}
    for sampler in ("reference", "fast"):
        settings = SamplerSettings(steps=4, strategy=strategy, temperature=0.9, sampler=sampler)
        out[sampler], _ = sample_masked(
            stage.token_decoder(z), 3, 16, stage.mask_id, settings, torch.Generator().manual_seed(4)
        )
    assert (out["fast"] != stage.mask_id).all()
    assert torch.equal(out["fast"], out["reference"])
    if kind == "mdlm":  # generating from an MDLM is the fast sampler
        from diladiff.sampling.generate import GenerationSettings, sample_batch

        settings = GenerationSettings(SamplerSettings(steps=4, strategy=strategy, temperature=0.9))
        ids, stats = sample_batch(stage, 3, settings, torch.Generator().manual_seed(4), "cpu")
        assert torch.equal(ids, out["fast"]) and stats["disc_nfe"] <= 4


def test_token_decoder_log_probs_are_the_stage_log_probs(monkeypatch):
    stage = _stage("mdlm", monkeypatch)
    x_t = torch.randint(1000, 3000, (2, 16))
    x_t[:, ::3] = stage.mask_id
    dec = stage.token_decoder()
    assert torch.equal(dec.log_probs(x_t), stage.log_probs(x_t))
    sel = x_t == stage.mask_id
    rows = dec.logits(dec.hidden(x_t)[sel]).log_softmax(-1)
    assert torch.allclose(rows, stage.log_probs(x_t)[sel])


# ------------------------------------------------------------------ strategies and knobs


def test_ancestral_step_matches_the_reverse_posterior():
    probs = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0])
    logits = probs.log().expand(200_000, 1, V + 1).clone()
    masked = torch.ones(200_000, 1, dtype=torch.bool)
    settings = SamplerSettings(steps=4)
    g = torch.Generator().manual_seed(0)
    reveal, tokens = reveal_ancestral(
        draws_from_logits(logits, settings, g), masked, 0.75, 0.5, settings, g
    )
    outcome = torch.where(reveal, tokens, torch.full_like(tokens, V)).ravel()
    freq = torch.bincount(outcome, minlength=V + 1).double() / outcome.numel()
    expected = reverse_posterior(probs[:V].double(), 0.75, 0.5)
    assert torch.allclose(freq, expected, atol=4e-3)


@pytest.mark.parametrize("sampler", ["fast", "reference"])
def test_topk_unmasks_exactly_k_per_step(sampler):
    decoder, calls = make_decoder()
    x, _ = sample(decoder, batch=3, steps=4, strategy="topk", cache=False, sampler=sampler)
    masks = [(s == MASK).sum(1) for s in [*calls["states"], x]]
    revealed = [(a - b).tolist() for a, b in zip(masks, masks[1:], strict=False)]
    assert revealed == [[L // 4] * 3] * 4


@pytest.mark.parametrize("sampler", ["fast", "reference"])
def test_a_canvas_keeps_its_tokens_and_spreads_its_masked_positions_over_the_steps(sampler):
    """From a canvas with M = 8 of L = 12 positions masked, top-k reveals M / N_disc per step
    (the time grid runs from M / L), ancestral reveals them all; given tokens never change."""
    canvas = torch.tensor([0, 1, MASK, MASK, MASK, MASK, 2, MASK, MASK, MASK, MASK, 3])
    given = canvas != MASK
    decoder, calls = make_decoder()
    settings = SamplerSettings(steps=4, strategy="topk", cache=False, sampler=sampler)
    g = torch.Generator().manual_seed(0)
    x, stats = sample_masked(decoder, 3, L, MASK, settings, g, canvas=canvas)
    masks = [(s == MASK).sum(1) for s in [*calls["states"], x]]
    assert [(a - b).tolist() for a, b in zip(masks, masks[1:], strict=False)] == [[2] * 3] * 4
    assert (x[:, given] == canvas[given]).all() and not (x == MASK).any()
    for strategy in ("ancestral", "topk"):
        settings = SamplerSettings(steps=3, strategy=strategy, sampler=sampler)
        for seed in range(5):
            g = torch.Generator().manual_seed(seed)
            x, _ = sample_masked(decoder, 4, L, MASK, settings, g, canvas=canvas)
            assert (x[:, given] == canvas[given]).all() and not (x == MASK).any()
    full = torch.full((L,), MASK)  # an all-masked canvas is the unconditional sampler
    a = sample_masked(decoder, 2, L, MASK, settings, torch.Generator().manual_seed(1))[0]
    b = sample_masked(decoder, 2, L, MASK, settings, torch.Generator().manual_seed(1), canvas=full)[
        0
    ]
    assert torch.equal(a, b)


def test_threshold_reveals_exactly_the_tokens_above_it():
    """Confidences given by hand: positions above 0.6 are revealed; a row with none above it
    reveals its single most confident position; a row without masks reveals nothing; the last
    step (s = 0) reveals every masked position."""
    masked = torch.tensor(
        [[True, True, True, False], [True, True, False, False], [False, False, False, False]]
    )
    conf = torch.tensor([[0.9, 0.2, 0.7, 0.99], [0.3, 0.5, 0.95, 0.1], [0.9, 0.9, 0.9, 0.9]])

    def draw(sel, with_confidence=False):
        return torch.arange(1, int(sel.sum()) + 1), conf.double()[sel]

    settings = SamplerSettings(steps=4, strategy="threshold", threshold=0.6)
    reveal, tokens = reveal_threshold(draw, masked, 0.5, 0.25, settings, None)
    assert reveal.tolist() == [
        [True, False, True, False],
        [False, True, False, False],  # none above 0.6: the most confident masked one
        [False, False, False, False],
    ]
    assert tokens[masked].tolist() == [1, 2, 3, 4, 5]
    reveal, _ = reveal_threshold(draw, masked, 0.25, 0.0, settings, None)
    assert torch.equal(reveal, masked)
    with pytest.raises(ValueError, match="confidence_threshold"):
        SamplerSettings(steps=4, strategy="threshold", threshold=0.0)


def test_topk_reveals_the_most_confident_positions():
    logits = torch.full((1, 4, V + 1), -math.inf)
    logits[0, :, 0] = 0.0  # certain at every position ...
    logits[0, 1, :V] = 0.0  # ... except position 1 (uniform)
    settings = SamplerSettings(steps=4, strategy="topk")
    g = torch.Generator().manual_seed(0)
    masked = torch.ones(1, 4, dtype=torch.bool)
    reveal, _ = reveal_topk(draws_from_logits(logits, settings, g), masked, 1.0, 0.25, settings, g)
    assert reveal.tolist() == [[True, False, True, True]]


def test_same_seed_same_samples_different_seed_different_samples():
    decoder, _ = make_decoder()
    a, _ = sample(decoder, batch=8, seed=3, steps=6)
    b, _ = sample(decoder, batch=8, seed=3, steps=6)
    c, _ = sample(decoder, batch=8, seed=4, steps=6)
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


@pytest.mark.parametrize("sampler", ["fast", "reference"])
def test_near_zero_temperature_samples_the_mode_whatever_the_seed(sampler):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(L, V + 1, generator=g)
    # independent of x: the per-position mode is the only sample at T -> 0
    decoder = TokenDecoder(lambda x: table.expand(x.shape[0], L, V + 1), lambda h: h.clone(), MASK)
    mode = table[:, :V].argmax(-1).expand(5, L)
    for seed in range(3):
        x, _ = sample(decoder, batch=5, seed=seed, steps=4, temperature=1e-4, sampler=sampler)
        assert torch.equal(x, mode)


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown strategy"):
        SamplerSettings(steps=4, strategy="nope")
    with pytest.raises(ValueError, match="unknown sampler"):
        SamplerSettings(steps=4, sampler="nope")
    with pytest.raises(ValueError, match="temperature"):
        SamplerSettings(steps=4, temperature=0)
    decoder, _ = make_decoder()
    with pytest.raises(ValueError, match="mask_id"):
        sample_masked(decoder, 2, L, MASK + 1, SamplerSettings(steps=2))


# ------------------------------------------------------------------ command line


def test_sample_with_the_reference_sampler_writes_the_same_samples(trained_run, tmp_path):
    from diladiff.cli import main

    out = {}
    for sampler in ("fast", "reference"):
        path = tmp_path / f"{sampler}.jsonl"
        args = ["sample", str(trained_run), "--num-samples", "3", "--disc-steps", "4"]
        assert main([*args, "--sampler", sampler, "--out", str(path)]) == 0
        out[sampler] = [json.loads(line)["ids"] for line in path.read_text().splitlines()]
    assert out["fast"] == out["reference"]


def test_bench_compares_the_samplers_side_by_side(trained_run, tmp_path, capsys):
    from diladiff.cli import main

    args = ["bench", "sample", str(trained_run), "--batch-sizes", "2", "--repeats", "1"]
    for strategy in ("ancestral", "topk"):
        path = tmp_path / f"{strategy}.json"
        extra = ["--strategy", strategy, "--compare-reference", "--json", str(path)]
        assert main([*args, "--disc-steps", "4", *extra]) == 0
        assert "| sampler | batch |" in capsys.readouterr().out
        rows = json.loads(path.read_text())["rows"]
        assert [r["sampler"] for r in rows] == ["reference", "fast"]
        assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0
        assert all(r["same_tokens"] > 0.99 for r in rows)  # float32: a near-tie may flip
