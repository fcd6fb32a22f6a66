"""DiLaDiff: MeanFlow self-distillation of the LaDiff prior into few steps
(docs/methods/diladiff.md)."""

from diladiff.methods.diladiff.stage import DiLaDiff

__all__ = ["DiLaDiff"]
