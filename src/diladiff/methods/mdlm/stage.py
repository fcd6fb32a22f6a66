"""Stage 0: MDLM, the masked diffusion language model (SUBS parameterisation): a plain token
denoiser x_theta(x_t) trained with the masked-diffusion loss (stages/masked.py)."""

from __future__ import annotations

from diladiff.config import Config
from diladiff.nets.token_denoiser import TokenDenoiser
from diladiff.stages.base import register_stage
from diladiff.stages.masked import MaskedDiffusionStage


@register_stage("mdlm")
class MDLM(MaskedDiffusionStage):
    budget_share = 0.25
    demo_steps = 250

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)
        self.mask_id = int(tokenizer_identity["mask_id"])
        self.seq_len = cfg.data.seq_len
        self.net = TokenDenoiser(cfg.model, tokenizer_identity["vocab_size"], cfg.data.seq_len)

    def hidden(self, x_t, cond=None):
        return self.net.hidden(x_t)

    @property
    def head(self):
        return self.net.head

    def network_dims(self) -> dict:
        """What one sampler call runs (compute accounting, stages.protocols.SizedNetwork): the
        denoiser's blocks and width over L positions, no latent."""
        mc = self.cfg.model
        return {"blocks": mc.depth, "width": mc.width, "seq_len": self.seq_len, "num_latents": 0}
