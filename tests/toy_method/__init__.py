"""A toy method in one folder, with a generation kind of its own (not masked diffusion): a
left-to-right denoiser. Registered by importing this package (DILADIFF_PLUGINS=toy_method):
the test that a method is a folder plus one registration (issue 29)."""

from toy_method import sampler  # registers the "left_to_right" generation kind
from toy_method.stage import LeftToRight

__all__ = ["LeftToRight", "sampler"]
