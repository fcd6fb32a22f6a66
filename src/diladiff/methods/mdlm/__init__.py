"""MDLM: masked diffusion language model, the baseline and the decoders' starting point
(docs/methods/mdlm.md)."""

from diladiff.methods.mdlm.stage import MDLM

__all__ = ["MDLM"]
