"""The toy left-to-right stage: a token denoiser that predicts the tokens after a random cut
from the ones before it,

    k ~ U{0, ..., L - 1},   x_t = (x_1 .. x_k, [MASK] .. [MASK]),
    loss = mean over l > k of -log p_theta(x_l | x_t)

so that generation reveals a row from left to right (sampler.py)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diladiff.config import Config, register_section
from diladiff.nets.token_denoiser import TokenDenoiser
from diladiff.stages import Stage, register_stage


@register_section("left_to_right")
@dataclass
class LeftToRightConfig:
    # The shortest given prefix in training (0 = rows from nothing).
    min_prefix: int = 0


def prefix_masked(x0: torch.Tensor, cut: torch.Tensor, mask_id: int) -> torch.Tensor:
    """x0 with every position l >= cut (per row) replaced by the mask token."""
    after = torch.arange(x0.shape[1], device=x0.device)[None] >= cut[:, None]
    return torch.where(after, torch.full_like(x0, mask_id), x0)


@register_stage("toy-ltr")
class LeftToRight(Stage):
    generation = "left_to_right"
    optional = True  # a baseline the pipeline trains only when asked (--stages)
    demo_steps = 2

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)
        self.mask_id = int(tokenizer_identity["mask_id"])
        self.seq_len = cfg.data.seq_len
        self.net = TokenDenoiser(cfg.model, tokenizer_identity["vocab_size"], cfg.data.seq_len)

    def loss(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        low = self.cfg.left_to_right.min_prefix
        cut = torch.randint(low, self.seq_len, (len(x0),), generator=generator).to(x0.device)
        x_t = prefix_masked(x0, cut, self.mask_id)
        nll = F.cross_entropy(self.net(x_t).transpose(1, 2).float(), x0, reduction="none")
        masked = (x_t == self.mask_id).float()
        return (nll * masked).sum() / masked.sum()

    def forward(self, batch, generator):
        loss = self.loss(batch, generator)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, batches, generator):
        return {"val_loss": sum(float(self.loss(b, generator)) for b in batches) / len(batches)}

    def network_dims(self) -> dict:
        """One network call (compute accounting, stages.protocols.SizedNetwork)."""
        mc = self.cfg.model
        return {"blocks": mc.depth, "width": mc.width, "seq_len": self.seq_len, "num_latents": 0}
