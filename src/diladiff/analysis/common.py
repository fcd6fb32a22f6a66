"""What every analysis needs: the decoder with its encoder, held-out rows, and output paths."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diladiff.config import ConfigError
from diladiff.eval.ppl import corpus_rows
from diladiff.runs import load_run
from diladiff.stages import LatentStage
from diladiff.stages.protocols import CrossAttending


def load_autoencoder(run_dir, device):
    """(the auto-encoder stage inside an auto-encoder, LaDiff or DiLaDiff run, tokenizer)."""
    stage, tok = load_run(run_dir, device=device)
    frozen = isinstance(stage, LatentStage) and stage.frozen_autoencoder
    ae = stage.decoder_stage if frozen else stage
    if not isinstance(ae, CrossAttending):
        raise ConfigError(
            f"{run_dir} is a {stage.kind} run; the analyses need an auto-encoder, LaDiff or "
            "DiLaDiff run (an encoder and a latent-conditioned decoder)"
        )
    return ae, tok


def heldout(ae, tok, source, rows: int, device):
    """`rows` held-out rows of `source` (default: the run's own data)."""
    return corpus_rows(ae, tok, source, rows, None, device)


@torch.no_grad()
def encode(ae, x0: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The encoder's latents of rows x0 (B, L) in the decoder's space, in batches."""
    return torch.cat([ae.encode(x0[i : i + batch_size]) for i in range(0, len(x0), batch_size)])


def latent_scale(z) -> dict:
    """The per-coordinate std of latents z (B, N_z, d_z) across rows, summarised over the
    coordinates: in the auto-encoder's standardised space (what the decoder reads) it is 1 on
    the training data by construction, so a noise std s is s times the latent's own spread;
    this shows how close the analysed rows come to that."""
    if len(z) < 2:
        return {"rows": len(z)}
    std = z.float().std(0)
    return {
        "rows": len(z),
        "mean": float(std.mean()),
        "min": float(std.min()),
        "max": float(std.max()),
        "rms": float(z.float().pow(2).mean().sqrt()),
    }


def write_outputs(result: dict, out: Path, name: str, fig) -> tuple[Path, Path]:
    """out/<name>.json and out/<name>.png."""
    from diladiff.plotting import save

    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    save(fig, png_path)
    return json_path, png_path
