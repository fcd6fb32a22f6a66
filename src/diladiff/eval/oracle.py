"""Oracle generation on real text (the paper's Table 1 "Oracle" columns) and its control.

- oracle: the auto-encoder's decoder, from an all-masked sequence, conditioned on the encoder
  latent of a held-out row: decode_latent(stage, stage.encode_clean(x0), ...). An upper
  reference for what a perfect latent prior could reach with this decoder.
- other-row latent: the encoder latent of another held-out row (row i gets row i + 1's, the
  last the first's): a real, in-distribution latent that carries nothing about row i. The gap
  oracle - other-row is what the decoder reads from the latent about the row itself.
- noise latent: the same decoder and decoding randomness with z ~ N(0, I) in the auto-encoder's
  standardised space: what the decoder does with an uninformative latent (a plain MDLM, if the
  p_drop training worked).

Both are scored under the fixed protocol like any generator. token_recovery = the share of
generated token positions equal to the held-out row's token at that position (for the noise
latent: the chance level against the same rows). The held-out rows are the last n rows of the
validation split, disjoint from the MAUVE reference (its first n rows) when the split holds at
least 2n rows; otherwise the first n, and the result says so.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from diladiff.errors import DataError
from diladiff.runtime import autocast, synchronize
from diladiff.sampling.generate import Generation, decode_latent

CONTROLS = ("oracle", "other_row_latent", "noise_latent")


def token_recovery(ids, rows) -> float:
    """Share of positions where generated ids equal the reference rows' ids (same shape)."""
    a, b = np.asarray(ids), np.asarray(rows)
    if a.shape != b.shape:
        raise ValueError(f"generated ids {a.shape} and reference rows {b.shape} differ in shape")
    return float((a == b).mean())


def oracle_rows(stage, tok, num: int) -> tuple[np.ndarray, dict]:
    """`num` held-out rows for the oracle, disjoint from the MAUVE reference when possible."""
    from diladiff.data.packing import prepare_data

    val = prepare_data(stage.cfg.data, tok, progress=False).val
    if len(val) < num:
        raise DataError(f"{len(val)} held-out rows, fewer than {num} oracle samples")
    disjoint = len(val) >= 2 * num
    rows = np.asarray(val[len(val) - num :] if disjoint else val[:num], dtype=np.int64)
    where = f"val[{len(val) - num}:{len(val)}]" if disjoint else f"val[:{num}]"
    return rows, {"oracle_rows": where, "overlaps_mauve_reference": not disjoint}


@torch.no_grad()
def decode_latents(
    stage,
    tok,
    latents: torch.Tensor,
    settings,
    seed: int,
    batch_size: int,
    device,
    prior_space: bool = False,
) -> Generation:
    """Masked decoding conditioned on auto-encoder-space latents (n, N_z, d_z), in batches, from
    one generator seeded with `seed`. prior_space: the latents are a latent stage's prior
    samples, mapped to the decoder's space (`stage.to_decoder_space`) on the device first.
    seconds: the decoding's wall time (the mapping included)."""
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed)
    ids: list[list[int]] = []
    stats: dict = {}
    start = time.perf_counter()
    for i in range(0, len(latents), batch_size):
        z = latents[i : i + batch_size].to(device)
        if prior_space:
            z = stage.to_decoder_space(z)
        with autocast(device):
            out, st = decode_latent(stage, z, settings, gen, device)
        ids += out.cpu().tolist()
        for k, v in st.items():
            stats[k] = stats.get(k, 0) + v
    synchronize(device)
    seconds = time.perf_counter() - start
    return Generation(ids, tok.batch_decode(ids, skip_special_tokens=True), seconds, stats)


@torch.no_grad()
def encoder_latents(
    stage, rows: np.ndarray, batch_size: int, device, prior_space: bool = False
) -> torch.Tensor:
    """The encoder's latents of clean rows, in batches, as a float32 CPU tensor (n, N_z, d_z):
    in the auto-encoder's own standardised space (`stage.encode_clean`), or with prior_space
    in the prior's (`stage.prior_latents`)."""
    encode = stage.prior_latents if prior_space else stage.encode_clean
    enc = []
    for i in range(0, len(rows), batch_size):
        x0 = torch.from_numpy(np.asarray(rows[i : i + batch_size], dtype=np.int64)).to(device)
        with autocast(device):
            enc.append(encode(x0).float().cpu())
    return torch.cat(enc)


def row_controls(own: torch.Tensor, generator: torch.Generator | None) -> dict:
    """The control latents of rows whose encoder latents are `own` (n, ...): {"oracle": own,
    "other_row_latent": the same latents shifted by one row (row i gets row i + 1's),
    "noise_latent": N(0, I) of the same shape, device and dtype, drawn from `generator`}."""
    noise = torch.randn(own.shape, generator=generator, device=own.device, dtype=own.dtype)
    return {"oracle": own, "other_row_latent": own.roll(-1, dims=0), "noise_latent": noise}


@torch.no_grad()
def control_latents(stage, rows: np.ndarray, seed: int, batch_size: int, device) -> dict:
    """row_controls of the encoder latents of `rows` (CPU generator seeded with `seed`), all in
    the auto-encoder's space, on the CPU."""
    enc = encoder_latents(stage, rows, batch_size, device)
    return row_controls(enc, torch.Generator().manual_seed(seed))
