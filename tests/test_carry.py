"""What a run needs on a machine without the hub or the corpus: a packed folder as
data.source (`diladiff prepare-data`) and a local fp16 feature model (`diladiff
export-features`)."""

import json
import shutil

import numpy as np
import torch
from conftest import TINY, write_jsonl

from diladiff.cli import main
from diladiff.config import build_config
from diladiff.data.packing import prepare_data
from diladiff.data.tokenizer import load_tokenizer, tokenizer_identity
from diladiff.features import FeatureModel

DOCS = [f"document {i} tells of the river and the {i % 7} hills near the town." for i in range(120)]


def test_a_packed_folder_is_a_data_source_without_the_corpus(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    cache = tmp_path / "carry" / "data"
    data = [f"data.source={corpus}", "data.heldout_docs=20", "data.seq_len=16"]
    assert main(["prepare-data", "--preset", "tiny", *data, f"data.cache_dir={cache}"]) == 0
    folder = capsys.readouterr().out.splitlines()[0]
    assert json.loads((cache / folder.split("/")[-1] / "manifest.json").read_text())
    corpus.unlink()  # the corpus is gone: the packed folder is enough
    cfg = build_config("tiny", [f"data.source={folder}", "data.seq_len=16"]).data
    packed = prepare_data(cfg, load_tokenizer(cfg.tokenizer), progress=False)
    assert packed.manifest["source"] == str(corpus) and len(packed.train) > 0
    run = tmp_path / "run"
    argv = ["train", "mdlm", "--preset", "tiny", "--run-dir", str(run), *TINY]
    assert main(argv + [f"data.source={folder}", "data.seq_len=16", "train.max_steps=1"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["data"]["train_rows"] == len(packed.train)
    # rows of another length, or another tokenizer's, are refused with a one-line error
    assert main(argv + [f"data.source={folder}", "train.max_steps=1"]) == 2  # seq_len 32
    assert "not data.seq_len=32" in capsys.readouterr().err


def test_an_fp16_feature_folder_gives_the_same_features_and_tokenizer(tmp_path):
    out = tmp_path / "features"
    assert main(["export-features", "minilm-l6", str(out), "--dtype", "fp16"]) == 0
    weights = next(out.glob("*.safetensors"))
    assert weights.stat().st_size < 50 * 2**20  # about half of the fp32 model
    ref, local = (
        FeatureModel("minilm-l6", precision="fp32"),
        FeatureModel(str(out), precision="fp32"),
    )
    assert tokenizer_identity(load_tokenizer(str(out))) == local.tokenizer_identity()
    assert local.tokenizer_identity() == ref.tokenizer_identity()
    ids = torch.from_numpy(np.random.default_rng(0).integers(1000, 5000, (2, 12)))
    a, b = ref(ids), local(ids)
    assert ((a - b).norm() / a.norm()).item() < 5e-3  # fp16 rounding of the weights
    shutil.rmtree(out)
