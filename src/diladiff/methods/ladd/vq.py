"""Di-LADD's vector quantiser: lucidrains' `VectorQuantize` (package vector-quantize-pytorch,
the extra `diladiff[vq]`) with the authors' settings, plus a mask code
(docs/methods/ladd.md#vector-quantiser).

K codes in all: K - 1 codebook vectors e_k (unit norm, cosine similarity) and the mask id
m = K - 1, whose input vector is a learnable z_mask in R^D (initialised to 0).

    u = z_e / ||z_e||,   code = argmax_k <u, e_k>,   z_q = u + sg(e_code - u)   (straight-through)
    L_VQ = beta mean ||u - sg(z_q)||^2,   beta = 0.1                           (commitment only)
    embed(c) = e_c for c < K - 1,   z_mask for c = K - 1

The codebook is not trained by gradients: k-means (10 iterations) on the first batch, then an
EMA of the assigned inputs (decay 0.95; cluster sizes Laplace-smoothed, means re-normalised),
and codes whose EMA cluster size falls below 2 are replaced by random inputs of the batch
(training mode only). The codebook lives in buffers (state_dict); under torch.distributed its
statistics are all-reduced and its k-means / dead-code samples drawn across replicas, so every
replica holds the same codebook.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from diladiff.errors import DiladiffError


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CodeQuantizer(nn.Module):
    """quantize(z_e) -> (z_q, codes, vq_loss); embed(codes) -> vectors; mask_id = K - 1.

    sync: keep the codebook identical across torch.distributed replicas (the library's
    sync_codebook + sync_kmeans); default: whether a process group of more than one process is
    initialised when the quantiser is built (build it after joining the group)."""

    def __init__(
        self,
        dim: int,
        num_codes: int,
        decay: float = 0.95,
        commitment_weight: float = 0.1,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 2,
        sync: bool | None = None,
    ):
        super().__init__()
        if num_codes < 2:
            raise ValueError(
                f"a code quantiser needs >= 2 codes (codes + the mask code), got {num_codes}"
            )
        try:
            from vector_quantize_pytorch import VectorQuantize
        except ImportError:
            raise DiladiffError(
                "Di-LADD's vector quantiser needs vector-quantize-pytorch: "
                "pip install 'diladiff[vq]'"
            ) from None
        self.dim, self._num_codes = dim, num_codes
        self.commitment_weight = commitment_weight
        sync = _distributed() if sync is None else sync
        self.quantizer = VectorQuantize(
            dim=dim,
            codebook_size=num_codes - 1,
            use_cosine_sim=True,
            decay=decay,
            commitment_weight=commitment_weight,
            kmeans_init=True,
            kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=threshold_ema_dead_code,
            # The library's default for dim > 1 is the rotation trick; the paper and the
            # authors' wrapper use the plain straight-through estimator.
            rotation_trick=False,
            # Explicit: the library's default (sync_codebook=None) asks a cached
            # is_distributed(), which stays False if it was first asked before the group
            # existed. sync_kmeans only acts when sync_codebook is on.
            sync_codebook=sync,
            sync_kmeans=True,
        )
        self.z_mask = nn.Parameter(torch.zeros(dim))

    @property
    def mask_id(self) -> int:
        return self._num_codes - 1

    @property
    def num_codes(self) -> int:
        """K: the codebook's K - 1 codes and the mask code."""
        return self._num_codes

    @property
    def codebook(self) -> torch.Tensor:
        """(K - 1, D) unit vectors (zeros before the k-means initialisation)."""
        return self.quantizer.codebook

    def quantize(
        self, z_e: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_q, codes, vq_loss) of z_e (..., D): z_q the codebook vectors (straight-through to
        z_e in training, through its normalisation), codes in [0, K - 2], vq_loss the commitment
        term (module docstring; the library's in training, the same formula in eval mode, where
        the library returns 0). Training mode updates the codebook; the first call (any mode)
        runs the k-means initialisation. The library draws its k-means and dead-code samples
        from torch's global generator; with `generator`, one seed drawn from it seeds those
        draws instead (then the quantiser is a function of `generator`: exact resume)."""
        shape = z_e.shape
        flat = z_e.reshape(1, -1, self.dim)
        with self._seeded(generator, z_e.device):
            z_q, codes, loss = self.quantizer(flat)
        z_q, codes = z_q.reshape(shape), codes.reshape(shape[:-1])
        if not self.training:
            u = F.normalize(z_e.float(), dim=-1)
            loss = self.commitment_weight * F.mse_loss(u, z_q.float())
        return z_q, codes, loss

    def embed(self, codes: torch.Tensor, z_q: torch.Tensor | None = None) -> torch.Tensor:
        """(..., D) network inputs of codes (...) in [0, K - 1]: the code's codebook vector
        (unit norm, as quantize's z_q), z_mask for the mask id. With z_q (quantize's output for
        the same rows) the codes that are not masked read z_q instead, as the authors' training
        does: z_q holds the codebook before the EMA update of that quantize call (and carries
        the straight-through gradient), the lookup the codebook after it."""
        if z_q is not None:
            return torch.where(
                (codes == self.mask_id).unsqueeze(-1), self.z_mask.to(z_q.dtype), z_q
            )
        table = torch.cat([self.codebook.to(self.z_mask.dtype), self.z_mask.unsqueeze(0)])
        return F.embedding(codes, table)

    @contextlib.contextmanager
    def _seeded(self, generator: torch.Generator | None, device: torch.device):
        if generator is None:
            yield
            return
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        if device.type != "cuda":
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)  # not torch.manual_seed: CUDA too
                yield
            return
        index = torch.cuda.current_device() if device.index is None else device.index
        with torch.random.fork_rng(devices=[index]), torch.cuda.device(index):
            torch.default_generator.manual_seed(seed)
            torch.cuda.manual_seed(seed)  # the current device's generator only
            yield
