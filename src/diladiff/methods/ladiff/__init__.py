"""LaDiff: a VP latent diffusion prior over the frozen auto-encoder's latents, decoded by its
masked decoder (docs/methods/ladiff.md)."""

from diladiff.methods.ladiff.stage import LaDiff

__all__ = ["LaDiff"]
