"""DUO: the stage (curriculum, exact resume), its denoiser input paths and the uniform-state
sampler (posterior step frequencies, greedy tail, NFE)."""

import json

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from diladiff.cli import main
from diladiff.config import build_config
from diladiff.methods.duo import sampler as U
from diladiff.methods.duo.process import posterior
from diladiff.nets.token_denoiser import TokenDenoiser
from diladiff.runs import load_run
from diladiff.sampling.masked import SamplerSettings
from diladiff.train.checkpoint import latest_checkpoint


def train(run, *overrides):
    argv = ["train", "duo", "--preset", "tiny", "--run-dir", str(run), *TINY]
    return main(argv + ["duo.duality_points=257", *overrides])


def test_duo_trains_through_the_curriculum_switch_and_resumes_exactly(tmp_path):
    # the curriculum covers steps [0, 3); the switch to the discrete loss falls in the resume
    curriculum = ["duo.curriculum_start=1", "duo.curriculum_end=3", "duo.tau_log10_end=-2"]
    assert train(tmp_path / "a", "train.max_steps=2", *curriculum) == 0
    assert train(tmp_path / "a", "train.max_steps=5") == 0
    assert train(tmp_path / "b", "train.max_steps=5", *curriculum) == 0
    for which in ("model", "ema"):
        a = load_file(latest_checkpoint(tmp_path / "a") / f"{which}.safetensors")
        b = load_file(latest_checkpoint(tmp_path / "b") / f"{which}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), which
    log = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if r.get("event") == "eval"]
    assert evals and all(1 < r["val_ppl_bound"] < float("inf") for r in evals)


def test_duo_stage_uses_the_curriculum_only_inside_its_window(monkeypatch):
    # curriculum_start only delays the temperature ramp (as in the authors' code)
    cfg = build_config("tiny", TINY + ["duo.curriculum_start=2", "duo.curriculum_end=4"], "duo")
    from diladiff.methods.duo.stage import DUO

    stage = DUO(cfg, {"vocab_size": 50, "mask_id": 3})
    calls = []
    monkeypatch.setattr(DUO, "curriculum_terms", lambda s, x, g: calls.append("c") or x.float())
    monkeypatch.setattr(DUO, "discrete_terms", lambda s, x, g: calls.append("d") or x.float())
    x = torch.randint(0, 50, (2, 32))
    stage.train()
    for step in range(6):
        stage.on_step(step)
        stage(x, torch.Generator().manual_seed(0))
    stage.eval()
    stage.on_step(3)
    stage(x, torch.Generator().manual_seed(0))  # evaluation: always the discrete ELBO
    assert calls == ["c", "c", "c", "c", "d", "d", "d"]
    assert stage.tau() == 10**-3  # the OpenWebText setting: constant
    default = DUO(build_config("tiny", TINY, "duo"), {"vocab_size": 50, "mask_id": 3})
    assert default.curriculum_end() == 1000  # half of the tiny schedule
    assert not stage.states[3] and int(stage.states.sum()) == 49


def test_soft_input_of_one_hot_rows_equals_the_token_path():
    cfg = build_config("tiny", TINY).model
    net = TokenDenoiser(cfg, 40, 8, time_conditioning=True)
    x = torch.randint(0, 40, (3, 8))
    sigma = torch.tensor([0.1, 1.0, 5.0])
    one_hot = torch.nn.functional.one_hot(x, 40).float()
    assert torch.allclose(net(x, time=sigma), net(one_hot, time=sigma), atol=1e-5)
    with pytest.raises(ValueError, match="time-conditioned"):
        net(x)


class FixedModel:
    """A uniform-state 'stage' whose x_theta is a fixed table over V = 5 ids (id 4 = mask)."""

    def __init__(self, probs: torch.Tensor, seq_len: int = 3):
        self.states = torch.tensor([True, True, True, True, False])
        self.seq_len = seq_len
        self.probs = probs
        self.calls = 0

    def log_x_theta(self, x, sigma):
        self.calls += 1
        return self.probs.log().expand(*x.shape, -1).clone()


def test_one_posterior_step_draws_with_the_posterior_frequencies():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0], dtype=torch.float64)
    model = FixedModel(probs)
    n = 40000
    x_t = torch.full((n, 1), 2)
    log_x = probs.log().expand(n, 1, 5)
    settings = SamplerSettings(steps=1)
    gen = torch.Generator().manual_seed(0)
    # the sampler draws the posterior as a mixture (keep x_t / move to r) without forming it;
    # check it against the formed posterior, mid-way and at the noise-removal step (a_s = 1)
    for a_s, a_t in ((0.6, 0.3), (0.2, 0.01), (1.0, 0.9)):
        x_s = U._draw_posterior(log_x, x_t, a_s, a_t, model.states, settings, gen)
        want = posterior(probs.view(1, 1, 5), torch.tensor([[2]]), a_s, a_t, model.states)[0, 0]
        freq = torch.bincount(x_s.flatten(), minlength=5).double() / n
        assert freq[4] == 0
        se = (want * (1 - want) / n).sqrt()
        assert ((freq - want).abs() <= 5 * se + 1e-12).all(), (a_s, a_t, freq, want)


def test_uniform_sampler_nfe_greedy_tail_and_no_mask():
    probs = torch.tensor([0.1, 0.6, 0.2, 0.1, 0.0], dtype=torch.float64)
    model = FixedModel(probs, seq_len=6)
    for strategy in ("ancestral", "greedy_tail"):
        model.calls = 0
        x, stats = U.sample_uniform(
            model, 50, SamplerSettings(steps=4, strategy=strategy), torch.Generator().manual_seed(1)
        )
        assert stats == {"disc_nfe": 5, "disc_steps_taken": 4} and model.calls == 5
        assert x.shape == (50, 6) and not (x == 4).any()
        if strategy == "greedy_tail":  # the last step takes the argmax of x_theta
            assert (x == 1).all()
    with pytest.raises(ValueError, match="uniform-state sampling takes"):
        U.sample_uniform(model, 2, SamplerSettings(steps=2, strategy="topk"))


def test_a_canvas_is_clamped_at_every_step_and_in_the_last_one():
    """Clamp inpainting: x_1 and every x_s the denoiser reads carry the given tokens, and the
    output keeps them even where the greedy tail's argmax is another token."""
    probs = torch.tensor([0.1, 0.6, 0.2, 0.1, 0.0], dtype=torch.float64)
    model = FixedModel(probs, seq_len=6)
    model.mask_id = 4
    seen, table = [], model.log_x_theta
    model.log_x_theta = lambda x, sigma: (seen.append(x.clone()), table(x, sigma))[1]
    canvas = torch.tensor([0, 4, 4, 2, 4, 3])
    given = canvas != 4
    for strategy in ("ancestral", "greedy_tail"):
        seen.clear()
        settings = SamplerSettings(steps=4, strategy=strategy)
        gen = torch.Generator().manual_seed(1)
        x, stats = U.sample_uniform(model, 50, settings, gen, canvas=canvas)
        assert stats["disc_nfe"] == len(seen) == 5
        assert all((xs[:, given] == canvas[given]).all() for xs in seen)
        assert (x[:, given] == canvas[given]).all() and not (x == 4).any()
        if strategy == "greedy_tail":
            assert (x[:, ~given] == 1).all()
        else:
            assert x[:, ~given].unique().numel() > 1  # the free positions are sampled
    with pytest.raises(ValueError, match="a canvas has 6 positions"):
        U.sample_uniform(model, 2, SamplerSettings(steps=2), canvas=canvas[:4])


def test_duo_samples_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "duo"
    assert train(run, "train.max_steps=2") == 0
    out = tmp_path / "s.jsonl"
    argv = ["sample", str(run), "--num-samples", "3", "--disc-steps", "4", "--out", str(out)]
    assert main(argv + ["--strategy", "greedy_tail"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert len(rows) == 3 and meta["disc_nfe"] == 5 and meta["strategy"] == "greedy_tail"
    stage, _ = load_run(run)
    assert all(stage.mask_id not in r["ids"] for r in rows)


def test_the_masked_sampler_refuses_the_greedy_tail():
    from diladiff.methods.mdlm.stage import MDLM
    from diladiff.sampling.generate import decode_tokens

    stage = MDLM(build_config("tiny", TINY), {"vocab_size": 40, "mask_id": 3})
    settings = SamplerSettings(steps=2, strategy="greedy_tail")
    with pytest.raises(ValueError, match="uniform-state"):
        decode_tokens(stage, 2, settings, torch.Generator().manual_seed(0), "cpu")
