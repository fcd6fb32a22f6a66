"""`diladiff analyze latent RUN` (paper Fig. 3 and 4): what the latent encodes, read through
BERTScore-F1 (the `bert-score` package).

- Noise curve: the encoder's latents of held-out rows plus N(0, s^2) noise (the auto-encoder's
  standardised space: unit variance per coordinate, so s is relative), decoded with the
  decoder's randomness fixed (the same seed at every level), scored against the decode of the
  clean latent; the mean F1 per level.
- Pools: 10 decodes of latent A with seeds 0..9 and the same seeds on latent B (two held-out
  rows): the mean and std of F1 within a pool (A vs A, B vs B, pairs of different seeds) and
  across pools (A vs B): a latent that carries meaning gives intra > inter.

The scorer is loaded once: `--bertscore-model` is bert-score's default English model
(roberta-large) unless a name or local path is given (offline: `minilm-l6`, 6 layers).
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics

import torch
from tqdm.auto import tqdm

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
        if model is None:
            self.scorer = BERTScorer(lang="en", device=str(device))
            self.name = "bert-score default (en)"
        else:
            from transformers import AutoConfig

            path = resolve_model_name(model)
            layers = AutoConfig.from_pretrained(path).num_hidden_layers
            self.scorer = BERTScorer(model_type=path, num_layers=layers, device=str(device))
            self.name = f"{model} (layer {layers})"

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
) -> dict:
    sample = dataclasses.replace(ae.cfg.sample, disc_steps=disc_steps or ae.cfg.sample.disc_steps)
    settings = sampler_settings(sample, ae.seq_len)
    z = ae.encode(x0)
    clean = _decode(ae, tok, z, settings, seed)
    curve = []
    noise_gen = torch.Generator(z.device).manual_seed(seed + 1)
    noise = torch.randn(z.shape, generator=noise_gen, device=z.device)
    for s in tqdm(noise_levels, desc="latent noise", unit="level", leave=False):
        f1 = scorer.f1(_decode(ae, tok, z + s * noise, settings, seed), clean)
        curve.append(
            {"noise_std": s, "f1_mean": statistics.mean(f1), "f1_std": statistics.pstdev(f1)}
        )
    pools = {}
    for name, row in (("A", 0), ("B", 1)):
        zz = z[row : row + 1].expand(pool_size, -1, -1)
        pools[name] = [
            _decode(ae, tok, zz[i : i + 1], settings, seed + i)[0] for i in range(pool_size)
        ]
    pairs = list(itertools.combinations(range(pool_size), 2))

    def scores(a, b, index_pairs):
        return scorer.f1([a[i] for i, _ in index_pairs], [b[j] for _, j in index_pairs])

    intra = scores(pools["A"], pools["A"], pairs) + scores(pools["B"], pools["B"], pairs)
    inter = scores(pools["A"], pools["B"], list(itertools.product(range(pool_size), repeat=2)))
    return {
        "scorer": scorer.name,
        "disc_steps": settings.steps,
        "noise_curve": curve,
        "pools": {
            "size": pool_size,
            "intra_mean": statistics.mean(intra),
            "intra_std": statistics.pstdev(intra),
            "inter_mean": statistics.mean(inter),
            "inter_std": statistics.pstdev(inter),
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
    ax.axhline(pools["inter_mean"], ls=":", c="r", label="other latent")
    ax.set_xlabel("std of noise added to the latent")
    ax.set_ylabel("BERTScore-F1 to the clean decode")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig
