"""`diladiff analyze cross-attention RUN` (paper Fig. 8): how much the decoder uses its latent.

Per masking-ratio bin (exactly round(r L) tokens masked, r at the bin's centre), forward hooks
measure, for every injected cross-attention layer k (placed after decoder block k) and for the
self-attention of that block,

    contribution = || update || / || residual stream entering the layer ||

(Frobenius norms over all rows and positions of the batch, masked and unmasked): the
cross-attention's update is its output minus its input (h + W_out Attn(...) - h, measured
against the stream h entering it, i.e. leaving block k); the self-attention's is the output of
block k's attention module, which the block adds to the stream unchanged (the auto-encoder's
decoder is not time-conditioned, so no adaLN gate), measured against the stream entering
block k. The latent is the encoder's, clean; the masks are drawn from a generator seeded with
`seed` (the same rows in every bin)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from diladiff.processes.masking import mask_exactly


@torch.no_grad()
def cross_attention_use(ae, x0: torch.Tensor, bins: int = 10, seed: int = 0) -> dict:
    """{"bins": [{ratio, layers: {k: {cross, self}}}], ...} for decoder rows x0 (B, L)."""
    gen = torch.Generator(x0.device).manual_seed(seed)
    z = ae.encode(x0)
    blocks = ae.decoder.backbone.blocks
    records: dict[str, float] = {}
    hooks = []

    def cross_hook(k):
        def hook(module, args, output):
            h = args[0]
            records[f"cross{k}"] = float((output - h).norm() / h.norm())

        return hook

    def self_hooks(k):
        stream = {}

        def pre(module, args):
            stream["h"] = args[0]

        def post(module, args, output):
            records[f"self{k}"] = float(output.norm() / stream["h"].norm())

        return pre, post

    for k, layer in ae.cross.items():
        hooks.append(layer.register_forward_hook(cross_hook(int(k))))
        pre, post = self_hooks(int(k))
        hooks.append(blocks[int(k)].register_forward_pre_hook(pre))
        hooks.append(blocks[int(k)].attn.register_forward_hook(post))
    out = []
    try:
        for b in tqdm(range(bins), desc="cross-attention", unit="bin"):
            ratio = (b + 0.5) / bins
            count = max(1, round(ratio * x0.shape[1]))
            counts = torch.full((len(x0),), count, device=x0.device)
            ae.hidden(mask_exactly(x0, counts, ae.mask_id, gen), z)
            layers = {
                int(k): {"cross": records[f"cross{int(k)}"], "self": records[f"self{int(k)}"]}
                for k in ae.cross
            }
            out.append({"ratio": ratio, "masked": count, "layers": layers})
    finally:
        for h in hooks:
            h.remove()
    return {
        "bins": out,
        "injected_after_blocks": sorted(int(k) for k in ae.cross),
        "rows": len(x0),
        "seed": seed,
    }


def plot(result: dict, title: str):
    from diladiff.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ratios = [b["ratio"] for b in result["bins"]]
    for k in result["bins"][0]["layers"]:
        ax.plot(
            ratios,
            [b["layers"][k]["cross"] for b in result["bins"]],
            "o-",
            label=f"cross-attention after block {k}",
        )
        ax.plot(
            ratios,
            [b["layers"][k]["self"] for b in result["bins"]],
            "x--",
            label=f"self-attention of block {k}",
        )
    ax.set_xlabel("masking ratio")
    ax.set_ylabel("||update|| / ||residual stream||")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig
