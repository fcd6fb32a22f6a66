"""The frozen feature model (a pretrained BERT-style encoder, or a causal LM) and per-coordinate
standardisation (running, aggregated during training; or fixed, estimated once from a frozen
model).

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
local path or an alias of data.tokenizer.MODEL_ALIASES), since it is never trained.

LADD's latent (`PooledLatentEncoder`, docs/methods/ladd.md#latent-encoder): H = the last hidden
layer on x0 (B, L, H), pooled to N_z vectors, clipped to the first d_z dimensions (Matryoshka),
optionally L2-normalised per vector (Co-LADD):

    N_z = L:  z^j = H_j                                        (token-aligned)
    N_z < L:  "adaptive_chunk_mean_eos": the valid tokens but the last, of ranks
              r = 0..L'-1 (L' = L_valid - 1), go to chunk floor(r (N_z - 1) / L');
              z^j = mean of chunk j (j < N_z - 1),  z^{N_z - 1} = H at the last valid token
    z0 = normalize(clip_{d_z}(z))  (Co-LADD)   or   clip_{d_z}(z)  (Di-LADD)

Encoder-input dropout (training only; `input_dropout_rows`): p_r ~ U[0, p_max] per row, then
one Bernoulli(p_r) coin per row; a row whose coin is 1 has the input embedding of every
position masked in x_t zeroed (and, token-aligned, the same latent vectors zeroed).

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
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from diladiff.config import ConfigError
from diladiff.data.tokenizer import (
    load_tokenizer,
    resolve_model_name,
    separator_id,
    tokenizer_identity,
)
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

__all__ = [
    "FEATURE_CACHE_VERSION",
    "FEATURE_PRECISIONS",
    "FeatureCache",
    "FeatureModel",
    "PooledLatentEncoder",
    "RetokenizedFeatures",
    "RowIndex",
    "RunningStandardizer",
    "Standardizer",
    "TRUNCATION_WARN_SHARE",
    "cache_bytes",
    "cache_folder_name",
    "export_feature_model",
    "feature_dtype",
    "fits",
    "input_dropout_rows",
    "pool_latents",
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
        return tokenizer_identity(load_tokenizer(self.name))

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


def pool_latents(
    h: torch.Tensor, num_latents: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """LADD's pooling of hidden states h (B, L, H) to (B, N_z, H) (module docstring):
    N_z = L keeps the tokens; N_z < L is "adaptive_chunk_mean_eos" (N_z - 1 chunk means of the
    valid tokens but the last, then the last valid token's state). valid (B, L) bool, default
    all (then the last token is position L - 1). As the authors' code, a row with fewer than
    N_z valid tokens pools to zeros. N_z = 1 is the last valid token alone."""
    b, l, d = h.shape
    if num_latents == l:
        return h
    if not 1 <= num_latents < l:
        raise ConfigError(f"cannot pool {l} positions to {num_latents} latent vectors")
    if valid is None:
        valid = torch.ones(b, l, dtype=torch.bool, device=h.device)
    valid = valid.bool()
    ranks = valid.long().cumsum(1) - 1  # rank among the row's valid tokens
    lengths = valid.sum(1)
    last = valid & (ranks == (lengths - 1).unsqueeze(1))
    n = num_latents - 1
    pos = torch.arange(b, device=h.device)
    last_state = h[pos, last.long().argmax(1)].unsqueeze(1)  # (B, 1, H)
    if n == 0:
        pooled = last_state
    else:
        # Prefix tokens have ranks 0..L'-1 (all before the last valid one): chunk
        # floor(r n / L'), in [0, n-1]; the clamp only keeps the zero-weight others in range.
        prefix = (valid & ~last).to(h.dtype)
        bins = (ranks.clamp(min=0) * n) // (lengths - 1).clamp(min=1).unsqueeze(1)
        bins = bins.clamp(0, n - 1)
        sums = h.new_zeros(b, n, d).scatter_add_(
            1, bins.unsqueeze(-1).expand(-1, -1, d), h * prefix.unsqueeze(-1)
        )
        counts = h.new_zeros(b, n).scatter_add_(1, bins, prefix)
        pooled = torch.cat([sums / counts.clamp(min=1).unsqueeze(-1), last_state], dim=1)
    return pooled.masked_fill((lengths < num_latents).view(b, 1, 1), 0.0)


def input_dropout_rows(
    batch: int,
    p_max: float = 0.9,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """LADD's encoder-input dropout coins (the authors' code): p_r ~ U[0, p_max] per row, then
    one Bernoulli(p_r) coin per row; (B,) bool, True where the row's masked positions get their
    encoder input blanked (P(True) = p_max / 2). Draws two (B,) uniforms from `generator`."""
    p_r = p_max * torch.rand(batch, generator=generator, device=device)
    return torch.rand(batch, generator=generator, device=device) < p_r


class PooledLatentEncoder(nn.Module):
    """LADD's frozen latent encoder: z0 (B, N_z, d_z) of token rows (module docstring).

        enc = PooledLatentEncoder("minilm-l6", num_latents=4, latent_dim=32, normalize=True)
        z0 = enc(x0)                                   # (B, 4, 32), unit vectors, no gradients
        rows = input_dropout_rows(B, 0.9, gen, x0.device)
        z0 = enc(x0, blank=(x_t == mask_id) & rows[:, None])   # training: p_r blanking

    No parameters or buffers of its own (the encoder stays out of state_dict, as FeatureModel's).
    """

    def __init__(
        self,
        name: str,
        layer: int = -1,
        precision: str = "auto",
        *,
        num_latents: int,
        latent_dim: int,
        normalize: bool,
    ):
        super().__init__()
        self.features = FeatureModel(name, layer, precision)
        if num_latents < 1 or not 1 <= latent_dim <= self.features.dim:
            raise ConfigError(
                f"the LADD latent needs num_latents >= 1 and 1 <= latent_dim <= "
                f"{self.features.dim} (the width of {name!r}), got {num_latents} x {latent_dim}"
            )
        self.num_latents, self.dim, self.normalize = num_latents, latent_dim, normalize

    @torch.no_grad()
    def forward(
        self,
        ids: torch.Tensor,
        blank: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z0 of ids (B, L). blank (B, L) bool: positions whose encoder input embedding is zeroed
        (the rows picked by input_dropout_rows, at the positions masked in x_t); applied in
        training mode only. valid (B, L) bool: the attention mask (default all)."""
        if not self.training or blank is None or not blank.any():
            blank = None
        h = self.features(ids, zero_inputs=blank, valid=valid)
        z = pool_latents(h, self.num_latents, valid)[..., : self.dim]
        if self.normalize:
            z = F.normalize(z, dim=-1)
        if blank is not None and self.num_latents == ids.shape[1]:
            # Token-aligned: a blanked position's latent would still be the encoder's
            # contextual guess of its token; the authors' code zeroes those latents too.
            z = z.masked_fill(blank.unsqueeze(-1), 0.0)
        return z


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
        self.feature_tok = load_tokenizer(model.name)
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
    load_tokenizer(name).save_pretrained(out)
    return out


class RunningStandardizer(nn.Module):
    """(x - mean) / sqrt(var + eps) per coordinate, with mean and variance aggregated over all
    training batches seen (Chan et al.'s parallel update) and stored as buffers. Under
    torch.distributed, `update(x, across_ranks=True)` folds in every rank's batch, so the
    replicas keep identical statistics (every rank must then call it)."""

    def __init__(self, shape: tuple[int, ...], eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(shape, dtype=torch.float64))

    @torch.no_grad()
    def update(
        self, x: torch.Tensor, across_ranks: bool = False, valid: torch.Tensor | None = None
    ) -> None:
        """Fold a batch x (..., *shape) into the statistics; with `across_ranks` (and a
        process group) the union of every rank's batch, combined with the same parallel
        update: n = sum n_k, mean_b = sum n_k mean_k / n, m2_b = sum (m2_k + n_k mean_k^2) -
        n mean_b^2. valid (...) bool (x's leading dims): only the entries marked True count
        (padding does not)."""
        x = x.detach().double()
        if valid is not None:
            x = x[valid.bool()]
        x = x.reshape(-1, *self.mean.shape)
        n = x.shape[0]
        mean_b = x.mean(0) if n else torch.zeros_like(self.mean)
        m2_b = ((x - mean_b) ** 2).sum(0)
        if across_ranks and dist.is_available() and dist.is_initialized():
            n_mean = torch.stack([torch.full_like(mean_b, n), n * mean_b, m2_b + n * mean_b**2])
            dist.all_reduce(n_mean, op=dist.ReduceOp.SUM)
            n = float(n_mean[0].flatten()[0])
            mean_b = n_mean[1] / n
            m2_b = (n_mean[2] - n * mean_b**2).clamp(min=0)
        if n == 0:
            return
        total = self.count + n
        delta = mean_b - self.mean
        self.mean += delta * n / total
        self.m2 += m2_b + delta**2 * self.count * n / total
        self.count.fill_(total)

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / self.count.clamp(min=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("standardiser has no statistics yet (update it in training)")
        return (x - self.mean.to(x.dtype)) / torch.sqrt(self.var + self.eps).to(x.dtype)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sqrt(self.var + self.eps).to(x.dtype) + self.mean.to(x.dtype)


class Standardizer(nn.Module):
    """y = (x - m) / s per coordinate, with m and s = sqrt(var + eps) estimated once (`fit`) over
    all the data given, stored as buffers, and not changed afterwards."""

    def __init__(self, shape: tuple[int, ...], eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Exact pooled mean and variance of batches (..., *shape), accumulated in float64."""
        acc = RunningStandardizer(tuple(self.mean.shape)).to(self.mean.device)
        for x in batches:
            acc.update(x)
        if acc.count == 0:
            raise ValueError("cannot fit a standardiser on no data")
        self.mean.copy_(acc.mean)
        self.std.copy_(torch.sqrt(acc.var + self.eps))
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError("standardiser has no statistics yet (fit it first)")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """x = m + s y."""
        if not self.fitted:
            raise RuntimeError("standardiser has no statistics yet (fit it first)")
        return y * self.std.to(y.dtype) + self.mean.to(y.dtype)
