"""The frozen feature model (a pretrained BERT-style encoder, or a causal LM) and its features of
rows tokenised by another tokenizer.

    h = FeatureModel("bert-base-uncased", layer=-1)(ids)      # (B, L, d_bert), no gradients
    h = FeatureModel("gpt2", layer=-3)(ids)                   # (B, L, 768): a causal LM's
                                                              # third-to-last hidden state
    h = FeatureModel("smollm2-135m", layer=-3)(ids)           # offline stand-in, (B, L, 576)

`layer` indexes the model's `hidden_states` (0 = embeddings, -1 = the last, after the final
norm). AutoModel gives a causal LM's base model (GPT2Model, LlamaModel: no LM head); a causal
model's features at position l see tokens <= l only. Causal LMs put a few coordinates of the
first position of a row far outside the rest (an attention sink: SmolLM2's layer -3 norm there
is tens of times the others), which per-coordinate statistics pooled over positions will include.

The encoder's weights are not part of any checkpoint: it is re-loaded by name (hub name,
local path or an alias of diladiff.pretrained.MODEL_ALIASES), since it is never trained.

Features across tokenizers (`RetokenizedFeatures`): when the rows are tokenised by another
tokenizer than the feature model's (a corpus BPE for the decoder, a BERT for the features), each
row is decoded to text and tokenised again by the feature model's tokenizer:

    row = d_1 [SEP] d_2 [SEP] d_3          (decoder ids; d_k: the pieces between separators)
    feature ids = t(text(d_1)) [SEP'] t(text(d_2)) [SEP'] t(text(d_3)), cut to max_len

text() decodes without special tokens (padding, masks), t() tokenises without adding any, and
the row's document boundaries become the feature tokenizer's own separator [SEP'] (its sep
token, else eos): the input has the layout of a row packed with the feature tokenizer (no [CLS],
a separator after each document), which is what the same-tokenizer path feeds the model. Rows
come back right-padded to the batch's longest, with a mask `valid`; how many rows are cut at
max_len is counted (and warned about when more than TRUNCATION_WARN_SHARE of them are).

The feature cache (features/cache.py) keeps such features of packed rows on disk.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch
from torch import nn

from diladiff.errors import DataError
from diladiff.features.cache import (
    FEATURE_CACHE_VERSION,
    FeatureCache,
    RowIndex,
    cache_bytes,
    cache_folder_name,
    fits,
    row_hashes,
)
from diladiff.pretrained import (
    load_pretrained_tokenizer,
    resolve_model_name,
    separator_id,
    tokenizer_identity,
)

__all__ = [
    "FEATURE_CACHE_VERSION",
    "FEATURE_PRECISIONS",
    "FeatureCache",
    "FeatureModel",
    "RetokenizedFeatures",
    "RowIndex",
    "TRUNCATION_WARN_SHARE",
    "cache_bytes",
    "cache_folder_name",
    "export_feature_model",
    "feature_dtype",
    "fits",
    "row_hashes",
]

_ENCODERS: dict[str, nn.Module] = {}


FEATURE_PRECISIONS = ("auto", "fp32", "bf16")


def feature_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The frozen encoder's compute dtype. "auto": bf16 on CUDA and on CPUs with native bf16
    matrix units (oneDNN: AVX512-BF16 / AMX), where it runs the encoder ~3x faster than fp32
    (features differ by ~1% relative norm); fp32 elsewhere. The features are returned in fp32."""
    if precision not in FEATURE_PRECISIONS:
        raise DataError(
            f"autoencoder.feature_precision must be one of {FEATURE_PRECISIONS}, not {precision!r}"
        )
    if precision == "auto":
        fast_bf16 = device.type == "cuda" or (
            device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
        precision = "bf16" if fast_bf16 else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


class FeatureModel(nn.Module):
    def __init__(self, name: str, layer: int = -1, precision: str = "auto"):
        super().__init__()
        self.name, self.layer, self.precision = name, layer, precision
        feature_dtype(precision, torch.device("cpu"))  # a bad value fails at construction
        if name not in _ENCODERS:
            from transformers import AutoModel

            try:
                model = AutoModel.from_pretrained(resolve_model_name(name))
            except (OSError, ValueError) as exc:
                raise DataError(
                    f"cannot load feature model {name!r}: {str(exc).splitlines()[0]}"
                ) from None
            # fp32 in memory whatever the saved dtype (an fp16 folder from
            # export_feature_model): the compute precision is feature_precision's choice.
            _ENCODERS[name] = model.float().eval().requires_grad_(False)
        # A plain attribute (not a registered submodule): kept out of state_dict and optimizers.
        self.__dict__["encoder"] = _ENCODERS[name]
        self.dim = int(self.encoder.config.hidden_size)  # 768 for BERT-base / GPT-2, 576 SmolLM2
        # A causal LM would otherwise build a key/value cache on every call (never used here).
        params = inspect.signature(self.encoder.forward).parameters
        self._call_kwargs = {"use_cache": False} if "use_cache" in params else {}

    def tokenizer_identity(self) -> dict:
        return tokenizer_identity(load_pretrained_tokenizer(self.name))

    @torch.no_grad()
    def forward(
        self,
        ids: torch.Tensor,
        zero_inputs: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, L, dim) of `ids` (B, L). zero_inputs (B, L) bool: positions whose
        input (word) embedding is replaced by 0 (fed as `inputs_embeds`; a BERT still adds its
        position and token-type embeddings there). valid (B, L) bool: the attention mask
        (default: every position)."""
        enc = self.encoder
        if next(enc.parameters()).device != ids.device:
            enc.to(ids.device)
        dtype = feature_dtype(self.precision, ids.device)
        mask = torch.ones_like(ids) if valid is None else valid.to(ids.dtype)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if zero_inputs is None:
                inputs = {"input_ids": ids}
            else:
                emb = enc.get_input_embeddings()(ids)
                inputs = {"inputs_embeds": emb.masked_fill(zero_inputs.unsqueeze(-1), 0.0)}
            out = enc(
                **inputs,
                attention_mask=mask,
                output_hidden_states=True,
                **self._call_kwargs,
            )
        return out.hidden_states[self.layer].float()


TRUNCATION_WARN_SHARE = 0.01  # warn when more rows than this are cut at max_len


class RetokenizedFeatures:
    """Features of token rows of another tokenizer, in the feature model's own (module
    docstring): decode, tokenise again, run the model with an attention mask.

        feats = RetokenizedFeatures(FeatureModel("minilm-l6"), load_tokenizer(cfg.data), 128)
        h, valid = feats(x0)              # (B, F, d), (B, F) bool; F <= 128 the longest row
    """

    def __init__(self, model: FeatureModel, decoder_tokenizer, max_len: int):
        if max_len < 1:
            raise DataError(f"the feature length limit must be >= 1, not {max_len}")
        self.model, self.decoder_tok, self.max_len = model, decoder_tokenizer, max_len
        self.feature_tok = load_pretrained_tokenizer(model.name)
        self.decoder_sep = separator_id(decoder_tokenizer)
        self.feature_sep = separator_id(self.feature_tok)
        pad = self.feature_tok.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)  # any id: padded positions are masked
        self.rows_seen = self.rows_truncated = 0
        self.last_truncated_share = 0.0  # of the last batch
        self._warned = False

    def feature_ids(self, rows: torch.Tensor) -> list[list[int]]:
        """Each row's feature-tokenizer ids, whole (not cut at max_len)."""
        pieces, owner = [], []
        for r, row in enumerate(rows.tolist()):
            piece: list[int] = []
            for tid in row:
                if tid == self.decoder_sep:
                    pieces.append(piece)
                    owner.append(r)
                    piece = []
                else:
                    piece.append(tid)
            pieces.append(piece)  # the last piece (empty when the row ends with a separator)
            owner.append(r)
        texts = self.decoder_tok.batch_decode(pieces, skip_special_tokens=True)
        encoded = self.feature_tok(
            texts, add_special_tokens=False, padding=False, truncation=False, verbose=False
        )["input_ids"]
        out: list[list[int]] = [[] for _ in range(len(rows))]
        last = [-1] * len(rows)
        for i, r in enumerate(owner):
            last[r] = i
        for i, (r, ids) in enumerate(zip(owner, encoded, strict=True)):
            out[r].extend(ids)
            if i != last[r]:  # every piece but a row's last was followed by a separator
                out[r].append(self.feature_sep)
        return out

    def retokenize(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature ids (B, F) of decoder rows (B, L), right-padded to the longest row (F >= 1)
        and cut at max_len, and the mask `valid` (B, F) bool of their real positions; counts
        the rows cut."""
        ids = self.feature_ids(rows)
        cut = sum(len(x) > self.max_len for x in ids)
        ids = [x[: self.max_len] for x in ids]
        f = max(1, max(len(x) for x in ids))
        out = torch.full((len(ids), f), self.pad_id, dtype=torch.long)
        valid = torch.zeros(len(ids), f, dtype=torch.bool)
        for r, x in enumerate(ids):
            out[r, : len(x)] = torch.tensor(x, dtype=torch.long)
            valid[r, : len(x)] = True
        self._count(len(ids), cut)
        return out.to(rows.device), valid.to(rows.device)

    def _count(self, rows: int, cut: int) -> None:
        self.rows_seen += rows
        self.rows_truncated += cut
        self.last_truncated_share = cut / max(rows, 1)
        if (
            not self._warned
            and self.rows_seen >= 256
            and self.rows_truncated > TRUNCATION_WARN_SHARE * self.rows_seen
        ):
            self._warned = True
            warnings.warn(
                f"{self.rows_truncated / self.rows_seen:.1%} of rows have more than "
                f"{self.max_len} feature tokens and are cut there; raise the feature length "
                "limit (autoencoder.feature_max_len)",
                stacklevel=2,
            )

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B, F, d) of decoder rows (B, L) in the feature model's tokenizer and
        the mask `valid` (B, F) of their real (not padded) positions."""
        ids, valid = self.retokenize(rows)
        return self.model(ids, valid=valid), valid


def export_feature_model(name: str, out_dir: str | Path, dtype: str = "fp16") -> Path:
    """Save the feature model `name` (hub name, path or alias) with its tokenizer as a local
    safetensors folder in `dtype` ("fp16", "bf16" or "fp32"); it loads as
    autoencoder.feature_model=OUT_DIR and data.tokenizer=OUT_DIR (same tokenizer identity),
    e.g. on a machine without the hub (minilm-l6 in fp16: about 45 MB)."""
    from transformers import AutoModel

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise DataError(f"dtype must be one of {sorted(dtypes)}, not {dtype!r}")
    try:
        model = AutoModel.from_pretrained(resolve_model_name(name))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load feature model {name!r}: {str(exc).splitlines()[0]}") from None
    out = Path(out_dir)
    model.to(dtypes[dtype]).save_pretrained(out, safe_serialization=True)
    load_pretrained_tokenizer(name).save_pretrained(out)
    return out
