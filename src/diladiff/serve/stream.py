"""One generation that reports its steps, for `diladiff serve`.

A request (`parse_job`) becomes a `Job`: the run's sample.* settings with the request's values,
its Condition (prompt / suffix / infill canvas, reference text) and seed, resolved and checked
by the same functions as `Model.generate` (api.py, sampling/generate.py). `StepStream` runs the
job in a worker thread and yields its events as JSON-able dicts:

    {"event": "start", ...}    the run, L, the canvas (given tokens, masked positions), N_disc
    {"event": "latent", ...}   latent stages: after each latent step, the latent's energy
    {"event": "step", ...}     after each decoding step, the positions it revealed and tokens
    {"event": "done", ...}     the text, the ids, wall time, tokens/s and the sampler's counts
    {"event": "error", ...}    the generation failed after it started (a message)

The worker runs the same calls as sampling.generate's `sample_batch` for one row, with the
samplers' `on_step` hooks (sampling/masked.py, sampling/latent.py) observing the states, so a
job gives the tokens `Model.generate(num_samples=1, ...)` gives for the same settings and seed
(tests/test_serve.py). Kinds whose samplers report no steps (DUO's uniform-state and LADD's
joint sampler) run `sample_batch` itself and reveal their tokens in one event. The worker times
the generation alone: its hooks only copy tensors into a queue; decoding ids to text, JSON and
the socket happen in the consumer's thread.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import traceback
from dataclasses import dataclass

import torch

from diladiff.config import ConfigError
from diladiff.errors import DiladiffError
from diladiff.runtime import autocast, synchronize
from diladiff.sampling.conditioning import (
    TokenGuidance,
    canvas_mask_id,
    canvas_start,
    clamp,
    make_condition,
)
from diladiff.sampling.generate import (
    GenerationSettings,
    generation_kind,
    generation_settings,
    sample_batch,
)
from diladiff.sampling.latent import sample_latent
from diladiff.sampling.masked import STRATEGIES, sample_masked
from diladiff.stages.latent import decodes_directly

# What a request may set, and the largest N_cont a request may ask for (a bound on the work one
# request can cause; N_disc is bounded by L).
MAX_CONT_STEPS = 1000
MAX_TEXT_CHARS = 100_000
FIELDS = (
    "run",
    "mode",
    "text",
    "prompt",
    "suffix",
    "latent_from",
    "disc_steps",
    "cont_steps",
    "temperature",
    "top_p",
    "strategy",
    "gamma",
    "seed",
)
MODES = ("prompt", "infill")


class BadRequest(ValueError):
    """A request the server refuses: HTTP `status` with a one-line `message`."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status, self.message = status, message


class Cancelled(Exception):
    """The client went away: the worker stops at its next step."""


@dataclass(frozen=True)
class Job:
    settings: GenerationSettings
    seed: int


def latent_energy(z: torch.Tensor) -> torch.Tensor:
    """The energy of latents z (B, N_z, d_z): the mean over rows of the squared norm per
    coordinate, E = (1/B) sum_b ||z_b||^2 / (N_z d_z), a 0-dim tensor (E = 1 in expectation
    for z_1 ~ N(0, I); a prior-space data latent is standardised to about 1 as well)."""
    return z.detach().float().pow(2).mean()


# --------------------------------------------------------------------------- requests


def _number(body: dict, key: str, kind, low, high, *, open_low: bool = False):
    """body[key] as `kind` within [low, high] ((low, high] with open_low); None if absent."""
    value = body.get(key)
    if value is None:
        return None
    # bool is an int in Python, and a float field takes an integer, but an int field no float.
    ok_types = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types) or not math.isfinite(value):
        raise BadRequest(f"{key} must be a number ({kind.__name__}), got {value!r}")
    if value < low or value > high or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise BadRequest(f"{key} must be in {bracket}{low}, {high}], got {value}")
    return kind(value)


def _text(body: dict, key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string")
    if len(value) > MAX_TEXT_CHARS:
        raise BadRequest(f"{key} has {len(value)} characters; at most {MAX_TEXT_CHARS}")
    return value


def parse_job(model, body) -> Job:
    """The Job of a request `body` (a JSON object) for a loaded api.Model; BadRequest when a
    value is missing, of the wrong type, out of range, or refused by the run's settings (an
    empty canvas, a prompt longer than L, a reference text for a run without an encoder)."""
    if not isinstance(body, dict):
        raise BadRequest("the request must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; known: {list(FIELDS)}")
    stage = model.stage
    L = stage.seq_len
    mode = body.get("mode", "prompt")
    if mode not in MODES:
        raise BadRequest(f"mode must be one of {list(MODES)}, got {mode!r}")
    texts = {k: _text(body, k) for k in ("text", "prompt", "suffix", "latent_from")}
    if mode == "infill":
        if not (texts["text"] or "").strip():
            raise BadRequest(
                "the canvas is empty: write a text with [MASK] spans to fill (or use "
                "prompt / suffix mode; both empty there is unconditional generation)"
            )
        prompt, suffix, infill = None, None, texts["text"]
    else:
        prompt, suffix, infill = texts["prompt"] or None, texts["suffix"] or None, None
    latent_from = (texts["latent_from"] or "").strip() or None
    strategy = body.get("strategy")
    if strategy is not None and (not isinstance(strategy, str) or strategy not in STRATEGIES):
        raise BadRequest(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    seed = _number(body, "seed", int, 0, 2**63 - 1)
    overrides = {
        "disc_steps": _number(body, "disc_steps", int, 1, L),
        "cont_steps": _number(body, "cont_steps", int, 1, MAX_CONT_STEPS),
        "temperature": _number(body, "temperature", float, 0, 100, open_low=True),
        "top_p": _number(body, "top_p", float, 0, 1, open_low=True),
        "gamma": _number(body, "gamma", float, 0, 1),
        "strategy": strategy,
    }
    try:  # Model.settings ignores the values left None: the run's own
        sc = model.settings(**overrides, num_samples=1, batch_size=1, seed=seed)
        mask_id = canvas_mask_id(stage)
        condition = make_condition(model.tokenizer, L, mask_id, prompt, suffix, infill, latent_from)
        settings = generation_settings(sc, stage, condition)
    except (ConfigError, DiladiffError) as exc:
        raise BadRequest(str(exc)) from None
    return Job(settings, sc.seed)


# --------------------------------------------------------------------------- generation


def _generate_masked(stage, settings, generator, device, hooks):
    """An MDLM: sampling.generate's decode_tokens for one row, with the step hook."""
    canvas = settings.condition.canvas_tensor()
    ids, st = sample_masked(
        stage.token_decoder(None),
        1,
        stage.seq_len,
        stage.mask_id,
        settings.tokens,
        generator,
        device,
        False,
        canvas,
        on_step=hooks.tokens,
    )
    return ids, {"disc_nfe": st.nfe, "disc_steps_taken": st.steps}


def _generate_latent(stage, settings, generator, device, hooks):
    """A latent stage: sampling.generate's _generate_latent and decode_latent for one row,
    with the latent and token step hooks."""
    t0 = time.perf_counter()
    reference = settings.condition.latent_ids
    canvas = settings.condition.canvas_tensor()
    if reference is None:
        model = stage
        if canvas is not None and stage.latent_decoding == "direct":
            model = TokenGuidance(stage, canvas.to(device))
        z, cont_nfe = sample_latent(
            model, 1, settings.latent, generator, device, on_step=hooks.latent
        )
        z_ae = stage.to_decoder_space(z)
    else:  # the encoder's latent of the reference text: no latent steps
        x_ref = torch.tensor(reference, dtype=torch.long, device=device)
        z_ae, cont_nfe = stage.encode_clean(x_ref[None]), 0
        hooks.latent(0, stage.to_prior_space(z_ae))
    z_ae = z_ae.to(device)
    synchronize(device)
    t1 = time.perf_counter()
    if stage.latent_decoding == "direct":
        ids, stats = stage.decode(z_ae), {"disc_nfe": 1, "disc_steps_taken": 1}
        ids = clamp(ids, canvas, stage.mask_id)
        hooks.tokens(1, ids)
    else:
        decoder = stage.decoder_stage
        ids, st = sample_masked(
            decoder.token_decoder(z_ae),
            1,
            decoder.seq_len,
            decoder.mask_id,
            settings.tokens,
            generator,
            device,
            False,
            canvas,
            on_step=hooks.tokens,
        )
        stats = {"disc_nfe": st.nfe, "disc_steps_taken": st.steps}
    synchronize(device)
    return ids, {
        **stats,
        "cont_nfe": cont_nfe,
        "latent_s": t1 - t0,
        "decode_s": time.perf_counter() - t1,
    }


def _generate_without_steps(stage, settings, generator, device, hooks):
    """A kind whose sampler reports no steps: sample_batch itself; its tokens in one event."""
    ids, stats = sample_batch(stage, 1, settings, generator, device)
    hooks.tokens(1, ids)
    return ids, stats


# The generations whose steps are shown (by Stage.generation); others: _generate_without_steps.
STEPPED = {"masked": _generate_masked, "latent": _generate_latent}


class _Hooks:
    """The samplers' on_step observers: each puts a copy of the state in the queue (cheap; the
    consumer formats it) and stops the generation once the client has gone."""

    def __init__(self, out: queue.Queue, cancelled: threading.Event):
        self.out, self.cancelled = out, cancelled

    def _check(self):
        if self.cancelled.is_set():
            raise Cancelled

    def latent(self, step: int, z: torch.Tensor) -> None:
        self._check()
        self.out.put(("latent", step, latent_energy(z)))

    def tokens(self, step: int, x: torch.Tensor) -> None:
        self._check()
        self.out.put(("tokens", step, x[0].detach().clone()))


_END = object()


class StepStream:
    """A Job of a loaded api.Model run in a worker thread (under `lock`, so one generation per
    model at a time); iterate to get its events (module docstring). `cancel()` stops it at the
    next step (the client disconnected)."""

    def __init__(self, name: str, model, job: Job, lock: threading.Lock):
        self.name, self.model, self.job, self.lock = name, model, job, lock
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self._labels: dict[int, str] = {}

    def cancel(self) -> None:
        self.cancelled.set()

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        stage, device = self.model.stage, self.model.device
        settings = self.job.settings
        hooks = _Hooks(self.events, self.cancelled)
        generate = STEPPED.get(stage.generation, _generate_without_steps)
        try:
            with self.lock:
                generator = torch.Generator(device).manual_seed(self.job.seed)
                synchronize(device)
                start = time.perf_counter()
                with torch.no_grad(), autocast(device):
                    ids, stats = generate(stage, settings, generator, device, hooks)
                synchronize(device)
                seconds = time.perf_counter() - start
            self.events.put(("done", ids[0].cpu(), stats, seconds))
        except Cancelled:
            pass
        except (ConfigError, DiladiffError, ValueError) as exc:
            self.events.put(("error", str(exc)))
        except Exception as exc:  # a bug: the server keeps serving, the page shows one line
            traceback.print_exc()
            self.events.put(("error", f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            self.events.put(_END)

    # ------------------------------------------------------------------ events
    def _label(self, token_id: int) -> str:
        """How one token is shown on the page (its own decoded text)."""
        if token_id not in self._labels:
            self._labels[token_id] = self.model.tokenizer.decode([token_id])
        return self._labels[token_id]

    def _start_event(self) -> tuple[dict, list[int]]:
        stage, settings = self.model.stage, self.job.settings
        mask_id = canvas_mask_id(stage)
        L = stage.seq_len
        canvas = settings.condition.canvas_tensor()
        x, _ = canvas_start(canvas, 1, L, mask_id, "cpu")
        state = x[0].tolist()
        latent = settings.latent is not None
        event = {
            "event": "start",
            "run": self.name,
            "kind": stage.kind,
            "generation": stage.generation,
            "L": L,
            "tokens": [None if t == mask_id else self._label(t) for t in state],
            "masked": sum(t == mask_id for t in state),
            "disc_steps": settings.tokens.steps,
            "strategy": settings.tokens.strategy,
            "temperature": settings.tokens.temperature,
            "top_p": settings.tokens.top_p,
            "seed": self.job.seed,
            "latent": latent,
            "latent_sampler": settings.latent.sampler if latent else None,
            "cont_steps": settings.latent.steps if latent else None,
            "gamma": settings.latent.gamma if latent else None,
            "latent_from": settings.condition.latent_ids is not None,
            "steps_reported": stage.generation in STEPPED,
            "direct_decoding": decodes_directly(stage),
        }
        return event, state

    def __iter__(self):
        event, state = self._start_event()
        mask_id = canvas_mask_id(self.model.stage)
        yield event
        worker = threading.Thread(target=self._work, name=f"generate-{self.name}", daemon=True)
        worker.start()
        while True:
            item = self.events.get()
            if item is _END:
                break
            kind = item[0]
            if kind == "latent":
                _, step, energy = item
                yield {"event": "latent", "step": step, "energy": float(energy)}
            elif kind == "tokens":
                _, step, x = item
                new = x.tolist()
                revealed = [
                    [i, self._label(t)]
                    for i, (old, t) in enumerate(zip(state, new, strict=True))
                    if old == mask_id and t != mask_id
                ]
                state = new
                yield {
                    "event": "step",
                    "step": step,
                    "revealed": revealed,
                    "masked": sum(t == mask_id for t in state),
                }
            elif kind == "done":
                _, ids, stats, seconds = item
                yield self._done_event(ids.tolist(), stats, seconds, event)
            else:
                yield {"event": "error", "message": item[1]}
        worker.join()

    def _done_event(self, ids: list[int], stats: dict, seconds: float, start: dict) -> dict:
        L = len(ids)
        tok = self.model.tokenizer
        return {
            "event": "done",
            "text": tok.decode(ids, skip_special_tokens=True),
            "ids": ids,
            "tokens": [self._label(t) for t in ids],
            "seconds": seconds,
            # As `diladiff frontier` and `bench sample` count: the row's L tokens per second.
            "tokens_per_s": L / seconds if seconds > 0 else None,
            "generated": start["masked"],
            **{k: v for k, v in stats.items() if isinstance(v, int | float)},
        }


def run_info(name: str, model) -> dict:
    """What the page needs to know of a loaded run: its kind, L and default settings."""
    stage = model.stage
    sc = stage.cfg.sample
    latent = generation_kind(stage).latent_from  # a latent to show: latent and joint kinds
    cont = sc.cont_steps
    if not cont and stage.generation == "joint":
        cont = stage.cfg.ladd.latent_steps
    return {
        "name": name,
        "kind": stage.kind,
        "generation": stage.generation,
        "L": stage.seq_len,
        "latent": latent,
        "latent_from": generation_kind(stage).latent_from,
        "steps_reported": stage.generation in STEPPED,
        "mask_token": getattr(model.tokenizer, "mask_token", None),
        "defaults": {
            "disc_steps": sc.disc_steps or stage.seq_len,
            "cont_steps": cont or None,
            "temperature": sc.temperature,
            "top_p": sc.top_p,
            "strategy": sc.strategy,
            "gamma": sc.gamma,
            "seed": sc.seed,
        },
    }


__all__ = [
    "BadRequest",
    "Job",
    "StepStream",
    "latent_energy",
    "parse_job",
    "run_info",
]
