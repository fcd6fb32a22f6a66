"""LDLM: encoder, latent diffusion and decoder trained jointly, and its post-trained decoder
(docs/methods/ldlm.md)."""

from diladiff.methods.ldlm.stage import LDLM, LDLMDecoder

__all__ = ["LDLM", "LDLMDecoder"]
