"""What every method's stage is built on: the Stage base class and its registry (`STAGES`, a
stage name as in `diladiff train NAME` -> class, in registration order, parents first), and
the two shared families, masked-diffusion stages and latent stages. The methods themselves
live in diladiff.methods, one folder each, and register on import (`import diladiff`).
"""

from diladiff.stages.base import STAGES, Stage, register_stage, stage_order
from diladiff.stages.latent import LatentStage
from diladiff.stages.masked import MaskedDiffusionStage

__all__ = [
    "STAGES",
    "LatentStage",
    "MaskedDiffusionStage",
    "Stage",
    "register_stage",
    "stage_order",
]
