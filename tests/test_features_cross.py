"""Frozen features in the feature model's own tokenizer (decode, tokenise again, mask the
padding), and the on-disk feature cache."""

import json
import random

import numpy as np
import pytest
import torch
from conftest import TINY, word_level_tokenizer, write_jsonl

from diladiff.config import build_config
from diladiff.data.packing import prepare_data
from diladiff.data.tokenizer import load_tokenizer, tokenizer_identity
from diladiff.errors import DataError
from diladiff.features import (
    FeatureCache,
    FeatureModel,
    RetokenizedFeatures,
    RowIndex,
)
from diladiff.features.cache import VERIFY_ROWS
from diladiff.methods.autoencoder.stage import Autoencoder, augment_features
from diladiff.nets.perceiver import PerceiverCompressor
from diladiff.nets.standardize import RunningStandardizer

SPECIAL = ["[PAD]", "[UNK]", "[SEP]", "[MASK]"]
WORDS = (
    "the river runs past an old mill where children play and boats wait for spring rain "
    "over green hills near a quiet town with small houses bright windows long roads"
).split()
AE_SMALL = [
    "autoencoder.latent_dim=64",
    "autoencoder.perceiver_heads=2",
    "autoencoder.num_latents=8",
]


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory):
    """A word-level tokenizer over WORDS (another vocabulary than the feature model's)."""
    folder = tmp_path_factory.mktemp("wordtok")
    word_level_tokenizer(
        folder,
        SPECIAL + WORDS,
        unk_token="[UNK]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        pad_token="[PAD]",
    )
    return folder


@pytest.fixture(scope="module")
def minilm():
    return FeatureModel("minilm-l6", precision="fp32")


def word_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_retokenized_features_equal_the_feature_model_on_the_text(word_tok, minilm):
    dec = load_tokenizer(str(word_tok))
    bert = load_tokenizer("minilm-l6")
    docs = ["the river runs past an old mill", "children play near a quiet town", "spring rain"]
    sep, pad = dec.sep_token_id, dec.pad_token_id
    rows = [
        word_ids(dec, docs[0]) + [sep] + word_ids(dec, docs[1]),  # a document boundary
        word_ids(dec, docs[2]) + [sep] + [pad] * 4,  # ends with a separator, then padding
    ]
    width = max(map(len, rows))
    rows = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    feats = RetokenizedFeatures(minilm, dec, max_len=64)
    h, valid = feats(rows)
    # the same text tokenised by the feature model's tokenizer, the boundary its own [SEP]
    expected = [
        word_ids(bert, docs[0]) + [bert.sep_token_id] + word_ids(bert, docs[1]),
        word_ids(bert, docs[2]) + [bert.sep_token_id],
    ]
    assert valid.sum(1).tolist() == [len(e) for e in expected]
    for r, ids in enumerate(expected):
        direct = minilm(torch.tensor([ids]))[0]
        assert torch.allclose(h[r, : len(ids)], direct, atol=1e-4), r
    assert not valid[1, len(expected[1]) :].any()


def test_retokenizing_rows_of_the_feature_tokenizer_gives_the_rows_back(minilm):
    """Same tokenizer on both sides: the cross path feeds the model the very ids of the fast
    path (lowercase words round-trip through decode), so its features are the fast path's."""
    bert = load_tokenizer("minilm-l6")
    text = "the river runs past an old mill where children play"
    ids = word_ids(bert, text) + [bert.sep_token_id] + word_ids(bert, "quiet town")
    rows = torch.tensor([ids])
    feats = RetokenizedFeatures(minilm, bert, max_len=64)
    out, valid = feats.retokenize(rows)
    assert valid.all() and torch.equal(out, rows)
    h, _ = feats(rows)
    assert torch.allclose(h, minilm(rows), atol=1e-5)


def test_rows_longer_than_max_len_are_cut_counted_and_warned_about(word_tok, minilm):
    dec = load_tokenizer(str(word_tok))
    row = torch.tensor([word_ids(dec, " ".join(WORDS[:20]))] * 256)
    feats = RetokenizedFeatures(minilm, dec, max_len=8)
    with pytest.warns(UserWarning, match="feature_max_len"):
        ids, valid = feats.retokenize(row)
    assert ids.shape == (256, 8) and valid.all()
    assert feats.rows_truncated == feats.rows_seen == 256 and feats.last_truncated_share == 1.0
    short = RetokenizedFeatures(minilm, dec, max_len=64)
    short.retokenize(row[:4])
    assert short.rows_truncated == 0


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_padding_positions_do_not_change_the_perceiver_latent(backend):
    torch.manual_seed(0)
    enc = PerceiverCompressor(16, 32, 4, 8, depth=2, heads=2, backend=backend, max_len=24)
    h = torch.randn(3, 10, 16)
    lengths = torch.tensor([10, 7, 3])
    valid = torch.arange(10) < lengths.unsqueeze(1)
    z = enc(h, valid)
    padded = torch.cat([h, 100 * torch.randn(3, 14, 16)], dim=1)
    padded[~torch.cat([valid, torch.zeros(3, 14, dtype=torch.bool)], 1)] = 50.0
    z_padded = enc(padded, torch.cat([valid, torch.zeros(3, 14, dtype=torch.bool)], 1))
    assert torch.allclose(z, z_padded, atol=1e-5)
    for r, n in enumerate(lengths.tolist()):  # each row as if alone and unpadded
        assert torch.allclose(z[r], enc(h[r : r + 1, :n])[0], atol=1e-5)
    assert torch.allclose(enc(h, torch.ones(3, 10, dtype=torch.bool)), enc(h), atol=1e-6)
    assert not torch.allclose(enc(padded), z_padded, atol=1e-3)  # unmasked, padding counts


def test_standardiser_and_augmentation_ignore_padded_positions():
    x = torch.randn(4, 6, 3)
    valid = torch.arange(6) < torch.tensor([6, 2, 4, 1]).unsqueeze(1)
    garbage = x.masked_fill(~valid.unsqueeze(-1), 1e4)
    masked, plain = RunningStandardizer((3,)), RunningStandardizer((3,))
    masked.update(garbage, valid=valid)
    plain.update(x[valid])
    assert torch.equal(masked.count, plain.count) and torch.allclose(masked.mean, plain.mean)
    assert torch.allclose(masked.var, plain.var)

    h = torch.randn(64, 6, 3)
    mask_vec = torch.full((3,), 9.0)
    valid = torch.rand(64, 6, generator=torch.Generator().manual_seed(1)) < 0.5

    def aug(v):
        return augment_features(h, mask_vec, 0.5, 0.3, torch.Generator().manual_seed(0), v)

    out, unmasked = aug(valid), aug(None)
    assert torch.equal(out[~valid], h[~valid])  # padding left as it was
    assert torch.equal(out[valid], unmasked[valid])  # the same draws at real positions
    assert torch.equal(aug(torch.ones_like(valid)), unmasked)


# ---------------------------------------------------------------------------- the cache
def fake_compute(calls):
    """Deterministic stand-in features: h[l] = (id_l, l, sum of ids) for the first
    length = 1 + (id_0 % L) positions, counting the rows computed in `calls`."""

    def compute(rows):
        calls.append(len(rows))
        b, L = rows.shape
        lengths = 1 + rows[:, 0] % L
        pos = torch.arange(L).expand(b, L)
        h = torch.stack([rows.float(), pos.float(), rows.sum(1, keepdim=True).expand(b, L)], -1)
        h = h / 7 + 0.123  # not exactly representable in fp16
        return h * (pos < lengths.unsqueeze(1)).unsqueeze(-1), lengths

    return compute


def test_cached_features_equal_live_ones_and_a_second_open_reuses_them(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 500, size=(50, 6)).astype(np.uint16)
    val = rng.integers(0, 500, size=(7, 6)).astype(np.uint16)
    key = {"test": 1}
    calls = []
    cache = FeatureCache.open_or_build(
        tmp_path, key, [train, val], fake_compute(calls), 6, 3, batch_size=16, progress=False
    )
    assert sum(calls) == 57 and len(cache) == 57
    positions = sum(1 + int(r[0]) % 6 for r in np.concatenate([train, val]))
    assert (cache.folder / "features.bin").stat().st_size == positions * 3 * 2  # no padding
    x0 = torch.from_numpy(np.concatenate([val[[3]], train[[10, 2]], [[1, 2, 3, 4, 5, 6]]]))
    idx = cache.lookup(x0.long())
    assert idx.tolist() == [53, 10, 2, -1]  # validation rows follow the training rows
    h, lengths = cache.load(idx[:3], "cpu")
    live, live_len = fake_compute([])(x0[:3].long())
    assert torch.equal(lengths, live_len)
    assert torch.allclose(h, live[:, : h.shape[1]], rtol=1e-3, atol=1e-3)  # fp16
    assert h.shape[1] == int(live_len.max())

    calls.clear()
    again = FeatureCache.open_or_build(
        tmp_path, key, [train, val], fake_compute(calls), 6, 3, progress=False
    )
    assert sum(calls) == VERIFY_ROWS  # opened: only the spot check recomputes
    assert torch.equal(again.load(idx[:3], "cpu")[0], h)
    assert len(list(tmp_path.iterdir())) == 1  # no temporary folder left behind


def test_a_corrupt_or_mismatched_cache_is_a_clear_error(tmp_path):
    train = np.random.default_rng(1).integers(0, 500, size=(20, 6)).astype(np.uint16)
    compute = fake_compute([])
    cache = FeatureCache.open_or_build(tmp_path, {"k": 1}, [train], compute, 6, 3, progress=False)
    folder = cache.folder
    with open(folder / "features.bin", "r+b") as fh:  # wrong features: the spot check sees it
        fh.write(np.full(6 * 3, 30.0, dtype=np.float16).tobytes())
    with pytest.raises(DataError, match="does not match the feature model"):
        FeatureCache.open_or_build(tmp_path, {"k": 1}, [train], compute, 6, 3, progress=False)
    with open(folder / "features.bin", "ab") as fh:
        fh.write(b"\0" * 10)
    with pytest.raises(DataError, match="corrupt.*features.bin has"):
        FeatureCache.open_or_build(tmp_path, {"k": 1}, [train], compute, 6, 3, progress=False)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(meta | {"key": {"k": 2}}))
    with pytest.raises(DataError, match="corrupt.*key"):
        FeatureCache.open_or_build(tmp_path, {"k": 1}, [train], compute, 6, 3, progress=False)
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="delete it to rebuild"):
        FeatureCache.open_or_build(tmp_path, {"k": 1}, [train], compute, 6, 3, progress=False)
    missing = FeatureCache.open_or_build(
        tmp_path, {"k": 3}, [train], compute, 6, 3, progress=False, build=False
    )
    assert missing is None


def test_row_index_finds_rows_by_content_and_duplicates_agree():
    rows = np.array([[1, 2, 3], [3, 2, 1], [1, 2, 3], [0, 0, 0]], dtype=np.uint16)
    index = RowIndex([rows[:2], rows[2:]])
    found = index.lookup(np.array([[3, 2, 1], [1, 2, 3], [0, 0, 0], [2, 2, 2]]))
    assert found[0] == 1 and found[1] in (0, 2) and found[2] == 3 and found[3] == -1
    assert np.array_equal(index.rows(np.array([3, 0])), rows[[3, 0]])


# ---------------------------------------------------------------------------- the auto-encoder
FP32 = ["autoencoder.feature_precision=fp32"]


def small_data_overrides():
    # fp32 features: cached and live ones then differ by the fp16 storage alone (bf16 kernels
    # on batches of other sizes differ by ~1%)
    return [*TINY, *AE_SMALL, "data.max_docs=12", "data.heldout_docs=3", *FP32]


def test_autoencoder_reads_cached_features_equal_to_live_ones():
    cfg = build_config("tiny", small_data_overrides(), stage="autoencoder")
    tok = load_tokenizer(cfg.data)
    data = prepare_data(cfg.data, tok, progress=False)
    torch.manual_seed(0)
    ae = Autoencoder(cfg, tokenizer_identity(tok)).eval()
    assert ae.attach_feature_cache(data, "cpu", build=True) is not None
    x0 = torch.from_numpy(np.concatenate([data.train[:5], data.val[:2]]).astype(np.int64))
    cached, valid = ae.frozen_features(x0)
    assert valid is None and ae._cache_hits == 1.0
    live, _ = ae.live_features(x0)
    assert torch.allclose(cached, live, atol=1e-2, rtol=1e-3)  # one fp16 step at most
    ae.feat_norm.update(live)
    ae.z_norm.update(ae.encoder(ae.feat_norm(live)))
    z_cached = ae.encode(x0)
    cache, ae._feature_cache = ae._feature_cache, None
    assert torch.allclose(z_cached, ae.encode(x0), atol=1e-4)
    # a row not in the cache is computed live, in its place
    ae._feature_cache = cache
    mixed = x0.clone()
    mixed[1] = torch.flip(mixed[1], [0])
    h_mixed, _ = ae.frozen_features(mixed)
    assert ae._cache_hits == 6 / 7
    assert torch.allclose(h_mixed[1], ae.live_features(mixed[1:2])[0][0], atol=1e-6)
    assert torch.equal(h_mixed[0], cached[0])
    # another layer is another cache
    other = build_config(
        "tiny", [*small_data_overrides(), "autoencoder.feature_layer=-2"], stage="autoencoder"
    )
    ae2 = Autoencoder(other, tokenizer_identity(tok))
    assert ae2.feature_cache_key(data, "cpu") != ae.feature_cache_key(data, "cpu")


def word_corpus(folder, docs=30, seed=0):
    rnd = random.Random(seed)
    texts = [" ".join(rnd.choices(WORDS, k=rnd.randint(4, 30))) for _ in range(docs)]
    return write_jsonl(folder / "words.jsonl", texts)


def test_cross_tokenizer_cache_gives_the_live_features_and_masks(word_tok, tmp_path):
    corpus = word_corpus(tmp_path)
    over = [*TINY, *AE_SMALL, *FP32, f"data.source={corpus}", f"data.tokenizer={word_tok}"]
    cfg = build_config("tiny", [*over, "data.heldout_docs=6"], stage="autoencoder")
    tok = load_tokenizer(cfg.data)
    data = prepare_data(cfg.data, tok, progress=False)
    ae = Autoencoder(cfg, tokenizer_identity(tok)).eval()
    assert ae.cross_tokenizer and ae.feature_len == 2 * cfg.data.seq_len
    assert ae.attach_feature_cache(data, "cpu", build=True) is not None
    x0 = torch.from_numpy(np.asarray(data.train[:6], dtype=np.int64))
    x0[2] = torch.flip(x0[2], [0])  # not cached: computed live, padded to the batch's longest
    h, valid = ae.frozen_features(x0)
    assert ae._cache_hits == 5 / 6
    live, live_valid = ae.live_features(x0)
    assert torch.equal(valid, live_valid)
    assert torch.allclose(h * valid[..., None], live * live_valid[..., None], atol=1e-2)
    short = build_config("tiny", [*over, "autoencoder.feature_max_len=4"], stage="autoencoder")
    with pytest.warns(UserWarning, match="raise autoencoder.feature_max_len"):
        assert Autoencoder(short, tokenizer_identity(tok)).positions_per_row(data) == 4


def test_autoencoder_with_another_tokenizer_than_the_feature_model_trains(word_tok, tmp_path):
    from diladiff.cli import main

    corpus = word_corpus(tmp_path)
    data = [f"data.source={corpus}", f"data.tokenizer={word_tok}", "data.heldout_docs=6"]
    common = ["--preset", "tiny", *TINY, *data]
    mdlm = tmp_path / "mdlm"
    assert main(["train", "mdlm", "--run-dir", str(mdlm), *common, "train.max_steps=2"]) == 0
    ae_args = ["--init-from", str(mdlm), *common, *AE_SMALL, "autoencoder.feature_max_len=40"]
    runs = {}
    for name, steps in (("a", 3), ("a", 6), ("b", 6)):
        runs[name] = tmp_path / name
        args = ["train", "autoencoder", "--run-dir", str(runs[name]), *ae_args]
        # 3 steps x 8 rows read more rows than there are: the first run builds the cache
        assert main([*args, f"train.max_steps={steps}"]) == 0
    log = [json.loads(x) for x in (runs["b"] / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert steps and all(r["feat_cache_hit"] == 1.0 for r in steps)  # every row from the cache
    assert not any("feat_truncated" in r for r in steps)  # no row tokenised live
    # a resumed run (3 + 3 steps) opens the same cache: the same weights as 6 steps at once
    from safetensors.torch import load_file

    from diladiff.train.checkpoint import latest_checkpoint

    a = load_file(latest_checkpoint(runs["a"]) / "model.safetensors")
    b = load_file(latest_checkpoint(runs["b"]) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["encoder.layers.0.kv_pos"].shape[0] == 40 + 8  # feature_max_len + N_z keys
