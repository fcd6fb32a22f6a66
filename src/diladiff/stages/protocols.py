"""What the trainer, the samplers and the evaluation expect of a stage beyond `Stage`.

Each ability is a `typing.Protocol`, checked with isinstance where code branches on it (instead
of probing for an attribute by name), so a new method learns from here what to implement for a
command to work with it:

    LatentConditioned   eval-recon, eval-ppl (conditional bound), the latent analyses: a
                        masked decoder that reads the latent of its own encoder (auto-encoder)
    X0Prior             eval-ppl's latent ELBO: a latent prior predicting clean latents
                        (LaDiff, LDLM)
    SizedNetwork        compute accounting: the blocks, width and positions one network call
                        runs (LADD)
    InferenceModes      samplers: refuses an inference mode its network was not trained for
                        before any sampling starts (LADD)
    OwnTimeGrid         latent samplers: the model chooses its own sampling times (DiLaDiff's
                        jumps, LDLM's adaptive schedule)
    CrossAttending      the latent analyses: a LatentConditioned decoder reading the latent
                        through cross-attention layers `cross` (auto-encoder)
    TokenChannelBound   eval-ppl: a joint token-latent model's bound on its token channel
                        given the row's own latent path (LADD)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LatentConditioned(Protocol):
    def encode(self, x0: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The latent (B, ...) of clean rows x0 (B, L)."""

    def log_probs(self, x_t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x_0 | x_t, latent `cond`) at every position: (B, L, V)."""


@runtime_checkable
class X0Prior(Protocol):
    def x0(
        self, z_t: torch.Tensor, t: torch.Tensor, z_sc: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The prior's clean-latent prediction z_psi(z_t, t, z_sc)."""


@runtime_checkable
class SizedNetwork(Protocol):
    def network_dims(self) -> dict:
        """{"blocks", "width", "seq_len", "num_latents"}: what one network call runs."""


@runtime_checkable
class InferenceModes(Protocol):
    def check_inference(self, inference: str) -> None:
        """A ConfigError (one line) for an inference mode the network was not trained for."""


@runtime_checkable
class OwnTimeGrid(Protocol):
    def time_grid(self, steps: int) -> torch.Tensor | None:
        """The model's steps + 1 sampling times from 1 to 0 (None: the sampler's own grid)."""


@runtime_checkable
class TokenChannelBound(Protocol):
    def token_bound(self, x0: torch.Tensor, mc_samples: int, generator: torch.Generator) -> dict:
        """{"nll_bound", "nll_bound_mc_stderr", ...}: the token channel's bound per token on
        rows x0 given their own latent path, `mc_samples` Monte Carlo draws per row."""


@runtime_checkable
class CrossAttending(LatentConditioned, Protocol):
    cross: torch.nn.ModuleDict  # block index (str) -> the cross-attention after that block
