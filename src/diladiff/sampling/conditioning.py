"""Conditional generation: a prompt, a suffix, or infilling of [MASK] spans, and a latent taken
from a reference text instead of the prior.

The token condition is a canvas of the model's L positions: given token ids where the text
fixes them, the mask id where tokens are to be generated,

    prompt P, suffix S:   [P_1 .. P_p, m, m, ..., m, S_1 .. S_s]      (p + s < L)
    infill T:             T's ids (its [MASK] tokens stay masked), then m up to L

(texts are tokenised without special tokens; a row of the training data is a window of the
packed token stream, so a prompt is simply its first tokens). Every sampler keeps the given
tokens through the two functions here, `canvas_start` and `clamp`:

- masked decoding (MDLM, the masked decoders of LaDiff / DiLaDiff, the token stream of Co-LADD
  and Di-LADD): starts from the canvas instead of an all-masked row (`canvas_start`); a step only
  reveals masked positions, so a given token never changes, and the token time grid runs over
  the masked share M / L (top-k spreads the M masked positions over the N_disc steps).
- uniform-state diffusion (DUO): starts from uniform noise with the given tokens in place and
  overwrites them after every step and after the last one (`clamp`; methods.duo.sampler).
- LDLM's direct decoding: the decoded tokens are overwritten at the given positions (`clamp`),
  after a latent sampled with `TokenGuidance` (below): its latent has no per-position layout.

A latent is still drawn from the prior, unconditionally (LADD's jointly with the tokens, so
through its joint attention it reads the given tokens), unless `latent_from` names a reference
text: then the encoder's latent of that text (its first L tokens) replaces the prior sample, a
paraphrase-style generation (a text shorter than L is repeated, separated as packed documents
are, so the encoder reads L real tokens as in training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diladiff.config import ConfigError
from diladiff.data.tokenizer import separator_id


@dataclass(frozen=True)
class Condition:
    """What a generation is conditioned on (both None: unconditional)."""

    canvas: tuple[int, ...] | None = None  # L ids, mask_id where tokens are generated
    latent_ids: tuple[int, ...] | None = None  # L ids of the reference text of the latent

    def canvas_tensor(self) -> torch.Tensor | None:
        return None if self.canvas is None else torch.tensor(self.canvas, dtype=torch.long)


UNCONDITIONAL = Condition()


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def canvas_mask_id(stage) -> int | None:
    """The id a canvas marks the positions to generate with: the stage's mask id (LADD adds
    one to a tokenizer without a mask token), else the tokenizer's; None: no canvas."""
    mask_id = getattr(stage, "mask_id", None)
    return stage.tokenizer_identity.get("mask_id") if mask_id is None else int(mask_id)


def make_condition(
    tok,
    seq_len: int,
    mask_id: int | None,
    prompt: str | None = None,
    suffix: str | None = None,
    infill: str | None = None,
    latent_from: str | None = None,
) -> Condition:
    """The Condition of the given texts (ConfigError when they do not fit L positions or
    combine infill with prompt/suffix)."""
    canvas = None
    if infill is not None and (prompt or suffix):
        raise ConfigError("--infill takes the whole text; do not combine it with prompt/suffix")
    if prompt or suffix or infill is not None:
        if mask_id is None:
            raise ConfigError("conditional generation needs a tokenizer with a mask token")
        if infill is not None:
            if getattr(tok, "mask_token", None) is None:
                raise ConfigError("--infill needs a tokenizer with a mask token to mark the gaps")
            given = _ids(tok, infill)
            if len(given) > seq_len:
                raise ConfigError(f"the text to infill has {len(given)} tokens; L is {seq_len}")
            if mask_id not in given and len(given) == seq_len:
                raise ConfigError(
                    f"the text to infill has no {tok.mask_token} to fill and no room after it"
                )
            canvas = given + [mask_id] * (seq_len - len(given))
        else:
            head, tail = _ids(tok, prompt or ""), _ids(tok, suffix or "")
            if len(head) + len(tail) >= seq_len:
                raise ConfigError(
                    f"prompt and suffix take {len(head) + len(tail)} of the {seq_len} positions; "
                    "leave at least one to generate"
                )
            canvas = head + [mask_id] * (seq_len - len(head) - len(tail)) + tail
    latent_ids = None
    if latent_from is not None:
        ids = _ids(tok, latent_from)
        if not ids:
            raise ConfigError("--latent-from needs a non-empty reference text")
        if len(ids) < seq_len:  # the encoder reads L tokens: the text packed after itself
            ids = (ids + [separator_id(tok)]) * (seq_len // (len(ids) + 1) + 1)
        latent_ids = tuple(ids[:seq_len])
    return Condition(None if canvas is None else tuple(canvas), latent_ids)


def canvas_start(
    canvas: torch.Tensor | None, batch: int, seq_len: int, mask_id: int, device
) -> tuple[torch.Tensor, float]:
    """The (batch, seq_len) rows masked decoding starts from, all-masked or `canvas` (seq_len,)
    in every row, and their masked share M / L (1.0 unconditionally)."""
    x = torch.full((batch, seq_len), mask_id, dtype=torch.long, device=device)
    if canvas is None:
        return x, 1.0
    if canvas.shape != (seq_len,):
        raise ValueError(f"a canvas has {seq_len} positions, got {tuple(canvas.shape)}")
    x = clamp(x, canvas, mask_id)
    return x, float((x[0] == mask_id).sum()) / seq_len


def clamp(x: torch.Tensor, canvas: torch.Tensor | None, mask_id: int) -> torch.Tensor:
    """Token ids x (..., L) with the canvas's given tokens (those not `mask_id`) written at
    their positions; x itself when there is no canvas."""
    if canvas is None:
        return x
    canvas = canvas.to(device=x.device, dtype=x.dtype)
    return torch.where(canvas != mask_id, canvas, x)


class TokenGuidance:
    """A latent stage whose x0-prediction is guided towards latents that decode to the given
    tokens (LDLM: its Perceiver latent has no per-position layout, so replacing "the given
    part" of z_t is undefined). At every latent step the prediction z_hat is moved by `steps`
    normalised gradient steps on -log p(given tokens | decoder(z_hat)), the decoder's token
    log-likelihood (reconstruction guidance in x0 space, as Diffusion-LM's classifier-guided
    infilling and universal guidance's forward step): every sampler built on `x0` (SDE, DDPM,
    the ODE solvers) then steps towards it. Each gradient step moves z_hat by `rate` times its
    RMS per row. `rate` and `steps` are not tuned on a trained model; the decoded tokens are
    still clamped to the canvas afterwards (the guarantee), the guidance only shapes the rest.
    Everything but `x0` is the stage's."""

    def __init__(self, stage, canvas: torch.Tensor, rate: float = 0.1, steps: int = 2):
        self.stage, self.rate, self.steps = stage, rate, steps
        given = canvas != stage.mask_id
        self.positions, self.tokens = given.nonzero().squeeze(-1), canvas[given]

    def __getattr__(self, name):  # only for what is not set in __init__
        if name == "stage":
            raise AttributeError(name)
        return getattr(self.stage, name)

    def token_nll(self, z: torch.Tensor) -> torch.Tensor:
        """-log p(given tokens | decoder(z)) per row (B,), z in prior space."""
        logits = self.stage.logits(self.stage.to_decoder_space(z))
        pos = self.positions.to(z.device)
        logp = logits[:, pos].float().log_softmax(-1)
        tokens = self.tokens.to(z.device).expand(z.shape[0], -1)
        return -logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(-1)

    def guide(self, z_hat: torch.Tensor) -> torch.Tensor:
        """z_hat after the guidance steps (no gradient flows out)."""
        z = z_hat.detach().float()
        with torch.enable_grad():
            for _ in range(self.steps):
                z.requires_grad_(True)
                (g,) = torch.autograd.grad(self.token_nll(z).sum(), z)
                z = z.detach()
                z = z - self.rate * _rms(z) * g / _rms(g).clamp_min(1e-12)
        return z.to(z_hat.dtype)

    def x0(self, z_t, t, z_sc=None):
        return self.guide(self.stage.x0(z_t, t, z_sc))


def _rms(v: torch.Tensor) -> torch.Tensor:
    """The root mean square of each row of v, shaped to broadcast against it."""
    return v.pow(2).flatten(1).mean(1).sqrt().view(-1, *[1] * (v.dim() - 1))
