"""The methods, one folder each: its stage (config sections, loss, parents), the process math,
networks and sampler only it uses, registered on import. Shared math, networks and samplers
stay in their layers (processes/, nets/, sampling/); the stage base classes in stages/.

A new method is a folder here plus its name in BUILTIN (or a plugin: a module named in the
DILADIFF_PLUGINS environment variable, comma-separated, or an entry point of the group
"diladiff.stages", imported by `load_plugins()`, which `import diladiff` calls).
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

# The built-in methods, in the order they register (STAGES keeps it; stage_order puts parents
# before children).
BUILTIN = ("autoencoder", "diladiff", "duo", "ladd", "ladiff", "ldlm", "mdlm")
PLUGIN_ENV = "DILADIFF_PLUGINS"

for _name in BUILTIN:
    importlib.import_module(f"diladiff.methods.{_name}")


def load_plugins() -> list[str]:
    """Import every plugin module (DILADIFF_PLUGINS, then the "diladiff.stages" entry points)
    so that its stages and config sections register; returns the module names imported."""
    names = [n.strip() for n in os.environ.get(PLUGIN_ENV, "").split(",") if n.strip()]
    names += [ep.value.split(":")[0] for ep in entry_points(group="diladiff.stages")]
    for name in names:
        importlib.import_module(name)
    return names
