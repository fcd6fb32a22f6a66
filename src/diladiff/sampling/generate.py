"""Generate text from any trained stage: settings, batching, seeding, autocast, decoding.

`sample_batch(stage, batch, settings, generator, device)` is the one way to draw token ids:
a masked-diffusion stage (MDLM) decodes from all-masked rows; a latent stage draws its latent
(sampling/latent.py) and decodes conditioned on it; DUO (methods/duo/sampler.py) and LADD
(methods/ladd/sampler.py) run their own samplers. Every generation takes a Condition
(sampling/conditioning.py): a canvas of given tokens, which never change, and a reference
text whose encoder latent replaces the prior sample (the stages with an encoder). The
settings come from a run's sample.* config once, here (`generation_settings`): no other code
resolves defaults.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from diladiff.config import ConfigError, SampleConfig
from diladiff.runtime import autocast, synchronize
from diladiff.sampling.conditioning import UNCONDITIONAL, Condition, TokenGuidance, clamp
from diladiff.sampling.latent import LatentSettings, sample_latent
from diladiff.sampling.masked import SamplerSettings, sample_masked
from diladiff.stages.latent import LatentStage
from diladiff.stages.masked import MaskedDiffusionStage


def sampler_settings(sc: SampleConfig, seq_len: int) -> SamplerSettings:
    """Masked-diffusion decoding settings; disc_steps 0 means N_disc = L. Out-of-range values
    are a ConfigError (a user's setting), not SamplerSettings' ValueError."""
    try:
        return SamplerSettings(
            steps=sc.disc_steps or seq_len,
            strategy=sc.strategy,
            temperature=sc.temperature,
            top_p=sc.top_p,
            float64_gumbel=sc.float64_gumbel,
            cache=sc.cache,
            sampler=sc.sampler,
            threshold=sc.confidence_threshold,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def latent_settings(sc: SampleConfig, stage_sampler: str = "") -> LatentSettings:
    """The latent sampler's settings: sample.latent_sampler, or the stage's own sampler for
    runs saved before that key existed."""
    sampler = sc.latent_sampler or stage_sampler
    if not sampler:
        raise ConfigError("sample.latent_sampler is not set (this run is not a latent stage?)")
    return LatentSettings(sampler, sc.cont_steps, sc.gamma, sc.time_grid)


@dataclass(frozen=True)
class GenerationSettings:
    tokens: SamplerSettings
    latent: LatentSettings | None = None  # None: the stage has no latent
    # The settings only the stage's generation kind reads (GenerationKind.settings; e.g.
    # LADD's inference), None for the kinds without any.
    method: object | None = None
    condition: Condition = UNCONDITIONAL  # prompt / suffix / infill canvas, reference latent


@dataclass(frozen=True)
class GenerationKind:
    """How the stages naming it in `Stage.generation` draw token ids.

    sample(stage, batch, settings: GenerationSettings, generator, device, progress) -> (ids
    (batch, L), stats). `conditionable`: it takes a canvas (prompt, suffix, infill);
    `latent_from`: its stages have an encoder for a reference text's latent; `settings(sc,
    stage)`: its own settings from the run's sample.* (GenerationSettings.method), checked
    before any sampling starts."""

    name: str
    sample: Callable
    conditionable: bool = True
    latent_from: bool = False
    settings: Callable | None = None


GENERATIONS: dict[str, GenerationKind] = {}


def register_generation(
    name: str, conditionable: bool = True, latent_from: bool = False, settings=None
):
    """A decorator registering `fn` as the generation kind `name` (GenerationKind)."""

    def wrap(fn):
        GENERATIONS[name] = GenerationKind(name, fn, conditionable, latent_from, settings)
        return fn

    return wrap


def generation_kind(stage) -> GenerationKind:
    try:
        return GENERATIONS[stage.generation]
    except KeyError:
        raise ConfigError(
            f"{stage.kind} generates by {stage.generation!r}, which no module registered "
            f"(registered: {sorted(GENERATIONS)})"
        ) from None


def generation_settings(
    sc: SampleConfig, stage, condition: Condition = UNCONDITIONAL
) -> GenerationSettings:
    """Everything one generation of `stage` needs, resolved from `sc` once."""
    kind = generation_kind(stage)
    latent = None
    if isinstance(stage, LatentStage):
        latent = latent_settings(sc, stage.latent_sampler)
    if condition.latent_ids is not None and not kind.latent_from:
        raise ConfigError(
            f"a {stage.kind} run has no latent (no encoder) to take from a reference text"
        )
    if condition.canvas is not None and not kind.conditionable:
        takes = sorted(k for k, g in GENERATIONS.items() if g.conditionable)
        raise ConfigError(
            f"prompts and infilling are implemented for {takes} generation, "
            f"not {stage.kind}'s {stage.generation!r}"
        )
    own = kind.settings(sc, stage) if kind.settings else None
    return GenerationSettings(sampler_settings(sc, stage.seq_len), latent, own, condition)


@torch.no_grad()
def decode_tokens(
    stage: MaskedDiffusionStage,
    batch: int,
    settings: SamplerSettings,
    generator,
    device,
    progress: bool = False,
    cond=None,
    canvas: torch.Tensor | None = None,
):
    """`batch` rows decoded from all-masked input (or from `canvas`: given tokens kept) in
    N_disc = settings.steps steps by the masked stage's denoiser conditioned on `cond` (None
    for the MDLM); (ids, stats)."""
    ids, stats = sample_masked(
        stage.token_decoder(cond),
        batch,
        stage.seq_len,
        stage.mask_id,
        settings,
        generator,
        device,
        progress,
        canvas,
    )
    return ids, {"disc_nfe": stats.nfe, "disc_steps_taken": stats.steps}


@torch.no_grad()
def decode_latent(
    stage: LatentStage,
    z_ae: torch.Tensor,
    settings: SamplerSettings,
    generator,
    device,
    progress=False,
    canvas: torch.Tensor | None = None,
):
    """Tokens decoded from decoder-space latents z_ae (B, N_z, d_z) as the stage's
    `latent_decoding` says: "masked", N_disc steps of its masked decoder conditioned on z_ae
    (`settings`) from all-masked rows or `canvas`; "direct", one call of `stage.decode(z_ae)`
    (settings unused; a canvas's given tokens then overwrite the decoded ones: `clamp`). Stats:
    disc_nfe, disc_steps_taken, decode_s."""
    z = z_ae.to(device)
    synchronize(device)
    t1 = time.perf_counter()
    if stage.latent_decoding == "direct":
        ids, stats = stage.decode(z), {"disc_nfe": 1, "disc_steps_taken": 1}
        ids = clamp(ids, canvas, stage.mask_id)
    else:
        ids, stats = decode_tokens(
            stage.decoder_stage, z.shape[0], settings, generator, device, progress, z, canvas
        )
    synchronize(device)
    return ids, {**stats, "decode_s": time.perf_counter() - t1}


@register_generation("masked")
def _generate_masked(stage, batch, settings: GenerationSettings, generator, device, progress):
    """A masked-diffusion stage: N_disc steps from all-masked rows (or the canvas)."""
    canvas = settings.condition.canvas_tensor()
    return decode_tokens(stage, batch, settings.tokens, generator, device, progress, canvas=canvas)


@register_generation("latent", latent_from=True)
def _generate_latent(stage, batch, settings: GenerationSettings, generator, device, progress):
    """A latent stage: its latent (prior space), mapped to decoder space, then tokens; the
    stats split the time between the two (latent overhead). With a canvas, a stage that decodes
    directly samples its latent with TokenGuidance (the masked decoders take the canvas)."""
    synchronize(device)
    t0 = time.perf_counter()
    reference = settings.condition.latent_ids
    canvas = settings.condition.canvas_tensor()
    if reference is None:
        model = stage
        if canvas is not None and stage.latent_decoding == "direct":
            model = TokenGuidance(stage, canvas.to(device))
        z, cont_nfe = sample_latent(model, batch, settings.latent, generator, device)
        z_ae = stage.to_decoder_space(z)
    else:  # the encoder's latent of the reference text, for every row
        x_ref = torch.tensor(reference, dtype=torch.long, device=device)
        z_ae, cont_nfe = stage.encode_clean(x_ref[None]).expand(batch, -1, -1), 0
    synchronize(device)
    t1 = time.perf_counter()
    ids, st = decode_latent(stage, z_ae, settings.tokens, generator, device, progress, canvas)
    return ids, {**st, "cont_nfe": cont_nfe, "latent_s": t1 - t0}


@torch.no_grad()
def sample_batch(
    stage, batch: int, settings: GenerationSettings, generator, device, progress: bool = False
):
    """Token ids (batch, L) and stats from any stage, by its `generation`."""
    return generation_kind(stage).sample(stage, batch, settings, generator, device, progress)


@dataclass
class Generation:
    ids: list[list[int]]
    texts: list[str]
    seconds: float
    stats: dict = field(default_factory=dict)


@torch.no_grad()
def generate(
    stage,
    tok,
    sc: SampleConfig,
    device: torch.device | str = "cpu",
    progress: bool = True,
    condition: Condition = UNCONDITIONAL,
) -> Generation:
    """`sc.num_samples` samples in batches of `sc.batch_size`, reproducible from `sc.seed`;
    `condition`: a prompt / suffix / infill canvas, a reference text's latent."""
    device = torch.device(device)
    settings = generation_settings(sc, stage, condition)
    gen = torch.Generator(device).manual_seed(sc.seed)
    ids: list[list[int]] = []
    stats: dict = {}
    start = time.perf_counter()
    bar = tqdm(total=sc.num_samples, desc="sampling", unit="seq", disable=not progress)
    while len(ids) < sc.num_samples:
        n = min(sc.batch_size, sc.num_samples - len(ids))
        with autocast(device):
            out, s = sample_batch(stage, n, settings, gen, device)
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
