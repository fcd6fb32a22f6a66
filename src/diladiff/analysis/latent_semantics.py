"""`diladiff analyze latent RUN` (paper Fig. 3 and 4): what the latent encodes, read through
BERTScore-F1 (the `bert-score` package).

- Noise curve: the encoder's latents of held-out rows plus s * eps, eps ~ N(0, I) drawn once
  (the same direction at every level), in the space the decoder reads: the auto-encoder's
  standardised latent (every coordinate scaled to unit variance over the training rows, so s is
  relative to the latent's per-coordinate std; `latent_std` in the JSON gives it on the
  analysed rows). Each level is decoded with the decoder's randomness fixed (one generator
  seeded with `seed` per level) and scored against the decode of the clean latent with the same
  seed; the mean and std of F1 over rows per level (1 at s = 0 by construction).
- Pools: 10 decodes of latent A with seeds seed..seed+9 and the same seeds on latent B (held-out
  rows 2k and 2k + 1, one pair by default, `pool_pairs` pairs in all): the mean and std of F1
  within a pool (A vs A and B vs B over pairs of different seeds, 2 x 45 scores a pair) and
  across pools (A vs B, all 100 seed pairs), the latter also split into the 10 same-seed pairs
  (A_i vs B_i: only the latent differs) and the 90 other-seed pairs (latent and seed differ, the
  like-for-like comparison with intra). A latent that carries meaning gives intra > inter
  (other seeds); same-seed inter > intra says the decoding randomness matters more than the
  latent.

The scorer is loaded once: `--bertscore-model` is bert-score's default English model
(roberta-large) unless a name or local path is given (offline: `minilm-l6`, 6 layers).
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics

import torch
from tqdm.auto import tqdm

from diladiff.analysis.common import encode, latent_scale
from diladiff.config import ConfigError
from diladiff.data.tokenizer import resolve_model_name
from diladiff.errors import DiladiffError
from diladiff.sampling.generate import decode_tokens, sampler_settings

NOISE_LEVELS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)


class BertScore:
    """A BERTScore-F1 scorer, loaded once."""

    def __init__(self, model: str | None = None, device="cpu"):
        try:
            from bert_score import BERTScorer
        except ImportError:
            raise DiladiffError("analyze latent needs `pip install 'diladiff[analysis]'`") from None
        try:
            if model is None:  # bert-score's English default: roberta-large, layer 17
                self.scorer = BERTScorer(lang="en", device=str(device))
                self.name = f"{self.scorer.model_type} (layer {self.scorer.num_layers})"
            else:  # a hub name or local folder, scored at its last layer
                from transformers import AutoConfig

                path = resolve_model_name(model)
                layers = AutoConfig.from_pretrained(path).num_hidden_layers
                self.scorer = BERTScorer(model_type=path, num_layers=layers, device=str(device))
                self.name = f"{model} (layer {layers})"
        except (OSError, ValueError) as exc:
            what = model or "bert-score's default English model (roberta-large)"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DiladiffError(
                f"cannot load the BERTScore model {what}: {first} (offline: "
                "--bertscore-model minilm-l6 or a local folder)"
            ) from None

    def f1(self, candidates: list[str], references: list[str]) -> list[float]:
        return self.scorer.score(candidates, references, verbose=False)[2].tolist()


def _decode(ae, tok, z, settings, seed: int) -> list[str]:
    gen = torch.Generator(z.device).manual_seed(seed)
    ids, _ = decode_tokens(ae, len(z), settings, gen, z.device, cond=z)
    return tok.batch_decode(ids.tolist(), skip_special_tokens=True)


@torch.no_grad()
def latent_semantics(
    ae,
    tok,
    x0,
    scorer: BertScore,
    disc_steps: int = 0,
    seed: int = 0,
    noise_levels=NOISE_LEVELS,
    pool_size: int = 10,
    pool_pairs: int = 1,
) -> dict:
    if len(x0) < 2 * pool_pairs:
        raise ConfigError(f"{pool_pairs} pool pair(s) need {2 * pool_pairs} rows, not {len(x0)}")
    sample = dataclasses.replace(ae.cfg.sample, disc_steps=disc_steps or ae.cfg.sample.disc_steps)
    settings = sampler_settings(sample, ae.seq_len)
    z = encode(ae, x0)
    clean = _decode(ae, tok, z, settings, seed)
    curve = []
    noise_gen = torch.Generator(z.device).manual_seed(seed + 1)
    noise = torch.randn(z.shape, generator=noise_gen, device=z.device)
    for s in tqdm(noise_levels, desc="latent noise", unit="level"):
        f1 = scorer.f1(_decode(ae, tok, z + s * noise, settings, seed), clean)
        curve.append(
            {"noise_std": s, "f1_mean": statistics.mean(f1), "f1_std": statistics.pstdev(f1)}
        )
    same = list(itertools.combinations(range(pool_size), 2))
    across = list(itertools.product(range(pool_size), repeat=2))

    def scores(a, b, index_pairs):
        return scorer.f1([a[i] for i, _ in index_pairs], [b[j] for _, j in index_pairs])

    intra, inter, inter_same, inter_other, per_pair = [], [], [], [], []
    bar = tqdm(total=2 * pool_pairs * pool_size, desc="latent pools", unit="decode")
    for k in range(pool_pairs):
        pools = []
        for row in (2 * k, 2 * k + 1):
            pool = []
            for i in range(pool_size):  # one row a decode: seed i is the same draw on A and B
                pool += _decode(ae, tok, z[row : row + 1], settings, seed + i)
                bar.update()
            pools.append(pool)
        a, b = pools
        pair_intra = scores(a, a, same) + scores(b, b, same)
        pair_inter = scores(a, b, across)
        intra += pair_intra
        inter += pair_inter
        inter_same += [f for (i, j), f in zip(across, pair_inter, strict=True) if i == j]
        inter_other += [f for (i, j), f in zip(across, pair_inter, strict=True) if i != j]
        per_pair.append(
            {
                "rows": [2 * k, 2 * k + 1],
                "intra_mean": statistics.mean(pair_intra),
                "inter_mean": statistics.mean(pair_inter),
                "inter_same_seed_mean": statistics.mean(pair_inter[:: pool_size + 1]),
                "example_A": a[0],
                "example_B": b[0],
            }
        )
    bar.close()
    return {
        "scorer": scorer.name,
        "disc_steps": settings.steps,
        "noise_space": "auto-encoder's standardised latent (decoder input), std relative",
        "latent_std": latent_scale(z),
        "noise_curve": curve,
        "pools": {
            "size": pool_size,
            "pairs": pool_pairs,
            "intra_mean": statistics.mean(intra),
            "intra_std": statistics.pstdev(intra),
            "inter_mean": statistics.mean(inter),
            "inter_std": statistics.pstdev(inter),
            "inter_same_seed_mean": statistics.mean(inter_same),
            "inter_same_seed_std": statistics.pstdev(inter_same),
            "inter_other_seed_mean": statistics.mean(inter_other),
            "inter_other_seed_std": statistics.pstdev(inter_other),
            "per_pair": per_pair,
        },
        "rows": len(x0),
        "seed": seed,
    }


def plot(result: dict, title: str):
    from diladiff.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    c = result["noise_curve"]
    ax.errorbar(
        [p["noise_std"] for p in c],
        [p["f1_mean"] for p in c],
        yerr=[p["f1_std"] for p in c],
        marker="o",
        capsize=3,
    )
    pools = result["pools"]
    ax.axhline(pools["intra_mean"], ls="--", c="g", label="same latent, other seeds")
    ax.axhline(pools["inter_other_seed_mean"], ls=":", c="r", label="other latent, other seeds")
    ax.axhline(pools["inter_same_seed_mean"], ls="-.", c="m", label="other latent, same seed")
    ax.set_xlabel("std of noise added to the latent")
    ax.set_ylabel("BERTScore-F1 to the clean decode")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig
