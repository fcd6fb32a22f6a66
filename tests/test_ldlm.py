"""LDLM: gradient routing of the joint loss, the unstandardised latent, the warm-up and adaptive
time state across resume and DDP, and sampling through every latent sampler."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import TINY, torchrun_replica_digests
from safetensors.torch import load_file

from diladiff.cli import main
from diladiff.config import build_config
from diladiff.data.tokenizer import load_tokenizer, tokenizer_identity
from diladiff.stages.ldlm import LDLM, ldlm_losses
from diladiff.train.checkpoint import latest_checkpoint, load_weights

SMALL = [
    "ldlm.latent_dim=8",
    "ldlm.encoder_width=16",
    "ldlm.encoder_heads=2",
    "ldlm.encoder_depth=1",
    "ldlm.hidden_decoder_depth=1",
    "ldlm.token_decoder_width=16",
    "ldlm.token_decoder_heads=2",
    "ldlm.token_decoder_depth=1",
    "prior.depth=1",
    "prior.width=16",
    "prior.heads=2",
    "ldlm.feature_stats_rows=32",
]


def make_stage(*overrides) -> LDLM:
    cfg = build_config("tiny", TINY + SMALL + list(overrides), "ldlm")
    stage = LDLM(cfg, tokenizer_identity(load_tokenizer(cfg.data.tokenizer)))
    x = torch.randint(1000, 2000, (4, cfg.data.seq_len))
    stage.feat_norm.fit([stage.features(x)])
    return stage


def grads(loss, stage: LDLM) -> dict[str, float]:
    """Gradient norm of `loss` per module (0.0 where it does not reach)."""
    modules = {
        "encoder": stage.encoder,
        "hidden_decoder": stage.hidden_decoder,
        "token_decoder": stage.token_decoder,
        "denoiser": stage.prior,
    }
    out = {}
    for name, m in modules.items():
        params = list(m.parameters())
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out[name] = sum(float(g.norm()) for g in gs if g is not None)
    return out


def terms(stage, gamma=1.0, seed=0):
    x0 = torch.randint(1000, 2000, (3, stage.seq_len), generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(seed)
    return ldlm_losses(stage, x0, gen, False, torch.tensor(gamma))


def test_each_loss_reaches_only_the_modules_of_the_routing_table():
    stage = make_stage()
    t = terms(stage, gamma=0.5)
    token, hidden, diff = (
        grads(t["token"], stage),
        grads(t["hidden"], stage),
        grads(t["diff"], stage),
    )
    # L_w: the token decoder only (stop-gradient on h_hat)
    assert token["token_decoder"] > 0
    assert token["encoder"] == token["hidden_decoder"] == token["denoiser"] == 0
    # L_h: encoder and hidden-state decoder
    assert hidden["encoder"] > 0 and hidden["hidden_decoder"] > 0
    assert hidden["token_decoder"] == hidden["denoiser"] == 0
    # L_diff: denoiser and (scaled) encoder, never the decoders
    assert diff["denoiser"] > 0 and diff["encoder"] > 0
    assert diff["hidden_decoder"] == diff["token_decoder"] == 0


def test_diffusion_gradient_reaches_the_encoder_scaled_by_gamma():
    stage = make_stage()
    enc = list(stage.encoder.parameters())
    den = list(stage.prior.parameters())

    def flat(loss, params):
        gs = torch.autograd.grad(loss, params, retain_graph=True)
        return torch.cat([g.reshape(-1) for g in gs])

    full, part, none = (terms(stage, g)["diff"] for g in (1.0, 0.3, 0.0))
    assert torch.allclose(flat(part, enc), 0.3 * flat(full, enc), rtol=1e-4, atol=1e-8)
    assert float(flat(none, enc).abs().max()) == 0.0
    # the forward value and the denoiser's gradient do not depend on gamma
    assert torch.equal(part, full)
    assert torch.allclose(flat(part, den), flat(full, den))


def test_cross_entropy_ablation_lets_the_token_loss_reach_the_encoder():
    stage = make_stage("ldlm.recon_loss=ce+mse")
    token = grads(terms(stage)["token"], stage)
    assert token["encoder"] > 0 and token["hidden_decoder"] > 0 and token["token_decoder"] > 0


def test_latents_are_not_standardised_for_the_prior():
    stage = make_stage()
    assert not hasattr(stage, "prior_norm") and stage.latent_shape == (stage.seq_len, 8)
    x0 = torch.randint(1000, 2000, (2, stage.seq_len))
    z = stage.encode_clean(x0)
    assert torch.equal(stage.prior_latents(x0), z)
    assert torch.equal(stage.to_decoder_space(z), z)


def test_warmup_scale_follows_the_step():
    stage = make_stage("ldlm.encoder_warmup_steps=10")
    seen = []
    for step in (0, 5, 8, 10, 50):
        stage.on_step(step)
        seen.append(float(stage.encoder_grad_scale))
    assert seen[0] == 0.0 and seen[-2] == seen[-1] == 1.0
    assert seen[1] == pytest.approx(0.054, abs=1e-3) and seen[2] == pytest.approx(0.568, abs=1e-3)


def train(run, *overrides):
    argv = ["train", "ldlm", "--preset", "tiny", "--run-dir", str(run), *TINY, *SMALL]
    return main(argv + ["ldlm.ats_refresh_every=2", "ldlm.encoder_warmup_steps=4", *overrides])


def test_ldlm_resumes_exactly_with_its_warmup_and_adaptive_time_state(tmp_path):
    assert train(tmp_path / "a", "train.max_steps=3") == 0
    assert train(tmp_path / "a", "train.max_steps=6") == 0
    assert train(tmp_path / "b", "train.max_steps=6") == 0
    for which in ("model", "ema"):
        a = load_file(latest_checkpoint(tmp_path / "a") / f"{which}.safetensors")
        b = load_file(latest_checkpoint(tmp_path / "b") / f"{which}.safetensors")
        assert a.keys() == b.keys() and any(k.startswith("time_sampler.") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), which
    probs = a["time_sampler.probs"]  # refreshed from the losses seen: no longer uniform
    assert not torch.allclose(probs, torch.full_like(probs, 1 / len(probs)))


@pytest.mark.parametrize("sampler", ["sde_euler", "ddpm", "ode_euler"])
def test_ldlm_samples_text_with_each_latent_sampler(tmp_path_factory, sampler):
    run = tmp_path_factory.getbasetemp() / "ldlm_sampling_run"
    if not (run / "run.json").is_file():
        assert train(run, "train.max_steps=4") == 0
    out = tmp_path_factory.mktemp("s") / "samples.jsonl"
    argv = ["sample", str(run), "--out", str(out), "--cont-steps", "3"]
    assert main(argv + ["--latent-sampler", sampler]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert len(rows) == 4 and all(len(r["ids"]) == 32 for r in rows)
    assert meta["cont_nfe"] > 0 and meta["disc_nfe"] == 1  # one decoder call per batch


def test_two_process_torchrun_keeps_ldlm_replicas_identical(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29519",
        "-m",
        "diladiff",
        "train",
        "ldlm",
        "--preset",
        "tiny",
        "--run-dir",
        str(tmp_path / "ddp"),
        *TINY,
        *SMALL,
        "ldlm.ats_refresh_every=2",
        "train.max_steps=5",
        "train.micro_batch_size=2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    end = [r for r in log if r.get("event") == "end"]
    digests = end[0]["replica_digests"]  # every state_dict entry, the time sampler's too
    assert len(digests) == 2 and digests[0] == digests[1]


@pytest.mark.parametrize(
    "switch",
    [
        "ldlm.recon_loss=ce",
        "ldlm.recon_loss=ce+mse",
        "ldlm.adaptive_time=false",
        "ldlm.encoder_warmup_steps=0",
        "ldlm.sigma_dec=1.0",
    ],
)
def test_each_ablation_switch_trains(tmp_path, switch):
    assert train(tmp_path / "run", "train.max_steps=2", switch) == 0
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any("diff" in r and torch.isfinite(torch.tensor(r["loss"])) for r in log)


def test_post_trained_decoder_trains_alone_on_the_frozen_ldlm(tmp_path):
    assert train(tmp_path / "ldlm", "train.max_steps=2") == 0
    argv = ["train", "ldlm_decoder", "--preset", "tiny", "--run-dir", str(tmp_path / "dec")]
    argv += ["--init-from", str(tmp_path / "ldlm"), *TINY, "train.max_steps=3"]
    assert main(argv + ["ldlm_decoder.layers=1"]) == 0
    parent, _ = load_weights(tmp_path / "ldlm", "ema")
    child = load_file(latest_checkpoint(tmp_path / "dec") / "model.safetensors")
    assert any(k.startswith("post_decoder.") for k in child)
    shared = [k for k in parent if k in child]
    assert len(shared) == len(parent)  # every parent weight and buffer carried over ...
    assert all(torch.equal(parent[k], child[k]) for k in shared)  # ... and left frozen
    out = tmp_path / "s.jsonl"
    assert main(["sample", str(tmp_path / "dec"), "--out", str(out), "--cont-steps", "2"]) == 0
    assert len(out.read_text().splitlines()) == 4


def test_two_process_torchrun_keeps_ldlm_decoder_replicas_identical(tmp_path):
    """The post-trained decoder on a frozen LDLM: both ranks end with the same state_dict."""
    assert train(tmp_path / "ldlm", "train.max_steps=2") == 0
    extra = ["--init-from", str(tmp_path / "ldlm"), *TINY, "ldlm_decoder.layers=1"]
    extra += ["train.max_steps=3", "train.micro_batch_size=2"]
    digests = torchrun_replica_digests("ldlm_decoder", tmp_path / "dec", *extra)
    assert len(digests) == 2 and digests[0] == digests[1]
