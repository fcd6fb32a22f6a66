"""`make demo`: the whole pipeline on the tiny preset and the built-in corpus, on CPU."""

from __future__ import annotations

import json
from pathlib import Path

from diladiff.pipeline import generators, row_name, run_pipeline
from diladiff.runs import load_run
from diladiff.stages import STAGES, stage_order


def demo_steps() -> dict[str, list[str]]:
    """Each stage's `demo_steps` (sized for 2 CPU cores; each runs past every warm-up of its
    tiny preset, config.check_warmups) as a train.max_steps override."""
    return {kind: [f"train.max_steps={STAGES[kind].demo_steps}"] for kind in stage_order()}


# The demo's tokenizer: a 4,096-token BPE trained on the corpus (issue 26). The tiny preset's
# MiniLM vocabulary (30,522 words) spends most of a small model on its embedding and head;
# the auto-encoder still reads MiniLM features, through the text (cross-tokenizer features).
DEMO_OVERRIDES = ["data.tokenizer=bpe-4096"]


def run_demo(run_dir: Path, overrides: list[str] | None = None) -> Path:
    """The pipeline on the tiny preset with DEMO_OVERRIDES, then `overrides` (which win)."""
    root = Path(run_dir)
    report = run_pipeline(
        root,
        "tiny",
        DEMO_OVERRIDES + list(overrides or []),
        device_spec="cpu",
        stage_overrides=demo_steps(),
    )
    first = stage_order()[0]
    evals = [
        json.loads(x)
        for x in (root / first / "log.jsonl").read_text().splitlines()
        if '"eval"' in x and "val_ppl_bound" in x
    ]
    print("\n=== demo result ===")
    if evals:
        print(
            f"{first} validation perplexity bound (ELBO, held-out wiki-vital): "
            f"{evals[-1]['val_ppl_bound']:.1f}"
        )
    for kind in generators(root):
        seq_len = load_run(root / kind)[0].seq_len
        name = row_name(kind, STAGES[kind].eval_samplers[0], seq_len)
        path = root / "eval" / "samples" / f"{name}.jsonl"
        if path.is_file():
            text = json.loads(path.read_text().splitlines()[0])["text"]
            print(f"--- {name}: {text[:300]}")
    print(f"\nreport: {report}")
    return report
