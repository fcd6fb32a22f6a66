"""Prior samples drawn once per evaluation and decoded at every N_disc and temperature.

The latent prior is the expensive part of evaluating a latent stage on a CPU (LaDiff's 200-step
Euler ODE), and the latent draw does not depend on the decoding settings. A `LatentCache`, made
by the caller for one pipeline or frontier run (no global state), keeps the draws of each
(run, N_cont, gamma, seed, batch size, device) and hands them to every row that needs them.

Random streams (the rule; recorded in each row's generator metadata by `rng_meta`):

- latents: one generator seeded `seed`, batch after batch in batches of `batch_size` (as
  `diladiff eval-latent` draws them: `latent_diag.sample_prior` returns the same tensors);
- decoding: a second generator seeded `seed + 1`, batch after batch (as the parallel-decoding
  check does).

`generate()` instead interleaves the latent draw and the decoding of each batch on one
generator, so there the second batch's latents depend on how much randomness the first batch's
decoding consumed (that is, on N_disc and the strategy); under this rule every N_disc and
temperature decodes the same latents (paired rows), at the price of other samples than
`generate()` gives for the same seed (the first batch's latents are the same).

Exact reuse: the cache keeps the generator state at every batch boundary, so any number of
samples is served exactly as a fresh draw of that number would come out: the whole batches
from the stream, a last partial batch drawn from the saved state (and kept for the next
request of that size).

Timing: every batch is timed when drawn (device synchronised around it). A row reports as
latent_s the time its batches took when they were drawn, and latent_reused = True when any of
them was drawn for an earlier row (its seconds and tokens/s then include latent time that was
measured once, not spent again). The speed benchmark (eval/bench.py) does not use the cache.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch

RNG_RULE = (
    "latents: generator seeded `seed`, drawn batch after batch, shared by every N_disc and "
    "temperature; decoding: generator seeded `seed + 1`, batch after batch"
)


def rng_meta(seed: int) -> dict:
    """The random-stream rule of a row decoded from cached latents, for its generator meta."""
    return {"latent_seed": seed, "decode_seed": seed + 1, "rng": RNG_RULE}


@dataclass
class _Batch:
    z: torch.Tensor  # (n, N_z, d_z), prior space, float32 on the CPU
    seconds: float
    nfe: int
    uses: int = 0


@dataclass
class _Stream:
    """The latent batches of one generator: whole batches in order, the generator state before
    each, and partial last batches keyed by (whole batches before it, size)."""

    states: list[torch.Tensor]
    full: list[_Batch] = field(default_factory=list)
    partial: dict[tuple[int, int], _Batch] = field(default_factory=dict)


def latent_settings_for(stage, cont_steps: int, gamma: float):
    """The stage's latent sampler at N_cont = cont_steps and exactly `gamma` (run's sample.*
    otherwise), through the one resolver (sampling.generate.latent_settings)."""
    from diladiff.sampling.generate import latent_settings

    sc = replace(stage.cfg.sample, cont_steps=int(cont_steps), gamma=float(gamma))
    return latent_settings(sc, stage.latent_sampler)


@torch.no_grad()
def draw_batch(stage, n: int, cont_steps: int, gamma: float, gen, device) -> _Batch:
    """One synchronised, timed latent draw of `n` latents at N_cont and exactly `gamma`."""
    from diladiff.runtime import autocast, synchronize
    from diladiff.sampling.latent import sample_latent

    device = torch.device(device)
    settings = latent_settings_for(stage, cont_steps, gamma)
    synchronize(device)
    start = time.perf_counter()
    with autocast(device):
        z, nfe = sample_latent(stage, n, settings, gen, device)
    z = z.float().cpu()
    synchronize(device)
    return _Batch(z, time.perf_counter() - start, int(nfe))


class LatentCache:
    """Prior samples per (run, N_cont, gamma, seed, batch size, device), drawn once.

    `run` names the run the stage was loaded from (its folder): stages loaded again from the
    same run share draws. `draws` counts the latent draws (batches) made."""

    def __init__(self):
        self._streams: dict[tuple, _Stream] = {}
        self.draws = 0

    def _stream(self, key: tuple, seed: int, device) -> _Stream:
        if key not in self._streams:
            state = torch.Generator(device).manual_seed(seed).get_state()
            self._streams[key] = _Stream(states=[state])
        return self._streams[key]

    def _draw(self, stage, n, cont, gamma, state, device) -> tuple[_Batch, torch.Tensor]:
        gen = torch.Generator(device)
        gen.set_state(state)
        batch = draw_batch(stage, n, cont, gamma, gen, device)
        self.draws += 1
        return batch, gen.get_state()

    def prior(
        self,
        stage,
        run: str,
        num: int,
        cont_steps: int,
        gamma: float,
        seed: int,
        batch_size: int,
        device,
    ) -> tuple[torch.Tensor, dict]:
        """`num` prior-space latents (CPU, float32), exactly those of a fresh draw of `num` in
        batches of `batch_size` from a generator seeded `seed`; and {"cont_nfe": network calls
        per latent, "latent_s": the seconds their batches took when drawn, "latent_reused":
        whether any batch was drawn before this call}."""
        device = torch.device(device)
        cont, gamma = int(cont_steps), float(gamma)
        key = (str(run), cont, gamma, int(seed), int(batch_size), str(device))
        stream = self._stream(key, seed, device)
        whole, rest = divmod(int(num), int(batch_size))
        while len(stream.full) < whole:
            batch, state = self._draw(stage, batch_size, cont, gamma, stream.states[-1], device)
            stream.full.append(batch)
            stream.states.append(state)
        used = stream.full[:whole]
        if rest:
            if (whole, rest) not in stream.partial:
                stream.partial[whole, rest] = self._draw(
                    stage, rest, cont, gamma, stream.states[whole], device
                )[0]
            used.append(stream.partial[whole, rest])
        reused = any(b.uses for b in used)
        for b in used:
            b.uses += 1
        z = torch.cat([b.z for b in used]) if used else torch.empty(0)
        info = {
            "cont_nfe": used[0].nfe if used else 0,
            "latent_s": sum(b.seconds for b in used),
            "latent_reused": reused,
        }
        return z, info


@torch.no_grad()
def generate_from_cache(stage, tok, sc, cache: LatentCache, run: str, device):
    """`generate()` for a latent stage under the cache's rule: the latents of (run, sc.cont_steps,
    sc.gamma, sc.seed, sc.num_samples, sc.batch_size) from `cache`, decoded with the settings of
    `sc` from a generator seeded sc.seed + 1. Stats as generate() sums them over batches
    (disc_nfe, disc_steps_taken, decode_s, cont_nfe, latent_s) plus latent_reused; seconds =
    the decoding's wall time + latent_s."""
    from diladiff.eval.oracle import decode_latents
    from diladiff.sampling.generate import Generation, sampler_settings

    z, info = cache.prior(
        stage, run, sc.num_samples, sc.cont_steps, sc.gamma, sc.seed, sc.batch_size, device
    )
    settings = sampler_settings(sc, stage.seq_len)
    out = decode_latents(
        stage, tok, z, settings, sc.seed + 1, sc.batch_size, device, prior_space=True
    )
    batches = math.ceil(sc.num_samples / sc.batch_size)
    stats = {
        **out.stats,
        "cont_nfe": info["cont_nfe"] * batches,
        "latent_s": info["latent_s"],
        "latent_reused": info["latent_reused"],
    }
    return Generation(out.ids, out.texts, out.seconds + info["latent_s"], stats)
