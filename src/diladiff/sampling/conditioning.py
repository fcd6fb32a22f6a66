"""Conditional generation: a prompt, a suffix, or infilling of [MASK] spans, and a latent taken
from a reference text instead of the prior.

The token condition is a canvas of the model's L positions: given token ids where the text
fixes them, the mask id where tokens are to be generated,

    prompt P, suffix S:   [P_1 .. P_p, m, m, ..., m, S_1 .. S_s]      (p + s < L)
    infill T:             T's ids (its [MASK] tokens stay masked), then m up to L

(texts are tokenised without special tokens; a row of the training data is a window of the
packed token stream, so a prompt is simply its first tokens). Masked decoding starts from the
canvas instead of an all-masked row and never changes a given token (sampling.masked). A latent
stage still draws its latent from the prior, unconditionally, unless `latent_from` names a
reference text: then the auto-encoder's latent of that text (its first L tokens) replaces the
prior sample, a paraphrase-style generation (a text shorter than L is repeated, separated as
packed documents are, so the encoder reads L real tokens as in training).
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
