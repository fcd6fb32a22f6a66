"""Generate text from any trained stage: batching, seeding, autocast and decoding to text.

A stage's `sample(batch, settings, generator, device)` returns token ids; for MDLM that is
masked-diffusion decoding, for the latent stages a latent draw followed by decoding.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from diladiff.config import SampleConfig
from diladiff.sampling.masked import SamplerSettings


def sampler_settings(sc: SampleConfig, seq_len: int) -> SamplerSettings:
    return SamplerSettings(
        steps=sc.disc_steps or seq_len,
        strategy=sc.strategy,
        temperature=sc.temperature,
        top_p=sc.top_p,
        float64_gumbel=sc.float64_gumbel,
        cache=sc.cache,
        sampler=sc.sampler,
        cont_steps=sc.cont_steps,
        gamma=sc.gamma,
    )


def inference_autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Generation:
    ids: list[list[int]]
    texts: list[str]
    seconds: float
    stats: dict = field(default_factory=dict)


@torch.no_grad()
def generate(
    stage, tok, sc: SampleConfig, device: torch.device | str = "cpu", progress: bool = True
) -> Generation:
    """`sc.num_samples` samples in batches of `sc.batch_size`, reproducible from `sc.seed`."""
    device = torch.device(device)
    settings = sampler_settings(sc, stage.seq_len)
    gen = torch.Generator(device).manual_seed(sc.seed)
    ids: list[list[int]] = []
    stats: dict = {}
    start = time.perf_counter()
    bar = tqdm(total=sc.num_samples, desc="sampling", unit="seq", disable=not progress)
    while len(ids) < sc.num_samples:
        n = min(sc.batch_size, sc.num_samples - len(ids))
        with inference_autocast(device):
            out, s = stage.sample(n, settings, gen, device)
        ids += out.cpu().tolist()
        for k, v in s.items():
            stats[k] = stats.get(k, 0) + v
        bar.update(n)
    synchronize(device)
    bar.close()
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    return Generation(ids, texts, time.perf_counter() - start, stats)


def write_samples(path, out: Generation, meta: dict) -> None:
    """Samples as JSONL ({"ids", "text"} per line) plus PATH.meta.json (model, sampler, time)."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for ids, text in zip(out.ids, out.texts, strict=True):
            fh.write(json.dumps({"ids": ids, "text": text}) + "\n")
    meta = {**meta, "seconds": out.seconds, **out.stats}
    path.with_name(path.name + ".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
