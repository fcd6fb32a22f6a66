"""diladiff: hybrid continuous-discrete diffusion language models.

Stages: MDLM (masked diffusion baseline), the text auto-encoder, LaDiff (latent diffusion
prior + latent-conditioned masked decoding) and DiLaDiff (MeanFlow-distilled few-step prior).
"""

__version__ = "0.1.0"
