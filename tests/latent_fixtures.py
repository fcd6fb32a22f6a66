"""Tiny MDLM -> auto-encoder -> LaDiff runs shared by the latent-stage tests."""

from conftest import TINY

from diladiff.cli import main

AE_SMALL = [
    "autoencoder.latent_dim=64",  # the Perceiver's width follows (= d_z)
    "autoencoder.perceiver_heads=2",
    "autoencoder.num_latents=8",
]
PRIOR_SMALL = ["prior.depth=1", "prior.width=64", "prior.heads=2"]  # width = d_z
QUIET = ["train.progress=false", "train.eval_every=1000"]


def train(stage: str, run, parent_flag: str | None, parent, *extra) -> int:
    args = ["train", stage, "--preset", "tiny", "--run-dir", str(run)]
    if parent_flag:
        args += [parent_flag, str(parent)]
    else:
        args += TINY
    return main([*args, *QUIET, *extra])


def build_chain(root) -> dict:
    runs = {k: root / k for k in ("mdlm", "ae", "ladiff")}
    assert train("mdlm", runs["mdlm"], None, None, "train.max_steps=3") == 0
    assert (
        train(
            "autoencoder", runs["ae"], "--init-from", runs["mdlm"], *AE_SMALL, "train.max_steps=3"
        )
        == 0
    )
    assert (
        train(
            "ladiff", runs["ladiff"], "--autoencoder", runs["ae"], *PRIOR_SMALL, "train.max_steps=4"
        )
        == 0
    )
    return runs
