"""The method's stages, each a module with its loss and its piece of sampling.

`STAGES` maps a stage name (as in `diladiff train NAME`) to its class.
"""

from diladiff.stages.autoencoder import Autoencoder
from diladiff.stages.base import STAGES, Stage, register_stage
from diladiff.stages.diladiff import DiLaDiff
from diladiff.stages.ladiff import LaDiff
from diladiff.stages.mdlm import MDLM

__all__ = ["MDLM", "STAGES", "Autoencoder", "DiLaDiff", "LaDiff", "Stage", "register_stage"]
