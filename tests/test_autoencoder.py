import re

import pytest
import torch
from conftest import TINY

from diladiff.cli import main
from diladiff.config import build_config
from diladiff.data.tokenizer import load_tokenizer, tokenizer_identity
from diladiff.methods.autoencoder.stage import Autoencoder, augment_features, augment_latent
from diladiff.methods.mdlm.stage import MDLM
from diladiff.nets.standardize import RunningStandardizer
from diladiff.train.checkpoint import latest_checkpoint

AE_SMALL = [
    "autoencoder.latent_dim=64",  # the Perceiver's width follows (= d_z)
    "autoencoder.perceiver_heads=2",
    "autoencoder.num_latents=8",
]


def build(stage_cls, *extra):
    cfg = build_config("tiny", [*TINY, *AE_SMALL, *extra], stage="autoencoder")
    torch.manual_seed(0)
    return stage_cls(cfg, tokenizer_identity(load_tokenizer("minilm-l6")))


def test_fresh_autoencoder_decoder_equals_the_mdlm_exactly():
    mdlm, ae = build(MDLM).eval(), build(Autoencoder).eval()
    ae.decoder.load_state_dict(mdlm.net.state_dict())
    g = torch.Generator().manual_seed(0)
    x_t = torch.randint(1000, 3000, (4, 32), generator=g)
    x_t[torch.rand(4, 32, generator=g) < 0.5] = ae.mask_id
    z = torch.randn(4, 8, 64, generator=g)
    assert torch.equal(ae.log_probs(x_t, z), mdlm.log_probs(x_t))


def test_latent_shape_and_compression():
    ae = build(Autoencoder).train()
    x0 = torch.randint(1000, 3000, (3, 32))
    z = ae.encode(x0, train=True)
    assert z.shape == (3, 8, 64)
    assert ae.compression == 32 * 384 / (8 * 64)
    two = build_config("tiny", stage="autoencoder")
    four = build_config("tiny-4x", stage="autoencoder")
    L, d_bert = two.data.seq_len, 384
    assert L * d_bert / (two.autoencoder.num_latents * two.autoencoder.latent_dim) == 2
    assert L * d_bert / (four.autoencoder.num_latents * four.autoencoder.latent_dim) == 4


D_BERT = {"minilm-l6": 384, "bert-base-uncased": 768}


@pytest.mark.parametrize("preset", ["tiny", "small", "paper", "tiny-4x", "small-4x", "paper-4x"])
def test_presets_give_every_latent_direction_a_width(preset):
    """Perceiver width = d_z, the prior at least as wide, compression (L d_bert)/(N_z d_z)
    2x (4x with the -4x suffix)."""
    ae = build_config(preset, stage="autoencoder")
    ac = ae.autoencoder
    assert (ac.perceiver_width or ac.latent_dim) == ac.latent_dim
    assert (
        ac.latent_dim % ac.perceiver_heads == 0 and (ac.latent_dim // ac.perceiver_heads) % 2 == 0
    )
    compression = ae.data.seq_len * D_BERT[ac.feature_model] / (ac.num_latents * ac.latent_dim)
    assert compression == (4 if preset.endswith("-4x") else 2)
    prior = build_config(preset, stage="ladiff").prior
    assert prior.width >= ac.latent_dim and prior.width % prior.heads == 0


def latent_direction_stds(cfg, batch: int) -> torch.Tensor:
    """Per latent vector, the standard deviations of the standardised latent along its
    principal directions (singular values of the centred (batch, d_z) matrix / sqrt(batch)),
    for `batch` distinct random standardised feature sequences, at initialisation."""
    ac = cfg.autoencoder
    torch.manual_seed(0)
    ae = Autoencoder(cfg, tokenizer_identity(load_tokenizer("minilm-l6")))
    h = torch.randn(batch, cfg.data.seq_len, ae.features.dim)  # standardised features
    with torch.no_grad():
        z = ae.encoder(h).double()
    z = (z - z.mean(0)) / z.std(0, unbiased=False)  # what z_norm does
    assert z.shape[1:] == (ac.num_latents, ac.latent_dim)
    return torch.linalg.svdvals(z.transpose(0, 1)) / batch**0.5  # (N_z, d_z)


def test_encoder_latent_has_no_near_zero_variance_directions():
    cfg = build_config("tiny", stage="autoencoder")
    d_z = cfg.autoencoder.latent_dim
    stds = latent_direction_stds(cfg, 2 * d_z)
    # The Perceiver's final LayerNorm centres each vector over its width = d_z, which removes
    # exactly one direction; every other direction keeps a share of the variance.
    assert (stds[:, :-1] > 0.05).all()
    assert (stds[:, -1] < 1e-4).all()


def test_old_tiny_preset_left_most_latent_directions_without_variance():
    """Perceiver width 128 projected to d_z = 768: at most 127 directions carry variance."""
    old = [
        "autoencoder.num_latents=16",
        "autoencoder.latent_dim=768",
        "autoencoder.perceiver_width=128",
        "autoencoder.perceiver_heads=4",
    ]
    stds = latent_direction_stds(build_config("tiny", old, stage="autoencoder"), 800)
    assert ((stds > 0.05).sum(-1) <= 127).all()


def test_feature_augmentation_statistics():
    g = torch.Generator().manual_seed(0)
    h = torch.zeros(400, 64, 16)
    mask_vec = torch.full((16,), 7.0)
    out = augment_features(h, mask_vec, p_mask=0.3, sigma=0.5, generator=g)
    first, second = out[:200], out[200:]
    masked_first = (first == 7.0).all(-1).float().mean()
    assert abs(masked_first - 0.3) < 0.01
    assert ((first == 0) | (first == 7.0)).all()  # no noise on the masked half
    assert not (second == 7.0).all(-1).any()  # no masking on the noised half
    assert abs(second.std() - 0.5) < 0.01 and abs(second.mean()) < 0.01


def test_latent_augmentation_statistics():
    g = torch.Generator().manual_seed(0)
    z = torch.full((4000, 16, 8), 3.0)
    out = augment_latent(z, torch.full((8,), -5.0), p_mask=0.2, p_drop=0.6, generator=g)
    kept = (out != 3.0) & (out != -5.0)
    dropped = kept.all(-1).all(-1)
    assert abs(dropped.float().mean() - 0.6) < 0.03
    noise = out[dropped]
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01
    rest = out[~dropped]
    assert abs((rest == -5.0).all(-1).float().mean() - 0.2) < 0.01


def test_running_standardizer_matches_full_batch_statistics():
    st = RunningStandardizer((5,))
    data = torch.randn(300, 5) * torch.arange(1, 6) + 3
    for chunk in data.split(70):
        st.update(chunk)
    assert torch.allclose(st.mean.float(), data.mean(0), atol=1e-5)
    assert torch.allclose(st.var.float(), data.var(0, unbiased=False), atol=1e-4)
    assert torch.allclose(st.inverse(st(data)), data, atol=1e-4)


@pytest.fixture(scope="module")
def mdlm_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ae") / "mdlm"
    assert (
        main(
            ["train", "mdlm", "--preset", "tiny", "--run-dir", str(run), *TINY, "train.max_steps=5"]
        )
        == 0
    )
    return run


def train_ae(run, parent, *extra):
    return main(
        [
            "train",
            "autoencoder",
            "--preset",
            "tiny",
            "--run-dir",
            str(run),
            "--init-from",
            str(parent),
            *AE_SMALL,
            "train.progress=false",
            "train.eval_every=1000",
            *extra,
        ]
    )


def test_autoencoder_run_resumes_exactly(mdlm_run, tmp_path):
    from safetensors.torch import load_file

    assert train_ae(tmp_path / "a", mdlm_run, "train.max_steps=6") == 0
    assert train_ae(tmp_path / "a", mdlm_run, "train.max_steps=12") == 0
    assert train_ae(tmp_path / "b", mdlm_run, "train.max_steps=12") == 0
    a = load_file(latest_checkpoint(tmp_path / "a") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "b") / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["feat_norm.count"] > 0  # feature statistics are in the checkpoint


def test_eval_recon_compares_with_the_parent_mdlm(mdlm_run, tmp_path, capsys):
    assert train_ae(tmp_path / "ae", mdlm_run, "train.max_steps=3") == 0
    assert main(["eval-recon", str(tmp_path / "ae"), "--sequences", "2", "--mc-samples", "8"]) == 0
    out = capsys.readouterr().out
    assert "autoencoder (ae)" in out and "mdlm (mdlm)" in out and "latent_noise_std" in out
    assert "autoencoder (ae), z ~ N(0, I)" in out  # the decoder-alone control row
    assert "argmax recovery from all-masked rows" in out  # own / other row / noise latent
    assert (tmp_path / "ae" / "recon.png").is_file()


def test_autoencoder_needs_an_mdlm_parent_with_the_same_tokenizer(mdlm_run, tmp_path, capsys):
    assert main(["train", "autoencoder", "--preset", "tiny", "--run-dir", str(tmp_path / "x")]) == 2
    assert "needs --init-from" in capsys.readouterr().err
    assert train_ae(tmp_path / "ae", mdlm_run, "train.max_steps=1") == 0
    assert train_ae(tmp_path / "y", tmp_path / "ae", "train.max_steps=1") == 2
    assert re.search("is a run of autoencoder, not of mdlm", capsys.readouterr().err)
    from test_train import make_other_tokenizer

    other = make_other_tokenizer(tmp_path / "tok")
    assert train_ae(tmp_path / "z", mdlm_run, f"data.tokenizer={other}") == 2
    err = capsys.readouterr().err
    assert "tokenizer vocabulary mismatch" in err and len(err.strip().splitlines()) == 1


def test_feature_precision_bf16_is_close_to_fp32_and_bad_values_are_errors():
    import torch

    from diladiff.errors import DataError
    from diladiff.features import FeatureModel, feature_dtype

    ids = torch.randint(1000, 5000, (2, 16), generator=torch.Generator().manual_seed(0))
    h32 = FeatureModel("minilm-l6", precision="fp32")(ids)
    h16 = FeatureModel("minilm-l6", precision="bf16")(ids)
    assert h16.dtype == torch.float32 and not torch.equal(h16, h32)  # bf16 really ran
    assert (h16 - h32).norm() / h32.norm() < 0.03
    assert feature_dtype("fp32", torch.device("cuda")) == torch.float32
    assert feature_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(DataError, match="feature_precision"):
        FeatureModel("minilm-l6", precision="fp16")


def test_latent_dropout_schedule_rises_from_its_initial_value_to_p_drop():
    from diladiff.methods.autoencoder.stage import latent_dropout

    assert latent_dropout(0, 0.6, 0, 0.0) == latent_dropout(10**6, 0.6, 0, 0.0) == 0.6
    assert latent_dropout(0, 0.6, 400, 0.1) == pytest.approx(0.1)
    assert latent_dropout(200, 0.6, 400, 0.0) == pytest.approx(0.3)
    assert latent_dropout(400, 0.6, 400, 0.0) == latent_dropout(900, 0.6, 400, 0.0) == 0.6
    # the stage follows its step: no row dropped at step 0, ~p_drop of them after the warm-up
    ae = build(Autoencoder, "autoencoder.p_drop_warmup_steps=100", "autoencoder.p_mask_z=0")
    ae.train()
    x0 = torch.randint(1000, 3000, (256, 32))
    clean = ae.encode(x0, torch.Generator().manual_seed(1), train=True)

    def dropped_share(step):
        ae.on_step(step)
        z = ae.condition(x0, torch.Generator().manual_seed(1), train=True)
        return (z - clean).flatten(1).abs().amax(1).gt(1e-4).float().mean().item()

    assert dropped_share(0) == 0.0
    assert 0.5 < dropped_share(100) < 0.7


def test_cross_attention_after_every_block_and_fully_masked_rows():
    from diladiff.methods.autoencoder.stage import cross_attention_blocks

    assert cross_attention_blocks("all", 4) == [0, 1, 2, 3]
    assert cross_attention_blocks("first,last", 4) == [0, 3]
    ae = build(Autoencoder, "model.depth=3", "autoencoder.cross_attn_after=all")
    assert sorted(int(k) for k in ae.cross) == [0, 1, 2]

    def times(share):
        stage = build(Autoencoder, f"autoencoder.full_mask_share={share}")
        return stage.training_times(4096, torch.Generator().manual_seed(0), "cpu")

    plain, half, every = times(0.0), times(0.5), times(1.0)
    assert bool((every == 1).all()) and float((plain == 1).float().mean()) < 0.01
    assert 0.45 < float((half == 1).float().mean()) < 0.55
    # the other rows keep the MDLM's (antithetic) times
    assert torch.equal(half[half < 1], plain[half < 1])


class _RowLatentStub:
    """A decoder that reads the row back from its latent exactly: encode(x) = one-hot(x)
    (B, L, V), and log_probs(x_t, z) puts all its mass on argmax z at each position, whatever
    x_t. So recovery with the row's own latent is 1 and with another row's latent it is the
    share of positions where the two rows agree."""

    mask_id, vocab = 0, 5

    def encode(self, x0):
        return torch.nn.functional.one_hot(x0, self.vocab).float()

    def log_probs(self, x_t, z):
        assert (x_t == self.mask_id).all()  # full masking: the latent is all the decoder has
        return torch.log_softmax(50.0 * z, dim=-1)


def test_full_mask_recovery_on_a_decoder_that_reads_its_latent_exactly():
    from diladiff.eval.recon import full_mask_recovery

    x0 = torch.tensor([[1, 2, 3, 4], [1, 2, 4, 4], [3, 3, 3, 3]])
    r = full_mask_recovery(_RowLatentStub(), x0, torch.Generator().manual_seed(0), batch_size=2)
    assert r["own"] == 1.0
    # row 0 gets row 1's latent (3 of 4 agree), row 1 row 2's (0 of 4), row 2 row 0's (1 of 4)
    assert r["other_row"] == pytest.approx(4 / 12)
    assert 0 <= r["noise"] < 1
