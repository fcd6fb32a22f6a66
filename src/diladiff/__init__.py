"""diladiff: hybrid continuous-discrete diffusion language models.

Stages: MDLM (masked diffusion baseline), the text auto-encoder, LaDiff (latent diffusion
prior + latent-conditioned masked decoding) and DiLaDiff (MeanFlow-distilled few-step prior).
Importing the package registers the built-in stages (and their config sections) and the
plugins named in DILADIFF_PLUGINS or installed under the "diladiff.stages" entry points.
"""

from diladiff.methods import load_plugins  # importing it registers the built-in methods
from diladiff.version import __version__

__all__ = ["__version__", "load"]

load_plugins()


def load(run_dir, device: str = "auto", weights: str = "ema"):
    """A trained run, ready to generate: `diladiff.load("runs/dl").generate(num_samples=8)`
    (diladiff.api.Model)."""
    from diladiff.api import load as _load

    return _load(run_dir, device, weights)
