"""DUO: uniform-state discrete diffusion, its curriculum and its own sampler, the 'uniform'
generation kind (docs/methods/duo.md)."""

from diladiff.methods.duo import sampler  # registers the 'uniform' generation kind
from diladiff.methods.duo.stage import DUO

__all__ = ["DUO", "sampler"]
