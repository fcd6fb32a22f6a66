"""Network building blocks (transformers, Perceiver, cross-attention): no diffusion knowledge."""
