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
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from diladiff.data.tokenizer import load_tokenizer, resolve_model_name, tokenizer_identity
from diladiff.errors import DataError

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
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        if next(enc.parameters()).device != ids.device:
            enc.to(ids.device)
        dtype = feature_dtype(self.precision, ids.device)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = enc(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                output_hidden_states=True,
                **self._call_kwargs,
            )
        return out.hidden_states[self.layer].float()


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
    training batches seen (Chan et al.'s parallel update) and stored as buffers."""

    def __init__(self, shape: tuple[int, ...], eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(shape, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold a batch x (..., *shape) into the statistics."""
        x = x.detach().double().reshape(-1, *self.mean.shape)
        n = x.shape[0]
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
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
