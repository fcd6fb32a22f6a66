"""`make demo`: the whole pipeline on the tiny preset and the built-in corpus, on CPU."""

from __future__ import annotations

import json
from pathlib import Path

from diladiff.pipeline import run_pipeline

# Step counts for 2 CPU cores. Each stage runs past every warm-up of its tiny preset
# (config.check_warmups): DiLaDiff's 100-step tangent warm-up, then 50 steps at full weight.
DEMO_STEPS = {
    "mdlm": ["train.max_steps=250"],
    "autoencoder": ["train.max_steps=600"],
    "ladiff": ["train.max_steps=150"],
    "diladiff": ["train.max_steps=150"],
}


def run_demo(run_dir: Path, overrides: list[str] | None = None) -> Path:
    report = run_pipeline(
        Path(run_dir), "tiny", list(overrides or []), device_spec="cpu", stage_overrides=DEMO_STEPS
    )
    root = Path(run_dir)
    mdlm_eval = [
        json.loads(x)
        for x in (root / "mdlm" / "log.jsonl").read_text().splitlines()
        if '"eval"' in x
    ]
    print("\n=== demo result ===")
    if mdlm_eval:
        print(
            f"MDLM validation perplexity bound (ELBO, held-out wiki-vital): "
            f"{mdlm_eval[-1]['val_ppl_bound']:.1f}"
        )
    for name in ("mdlm_disc64", "ladiff_cont200_disc64", "diladiff_cont5_disc64"):
        path = root / "eval" / "samples" / f"{name}.jsonl"
        if path.is_file():
            text = json.loads(path.read_text().splitlines()[0])["text"]
            print(f"--- {name}: {text[:300]}")
    print(f"\nreport: {report}")
    return report
