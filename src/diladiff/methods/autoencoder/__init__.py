"""The text auto-encoder: frozen encoder features -> Perceiver -> latent -> the MDLM as decoder
with zero-initialised cross-attention (docs/methods/autoencoder.md)."""

from diladiff.methods.autoencoder.stage import Autoencoder

__all__ = ["Autoencoder"]
