"""diladiff: hybrid continuous-discrete diffusion language models.

Stages: MDLM (masked diffusion baseline), the text auto-encoder, LaDiff (latent diffusion
prior + latent-conditioned masked decoding) and DiLaDiff (MeanFlow-distilled few-step prior).
Importing the package registers the built-in stages (and their config sections) and the
plugins named in DILADIFF_PLUGINS or installed under the "diladiff.stages" entry points.
"""

__version__ = "0.1.0"

from diladiff.stages import load_plugins  # noqa: E402  (registers every method)

load_plugins()
