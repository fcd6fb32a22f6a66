"""LADD: joint token-latent diffusion with one MM-DiT, Co-LADD (continuous latent) and Di-LADD (VQ
codes), and its joint / sequential sampler, the 'joint' generation kind (docs/methods/ladd.md)."""

from diladiff.methods.ladd import sampler  # registers the 'joint' generation kind
from diladiff.methods.ladd.stage import CoLADD, DiLADD

__all__ = ["CoLADD", "DiLADD", "sampler"]
