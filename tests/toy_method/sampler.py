"""The "left_to_right" generation kind: N_disc network calls, each revealing the leftmost
ceil(L / N_disc) masked positions by a draw from softmax(logits / temperature)."""

import math

import torch

from diladiff.sampling.generate import register_generation
from diladiff.sampling.masked import gumbel_argmax


@register_generation("left_to_right", conditionable=False)
def sample_left_to_right(stage, batch: int, settings, generator, device, progress=False):
    tok = settings.tokens
    L = stage.seq_len
    x = torch.full((batch, L), stage.mask_id, dtype=torch.long, device=device)
    per_step = math.ceil(L / tok.steps)
    steps = 0
    for start in range(0, L, per_step):
        logits = stage.net(x)[:, start : start + per_step].float() / tok.temperature
        logits[..., stage.mask_id] = -math.inf  # never draw the mask itself
        x[:, start : start + per_step] = gumbel_argmax(logits, generator, tok.float64_gumbel)
        steps += 1
    return x, {"disc_nfe": steps, "disc_steps_taken": steps}
