"""The methods' stages, each a module with its config sections, its loss and its parents.

`STAGES` maps a stage name (as in `diladiff train NAME`) to its class, in registration order
(parents first). Built-in stages are registered on import; more come from plugins: modules
named in the DILADIFF_PLUGINS environment variable (comma-separated) and the entry points of
the group "diladiff.stages", imported by `load_plugins()` (called by `import diladiff`).
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from diladiff.stages.autoencoder import Autoencoder
from diladiff.stages.base import STAGES, Stage, register_stage, stage_order
from diladiff.stages.diladiff import DiLaDiff
from diladiff.stages.duo import DUO
from diladiff.stages.ladd import CoLADD, DiLADD
from diladiff.stages.ladiff import LaDiff
from diladiff.stages.latent import LatentStage
from diladiff.stages.ldlm import LDLM
from diladiff.stages.masked import MaskedDiffusionStage
from diladiff.stages.mdlm import MDLM

PLUGIN_ENV = "DILADIFF_PLUGINS"


def load_plugins() -> list[str]:
    """Import every plugin module (DILADIFF_PLUGINS, then the "diladiff.stages" entry points)
    so that its stages and config sections register; returns the module names imported."""
    names = [n.strip() for n in os.environ.get(PLUGIN_ENV, "").split(",") if n.strip()]
    names += [ep.value.split(":")[0] for ep in entry_points(group="diladiff.stages")]
    for name in names:
        importlib.import_module(name)
    return names


__all__ = [
    "CoLADD",
    "DiLADD",
    "DUO",
    "LDLM",
    "MDLM",
    "STAGES",
    "Autoencoder",
    "DiLaDiff",
    "LaDiff",
    "LatentStage",
    "MaskedDiffusionStage",
    "Stage",
    "load_plugins",
    "register_stage",
    "stage_order",
]
