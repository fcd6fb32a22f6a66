"""A method defined outside the package, as a user's plug-in would be: an MDLM fine-tuned
from a parent MDLM run with its own config section and preset changes (the test of issue 14:
a new method is one file; nothing under src/ knows it)."""

from dataclasses import dataclass

from diladiff.config import Config, register_section
from diladiff.nets.token_denoiser import TokenDenoiser
from diladiff.stages import MaskedDiffusionStage, register_stage


@register_section("toy")
@dataclass
class ToyConfig:
    # Scale of the denoiser's logits (a knob the toy method owns).
    logit_scale: float = 1.0


@register_stage("toy")
class ToyStage(MaskedDiffusionStage):
    parents = {"base": "mdlm"}
    inherits = ("model", "data", "mdlm")
    demo_steps = 2

    @classmethod
    def preset_changes(cls, cfg: Config, preset: str) -> None:
        cfg.train.lr = 1e-3
        cfg.toy.logit_scale = 0.5 if preset == "tiny" else 1.0

    def __init__(self, cfg: Config, tokenizer_identity: dict):
        super().__init__(cfg, tokenizer_identity)
        self.mask_id = int(tokenizer_identity["mask_id"])
        self.seq_len = cfg.data.seq_len
        self.net = TokenDenoiser(cfg.model, tokenizer_identity["vocab_size"], cfg.data.seq_len)

    def init_from_parents(self, parents):
        self.net.load_state_dict(parents["base"].net.state_dict())

    def hidden(self, x_t, cond=None):
        return self.net.hidden(x_t)

    def head(self, rows):
        return self.cfg.toy.logit_scale * self.net.head(rows)
