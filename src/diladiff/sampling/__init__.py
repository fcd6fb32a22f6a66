"""Samplers: masked-diffusion decoding (strategy registry) and, later, latent ODE samplers."""
